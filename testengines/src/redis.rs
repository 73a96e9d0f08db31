//! A Redis server for tests: Debian's `redis-server` on a free loopback port, in a temporary
//! directory, with persistence off, killed when the handle is dropped.
//!
//! ```no_run
//! let redis = testengines::redis::TempRedis::start()?;
//! let url = redis.url(); // redis://127.0.0.1:PORT
//! # Ok::<(), testengines::redis::Error>(())
//! ```
//!
//! [`TempRedis::kill`] and [`TempRedis::restart`] stop and start the same server on the same port,
//! for tests of what a client does while Redis is away.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The program started; found on `PATH` (Debian installs it as `/usr/bin/redis-server`).
const PROGRAM: &str = "redis-server";

/// How long a freshly started server gets to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a test Redis server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `redis-server` is not installed.
    #[error("`redis-server` not found on PATH; install it with `apt-get install -y redis-server`")]
    NotInstalled,
    /// The temporary directory could not be created.
    #[error("cannot create a temporary directory for redis-server: {0}")]
    TempDir(#[source] io::Error),
    /// No free loopback port could be reserved.
    #[error("cannot find a free loopback port: {0}")]
    Port(#[source] io::Error),
    /// The process could not be spawned.
    #[error("cannot start redis-server: {0}")]
    Spawn(#[source] io::Error),
    /// The process exited before it answered `PING`.
    #[error("redis-server exited early ({status}); its log: {log}")]
    Exited {
        /// The exit status.
        status: std::process::ExitStatus,
        /// The server's log file, for the reason.
        log: String,
    },
    /// The process did not answer `PING` in time.
    #[error("redis-server on port {port} did not answer PING within {timeout:?}")]
    NotReady {
        /// The port it was started on.
        port: u16,
        /// How long we waited.
        timeout: Duration,
    },
}

/// A running `redis-server` owned by a test; killed (and its directory removed) on drop.
#[derive(Debug)]
pub struct TempRedis {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl TempRedis {
    /// Starts `redis-server` on a free loopback port in a new temporary directory and waits
    /// (bounded) until it answers `PING`.
    ///
    /// # Errors
    /// [`Error::NotInstalled`] when `redis-server` is missing; otherwise why it did not start.
    pub fn start() -> Result<Self, Error> {
        let dir = tempfile::Builder::new()
            .prefix("fleetbeat-redis-")
            .tempdir()
            .map_err(Error::TempDir)?;
        let port = free_port().map_err(Error::Port)?;
        let mut redis = Self {
            port,
            child: None,
            dir,
        };
        redis.spawn()?;
        Ok(redis)
    }

    /// `redis://127.0.0.1:PORT`, the URL clients connect to.
    #[must_use]
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The loopback port the server listens on (kept across [`TempRedis::restart`]).
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's working directory (holds `redis.log`).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether `key` (without spaces) exists on the server now.
    ///
    /// # Errors
    /// The server cannot be reached or gave an unexpected reply.
    pub fn exists(&self, key: &str) -> io::Result<bool> {
        let mut reply = [0_u8; 4];
        inline(
            self.port,
            &format!("EXISTS {key}"),
            &mut reply,
            Duration::from_secs(2),
        )?;
        match &reply {
            b":1\r\n" => Ok(true),
            b":0\r\n" => Ok(false),
            other => Err(unexpected("EXISTS", other)),
        }
    }

    /// Whether the server process is running (started and not killed).
    #[must_use]
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Kills the server (SIGKILL: no goodbye to clients, like a crash) and waits for it to exit.
    /// Its data is lost (persistence is off). Does nothing when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(err) = child.kill() {
                tracing::debug!(cause = %err, "redis-server already gone");
            }
            if let Err(err) = child.wait() {
                tracing::warn!(cause = %err, "cannot reap redis-server");
            }
        }
    }

    /// Kills the server if it runs, then starts a fresh, empty one on the same port and waits
    /// until it answers `PING`.
    ///
    /// # Errors
    /// Why the new server did not start (for example the port was taken meanwhile).
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        self.spawn()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn(&mut self) -> Result<(), Error> {
        let port = self.port.to_string();
        let mut command = Command::new(PROGRAM);
        command
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().map_err(|err| match err.kind() {
            io::ErrorKind::NotFound => Error::NotInstalled,
            _ => Error::Spawn(err),
        })?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                return Err(Error::Exited { status, log });
            }
            if ping(self.port).is_ok() {
                tracing::debug!(port = self.port, "redis-server ready");
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(Error::NotReady {
                    port: self.port,
                    timeout: READY_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TempRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free loopback port (see [`crate::port`]).
fn free_port() -> io::Result<u16> {
    crate::port::free_port()
}

/// Sends an inline `PING` and expects `+PONG`.
fn ping(port: u16) -> io::Result<()> {
    let mut reply = [0_u8; 7];
    inline(port, "PING", &mut reply, Duration::from_millis(500))?;
    if &reply == b"+PONG\r\n" {
        Ok(())
    } else {
        Err(unexpected("PING", &reply))
    }
}

/// Sends the inline command `line` to the server on `port` and reads exactly `reply.len()`
/// bytes of its reply, within `read_timeout`.
fn inline(port: u16, line: &str, reply: &mut [u8], read_timeout: Duration) -> io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(read_timeout))?;
    stream.write_all(format!("{line}\r\n").as_bytes())?;
    stream.read_exact(reply)
}

/// The error for an unexpected `reply` to `command`.
fn unexpected(command: &str, reply: &[u8]) -> io::Error {
    io::Error::other(format!(
        "unexpected reply to {command}: {:?}",
        String::from_utf8_lossy(reply)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(port: u16, line: &str) -> String {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        let mut buf = [0_u8; 128];
        let n = stream.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn starts_answers_and_stops_on_drop() {
        let mut redis = TempRedis::start().unwrap();
        let port = redis.port();
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
        assert!(redis.is_running());
        assert_eq!(command(port, "SET k v"), "+OK\r\n");
        assert_eq!(command(port, "GET k"), "$1\r\nv\r\n");
        assert!(redis.exists("k").unwrap());
        assert!(!redis.exists("other").unwrap());
        // Persistence is off: nothing is written to the directory.
        assert_eq!(
            command(port, "CONFIG GET appendonly"),
            "*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n"
        );
        drop(redis);
        assert!(ping(port).is_err(), "the server must be gone after drop");
    }

    #[test]
    fn kill_and_restart_on_the_same_port_with_empty_data() {
        let mut redis = TempRedis::start().unwrap();
        let port = redis.port();
        assert_eq!(command(port, "SET k v"), "+OK\r\n");
        redis.kill();
        assert!(!redis.is_running());
        assert!(ping(port).is_err(), "a killed server must not answer");
        redis.restart().unwrap();
        assert_eq!(redis.port(), port);
        assert!(redis.is_running());
        assert_eq!(command(port, "GET k"), "$-1\r\n");
    }

    #[test]
    fn two_servers_get_different_ports() {
        let a = TempRedis::start().unwrap();
        let b = TempRedis::start().unwrap();
        assert_ne!(a.port(), b.port());
        assert!(a.dir().join("redis.log").exists());
    }
}
