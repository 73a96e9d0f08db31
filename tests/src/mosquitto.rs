//! The real Debian `mosquitto_sub` and `mosquitto_pub` clients.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

use crate::WAIT;

/// Runs `mosquitto_sub` on `filter` until it has received `count` messages and returns their
/// topics, one per message.
///
/// # Errors
/// If it fails or does not receive `count` messages within the bound.
pub async fn sub_topics(
    broker: SocketAddr,
    filter: &str,
    count: u32,
) -> anyhow::Result<Vec<String>> {
    sub_formatted(broker, filter, count, "%t").await
}

async fn sub_formatted(
    broker: SocketAddr,
    filter: &str,
    count: u32,
    format: &str,
) -> anyhow::Result<Vec<String>> {
    let output = aimed(Command::new("mosquitto_sub"), broker)
        .args(["-t", filter, "-F", format, "-C", &count.to_string()])
        .args(["-W", &WAIT.as_secs().to_string()])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running mosquitto_sub (apt-get install mosquitto-clients)")?;
    if !output.status.success() {
        bail!(
            "mosquitto_sub failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// `cmd` with `-h HOST -p PORT` of `broker`.
fn aimed(mut cmd: Command, broker: SocketAddr) -> Command {
    cmd.args([
        "-h",
        &broker.ip().to_string(),
        "-p",
        &broker.port().to_string(),
    ]);
    cmd
}

/// Publishes `payload` on `topic` with `mosquitto_pub` at `qos`.
///
/// # Errors
/// If `mosquitto_pub` fails.
pub async fn publish(
    broker: SocketAddr,
    topic: &str,
    payload: &[u8],
    qos: u8,
) -> anyhow::Result<()> {
    let mut child = aimed(Command::new("mosquitto_pub"), broker)
        .args(["-t", topic, "-q", &qos.to_string(), "-s"])
        .stdin(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running mosquitto_pub (apt-get install mosquitto-clients)")?;
    let mut stdin = child.stdin.take().context("mosquitto_pub stdin")?;
    stdin.write_all(payload).await?;
    drop(stdin);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .context("mosquitto_pub timed out")??;
    if !status.success() {
        bail!("mosquitto_pub failed: {status}");
    }
    Ok(())
}

/// Runs `mosquitto_sub` on `filter` until `count` messages arrived and returns their raw
/// payloads (read with `-F %x`, so binary postcard payloads survive).
///
/// # Errors
/// If it fails or does not receive `count` messages within the bound.
pub async fn sub_payloads(
    broker: SocketAddr,
    filter: &str,
    count: u32,
) -> anyhow::Result<Vec<Vec<u8>>> {
    sub_formatted(broker, filter, count, "%x")
        .await?
        .iter()
        .map(|hex| unhex(hex))
        .collect()
}

/// `bytes` in lower-case hex, as `-F %x` prints a payload.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a payload printed with `-F %x`.
///
/// # Errors
/// If `text` is not hex.
pub fn unhex(text: &str) -> anyhow::Result<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .with_context(|| format!("bad hex from mosquitto_sub: {text}"))
        })
        .collect()
}

/// `tool` (`mosquitto_sub` or `mosquitto_pub`) aimed at `broker` (`-h`, `-p`), with stdin
/// closed and killed when dropped: add a recipe's own arguments, then [`finish`] it or
/// [`Watch::start`] it.
///
/// It runs under `stdbuf -oL`: writing to a pipe, the clients would otherwise hold their
/// output (e.g. `-d`'s "Subscribed" line) in a stdio buffer until it fills.
pub fn client(tool: &str, broker: SocketAddr) -> Command {
    let mut stdbuf = Command::new("stdbuf");
    stdbuf.args(["-oL", tool]);
    let mut cmd = aimed(stdbuf, broker);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// A [`Watch`] of `mosquitto_sub` with `args` against `broker`.
///
/// # Errors
/// If it cannot connect or subscribe within the bound.
pub async fn watch(broker: SocketAddr, args: &[&str]) -> anyhow::Result<Watch> {
    let mut cmd = client("mosquitto_sub", broker);
    cmd.args(args);
    Watch::start(cmd).await
}

/// A [`Watch`] of `mosquitto_sub` with `args` against `broker`, connected as `client_id` and
/// logged in as `user` with `password`.
///
/// # Errors
/// If it cannot connect or subscribe within the bound.
pub async fn watch_as(
    broker: SocketAddr,
    client_id: &str,
    (user, password): (&str, &str),
    args: &[&str],
) -> anyhow::Result<Watch> {
    let mut cmd = client("mosquitto_sub", broker);
    cmd.args(["-i", client_id, "-u", user, "-P", password]);
    cmd.args(args);
    Watch::start(cmd).await
}

/// How a client run ended, and what it printed.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status (`mosquitto_pub` exits with the CONNACK code of a refused login).
    pub status: std::process::ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error (where the clients say why they failed).
    pub stderr: String,
}

/// Runs a client (from [`client`]) to its end within the bound, writing `stdin` to it first
/// if given.
///
/// # Errors
/// If it cannot be run or does not end within the bound.
pub async fn finish(mut cmd: Command, stdin: Option<&[u8]>) -> anyhow::Result<Finished> {
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd
        .spawn()
        .context("running a mosquitto client (apt-get install mosquitto-clients)")?;
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().context("the client's stdin")?;
        tokio::time::timeout(WAIT, pipe.write_all(bytes))
            .await
            .context("writing to the client's stdin timed out")??;
    }
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .context("the mosquitto client did not finish in time")??;
    Ok(Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// A running `mosquitto_sub` whose messages are read line by line as they arrive.
pub struct Watch {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
    taken: usize,
}

impl Watch {
    /// Starts `cmd` (a `mosquitto_sub` from [`client`] with the recipe's arguments) with `-d`
    /// added, and returns once the broker has granted its subscriptions (its SUBACK).
    ///
    /// # Errors
    /// If it cannot connect or subscribe within the bound.
    pub async fn start(mut cmd: Command) -> anyhow::Result<Watch> {
        cmd.arg("-d");
        let mut child = cmd
            .spawn()
            .context("running mosquitto_sub (apt-get install mosquitto-clients)")?;
        let stdout = child.stdout.take().context("mosquitto_sub's stdout")?;
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt as _;
            let mut reader = tokio::io::BufReader::new(stdout);
            let mut line = Vec::new();
            // Bytes, not UTF-8 lines: a binary payload must not end the reader.
            while let Ok(n) = reader.read_until(b'\n', &mut line).await {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches('\n')
                    .to_owned();
                line.clear();
                if tx.send(text).is_err() {
                    break;
                }
            }
        });
        let mut watch = Watch {
            child,
            lines,
            seen: Vec::new(),
            taken: 0,
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, watch.lines.recv()).await {
                Ok(Some(line)) if line.starts_with("Subscribed (mid:") => {
                    if line.ends_with(": 128") || line.contains(" 128,") {
                        bail!("the broker refused the subscription: {line}");
                    }
                    return Ok(watch);
                }
                // A resumed session's messages may come before the SUBACK: they count.
                Ok(Some(line)) => watch.keep(line),
                Ok(None) => {
                    let stderr = watch.stderr().await;
                    bail!("mosquitto_sub ended before subscribing: {stderr}");
                }
                Err(_) => bail!("mosquitto_sub did not subscribe within {WAIT:?}"),
            }
        }
    }

    async fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            use tokio::io::AsyncReadExt as _;
            let _ = tokio::time::timeout(WAIT, stderr.read_to_string(&mut text)).await;
        }
        text
    }

    fn pull(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.keep(line);
        }
    }

    fn keep(&mut self, line: String) {
        // `-d` interleaves its own lines with the messages.
        if !(line.starts_with("Client ") || line.starts_with("Subscribed (mid:")) {
            self.seen.push(line);
        }
    }

    /// The next message line not yet returned that satisfies `pred`, waiting up to `timeout`.
    /// Lines skipped on the way stay in [`Self::seen`].
    ///
    /// # Errors
    /// If none arrives in time, or `mosquitto_sub` ends.
    pub async fn next_matching(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.pull();
            if let Some(found) = self.seen[self.taken..].iter().position(|l| pred(l)) {
                self.taken += found + 1;
                return Ok(self.seen[self.taken - 1].clone());
            }
            self.taken = self.seen.len();
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => self.keep(line),
                Ok(None) => {
                    let stderr = self.stderr().await;
                    bail!("mosquitto_sub ended: {stderr}; it printed: {:?}", self.seen);
                }
                Err(_) => bail!(
                    "no matching message within {timeout:?}; the last ones: {:?}",
                    self.seen.iter().rev().take(5).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// The next message line, waiting up to `timeout`.
    ///
    /// # Errors
    /// If none arrives in time, or `mosquitto_sub` ends.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<String> {
        self.next_matching(timeout, |_| true).await
    }

    /// Every message line printed so far (`topic payload` with `-v`), oldest first.
    pub fn seen(&mut self) -> &[String] {
        self.pull();
        &self.seen
    }

    /// Stops `mosquitto_sub`.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
    }
}

