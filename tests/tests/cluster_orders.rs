//! Orders and commands across two bridges (issue #15 item 2), behind Debian's mosquitto with
//! shared subscriptions, Redis and one PostgreSQL store: orders placed on both bridges at once
//! are each assigned once and no vehicle is given two; a command sent on one bridge is answered
//! there, whichever bridge the vehicle's ack reaches, and the ack is seen once by the vehicle's
//! watchers on every bridge; an order placed or cancelled on one bridge becomes or stops being a
//! drop-off fence on the other.

#[path = "sim_support.rs"]
mod sim_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use shared::{AckResult, Command, CommandAck, CommandKind};
use sim_support::{Received, Watcher};
use tests::WAIT;
use tests::cluster::{Cluster, ClusterOptions, eventually};
use tests::sio::SioClient;
use tokio::task::JoinSet;

const FLEET: &str = "demo";
/// The token of the demo vendor (store `store-1`, fleet `demo`).
const VENDOR_TOKEN: &str = "vendor-demo";

/// `POST {url}/api/orders` as the demo vendor: status and answer.
async fn place(url: String, body: Value) -> anyhow::Result<(u16, Value)> {
    let response = reqwest::Client::new()
        .post(format!("{url}/api/orders"))
        .bearer_auth(VENDOR_TOKEN)
        .json(&body)
        .timeout(WAIT)
        .send()
        .await
        .with_context(|| format!("POST {url}/api/orders"))?;
    let status = response.status().as_u16();
    let answer = response.json().await.context("the answer is not JSON")?;
    Ok((status, answer))
}

