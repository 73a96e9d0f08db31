//! Listener health: every listener probed end to end (TCP connect, CONNECT/CONNACK with the
//! broker's own probe login, a PUBLISH on the probe topic, delivered through the router to the
//! broker's probe link), until ready at start and then every `probe_interval`. A dead listener
//! shows in [`ListenerHealth`], in `fleetbeat_broker_listener_up` and as an ERROR log.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use crate::error::{BrokerError, ProbeError};
use crate::listener::Listener;
use crate::metrics::BrokerMetrics;
use crate::probe::{self, ProbeLogin, ProbeReceiver};
use crate::router::INTERNAL_PREFIX;

/// Longest wait for one probe attempt (connect + CONNACK + delivery).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// The `last_error` of a listener not probed yet.
const NOT_PROBED: &str = "not probed yet";

/// The state of one listener, as last checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerHealth {
    /// Which listener.
    pub listener: Listener,
    /// Its address (port resolved).
    pub addr: SocketAddr,
    /// Whether it passed its latest end-to-end probe.
    pub up: bool,
    /// Why it failed, if it did.
    pub last_error: Option<String>,
}

/// Every listener's state as of its latest probe, shared by the [`HealthChecker`] and the
/// broker's handle.
#[derive(Debug)]
pub(crate) struct HealthBoard(Mutex<Vec<ListenerHealth>>);

impl HealthBoard {
    /// The listeners bound at `addrs`, none probed yet.
    pub(crate) fn new(addrs: &[(Listener, SocketAddr)]) -> HealthBoard {
        HealthBoard(Mutex::new(
            addrs
                .iter()
                .map(|&(listener, addr)| ListenerHealth {
                    listener,
                    addr,
                    up: false,
                    last_error: Some(NOT_PROBED.to_owned()),
                })
                .collect(),
        ))
    }

    /// Every listener's state now.
    pub(crate) fn snapshot(&self) -> Vec<ListenerHealth> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What to probe: each listener and its address.
    fn targets(&self) -> Vec<(Listener, SocketAddr)> {
        let health = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        health.iter().map(|h| (h.listener, h.addr)).collect()
    }
}

/// Probes every listener end to end, on start and then periodically.
pub(crate) struct HealthChecker {
    prober: ProbeReceiver,
    login: ProbeLogin,
    metrics: BrokerMetrics,
    board: Arc<HealthBoard>,
    listeners: Vec<(Listener, CancellationToken)>,
}

impl HealthChecker {
    /// A checker probing through `prober` with `login`, recording on `board` and in `metrics`;
    /// a listener whose token in `listeners` is cancelled is reported stopped, not probed.
    pub(crate) fn new(
        prober: ProbeReceiver,
        login: ProbeLogin,
        metrics: BrokerMetrics,
        board: Arc<HealthBoard>,
        listeners: Vec<(Listener, CancellationToken)>,
    ) -> HealthChecker {
        HealthChecker {
            prober,
            login,
            metrics,
            board,
            listeners,
        }
    }

    fn client_id(listener: Listener) -> String {
        format!(
            "{INTERNAL_PREFIX}probe-{}-{:08x}",
            listener.label(),
            fastrand::u32(..)
        )
    }

    /// Probes each listener until it passes, or fails with [`BrokerError::NotReady`] at
    /// `deadline`.
    pub(crate) async fn until_ready(
        mut self,
        deadline: Instant,
        bound: Duration,
    ) -> Result<HealthChecker, BrokerError> {
        for (listener, addr) in self.board.targets() {
            let target = connectable(addr);
            let mut backoff = Duration::ZERO;
            loop {
                let attempt_deadline = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);
                let client_id = Self::client_id(listener);
                match self
                    .prober
                    .check(listener, target, &client_id, &self.login, attempt_deadline)
                    .await
                {
                    Ok(()) => {
                        self.record(listener, Ok(()));
                        break;
                    }
                    Err(err) => {
                        debug!(%listener, %addr, cause = %err, "listener not ready yet");
                        backoff = probe::next_backoff(backoff);
                        if Instant::now() + backoff >= deadline {
                            return Err(BrokerError::NotReady {
                                listener,
                                addr,
                                timeout: bound,
                                last_error: Some(err),
                            });
                        }
                        sleep(backoff).await;
                    }
                }
            }
        }
        Ok(self)
    }

    /// Probes every `interval` until `stop`.
    pub(crate) async fn run(mut self, interval: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = sleep(interval) => {}
            }
            for (listener, addr) in self.board.targets() {
                let stopped = self
                    .listeners
                    .iter()
                    .any(|(l, token)| *l == listener && token.is_cancelled());
                let outcome = if stopped {
                    Err("not accepting connections (stopped)".to_owned())
                } else {
                    let client_id = Self::client_id(listener);
                    let deadline = Instant::now() + ATTEMPT_TIMEOUT.min(interval);
                    self.prober
                        .check(
                            listener,
                            connectable(addr),
                            &client_id,
                            &self.login,
                            deadline,
                        )
                        .await
                        .map_err(|err: ProbeError| describe(&err))
                };
                if stop.is_cancelled() {
                    return;
                }
                self.record(listener, outcome);
            }
        }
    }

    /// Stores one probe's outcome; logs ERROR when a listener dies, INFO when it recovers.
    fn record(&self, listener: Listener, outcome: Result<(), String>) {
        let up = outcome.is_ok();
        self.metrics.set_listener_up(listener, up);
        let Ok(mut health) = self.board.0.lock() else {
            return;
        };
        let Some(entry) = health.iter_mut().find(|h| h.listener == listener) else {
            return;
        };
        match &outcome {
            Err(cause) if entry.up || entry.last_error.as_deref() == Some(NOT_PROBED) => {
                error!(listener = %listener, addr = %entry.addr, cause = %cause, "listener is DEAD: it does not answer MQTT end to end");
            }
            Ok(()) if !entry.up && entry.last_error.as_deref() != Some(NOT_PROBED) => {
                info!(listener = %listener, addr = %entry.addr, "listener answers again");
            }
            _ => {}
        }
        entry.up = up;
        entry.last_error = outcome.err();
    }
}

/// An error with its causes, on one line.
fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Where to connect to reach a listener bound to `addr`: loopback for a wildcard address.
fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}
