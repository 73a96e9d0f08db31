//! The one-command demo (`bridge --simulate N`, feature `demo`): simulated vehicles and
//! simulated stores around a running [`Bridge`], so that a newcomer sees orders placed,
//! picked up, carried and delivered without any other step.
//!
//! # Layout
//! - this file: [`DemoConfig`] (what to simulate, checked by [`DemoConfig::validate`]) and
//!   [`Demo`], which starts the vehicles (`device_sim::runner`, in-process, against the
//!   bridge's MQTT broker) and the stores, and stops them.
//! - `store`: one simulated store. It holds a demo vendor token (`vendor-demo`,
//!   `vendor-demo-2`, ...) and places an order every interval through the bridge's own
//!   `POST /api/orders`, as a real store's software would, with a drop-off a short drive
//!   from the store on the simulator's street grid.
//!
//! Time: `speed` is the simulator's time scale (the vehicles' clock runs that much faster),
//! and it divides the stores' interval too, so a sped-up demo keeps the same mix of orders
//! and vehicles.

mod store;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use device_sim::route::StreetGrid;
use device_sim::runner::{SimConfig, SimError, SimReport};
use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Bridge;
use crate::domain::auth::{Role, Tokens};

pub use store::StoreReport;

/// The default interval between two orders of one store, in real milliseconds at speed 1.
pub const DEFAULT_ORDER_EVERY_MS: u64 = 15_000;
/// The default number of simulated stores.
pub const DEFAULT_STORES: u32 = 3;
/// The shortest interval between two orders of one store, after dividing by the speed.
const MIN_ORDER_INTERVAL: Duration = Duration::from_millis(50);
/// The first order waits this long (real time), for the vehicles to connect and report
/// where they are.
const FIRST_ORDER_AFTER: Duration = Duration::from_secs(2);

/// What the demo simulates.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoConfig {
    /// Simulated vehicles of fleet `demo` (0: no demo at all, neither vehicles nor stores).
    pub vehicles: u32,
    /// Heartbeats per real second per vehicle.
    pub rate_hz: f64,
    /// The simulator's time scale, 0 < x ≤ 1000: the vehicles' clock runs this much faster,
    /// and the stores order this much more often.
    pub speed: f64,
    /// Simulated stores, 0 ..= the demo stores there are (three).
    pub stores: u32,
    /// Real time between two orders of one store at speed 1.
    pub order_every: Duration,
}

impl Default for DemoConfig {
    /// No vehicles; 1 Hz, speed 1, [`DEFAULT_STORES`] stores every
    /// [`DEFAULT_ORDER_EVERY_MS`].
    fn default() -> Self {
        Self {
            vehicles: 0,
            rate_hz: 1.0,
            speed: 1.0,
            stores: DEFAULT_STORES,
            order_every: Duration::from_millis(DEFAULT_ORDER_EVERY_MS),
        }
    }
}

/// Why the demo cannot start.
#[derive(Debug, Error)]
pub enum DemoError {
    /// The simulated vehicles' settings are invalid (vehicles, rate, speed).
    #[error("invalid simulator settings (--simulate, --sim-rate, --sim-speed)")]
    Vehicles(#[from] SimError),
    /// More stores were asked for than demo mode has.
    #[error(
        "--sim-stores {asked}: demo mode has {available} stores (store-1 ..= store-{available})"
    )]
    Stores {
        /// Stores asked for.
        asked: u32,
        /// Demo stores there are.
        available: usize,
    },
    /// The order interval is zero.
    #[error("--sim-order-every-ms must be at least 1")]
    OrderEvery,
    /// The HTTP client of the stores could not be built.
    #[error("cannot build the simulated stores' HTTP client")]
    Client(#[source] reqwest::Error),
}

/// A demo store: who it is, where, and its vendor token.
#[derive(Clone, PartialEq)]
pub(crate) struct DemoStore {
    /// The store id (`store-1`, ...).
    pub(crate) store: String,
    /// Its demo vendor token.
    pub(crate) token: String,
    /// Where it is, `[lat, lon]` in degrees: an intersection of the simulator's grid.
    pub(crate) location: [f64; 2],
}

impl std::fmt::Debug for DemoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoStore")
            .field("store", &self.store)
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// The stores of demo mode's vendor tokens, ordered by store id.
pub(crate) fn demo_stores() -> Vec<DemoStore> {
    let mut stores: Vec<DemoStore> = Tokens::demo_grants()
        .into_iter()
        .filter(|g| g.role == Role::Vendor)
        .filter_map(|g| {
            Some(DemoStore {
                store: g.store?,
                token: g.token?,
                location: g.location?,
            })
        })
        .collect();
    stores.sort_by(|a, b| a.store.cmp(&b.store));
    stores
}

impl DemoConfig {
    /// The simulator's configuration: `vehicles` of fleet `demo` against `mqtt`.
    fn sim_config(&self, mqtt_host: String, mqtt_port: u16) -> SimConfig {
        SimConfig {
            vehicles: self.vehicles,
            broker_host: mqtt_host,
            broker_port: mqtt_port,
            rate_hz: self.rate_hz,
            time_scale: self.speed,
            ..SimConfig::default()
        }
    }

