//! Shared subscriptions (`$share/{group}/{filter}`), served by the front end (rumqttd's router
//! never sees a `$share` filter): each message goes to exactly one member of a group,
//! round-robin; groups are keyed by (name, filter); a member that leaves with unacknowledged
//! QoS 1 messages hands them to another member, and a durable kind's device PUBACK waits for
//! that member's; the topic ACL applies to the shared filter; malformed share filters and too
//! many groups are refused and counted. With real `mosquitto_sub` / `mosquitto_pub` where a
//! real client matters, raw clients where the exact packets do.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use broker::{BrokerConfig, Role, SubscribeRefusal};
use common::{
    Provisioned, Raw, T, client, client_v5, connect_as, eventually, publish_fields, publish_pkid,
    start, start_ephemeral, unsubscribe,
};
use shared::frame::{Connect, puback, subscribe};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Long enough for a packet that was going to come to have come.
const QUIET: Duration = Duration::from_millis(400);

/// Sends a SUBSCRIBE for `filters` and returns the SUBACK's codes (MQTT 5 if `v5`).
async fn suback(raw: &mut Raw, v5: bool, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    raw.send(&subscribe(v5, pkid, filters)).await;
    let (first, body) = raw.read().await.expect("a SUBACK");
    assert_eq!(first, 0x90, "SUBACK, got {first:#04x} {body:02x?}");
    assert_eq!(u16::from_be_bytes([body[0], body[1]]), pkid);
    if v5 {
        // Property length: small enough for one byte here.
        let len = usize::from(body[2]);
        body[3 + len..].to_vec()
    } else {
        body[2..].to_vec()
    }
}

/// The next PUBLISH `raw` receives: (topic, payload, packet id if QoS 1), not acknowledged.
async fn next_publish(raw: &mut Raw) -> (String, Vec<u8>, Option<u16>) {
    let (first, body) = raw.read().await.expect("a PUBLISH");
    assert_eq!(first >> 4, 3, "a PUBLISH, got {first:#04x} {body:02x?}");
    let (topic, payload) = publish_fields(first, &body);
    let pkid = (first & 0x06 != 0).then(|| publish_pkid(first, &body));
    (topic, payload, pkid)
}

