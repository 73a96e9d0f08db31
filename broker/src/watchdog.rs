//! [`Watchdog`]: the parts the broker cannot live without, watched. When one panics or ends,
//! the broker must not linger as a zombie that accepts connections and routes nothing: the
//! watchdog logs one ERROR line, and the broker (`server`) stops accepting and closes every
//! connection, then reports the death through [`Broker::failed`](crate::Broker::failed), which
//! the `broker` binary and the bridge's embedded mode turn into a non-zero exit (so systemd's
//! `Restart=on-failure` starts a fresh one, see `docs/broker.md`).
//!
//! Watched: rumqttd's router thread (through a link that never sends: its channel closes when
//! the thread is gone, see `router::drain`), the dispatcher of the devices' shared link (`mux`),
//! and the accept loops (a panic only: they end on purpose at shutdown or `stop_listener`).

use std::any::Any;
use std::future::Future;
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;
use tracing::error;

/// A part the broker cannot live without died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Death {
    /// Which part.
    pub(crate) part: &'static str,
    /// How it died.
    pub(crate) cause: String,
}

/// Watches the parts the broker cannot live without; the first death is kept.
#[derive(Debug, Default)]
pub(crate) struct Watchdog {
    death: OnceLock<Death>,
    dead: CancellationToken,
}

/// Whether a watched part may end on its own without that being a death.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// It runs as long as the broker: ending is a death (so is a panic).
    Fatal,
    /// It may end on purpose (an accept loop told to stop): only a panic is a death.
    Allowed,
}

impl Watchdog {
    /// Records that `part` died of `cause`: logs it (ERROR, once: the first death is the one
    /// reported) and wakes [`Self::died`].
    pub(crate) fn report(&self, part: &'static str, cause: String) {
        let death = Death { part, cause };
        if self.death.set(death.clone()).is_ok() {
            error!(
                part,
                cause = %death.cause,
                "the broker cannot go on: {part} died; it stops accepting and closes every \
                 connection, and the process exits with an error (restart it)"
            );
            self.dead.cancel();
        }
    }

    /// The death, if one was reported.
    pub(crate) fn death(&self) -> Option<Death> {
        self.death.get().cloned()
    }

    /// Resolves with the first death reported; never if none is.
    pub(crate) async fn died(&self) -> Death {
        self.dead.cancelled().await;
        self.death().unwrap_or_else(|| Death {
            part: "the broker",
            cause: "unknown".to_owned(),
        })
    }

    /// Runs `part` as a task of the current runtime and reports its panic, or its end if
    /// `ending` is [`Ending::Fatal`]. A task cancelled by the runtime's shutdown is no death.
    pub(crate) fn watch(
        self: &Arc<Self>,
        part: &'static str,
        ending: Ending,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let handle = tokio::spawn(task);
        let watchdog = Arc::clone(self);
        tokio::spawn(async move {
            match handle.await {
                Ok(()) if ending == Ending::Allowed => {}
                Ok(()) => watchdog.report(part, "it ended".to_owned()),
                Err(err) if err.is_panic() => {
                    let payload = err.into_panic();
                    let message = panic_message(payload.as_ref());
                    watchdog.report(part, format!("it panicked: {message}"));
                }
                Err(_) => {}
            }
        });
    }
}

/// The message of a panic's payload (`panic!` with a string literal or a formatted one).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::timeout;

    use super::*;
    use crate::BrokerConfig;
    use crate::router::{self, LinkRequest, Registrar};

    const T: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn a_panicking_part_is_a_death_and_only_the_first_is_reported() {
        let watchdog = Arc::new(Watchdog::default());
        watchdog.watch("a part that ends on purpose", Ending::Allowed, async {});
        watchdog.watch("the part", Ending::Fatal, async {
            tokio::task::yield_now().await;
            panic!("group must exists");
        });
        let death = timeout(T, watchdog.died())
            .await
            .expect("the death is seen");
        assert_eq!(death.part, "the part");
        assert_eq!(death.cause, "it panicked: group must exists");
        watchdog.report("another part", "later".to_owned());
        assert_eq!(watchdog.death(), Some(death));
    }

    #[tokio::test]
    async fn a_fatal_part_that_ends_is_a_death() {
        let watchdog = Arc::new(Watchdog::default());
        watchdog.watch("the loop", Ending::Fatal, async {});
        let death = timeout(T, watchdog.died())
            .await
            .expect("the death is seen");
        assert_eq!((death.part, death.cause.as_str()), ("the loop", "it ended"));
    }

    #[tokio::test]
    async fn nothing_is_reported_while_every_part_lives() {
        let watchdog = Arc::new(Watchdog::default());
        watchdog.watch("a part that ends on purpose", Ending::Allowed, async {});
        watchdog.watch("a part that lives", Ending::Fatal, std::future::pending());
        assert!(
            timeout(Duration::from_millis(300), watchdog.died())
                .await
                .is_err()
        );
        assert_eq!(watchdog.death(), None);
    }

    /// rumqttd 0.20's router thread really panics on the `$share` reproduction of issue #13
    /// when links reach it directly (the front end refuses `$share`, so no client can do
    /// this), and the watchdog sees the thread go through the link that never sends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_death_of_rumqttds_router_thread_is_seen() {
        let registrar = Registrar::spawn(BrokerConfig::default().router_config(8));
        let watchdog = Arc::new(Watchdog::default());
        let (_tx, sentinel, _) = registrar.link(LinkRequest::internal("sentinel")).unwrap();
        watchdog.watch(
            "rumqttd's router thread",
            Ending::Fatal,
            router::drain(sentinel, "sentinel"),
        );
        crate::fault::router_panic(&registrar)
            .await
            .expect("the router takes the reproduction");
        let death = timeout(T, watchdog.died())
            .await
            .expect("the death is seen");
        assert_eq!(death.part, "rumqttd's router thread");
    }
}
