//! Unit tests of `store::order`: orders, assignments and delivery events on each backend
//! (SQLite in memory, PostgreSQL), and several bridges writing to one PostgreSQL database.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use serde_json::json;
use shared::DeliveryKind;

use super::*;
use crate::domain::order::EventFlag;
use crate::store::database::DbPool;
use crate::store::testing::{self, on_each_backend};

fn id<T: FromStr>(s: &str) -> T
where
    T::Err: fmt::Debug,
{
    s.parse().expect("valid id")
}

fn new_order(order: &str) -> NewOrder {
    NewOrder {
        order: id(order),
        store: "store-1".into(),
        fleet: id("demo"),
        customer: "Ada".into(),
        dropoff: Position::new(525_200_000, 134_050_000),
        pickup: Position::new(525_000_000, 134_000_000),
    }
}

fn event(seq: u32, order: &str, kind: DeliveryKind, ts_ms: u64) -> DeliveryEvent {
    DeliveryEvent {
        seq,
        order: id(order),
        kind,
        ts_ms,
        pos: Position::new(525_100_000, 134_020_000),
    }
}

/// `store`, now holding `order`, assigned to `vehicle`.
async fn store_with_assigned(store: Store, order: &NewOrder, vehicle: &VehicleId) -> Store {
    store.create_order(order).await.expect("creates");
    store.assign(&order.order, vehicle).await.expect("assigns");
    store
}

/// How many messages wait for the dispatchers.
async fn pending_for_dispatch(store: &Store) -> usize {
    store
        .pending(&ClientId::dispatch())
        .await
        .expect("pending")
        .len()
}

fn recipients() -> [ClientId; 2] {
    [ClientId::vendor("store-1"), ClientId::dispatch()]
}

on_each_backend! {
    async fn create_order_is_idempotent(store) {
        let order = new_order("o-1");
        let first = store.create_order(&order).await.expect("creates");
        assert!(first.created);
        assert_eq!(first.state, OrderState::Created);
        let again = store.create_order(&order).await.expect("idempotent");
        assert!(!again.created);
        assert_eq!(again.vehicle, None);

        store
            .assign(&order.order, &id("v-1"))
            .await
            .expect("assigns");
        let again = store.create_order(&order).await.expect("idempotent");
        assert_eq!(
            (again.created, again.state, again.vehicle),
            (false, OrderState::Assigned, Some(id("v-1")))
        );

        let conflicting = NewOrder {
            customer: "Bob".into(),
            ..order.clone()
        };
        let err = store
            .create_order(&conflicting)
            .await
            .expect_err("conflict");
        assert!(matches!(err, StoreError::OrderConflict { .. }), "{err}");
        let view = store
            .order(&order.order)
            .await
            .expect("reads")
            .expect("exists");
        assert_eq!(view.customer, "Ada", "the first content stays");
    }
}

on_each_backend! {
    async fn assignment_rules(store) {
        for o in ["o-1", "o-2"] {
            store.create_order(&new_order(o)).await.expect("creates");
        }
        let (o1, o2): (OrderId, OrderId) = (id("o-1"), id("o-2"));
        let (v1, v2): (VehicleId, VehicleId) = (id("v-1"), id("v-2"));
        let err = store.assign(&id("nope"), &v1).await.expect_err("unknown");
        assert!(matches!(err, StoreError::UnknownOrder(_)), "{err}");

        store.assign(&o1, &v1).await.expect("assigns");
        store
            .assign(&o1, &v1)
            .await
            .expect("same vehicle again: no-op");
        let err = store.assign(&o2, &v1).await.expect_err("busy");
        assert!(
            matches!(&err, StoreError::VehicleBusy { order, .. } if *order == o1),
            "{err}"
        );
        assert_eq!(
            store.busy_vehicles(&id("demo")).await.expect("busy"),
            HashSet::from([v1.clone()])
        );
        assert!(
            store
                .busy_vehicles(&id("other"))
                .await
                .expect("busy")
                .is_empty()
        );

        // An order another vehicle holds is not moved behind its back, and nothing changes.
        let taken = store.assign(&o1, &v2).await.expect_err("held by v-1");
        assert!(
            matches!(&taken, StoreError::OrderTaken { vehicle, .. } if vehicle == &v1),
            "{taken:?}"
        );
        let held = store.order(&o1).await.expect("reads").expect("exists");
        assert_eq!((held.state, held.vehicle), (OrderState::Assigned, Some(v1.clone())));
        assert_eq!(held.timeline.len(), 1, "no assignment recorded: {:?}", held.timeline);
        // Reassignment before pickup: taken back first, then assigned; the first vehicle is
        // free again.
        assert!(store.unassign(&o1, &v1).await.expect("unassigns"));
        store.assign(&o1, &v2).await.expect("reassigns");
        store.assign(&o2, &v1).await.expect("v-1 is free again");

        store
            .record_event(
                &v2,
                &id("demo"),
                &event(0, "o-1", DeliveryKind::Pickup, 10),
                &[],
                &json!({}),
            )
            .await
            .expect("records");
        let err = store.assign(&o1, &v1).await.expect_err("underway");
        assert!(
            matches!(
                err,
                StoreError::OrderUnderway {
                    state: OrderState::PickedUp,
                    ..
                }
            ),
            "{err}"
        );

        let view = store.order(&o1).await.expect("reads").expect("exists");
        let kinds: Vec<_> = view
            .timeline
            .iter()
            .map(|e| (e.kind.as_str(), e.vehicle.as_str()))
            .collect();
        // By time: the pickup carries the device's clock (10 ms after the epoch here).
        assert_eq!(
            kinds,
            [("pickup", "v-2"), ("assigned", "v-1"), ("assigned", "v-2")]
        );
    }
}

