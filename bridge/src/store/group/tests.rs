//! Unit tests of `store::group` on each backend (SQLite in memory, PostgreSQL): events
//! recorded at the same time share transactions, each is committed exactly once and answered
//! with its own outcome, and a failing event or a lock wait does not fail the others.

use serde_json::json;
use shared::{DeliveryEvent, DeliveryKind, FleetId, OrderId, Position, VehicleId};
use tokio::task::JoinSet;

use crate::domain::order::OrderState;
use crate::store::testing::{self, on_each_backend};
use crate::store::{ClientId, NewOrder, Recorded, Store, StoreError};

/// Vehicles (each with its own order) in the concurrent tests.
const VEHICLES: u32 = 64;

const STEPS: [DeliveryKind; 3] = [
    DeliveryKind::Pickup,
    DeliveryKind::InTransit,
    DeliveryKind::Delivered,
];

fn vehicle(i: u32) -> VehicleId {
    format!("v-{i}").parse().expect("vehicle id")
}

fn fleet() -> FleetId {
    "demo".parse().expect("fleet id")
}

/// Creates order `o-{i}` and assigns it to vehicle `v-{i}`, for `i` in `0..n`.
async fn assigned_orders(store: &Store, n: u32) {
    for i in 0..n {
        let order: OrderId = format!("o-{i}").parse().expect("order id");
        store
            .create_order(&NewOrder {
                order: order.clone(),
                store: "store-1".into(),
                fleet: fleet(),
                customer: "Ada".into(),
                dropoff: Position::new(525_200_000, 134_050_000),
                pickup: Position::new(525_000_000, 134_000_000),
            })
            .await
            .expect("creates");
        store.assign(&order, &vehicle(i)).await.expect("assigns");
    }
}

/// Vehicle `v-{i}`'s event number `step` for its order.
fn event(i: u32, step: usize) -> DeliveryEvent {
    DeliveryEvent {
        seq: u32::try_from(step).expect("small"),
        order: format!("o-{i}").parse().expect("order id"),
        kind: STEPS[step],
        ts_ms: 1_000 + step as u64,
        pos: Position::new(525_100_000, 134_020_000),
    }
}

/// Records vehicle `v-{i}`'s `event`, queued for the vendor and the dispatchers.
async fn record(store: &Store, i: u32, event: &DeliveryEvent) -> Result<Recorded, StoreError> {
    store
        .record_event(
            &vehicle(i),
            &fleet(),
            event,
            &[ClientId::vendor("store-1"), ClientId::dispatch()],
            &json!({"vehicle": i, "seq": event.seq}),
        )
        .await
}

async fn count(store: &Store, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&store.read)
        .await
        .expect("counts")
}