/// Waits until the dispatchers of every bridge of `cluster` see all `vehicles` vehicles (the
/// assigner and the commands need each vehicle known, with a position, on both bridges).
async fn wait_complete_fleet(cluster: &Cluster, vehicles: usize) -> anyhow::Result<()> {
    for i in 1..=cluster.bridges() {
        let mut dispatcher =
            SioClient::dispatcher_in(&cluster.url(i)?, &format!("fleet:{FLEET}")).await?;
        let seen = dispatcher
            .vehicles_seen(vehicles, WAIT)
            .await
            .with_context(|| format!("bridge {i}'s dispatcher"))?;
        anyhow::ensure!(seen.len() == vehicles, "bridge {i} sees {seen:?}");
        dispatcher.close().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_placed_on_both_bridges_at_once_are_each_assigned_once() -> anyhow::Result<()> {
    const VEHICLES: usize = 20;
    const ORDERS: usize = 16;
    // A real-time clock: a delivery takes minutes, so every order stays open meanwhile and
    // no vehicle may hold two of them.
    let cluster = Cluster::start(ClusterOptions {
        vehicles: u32::try_from(VEHICLES)?,
        fleet: FLEET.to_owned(),
        ..ClusterOptions::default()
    })
    .await?;
    wait_complete_fleet(&cluster, VEHICLES).await?;
    // The devices' side: every order offer (`cmd`) and every answer (`ack`) on the broker.
    let mut wire = Watcher::connect(
        cluster.mqtt(),
        "order-witness",
        &[
            &format!("fleet/{FLEET}/+/cmd"),
            &format!("fleet/{FLEET}/+/ack"),
        ],
    )
    .await?;
    let mut offers = Offers::default();

    // Half the orders on each bridge, all at once, close together: both bridges' assigners
    // want the same nearest vehicles.
    let orders: Vec<String> = (0..ORDERS).map(|k| format!("twin-{k:02}")).collect();
    let mut placing = JoinSet::new();
    for (k, order) in orders.iter().enumerate() {
        let url = cluster.url(1 + k % 2)?;
        let body = json!({
            "order": order,
            "customer": format!("customer {k}"),
            "lat": 52.52 + 0.0002 * (k % 4) as f64,
            "lon": 13.405 + 0.0002 * (k / 4) as f64,
        });
        let order = order.clone();
        placing.spawn(async move { (order, place(url, body).await) });
    }
    let mut at_placement: BTreeMap<String, Value> = BTreeMap::new();
    while let Some(joined) = placing.join_next().await {
        let (order, placed) = joined.context("a placing task panicked")?;
        let (status, answer) = placed?;
        assert_eq!(status, 201, "{order}: {answer}");
        at_placement.insert(order, answer["vehicle"].clone());
    }

    // Every order ends up assigned (a waiting order is offered again by the cluster's one
    // assigner), to the same vehicle whichever bridge is asked, and to a vehicle of its own.
    let assigned = eventually(Duration::from_secs(60), || async {
        let mut assigned: BTreeMap<String, String> = BTreeMap::new();
        for order in &orders {
            let mut views = Vec::new();
            for i in 1..=cluster.bridges() {
                let (status, view) = cluster
                    .bridge(i)?
                    .get_json(&format!("/api/orders/{order}"), Some(VENDOR_TOKEN))
                    .await?;
                anyhow::ensure!(status == 200, "bridge {i}, {order}: {view}");
                views.push(view);
            }
            anyhow::ensure!(
                views.iter().all(|v| v["vehicle"] == views[0]["vehicle"]),
                "{order}: the bridges disagree: {views:?}"
            );
            let vehicle = views[0]["vehicle"]
                .as_str()
                .with_context(|| format!("{order} is not assigned yet: {}", views[0]))?;
            assigned.insert(order.clone(), vehicle.to_owned());
        }
        Ok(assigned)
    })
    .await?;
    let mut by_vehicle: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (order, vehicle) in &assigned {
        by_vehicle.entry(vehicle).or_default().push(order);
    }
    let mut problems = Vec::new();
    let doubled: Vec<_> = by_vehicle.iter().filter(|(_, o)| o.len() > 1).collect();
    if !doubled.is_empty() {
        problems.push(format!("vehicles given two orders: {doubled:?}"));
    }
    // An order assigned when it was placed kept its vehicle (it was not given again).
    for (order, vehicle) in &at_placement {
        if let Some(vehicle) = vehicle.as_str()
            && assigned.get(order).map(String::as_str) != Some(vehicle)
        {
            problems.push(format!(
                "{order} was assigned to {vehicle} when placed, now to {:?}",
                assigned.get(order)
            ));
        }
    }
    // On the devices' side too: each order was accepted by its vehicle only, and no vehicle
    // accepted two (an offer a vehicle accepted but the store then refused would leave the
    // vehicle carrying an order the cluster gave to another one). The last acks may still be
    // on their way to the witness.
    let on_the_wire = eventually(WAIT, || {
        offers.take(wire.drain());
        let result = offers.check(&assigned);
        async move { result }
    })
    .await;
    if let Err(err) = on_the_wire {
        problems.push(format!("{err:#}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    println!(
        "orders: {ORDERS} placed on two bridges at once, {} assigned at placement, all on \
         {} distinct vehicles",
        at_placement.values().filter(|v| !v.is_null()).count(),
        by_vehicle.len()
    );
    Ok(())
}

/// The order offers vehicles got and what they answered, as seen on the broker.
#[derive(Default)]
struct Offers {
    /// `(vehicle, command id)` → the order offered.
    offered: BTreeMap<(String, u32), String>,
    /// `(vehicle, order)` of every offer the vehicle accepted.
    accepted: BTreeSet<(String, String)>,
}

impl Offers {
    /// Takes in what the witness received.
    fn take(&mut self, received: Vec<Received>) {
        for r in received {
            let vehicle = r.topic.split('/').nth(2).unwrap_or_default().to_owned();
            if r.topic.ends_with("/cmd") {
                if let Ok(Command {
                    id,
                    kind: CommandKind::AssignOrder { order, .. },
                }) = shared::decode::<Command>(&r.payload)
                {
                    self.offered
                        .insert((vehicle, id), order.as_str().to_owned());
                }
            } else if let Ok(ack) = r.open::<CommandAck>()
                && ack.msg.result == AckResult::Ok
                && let Some(order) = self.offered.get(&(vehicle.clone(), ack.msg.id))
            {
                self.accepted.insert((vehicle, order.clone()));
            }
        }
    }

    /// Whether the devices accepted exactly the assignments the store holds (`order` →
    /// vehicle) for those orders, and no vehicle accepted two of them.
    fn check(&self, assigned: &BTreeMap<String, String>) -> anyhow::Result<()> {
        let mut by_order: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut by_vehicle: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (vehicle, order) in &self.accepted {
            if assigned.contains_key(order) {
                by_order.entry(order).or_default().push(vehicle);
                by_vehicle.entry(vehicle).or_default().push(order);
            }
        }
        for (order, vehicle) in assigned {
            let took = by_order.get(order.as_str()).cloned().unwrap_or_default();
            anyhow::ensure!(
                took == [vehicle.as_str()],
                "{order} is assigned to {vehicle}, but accepted on the wire by {took:?}"
            );
        }
        let doubled: Vec<_> = by_vehicle.iter().filter(|(_, o)| o.len() > 1).collect();
        anyhow::ensure!(
            doubled.is_empty(),
            "vehicles that accepted two orders: {doubled:?}"
        );
        Ok(())
    }
}

/// The `(vehicle, command_id)` of every `ack` event `watcher` received so far.
fn acks_seen(watcher: &mut SioClient) -> Vec<(String, u64)> {
    watcher
        .drain_events("ack")
        .iter()
        .map(|a| {
            (
                a["vehicle"].as_str().unwrap_or_default().to_owned(),
                a["command_id"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_answered_on_its_bridge_whichever_bridge_gets_the_ack() -> anyhow::Result<()> {
    const VEHICLES: usize = 10;
    const ROUNDS: usize = 2;
    let cluster = Cluster::start(ClusterOptions {
        vehicles: u32::try_from(VEHICLES)?,
        fleet: FLEET.to_owned(),
        ..ClusterOptions::default()
    })
    .await?;
    wait_complete_fleet(&cluster, VEHICLES).await?;
    let vehicles: Vec<String> = (1..=VEHICLES).map(|n| format!("{FLEET}-{n:04}")).collect();

    for (sender_bridge, watcher_bridge) in [(2, 1), (1, 2)] {
        let mut sender = SioClient::dispatcher(&cluster.url(sender_bridge)?).await?;
        let mut watcher = SioClient::dispatcher(&cluster.url(watcher_bridge)?).await?;
        for v in &vehicles {
            assert_eq!(
                watcher.join(&format!("vehicle:{v}")).await?,
                json!({ "ok": true })
            );
        }
        // Several commands to every vehicle: each bridge receives acks; the sender's bridge
        // answers every one.
        let mut sent: BTreeSet<(String, u64)> = BTreeSet::new();
        for _ in 0..ROUNDS {
            for v in &vehicles {
                let answer = sender
                    .emit_ack("command", json!([{ "vehicle": v, "type": "ping" }]))
                    .await
                    .with_context(|| format!("ping {v} on bridge {sender_bridge}"))?;
                assert_eq!(answer["ok"], true, "bridge {sender_bridge}, {v}: {answer}");
                assert_eq!(
                    answer["result"], "ok",
                    "bridge {sender_bridge}, {v}: {answer}"
                );
                let id = answer["command_id"]
                    .as_u64()
                    .with_context(|| format!("no command_id in {answer}"))?;
                assert!(
                    sent.insert((v.clone(), id)),
                    "command id {id} for {v} twice"
                );
            }
        }
        // The vehicle's watchers on the other bridge see each ack, once. The last command's
        // ack is awaited; the others were emitted before it.
        let last = sent.iter().last().cloned().context("commands were sent")?;
        let mut seen = acks_seen(&mut watcher);
        let deadline = tokio::time::Instant::now() + WAIT;
        while !sent.iter().all(|c| seen.contains(c)) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ack = watcher.next_event("ack", left).await.with_context(|| {
                format!(
                    "bridge {watcher_bridge}'s watcher saw {} of {} acks of commands sent on \
                     bridge {sender_bridge}",
                    seen.iter().filter(|c| sent.contains(*c)).count(),
                    sent.len()
                )
            })?;
            seen.push((
                ack["vehicle"].as_str().unwrap_or_default().to_owned(),
                ack["command_id"].as_u64().unwrap_or_default(),
            ));
            seen.extend(acks_seen(&mut watcher));
        }
        let mut counts: BTreeMap<&(String, u64), usize> = BTreeMap::new();
        for c in &seen {
            *counts.entry(c).or_default() += 1;
        }
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "acks seen more than once on bridge {watcher_bridge}: {twice:?} (last {last:?})"
        );
        sender.close().await;
        watcher.close().await;
    }
    Ok(())
}

/// The drop-off fences `i`'s bridge lists to the demo vendor.
async fn dropoff_fences(cluster: &Cluster, i: usize) -> anyhow::Result<BTreeSet<String>> {
    let (status, body) = cluster
        .bridge(i)?
        .get_json("/api/geofences", Some(VENDOR_TOKEN))
        .await?;
    anyhow::ensure!(status == 200, "bridge {i}: {status} {body}");
    Ok(body["geofences"]
        .as_array()
        .context("no geofences in the answer")?
        .iter()
        .filter_map(|f| f["id"].as_str())
        .filter(|id| id.starts_with("dropoff:"))
        .map(str::to_owned)
        .collect())
}

/// Waits until every bridge of `cluster` lists exactly `wanted` drop-off fences.
async fn wait_dropoff_fences(cluster: &Cluster, wanted: &[&str]) -> anyhow::Result<()> {
    let wanted: BTreeSet<String> = wanted.iter().map(|o| format!("dropoff:{o}")).collect();
    for i in 1..=cluster.bridges() {
        eventually(WAIT, || async {
            let listed = dropoff_fences(cluster, i).await?;
            anyhow::ensure!(
                listed == wanted,
                "bridge {i} lists {listed:?}, not {wanted:?}"
            );
            Ok(())
        })
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_placed_and_cancelled_on_one_bridge_move_the_fences_of_the_other()
-> anyhow::Result<()> {
    // No vehicles: the orders wait, open, each with its drop-off fence.
    let cluster = Cluster::start(ClusterOptions {
        vehicles: 0,
        fleet: FLEET.to_owned(),
        ..ClusterOptions::default()
    })
    .await?;
    // Bridge 2 reads every open order at its start and every minute; in between, only the
    // orders changed since its last read. The first order may reach it either way; the
    // second, placed once bridge 2 lists the first, only through a read of changes.
    let mut open = Vec::new();
    for order in ["fence-1", "fence-2"] {
        let (status, answer) = place(
            cluster.url(1)?,
            json!({ "order": order, "customer": "Ada", "lat": 52.51, "lon": 13.41 }),
        )
        .await?;
        assert_eq!(status, 201, "{order}: {answer}");
        assert!(
            answer["vehicle"].is_null(),
            "no vehicle to take it: {answer}"
        );
        open.push(order);
        wait_dropoff_fences(&cluster, &open).await?;
    }
    // Cancelled on bridge 1: its fence goes on both bridges, the other stays.
    let (status, answer) = cluster
        .bridge(1)?
        .post_json("/api/orders/fence-2/cancel", VENDOR_TOKEN, &json!({}))
        .await?;
    assert_eq!(
        (status, &answer["state"]),
        (200, &json!("cancelled")),
        "{answer}"
    );
    wait_dropoff_fences(&cluster, &["fence-1"]).await
}
