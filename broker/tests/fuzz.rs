//! Hostile bytes on the wire: property tests that feed the broker's front end arbitrary input
//! over real TCP connections (before CONNECT, after a valid CONNECT, and as well-framed packets
//! with random contents, on the MQTT 3.1.1 and MQTT 5 listeners) and then check that nothing in
//! the process panicked, that every such connection was closed or answered within the bound, and
//! that the broker still routes a message end to end.
//!
//! CI-sized: 256 cases per property (well under a second). The longer recipe (docs/security.md):
//! `PROPTEST_CASES=5000 cargo test --release -p broker --test fuzz`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use broker::Broker;
use common::{Subscriber, T, client, connect_as, connect_v5_as, start_ephemeral};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use rumqttc::QoS;
use shared::frame::put_remaining_length;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::time::timeout;

/// The tests of this file (their threads' names).
const TESTS: [&str; 4] = [
    "garbage_before_connect",
    "garbage_after_connect",
    "framed_random_packets_after_connect",
    "hand_picked_hostile_packets",
];

/// One broker for every case, on its own runtime, and the panics seen anywhere in the process.
struct Fixture {
    runtime: Runtime,
    broker: Broker,
    panics: Arc<AtomicUsize>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let panics = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&panics);
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // The broker's threads, not a failing assertion of one of these tests (the test
            // harness names each test's thread after it).
            let on_test_thread = std::thread::current()
                .name()
                .is_some_and(|name| TESTS.contains(&name));
            if !on_test_thread {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let broker = runtime.block_on(start_ephemeral());
        Fixture {
            runtime,
            broker,
            panics,
        }
    })
}

/// Sends `bytes` on a fresh connection to `addr`, closes the sending half, and reads until the
/// broker closes: it must, within the bound (whatever it answered before).
async fn send_and_close(addr: SocketAddr, bytes: &[u8]) {
    let mut stream = timeout(T, TcpStream::connect(addr)).await.unwrap().unwrap();
    // The broker may close first (a refused packet): a failed write is an answer too.
    if stream.write_all(bytes).await.is_ok() {
        let _ = stream.shutdown().await;
    }
    let mut rest = Vec::new();
    timeout(T, stream.read_to_end(&mut rest))
        .await
        .expect("the broker closes a connection whose peer has finished")
        .ok();
}

/// A packet with first byte `first` and `body`, framed with the right remaining length.
fn framed(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_remaining_length(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// After the cases: no panic anywhere, and a message still goes from a publisher to a
/// subscriber.
fn still_routes(what: &str) {
    let fx = fixture();
    assert_eq!(fx.panics.load(Ordering::SeqCst), 0, "a panic during {what}");
    assert!(fx.broker.is_ready(), "the broker is not ready after {what}");
    fx.runtime.block_on(async {
        let addr = fx.broker.v4_addr();
        let id = format!("after-{}", what.replace(' ', "-"));
        let topic = format!("fuzz/{id}");
        let mut sub = Subscriber::new(addr, &id, &topic, QoS::AtMostOnce).await;
        let mut publisher = client(addr, &format!("{id}-pub")).await;
        publisher
            .publish(&topic, what.as_bytes(), 0, 0, false)
            .await;
        let got = sub.next().await;
        assert_eq!(&got.payload[..], what.as_bytes());
    });
}

/// Runs `case` on values of `strategy` (256 cases, or `PROPTEST_CASES`), then checks that
/// nothing panicked and that the broker still routes.
fn check<S: Strategy>(what: &str, strategy: S, case: impl Fn(&Fixture, S::Value))
where
    S::Value: std::fmt::Debug,
{
    let fx = fixture();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256);
    let mut runner = TestRunner::new(ProptestConfig::with_cases(cases));
    runner
        .run(&strategy, |value| {
            case(fx, value);
            prop_assert_eq!(fx.panics.load(Ordering::SeqCst), 0);
            Ok(())
        })
        .unwrap();
    still_routes(what);
}

/// The address of the listener for `v5` and a valid CONNECT for it, as client `id`.
fn listener(fx: &Fixture, v5: bool, id: &str) -> (SocketAddr, Vec<u8>) {
    if v5 {
        (fx.broker.v5_addr().unwrap(), connect_v5_as(id).bytes())
    } else {
        (fx.broker.v4_addr(), connect_as(id).bytes())
    }
}

/// Anything at all as the first bytes of a connection, on either listener.
#[test]
fn garbage_before_connect() {
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..600),
        any::<bool>(),
    );
    check("garbage before CONNECT", strategy, |fx, (bytes, v5)| {
        let (addr, _) = listener(fx, v5, "unused");
        fx.runtime.block_on(send_and_close(addr, &bytes));
    });
}

/// A valid CONNECT, then anything.
#[test]
fn garbage_after_connect() {
    let strategy = (
        proptest::collection::vec(any::<u8>(), 1..600),
        any::<bool>(),
        0u32..1_000_000,
    );
    check("garbage after CONNECT", strategy, |fx, (bytes, v5, n)| {
        let (addr, mut all) = listener(fx, v5, &format!("fuzz-{n}"));
        all.extend_from_slice(&bytes);
        fx.runtime.block_on(send_and_close(addr, &all));
    });
}

/// A valid CONNECT, then well-framed packets of any type and flags with random bodies: what gets
/// past the framing and into each packet's parser.
#[test]
fn framed_random_packets_after_connect() {
    let packet = (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..80));
    let strategy = (
        proptest::collection::vec(packet, 1..8),
        any::<bool>(),
        0u32..1_000_000,
    );
    check("random packets", strategy, |fx, (packets, v5, n)| {
        let (addr, mut all) = listener(fx, v5, &format!("framed-{n}"));
        for (first, body) in &packets {
            all.extend_from_slice(&framed(*first, body));
        }
        fx.runtime.block_on(send_and_close(addr, &all));
    });
}

/// Hand-picked hostile packets: a remaining length past the limit, a PUBLISH whose topic
/// length runs past its body, a SUBSCRIBE whose filter does.
#[test]
fn hand_picked_hostile_packets() {
    let fx = fixture();
    fx.runtime.block_on(async {
        let v4 = fx.broker.v4_addr();
        send_and_close(v4, &[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]).await;
        let mut all = connect_as("hostile").bytes();
        all.extend_from_slice(&framed(0x30, &[0xFF; 40]));
        send_and_close(v4, &all).await;
        let mut all = connect_as("hostile").bytes();
        all.extend_from_slice(&framed(0x82, &[0, 1, 0xFF, 0xFF]));
        send_and_close(v4, &all).await;
    });
    still_routes("hand-picked packets");
}
