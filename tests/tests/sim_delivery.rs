//! An order assigned over MQTT produces pickup → in-transit → delivered, sealed, in order,
//! within the time the drive takes at a sped-up clock.

#[path = "sim_support.rs"]
mod sim_support;

use std::time::Duration;

use device_sim::route::{GridConfig, Node, StreetGrid};
use device_sim::runner::SimConfig;
use shared::{
    AckResult, Command, CommandAck, CommandKind, DeliveryEvent, DeliveryKind, FleetId, Heartbeat,
    OrderId, Status,
};
use sim_support::Watcher;
use tests::WAIT;
use tests::stack::{start_broker, start_sim};

const FLEET: &str = "acme";
const SEED: u64 = 5;
const TIME_SCALE: f64 = 100.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_picked_up_carried_and_delivered() -> anyhow::Result<()> {
    let broker = start_broker().await?;
    let mut watcher = Watcher::connect(broker.v4_addr(), "dispatch", &["fleet/acme/#"]).await?;
    let mut sim = start_sim(
        broker.v4_addr(),
        1,
        FLEET,
        &[
            "--time-scale",
            &TIME_SCALE.to_string(),
            "--rate",
            "5",
            "--seed",
            &SEED.to_string(),
        ],
    )?;

    // Online (sealed), and sealed heartbeats.
    let online = watcher.next_on("/status", WAIT).await?;
    assert_eq!(online.open::<Status>()?.msg, Status::Online);
    let hb = watcher.next_on("/hb", WAIT).await?.open::<Heartbeat>()?.msg;

    // Where the vehicle starts, from the same configuration the binary builds.
    let grid = StreetGrid::new(GridConfig::default())?;
    let config = SimConfig {
        vehicles: 1,
        fleets: vec![FleetId::new(FLEET)?],
        seed: SEED,
        ..SimConfig::default()
    };
    let start = config.devices()?[0].position();
    assert!(
        grid.is_on_street(hb.pos, 0.5),
        "{:?} off the streets",
        hb.pos
    );
    let near = grid.nearest_node(start).expect("starts on the grid");
    let pickup = grid.clamp(Node::new(near.east + 2, near.north - 1));
    let dropoff = grid.clamp(Node::new(near.east - 2, near.north + 3));
    let blocks = near.blocks_to(pickup) + pickup.blocks_to(dropoff);

    let order = OrderId::new("ord-42")?;
    let assign = Command {
        id: 7,
        kind: CommandKind::AssignOrder {
            order: order.clone(),
            pickup: grid.position(pickup),
            dropoff: grid.position(dropoff),
        },
    };
    watcher.command(FLEET, "acme-0001", &assign).await?;
    let assigned_at = tokio::time::Instant::now();
    let ack = watcher
        .next_on("/ack", WAIT)
        .await?
        .open::<CommandAck>()?
        .msg;
    assert_eq!(
        ack,
        CommandAck {
            id: 7,
            result: AckResult::Ok
        }
    );

    let mut events = Vec::new();
    let mut counters = Vec::new();
    while events.len() < 3 {
        let opened = watcher
            .next_on("/event", WAIT)
            .await?
            .open::<DeliveryEvent>()?;
        counters.push(opened.counter);
        events.push(opened.msg);
    }
    let real = assigned_at.elapsed();
    let kinds: Vec<DeliveryKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, sim_support::DELIVERY_STEPS);
    assert!(events.iter().all(|e| e.order == order));
    let seqs: Vec<u32> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [0, 1, 2]);
    assert!(counters.windows(2).all(|w| w[0] < w[1]), "{counters:?}");
    assert_eq!(
        events[0].pos,
        grid.position(pickup),
        "picked up at the vendor"
    );
    assert_eq!(
        events[2].pos,
        grid.position(dropoff),
        "delivered at the door"
    );

    // The expected time, in simulation time: the drive (blocks of at most 250 m at 15 to
    // 50 km/h, with red lights) and two handovers of 8 to 20 s.
    let sim_ms = events[2].ts_ms - events[0].ts_ms;
    assert!(sim_ms >= 8_000, "handed over in {sim_ms} ms");
    let handover_to_door = events[2].ts_ms - events[1].ts_ms;
    let longest_ms = u64::from(blocks) * 250 * 1000 / 4 + 2 * 20_000 + 60_000;
    assert!(
        handover_to_door <= longest_ms,
        "{handover_to_door} ms for {blocks} blocks"
    );
    // And in real time: the clock runs TIME_SCALE times faster.
    let real_bound = Duration::from_millis((longest_ms as f64 / TIME_SCALE) as u64 + 5_000);
    assert!(real <= real_bound, "took {real:?} (bound {real_bound:?})");

    let logged = sim.wait_for_line("delivered", WAIT).await?;
    assert!(logged.contains("delivery event"), "{logged}");
    sim.terminate(Duration::from_secs(10)).await?;
    // A clean goodbye, sealed.
    let bye = loop {
        let status = watcher.next_on("/status", WAIT).await?.open::<Status>()?;
        if status.msg != Status::Online {
            break status.msg;
        }
    };
    assert_eq!(
        bye,
        Status::Offline(shared::OfflineReason::Shutdown),
        "clean shutdown on SIGTERM"
    );
    Ok(())
}
