//! Failover (issue #15 item 3): two bridges in one shared-subscription group behind Debian's
//! mosquitto, with Redis and PostgreSQL, and `device-sim --vehicles 200`. Bridge 1 is killed
//! with SIGKILL under load: bridge 2's dispatcher keeps receiving the positions of every
//! vehicle (the longest gap is measured and printed), the devices keep publishing, and every
//! delivery event a vehicle got a PUBACK for while bridge 1 was dead is in the PostgreSQL store
//! once bridge 1 is back with the same `client_id`.
//!
//! What mosquitto does meanwhile (mosquitto 2.0; `man mosquitto.conf` documents the session
//! and queue limits, not how a shared subscription treats a member that is gone; the
//! behaviour is that of its `subs.c`): each bridge has two MQTT sessions. Heartbeats arrive
//! on a clean session (`bridge-1-hb`): when the killed bridge's socket closes, that session
//! and its shared subscription are gone, so every heartbeat goes to bridge 2 from then on.
//! Delivery events and statuses arrive on the persistent session (`bridge-1`, clean session
//! off), which outlives the connection (persistent sessions never expire unless
//! `persistent_client_expiration` is set). Its membership in the shared subscription stays,
//! and mosquitto keeps dealing messages to the group's members in turn, including to the dead
//! one: those QoS 1 messages are queued in its session (the publisher gets its PUBACK from the
//! broker at once) and delivered when a client with the same id reconnects. The queue holds
//! `max_queued_messages` (default 1000) per client and silently drops the rest, so the
//! cluster's mosquitto raises it (`tests::cluster::start_mosquitto`). Hence the last check:
//! only after bridge 1 is back can the events dealt to it be stored.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context as _;
use shared::{DeliveryEvent, DeliveryKind, OrderId, Position, VehicleId};
use sqlx::Connection as _;
use tests::WAIT;
use tests::cluster::{BrokerKind, Cluster, ClusterOptions, ensure_running, eventually};
use tests::sio::SioClient;
use tokio::time::Instant;

const VEHICLES: usize = 200;
const FLEET: &str = "demo";
/// The vehicle (not one of device-sim's) whose QoS 1 events the test publishes itself.
const PROBE: &str = "probe-0001";
/// How long bridge 1 stays dead.
const OUTAGE: Duration = Duration::from_secs(12);
/// The bound on the longest gap at bridge 2's dispatcher: generous; the figure is reported.
const GAP_BOUND: Duration = Duration::from_secs(30);

/// The sealed delivery event `seq` of the probe vehicle (open mode), for its own order.
fn probe_event(seq: u32) -> anyhow::Result<(String, Vec<u8>)> {
    let topic = format!("fleet/{FLEET}/{PROBE}/event");
    let id = VehicleId::new(PROBE).map_err(anyhow::Error::msg)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let ts_ms = u64::try_from(now_ms)?;
    let event = DeliveryEvent {
        seq,
        order: OrderId::new(&format!("failover-{seq}")).map_err(anyhow::Error::msg)?,
        kind: DeliveryKind::Pickup,
        ts_ms,
        pos: Position::new(525_000_000, 133_900_000),
    };
    let mut buf = [0u8; 128];
    let sealed = shared::seal(&event, &topic, ts_ms, &shared::open_mode_key(&id), &mut buf)
        .map_err(anyhow::Error::msg)?;
    Ok((topic, sealed.to_vec()))
}

/// Publishes the probe's event `seq` with `mosquitto_pub -q 1`, which exits successfully only
/// once it got the broker's PUBACK.
async fn publish_probe(cluster: &Cluster, seq: u32) -> anyhow::Result<()> {
    let (topic, payload) = probe_event(seq)?;
    tests::mosquitto::publish(cluster.mqtt(), &topic, &payload, 1)
        .await
        .with_context(|| format!("publishing event {seq} (no PUBACK?)"))
}

/// The `seq` of every delivery event of `vehicle` in the PostgreSQL store at `url`.
async fn stored_seqs(url: &str, vehicle: &str) -> anyhow::Result<BTreeSet<u32>> {
    let mut db = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let seqs: Vec<i64> =
        sqlx::query_scalar("SELECT seq::bigint FROM delivery_events WHERE vehicle = $1")
            .bind(vehicle)
            .fetch_all(&mut db)
            .await
            .context("reading delivery_events")?;
    db.close().await.ok();
    Ok(seqs
        .into_iter()
        .filter_map(|s| u32::try_from(s).ok())
        .collect())
}

/// What a dispatcher received: when each position batch arrived and whose positions it held.
struct Recording {
    batches: Vec<(Instant, Vec<String>)>,
    /// When the recording ended.
    end: Instant,
}