on_each_backend! {
    async fn delivery_moves_the_order_and_queues_messages(store) {
        let order = new_order("o-1");
        let (vehicle, fleet): (VehicleId, FleetId) = (id("v-1"), id("demo"));
        let store = store_with_assigned(store, &order, &vehicle).await;
        let t0 = now_ms();
        let mut all_ids = Vec::new();
        for (seq, kind, state) in [
            (0, DeliveryKind::Pickup, OrderState::PickedUp),
            (1, DeliveryKind::InTransit, OrderState::InTransit),
            (2, DeliveryKind::Delivered, OrderState::Delivered),
        ] {
            let payload = json!({ "order": "o-1", "kind": kind.as_str() });
            let recorded = store
                .record_event(
                    &vehicle,
                    &fleet,
                    &event(seq, "o-1", kind, t0 + u64::from(seq)),
                    &recipients(),
                    &payload,
                )
                .await
                .expect("records");
            assert!(!recorded.duplicate);
            assert!(recorded.advanced);
            assert_eq!(recorded.flag, None);
            assert_eq!(recorded.state, Some(state));
            assert_eq!(recorded.store.as_deref(), Some("store-1"));
            // The order as the event left it, without a read of its own: as it was committed.
            let stored = store.order_summary(&id("o-1")).await.expect("reads");
            assert_eq!(recorded.order, stored);
            assert_eq!(
                recorded
                    .messages
                    .iter()
                    .map(|m| m.client.clone())
                    .collect::<Vec<_>>(),
                recipients()
            );
            assert!(recorded.messages.iter().all(|m| m.payload == payload));
            all_ids.extend(recorded.messages.iter().map(|m| m.id));
        }
        assert!(all_ids.windows(2).all(|w| w[0] < w[1]), "{all_ids:?}");
        let vendor = store
            .pending(&ClientId::vendor("store-1"))
            .await
            .expect("pending");
        assert_eq!(vendor.len(), 3);
        assert_eq!(vendor[2].payload["kind"], "delivered");
        assert_eq!(pending_for_dispatch(&store).await, 3);
        assert!(
            store.busy_vehicles(&fleet).await.expect("busy").is_empty(),
            "delivered frees the vehicle"
        );

        let view = store
            .order(&order.order)
            .await
            .expect("reads")
            .expect("exists");
        assert_eq!(view.state, OrderState::Delivered);
        assert_eq!(view.vehicle, Some(vehicle));
        assert_eq!(view.pickup, order.pickup);
        assert_eq!(view.dropoff, order.dropoff);
        let kinds: Vec<&str> = view.timeline.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["assigned", "pickup", "in-transit", "delivered"]);
        assert_eq!(view.timeline[1].seq, Some(0));
        assert_eq!(
            view.timeline[1].position,
            Some(Position::new(525_100_000, 134_020_000))
        );
    }
}

on_each_backend! {
    async fn duplicates_change_nothing(store) {
        let (vehicle, fleet): (VehicleId, FleetId) = (id("v-1"), id("demo"));
        let store = store_with_assigned(store, &new_order("o-1"), &vehicle).await;
        let pickup = event(7, "o-1", DeliveryKind::Pickup, 1_000);
        let first = store
            .record_event(&vehicle, &fleet, &pickup, &recipients(), &json!(1))
            .await
            .expect("records");
        assert!(!first.duplicate);
        assert_eq!(first.messages.len(), 2);
        for _ in 0..3 {
            let again = store
                .record_event(&vehicle, &fleet, &pickup, &recipients(), &json!(1))
                .await
                .expect("records");
            assert!(again.duplicate);
            assert!(again.messages.is_empty());
            assert!(!again.advanced);
        }
        // Same number reused with other content (device lost its counter): still a duplicate.
        let reused = event(7, "o-1", DeliveryKind::Delivered, 1_000);
        assert!(
            store
                .record_event(&vehicle, &fleet, &reused, &recipients(), &json!(2))
                .await
                .expect("records")
                .duplicate
        );
        // The same number at another time (the counter restarted at 0 after a reboot) is a new event.
        let restarted = event(7, "o-1", DeliveryKind::InTransit, 5_000);
        let recorded = store
            .record_event(&vehicle, &fleet, &restarted, &recipients(), &json!(3))
            .await
            .expect("records");
        assert!(!recorded.duplicate);
        assert_eq!(recorded.state, Some(OrderState::InTransit));

        assert_eq!(pending_for_dispatch(&store).await, 2);
        let view = store
            .order(&id("o-1"))
            .await
            .expect("reads")
            .expect("exists");
        assert_eq!(view.timeline.iter().filter(|e| e.seq.is_some()).count(), 2);
    }
}

