//! A child process whose stderr is collected and searchable, killed when dropped.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

/// A running program under test.
pub struct Program {
    name: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    new_line: Arc<Notify>,
    /// The tasks reading its stderr and stdout: done at their end of file.
    readers: Vec<tokio::task::JoinHandle<()>>,
    /// Temporary directories the program uses: removed when it is dropped (after the kill).
    keep: Vec<tempfile::TempDir>,
}

/// How long an exited program's last lines may take to be read (a child it left behind may
/// hold its pipes open: then what was read by then is its log).
const LAST_LINES_WAIT: Duration = Duration::from_secs(5);

impl Program {
    /// Spawns `cmd`, capturing stderr (where our programs log) and stdout, line by line.
    ///
    /// # Errors
    /// If the program cannot be started.
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let new_line = Arc::new(Notify::new());
        let echo = std::env::var_os("FLEETBEAT_TEST_ECHO").is_some();
        let streams: [Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>; 2] = [
            child.stderr.take().map(|s| Box::new(s) as _),
            child.stdout.take().map(|s| Box::new(s) as _),
        ];
        let mut readers = Vec::new();
        for stream in streams.into_iter().flatten() {
            let log = Arc::clone(&log);
            let new_line = Arc::clone(&new_line);
            let name = name.to_owned();
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if echo {
                        eprintln!("[{name}] {line}");
                    }
                    log.lock().map(|mut l| l.push(line)).ok();
                    new_line.notify_waiters();
                }
            }));
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
            new_line,
            readers,
            keep: Vec::new(),
        })
    }

    /// Hands `dir` to the program: it is removed when the program is dropped.
    pub fn keep(&mut self, dir: tempfile::TempDir) {
        self.keep.push(dir);
    }

    /// Waits until a log line contains `needle` and returns that line.
    ///
    /// # Errors
    /// If no such line appears within `timeout`, or the program exits first.
    pub async fn wait_for_line(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let new_line = Arc::clone(&self.new_line);
        loop {
            let notified = new_line.notified();
            if let Some(line) = self.find_line(needle) {
                return Ok(line);
            }
            if let Some(status) = self.child.try_wait()? {
                // Its last lines may still be on their way.
                self.read_last_lines().await;
                if let Some(line) = self.find_line(needle) {
                    return Ok(line);
                }
                bail!(
                    "{} exited ({status}) before logging {needle:?}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
        }
    }

    /// The first log line containing `needle`, if any.
    pub fn find_line(&self, needle: &str) -> Option<String> {
        self.log
            .lock()
            .ok()?
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
    }

    /// Everything logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` (`TERM`, `STOP`, `CONT`, ...) with `kill`, without waiting for anything.
    ///
    /// # Errors
    /// If the process has exited or `kill` fails.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} has exited", self.name))?;
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{signal} {pid} ({}) failed", self.name);
        }
        Ok(())
    }

    /// Sends SIGTERM and waits for the exit status.
    ///
    /// # Errors
    /// If it does not exit within `timeout`.
    pub async fn terminate(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .context("running kill")?;
        }
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit within {timeout:?} of SIGTERM", self.name))?
            .context("waiting for exit")?;
        self.read_last_lines().await;
        Ok(status)
    }

    /// Waits (bounded, [`LAST_LINES_WAIT`]) until the readers of an exited program's output
    /// reach its end, so its log holds every line it wrote.
    async fn read_last_lines(&mut self) {
        let readers = std::mem::take(&mut self.readers);
        let all = async {
            for reader in readers {
                // A reader that panicked has nothing more to give.
                let _ = reader.await;
            }
        };
        if tokio::time::timeout(LAST_LINES_WAIT, all).await.is_err() {
            eprintln!("[{}] its output is still open after its exit", self.name);
        }
    }

    /// Waits for the process to exit by itself and returns its status.
    ///
    /// # Errors
    /// If it does not exit within `timeout`.
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| {
                format!(
                    "{} did not exit within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log_text()
                )
            })?
            .context("waiting for exit")?;
        self.read_last_lines().await;
        Ok(status)
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    ///
    /// # Errors
    /// If it cannot be killed.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await.context("killing")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Extracts the value of `key=` from a tracing log line (`key=value` up to the next space).
pub fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[start..];
    let value = rest.split_whitespace().next()?;
    Some(value.trim_matches('"').to_owned())
}