impl Recording {
    /// The longest time without a batch from `from` to the end (counting from the last batch
    /// before `from`).
    fn stream_gap(&self, from: Instant) -> Duration {
        let mut times: Vec<Instant> = self.batches.iter().map(|(t, _)| *t).collect();
        let start = times.iter().rposition(|t| *t < from).unwrap_or(0);
        times.push(self.end);
        times[start..]
            .windows(2)
            .map(|w| w[1].saturating_duration_since(w[0]))
            .max()
            .unwrap_or(Duration::MAX)
    }

    /// Per vehicle, the longest time without its position from `from` to `end`: from its
    /// last position before `from` to its next one, between its positions after, and from its
    /// last one to `end`.
    fn vehicle_gaps(&self, from: Instant, end: Instant) -> BTreeMap<String, Duration> {
        let mut last: BTreeMap<&str, Instant> = BTreeMap::new();
        let mut gaps: BTreeMap<String, Duration> = BTreeMap::new();
        for (t, vehicles) in &self.batches {
            for v in vehicles {
                if *t >= from
                    && let Some(prev) = last.get(v.as_str())
                {
                    let entry = gaps.entry(v.clone()).or_default();
                    *entry = (*entry).max(*t - *prev);
                }
                last.insert(v, *t);
            }
        }
        for (v, t) in last {
            let entry = gaps.entry(v.to_owned()).or_default();
            *entry = (*entry).max(end.saturating_duration_since(t.max(from)));
        }
        gaps
    }
}

/// Reads `dispatcher`'s position batches until `until`, noting when each arrived.
async fn record(
    mut dispatcher: SioClient,
    until: Instant,
) -> anyhow::Result<(SioClient, Recording)> {
    let mut recording = Recording {
        batches: Vec::new(),
        end: until,
    };
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok((dispatcher, recording));
        }
        let Ok(batch) = dispatcher.next_event("position", left).await else {
            // Nothing more before `until` (the gap shows in the recording).
            return Ok((dispatcher, recording));
        };
        let vehicles = batch
            .as_array()
            .context("a position batch is an array")?
            .iter()
            .filter_map(|p| p["vehicle"].as_str().map(str::to_owned))
            .collect();
        recording.batches.push((Instant::now(), vehicles));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_2_serves_on_and_no_acknowledged_event_is_lost_when_bridge_1_is_killed()
-> anyhow::Result<()> {
    failover(BrokerKind::Mosquitto).await
}

/// The same with Fleetbeat's own `broker` in place of mosquitto (issue #15 item 4: it speaks
/// shared subscriptions too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_failover_on_fleetbeats_own_broker() -> anyhow::Result<()> {
    failover(BrokerKind::Fleetbeat).await
}