on_each_backend! {
    async fn out_of_order_and_unknown_events_are_kept_and_flagged(store) {
        let (v1, v2, fleet): (VehicleId, VehicleId, FleetId) = (id("v-1"), id("v-2"), id("demo"));
        let store = store_with_assigned(store, &new_order("o-1"), &v1).await;
        let record = |vehicle: VehicleId, ev: DeliveryEvent| {
            let store = store.clone();
            let fleet = fleet.clone();
            async move {
                store
                    .record_event(&vehicle, &fleet, &ev, &[ClientId::dispatch()], &json!({}))
                    .await
                    .expect("records")
            }
        };

        use EventFlag::{OutOfOrder, SkippedStep, WrongVehicle};
        use OrderState::InTransit;
        let outcome = |r: &Recorded| (r.flag, r.advanced, r.state);
        // in-transit before pickup: the order moves on, the skip is flagged.
        let r = record(v1.clone(), event(1, "o-1", DeliveryKind::InTransit, 20)).await;
        assert_eq!(outcome(&r), (Some(SkippedStep), true, Some(InTransit)));
        // the late pickup: kept, flagged, the order stays.
        let r = record(v1.clone(), event(0, "o-1", DeliveryKind::Pickup, 10)).await;
        assert_eq!(outcome(&r), (Some(OutOfOrder), false, Some(InTransit)));
        // in-transit again under a new number.
        let r = record(v1.clone(), event(2, "o-1", DeliveryKind::InTransit, 30)).await;
        assert_eq!((r.flag, r.advanced), (Some(EventFlag::Repeated), false));
        // another vehicle claims the order.
        let r = record(v2.clone(), event(0, "o-1", DeliveryKind::Delivered, 40)).await;
        assert_eq!(outcome(&r), (Some(WrongVehicle), false, Some(InTransit)));
        // an order nobody created.
        let r = record(v2, event(1, "ghost", DeliveryKind::Pickup, 50)).await;
        assert_eq!(
            (r.flag, r.advanced, r.state, r.store),
            (Some(EventFlag::UnknownOrder), false, None, None)
        );
        assert_eq!(r.messages.len(), 1, "still queued for the recipients");
        // the real delivery.
        let r = record(v1, event(3, "o-1", DeliveryKind::Delivered, 60)).await;
        assert_eq!(outcome(&r), (None, true, Some(OrderState::Delivered)));

        let view = store
            .order(&id("o-1"))
            .await
            .expect("reads")
            .expect("exists");
        let timeline: Vec<(&str, Option<EventFlag>)> = view
            .timeline
            .iter()
            .filter(|e| e.kind != TimelineKind::Assigned)
            .map(|e| (e.kind.as_str(), e.flag))
            .collect();
        assert_eq!(
            timeline,
            [
                ("pickup", Some(OutOfOrder)),
                ("in-transit", Some(SkippedStep)),
                ("in-transit", Some(EventFlag::Repeated)),
                ("delivered", Some(WrongVehicle)),
                ("delivered", None),
            ]
        );
        assert_eq!(pending_for_dispatch(&store).await, 6);
        assert_eq!(store.order(&id("ghost")).await.expect("reads"), None);
    }
}

async fn count(pool: &DbPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .expect("counts")
}

/// Two bridges receive the same delivery event at the same time (a re-send after a
/// reconnect): it is stored once and its messages are queued once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_bridges_record_one_event_once_postgres() {
    let (a, b) = testing::two_postgres().await;
    let fleet: FleetId = id("demo");
    const ORDERS: u32 = 20;
    for i in 0..ORDERS {
        let order = new_order(&format!("o-{i}"));
        a.create_order(&order).await.expect("creates");
        a.assign(&order.order, &id(&format!("v-{i}")))
            .await
            .expect("assigns");
    }
    let mut tasks = Vec::new();
    for i in 0..ORDERS {
        for store in [a.clone(), b.clone()] {
            let fleet = fleet.clone();
            tasks.push(tokio::spawn(async move {
                let vehicle: VehicleId = id(&format!("v-{i}"));
                let event = event(
                    i,
                    &format!("o-{i}"),
                    DeliveryKind::Pickup,
                    1_000 + u64::from(i),
                );
                store
                    .record_event(&vehicle, &fleet, &event, &recipients(), &json!({ "i": i }))
                    .await
                    .expect("records")
            }));
        }
    }
    let mut fresh = 0;
    for task in tasks {
        let recorded = task.await.expect("no panic");
        if !recorded.duplicate {
            fresh += 1;
            assert_eq!(recorded.state, Some(OrderState::PickedUp));
            assert_eq!(recorded.messages.len(), 2);
        }
    }
    assert_eq!(fresh, ORDERS, "each event recorded by exactly one bridge");
    assert_eq!(
        count(&a.read, "SELECT COUNT(*) FROM delivery_events").await,
        i64::from(ORDERS)
    );
    assert_eq!(
        pending_for_dispatch(&b).await,
        ORDERS as usize,
        "queued once"
    );
    assert_eq!(
        count(
            &a.read,
            "SELECT COUNT(*) FROM orders WHERE state = 'picked-up'"
        )
        .await,
        i64::from(ORDERS)
    );
}

