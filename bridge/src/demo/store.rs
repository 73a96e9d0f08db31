//! One simulated store: an order every interval through the bridge's own `POST /api/orders`,
//! with the store's demo vendor token, to a drop-off a short drive away on the street grid.

use std::time::Duration;

use device_sim::route::{Node, StreetGrid};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::DemoStore;

/// How far a drop-off is from its store, as driven along the streets, in metres: a short
/// drive, so that a whole delivery takes a couple of minutes.
pub(crate) const DROPOFF_M: std::ops::RangeInclusive<u32> = 200..=400;

/// Customers' names, for the orders' `customer` field.
const CUSTOMERS: [&str; 8] = [
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken",
];

/// How a simulated store did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreReport {
    /// The store id.
    pub store: String,
    /// Orders the bridge accepted.
    pub placed: u64,
    /// Orders that could not be placed (the bridge refused or did not answer).
    pub failed: u64,
}

/// A store that places orders until stopped.
pub(super) struct SimulatedStore {
    /// The HTTP client (shared by the stores).
    pub(super) client: reqwest::Client,
    /// The bridge, `http://HOST:PORT`.
    pub(super) base: String,
    /// Who the store is.
    pub(super) store: DemoStore,
    /// The simulator's streets.
    pub(super) grid: StreetGrid,
    /// Real time between two orders.
    pub(super) interval: Duration,
    /// Real time before the first order.
    pub(super) first_after: Duration,
    /// Seeds the drop-offs and customers.
    pub(super) seed: u64,
    /// This run's tag in the order ids.
    pub(super) run: String,
}

/// What became of one order.
enum Outcome {
    /// Placed (or placed before, for a retried id).
    Placed,
    /// Not placed this time; the next one may be.
    Failed,
    /// The bridge does not accept this store's token: no order will be.
    Refused,
}

/// A drop-off `DROPOFF_M` from `store` along the streets of `grid` (an intersection inside
/// the grid, never the store's own), drawn from `rng`.
pub(crate) fn dropoff(grid: &StreetGrid, store: Node, rng: &mut fastrand::Rng) -> Node {
    let block = u32::from(grid.config().block_m).max(1);
    let min = DROPOFF_M.start().div_ceil(block).max(1);
    let max = (DROPOFF_M.end() / block).max(min);
    let (min, max) = (
        i16::try_from(min).unwrap_or(1),
        i16::try_from(max).unwrap_or(1),
    );
    for _ in 0..64 {
        let blocks = rng.i16(min..=max);
        let east = rng.i16(-blocks..=blocks);
        let north = (blocks - east.abs()) * if rng.bool() { 1 } else { -1 };
        let node = Node::new(store.east + east, store.north + north);
        if grid.contains(node) {
            return node;
        }
    }
    // A store in a corner of a tiny grid: the nearest intersection that is not the store.
    let east = if grid.contains(Node::new(store.east + 1, store.north)) {
        1
    } else {
        -1
    };
    grid.clamp(Node::new(store.east + east, store.north))
}

impl SimulatedStore {
    /// Places an order every interval until `stop`; an order being placed when `stop` comes
    /// is abandoned. Stops by itself if the bridge refuses the store's token.
    pub(super) async fn run(self, stop: CancellationToken) -> StoreReport {
        let mut report = StoreReport {
            store: self.store.store.clone(),
            placed: 0,
            failed: 0,
        };
        let [lat, lon] = self.store.location;
        let Some(at) = self
            .grid
            .nearest_node(shared::Position::from_degrees(lat, lon))
        else {
            warn!(
                store = %self.store.store,
                "the store lies outside the simulator's streets: it places no orders"
            );
            return report;
        };
        let mut rng = fastrand::Rng::with_seed(self.seed);
        let mut next = Instant::now() + self.first_after;
        for n in 1u64.. {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep_until(next) => {}
            }
            next += self.interval;
            let outcome = tokio::select! {
                () = stop.cancelled() => break,
                outcome = self.place(n, at, &mut rng) => outcome,
            };
            match outcome {
                Outcome::Placed => report.placed += 1,
                Outcome::Failed => report.failed += 1,
                Outcome::Refused => {
                    report.failed += 1;
                    break;
                }
            }
            // Late (a slow answer): the next order follows at once, not a burst to catch up.
            next = next.max(Instant::now());
        }
        report
    }

    /// Places order number `n` of this run, from the store at `at`.
    async fn place(&self, n: u64, at: Node, rng: &mut fastrand::Rng) -> Outcome {
        let store = &self.store.store;
        let order = format!("{store}-{}-{n}", self.run);
        let customer = format!("{} {n}", CUSTOMERS[rng.usize(..CUSTOMERS.len())]);
        let node = dropoff(&self.grid, at, rng);
        let (lat, lon) = self.grid.position(node).to_degrees();
        let drive_m = at.blocks_to(node) * u32::from(self.grid.config().block_m);
        let body = json!({ "order": order, "customer": customer, "lat": lat, "lon": lon });
        let sent = self
            .client
            .post(format!("{}/api/orders", self.base))
            .bearer_auth(&self.store.token)
            .json(&body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(err) => {
                warn!(%store, %order, cause = %err, "simulated store: the bridge did not answer");
                return Outcome::Failed;
            }
        };
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            info!(
                %store,
                %order,
                %customer,
                dropoff_lat = lat,
                dropoff_lon = lon,
                drive_m,
                state = %answer["state"].as_str().unwrap_or("?"),
                vehicle = %answer["vehicle"].as_str().unwrap_or("none yet"),
                "simulated store placed an order"
            );
            Outcome::Placed
        } else if matches!(status.as_u16(), 401 | 403) {
            warn!(
                %store,
                %status,
                "the bridge refuses the simulated store's demo token (it has tokens of its \
                 own, so it is not in demo mode): this store places no more orders"
            );
            Outcome::Refused
        } else {
            warn!(%store, %order, %status, %answer, "simulated store: order refused");
            Outcome::Failed
        }
    }
}