/// Kills bridge 1 of two behind `broker` under load and checks what bridge 2 and the store do.
async fn failover(broker: BrokerKind) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions {
        bridges: 2,
        vehicles: u32::try_from(VEHICLES)?,
        fleet: FLEET.to_owned(),
        broker,
        ..ClusterOptions::default()
    })
    .await?;
    let room = format!("fleet:{FLEET}");
    let mut d1 = SioClient::dispatcher_in(&cluster.url(1)?, &room).await?;
    let mut d2 = SioClient::dispatcher_in(&cluster.url(2)?, &room).await?;
    // Before the kill, each dispatcher sees every vehicle, whichever bridge received it.
    let seen = d1.vehicles_seen(VEHICLES, WAIT).await?;
    assert_eq!(seen.len(), VEHICLES, "bridge 1's dispatcher: {seen:?}");
    let seen = d2.vehicles_seen(VEHICLES, WAIT).await?;
    assert_eq!(seen.len(), VEHICLES, "bridge 2's dispatcher: {seen:?}");
    d1.close().await;
    // ... while the broker shares the devices' heartbeats between the bridges: each one
    // received only part of them (the rest reached its dispatcher through the other).
    let hb = "fleetbeat_bridge_mqtt_received_total{kind=\"hb\"}";
    let (h1, h2) = (
        cluster.bridge(1)?.metric(hb).await?,
        cluster.bridge(2)?.metric(hb).await?,
    );
    println!(
        "failover ({broker:?}): heartbeats received before the kill: bridge 1 {h1}, bridge 2 {h2}"
    );
    assert!(
        h1 > 0.1 * (h1 + h2) && h2 > 0.1 * (h1 + h2),
        "the shared subscription does not spread heartbeats: {h1} and {h2}"
    );

    // Events acknowledged before the kill: stored at once by one bridge or the other.
    let mut acknowledged = BTreeSet::new();
    for seq in 1..=4 {
        publish_probe(&cluster, seq).await?;
        acknowledged.insert(seq);
    }
    let url = cluster.store_url().to_owned();
    eventually(WAIT, || async {
        let stored = stored_seqs(&url, PROBE).await?;
        anyhow::ensure!(stored.is_superset(&acknowledged), "stored {stored:?}");
        Ok(())
    })
    .await?;

    // Bridge 2's dispatcher is recorded from a moment before the kill to the end of the
    // outage plus the time bridge 2 may need to take over everything.
    d2.drain_events("position");
    let observe = GAP_BOUND + Duration::from_secs(2);
    let recorder = tokio::spawn(record(
        d2,
        Instant::now() + Duration::from_secs(3) + observe,
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;

    let killed_at = Instant::now();
    cluster.kill_bridge(1).await?;
    // While bridge 1 is dead, the probe publishes QoS 1 events, one connection each; every
    // one that returns got its PUBACK.
    let mut seq = 100;
    let mut during = BTreeSet::new();
    while killed_at.elapsed() < OUTAGE {
        publish_probe(&cluster, seq).await?;
        during.insert(seq);
        acknowledged.insert(seq);
        seq += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(during.len() >= 10, "only {} events published", during.len());
    // The devices keep publishing: device-sim did not give up.
    let sim = cluster.sim_mut().context("device-sim runs")?;
    ensure_running(sim, "device-sim")?;

    let (d2, recording) = recorder.await.context("the recorder panicked")??;
    let stream_gap = recording.stream_gap(killed_at);
    let gaps = recording.vehicle_gaps(killed_at, recording.end);
    let (worst_vehicle, worst_gap) = gaps
        .iter()
        .max_by_key(|(_, g)| **g)
        .map(|(v, g)| (v.clone(), *g))
        .unwrap_or_default();
    let after: BTreeSet<&String> = recording
        .batches
        .iter()
        .filter(|(t, _)| *t >= killed_at)
        .flat_map(|(_, v)| v)
        .collect();
    println!(
        "failover ({broker:?}): bridge 2's dispatcher, after SIGKILL of bridge 1: longest gap \
         between position batches {stream_gap:?}; longest gap of one vehicle {worst_gap:?} \
         ({worst_vehicle}); {} of {VEHICLES} vehicles seen after the kill; {} batches",
        after.len(),
        recording.batches.len()
    );
    assert_eq!(
        after.len(),
        VEHICLES,
        "bridge 2's dispatcher stopped receiving some vehicles after the kill"
    );
    assert!(
        stream_gap < GAP_BOUND,
        "no position batch for {stream_gap:?} at bridge 2's dispatcher"
    );
    assert!(
        worst_gap < GAP_BOUND,
        "{worst_vehicle} had no position for {worst_gap:?} at bridge 2's dispatcher"
    );

    // Bridge 1 comes back with the same client_id: its session's queued events arrive, and
    // every acknowledged event is stored.
    let before = stored_seqs(&url, PROBE).await?;
    println!(
        "failover ({broker:?}): {} of the {} events published during the outage stored before \
         bridge 1 is back (the rest wait in its MQTT session)",
        during.intersection(&before).count(),
        during.len()
    );
    let restarted_at = Instant::now();
    cluster.restart_bridge(1).await?;
    println!(
        "failover ({broker:?}): bridge 1 ready again {:?} after its restart began",
        restarted_at.elapsed()
    );
    let stored = eventually(WAIT, || async {
        let stored = stored_seqs(&url, PROBE).await?;
        let missing: Vec<&u32> = acknowledged.difference(&stored).collect();
        anyhow::ensure!(
            missing.is_empty(),
            "{} of {} acknowledged events not in PostgreSQL: {missing:?}",
            missing.len(),
            acknowledged.len()
        );
        Ok(stored)
    })
    .await?;
    println!(
        "failover ({broker:?}): {} acknowledged events ({} during the outage), all {} stored",
        acknowledged.len(),
        during.len(),
        stored.len()
    );

    // The restarted bridge serves a complete fleet again.
    let mut d1 = SioClient::dispatcher_in(&cluster.url(1)?, &room).await?;
    let seen = d1.vehicles_seen(VEHICLES, WAIT).await?;
    assert_eq!(seen.len(), VEHICLES, "restarted bridge 1's dispatcher");
    let sim = cluster.sim_mut().context("device-sim runs")?;
    ensure_running(sim, "device-sim")?;
    d1.close().await;
    d2.close().await;
    Ok(())
}
