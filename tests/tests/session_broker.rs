//! The vehicle's `no_std` MQTT session (`device_sim::session`, the firmware's protocol code)
//! against the project's real broker over TCP, through the simulator's thin tokio adapter
//! (`device_sim::mqtt::Link`): CONNECT with a will, the `cmd` subscription, a QoS 1 publish
//! acknowledged with its tag, a command from `mosquitto_pub` arriving, keep-alive pings
//! answered, the will published when the link dies, and a clean goodbye.
#[path = "sim_support.rs"]
mod sim_support;

use std::time::Duration;

use anyhow::{Context as _, bail};
use device_sim::mqtt::{Link, LinkError, SessionClock};
use device_sim::session::{
    ConnectRequest, Incoming, Message, QoS, Session, SessionOptions, VehicleSession,
};
use sim_support::Watcher;
use tests::WAIT;
use tests::stack::start_broker;

const VEHICLE: &str = "acme-0001";
const STATUS: &str = "fleet/acme/acme-0001/status";
const EVENT: &str = "fleet/acme/acme-0001/event";
const CMD: &str = "fleet/acme/acme-0001/cmd";

/// What the vehicle's caller tags its QoS 1 publishes with.
type Tag = u32;

/// A received packet, owned (the session lends topic and payload only until the next call).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    ConnAck,
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos: QoS,
    },
    PubAck {
        tag: Option<Tag>,
    },
    SubAck {
        refused: bool,
    },
}

/// The driver: one session, its socket and its clock.
struct Vehicle {
    link: Link,
    session: VehicleSession<Tag>,
    clock: SessionClock,
}

impl Vehicle {
    async fn connect(
        broker: std::net::SocketAddr,
        options: SessionOptions,
    ) -> anyhow::Result<Self> {
        let link = Link::connect(&broker.ip().to_string(), broker.port(), None, WAIT).await?;
        let clock = SessionClock::new();
        let mut session = Session::new(options);
        let request = ConnectRequest {
            client_id: VEHICLE,
            login: None,
            will: Some(Message {
                topic: STATUS,
                payload: b"will: gone",
                qos: QoS::AtLeastOnce,
                retain: false,
            }),
        };
        session.begin(&request, clock.now_ms())?;
        Ok(Self {
            link,
            session,
            clock,
        })
    }