/// On PostgreSQL the assigning transaction holds the cluster's assigner lock: while another
/// bridge holds it, an assignment waits for it, then assigns.
#[tokio::test]
async fn one_assigner_for_the_cluster_postgres() {
    let (a, b) = testing::two_postgres().await;
    a.create_order(&new_order("o-1")).await.expect("creates");
    let mut held = a.begin_write().await.expect("begins");
    assert!(
        crate::store::postgres::try_assigner_lock(&mut held)
            .await
            .expect("locks")
    );
    let waiting = tokio::spawn(async move { b.assign(&id("o-1"), &id("v-1")).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the assignment waits for the lock");
    assert_eq!(
        a.order(&id("o-1"))
            .await
            .expect("reads")
            .expect("exists")
            .state,
        OrderState::Created,
        "nothing assigned while the lock is held"
    );
    held.rollback().await.expect("releases");
    tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("assigns once the lock is released")
        .expect("no panic")
        .expect("assigns");
    assert_eq!(
        a.order(&id("o-1"))
            .await
            .expect("reads")
            .expect("exists")
            .state,
        OrderState::Assigned
    );
}

/// Two bridges assign the same orders at once, to overlapping vehicles: every attempt is
/// assigned or refused (vehicle busy, order taken), never a database error; no vehicle ends up with two orders, and every order's vehicle is its
/// latest assignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_assigners_never_double_book_postgres() {
    let (a, b) = testing::two_postgres().await;
    const N: usize = 12;
    for i in 0..N {
        a.create_order(&new_order(&format!("o-{i}")))
            .await
            .expect("creates");
    }
    let mut tasks = Vec::new();
    for (shift, store) in [(0, a.clone()), (1, b.clone())] {
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for round in 0..8 {
                for i in 0..N {
                    let order: OrderId = id(&format!("o-{i}"));
                    let vehicle: VehicleId = id(&format!("v-{}", (i + shift + round) % N));
                    outcomes.push(store.assign(&order, &vehicle).await);
                }
            }
            outcomes
        }));
    }
    let (mut assigned, mut busy) = (0, 0);
    for task in tasks {
        for outcome in task.await.expect("no panic") {
            match outcome {
                Ok(()) => assigned += 1,
                Err(StoreError::VehicleBusy { .. } | StoreError::OrderTaken { .. }) => busy += 1,
                Err(err) => panic!("unexpected error: {err}"),
            }
        }
    }
    assert!(assigned > 0, "{assigned} assigned, {busy} refused");
    assert_eq!(
        count(
            &a.read,
            "SELECT COUNT(*) FROM (SELECT vehicle FROM orders WHERE vehicle IS NOT NULL \
             AND state <> 'delivered' GROUP BY vehicle HAVING COUNT(*) > 1) AS doubled"
        )
        .await,
        0,
        "a vehicle with two orders"
    );
    assert_eq!(
        count(
            &a.read,
            "SELECT COUNT(*) FROM orders o WHERE o.vehicle IS DISTINCT FROM \
             (SELECT a.vehicle FROM assignments a WHERE a.order_id = o.order_id \
              ORDER BY a.id DESC LIMIT 1)"
        )
        .await,
        0,
        "an order whose vehicle is not its latest assignment"
    );
}

/// Two bridges claim the offer of one order: one gets it, the other not until the first
/// releases it or its claim lapses; the holder may renew its own claim.
#[tokio::test]
async fn one_bridge_offers_an_order_at_a_time_postgres() {
    let (a, b) = testing::two_postgres().await;
    let order = id("o-1");
    let later = now_ms() + 60_000;
    assert!(
        a.claim_offer(&order, "bridge-a", later)
            .await
            .expect("claims")
    );
    assert!(
        !b.claim_offer(&order, "bridge-b", later)
            .await
            .expect("asks")
    );
    assert!(
        a.claim_offer(&order, "bridge-a", later)
            .await
            .expect("renews")
    );
    b.release_offer(&order, "bridge-b").await.expect("no-op");
    assert!(
        !b.claim_offer(&order, "bridge-b", later)
            .await
            .expect("asks")
    );
    a.release_offer(&order, "bridge-a").await.expect("releases");
    assert!(
        b.claim_offer(&order, "bridge-b", now_ms() - 1)
            .await
            .expect("claims")
    );
    assert!(
        a.claim_offer(&order, "bridge-a", later)
            .await
            .expect("claims"),
        "a lapsed claim is taken over"
    );
}

