//! MQTT over TLS, end to end with Debian's mosquitto_sub and mosquitto_pub on certificates
//! this file makes with rcgen: the TLS listeners (3.1.1 and 5), refused handshakes (wrong CA,
//! plaintext on the TLS port, missing or foreign client certificates) counted, mutual TLS
//! naming the vehicle, the certificate reloaded when its files change.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use broker::{AuthRefusal, Broker, BrokerConfig, BrokerError, ClientCerts, ConnectRefusal, Role};
use common::{Provisioned, Subscriber, T, eventually};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, SanType,
};
use rumqttc::QoS;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::{Instant, sleep, timeout};

// ---------------------------------------------------------------------------------------------
// Certificates.

/// A test CA writing PEM files into a directory.
struct Ca {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate: what clients trust.
    pem: PathBuf,
}

/// A certificate and its key, as PEM files.
struct Files {
    cert: PathBuf,
    key: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pem = dir.join(format!("{name}-ca.pem"));
        fs::write(&pem, cert.pem()).unwrap();
        Ca {
            dir: dir.to_owned(),
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A server certificate for localhost, written to `{file}.pem` and `{file}-key.pem`
    /// (replacing them as a renewal does: key first, each through a rename).
    fn server(&self, file: &str) -> Files {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, file)
    }

    /// A client certificate whose common name is `vehicle`.
    fn client(&self, vehicle: &str) -> Files {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, vehicle);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let name = format!("{vehicle}-{}", fastrand::u32(..));
        self.issue(params, &name)
    }

    fn issue(&self, params: CertificateParams, file: &str) -> Files {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = Files {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}-key.pem")),
        };
        replace(&files.key, &key.serialize_pem());
        replace(&files.cert, &cert.pem());
        files
    }
}

/// Writes `text` to `path` through a temporary file and a rename.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// A broker configuration with both TLS listeners on ephemeral ports, serving `server`.
fn tls_config(base: BrokerConfig, server: &Files) -> BrokerConfig {
    let any = Some("127.0.0.1:0".parse().unwrap());
    BrokerConfig {
        tls_listen: any,
        tls_listen_v5: any,
        tls_cert: Some(server.cert.clone()),
        tls_key: Some(server.key.clone()),
        ..base
    }
}

// ---------------------------------------------------------------------------------------------
// mosquitto.

/// Runs a mosquitto client to its end, within [`T`].
async fn run(program: &str, args: &[&str]) -> Output {
    let child = Command::new(program).args(args).kill_on_drop(true).output();
    timeout(T, child)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} ends within the bound"))
        .unwrap_or_else(|err| panic!("{program} runs: {err}"))
}

