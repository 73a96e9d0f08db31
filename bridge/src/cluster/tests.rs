//! The cluster link against a real `redis-server` (testengines): several fleet caches, each
//! with its own [`Cluster`], on one Redis.

use std::time::{Duration, Instant};

use shared::{Heartbeat, OfflineReason, Status, Topic, TopicKind, VehicleId};
use testengines::redis::TempRedis;
use tokio_util::sync::CancellationToken;

use super::stats::ClusterCounter;
use super::*;
use crate::domain::fleet::{Fleet, Liveness, Report, StaleRule};

/// What a tick sends to the sockets: liveness changes, and positions (vehicle, seq).
type Tick = (Vec<(String, Liveness)>, Vec<(String, u32)>);

/// A bridge's fleet cache and its link, as `server` would make them.
struct Member {
    fleet: Fleet,
    cluster: Cluster,
    cancel: CancellationToken,
    counter: u64,
}

impl Member {
    async fn start(redis: &TempRedis, name: &str) -> Self {
        let mut fleet = Fleet::new(StaleRule::After(Duration::from_secs(60)));
        let cancel = CancellationToken::new();
        let options = ClusterOptions {
            url: redis.url(),
            name: name.to_owned(),
            max_backoff: Duration::from_millis(200),
        };
        let cluster = Cluster::start(options, fleet.cluster_port(), cancel.clone())
            .await
            .expect("cluster starts");
        Self {
            fleet,
            cluster,
            cancel,
            counter: 0,
        }
    }

    /// A heartbeat received by this bridge (as `ingest` records it).
    fn heartbeat(&mut self, fleet: &str, vehicle: &str, seq: u32, ts_ms: u64) {
        self.counter += 1;
        let topic = Topic::parse(&format!("fleet/{fleet}/{vehicle}/hb")).expect("topic");
        let hb = Heartbeat {
            seq,
            ts_ms,
            battery_pct: 50,
            ..Heartbeat::default()
        };
        self.fleet
            .record(&topic, self.counter, Report::Heartbeat(&hb))
            .expect("fresh");
    }

    /// A status received by this bridge.
    fn status(&mut self, fleet: &str, vehicle: &str, status: &Status) {
        self.counter += 1;
        let topic = Topic::parse(&format!("fleet/{fleet}/{vehicle}/hb"))
            .expect("topic")
            .with_kind(TopicKind::Status);
        self.fleet
            .record(&topic, self.counter, Report::Status(status))
            .expect("fresh");
    }

    /// What `Hub::take_tick_news` does: the statuses, then the vehicles that moved.
    fn tick(&mut self) -> Tick {
        let statuses = self.fleet.take_statuses();
        let moved = self.fleet.take_moved();
        (
            statuses
                .into_iter()
                .map(|s| (s.vehicle.as_str().to_owned(), s.liveness))
                .collect(),
            moved
                .into_iter()
                .map(|m| (m.vehicle.as_str().to_owned(), m.heartbeat.seq))
                .collect(),
        )
    }

    /// The vehicle's last heartbeat sequence number and liveness in this cache.
    fn seen(&mut self, vehicle: &str) -> Option<(Option<u32>, Liveness)> {
        let id = VehicleId::new(vehicle).expect("id");
        self.fleet
            .vehicle(&id)
            .map(|v| (v.heartbeat.map(|hb| hb.seq), v.status.liveness))
    }

    fn count(&self, counter: ClusterCounter) -> u64 {
        self.cluster.stats().get(counter)
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.cluster.stopped())
            .await
            .expect("the link stops");
    }
}