on_each_backend! {
    /// The offer claims work on each backend alike (one store, two holders).
    async fn offer_claims(store) {
        let order = id("o-1");
        let later = now_ms() + 60_000;
        assert!(store.claim_offer(&order, "x", later).await.expect("claims"));
        assert!(!store.claim_offer(&order, "y", later).await.expect("asks"));
        store.release_offer(&order, "x").await.expect("releases");
        assert!(store.claim_offer(&order, "y", later).await.expect("claims"));
    }
}

/// `store` holding orders `o-1` (assigned to `v-1`), `o-2` (created) of store-1 in fleet demo,
/// and `o-3` of store-2 in fleet north (assigned to `v-9`), created in that order.
async fn three_orders(store: &Store) {
    let o1 = new_order("o-1");
    store.create_order(&o1).await.expect("creates");
    store.assign(&o1.order, &id("v-1")).await.expect("assigns");
    store
        .create_order(&new_order("o-2"))
        .await
        .expect("creates");
    let o3 = NewOrder {
        store: "store-2".into(),
        fleet: id("north"),
        ..new_order("o-3")
    };
    store.create_order(&o3).await.expect("creates");
    store.assign(&o3.order, &id("v-9")).await.expect("assigns");
}

fn filter() -> OrderFilter {
    OrderFilter {
        fleets: None,
        store: None,
        states: Vec::new(),
        vehicle: None,
        limit: 200,
    }
}

fn ids(orders: &[OrderView]) -> Vec<&str> {
    orders.iter().map(|o| o.order.as_str()).collect()
}

on_each_backend! {
    /// Every filter and the scope are applied in the query; newest first, at most `limit`.
    async fn list_filters_and_scope(store) {
        three_orders(&store).await;
        let all = store.list_orders(&filter()).await.expect("lists");
        // Created in the same millisecond or not: newest first, then by id, descending.
        assert_eq!(ids(&all), ["o-3", "o-2", "o-1"]);
        assert!(all.iter().all(|o| o.timeline.is_empty()));
        assert_eq!(all[2].vehicle, Some(id("v-1")));
        assert_eq!(all[2].state, OrderState::Assigned);

        let scoped = |fleets: &[&str]| OrderFilter {
            fleets: Some(fleets.iter().map(|f| id(f)).collect()),
            ..filter()
        };
        let demo = store.list_orders(&scoped(&["demo"])).await.expect("lists");
        assert_eq!(ids(&demo), ["o-2", "o-1"]);
        let both = store.list_orders(&scoped(&["demo", "north"])).await.expect("lists");
        assert_eq!(both.len(), 3);
        assert!(store.list_orders(&scoped(&[])).await.expect("lists").is_empty());

        let assigned = OrderFilter {
            states: vec![OrderState::Assigned, OrderState::Delivered],
            ..filter()
        };
        assert_eq!(ids(&store.list_orders(&assigned).await.expect("lists")), ["o-3", "o-1"]);
        let of_store = OrderFilter {
            store: Some("store-2".into()),
            ..filter()
        };
        assert_eq!(ids(&store.list_orders(&of_store).await.expect("lists")), ["o-3"]);
        let of_vehicle = OrderFilter {
            vehicle: Some(id("v-1")),
            ..scoped(&["demo"])
        };
        assert_eq!(ids(&store.list_orders(&of_vehicle).await.expect("lists")), ["o-1"]);
        let other_scope = OrderFilter {
            vehicle: Some(id("v-9")),
            ..scoped(&["demo"])
        };
        assert!(store.list_orders(&other_scope).await.expect("lists").is_empty());
        let one = OrderFilter { limit: 1, ..filter() };
        assert_eq!(ids(&store.list_orders(&one).await.expect("lists")), ["o-3"]);
    }
}