on_each_backend! {
    /// 64 vehicles each report their three steps at once (each vehicle one after the other):
    /// the events share transactions, every one is answered `Ok` with its own outcome and
    /// committed exactly once, and each vehicle's events are recorded in order (no flag, every
    /// order delivered).
    async fn concurrent_events_form_groups_each_committed_once(store) {
        assigned_orders(&store, VEHICLES).await;
        let mut vehicles = JoinSet::new();
        for i in 0..VEHICLES {
            let store = store.clone();
            vehicles.spawn(async move {
                let mut outcomes = Vec::new();
                for step in 0..STEPS.len() {
                    outcomes.push(record(&store, i, &event(i, step)).await.expect("records"));
                }
                (i, outcomes)
            });
        }
        let mut answered = Vec::new();
        while let Some(joined) = vehicles.join_next().await {
            let (i, outcomes) = joined.expect("no panic");
            answered.extend(outcomes.iter().flat_map(|r| r.messages.iter().cloned()));
            let states: Vec<_> = outcomes.iter().map(|r| r.state).collect();
            assert_eq!(
                states,
                [
                    Some(OrderState::PickedUp),
                    Some(OrderState::InTransit),
                    Some(OrderState::Delivered)
                ],
                "vehicle {i}"
            );
            for recorded in &outcomes {
                assert!(!recorded.duplicate && recorded.advanced, "{recorded:?}");
                assert_eq!(recorded.flag, None);
                // The order as this event left it, read in the group's transaction.
                let order = recorded.order.as_ref().expect("the order");
                assert_eq!(
                    (Some(order.state), order.vehicle.as_ref()),
                    (recorded.state, Some(&vehicle(i)))
                );
                assert_eq!(recorded.messages.len(), 2);
                assert_eq!(recorded.messages[0].payload["vehicle"], json!(i));
            }
        }
        let events = i64::from(VEHICLES) * STEPS.len() as i64;
        assert_eq!(count(&store, "SELECT COUNT(*) FROM delivery_events").await, events);
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM delivery_events WHERE flag IS NOT NULL").await,
            0
        );
        assert_eq!(count(&store, "SELECT COUNT(*) FROM queue").await, 2 * events);
        // Each message's id, as answered, names its own queue row.
        let rows: Vec<(i64, String, String)> =
            sqlx::query_as("SELECT id, client, payload FROM queue")
                .fetch_all(&store.read)
                .await
                .expect("reads the queue");
        let rows: std::collections::HashMap<u64, (String, serde_json::Value)> = rows
            .into_iter()
            .map(|(id, client, payload)| {
                let payload = serde_json::from_str(&payload).expect("JSON");
                (u64::try_from(id).expect("positive"), (client, payload))
            })
            .collect();
        assert_eq!(answered.len(), rows.len());
        for message in &answered {
            assert_eq!(
                rows.get(&message.id.0),
                Some(&(message.client.as_str().to_owned(), message.payload.clone())),
                "{message:?}"
            );
        }
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM orders WHERE state = 'delivered'").await,
            i64::from(VEHICLES)
        );
        let stats = store.event_groups();
        assert_eq!(stats.events, events as u64, "{stats:?}");
        assert!(stats.largest > 1, "no group formed: {stats:?}");
        assert!(stats.commits < stats.events, "{stats:?}");
        // Every committed event has its latency counted, each at least its own transaction's.
        assert_eq!(stats.latency.count(), stats.events, "{stats:?}");
        assert!(stats.latency.sum_us > 0, "{stats:?}");
        store.close().await;
    }
}

on_each_backend! {
    /// Two copies of the same event in one group: the first is recorded, the second is a
    /// duplicate, and its messages are queued once.
    async fn a_duplicate_inside_a_group_is_deduped(store) {
        assigned_orders(&store, 2).await;
        let mut copies = JoinSet::new();
        for i in [0, 0, 1] {
            let store = store.clone();
            copies.spawn(async move { record(&store, i, &event(i, 0)).await.expect("records") });
        }
        let mut outcomes = Vec::new();
        while let Some(joined) = copies.join_next().await {
            outcomes.push(joined.expect("no panic"));
        }
        assert_eq!(outcomes.iter().filter(|r| r.duplicate).count(), 1, "{outcomes:?}");
        assert_eq!(count(&store, "SELECT COUNT(*) FROM delivery_events").await, 2);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM queue").await, 4);
        assert!(store.event_groups().largest >= 2, "{:?}", store.event_groups());
        store.close().await;
    }
}

/// Records the first step of vehicles `v-0` to `v-{n-1}` at once (so that they share
/// groups); returns each vehicle's outcome, in the order they came.
async fn first_steps_at_once(store: &Store, n: u32) -> Vec<(u32, Result<Recorded, StoreError>)> {
    let mut events = JoinSet::new();
    for i in 0..n {
        let store = store.clone();
        events.spawn(async move { (i, record(&store, i, &event(i, 0)).await) });
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = events.join_next().await {
        outcomes.push(joined.expect("no panic"));
    }
    outcomes
}

/// Makes order `o-{i}`'s stored state unreadable (a value the check constraint refuses), so
/// that recording an event of it fails with [`StoreError::Corrupt`].
async fn corrupt_order(store: &Store, i: u32) {
    let mut conn = store.write.acquire().await.expect("a connection");
    let statements: &[&str] = match store.backend {
        super::Backend::Sqlite => &[
            "PRAGMA ignore_check_constraints = ON",
            "UPDATE orders SET state = 'lost' WHERE order_id = $1",
            "PRAGMA ignore_check_constraints = OFF",
        ],
        super::Backend::Postgres => &[
            "ALTER TABLE orders DROP CONSTRAINT orders_state_check",
            "UPDATE orders SET state = 'lost' WHERE order_id = $1",
        ],
    };
    for sql in statements {
        let query = sqlx::query(*sql);
        let query = if sql.contains("$1") {
            query.bind(format!("o-{i}"))
        } else {
            query
        };
        query.execute(&mut *conn).await.expect("corrupts");
    }
}

on_each_backend! {
    /// A group holding an event that fails (its order's row cannot be read): the others are
    /// recorded one per transaction and answered `Ok`; the bad one gets its error and nothing
    /// of it is committed.
    async fn a_failing_event_does_not_fail_its_group(store) {
        assigned_orders(&store, 8).await;
        corrupt_order(&store, 3).await;
        for (i, outcome) in first_steps_at_once(&store, 8).await {
            if i == 3 {
                let err = outcome.expect_err("the corrupt order fails");
                assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
                assert!(!err.is_outage());
            } else {
                let recorded = outcome.expect("the others are recorded");
                assert_eq!(recorded.state, Some(OrderState::PickedUp), "vehicle {i}");
            }
        }
        assert_eq!(count(&store, "SELECT COUNT(*) FROM delivery_events").await, 7);
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM delivery_events WHERE order_id = 'o-3'").await,
            0
        );
        assert_eq!(count(&store, "SELECT COUNT(*) FROM queue").await, 14);
        store.close().await;
    }
}

