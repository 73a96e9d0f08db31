//! Helpers shared by the `sim_*` scenarios (included with `#[path]`; as a test target of its
//! own it holds no tests): a plain rumqttc watcher that collects what the vehicles publish and
//! opens the sealed payloads, and a TCP proxy that can cut a vehicle off its broker.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use shared::{Command, Topic, VehicleId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// One message a watcher received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The topic it came on.
    pub topic: String,
    /// The raw payload.
    pub payload: Vec<u8>,
}

impl Received {
    /// Opens the sealed payload with the vehicle's open-mode key (the sim without
    /// `--credentials`): checks the tag for this topic and decodes it.
    pub fn open<T: shared::WireMessage>(&self) -> anyhow::Result<shared::Opened<T>> {
        let topic = Topic::parse(&self.topic).map_err(|e| anyhow::anyhow!("{e}"))?;
        let key = shared::open_mode_key(&topic.vehicle);
        shared::open(&self.payload, &self.topic, &key)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.topic))
    }
}

/// A plain MQTT client subscribed to some filters, collecting what arrives.
pub struct Watcher {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Received>,
    task: JoinHandle<()>,
}

impl Watcher {
    /// Connects to `broker` as `id`, subscribes to `filters` at QoS 1, and returns once the
    /// subscriptions are acknowledged.
    pub async fn connect(broker: SocketAddr, id: &str, filters: &[&str]) -> anyhow::Result<Self> {
        let mut options = MqttOptions::new(id, broker.ip().to_string(), broker.port());
        options.set_keep_alive(Duration::from_secs(10));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        for filter in filters {
            client.subscribe(*filter, QoS::AtLeastOnce).await?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed) = watch::channel(0usize);
        let task = tokio::spawn(async move {
            let mut acks = 0;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Received {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                        });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        acks += 1;
                        let _ = subscribed_tx.send(acks);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let want = filters.len();
        tokio::time::timeout(tests::WAIT, subscribed.wait_for(|&n| n >= want))
            .await
            .context("subscriptions not acknowledged")??;
        Ok(Self { client, rx, task })
    }

    /// The next message whose topic ends with `suffix`, skipping others.
    pub async fn next_on(&mut self, suffix: &str, timeout: Duration) -> anyhow::Result<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(r)) if r.topic.ends_with(suffix) => return Ok(r),
                Ok(Some(_)) => {}
                Ok(None) => bail!("the watcher stopped"),
                Err(_) => bail!("nothing on *{suffix} within {timeout:?}"),
            }
        }
    }

    /// Every message received so far and not yet taken.
    pub fn drain(&mut self) -> Vec<Received> {
        std::iter::from_fn(|| self.rx.try_recv().ok()).collect()
    }

    /// Publishes a command to `vehicle` of `fleet`, plain postcard as the dispatcher does.
    pub async fn command(
        &self,
        fleet: &str,
        vehicle: &str,
        command: &Command,
    ) -> anyhow::Result<()> {
        let mut buf = [0u8; shared::MAX_PAYLOAD];
        let payload = shared::encode(command, &mut buf).map_err(|e| anyhow::anyhow!("{e}"))?;
        self.client
            .publish(
                format!("fleet/{fleet}/{vehicle}/cmd"),
                QoS::AtLeastOnce,
                false,
                payload.to_vec(),
            )
            .await?;
        Ok(())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy in front of the broker that the test can cut: [`Proxy::cut`] drops every
/// connection through it and refuses new ones (accepts and closes them at once) until
/// [`Proxy::restore`].
pub struct Proxy {
    addr: SocketAddr,
    open: Arc<watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let open = Arc::new(watch::channel(true).0);
        let state = Arc::clone(&open);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !*state.borrow() {
                    drop(client);
                    continue;
                }
                let mut cut = state.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|open| !open) => {}
                    }
                    // Dropping both sockets closes them: each side sees the connection die.
                });
            }
        });
        Ok(Self { addr, open, task })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The delivery events of one order, in the order a vehicle sends them.
pub const DELIVERY_STEPS: [shared::DeliveryKind; 3] = [
    shared::DeliveryKind::Pickup,
    shared::DeliveryKind::InTransit,
    shared::DeliveryKind::Delivered,
];

/// The vehicle id `{fleet}-0001`.
pub fn first_vehicle(fleet: &str) -> VehicleId {
    VehicleId::new(&format!("{fleet}-0001")).unwrap_or_else(|e| panic!("{fleet}: {e}"))
}
