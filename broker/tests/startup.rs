//! Start-up and listener health: the listeners a broker opens, what it refuses to start with,
//! and how a listener that stops answering shows.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use broker::{Broker, BrokerConfig, BrokerError, Listener};
use common::{Raw, T, connect_as, connect_v5_as, eventually, start, start_ephemeral};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

#[tokio::test]
async fn ephemeral_broker_answers_mqtt_on_both_listeners() {
    let broker = start_ephemeral().await;
    let v5 = broker.v5_addr().expect("a v5 listener");
    assert_ne!(broker.v4_addr().port(), 0);
    assert_ne!(v5.port(), 0);
    assert_ne!(v5, broker.v4_addr());
    assert!(broker.is_ready() && broker.is_alive());
    assert!(broker.open_mode());
    assert_eq!(broker.metrics().listener_up(Listener::V4), Some(true));
    assert!(
        broker
            .metrics()
            .render()
            .contains("fleetbeat_broker_open_mode 1")
    );

    let (_, code) = Raw::connect(broker.v4_addr(), &connect_as("a")).await;
    assert_eq!(code, 0);
    let (_, code) = Raw::connect(v5, &connect_v5_as("b")).await;
    assert_eq!(code, 0);
}

#[tokio::test]
async fn v5_listener_is_optional() {
    let broker = start(BrokerConfig {
        v5: None,
        ..BrokerConfig::ephemeral()
    })
    .await;
    assert_eq!(broker.v5_addr(), None);
    assert_eq!(broker.listener_health().len(), 1);
    assert_eq!(broker.metrics().listener_up(Listener::V5), None);
}

#[tokio::test]
async fn two_brokers_run_in_one_process() {
    let (a, b) = tokio::join!(start_ephemeral(), start_ephemeral());
    let mut ports = [
        a.v4_addr().port(),
        a.v5_addr().unwrap().port(),
        b.v4_addr().port(),
        b.v5_addr().unwrap().port(),
    ];
    ports.sort_unstable();
    assert!(ports.windows(2).all(|w| w[0] != w[1]), "ports {ports:?}");
}

#[tokio::test]
async fn taken_port_is_a_bind_error_not_a_hang() {
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap();
    for (listener, config) in [
        (
            Listener::V4,
            BrokerConfig {
                v4: taken,
                ..BrokerConfig::ephemeral()
            },
        ),
        (
            Listener::V5,
            BrokerConfig {
                v5: Some(taken),
                ..BrokerConfig::ephemeral()
            },
        ),
    ] {
        let started = Instant::now();
        match timeout(T, Broker::start(config)).await.unwrap() {
            Err(BrokerError::Bind {
                listener: l,
                addr,
                source,
            }) => {
                assert_eq!((l, addr), (listener, taken));
                assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
            }
            other => panic!("expected a bind error for {listener}, got {other:?}"),
        }
        // At once: no retrying of the bind (3 s leaves room for a loaded machine; a retry
        // loop would take seconds per attempt).
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "it fails at once"
        );
    }
}

#[tokio::test]
async fn an_invalid_config_or_credentials_file_is_refused_at_start() {
    let err = Broker::start(BrokerConfig {
        max_segment_count: 0,
        ..BrokerConfig::ephemeral()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("max_segment_count"), "{err}");

    let missing = BrokerConfig {
        credentials: Some(PathBuf::from("/nonexistent/credentials.toml")),
        ..BrokerConfig::ephemeral()
    };
    assert!(matches!(
        Broker::start(missing).await,
        Err(BrokerError::Credentials(_))
    ));
}

#[tokio::test]
async fn a_dead_listener_is_detected_reported_and_logged() {
    let broker = start(BrokerConfig {
        probe_interval: Duration::from_millis(200),
        ..BrokerConfig::ephemeral()
    })
    .await;
    assert!(broker.is_ready());
    broker.stop_listener(Listener::V4);
    eventually("v4 reported dead", || {
        broker.metrics().listener_up(Listener::V4) == Some(false)
    })
    .await;
    assert!(!broker.is_ready());
    assert!(broker.is_alive(), "v5 still answers");
    let health = broker.listener_health();
    let v4 = health.iter().find(|h| h.listener == Listener::V4).unwrap();
    assert!(!v4.up && v4.last_error.is_some());
    assert!(
        health
            .iter()
            .find(|h| h.listener == Listener::V5)
            .unwrap()
            .up
    );
    assert!(
        broker
            .metrics()
            .render()
            .contains("fleetbeat_broker_listener_up{listener=\"v4\"} 0\n")
    );
    // Nothing listens there any more.
    assert!(TcpStream::connect(broker.v4_addr()).await.is_err());
}