on_each_backend! {
    /// Cancelling frees the vehicle, is idempotent, obeys the caller's rule and never
    /// touches a delivered order.
    async fn cancel_rules(store) {
        three_orders(&store).await;
        let v1: VehicleId = id("v-1");
        assert!(store.busy_vehicles(&id("demo")).await.expect("busy").contains(&v1));

        // The caller's rule refuses it: nothing changes.
        let refused = store.cancel_order(&id("o-1"), |_| false).await;
        assert!(
            matches!(refused, Err(StoreError::OrderUnderway { state: OrderState::Assigned, .. })),
            "{refused:?}"
        );
        let cancelled = store.cancel_order(&id("o-1"), |_| true).await.expect("cancels");
        assert!(cancelled.changed);
        assert_eq!(cancelled.holder, Some(v1.clone()));
        assert_eq!(cancelled.order.state, OrderState::Cancelled);
        assert_eq!(cancelled.order.vehicle, Some(v1.clone()), "kept for its timeline");
        let stored = store.order(&id("o-1")).await.expect("reads").expect("exists");
        assert_eq!(stored.state, OrderState::Cancelled);
        assert!(
            !store.busy_vehicles(&id("demo")).await.expect("busy").contains(&v1),
            "a cancelled order frees its vehicle"
        );
        // Free: it takes the next order (the unique index agrees).
        store.assign(&id("o-2"), &v1).await.expect("assigns the freed vehicle");
        // A cancelled order is not assigned again.
        let again = store.assign(&id("o-1"), &id("v-2")).await;
        assert!(matches!(again, Err(StoreError::OrderUnderway { .. })), "{again:?}");

        let twice = store.cancel_order(&id("o-1"), |_| false).await.expect("idempotent");
        assert!(!twice.changed);
        assert_eq!(twice.holder, None);
        assert_eq!(twice.order.state, OrderState::Cancelled);

        // Never from `created` a holder; never a delivered order.
        store.create_order(&new_order("o-4")).await.expect("creates");
        let unheld = store.cancel_order(&id("o-4"), |_| true).await.expect("cancels");
        assert_eq!((unheld.changed, unheld.holder), (true, None));
        let v9: VehicleId = id("v-9");
        for (seq, kind) in [(0, DeliveryKind::Pickup), (1, DeliveryKind::InTransit), (2, DeliveryKind::Delivered)] {
            store
                .record_event(&v9, &id("north"), &event(seq, "o-3", kind, 1_000 + u64::from(seq)), &[], &json!({}))
                .await
                .expect("records");
        }
        let delivered = store.cancel_order(&id("o-3"), |_| true).await;
        assert!(
            matches!(delivered, Err(StoreError::OrderUnderway { state: OrderState::Delivered, .. })),
            "{delivered:?}"
        );
        let unknown = store.cancel_order(&id("o-404"), |_| true).await;
        assert!(matches!(unknown, Err(StoreError::UnknownOrder(_))), "{unknown:?}");
    }
}

on_each_backend! {
    /// A cancelled order's late delivery events are stored with a flag, not suspect, and
    /// never move it.
    async fn events_of_a_cancelled_order_are_flagged(store) {
        let order = new_order("o-1");
        let v1: VehicleId = id("v-1");
        let store = store_with_assigned(store, &order, &v1).await;
        store.cancel_order(&order.order, |_| true).await.expect("cancels");
        let recorded = store
            .record_event(&v1, &id("demo"), &event(0, "o-1", DeliveryKind::Pickup, 5_000), &recipients(), &json!({"n": 1}))
            .await
            .expect("records");
        assert!(!recorded.duplicate && !recorded.advanced);
        assert_eq!(recorded.flag, Some(EventFlag::CancelledOrder));
        assert!(!EventFlag::CancelledOrder.is_suspect());
        assert_eq!(recorded.state, Some(OrderState::Cancelled));
        assert_eq!(recorded.messages.len(), 2, "queued like any flagged event");
        let view = store.order(&order.order).await.expect("reads").expect("exists");
        assert_eq!(view.state, OrderState::Cancelled);
        let events: Vec<(TimelineKind, Option<EventFlag>)> = view
            .timeline
            .iter()
            .filter(|t| t.kind != TimelineKind::Assigned)
            .map(|t| (t.kind, t.flag))
            .collect();
        assert_eq!(
            events,
            [(TimelineKind::Delivery(DeliveryKind::Pickup), Some(EventFlag::CancelledOrder))]
        );
    }
}

