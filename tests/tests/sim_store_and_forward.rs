//! A vehicle cut off mid-route keeps driving, queues its delivery events and heartbeats, and
//! once the link is back delivers every event, in order, none lost; the broker publishes its
//! sealed last will meanwhile, and its statuses pass a replay guard.

#[path = "sim_support.rs"]
mod sim_support;

use device_sim::route::{GridConfig, Node, StreetGrid};
use shared::{
    AckResult, Command, CommandAck, CommandKind, DeliveryEvent, DeliveryKind, Heartbeat,
    OfflineReason, OrderId, ReplayGuard, Status, TopicKind,
};
use sim_support::{Proxy, Received, Watcher};
use tests::WAIT;
use tests::stack::{start_broker, start_sim};

const FLEET: &str = "sf";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_events_arrive_in_order_after_a_reconnect() -> anyhow::Result<()> {
    let broker = start_broker().await?;
    let proxy = Proxy::start(broker.v4_addr()).await?;
    let mut watcher = Watcher::connect(broker.v4_addr(), "dispatch", &["fleet/sf/#"]).await?;
    // The vehicle reaches the broker only through the proxy.
    let mut sim = start_sim(
        proxy.addr(),
        1,
        FLEET,
        &["--time-scale", "100", "--rate", "5", "--seed", "11"],
    )?;
    let mut guard = ReplayGuard::default();
    let online = watcher.next_on("/status", WAIT).await?.open::<Status>()?;
    assert_eq!(online.msg, Status::Online);
    guard.check(TopicKind::Status, online.counter)?;
    let before = watcher.next_on("/hb", WAIT).await?.open::<Heartbeat>()?.msg;

    let grid = StreetGrid::new(GridConfig::default())?;
    let here = grid.nearest_node(before.pos).expect("on the grid");
    let pickup = grid.clamp(Node::new(here.east + 1, here.north + 2));
    let dropoff = grid.clamp(Node::new(here.east - 2, here.north));
    let assign = Command {
        id: 1,
        kind: CommandKind::AssignOrder {
            order: OrderId::new("ord-offline")?,
            pickup: grid.position(pickup),
            dropoff: grid.position(dropoff),
        },
    };
    watcher.command(FLEET, "sf-0001", &assign).await?;
    let ack = watcher
        .next_on("/ack", WAIT)
        .await?
        .open::<CommandAck>()?
        .msg;
    assert_eq!(ack.result, AckResult::Ok);

    // Cut off on the way to the pickup: the whole delivery happens offline.
    proxy.cut();
    let will = watcher.next_on("/status", WAIT).await?.open::<Status>()?;
    assert_eq!(
        will.msg,
        Status::Offline(OfflineReason::ConnectionLost),
        "the broker published the sealed will"
    );
    guard.check(TopicKind::Status, will.counter)?;
    sim.wait_for_line("connection lost", WAIT).await?;
    let delivered = sim.wait_for_line("delivered", WAIT).await?;
    assert!(delivered.contains("online=false"), "{delivered}");
    // Whatever arrived before the cut is not what this test is about.
    let _: Vec<Received> = watcher.drain();

    proxy.restore();
    let mut events = Vec::new();
    let mut heartbeats = Vec::new();
    let mut statuses = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while events.len() < 3 || statuses.is_empty() || heartbeats.len() < 5 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let received = watcher.next_on("", left).await?;
        match kind_of(&received.topic) {
            Some(TopicKind::Event) => events.push(received.open::<DeliveryEvent>()?.msg),
            Some(TopicKind::Heartbeat) => heartbeats.push(received.open::<Heartbeat>()?),
            Some(TopicKind::Status) => statuses.push(received.open::<Status>()?),
            _ => {}
        }
    }
    // Every event, once, in order (a re-sent duplicate would repeat a seq).
    let seqs: Vec<u32> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [0, 1, 2], "{events:?}");
    let kinds: Vec<DeliveryKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, sim_support::DELIVERY_STEPS);
    assert!(events.iter().all(|e| e.order.as_str() == "ord-offline"));
    assert_eq!(events[0].pos, grid.position(pickup));
    assert_eq!(events[2].pos, grid.position(dropoff));
    // Back online, with a status newer than the will.
    assert_eq!(statuses[0].msg, Status::Online);
    guard.check(TopicKind::Status, statuses[0].counter)?;
    // The heartbeats queued offline come first, oldest first, then live ones: no gaps
    // beyond what the backlog had to drop.
    let seqs: Vec<u32> = heartbeats.iter().map(|h| h.msg.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] + 1 == w[1]), "{seqs:?}");
    assert!(
        heartbeats[0].msg.ts_ms < events[2].ts_ms,
        "the first heartbeat after the reconnect was recorded offline"
    );
    let mut hb_guard = ReplayGuard::default();
    for hb in &heartbeats {
        hb_guard.check(TopicKind::Heartbeat, hb.counter)?;
    }
    sim.wait_for_line("reconnected", WAIT).await?;
    drop(sim);
    Ok(())
}

/// The topic kind of a received topic.
fn kind_of(topic: &str) -> Option<TopicKind> {
    shared::Topic::parse(topic).ok().map(|t| t.kind)
}
