//! A child process that speaks JSON lines: commands on its stdin, one JSON object per line on
//! its stdout. The node clients (`tests/node/*.mjs`) and `loadbench generate` are such peers.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio::time::error::Elapsed;

/// Stdout lines that are not JSON are echoed to stderr, cut to this many characters.
const ECHO_CHARS: usize = 200;

/// A running peer.
pub struct Peer {
    name: String,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<Value>,
}

impl Peer {
    /// Spawns `cmd` with piped stdin and stdout (stderr is inherited), killed on drop. `name`
    /// says what it is in messages.
    ///
    /// # Errors
    /// If it cannot be started.
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdin = child.stdin.take().context("the child's stdin")?;
        let stdout = child.stdout.take().context("the child's stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        let who = name.to_owned();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(_) => {
                        let end = line
                            .char_indices()
                            .nth(ECHO_CHARS)
                            .map_or(line.len(), |(i, _)| i);
                        eprintln!("[{who}] {}", &line[..end]);
                    }
                }
            }
        });
        Ok(Self {
            name: name.to_owned(),
            child,
            stdin,
            lines,
        })
    }

    /// Spawns `node SCRIPT ARGS...` from `dir` (where its npm packages are).
    ///
    /// # Errors
    /// If node cannot be started.
    pub fn node(
        name: &str,
        dir: &std::path::Path,
        script: &str,
        args: &[String],
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new("node");
        cmd.arg(dir.join(script)).args(args).current_dir(dir);
        Self::spawn(name, cmd).context("is node installed?")
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Writes one line (a newline is added) and flushes it.
    ///
    /// # Errors
    /// If the child's stdin is closed.
    pub async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .with_context(|| format!("writing to {}", self.name))?;
        self.stdin.flush().await.context("flushing")?;
        Ok(())
    }

    /// Writes `message` as one line.
    ///
    /// # Errors
    /// If the child's stdin is closed.
    pub async fn send_json(&mut self, message: &Value) -> anyhow::Result<()> {
        self.send(&message.to_string()).await
    }

    /// The next message, waiting until `deadline`: `Ok(None)` once the child has closed its
    /// stdout (it exited).
    ///
    /// # Errors
    /// [`Elapsed`] if nothing came by `deadline`.
    pub async fn next_until(&mut self, deadline: Instant) -> Result<Option<Value>, Elapsed> {
        tokio::time::timeout_at(deadline, self.lines.recv()).await
    }

    /// A message already received, if any, without waiting.
    pub fn try_next(&mut self) -> Option<Value> {
        self.lines.try_recv().ok()
    }

    /// Waits for the next message whose `type` is `kind`, dropping others; messages of type
    /// `error` are echoed to stderr.
    ///
    /// # Errors
    /// If the child exits or is silent for `timeout`.
    pub async fn expect(&mut self, kind: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let message = self
                .next_until(deadline)
                .await
                .with_context(|| format!("{} did not answer {kind:?} in {timeout:?}", self.name))?;
            let Some(message) = message else {
                bail!("{} exited before answering {kind:?}", self.name);
            };
            match message["type"].as_str() {
                Some(t) if t == kind => return Ok(message),
                Some("error") => {
                    let text = message["message"].as_str().unwrap_or("?");
                    eprintln!("[{}] {text}", self.name);
                }
                _ => {}
            }
        }
    }

    /// Waits for the process to exit (at most `timeout`), then kills it.
    pub async fn finish(mut self, timeout: Duration) {
        if tokio::time::timeout(timeout, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