/// Polls `done` (every 20 ms, at most 10 s) until it holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn news_of_one_bridge_reach_the_other_and_are_not_sent_back() {
    let redis = TempRedis::start().expect("redis-server");
    let mut a = Member::start(&redis, "a").await;
    let mut b = Member::start(&redis, "b").await;
    a.heartbeat("north", "v1", 7, 1_000);
    a.heartbeat("south", "v2", 3, 1_000);
    let (statuses, moved) = a.tick();
    assert_eq!(statuses.len(), 2, "a's own liveness changes");
    assert_eq!(moved.len(), 2);

    until("b to merge a's news", || {
        b.seen("v2").is_some() && b.seen("v1").is_some()
    })
    .await;
    assert_eq!(b.seen("v1"), Some((Some(7), Liveness::Online)));
    // b's tick sends the merged vehicles to b's own sockets...
    let (statuses, mut moved) = b.tick();
    moved.sort();
    assert_eq!(moved, [("v1".to_owned(), 7), ("v2".to_owned(), 3)]);
    assert_eq!(statuses.len(), 2, "b tells its sockets they are online");
    // ...but never hands them back to the cluster: b has published nothing.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b.count(ClusterCounter::Published), 0);
    assert_eq!(
        a.count(ClusterCounter::Published),
        1,
        "one publish per tick"
    );
    assert_eq!(a.count(ClusterCounter::PublishedVehicles), 2);
    assert_eq!(
        a.count(ClusterCounter::Received),
        0,
        "a ignores its own news"
    );
    assert_eq!(b.count(ClusterCounter::Received), 1);
    // A status change heard by a reaches b too.
    a.status("north", "v1", &Status::Offline(OfflineReason::Shutdown));
    a.tick();
    until("b to see v1 offline", || {
        b.seen("v1").map(|s| s.1) == Some(Liveness::Offline)
    })
    .await;
    let (statuses, _) = b.tick();
    assert_eq!(statuses, [("v1".to_owned(), Liveness::Offline)]);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_state_wins_over_late_news() {
    let redis = TempRedis::start().expect("redis-server");
    let mut a = Member::start(&redis, "a").await;
    let mut b = Member::start(&redis, "b").await;
    let mut late = Member::start(&redis, "late").await;
    a.heartbeat("north", "v1", 5, 2_000);
    a.tick();
    until("b to merge seq 5", || {
        b.seen("v1") == Some((Some(5), Liveness::Online))
    })
    .await;
    // An older heartbeat of v1 (another bridge had it, and publishes it late).
    late.heartbeat("north", "v1", 4, 1_900);
    late.tick();
    until("b to receive the late news", || {
        b.count(ClusterCounter::Received) >= 2
    })
    .await;
    assert_eq!(
        b.seen("v1"),
        Some((Some(5), Liveness::Online)),
        "v1 did not move back"
    );
    // And a newer one from the late bridge does win.
    late.heartbeat("north", "v1", 6, 2_100);
    late.tick();
    until("b to merge seq 6", || {
        b.seen("v1") == Some((Some(6), Liveness::Online))
    })
    .await;
    // a's own newer heartbeat is not undone by what it merges either.
    until("a to merge seq 6", || {
        a.seen("v1") == Some((Some(6), Liveness::Online))
    })
    .await;
    a.stop().await;
    b.stop().await;
    late.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_started_later_loads_every_fleet_at_once() {
    let redis = TempRedis::start().expect("redis-server");
    let mut a = Member::start(&redis, "a").await;
    for i in 0..50 {
        let fleet = if i % 2 == 0 { "north" } else { "south" };
        a.heartbeat(fleet, &format!("v{i}"), 1, 1_000);
    }
    a.status("north", "v0", &Status::Offline(OfflineReason::LowBattery));
    a.tick();
    until("a to publish", || a.count(ClusterCounter::Published) == 1).await;

    let mut c = Member::start(&redis, "c").await;
    // No wait: `Cluster::start` returns once the hashes are loaded.
    assert_eq!(c.count(ClusterCounter::LoadedVehicles), 50);
    assert_eq!(c.fleet.snapshot(|_, _| true).len(), 50);
    assert_eq!(c.seen("v0"), Some((Some(1), Liveness::Offline)));
    assert_eq!(c.seen("v49"), Some((Some(1), Liveness::Online)));
    a.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_is_reconnected_counted_and_refilled() {
    let mut redis = TempRedis::start().expect("redis-server");
    let mut a = Member::start(&redis, "a").await;
    let mut b = Member::start(&redis, "b").await;
    assert_eq!(a.count(ClusterCounter::Connects), 1);
    redis.kill();
    until("a to count the outage", || {
        a.count(ClusterCounter::Errors) >= 1
    })
    .await;
    until("b to count the outage", || {
        b.count(ClusterCounter::Errors) >= 1
    })
    .await;
    assert!(!a.cluster.stats().connected());
    // Heard while Redis is away: served locally, kept for later.
    a.heartbeat("north", "v1", 1, 1_000);
    a.tick();
    assert_eq!(a.seen("v1"), Some((Some(1), Liveness::Online)));

    redis.restart().expect("redis-server restarts");
    until("a to reconnect", || a.count(ClusterCounter::Connects) >= 2).await;
    until("b to reconnect", || b.count(ClusterCounter::Connects) >= 2).await;
    assert!(a.cluster.stats().connected());
    // Redis restarted empty: a wrote back what it heard; a bridge started now sees it.
    let mut c = Member::start(&redis, "c").await;
    assert_eq!(c.seen("v1"), Some((Some(1), Liveness::Online)));
    // And news flows again.
    a.heartbeat("north", "v1", 2, 2_000);
    a.tick();
    until("b to merge seq 2", || {
        b.seen("v1") == Some((Some(2), Liveness::Online))
    })
    .await;
    until("c to merge seq 2", || {
        c.seen("v1") == Some((Some(2), Liveness::Online))
    })
    .await;
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn unreachable_redis_does_not_stop_the_start() {
    // A port nothing listens on (a server started and killed).
    let mut redis = TempRedis::start().expect("redis-server");
    redis.kill();
    let mut a = Member::start(&redis, "a").await;
    assert!(a.count(ClusterCounter::Errors) >= 1);
    a.heartbeat("north", "v1", 1, 1_000);
    a.tick();
    assert_eq!(a.seen("v1"), Some((Some(1), Liveness::Online)));
    a.stop().await;
}

#[tokio::test]
async fn a_bad_url_is_refused() {
    let mut fleet = Fleet::default();
    let options = ClusterOptions {
        url: "redis://[::1".to_owned(),
        name: "a".to_owned(),
        max_backoff: Duration::from_secs(1),
    };
    let err = Cluster::start(options, fleet.cluster_port(), CancellationToken::new())
        .await
        .expect_err("bad URL");
    assert!(matches!(err, ClusterError::Url(_)));
}
