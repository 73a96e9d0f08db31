//! The broker's abuse limits (issue 14), each counted: connections that have not sent CONNECT
//! (in all and per address), failed logins (per address and per name), SUBSCRIBE rate and
//! filters per connection. Raw TCP and MQTT against the real broker.

mod common;

use std::net::{IpAddr, SocketAddr};

use broker::{AuthRefusal, BrokerConfig, ConnectRefusal, Role, SubscribeRefusal};
use common::{Provisioned, Raw, T, connect_as, eventually};
use shared::frame::Connect;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// A TCP connection to `addr` from the loopback address `from` (127.0.0.0/8).
async fn open_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::from(from), 0)).unwrap();
    timeout(T, socket.connect(addr)).await.unwrap().unwrap()
}

/// Sends CONNECT as `client_id` on `stream` and returns the CONNACK's code, or `None` if the
/// broker closed the connection instead.
async fn connack(stream: &mut TcpStream, client_id: &str) -> Option<u8> {
    // Writing to a connection the broker already closed may fail: that is a `None` too.
    stream
        .write_all(&connect_as(client_id).bytes())
        .await
        .ok()?;
    let mut buf = [0u8; 4];
    match timeout(T, stream.read_exact(&mut buf)).await.unwrap() {
        Ok(_) if buf[0] == 0x20 => Some(buf[3]),
        Ok(_) => panic!("not a CONNACK: {buf:02x?}"),
        Err(_) => None,
    }
}

#[tokio::test]
async fn connections_that_send_no_connect_are_bounded_per_address_and_in_all() {
    let config = BrokerConfig {
        max_pending_connects_per_ip: 3,
        max_pending_connects: 5,
        ..BrokerConfig::ephemeral()
    };
    let broker = common::start(config).await;
    let addr = broker.v4_addr();
    let metrics = broker.metrics();
    let refused = || metrics.connect_refused_total(ConnectRefusal::PendingLimit);

    // Four silent connections from 127.0.0.1: one is closed at once, counted.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(open_from([127, 0, 0, 1], addr).await);
    }
    eventually("one connection over the per-address bound closed", || {
        refused() == 1
    })
    .await;
    // Other addresses still get in, up to 5 pending in all: of three more, one is closed.
    let mut other = [
        open_from([127, 0, 0, 2], addr).await,
        open_from([127, 0, 0, 2], addr).await,
        open_from([127, 0, 0, 3], addr).await,
    ];
    eventually("one connection over the total closed", || refused() == 2).await;

    // The ones kept are served when they speak; the closed one was closed.
    let mut answers = Vec::new();
    for (i, stream) in silent.iter_mut().enumerate() {
        answers.push(connack(stream, &format!("silent-{i}")).await);
    }
    answers.sort();
    assert_eq!(answers, [None, Some(0), Some(0), Some(0)]);
    let mut answers = Vec::new();
    for (i, stream) in other.iter_mut().enumerate() {
        answers.push(connack(stream, &format!("other-{i}")).await);
    }
    answers.sort();
    assert_eq!(answers, [None, Some(0), Some(0)]);
    // Once connected they no longer count: new connections are accepted again.
    let mut late = open_from([127, 0, 0, 1], addr).await;
    assert_eq!(connack(&mut late, "late").await, Some(0));
    assert_eq!(refused(), 2);
    broker.shutdown().await;
}

#[tokio::test]
async fn failed_logins_are_throttled_per_address_and_per_name() {
    let creds = Provisioned::new(&["van-1"], &[("watch", Role::Observer)]);
    let config = BrokerConfig {
        max_login_failures: 3,
        ..creds.config()
    };
    let broker = common::start(config).await;
    let addr = broker.v4_addr();
    let metrics = broker.metrics();
    let (van, password) = creds.login("van-1");
    let good = Connect {
        login: Some((van, password)),
        ..connect_as(van)
    };
    let wrong = Connect {
        login: Some((van, "guess-guess")),
        ..connect_as(van)
    };

    // The vehicle is connected, and was verified once.
    let vehicle = Raw::connected(addr, &good).await;
    drop(vehicle);
    // A guesser fails three times: bad user name or password (4), counted.
    for n in 1..=3 {
        let (_raw, code) = Raw::connect(addr, &wrong).await;
        assert_eq!(code, 4);
        assert_eq!(metrics.auth_refused_total(AuthRefusal::BadPassword), n);
    }
    // The fourth guess is refused unchecked, the same answer, counted apart.
    let (_raw, code) = Raw::connect(addr, &wrong).await;
    assert_eq!(code, 4);
    assert_eq!(metrics.auth_refused_total(AuthRefusal::Throttled), 1);
    assert_eq!(metrics.auth_refused_total(AuthRefusal::BadPassword), 3);
    // So is any new password for that name, and any login from that address...
    let watch = creds.login("watch");
    let (_raw, code) = Raw::connect(
        addr,
        &Connect {
            login: Some(watch),
            ..connect_as("watch")
        },
    )
    .await;
    assert_eq!(code, 4, "the address is throttled");
    assert_eq!(metrics.auth_refused_total(AuthRefusal::Throttled), 2);
    // ...but the vehicle, reconnecting with its verified password, is not locked out.
    let _vehicle = Raw::connected(addr, &good).await;
    broker.shutdown().await;
}