    /// Moves bytes, fires the session's timer, and collects packets until `until` says stop
    /// (checked after every turn) or `within` passes.
    async fn pump(
        &mut self,
        within: Duration,
        mut until: impl FnMut(&[Got], &VehicleSession<Tag>) -> bool,
    ) -> anyhow::Result<Vec<Got>> {
        let end = tokio::time::Instant::now() + within;
        let mut got = Vec::new();
        loop {
            self.link.write_now(&mut self.session)?;
            let timer = self
                .session
                .deadline()
                .map_or(end, |ms| self.clock.instant(ms).min(end));
            tokio::select! {
                exchanged = self.link.exchange(&mut self.session) => exchanged?,
                () = tokio::time::sleep_until(timer) => {
                    self.session.on_timer(self.clock.now_ms()).map_err(LinkError::from)?;
                }
            }
            while let Some(incoming) = self
                .session
                .next_incoming(self.clock.now_ms())
                .map_err(LinkError::from)?
            {
                got.push(match incoming {
                    Incoming::ConnAck => Got::ConnAck,
                    Incoming::Publish(p) => Got::Publish {
                        topic: p.topic.to_owned(),
                        payload: p.payload.to_vec(),
                        qos: p.qos,
                    },
                    Incoming::PubAck { tag, .. } => Got::PubAck { tag },
                    Incoming::SubAck { refused, .. } => Got::SubAck { refused },
                });
            }
            if until(&got, &self.session) {
                return Ok(got);
            }
            if tokio::time::Instant::now() >= end {
                bail!("gave up after {within:?} with {got:?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_talks_to_the_real_broker() -> anyhow::Result<()> {
    let broker = start_broker().await?;
    let mut watcher = Watcher::connect(broker.v4_addr(), "dispatch", &["fleet/acme/#"]).await?;
    // Keep-alive 1 s; a PINGRESP may take 5 s, so an answered ping is told apart from an
    // unanswered one by the deadline.
    let options = SessionOptions {
        ping_timeout_ms: 5000,
        ..SessionOptions::new(1)
    };
    let mut vehicle = Vehicle::connect(broker.v4_addr(), options).await?;

    // CONNACK, then the command subscription.
    let got = vehicle
        .pump(WAIT, |got, _| got.contains(&Got::ConnAck))
        .await?;
    assert_eq!(got, [Got::ConnAck]);
    assert!(vehicle.session.is_connected());
    let now = vehicle.clock.now_ms();
    vehicle.session.subscribe(CMD, QoS::AtLeastOnce, now)?;
    let got = vehicle.pump(WAIT, |got, _| !got.is_empty()).await?;
    assert_eq!(got, [Got::SubAck { refused: false }]);

    // A QoS 1 publish comes back acknowledged with its tag, and reaches the watcher.
    let now = vehicle.clock.now_ms();
    let event = Message {
        topic: EVENT,
        payload: b"an event",
        qos: QoS::AtLeastOnce,
        retain: false,
    };
    let pkid = vehicle.session.publish(&event, false, 42, now)?;
    assert!(pkid.is_some());
    assert_eq!(vehicle.session.in_flight(), 1);
    let got = vehicle.pump(WAIT, |got, _| !got.is_empty()).await?;
    assert_eq!(got, [Got::PubAck { tag: Some(42) }]);
    assert_eq!(vehicle.session.in_flight(), 0);
    let seen = watcher.next_on("/event", WAIT).await?;
    assert_eq!(seen.payload, b"an event");

    // A command from another client (`mosquitto_pub`, QoS 1) arrives, acknowledged.
    tests::mosquitto::publish(broker.v4_addr(), CMD, b"a command", 1).await?;
    let got = vehicle.pump(WAIT, |got, _| !got.is_empty()).await?;
    assert_eq!(
        got,
        [Got::Publish {
            topic: CMD.to_owned(),
            payload: b"a command".to_vec(),
            qos: QoS::AtLeastOnce,
        }]
    );

    // Quiet: a PINGREQ after the 1 s keep-alive, answered well before its 5 s timeout (the
    // deadline goes back to a keep-alive from now instead of waiting out the timeout).
    let quiet = vehicle
        .session
        .deadline()
        .context("a keep-alive deadline")?;
    let mut pinged_at = None;
    vehicle
        .pump(Duration::from_secs(4), |_, session| {
            let deadline = session.deadline().unwrap_or(u64::MAX);
            match pinged_at {
                None if deadline >= quiet + 4000 => {
                    // The ping went out at about `quiet`: its PINGRESP is awaited.
                    pinged_at = Some(deadline - 5000);
                    false
                }
                Some(at) => deadline < at + 5000,
                None => false,
            }
        })
        .await
        .context("the broker answers the keep-alive ping")?;
    assert!(vehicle.session.is_connected());

    // The link dies without a DISCONNECT: the broker publishes the will.
    drop(vehicle);
    let will = watcher.next_on("/status", WAIT).await?;
    assert_eq!(will.payload, b"will: gone");

    // A clean goodbye: DISCONNECT last, no will.
    let mut vehicle = Vehicle::connect(broker.v4_addr(), options).await?;
    vehicle
        .pump(WAIT, |got, _| got.contains(&Got::ConnAck))
        .await?;
    let now = vehicle.clock.now_ms();
    vehicle.session.disconnect(now)?;
    tokio::time::timeout(WAIT, vehicle.link.close(&mut vehicle.session))
        .await
        .context("closing in time")??;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let late: Vec<_> = watcher
        .drain()
        .into_iter()
        .filter(|r| r.topic == STATUS)
        .collect();
    assert!(late.is_empty(), "no will after a DISCONNECT: {late:?}");
    broker.shutdown().await;
    Ok(())
}