/// Makes the store refuse, by a trigger, to queue any message of vehicle `v-{i}` (the payload
/// `record` queues names it): the group's last write statement then fails after some of its
/// rows, and after the group's other statements, were written.
async fn refuse_messages_of(store: &Store, i: u32) {
    let mut conn = store.write.acquire().await.expect("a connection");
    let pattern = format!("%\"vehicle\":{i}}}%");
    let statements = match store.backend {
        super::Backend::Sqlite => vec![format!(
            "CREATE TRIGGER refuse BEFORE INSERT ON queue WHEN NEW.payload LIKE '{pattern}' \
             BEGIN SELECT RAISE(FAIL, 'refused by the test'); END"
        )],
        super::Backend::Postgres => vec![
            format!(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 IF NEW.payload LIKE '{pattern}' THEN RAISE EXCEPTION 'refused by the test'; \
                 END IF; RETURN NEW; END $$"
            ),
            "CREATE TRIGGER refuse BEFORE INSERT ON queue FOR EACH ROW EXECUTE FUNCTION refuse()"
                .to_owned(),
        ],
    };
    for sql in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .expect("installs the trigger");
    }
}

on_each_backend! {
    /// A group whose write statement fails half-way (the store refuses one event's messages,
    /// after other rows of the statement and the group's events and order moves were written):
    /// nothing of the failed try is left, the others are recorded one per transaction, and the
    /// refused event is recorded nowhere (SQLite's writes are `OR FAIL`: a statement's own rows
    /// are not undone by the statement, so this checks that the transaction is).
    async fn a_statement_failing_half_way_leaves_nothing(store) {
        assigned_orders(&store, 8).await;
        refuse_messages_of(&store, 5).await;
        for (i, outcome) in first_steps_at_once(&store, 8).await {
            if i == 5 {
                outcome.expect_err("the refused event fails");
            } else {
                let recorded = outcome.expect("the others are recorded");
                assert_eq!(recorded.state, Some(OrderState::PickedUp), "vehicle {i}");
                assert_eq!(recorded.messages.len(), 2, "vehicle {i}");
            }
        }
        assert_eq!(count(&store, "SELECT COUNT(*) FROM delivery_events").await, 7);
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM delivery_events WHERE order_id = 'o-5'").await,
            0
        );
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM orders WHERE state = 'assigned'").await,
            1
        );
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM orders WHERE order_id = 'o-5' AND state = 'assigned'").await,
            1
        );
        assert_eq!(count(&store, "SELECT COUNT(*) FROM queue").await, 14);
        store.close().await;
    }
}

on_each_backend! {
    /// Events of one vehicle handed over one after the other without waiting (all in flight at
    /// once) are recorded in the order they were handed over: each step moves the order on,
    /// none is flagged.
    async fn one_vehicles_events_keep_their_order(store) {
        assigned_orders(&store, 1).await;
        let mut in_flight = Vec::new();
        for step in 0..STEPS.len() {
            let store = store.clone();
            in_flight.push(tokio::spawn(async move { record(&store, 0, &event(0, step)).await }));
            // Handed over in this order: each task submits before the next one starts.
            tokio::task::yield_now().await;
        }
        for (step, task) in in_flight.into_iter().enumerate() {
            let recorded = task.await.expect("no panic").expect("records");
            assert_eq!(recorded.flag, None, "step {step}: {recorded:?}");
            assert!(recorded.advanced, "step {step}");
        }
        let flags: Vec<Option<String>> =
            sqlx::query_scalar("SELECT flag FROM delivery_events ORDER BY id")
                .fetch_all(&store.read)
                .await
                .expect("reads");
        assert_eq!(flags, [None, None, None]);
        store.close().await;
    }
}

