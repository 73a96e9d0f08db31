//! A real `socket.io-client` (npm) under node, driven over stdin/stdout by
//! `tests/node/sio-client.mjs`.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::WAIT;
use crate::node::node_dir;
use crate::peer::Peer;

/// The token of the demo dispatcher (a bridge without a configuration file).
pub const DISPATCH_TOKEN: &str = "dispatch-demo";

/// One Socket.IO client connection to one namespace.
pub struct SioClient {
    peer: Peer,
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
        let mut args = vec![url.to_owned(), namespace.to_owned()];
        args.extend(auth.map(|auth| auth.to_string()));
        Ok(Self {
            peer: Peer::node("sio-client", &node_dir()?, "sio-client.mjs", &args)?,
            backlog: VecDeque::new(),
            next_ack: 1,
        })
    }

    /// As [`Self::spawn`], for an `https://` `url` (WebSocket over TLS): the client trusts
    /// the CA certificate(s) of the PEM file `ca` and nothing else, and verifies the
    /// bridge's certificate.
    ///
    /// # Errors
    /// If node cannot be started.
    pub fn spawn_tls(
        url: &str,
        namespace: &str,
        auth: Option<Value>,
        ca: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let dir = node_dir()?;
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(dir.join("sio-client.mjs"))
            .arg(url)
            .arg(namespace)
            .args(auth.map(|auth| auth.to_string()))
            .current_dir(&dir)
            .env("FLEETBEAT_SIO_CA", ca);
        Ok(Self {
            peer: Peer::spawn("sio-client", cmd).context("is node installed?")?,
            backlog: VecDeque::new(),
            next_ack: 1,
        })
    }

    /// The demo dispatcher at the `https://` `url`, trusting `ca`: connected (`Ok(Ok)`), or
    /// refused with the `connect_error` message (`Ok(Err)`), e.g. a certificate the client
    /// does not trust.
    ///
    /// # Errors
    /// If nothing happens within the bound.
    pub async fn dispatcher_tls(
        url: &str,
        ca: &std::path::Path,
    ) -> anyhow::Result<Result<Self, String>> {
        let auth = json!({ "token": DISPATCH_TOKEN });
        let mut client = Self::spawn_tls(url, "/dispatch", Some(auth), ca)?;
        let outcome = client.handshake().await?;
        if outcome["type"] == "connect" {
            return Ok(Ok(client));
        }
        client.close().await;
        Ok(Err(outcome["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()))
    }

    /// Starts a client and waits until it is connected.
    ///
    /// # Errors
    /// If the connection is refused or does not happen within the bound.
    pub async fn connect(url: &str, namespace: &str, auth: Option<Value>) -> anyhow::Result<Self> {
        let mut client = Self::spawn(url, namespace, auth)?;
        let outcome = client.handshake().await?;
        if outcome["type"] == "connect_error" {
            bail!("connection to {namespace} refused: {}", outcome["message"]);
        }
        Ok(client)
    }

    /// A `/dispatch` client at `url` with the demo dispatcher's token, connected.
    ///
    /// # Errors
    /// If the connection is refused or does not happen within the bound.
    pub async fn dispatcher(url: &str) -> anyhow::Result<Self> {
        Self::connect_with_token(url, "/dispatch", DISPATCH_TOKEN).await
    }

    /// The outcome of the handshake: the `connect` or `connect_error` message.
    async fn handshake(&mut self) -> anyhow::Result<Value> {
        self.next_matching(WAIT, |v| {
            matches!(v["type"].as_str(), Some("connect" | "connect_error"))
        })
        .await
    }

    async fn send(&mut self, command: Value) -> anyhow::Result<()> {
        self.peer.send_json(&command).await
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
        let outcome = client.handshake().await?;
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

    /// Emits `join` for `room` and returns the server's ack.
    ///
    /// # Errors
    /// If the ack does not come within the bound.
    pub async fn join(&mut self, room: &str) -> anyhow::Result<Value> {
        self.emit_ack("join", json!([room])).await
    }

    /// Waits for positions until `count` distinct vehicles have reported, each batch within
    /// `timeout` and all within `timeout` + [`WAIT`]; returns their ids.
    ///
    /// # Errors
    /// If a batch does not arrive in time.
    pub async fn vehicles_seen(
        &mut self,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<BTreeSet<String>> {
        let mut seen = BTreeSet::new();
        // Batches may keep coming without the missing vehicles (parked ones do not move):
        // bounded in all, not only per batch.
        let deadline = tokio::time::Instant::now() + timeout + WAIT;
        while seen.len() < count {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} of {count} vehicles seen: {seen:?}",
                seen.len()
            );
            for p in self.positions_until(timeout, |_| true).await? {
                seen.insert(p["vehicle"].as_str().unwrap_or_default().to_owned());
            }
        }
        Ok(seen)
    }

    /// The demo dispatcher of the bridge at `url`, in `room` (the join acknowledged).
    ///
    /// # Errors
    /// If it cannot connect or join within the bound, or the join is refused.
    pub async fn dispatcher_in(url: &str, room: &str) -> anyhow::Result<Self> {
        let mut dispatcher = Self::dispatcher(url).await?;
        let ack = dispatcher.join(room).await?;
        anyhow::ensure!(ack == json!({ "ok": true }), "joining {room}: {ack}");
        Ok(dispatcher)
    }

    /// Moves what has arrived into the backlog.
    fn pull(&mut self) {
        while let Some(v) = self.peer.try_next() {
            self.backlog.push_back(v);
        }
    }

    /// Every `event` received so far that nobody asked for, removed from the backlog.
    pub fn drain_events(&mut self, event: &str) -> Vec<Value> {
        self.pull();
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
        self.pull();
        if let Some(pos) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(pos).context("backlog");
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.peer.next_until(deadline).await {
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
        self.peer.finish(Duration::from_secs(5)).await;
    }
}