on_each_backend! {
    /// Unassigning takes an order back from its vehicle before pickup only, and only from
    /// that vehicle; the assigned orders are listed for the re-offer.
    async fn unassign_and_assigned_orders(store) {
        three_orders(&store).await;
        let listed = store.assigned_orders(u64::MAX, None, 10).await.expect("lists");
        let pairs: HashSet<(String, String)> = listed
            .iter()
            .map(|a| (a.order.to_string(), a.vehicle.to_string()))
            .collect();
        assert_eq!(
            pairs,
            HashSet::from([("o-1".into(), "v-1".into()), ("o-3".into(), "v-9".into())])
        );
        assert!(listed.iter().all(|a| a.updated_ms > 0));
        // In pages of one, each after the last of the previous page: the same two, in order.
        let first = store.assigned_orders(u64::MAX, None, 1).await.expect("lists");
        let second = store.assigned_orders(u64::MAX, first.last(), 1).await.expect("lists");
        let rest = store.assigned_orders(u64::MAX, second.last(), 1).await.expect("lists");
        assert_eq!((first.len(), second.len(), rest.len()), (1, 1, 0));
        assert_eq!([&first[0], &second[0]], [&listed[0], &listed[1]]);
        // Only orders unchanged since the cutoff.
        let oldest = listed[0].updated_ms;
        assert!(store.assigned_orders(oldest - 1, None, 10).await.expect("lists").is_empty());
        assert!(!store.assigned_orders(oldest, None, 10).await.expect("lists").is_empty());

        assert!(!store.unassign(&id("o-1"), &id("v-2")).await.expect("runs"), "not v-2's");
        assert!(!store.unassign(&id("o-2"), &id("v-1")).await.expect("runs"), "not assigned");
        assert!(store.unassign(&id("o-1"), &id("v-1")).await.expect("unassigns"));
        let view = store.order(&id("o-1")).await.expect("reads").expect("exists");
        assert_eq!((view.state, view.vehicle), (OrderState::Created, None));
        assert!(!store.busy_vehicles(&id("demo")).await.expect("busy").contains(&id("v-1")));
        let waiting: Vec<String> = store
            .unassigned_orders(None, 10)
            .await
            .expect("lists")
            .into_iter()
            .map(|(_, w)| w.order.to_string())
            .collect();
        assert_eq!(waiting, ["o-1", "o-2"], "offered again, oldest first");
        // In pages of one, each after the last of the previous page.
        let first = store.unassigned_orders(None, 1).await.expect("lists");
        let (ms, ref w) = first[0];
        let second = store.unassigned_orders(Some((ms, &w.order)), 1).await.expect("lists");
        let (ms, ref w) = second[0];
        let rest = store.unassigned_orders(Some((ms, &w.order)), 1).await.expect("lists");
        assert_eq!(
            (first[0].1.order.as_str(), second[0].1.order.as_str(), rest.len()),
            ("o-1", "o-2", 0)
        );
        assert!(!store.unassign(&id("o-1"), &id("v-1")).await.expect("runs"), "once");
        assert!(store.was_assigned(&id("o-1"), &id("v-1")).await.expect("reads"), "it held it");
        assert!(!store.was_assigned(&id("o-1"), &id("v-9")).await.expect("reads"));

        // Picked up: not taken back.
        store
            .record_event(&id("v-9"), &id("north"), &event(0, "o-3", DeliveryKind::Pickup, 1_000), &[], &json!({}))
            .await
            .expect("records");
        assert!(!store.unassign(&id("o-3"), &id("v-9")).await.expect("runs"));
        assert!(store.assigned_orders(u64::MAX, None, 10).await.expect("lists").is_empty());
    }
}

/// Schema 5 rebuilds `orders` and `assignments` on SQLite (to change a CHECK constraint):
/// every row, id and index survives, the foreign key points at the new `orders`, the
/// AUTOINCREMENT sequence goes on, and `cancelled` frees the vehicle in the unique index.
#[tokio::test]
async fn schema_5_rebuild_keeps_rows_and_indexes_sqlite() {
    use sqlx::Connection as _;
    let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:")
        .await
        .expect("connects");
    sqlx::query("PRAGMA foreign_keys = ON")
        .execute(&mut conn)
        .await
        .expect("pragma");
    let migrator = &crate::store::sqlite::MIGRATOR;
    migrator.run_to(4, &mut conn).await.expect("schema 4");
    for (order, state, vehicle) in [("o-1", "assigned", "v-1"), ("o-2", "delivered", "v-1")] {
        sqlx::query(
            "INSERT INTO orders VALUES ($1, 'store-1', 'demo', 'Ada', 1, 2, 3, 4, $2, $3, 10, 20)",
        )
        .bind(order)
        .bind(state)
        .bind(vehicle)
        .execute(&mut conn)
        .await
        .expect("an order");
    }
    for order in ["o-2", "o-1"] {
        sqlx::query(
            "INSERT INTO assignments (order_id, vehicle, assigned_ms) VALUES ($1, 'v-1', 5)",
        )
        .bind(order)
        .execute(&mut conn)
        .await
        .expect("an assignment");
    }
    migrator.run(&mut conn).await.expect("schema 5");

    let orders: Vec<(String, String, Option<String>, i64)> =
        sqlx::query_as("SELECT order_id, state, vehicle, updated_ms FROM orders ORDER BY order_id")
            .fetch_all(&mut conn)
            .await
            .expect("orders");
    assert_eq!(
        orders,
        [
            ("o-1".into(), "assigned".into(), Some("v-1".into()), 20),
            ("o-2".into(), "delivered".into(), Some("v-1".into()), 20)
        ]
    );
    let assignments: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, order_id FROM assignments ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .expect("assignments");
    assert_eq!(assignments, [(1, "o-2".into()), (2, "o-1".into())]);
    let indexes: HashSet<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL",
    )
    .fetch_all(&mut conn)
    .await
    .expect("indexes")
    .into_iter()
    .collect();
    for name in [
        "orders_open_by_vehicle",
        "assignments_by_order",
        "delivery_events_dedupe",
        "orders_by_created",
        "orders_by_state",
        "orders_by_store",
        "orders_by_vehicle",
    ] {
        assert!(indexes.contains(name), "{name} missing: {indexes:?}");
    }
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '%_next'",
    )
    .fetch_all(&mut conn)
    .await
    .expect("tables");
    assert!(tables.is_empty(), "{tables:?}");
    let broken: Vec<(String,)> = sqlx::query_as("SELECT \"table\" FROM pragma_foreign_key_check")
        .fetch_all(&mut conn)
        .await
        .expect("foreign key check");
    assert!(broken.is_empty(), "{broken:?}");

    // The foreign key points at the new `orders`.
    let orphan = sqlx::query(
        "INSERT INTO assignments (order_id, vehicle, assigned_ms) VALUES ('nope', 'v', 1)",
    )
    .execute(&mut conn)
    .await;
    assert!(orphan.is_err(), "an assignment of no order is refused");
    let next: i64 = sqlx::query_scalar(
        "INSERT INTO assignments (order_id, vehicle, assigned_ms) VALUES ('o-1', 'v-1', 6) RETURNING id",
    )
    .fetch_one(&mut conn)
    .await
    .expect("an assignment");
    assert_eq!(next, 3, "the sequence goes on");

    // v-1 holds o-1: a second open order of v-1 is refused, until o-1 is cancelled.
    let insert_o3 = "INSERT INTO orders VALUES ('o-3', 'store-1', 'demo', 'Ada', 1, 2, 3, 4, 'assigned', 'v-1', 30, 30)";
    assert!(sqlx::query(insert_o3).execute(&mut conn).await.is_err());
    sqlx::query("UPDATE orders SET state = 'cancelled' WHERE order_id = 'o-1'")
        .execute(&mut conn)
        .await
        .expect("cancelled is a state now");
    sqlx::query(insert_o3)
        .execute(&mut conn)
        .await
        .expect("the vehicle is free");
    let bad = sqlx::query("UPDATE orders SET state = 'lost' WHERE order_id = 'o-3'")
        .execute(&mut conn)
        .await;
    assert!(bad.is_err(), "the CHECK still holds");
}