on_each_backend! {
    /// The committer drains what it accepted when the store closes: every event handed over
    /// before `close` is answered, and those answered `Ok` are committed.
    async fn close_drains_the_accepted_events(store) {
        assigned_orders(&store, 16).await;
        let mut events = JoinSet::new();
        for i in 0..16 {
            let store = store.clone();
            events.spawn(async move { record(&store, i, &event(i, 0)).await });
        }
        tokio::task::yield_now().await;
        store.close().await;
        let mut ok = 0;
        while let Some(joined) = events.join_next().await {
            if joined.expect("no panic").is_ok() {
                ok += 1;
            }
        }
        assert!(ok > 0, "nothing was drained");
        // Reads go on after a close only for the in-memory SQLite store: check on the events
        // answered instead.
        assert_eq!(store.event_groups().events, ok);
    }
}

/// Two bridges on one PostgreSQL database record the same events of 20 orders at once, in
/// opposite order of orders: the groups lock their orders sorted by id, so neither deadlocks
/// the other (and a deadlock would be retried alone); every event is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_bridges_groups_in_opposite_order_postgres() {
    let (a, b) = testing::two_postgres().await;
    const ORDERS: u32 = 20;
    assigned_orders(&a, ORDERS).await;
    let mut events = JoinSet::new();
    for (store, reversed) in [(&a, false), (&b, true)] {
        for n in 0..ORDERS {
            let i = if reversed { ORDERS - 1 - n } else { n };
            let store = store.clone();
            events.spawn(async move { record(&store, i, &event(i, 0)).await });
        }
    }
    let mut recorded = 0;
    while let Some(joined) = events.join_next().await {
        let outcome = joined.expect("no panic").expect("records");
        if !outcome.duplicate {
            recorded += 1;
        }
    }
    assert_eq!(recorded, ORDERS);
    assert_eq!(
        count(&a, "SELECT COUNT(*) FROM delivery_events").await,
        i64::from(ORDERS)
    );
    assert_eq!(
        count(&a, "SELECT COUNT(*) FROM queue").await,
        2 * i64::from(ORDERS)
    );
    a.close().await;
    b.close().await;
}

on_each_backend! {
    /// The committer keeps the write connection from group to group while events keep
    /// coming, but gives it back (after `HOLD`): another write is not starved by a stream of
    /// events that never pauses.
    async fn other_writes_get_their_turn_while_events_keep_coming(store) {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;

        assigned_orders(&store, VEHICLES).await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut producers = JoinSet::new();
        for i in 0..VEHICLES {
            let (store, stop) = (store.clone(), Arc::clone(&stop));
            // The first event, then the same one again and again (a duplicate each time, but
            // a group to commit all the same).
            producers.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    record(&store, i, &event(i, 0)).await.expect("records");
                }
            });
        }
        let flowing = tokio::time::timeout(Duration::from_secs(30), async {
            while store.event_groups().commits < 20 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(flowing.is_ok(), "events are committed");
        let order: OrderId = "o-other".parse().expect("order id");
        let created = tokio::time::timeout(
            Duration::from_secs(10),
            store.create_order(&NewOrder {
                order: order.clone(),
                store: "store-1".into(),
                fleet: fleet(),
                customer: "Grace".into(),
                dropoff: Position::new(525_200_000, 134_050_000),
                pickup: Position::new(525_000_000, 134_000_000),
            }),
        )
        .await;
        let committed_meanwhile = store.event_groups().commits;
        stop.store(true, Ordering::Relaxed);
        while let Some(done) = producers.join_next().await {
            done.expect("a producer ends");
        }
        created
            .expect("the write got its turn while the events kept coming")
            .expect("creates");
        assert!(committed_meanwhile >= 20);
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM orders WHERE order_id = 'o-other'").await,
            1
        );
    }
}