/// `mosquitto_pub` over TLS to `port`, trusting `ca`, with `extra` arguments.
async fn publish(port: u16, ca: &Path, extra: &[&str]) -> Output {
    let port = port.to_string();
    let mut args = vec![
        "-h",
        "localhost",
        "-p",
        &port,
        "--cafile",
        path(ca),
        "-q",
        "1",
    ];
    args.extend_from_slice(extra);
    run("mosquitto_pub", &args).await
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

fn port(addr: Option<std::net::SocketAddr>) -> u16 {
    addr.expect("the TLS listener is configured").port()
}

/// `mosquitto_sub` (MQTT `version`) over TLS waits for one message on `topic`, while
/// `mosquitto_pub` publishes it over TLS until the subscriber has it (it may subscribe after
/// the first publish). Returns what the subscriber printed.
async fn sub_receives_pub(port: u16, ca: &Path, version: &str, topic: &str) -> String {
    let port_text = port.to_string();
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "localhost",
            "-p",
            &port_text,
            "--cafile",
            path(ca),
            "-V",
            version,
            "-t",
            topic,
            "-C",
            "1",
            "-W",
            "20",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub runs");
    let waiting = tokio::spawn(sub.wait_with_output());
    let deadline = Instant::now() + T;
    while !waiting.is_finished() {
        assert!(Instant::now() < deadline, "mosquitto_sub got nothing");
        let published = publish(port, ca, &["-V", version, "-t", topic, "-m", "over tls"]).await;
        assert!(published.status.success(), "mosquitto_pub: {published:?}");
        sleep(Duration::from_millis(100)).await;
    }
    let output = waiting.await.unwrap().unwrap();
    assert!(output.status.success(), "mosquitto_sub: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn mosquitto_sub_receives_what_mosquitto_pub_publishes_over_tls_in_3_1_1_and_5() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "main");
    let broker = common::start(tls_config(BrokerConfig::ephemeral(), &ca.server("server"))).await;

    let got = sub_receives_pub(port(broker.tls_addr()), &ca.pem, "mqttv311", "tls/v4").await;
    assert_eq!(got.trim(), "over tls");
    let got = sub_receives_pub(port(broker.tls_v5_addr()), &ca.pem, "mqttv5", "tls/v5").await;
    assert_eq!(got.trim(), "over tls");
    assert_eq!(broker.metrics().tls_handshake_failures_total(), 0);
    // The TLS connections are MQTT connections like any other.
    assert!(
        broker
            .metrics()
            .render()
            .contains("fleetbeat_broker_tls_handshake_failures_total 0")
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn a_wrong_ca_and_plaintext_on_the_tls_port_are_counted_failures() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "main");
    let other = Ca::new(dir.path(), "other");
    let broker = common::start(tls_config(BrokerConfig::ephemeral(), &ca.server("server"))).await;
    let tls_port = port(broker.tls_addr());
    let metrics = broker.metrics();

    // mosquitto does not trust the broker's certificate: it gives up, the broker counts it.
    let refused = publish(tls_port, &other.pem, &["-t", "tls/x", "-m", "no"]).await;
    assert!(!refused.status.success(), "{refused:?}");
    eventually("the failed handshake is counted", || {
        metrics.tls_handshake_failures_total() == 1
    })
    .await;

    // A plaintext MQTT CONNECT on the TLS port: no CONNACK, the connection closes, counted.
    let mut plain = TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
    let connect = shared::frame::Connect {
        client_id: "plain",
        keep_alive: 30,
        ..shared::frame::Connect::default()
    };
    plain.write_all(&connect.bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = timeout(T, plain.read_to_end(&mut answer))
        .await
        .expect("the broker closes the connection");
    assert_ne!(answer.first(), Some(&0x20), "no CONNACK: {answer:?}");
    eventually("the plaintext connection is counted", || {
        metrics.tls_handshake_failures_total() == 2
    })
    .await;

    // The broker goes on serving, over TLS and in plaintext.
    let fine = publish(tls_port, &ca.pem, &["-t", "tls/x", "-m", "yes"]).await;
    assert!(fine.status.success(), "{fine:?}");
    let v4 = broker.v4_addr().port().to_string();
    let plain_pub = run(
        "mosquitto_pub",
        &["-h", "127.0.0.1", "-p", &v4, "-t", "a", "-m", "b"],
    )
    .await;
    assert!(plain_pub.status.success(), "{plain_pub:?}");
    assert_eq!(metrics.tls_handshake_failures_total(), 2);
    broker.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_names_the_vehicle_and_refuses_everyone_else() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "main");
    let foreign = Ca::new(dir.path(), "foreign");
    let creds = Provisioned::new(&["van-1"], &[("watch", Role::Observer)]);
    let config = BrokerConfig {
        tls_client_ca: Some(ca.pem.clone()),
        tls_client_certs: ClientCerts::Required,
        ..tls_config(creds.config(), &ca.server("server"))
    };
    let broker = common::start(config).await;
    let metrics = broker.metrics();
    let tls_port = port(broker.tls_addr());
    let van_1 = ca.client("van-1");
    let with_cert = |files: &Files| -> Vec<String> {
        vec![
            "--cert".to_owned(),
            path(&files.cert).to_owned(),
            "--key".to_owned(),
            path(&files.key).to_owned(),
        ]
    };
    let args = |cert: &[String], rest: &[&'static str]| -> Vec<String> {
        cert.iter()
            .cloned()
            .chain(rest.iter().map(|s| (*s).to_owned()))
            .collect()
    };
    async fn publish_owned(port: u16, ca: &Path, args: Vec<String>) -> Output {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        publish(port, ca, &args).await
    }

    // van-1's certificate, no password: it is van-1 of fleet f, an observer sees its heartbeat.
    let mut watcher = Subscriber::connect(
        broker.v4_addr(),
        "watch",
        Some(creds.login("watch")),
        &[("fleet/f/van-1/hb", QoS::AtLeastOnce)],
    )
    .await;
    let topic = ["-i", "van-1", "-t", "fleet/f/van-1/hb", "-m", "beat"];
    let accepted = publish_owned(tls_port, &ca.pem, args(&with_cert(&van_1), &topic)).await;
    assert!(accepted.status.success(), "{accepted:?}");
    let heard = watcher.next().await;
    assert_eq!(
        (heard.topic.as_str(), &heard.payload[..]),
        ("fleet/f/van-1/hb", &b"beat"[..])
    );
    assert_eq!(metrics.tls_handshake_failures_total(), 0);

    // The same certificate as another client id: CONNACK "not authorized".
    let as_van_2 = ["-i", "van-2", "-t", "fleet/f/van-2/hb", "-m", "x"];
    let refused = publish_owned(tls_port, &ca.pem, args(&with_cert(&van_1), &as_van_2)).await;
    assert!(!refused.status.success(), "{refused:?}");
    assert_eq!(metrics.auth_refused_total(AuthRefusal::ClientIdMismatch), 1);
    // ...or under another username.
    let as_user = [
        "-i",
        "van-1",
        "-u",
        "watch",
        "-t",
        "fleet/f/van-1/hb",
        "-m",
        "x",
    ];
    let refused = publish_owned(tls_port, &ca.pem, args(&with_cert(&van_1), &as_user)).await;
    assert!(!refused.status.success(), "{refused:?}");
    assert_eq!(
        metrics.auth_refused_total(AuthRefusal::CertificateMismatch),
        1
    );

    // A valid certificate of a vehicle not in the credentials file: an unknown user.
    let van_3 = ca.client("van-3");
    let unknown = ["-i", "van-3", "-t", "fleet/f/van-3/hb", "-m", "x"];
    let refused = publish_owned(tls_port, &ca.pem, args(&with_cert(&van_3), &unknown)).await;
    assert!(!refused.status.success(), "{refused:?}");
    assert_eq!(metrics.auth_refused_total(AuthRefusal::UnknownUser), 1);

    // No client certificate, even with the right password: the handshake is refused.
    let (user, password) = creds.login("van-1");
    let password_only = vec![
        "-i".to_owned(),
        "van-1".to_owned(),
        "-u".to_owned(),
        user.to_owned(),
        "-P".to_owned(),
        password.to_owned(),
        "-t".to_owned(),
        "fleet/f/van-1/hb".to_owned(),
        "-m".to_owned(),
        "x".to_owned(),
    ];
    let refused = publish_owned(tls_port, &ca.pem, password_only).await;
    assert!(!refused.status.success(), "{refused:?}");
    eventually("the handshake without a certificate is counted", || {
        metrics.tls_handshake_failures_total() == 1
    })
    .await;

    // A certificate for van-1 from another CA: refused as well.
    let forged = foreign.client("van-1");
    let refused = publish_owned(tls_port, &ca.pem, args(&with_cert(&forged), &topic)).await;
    assert!(!refused.status.success(), "{refused:?}");
    eventually("the foreign certificate is counted", || {
        metrics.tls_handshake_failures_total() == 2
    })
    .await;
    watcher.nothing_for(Duration::from_millis(300)).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn with_optional_client_certificates_a_password_or_a_certificate_will_do() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "main");
    let creds = Provisioned::new(&["van-1"], &[]);
    let config = BrokerConfig {
        tls_client_ca: Some(ca.pem.clone()),
        tls_client_certs: ClientCerts::Optional,
        ..tls_config(creds.config(), &ca.server("server"))
    };
    let broker = common::start(config).await;
    let tls_port = port(broker.tls_v5_addr());
    let van_1 = ca.client("van-1");
    let topic = [
        "-V",
        "mqttv5",
        "-i",
        "van-1",
        "-t",
        "fleet/f/van-1/hb",
        "-m",
        "x",
    ];

    let (user, password) = creds.login("van-1");
    let mut with_password = vec!["-u", user, "-P", password];
    with_password.extend_from_slice(&topic);
    let published = publish(tls_port, &ca.pem, &with_password).await;
    assert!(published.status.success(), "{published:?}");

    let mut with_cert = vec!["--cert", path(&van_1.cert), "--key", path(&van_1.key)];
    with_cert.extend_from_slice(&topic);
    let published = publish(tls_port, &ca.pem, &with_cert).await;
    assert!(published.status.success(), "{published:?}");

    // Neither: a device needs one or the other.
    let published = publish(tls_port, &ca.pem, &topic).await;
    assert!(!published.status.success(), "{published:?}");
    assert_eq!(
        broker
            .metrics()
            .auth_refused_total(AuthRefusal::NoCredentials),
        1
    );
    assert_eq!(broker.metrics().tls_handshake_failures_total(), 0);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_renewed_certificate_is_used_by_new_connections_and_a_broken_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let first = Ca::new(dir.path(), "first");
    let second = Ca::new(dir.path(), "second");
    let server = first.server("server");
    let broker = common::start(tls_config(BrokerConfig::ephemeral(), &server)).await;
    let metrics = broker.metrics();
    let tls_port = port(broker.tls_addr());
    let connects = |ca: PathBuf| async move {
        publish(tls_port, &ca, &["-t", "tls/renewal", "-m", "x"])
            .await
            .status
            .success()
    };
    assert!(connects(first.pem.clone()).await);
    assert!(!connects(second.pem.clone()).await);

    // The certificate is renewed by another CA, in place.
    second.server("server");
    let deadline = Instant::now() + T;
    while !connects(second.pem.clone()).await {
        assert!(
            Instant::now() < deadline,
            "the new certificate is never used"
        );
        sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !connects(first.pem.clone()).await,
        "the old certificate is gone"
    );
    assert_eq!(metrics.tls_reloads_total(), 1);

    // A broken replacement: reported, and the renewed certificate stays in use.
    fs::write(&server.cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    let deadline = Instant::now() + T;
    while metrics.tls_reload_failures_total() == 0 {
        assert!(
            Instant::now() < deadline,
            "the broken file is never looked at"
        );
        assert!(connects(second.pem.clone()).await, "still serving");
        sleep(Duration::from_millis(100)).await;
    }
    assert!(
        connects(second.pem.clone()).await,
        "still serving after the broken reload"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn tls_handshakes_in_progress_count_against_the_pending_connects_bound() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "main");
    let config = BrokerConfig {
        max_pending_connects_per_ip: 2,
        ..tls_config(BrokerConfig::ephemeral(), &ca.server("server"))
    };
    let broker = common::start(config).await;
    let metrics = broker.metrics();
    let tls_port = port(broker.tls_addr());

    // Connections to the TLS port that never finish their handshake: beyond two, each is
    // closed at once (were the slot taken only after the handshake, none would be).
    let refused = || metrics.connect_refused_total(ConnectRefusal::PendingLimit);
    let mut silent = Vec::new();
    let deadline = Instant::now() + T;
    while refused() == 0 {
        assert!(Instant::now() < deadline, "the bound is never reached");
        silent.push(TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap());
        sleep(Duration::from_millis(20)).await;
    }
    let mut closed = TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
    let mut rest = Vec::new();
    // Well before connection_timeout_ms (10 s), which would end a handshake in progress.
    timeout(Duration::from_secs(3), closed.read_to_end(&mut rest))
        .await
        .expect("closed at once")
        .ok();
    assert!(rest.is_empty(), "{rest:?}");
    eventually("the second refusal is counted", || refused() >= 2).await;

    // Once they go, TLS clients get in again.
    drop(silent);
    let deadline = Instant::now() + T;
    while !publish(tls_port, &ca.pem, &["-t", "tls/x", "-m", "x"])
        .await
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the places are never given back");
        sleep(Duration::from_millis(100)).await;
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn unreadable_tls_files_fail_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "main");
    let server = ca.server("server");
    let missing = dir.path().join("missing.pem");
    let config = BrokerConfig {
        tls_key: Some(missing.clone()),
        ..tls_config(BrokerConfig::ephemeral(), &server)
    };
    match timeout(T, Broker::start(config)).await.unwrap() {
        Err(err @ BrokerError::Tls(_)) => {
            assert!(err.to_string().contains("missing.pem"), "{err}");
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    let client_ca = BrokerConfig {
        tls_client_ca: Some(server.cert.with_file_name("nope.pem")),
        ..tls_config(BrokerConfig::ephemeral(), &server)
    };
    match timeout(T, Broker::start(client_ca)).await.unwrap() {
        Err(err @ BrokerError::Tls(_)) => assert!(err.to_string().contains("nope.pem"), "{err}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    let no_key = BrokerConfig {
        tls_key: None,
        ..tls_config(BrokerConfig::ephemeral(), &server)
    };
    match timeout(T, Broker::start(no_key)).await.unwrap() {
        Err(BrokerError::InvalidConfig { field, .. }) => assert_eq!(field, "tls_key"),
        other => panic!("expected an invalid configuration, got {other:?}"),
    }
}