/// The list queries of `GET /api/orders` are index scans in their order, not sorts of every
/// order (SQLite's plan; PostgreSQL has the same indexes).
#[tokio::test]
async fn list_queries_use_their_indexes() {
    let store = testing::sqlite().await;
    let scoped = |fleets: &[&str]| OrderFilter {
        fleets: Some(fleets.iter().map(|f| id(f)).collect()),
        ..filter()
    };
    for (filter, index) in [
        (filter(), "orders_by_created"),
        (scoped(&["north", "south"]), "orders_by_created"),
        (
            OrderFilter {
                store: Some("store-1".into()),
                ..scoped(&["demo"])
            },
            "orders_by_store",
        ),
        (
            OrderFilter {
                states: vec![OrderState::Created],
                ..scoped(&["demo"])
            },
            "orders_by_state",
        ),
        (
            OrderFilter {
                vehicle: Some(id("v-1")),
                ..scoped(&["demo"])
            },
            "orders_by_vehicle",
        ),
    ] {
        let (sql, binds) = list_query(&filter);
        let mut query = sqlx::query_as::<_, (i64, i64, i64, String)>(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {sql}"
        )));
        for value in &binds {
            query = query.bind(value.as_str());
        }
        let plan: Vec<String> = query
            .bind(10_i64)
            .fetch_all(&store.read)
            .await
            .expect("plans")
            .into_iter()
            .map(|row| row.3)
            .collect();
        assert!(
            plan.iter().any(|step| step.contains(index)),
            "{sql}: {plan:?}"
        );
        assert!(
            !plan.iter().any(|step| step.contains("TEMP B-TREE")),
            "{sql} sorts: {plan:?}"
        );
    }
}

/// A page of waiting or assigned orders starts where the last one ended, by a range in an
/// index: the assigner's round over N orders reads N rows, not N²/page (it read every
/// earlier order again for each page: a core busy with 32,000 orders waiting).
#[tokio::test]
async fn order_pages_start_where_the_last_ended() {
    let store = testing::sqlite().await;
    let waiting = testing::sqlite_plan(&store, UNASSIGNED_PAGE, &[Ok(1), Err("o-1"), Ok(64)]).await;
    assert!(
        waiting.contains("orders_by_state (state=? AND (created_ms,order_id)>(?,?))"),
        "{waiting}"
    );
    let assigned =
        testing::sqlite_plan(&store, ASSIGNED_PAGE, &[Ok(9), Ok(1), Err("o-1"), Ok(256)]).await;
    assert!(
        assigned.contains(
            "orders_by_updated (state=? AND (updated_ms,order_id)>(?,?) AND updated_ms<?)"
        ),
        "{assigned}"
    );
}

/// The same on PostgreSQL: an index serves each page, from where the last one ended.
#[tokio::test]
async fn order_pages_start_where_the_last_ended_on_postgres() {
    let store = testing::postgres().await;
    let waiting =
        testing::postgres_plan(&store, UNASSIGNED_PAGE, &[Ok(1), Err("o-1"), Ok(64)]).await;
    let assigned =
        testing::postgres_plan(&store, ASSIGNED_PAGE, &[Ok(9), Ok(1), Err("o-1"), Ok(256)]).await;
    assert!(
        waiting.contains("Index Scan using orders_by_state")
            && waiting.contains("ROW(created_ms, order_id) > ROW("),
        "{waiting}"
    );
    assert!(
        assigned.contains("Index Scan using orders_by_updated")
            && assigned.contains("ROW(updated_ms, order_id) > ROW("),
        "{assigned}"
    );
}
