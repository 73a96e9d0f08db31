//! A real `socket.io-client` (npm) under node, driven over stdin/stdout by
//! `tests/node/sio-client.mjs`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::WAIT;

static NODE_READY: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The `tests/node` folder, with its npm packages (socket.io-client, playwright-core)
/// installed.
///
/// # Errors
/// If `npm ci` fails.
pub fn node_dir() -> anyhow::Result<PathBuf> {
    NODE_READY
        .get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node");
            if !dir.join("node_modules/socket.io-client").exists()
                || !dir.join("node_modules/playwright-core").exists()
            {
                let status = std::process::Command::new("npm")
                    .args(["ci", "--no-audit", "--no-fund", "--silent"])
                    .current_dir(&dir)
                    .status()
                    .map_err(|e| format!("running npm ci: {e}"))?;
                if !status.success() {
                    return Err(format!("npm ci failed: {status}"));
                }
            }
            Ok(dir)
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// One Socket.IO client connection to one namespace.
pub struct SioClient {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<Value>,
    /// Messages read but not yet asked for, oldest first.
    backlog: VecDeque<Value>,
    next_ack: u64,
}

impl SioClient {
    /// Starts a client for `namespace` at `url` (e.g. `http://127.0.0.1:PORT`) with the
    /// handshake `auth` object, without waiting for the outcome.
    ///
    /// # Errors
    /// If node cannot be started.
    pub fn spawn(url: &str, namespace: &str, auth: Option<Value>) -> anyhow::Result<Self> {
        let dir = node_dir()?;
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("sio-client.mjs")).arg(url).arg(namespace);
        if let Some(auth) = auth {
            cmd.arg(auth.to_string());
        }
        let mut child = cmd
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting node (is node installed?)")?;
        let stdin = child.stdin.take().context("node stdin")?;
        let stdout = child.stdout.take().context("node stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("[sio-client] {line}"),
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            lines,
            backlog: VecDeque::new(),
            next_ack: 1,
        })
    }

    /// Starts a client and waits until it is connected.
    ///
    /// # Errors
    /// If the connection is refused or does not happen within the bound.
    pub async fn connect(url: &str, namespace: &str, auth: Option<Value>) -> anyhow::Result<Self> {
        let mut client = Self::spawn(url, namespace, auth)?;
        let outcome = client
            .next_matching(WAIT, |v| {
                matches!(v["type"].as_str(), Some("connect" | "connect_error"))
            })
            .await?;
        if outcome["type"] == "connect_error" {
            bail!("connection to {namespace} refused: {}", outcome["message"]);
        }
        Ok(client)
    }

    async fn send(&mut self, command: Value) -> anyhow::Result<()> {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .context("writing to the node client")
    }

    /// Emits `event` with `args` (a JSON array of arguments) and no ack.
    ///
    /// # Errors
    /// If the client is gone.
    pub async fn emit(&mut self, event: &str, args: Value) -> anyhow::Result<()> {
        self.send(json!({ "op": "emit", "event": event, "args": args }))
            .await
    }

    /// Emits `event` with `args` and waits for the server's ack; returns the ack's first
    /// argument.
    ///
    /// # Errors
    /// If the ack does not come within the bound.
    pub async fn emit_ack(&mut self, event: &str, args: Value) -> anyhow::Result<Value> {
        let id = self.next_ack;
        self.next_ack += 1;
        self.send(json!({ "op": "emit", "event": event, "args": args, "ack": id, "timeoutMs": WAIT.as_millis() as u64 }))
            .await?;
        let reply = self
            .next_matching(WAIT, |v| {
                matches!(v["type"].as_str(), Some("ack" | "ack_timeout")) && v["ack"] == id
            })
            .await?;
        if reply["type"] == "ack_timeout" {
            bail!("no ack for {event}");
        }
        Ok(reply["args"][0].clone())
    }

    /// Drops the connection (the client stays alive and can [`reconnect`](Self::reconnect)).
    ///
    /// # Errors
    /// If the client is gone.
    pub async fn disconnect(&mut self) -> anyhow::Result<()> {
        self.send(json!({ "op": "disconnect" })).await
    }

    /// Opens the connection again and waits for `connect`.
    ///
    /// # Errors
    /// If it does not reconnect within the bound.
    pub async fn reconnect(&mut self) -> anyhow::Result<()> {
        self.send(json!({ "op": "connect" })).await?;
        self.next_matching(WAIT, |v| v["type"] == "connect").await?;
        Ok(())
    }

    /// Starts a client with handshake `auth: {token}` and waits until it is connected.
    ///
    /// # Errors
    /// If the connection is refused or does not happen within the bound.
    pub async fn connect_with_token(
        url: &str,
        namespace: &str,
        token: &str,
    ) -> anyhow::Result<Self> {
        Self::connect(url, namespace, Some(json!({ "token": token }))).await
    }

    /// Starts a client expected to be refused, and returns the `connect_error` message.
    ///
    /// # Errors
    /// If it connects, or nothing happens within the bound.
    pub async fn refused(
        url: &str,
        namespace: &str,
        auth: Option<Value>,
    ) -> anyhow::Result<String> {
        let mut client = Self::spawn(url, namespace, auth)?;
        let outcome = client
            .next_matching(WAIT, |v| {
                matches!(v["type"].as_str(), Some("connect" | "connect_error"))
            })
            .await?;
        client.close().await;
        if outcome["type"] == "connect" {
            bail!("connection to {namespace} was accepted");
        }
        Ok(outcome["message"].as_str().unwrap_or_default().to_owned())
    }

    /// Waits for position batches until one holds a position satisfying `pred`; returns every
    /// position received meanwhile, in order.
    ///
    /// # Errors
    /// If no such position arrives within `timeout`.
    pub async fn positions_until(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let batch = self.next_event("position", left).await?;
            let batch = batch
                .as_array()
                .cloned()
                .context("a position batch is an array")?;
            let hit = batch.iter().any(&pred);
            seen.extend(batch);
            if hit {
                return Ok(seen);
            }
        }
    }

    /// Waits for the next server event named `event` and returns its first argument.
    /// Events of other names stay in the backlog.
    ///
    /// # Errors
    /// If none arrives within `timeout`.
    pub async fn next_event(&mut self, event: &str, timeout: Duration) -> anyhow::Result<Value> {
        let msg = self
            .next_matching(timeout, |v| v["type"] == "event" && v["event"] == event)
            .await?;
        Ok(msg["args"][0].clone())
    }

    /// Every `event` received so far that nobody asked for, removed from the backlog.
    pub fn drain_events(&mut self, event: &str) -> Vec<Value> {
        while let Ok(v) = self.lines.try_recv() {
            self.backlog.push_back(v);
        }
        let (matching, rest): (Vec<Value>, Vec<Value>) = self
            .backlog
            .drain(..)
            .partition(|v| v["type"] == "event" && v["event"] == event);
        self.backlog = rest.into();
        matching.into_iter().map(|v| v["args"][0].clone()).collect()
    }

    /// Waits for the next message (of any type) that satisfies `pred`.
    ///
    /// # Errors
    /// If none arrives within `timeout` or the client exits.
    pub async fn next_matching(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        while let Ok(v) = self.lines.try_recv() {
            self.backlog.push_back(v);
        }
        if let Some(pos) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(pos).context("backlog");
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(v)) if pred(&v) => return Ok(v),
                Ok(Some(v)) => self.backlog.push_back(v),
                Ok(None) => bail!("the node client exited; backlog: {:?}", self.backlog),
                Err(_) => bail!(
                    "nothing matching within {timeout:?}; last messages: {:?}",
                    self.backlog.iter().rev().take(5).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Closes the client.
    pub async fn close(mut self) {
        let _ = self.send(json!({ "op": "exit" })).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}