/// A SUBSCRIBE of `filters` at QoS 0.
fn subscribe(pkid: u16, filters: &[&str]) -> Vec<u8> {
    let filters: Vec<(&str, u8)> = filters.iter().map(|f| (*f, 0)).collect();
    shared::frame::subscribe(false, pkid, &filters)
}

#[tokio::test]
async fn subscribes_are_rate_limited_and_filters_bounded_per_connection() {
    let config = BrokerConfig {
        max_subscribe_rate: 1,
        max_subscriptions: 2,
        ..BrokerConfig::ephemeral()
    };
    let broker = common::start(config).await;
    let addr = broker.v4_addr();
    let metrics = broker.metrics();
    let refused = |why| metrics.subscriptions_refused_total(why);

    // Three filters, two allowed: the third is refused in the SUBACK (0x80), counted.
    let mut raw = Raw::connected(addr, &connect_as("many")).await;
    raw.send(&subscribe(1, &["a/1", "a/2", "a/3"])).await;
    let (first, body) = raw.read().await.expect("a SUBACK");
    assert_eq!((first, &body[2..]), (0x90, &[0, 0, 0x80][..]));
    assert_eq!(refused(SubscribeRefusal::Filters), 1);

    // Two SUBSCRIBEs at once with a rate of one a second: the second is refused whole.
    let mut raw = Raw::connected(addr, &connect_as("fast")).await;
    let mut both = subscribe(1, &["b/1"]);
    both.extend(subscribe(2, &["b/2", "b/3"]));
    raw.send(&both).await;
    // The refusal is answered by the front end, the grant by the router: in either order.
    let mut subacks = vec![
        raw.read().await.expect("a SUBACK").1,
        raw.read().await.expect("another SUBACK").1,
    ];
    subacks.sort();
    assert_eq!(subacks, [vec![0, 1, 0], vec![0, 2, 0x80, 0x80]]);
    assert_eq!(refused(SubscribeRefusal::Rate), 2);
    // The connection stays.
    assert_eq!(raw.ping().await, 0xD0);
    broker.shutdown().await;
}

#[tokio::test]
async fn the_listener_probe_gets_through_while_the_bound_is_full() {
    let config = BrokerConfig {
        max_pending_connects: 2,
        probe_interval: std::time::Duration::from_millis(100),
        ..BrokerConfig::ephemeral()
    };
    let broker = common::start(config).await;
    let addr = broker.v4_addr();
    let metrics = broker.metrics();
    // The probe publishes on `fleetbeat-broker/probe/...`: each probe that got through is seen.
    let mut watcher = Raw::connected(addr, &connect_as("watcher")).await;
    assert_eq!(
        watcher.subscribe(1, "fleetbeat-broker/probe/#", 0).await.0,
        0x90
    );
    // Fill the bound, and prove it full: a third silent connection is closed.
    let silent = [
        open_from([127, 0, 0, 1], addr).await,
        open_from([127, 0, 0, 2], addr).await,
        open_from([127, 0, 0, 3], addr).await,
    ];
    eventually("the bound is full", || {
        metrics.connect_refused_total(ConnectRefusal::PendingLimit) >= 1
    })
    .await;
    let refused = metrics.connect_refused_total(ConnectRefusal::PendingLimit);
    // Probes keep passing: two more of them reach the router meanwhile.
    for _ in 0..3 {
        let (first, _) = watcher.read().await.expect("a probe's message");
        assert_eq!(first & 0xF0, 0x30, "a PUBLISH");
    }
    assert_eq!(
        metrics.connect_refused_total(ConnectRefusal::PendingLimit),
        refused,
        "no probe was refused"
    );
    assert!(broker.listener_health().iter().all(|l| l.up));
    drop(silent);
    broker.shutdown().await;
}

/// A broker started with `config`, and its MQTT 3.1.1 and MQTT 5 listeners' addresses.
async fn started_with(config: BrokerConfig) -> (broker::Broker, SocketAddr, SocketAddr) {
    let broker = common::start(config).await;
    let (v4, v5) = (broker.v4_addr(), broker.v5_addr().expect("a v5 listener"));
    (broker, v4, v5)
}

