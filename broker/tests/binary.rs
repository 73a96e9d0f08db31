//! The `broker` binary as an operator runs it: configuration errors, the default file, the
//! credentials subcommands, `/metrics`, and a graceful stop on SIGTERM and SIGINT.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_broker");

/// Bounds every wait on the process.
const T: Duration = Duration::from_secs(30);

/// The `broker` command, with its journal in `dir` (a test's temporary directory).
fn broker(dir: &tempfile::TempDir) -> Command {
    let mut cmd = Command::new(BIN);
    // Only what each test sets: no FLEETBEAT_BROKER_* from the caller's environment.
    for (key, _) in std::env::vars() {
        if key.starts_with("FLEETBEAT_BROKER_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "info");
    // A journal of its own, not `fleetbeat-broker-journal.db` in the source tree.
    cmd.env("FLEETBEAT_BROKER_JOURNAL", dir.path().join("journal.db"));
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the broker binary starts");
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > T {
            child.kill().ok();
            panic!("the broker did not exit within {T:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two different free loopback ports, below the kernel's ephemeral range
/// (`testengines::port`). Two ports taken from port 0 one after the other can be the same
/// one: the first is released before the second is bound (the broker then refused the
/// configuration, `metrics_listen` equal to the MQTT listener, once in CI).
fn two_free_ports() -> (u16, u16) {
    let first = testengines::port::free_port().unwrap();
    loop {
        let second = testengines::port::free_port().unwrap();
        if second != first {
            return (first, second);
        }
    }
}

/// A fresh temporary directory (removed when dropped).
fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fleetbeat-broker-bin-")
        .tempdir()
        .unwrap()
}

#[test]
fn default_config_prints_the_commented_defaults() {
    let dir = temp_dir();
    let out = run(broker(&dir).arg("default-config"));
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, broker::config::DEFAULT_CONFIG_TOML);
    assert!(text.contains("listen = \"127.0.0.1:1883\""));
    assert!(text.contains("# credentials = "));
}

#[test]
fn invalid_configuration_is_refused_naming_the_key() {
    let dir = temp_dir();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "max_segment_size = 100\n").unwrap();
    let out = run(broker(&dir).arg("--config").arg(&file));
    std::fs::remove_file(&file).ok();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_segment_size"), "{stderr}");

    let out = run(broker(&dir).env("FLEETBEAT_BROKER_MAX_CONNECTIONS", "lots"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("max_connections") && stderr.contains("FLEETBEAT_BROKER_MAX_CONNECTIONS"),
        "{stderr}"
    );

    let out = run(broker(&dir).args(["--listen-v5", "somewhere"]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listen_v5") && stderr.contains("command line"),
        "{stderr}"
    );
}

#[test]
fn add_device_and_add_client_write_the_credentials_file() {
    let dir = temp_dir();
    let file = dir.path().join("creds.toml");
    let out = run(broker(&dir)
        .args([
            "add-device",
            "van-0001",
            "--fleet",
            "north",
            "--credentials",
        ])
        .arg(&file));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
    };
    let password = field("password:");
    let key = field("key:");
    assert_eq!(password.len(), 32);
    assert_eq!(key.len(), 64);

    let out = run(broker(&dir)
        .args(["add-client", "bridge", "--role", "bridge", "--credentials"])
        .arg(&file));
    assert!(out.status.success());

    let creds = broker::Credentials::load(&file).unwrap();
    let device = creds.device("van-0001").unwrap();
    assert_eq!(device.key_hex(), key);
    assert_eq!(device.fleet().as_str(), "north");
    assert_eq!(field("fleet:"), "north");
    assert!(!std::fs::read_to_string(&file).unwrap().contains(&password));
    assert_eq!(creds.client("bridge").unwrap().role(), broker::Role::Bridge);

    // An invalid vehicle id is refused, the file is left alone.
    let out = run(broker(&dir)
        .args(["add-device", "bad/id", "--fleet", "north", "--credentials"])
        .arg(&file));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("vehicle id"));
    // Without a file to write to, it says how to name one.
    let out = run(broker(&dir).args(["add-device", "van-0002", "--fleet", "north"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--credentials"));
    // The fleet is part of a device's credentials: without `--fleet`, nothing is written.
    let before = std::fs::read_to_string(&file).unwrap();
    let out = run(broker(&dir)
        .args(["add-device", "van-0003", "--credentials"])
        .arg(&file));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fleet"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), before);
    std::fs::remove_file(&file).ok();
}

/// A running broker process with its ports.
struct Running {
    child: Child,
    /// Holds the journal; removed after the process (declared after `child`).
    _dir: tempfile::TempDir,
    mqtt: SocketAddr,
    metrics: SocketAddr,
    log: std::sync::mpsc::Receiver<String>,
}

impl Running {
    fn start() -> Running {
        let (mqtt, metrics) = two_free_ports();
        let mqtt = SocketAddr::from(([127, 0, 0, 1], mqtt));
        let metrics = SocketAddr::from(([127, 0, 0, 1], metrics));
        let dir = temp_dir();
        let mut child = broker(&dir)
            .args(["--listen", &mqtt.to_string(), "--listen-v5", "off"])
            .args([
                "--metrics-listen",
                &metrics.to_string(),
                "--shutdown-grace",
                "5s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let running = Running {
            child,
            _dir: dir,
            mqtt,
            metrics,
            log,
        };
        running.wait_for_log("broker ready");
        running
    }

    fn wait_for_log(&self, needle: &str) -> Vec<String> {
        let deadline = Instant::now() + T;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Ok(line) = self.log.recv_timeout(Duration::from_millis(100)) {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen;
                }
            }
        }
        panic!("no log line with {needle:?} in {seen:#?}");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait(mut self) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(started.elapsed() < T, "the broker did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(T)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// CONNECT (3.1.1, clean session, keep-alive 30 s) with `client_id`.
fn connect(client_id: &str) -> Vec<u8> {
    shared::frame::Connect {
        client_id,
        keep_alive: 30,
        ..Default::default()
    }
    .bytes()
}

#[test]
fn serves_metrics_and_stops_gracefully_on_sigterm() {
    let running = Running::start();
    let metrics = http_get(running.metrics, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("fleetbeat_broker_open_mode 1"),
        "{metrics}"
    );
    assert!(metrics.contains("fleetbeat_broker_listener_up{listener=\"v4\"} 1"));

    // A connected client, mid-session.
    let mut client = TcpStream::connect(running.mqtt).unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    client.write_all(&connect("c1")).unwrap();
    let mut connack = [0u8; 4];
    client.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);

    running.signal("TERM");
    let log = running.wait_for_log("broker stopped");
    assert!(log.iter().any(|l| l.contains("SIGTERM")), "{log:#?}");
    // The client is closed, not left hanging.
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let mqtt = running.mqtt;
    let (status, _) = running.wait();
    assert!(status.success(), "exit status {status}");
    assert!(
        TcpStream::connect(mqtt).is_err(),
        "nothing listens any more"
    );
}

#[test]
fn stops_on_sigint_too() {
    let running = Running::start();
    running.signal("INT");
    let (status, took) = running.wait();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
}