/// Schema 9 rebuilds the dedupe index keyed by time first: an event recorded under schema 8
/// is still found as a duplicate after the upgrade, and a new event of the same vehicle is not.
#[tokio::test]
async fn an_event_recorded_before_schema_9_is_still_a_duplicate_sqlite() {
    use sqlx::Connection as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleetbeat.db");
    let path = path.to_str().expect("utf-8 path");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .expect("connects");
    crate::store::sqlite::MIGRATOR
        .run_to(8, &mut conn)
        .await
        .expect("schema 8");
    sqlx::query(
        "INSERT INTO orders VALUES ('o-0', 'store-1', 'demo', 'Ada', 1, 2, 3, 4, 'picked-up', \
         'v-0', 10, 20)",
    )
    .execute(&mut conn)
    .await
    .expect("an order");
    let first = event(0, 0);
    sqlx::query(
        "INSERT INTO delivery_events (vehicle, seq, ts_ms, fleet, order_id, kind, lat_e7, \
         lon_e7, flag, received_ms) \
         VALUES ('v-0', $1, $2, 'demo', 'o-0', 'pickup', 1, 2, NULL, 20)",
    )
    .bind(i64::from(first.seq))
    .bind(i64::try_from(first.ts_ms).expect("small"))
    .execute(&mut conn)
    .await
    .expect("an event");
    conn.close().await.expect("closes");

    let store = Store::open(path, crate::store::StoreOptions::default())
        .await
        .expect("opens and migrates");
    let again = record(&store, 0, &first).await.expect("records");
    assert!(again.duplicate, "{again:?}");
    let next = record(&store, 0, &event(0, 1)).await.expect("records");
    assert!(!next.duplicate && next.advanced, "{next:?}");
    assert_eq!(
        count(&store, "SELECT COUNT(*) FROM delivery_events").await,
        2
    );
    store.close().await;
}

/// On SQLite the committer has a thread of its own: an event is committed while the runtime
/// that handed it over is blocked (on the bridge: busy with its other tasks).
#[tokio::test]
async fn the_sqlite_committer_does_not_wait_for_the_callers_runtime() {
    use std::future::Future as _;
    use std::task::{Context, Waker};
    use std::time::{Duration, Instant};

    let store = testing::sqlite().await;
    assigned_orders(&store, 1).await;
    // The first event starts the committer; its connection then comes back to the pool
    // tested on the committer's runtime (sqlx pings a connection given back to the pool on
    // the runtime that gives it back: the one written with last waits for the runtime that
    // wrote with it).
    record(&store, 0, &event(0, 0)).await.expect("records");
    let handed = event(0, 1);
    let mut recording = std::pin::pin!(record(&store, 0, &handed));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(recording.as_mut().poll(&mut cx).is_pending(), "handed over");
    // The test's runtime has one thread, and it stays blocked here (no await) until the event
    // is committed: polling a counter is the only way to wait without yielding to it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.event_groups().events < 2 {
        assert!(
            Instant::now() < deadline,
            "not committed while the caller's runtime was blocked"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let recorded = recording.await.expect("records");
    assert!(recorded.advanced && !recorded.duplicate, "{recorded:?}");
    store.close().await;
}

/// `close` waits for the SQLite committer's thread to drain what it accepted, even when the
/// runtime of the event that started the committer is gone: every event handed over before
/// the close is committed.
#[test]
fn close_drains_the_committers_thread_whichever_runtime_started_it() {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    };
    const EVENTS: u32 = 32;
    let first = runtime();
    let store = first.block_on(async {
        let store = testing::sqlite().await;
        assigned_orders(&store, EVENTS).await;
        record(&store, 0, &event(0, 0)).await.expect("records");
        store
    });
    drop(first);
    runtime().block_on(async {
        let mut events = JoinSet::new();
        for i in 1..EVENTS {
            let store = store.clone();
            events.spawn(async move { record(&store, i, &event(i, 0)).await });
        }
        // The spawned tasks hand their events over before this one goes on.
        tokio::task::yield_now().await;
        store.events.close().await;
        // The committer has returned (and dropped its share of the counters).
        assert_eq!(
            std::sync::Arc::strong_count(&store.events.counters),
            1,
            "the close returned before the committer ended"
        );
        assert_eq!(store.event_groups().events, u64::from(EVENTS));
        while let Some(joined) = events.join_next().await {
            let recorded = joined
                .expect("no panic")
                .expect("committed before the close");
            assert!(recorded.advanced, "{recorded:?}");
        }
        store.close().await;
    });
}