    /// Checks every setting and returns the simulator's street grid. Call it before
    /// starting the bridge, so that a bad flag stops the program before anything runs.
    ///
    /// # Errors
    /// [`DemoError`] names the first invalid setting.
    pub fn validate(&self) -> Result<StreetGrid, DemoError> {
        let grid = self.sim_config("127.0.0.1".into(), 1883).validate()?;
        let available = demo_stores().len();
        if self.stores as usize > available {
            return Err(DemoError::Stores {
                asked: self.stores,
                available,
            });
        }
        if self.order_every.is_zero() {
            return Err(DemoError::OrderEvery);
        }
        Ok(grid)
    }

    /// The real time between two orders of one store: the interval divided by the speed.
    fn order_interval(&self) -> Duration {
        self.order_every
            .div_f64(self.speed.max(f64::MIN_POSITIVE))
            .max(MIN_ORDER_INTERVAL)
    }
}

/// The running demo: vehicles and stores. Stop it with [`Demo::stop`] before the bridge.
#[derive(Debug)]
pub struct Demo {
    stop: CancellationToken,
    vehicles: JoinHandle<Result<SimReport, SimError>>,
    stores: Vec<JoinHandle<StoreReport>>,
}

impl Demo {
    /// Starts `config.vehicles` simulated vehicles against `bridge`'s MQTT broker and
    /// `config.stores` simulated stores against its HTTP API; `None` when `config.vehicles`
    /// is 0. Stores need the demo tokens (demo mode: no tokens and no credentials file) and
    /// plain HTTP: with HTTPS no store is started (a warning says so); with other tokens each
    /// store stops at its first refused order, with a warning.
    ///
    /// # Errors
    /// [`DemoError`] for invalid settings ([`DemoConfig::validate`]) or if the stores'
    /// HTTP client cannot be built; nothing is started then.
    pub fn start(config: &DemoConfig, bridge: &Bridge) -> Result<Option<Self>, DemoError> {
        if config.vehicles == 0 {
            return Ok(None);
        }
        let grid = config.validate()?;
        let endpoint = bridge.mqtt_endpoint();
        let sim = config.sim_config(endpoint.host.clone(), endpoint.port);
        let stores = if config.stores == 0 {
            Vec::new()
        } else if bridge.https() {
            warn!(
                "the simulated stores speak plain HTTP and the bridge serves HTTPS: no store \
                 started (the vehicles run; place orders from the vendor page)"
            );
            Vec::new()
        } else {
            demo_stores()
                .into_iter()
                .take(config.stores as usize)
                .collect()
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(DemoError::Client)?;

        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let vehicles = tokio::spawn(device_sim::runner::run(sim, shutdown));
        let base = format!("http://{}", reachable(bridge.http_addr()));
        let interval = config.order_interval();
        let count = u32::try_from(stores.len()).unwrap_or(u32::MAX).max(1);
        let run = run_tag();
        let stores: Vec<_> = stores
            .into_iter()
            .zip(0u32..)
            .map(|(store, index)| {
                let simulated = store::SimulatedStore {
                    client: client.clone(),
                    base: base.clone(),
                    store,
                    grid,
                    interval,
                    // Spread over the interval: the stores do not order in lockstep.
                    first_after: FIRST_ORDER_AFTER + interval / count * index,
                    seed: u64::from(index) + 1,
                    run: run.clone(),
                };
                tokio::spawn(simulated.run(stop.child_token()))
            })
            .collect();
        info!(
            vehicles = config.vehicles,
            stores = stores.len(),
            speed = config.speed,
            order_every_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            "demo started: simulated vehicles of fleet demo, simulated stores ordering"
        );
        Ok(Some(Self {
            stop,
            vehicles,
            stores,
        }))
    }

    /// Stops the stores (an order being placed is abandoned) and the vehicles (each publishes
    /// its retained `offline` status and disconnects), and waits for them.
    pub async fn stop(self) {
        self.stop.cancel();
        for store in self.stores {
            match store.await {
                Ok(report) => info!(
                    store = %report.store,
                    placed = report.placed,
                    failed = report.failed,
                    "simulated store stopped"
                ),
                Err(err) => warn!(cause = %err, "a simulated store's task failed"),
            }
        }
        match self.vehicles.await {
            Ok(Ok(report)) => info!(?report, "simulated vehicles stopped"),
            Ok(Err(err)) => warn!(cause = %err, "simulator stopped with an error"),
            Err(err) => warn!(cause = %err, "simulator task failed"),
        }
    }
}

/// Where to reach a server listening on `addr`: loopback instead of an unspecified address.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// A tag of this run for order ids (the start time in seconds, hex), so that a demo restarted
/// on the same store file places new orders instead of repeating old ids.
fn run_tag() -> String {
    format!("{:x}", crate::clock::now_ms() / 1000 % 0x1_0000_0000)
}

#[cfg(test)]
mod tests;