/// The client ids that may have persistent sessions are bounded (`max_persistent_sessions`):
/// rumqttd's router keeps each session until a clean session of its id discards it, and the
/// id's last connection events after that, for good; so a client inventing ids could grow the
/// broker's memory for good. A persistent session under a new id beyond the bound is refused
/// and counted, in both protocol versions, also after a kept id's session was discarded (the
/// router still keeps something of that id); a client resuming its own session gets in, so
/// does a clean session, and an id whose session was discarded may have one again.
#[tokio::test]
async fn persistent_sessions_are_bounded() {
    let (broker, v4, v5) = started_with(BrokerConfig {
        max_persistent_sessions: 2,
        ..BrokerConfig::ephemeral()
    })
    .await;
    let metrics = broker.metrics();
    let keep = |client_id| Connect {
        persistent: true,
        ..connect_as(client_id)
    };
    let leave = |mut raw: Raw| async move {
        raw.send(&shared::frame::DISCONNECT).await;
        raw.until_closed().await;
    };
    for id in ["keeper-1", "keeper-2"] {
        leave(Raw::connected(v4, &keep(id)).await).await;
    }
    let (_, code) = Raw::connect(v4, &keep("keeper-3")).await;
    assert_eq!(code, 3, "3.1.1: server unavailable");
    let v5_keep = Connect {
        v5: true,
        session_expiry: Some(60),
        ..keep("keeper-3")
    };
    let (_, code) = Raw::connect(v5, &v5_keep).await;
    assert_eq!(code, 0x97, "MQTT 5: quota exceeded");
    assert_eq!(
        metrics.connect_refused_total(ConnectRefusal::SessionsFull),
        2
    );
    // Its own session again, and a clean session: in.
    let _resumed = Raw::connected(v4, &keep("keeper-1")).await;
    let _clean = Raw::connected(v4, &connect_as("passer-by")).await;
    // keeper-2 back with a clean session discards its session, not its place: keeper-3 is
    // still refused, keeper-2 may have a persistent session again.
    leave(Raw::connected(v4, &connect_as("keeper-2")).await).await;
    let (_, code) = Raw::connect(v5, &v5_keep).await;
    assert_eq!(code, 0x97);
    leave(Raw::connected(v4, &keep("keeper-2")).await).await;
    assert_eq!(
        metrics.connect_refused_total(ConnectRefusal::SessionsFull),
        3
    );
    broker.shutdown().await;
}

/// The filters clients make the router keep are bounded (`max_filters`): rumqttd gives each a
/// commit log it never frees, so a client subscribing to ever new filters would grow the
/// broker for good. A filter new to the router beyond the bound is refused at its position in
/// the SUBACK (0x80, MQTT 5 0x97) and counted, shared subscriptions' filters too; a filter the
/// router keeps already is granted to anyone; commands through the devices' shared link do
/// not count.
#[tokio::test]
async fn the_filters_clients_make_the_router_keep_are_bounded() {
    let (broker, v4, v5) = started_with(BrokerConfig {
        max_filters: 3,
        ..BrokerConfig::ephemeral()
    })
    .await;
    let metrics = broker.metrics();
    let refused = || metrics.subscriptions_refused_total(SubscribeRefusal::RouterFilters);

    let mut first = Raw::connected(v4, &connect_as("first")).await;
    first
        .send(&subscribe(1, &["a/1", "a/2", "a/3", "a/4", "a/1"]))
        .await;
    let (kind, body) = first.read().await.expect("a SUBACK");
    assert_eq!((kind, &body[2..]), (0x90, &[0, 0, 0, 0x80, 0][..]));
    assert_eq!(refused(), 1);
    assert_eq!(metrics.router_filters(), 3);

    // Another client: a kept filter is granted, a new one refused (MQTT 5: quota exceeded),
    // and so is a shared subscription on a new filter.
    let mut second = Raw::connected(
        v5,
        &Connect {
            v5: true,
            ..connect_as("second")
        },
    )
    .await;
    let filters = [("a/2", 0), ("b/1", 0), ("$share/g/c/1", 0)];
    second
        .send(&shared::frame::subscribe(true, 1, &filters))
        .await;
    let (kind, body) = second.read().await.expect("a SUBACK");
    assert_eq!((kind, &body[3..]), (0x90, &[0, 0x97, 0x97][..]));
    assert_eq!(refused(), 3);

    // A device's command subscription goes through the shared link: not counted.
    let mut van = Raw::connected(v4, &connect_as("van-1")).await;
    van.send(&subscribe(1, &["fleet/f/van-1/cmd"])).await;
    assert_eq!(van.read().await.expect("a SUBACK").1[2..], [0]);
    assert_eq!(metrics.router_filters(), 3);

    // What is granted is served: a publish on a/2 reaches both subscribers.
    let mut publisher = Raw::connected(v4, &connect_as("publisher")).await;
    publisher.publish("a/2", b"x", 0, 0, false).await;
    assert_eq!(first.read().await.expect("a publish").0 & 0xF0, 0x30);
    assert_eq!(second.read().await.expect("a publish").0 & 0xF0, 0x30);
    broker.shutdown().await;
}
