//! The Redis link of the Socket.IO adapter of several bridges (issue #15): a
//! [`socketioxide_redis`] driver that reconnects.
//!
//! socketioxide-redis' own `RedisDriver` holds one multiplexed connection for good: once Redis
//! restarts, every broadcast fails until the bridge restarts. [`RedisLink`] does what that
//! driver does (publish, subscribe on one RESP3 connection whose pushed messages go to the
//! adapter's channels) but drops a connection that failed and opens a new one on next use,
//! subscribing to every channel again; [`RedisLink::watch`] checks it every
//! [`WATCH_EVERY`], so that subscriptions come back even when this bridge does not publish.
//! Each loss is logged and counted (`fleetbeat_bridge_redis_errors_total`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands as _, FromRedisValue, PushInfo, PushKind, RedisResult};
use socketioxide_redis::drivers::{ChanItem, Driver, MessageStream};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::{Counter, Metrics};

/// How often [`RedisLink::watch`] checks the connection.
pub(crate) const WATCH_EVERY: Duration = Duration::from_secs(1);

/// How long opening a connection may take.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);

/// The adapter of several bridges: socketioxide-redis' adapter over [`RedisLink`].
pub(crate) type SharedAdapter =
    socketioxide_redis::CustomRedisAdapter<socketioxide::adapter::Emitter, RedisLink>;

/// Where the messages of each subscribed channel go.
type Handlers = Arc<RwLock<HashMap<String, mpsc::Sender<ChanItem>>>>;

/// A reconnecting Redis driver for socketioxide's Redis adapter (see the module docs).
#[derive(Clone)]
pub(crate) struct RedisLink(Arc<Link>);

struct Link {
    client: redis::Client,
    /// The connection, `None` once it failed (until the next use opens one).
    connection: Mutex<Option<MultiplexedConnection>>,
    handlers: Handlers,
    metrics: Arc<Metrics>,
    /// The URL for the log (without its password).
    shown: String,
}

impl RedisLink {
    /// Connects to Redis with `client` (its URL must ask for RESP3); `shown` names it in logs.
    ///
    /// # Errors
    /// Redis' error if it cannot be reached now.
    pub(crate) async fn connect(
        client: redis::Client,
        metrics: Arc<Metrics>,
        shown: String,
    ) -> RedisResult<Self> {
        let link = Self(Arc::new(Link {
            client,
            connection: Mutex::new(None),
            handlers: Arc::default(),
            metrics,
            shown,
        }));
        link.connection().await?;
        Ok(link)
    }

    /// The connection, opened (and every channel subscribed again) if there is none.
    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        let mut slot = self.0.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let handlers = Arc::clone(&self.0.handlers);
        let config = redis::AsyncConnectionConfig::new().set_push_sender(move |msg| {
            dispatch(msg, &handlers);
            Ok::<(), Infallible>(())
        });
        let mut connection = tokio::time::timeout(
            CONNECT_WITHIN,
            self.0
                .client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| {
            redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer from Redis",
            ))
        })??;
        let channels: Vec<String> = self
            .0
            .handlers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        for channel in &channels {
            connection.subscribe(channel).await?;
        }
        if !channels.is_empty() {
            info!(redis = %self.0.shown, channels = channels.len(), "Socket.IO adapter connected to Redis again");
        }
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Notes that an operation failed with `err`: the connection is dropped (the next use
    /// opens another), and the loss logged and counted.
    async fn failed(&self, what: &str, err: &redis::RedisError) {
        let mut slot = self.0.connection.lock().await;
        if slot.take().is_some() {
            self.0.metrics.count(Counter::RedisErrors);
            warn!(redis = %self.0.shown, %what, cause = %err, "Socket.IO adapter lost Redis: broadcasts reach this bridge's sockets only until it is back");
        } else {
            debug!(%what, cause = %err, "Redis still unreachable");
        }
    }

    /// Runs `op` on the connection; a failure drops it (see [`Self::failed`]).
    async fn run<T, F, Fut>(&self, what: &str, op: F) -> RedisResult<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let result = match self.connection().await {
            Ok(connection) => op(connection).await,
            Err(err) => Err(err),
        };
        if let Err(err) = &result {
            self.failed(what, err).await;
        }
        result
    }

    /// Checks the connection every [`WATCH_EVERY`] (a `PING`) until `cancel`, reconnecting
    /// after a loss.
    pub(crate) async fn watch(self, cancel: CancellationToken) {
        let mut ticks = tokio::time::interval(WATCH_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = ticks.tick() => {}
            }
            let ping = self
                .run("ping", |mut c| async move {
                    redis::cmd("PING").query_async::<String>(&mut c).await
                })
                .await;
            if let Err(err) = ping {
                debug!(cause = %err, "Socket.IO adapter: Redis does not answer");
            }
        }
    }
}

/// Hands a message pushed by Redis to the channel's handler.
fn dispatch(msg: PushInfo, handlers: &Handlers) {
    if !matches!(msg.kind, PushKind::Message) || msg.data.len() < 2 {
        return;
    }
    let mut data = msg.data.into_iter();
    let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
        return;
    };
    let (Ok(channel), Ok(payload)) = (
        String::from_redis_value(channel),
        Vec::<u8>::from_redis_value(payload),
    ) else {
        warn!("unreadable message from Redis for the Socket.IO adapter");
        return;
    };
    let handlers = handlers.read().unwrap_or_else(PoisonError::into_inner);
    match handlers.get(&channel) {
        Some(tx) => {
            if let Err(err) = tx.try_send((channel, payload)) {
                warn!(cause = %err, "Socket.IO adapter: a Redis channel's queue is full");
            }
        }
        None => debug!(%channel, "message for an unsubscribed channel"),
    }
}

impl Driver for RedisLink {
    type Error = redis::RedisError;

    async fn publish(&self, chan: String, val: Vec<u8>) -> Result<(), Self::Error> {
        self.run("publish", |mut c| async move {
            c.publish::<_, _, redis::Value>(chan, val).await.map(|_| ())
        })
        .await
    }

    async fn subscribe(
        &self,
        chan: String,
        size: usize,
    ) -> Result<MessageStream<ChanItem>, Self::Error> {
        let (tx, rx) = mpsc::channel(size);
        // First the handler: a reconnection subscribes to it again.
        self.0
            .handlers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(chan.clone(), tx);
        self.run("subscribe", |mut c| async move { c.subscribe(chan).await })
            .await?;
        Ok(MessageStream::new(rx))
    }

    async fn unsubscribe(&self, chan: String) -> Result<(), Self::Error> {
        self.0
            .handlers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&chan);
        self.run(
            "unsubscribe",
            |mut c| async move { c.unsubscribe(chan).await },
        )
        .await
    }

    async fn num_serv(&self, chan: &str) -> Result<u16, Self::Error> {
        let chan = chan.to_owned();
        self.run("num_serv", |mut c| async move {
            let (_, count): (String, u16) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(chan)
                .query_async(&mut c)
                .await?;
            Ok(count)
        })
        .await
    }
}