/// A running Debian `mosquitto` broker (the real one), started by [`start_broker`] or
/// [`start_tls_broker`].
pub struct MosquittoBroker {
    /// The process (its log is searchable).
    pub program: crate::process::Program,
    /// Its listener, on 127.0.0.1 (TLS for [`start_tls_broker`]'s).
    pub addr: SocketAddr,
}

/// Starts the real `mosquitto` with one plain MQTT listener on 127.0.0.1 (a free port),
/// anonymous clients allowed, and the configuration lines `extra` after it (a bridge, say);
/// its configuration file is written into `dir`. Returns once it listens.
///
/// # Errors
/// If it cannot be started or does not listen within the bound.
pub async fn start_broker(dir: &std::path::Path, extra: &str) -> anyhow::Result<MosquittoBroker> {
    start_configured(dir, &format!("allow_anonymous true\n{extra}")).await
}

/// Starts the real `mosquitto` with one MQTT-over-TLS listener on 127.0.0.1 (a free port),
/// serving `cert` and `key`, trusting clients' certificates of `ca` (none required), anonymous
/// clients allowed; its configuration file is written into `dir`. Returns once it listens.
///
/// # Errors
/// If it cannot be started or does not listen within the bound.
pub async fn start_tls_broker(
    dir: &std::path::Path,
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<MosquittoBroker> {
    let tls = format!(
        "cafile {ca}\ncertfile {cert}\nkeyfile {key}\nallow_anonymous true\n",
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    );
    start_configured(dir, &tls).await
}

/// Starts the real `mosquitto` with one listener on 127.0.0.1 (a free port) configured by
/// `listener` (the lines after its `listener` line); its configuration file is written into
/// `dir`. Returns once it listens.
async fn start_configured(
    dir: &std::path::Path,
    listener: &str,
) -> anyhow::Result<MosquittoBroker> {
    let addr = crate::stack::free_port()?;
    let config = dir.join("mosquitto.conf");
    let text = format!(
        "# Written by the Fleetbeat tests.\n\
         # Started as root, mosquitto would switch to its own user, who cannot read the test's\n\
         # files; not as root, this line does nothing.\n\
         user root\n\
         persistence false\n\
         log_dest stderr\n\
         log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
         listener {port} 127.0.0.1\n\
         {listener}",
        port = addr.port(),
    );
    std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    let mut cmd = Command::new("mosquitto");
    cmd.arg("-c").arg(&config);
    let mut program = crate::process::Program::spawn("mosquitto", cmd)
        .context("running mosquitto (apt-get install mosquitto)")?;
    program
        .wait_for_line(&format!("listen socket on port {}", addr.port()), WAIT)
        .await?;
    program.wait_for_line(" running", WAIT).await?;
    Ok(MosquittoBroker { program, addr })
}

/// `mosquitto_pub` over TLS to `broker` (`-h 127.0.0.1`, the certificate checked against it),
/// trusting `ca`: publishes `payload` on `topic` at QoS `qos` and returns how it ended.
///
/// # Errors
/// If it cannot be run or does not end within the bound.
pub async fn publish_tls(
    broker: SocketAddr,
    ca: &std::path::Path,
    topic: &str,
    payload: &[u8],
    qos: u8,
) -> anyhow::Result<Finished> {
    let mut cmd = client("mosquitto_pub", broker);
    // `-d`: its protocol trace on stdout, so a failure that prints nothing on stderr (one in
    // CI, 2026-12-05) shows how far it got.
    cmd.arg("--cafile")
        .arg(ca)
        .args(["-d", "-t", topic, "-q", &qos.to_string(), "-s"]);
    finish(cmd, Some(payload)).await
}