/// The payloads of every PUBLISH `raw` receives until nothing more comes for [`QUIET`]
/// (QoS 1 ones acknowledged).
async fn drain_payloads(raw: &mut Raw) -> Vec<String> {
    let mut out = Vec::new();
    while let Some((first, body)) = raw.read_within(QUIET).await {
        assert_eq!(first >> 4, 3, "a PUBLISH, got {first:#04x}");
        if first & 0x06 != 0 {
            raw.send(&puback(publish_pkid(first, &body))).await;
        }
        out.push(String::from_utf8(publish_fields(first, &body).1).unwrap());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Real clients.

/// A running `mosquitto_sub -v -d`: its stdout lines, as they come.
struct MosquittoSub {
    _child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl MosquittoSub {
    /// Starts `mosquitto_sub` on `addr` with `args` and waits for its SUBACK.
    async fn subscribed(addr: SocketAddr, args: &[&str]) -> MosquittoSub {
        let port = addr.port().to_string();
        // Line-buffered: its debug lines (the SUBACK) are not flushed otherwise.
        let mut child = Command::new("stdbuf")
            .args([
                "-oL",
                "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-v",
                "-d",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub runs");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut sub = MosquittoSub {
            _child: child,
            lines,
        };
        timeout(T, async {
            while let Some(line) = sub.lines.recv().await {
                if line.contains("SUBACK") {
                    return;
                }
            }
            panic!("mosquitto_sub ended before its SUBACK");
        })
        .await
        .expect("mosquitto_sub subscribed within the bound");
        sub
    }

    /// The payloads of the messages it printed (`topic payload` lines, `prefix` being the
    /// topic and a space) until
    /// nothing more comes for [`QUIET`].
    async fn payloads(&mut self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(Some(line)) = timeout(QUIET, self.lines.recv()).await {
            if let Some(payload) = line.strip_prefix(prefix) {
                out.push(payload.to_owned());
            }
        }
        out
    }
}

/// Publishes each of `lines` as one message on `topic` with `mosquitto_pub -l` (QoS 0).
async fn mosquitto_pub_lines(addr: SocketAddr, topic: &str, lines: &[String]) {
    let port = addr.port().to_string();
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-t", topic, "-l"])
        .stdin(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_pub runs");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(format!("{}\n", lines.join("\n")).as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let status = timeout(T, child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "mosquitto_pub: {status}");
}

#[tokio::test]
async fn mosquitto_subs_in_one_group_share_the_messages_and_a_plain_subscriber_gets_all() {
    let broker = start_ephemeral().await;
    let v4 = broker.v4_addr();
    let v5 = broker.v5_addr().unwrap();
    let filter = "$share/g/fleet/+/+/hb";
    let mut member4 = MosquittoSub::subscribed(v4, &["-V", "311", "-q", "1", "-t", filter]).await;
    let mut member5 = MosquittoSub::subscribed(v5, &["-V", "5", "-q", "1", "-t", filter]).await;
    let mut plain = MosquittoSub::subscribed(v4, &["-V", "311", "-t", "fleet/#"]).await;
    assert_eq!(broker.metrics().shared_groups(), 1);

    const N: usize = 40;
    let sent: Vec<String> = (0..N).map(|i| format!("hb-{i}")).collect();
    mosquitto_pub_lines(v4, "fleet/f/van-1/hb", &sent).await;

    let prefix = "fleet/f/van-1/hb ";
    let got4 = member4.payloads(prefix).await;
    let got5 = member5.payloads(prefix).await;
    let all = plain.payloads(prefix).await;
    assert_eq!(
        all, sent,
        "the plain subscriber gets every message, in order"
    );
    let shared: BTreeSet<&String> = got4.iter().chain(&got5).collect();
    assert_eq!(
        got4.len() + got5.len(),
        N,
        "each message reached exactly one member: {got4:?} {got5:?}"
    );
    assert_eq!(shared, sent.iter().collect(), "none lost, none twice");
    // Round-robin: QoS 0 messages (heartbeats) alternate between the two members.
    assert_eq!((got4.len(), got5.len()), (N / 2, N / 2));
    assert_eq!(
        broker.metrics().shared_deliveries_total(),
        u64::try_from(N).unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Groups.

#[tokio::test]
async fn groups_are_keyed_by_name_and_filter() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    // Two groups on one filter, one member each.
    let mut a = client(addr, "a").await;
    assert_eq!(
        suback(&mut a, false, 1, &[("$share/one/t/+", 1)]).await,
        [1]
    );
    let mut b = client(addr, "b").await;
    assert_eq!(
        suback(&mut b, false, 1, &[("$share/two/t/+", 0)]).await,
        [0]
    );
    // The name `one` again, on another filter: another group.
    let mut c = client(addr, "c").await;
    assert_eq!(
        suback(&mut c, false, 1, &[("$share/one/u/+", 1)]).await,
        [1]
    );
    assert_eq!(broker.metrics().shared_groups(), 3);

    let mut publisher = client(addr, "pub").await;
    for i in 0..5u16 {
        publisher
            .publish("t/x", format!("t{i}").as_bytes(), 1, i + 1, false)
            .await;
        publisher
            .publish("u/x", format!("u{i}").as_bytes(), 1, i + 10, false)
            .await;
    }
    let ts: Vec<String> = (0..5).map(|i| format!("t{i}")).collect();
    let us: Vec<String> = (0..5).map(|i| format!("u{i}")).collect();
    assert_eq!(drain_payloads(&mut a).await, ts, "group one on t/+: all");
    assert_eq!(drain_payloads(&mut b).await, ts, "group two on t/+: all");
    assert_eq!(
        drain_payloads(&mut c).await,
        us,
        "group one on u/+: its own"
    );

    // Unsubscribing leaves the group; the last member leaving removes it.
    a.send(&unsubscribe(7, "$share/one/t/+")).await;
    assert_eq!(a.read().await.map(|(first, _)| first), Some(0xB0));
    assert_eq!(broker.metrics().shared_groups(), 2);
    publisher.publish("t/x", b"after", 1, 20, false).await;
    assert_eq!(drain_payloads(&mut b).await, ["after"]);
    assert!(a.read_within(QUIET).await.is_none(), "a left the group");
    drop(c);
    eventually("the group of a closed connection removed", || {
        broker.metrics().shared_groups() == 1
    })
    .await;
}

#[tokio::test]
async fn a_new_shared_subscription_gets_no_retained_message() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut publisher = client(addr, "pub").await;
    publisher.publish("r/1", b"kept", 1, 1, true).await;
    assert_eq!(publisher.read().await, Some((0x40, vec![0, 1])));
    let mut plain = client(addr, "plain").await;
    assert_eq!(suback(&mut plain, false, 1, &[("r/#", 0)]).await, [0]);
    assert_eq!(drain_payloads(&mut plain).await, ["kept"], "retained");
    let mut member = client(addr, "member").await;
    assert_eq!(
        suback(&mut member, false, 1, &[("$share/g/r/#", 1)]).await,
        [1]
    );
    let got = member.read_within(QUIET).await;
    assert!(
        got.is_none(),
        "no retained message on a shared subscription (MQTT 5 §4.8.2): {got:02x?}"
    );
    publisher.publish("r/1", b"live", 0, 0, true).await;
    assert_eq!(drain_payloads(&mut member).await, ["live"]);
}

#[tokio::test]
async fn a_mixed_subscribe_and_unsubscribe_keep_every_code_in_place() {
    let broker = start_ephemeral().await;
    let mut tool = client(broker.v4_addr(), "tool").await;
    assert_eq!(
        suback(
            &mut tool,
            false,
            1,
            &[("x/#", 1), ("$share/g/y/#", 1), ("$share/g", 1), ("z", 0)]
        )
        .await,
        [1, 1, 0x80, 0]
    );
    let mut publisher = client(broker.v4_addr(), "pub").await;
    publisher.publish("y/1", b"shared", 0, 0, false).await;
    publisher.publish("x/1", b"plain", 0, 0, false).await;
    let mut got = drain_payloads(&mut tool).await;
    got.sort();
    assert_eq!(got, ["plain", "shared"]);
    // One UNSUBSCRIBE for a router filter and a shared one: the router never sees the latter.
    let mut body = vec![0, 9];
    for filter in ["x/#", "$share/g/y/#"] {
        shared::frame::put_str(&mut body, filter.as_bytes());
    }
    tool.send(&shared::frame::packet(0xA2, &body)).await;
    let (first, body) = tool.read().await.unwrap();
    assert_eq!((first, body), (0xB0, vec![0, 9]));
    assert_eq!(broker.metrics().shared_groups(), 0);
    publisher.publish("y/1", b"shared", 0, 0, false).await;
    publisher.publish("x/1", b"plain", 0, 0, false).await;
    assert!(tool.read_within(QUIET).await.is_none(), "both unsubscribed");
    assert!(broker.is_alive());
}

// ---------------------------------------------------------------------------------------------
// Failover with end-to-end acknowledgement.

#[tokio::test]
async fn a_member_killed_with_unacknowledged_events_hands_them_to_the_other_and_the_device_waits() {
    let broker = start(BrokerConfig {
        durable_consumers: vec!["bridge-1".to_owned(), "bridge-2".to_owned()],
        ..BrokerConfig::ephemeral()
    })
    .await;
    let addr = broker.v4_addr();
    let filter = "$share/bridges/fleet/+/+/event";
    let mut first = client(addr, "bridge-1").await;
    assert_eq!(suback(&mut first, false, 1, &[(filter, 1)]).await, [1]);
    let mut second = client(addr, "bridge-2").await;
    assert_eq!(suback(&mut second, false, 1, &[(filter, 1)]).await, [1]);

    let mut van = client(addr, "van-1").await;
    const N: u16 = 6;
    for pkid in 1..=N {
        van.publish(
            "fleet/f/van-1/event",
            format!("e{pkid}").as_bytes(),
            1,
            pkid,
            false,
        )
        .await;
    }
    // Each event reaches one bridge; neither acknowledges yet.
    let mut held_first = Vec::new();
    let mut held_second = Vec::new();
    timeout(T, async {
        while held_first.len() + held_second.len() < usize::from(N) {
            tokio::select! {
                got = next_publish(&mut first) => held_first.push(got),
                got = next_publish(&mut second) => held_second.push(got),
            }
        }
    })
    .await
    .expect("every event delivered to a member");
    assert!(!held_first.is_empty() && !held_second.is_empty());
    assert!(van.read_within(QUIET).await.is_none(), "no PUBACK yet");

    // bridge-2 acknowledges its share: the device still waits (bridge-1 holds earlier ones).
    for (_, _, pkid) in &held_second {
        second.send(&puback(pkid.expect("QoS 1"))).await;
    }
    assert!(
        van.read_within(QUIET).await.is_none(),
        "no PUBACK while bridge-1 holds events"
    );

    // bridge-1 dies without acknowledging: its events go to bridge-2.
    drop(first);
    let mut redelivered = Vec::new();
    for _ in 0..held_first.len() {
        let got = next_publish(&mut second).await;
        redelivered.push(got);
    }
    let mut expected: Vec<Vec<u8>> = held_first.iter().map(|(_, p, _)| p.clone()).collect();
    let mut payloads: Vec<Vec<u8>> = redelivered.iter().map(|(_, p, _)| p.clone()).collect();
    expected.sort();
    payloads.sort();
    assert_eq!(payloads, expected, "bridge-1's events, redelivered");
    assert!(
        van.read_within(QUIET).await.is_none(),
        "the device is not acknowledged before bridge-2 is"
    );
    for (_, _, pkid) in &redelivered {
        second.send(&puback(pkid.expect("QoS 1"))).await;
    }
    // Every PUBACK, in the order of the publishes.
    for pkid in 1..=N {
        assert_eq!(
            van.read().await,
            Some((0x40, pkid.to_be_bytes().to_vec())),
            "PUBACK {pkid}"
        );
    }
    let metrics = broker.metrics();
    assert_eq!(
        metrics.shared_redeliveries_total(),
        u64::try_from(held_first.len()).unwrap()
    );
    assert_eq!(metrics.shared_undelivered_total(), 0);
}

// ---------------------------------------------------------------------------------------------
// Access control and hostile clients.

#[tokio::test]
async fn a_shared_subscription_is_allowed_iff_its_filter_is() {
    let creds = Provisioned::new(&["van-1"], &[("watch", Role::Observer)]);
    let broker = start(creds.config()).await;
    let addr = broker.v4_addr();
    let (user, password) = creds.login("watch");
    let mut observer = Raw::connected(
        addr,
        &Connect {
            login: Some((user, password)),
            ..connect_as(user)
        },
    )
    .await;
    assert_eq!(
        suback(&mut observer, false, 1, &[("$share/g/fleet/+/+/event", 1)]).await,
        [1]
    );
    let (van, van_password) = creds.login("van-1");
    let mut device = Raw::connected(
        addr,
        &Connect {
            login: Some((van, van_password)),
            ..connect_as(van)
        },
    )
    .await;
    assert_eq!(
        suback(&mut device, false, 1, &[("$share/g/fleet/f/van-2/cmd", 1)]).await,
        [0x80],
        "another vehicle's commands"
    );
    assert_eq!(
        suback(&mut device, false, 2, &[("$share/g/fleet/+/+/event", 1)]).await,
        [0x80],
        "every vehicle's events"
    );
    assert_eq!(
        suback(&mut device, false, 3, &[("$share/g/fleet/f/van-1/cmd", 1)]).await,
        [1],
        "its own commands"
    );
    assert_eq!(broker.metrics().subscribe_denied_total(), 2);
    assert_eq!(broker.metrics().shared_groups(), 2);
}

#[tokio::test]
async fn malformed_share_filters_are_refused_and_counted() {
    let broker = start_ephemeral().await;
    let malformed = [
        "$share/",
        "$share/g",
        "$share//t",
        "$share/g+/t",
        "$share/#/t",
        "$share/g/t/#/u",
        "$share/g/$SYS/#",
    ];
    let filters: Vec<(&str, u8)> = malformed.iter().map(|f| (*f, 1)).collect();
    let mut v4 = client(broker.v4_addr(), "v4").await;
    assert_eq!(
        suback(&mut v4, false, 1, &filters).await,
        vec![0x80; malformed.len()]
    );
    let mut v5 = client_v5(broker.v5_addr().unwrap(), "v5").await;
    assert_eq!(
        suback(&mut v5, true, 1, &filters).await,
        vec![0x8F; malformed.len()],
        "MQTT 5: topic filter invalid"
    );
    let metrics = broker.metrics();
    assert_eq!(
        metrics.subscriptions_refused_total(SubscribeRefusal::Shared),
        u64::try_from(2 * malformed.len()).unwrap()
    );
    assert!(metrics.render().contains(&format!(
        "fleetbeat_broker_subscriptions_refused_total{{reason=\"shared\"}} {}\n",
        2 * malformed.len()
    )));
    assert_eq!(metrics.shared_groups(), 0);
    // Both connections still work.
    assert_eq!(v4.ping().await, 0xD0);
    assert_eq!(v5.ping().await, 0xD0);
}

#[tokio::test]
async fn many_groups_are_bounded_by_the_connections_subscription_limits() {
    let broker = start(BrokerConfig {
        max_subscriptions: 5,
        max_subscribe_rate: 2,
        ..BrokerConfig::ephemeral()
    })
    .await;
    let mut hostile = client(broker.v4_addr(), "hostile").await;
    let names: Vec<String> = (0..10).map(|i| format!("$share/g{i}/t/#")).collect();
    let filters: Vec<(&str, u8)> = names.iter().map(|f| (f.as_str(), 0)).collect();
    let mut codes = suback(&mut hostile, false, 1, &filters).await;
    assert_eq!(codes.drain(..5).collect::<Vec<_>>(), [0; 5]);
    assert_eq!(codes, [0x80; 5], "beyond max_subscriptions");
    assert_eq!(broker.metrics().shared_groups(), 5);
    assert_eq!(
        broker
            .metrics()
            .subscriptions_refused_total(SubscribeRefusal::Filters),
        5
    );
    // The subscribe rate applies too: a burst of SUBSCRIBEs is refused whole.
    let mut refused_whole = false;
    for pkid in 2..10 {
        let name = format!("$share/h{pkid}/t/#");
        if suback(&mut hostile, false, pkid, &[(&name, 0)]).await == [0x80] {
            refused_whole = true;
        }
    }
    assert!(refused_whole);
    assert!(
        broker
            .metrics()
            .subscriptions_refused_total(SubscribeRefusal::Rate)
            > 0
    );
    assert_eq!(broker.metrics().shared_groups(), 5, "still at the limit");
    drop(hostile);
    eventually("every group removed with its only member", || {
        broker.metrics().shared_groups() == 0
    })
    .await;
    // And the broker routes as before.
    let mut sub = client(broker.v4_addr(), "sub").await;
    assert_eq!(
        suback(&mut sub, false, 1, &[("$share/g/t/#", 1)]).await,
        [1]
    );
    let mut publisher = client(broker.v4_addr(), "pub").await;
    publisher.publish("t/1", b"ok", 0, 0, false).await;
    assert_eq!(drain_payloads(&mut sub).await, ["ok"]);
}
