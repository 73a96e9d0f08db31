//! A PostgreSQL server for tests: [`TempPostgres`].
//!
//! [`TempPostgres::start`] runs `initdb` in a fresh temporary directory, starts the server with
//! `pg_ctl` on a free loopback port (Unix socket in the same directory, `fsync=off`: a test
//! database need not survive a power loss, and the tests run much faster without it), and
//! stops it and removes the directory when the handle is dropped. When the tests run as root
//! (as in CI), the server runs as the `postgres` user (`runuser -u postgres --`), because
//! PostgreSQL refuses to run as root.
//!
//! [`TempPostgres::shared`] is one server for a whole test binary, started on first use; a
//! watchdog process stops it when the test process ends, since statics are never dropped.
//! Each test then takes a database of its own ([`TempPostgres::create_database`]).
//!
//! The binaries come from the `PATH` or from Debian's `/usr/lib/postgresql/<version>/bin`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use tempfile::TempDir;
use thiserror::Error;
use tracing::{debug, warn};

/// Why a PostgreSQL server for tests could not be started or used.
#[derive(Debug, Error)]
pub enum Error {
    /// `initdb`, `pg_ctl` or `psql` was found neither on the `PATH` nor in
    /// `/usr/lib/postgresql/*/bin`.
    #[error(
        "PostgreSQL's {0} was not found on the PATH nor in /usr/lib/postgresql/*/bin: \
         install postgresql: apt-get install -y postgresql"
    )]
    Missing(&'static str),
    /// A file system operation on the server's directory failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A command ran but failed.
    #[error("{command} failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        output: String,
    },
    /// A database name other than `[a-z0-9_]+` (it is not quoted for SQL).
    #[error("invalid database name {0:?}: use lowercase letters, digits and _")]
    InvalidName(String),
}

impl Error {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// A running PostgreSQL server in a temporary directory, stopped (`pg_ctl stop -m immediate`)
/// and removed when dropped.
#[derive(Debug)]
pub struct TempPostgres {
    bin: PathBuf,
    as_postgres: bool,
    fsync: bool,
    port: u16,
    data: PathBuf,
    /// Holds the directory; removed on drop, after the server is stopped.
    dir: TempDir,
}

/// How often `start` tries another port if the one it picked was taken meanwhile.
const START_ATTEMPTS: u32 = 3;

impl TempPostgres {
    /// Starts a new server: `initdb -A trust -U postgres --no-sync`, then `pg_ctl start` on a
    /// free loopback port with `fsync=off`.
    ///
    /// # Errors
    /// [`Error::Missing`] if PostgreSQL is not installed, [`Error::Io`] or
    /// [`Error::Command`] if the directory cannot be prepared or the server does not start.
    pub fn start() -> Result<Self, Error> {
        Self::start_with_fsync(false)
    }

    /// [`TempPostgres::start`], with `fsync` as given: `true` for benchmarks that measure
    /// what a commit costs on this disk.
    ///
    /// # Errors
    /// As [`TempPostgres::start`].
    pub fn start_with_fsync(fsync: bool) -> Result<Self, Error> {
        let bin = bin_dir()?;
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("fleetbeat-pg-")
            .tempdir()
            .map_err(Error::io("cannot create a temporary directory"))?;
        if as_postgres {
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path()))?;
        }
        let data = dir.path().join("data");
        let mut server = Self {
            bin,
            as_postgres,
            fsync,
            port: 0,
            data,
            dir,
        };
        run(server
            .command("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .arg("-D")
            .arg(&server.data))?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            let options = server.server_options(port);
            let started = run(server
                .command("pg_ctl")
                .arg("start")
                .args(["-w", "-t", "60", "-D"])
                .arg(&server.data)
                .arg("-l")
                .arg(server.dir.path().join("server.log"))
                .args(["-o", &options]));
            match started {
                Ok(_) => {
                    server.port = port;
                    debug!(port, dir = %server.dir.path().display(), "PostgreSQL started");
                    return Ok(server);
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or(Error::Missing("pg_ctl")))
    }

    /// One server for the whole test binary, started on first use and stopped by a watchdog
    /// when the process ends.
    ///
    /// # Panics
    /// If the server cannot be started (the message says why, e.g. PostgreSQL is not
    /// installed); see [`TempPostgres::try_shared`] to handle that instead.
    #[allow(clippy::panic)]
    pub fn shared() -> &'static Self {
        match Self::try_shared() {
            Ok(server) => server,
            Err(err) => panic!("cannot start the shared PostgreSQL server for tests: {err}"),
        }
    }

    /// [`TempPostgres::shared`], returning the error instead of panicking (the same one on
    /// every call).
    ///
    /// # Errors
    /// As [`TempPostgres::start`].
    pub fn try_shared() -> Result<&'static Self, &'static Error> {
        static SHARED: OnceLock<Result<TempPostgres, Error>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let server = Self::start()?;
                server.watch(std::process::id())?;
                Ok(server)
            })
            .as_ref()
    }

    /// The superuser's URL of the default database: `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of database `name` on this server.
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates the empty database `name` (`[a-z0-9_]+`) and returns its URL.
    ///
    /// # Errors
    /// [`Error::InvalidName`], or [`Error::Command`] if `psql` fails (e.g. it exists).
    pub fn create_database(&self, name: &str) -> Result<String, Error> {
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(Error::InvalidName(name.to_owned()));
        }
        self.psql(&format!("CREATE DATABASE {name}"))?;
        Ok(self.database_url(name))
    }

    /// Runs `sql` with `psql` as the superuser on the default database; returns what it
    /// printed (unaligned, tuples only).
    ///
    /// # Errors
    /// [`Error::Command`] if `psql` fails.
    pub fn psql(&self, sql: &str) -> Result<String, Error> {
        let psql = self.bin.join("psql");
        let psql = if psql.exists() {
            psql
        } else {
            find_on_path("psql").ok_or(Error::Missing("psql"))?
        };
        let out = run(Command::new(psql)
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-c", sql]))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`), as a crash would, leaving its
    /// directory; connections to it fail from then on. [`TempPostgres::restart`] starts it
    /// again on the same port.
    ///
    /// # Errors
    /// [`Error::Command`] if `pg_ctl` fails.
    pub fn stop(&self) -> Result<(), Error> {
        run(self
            .command("pg_ctl")
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(&self.data))
        .map(drop)
    }

    /// Starts the server again after [`TempPostgres::stop`], on the same port.
    ///
    /// # Errors
    /// [`Error::Command`] if `pg_ctl` fails (e.g. the port was taken meanwhile).
    pub fn restart(&self) -> Result<(), Error> {
        let options = self.server_options(self.port);
        run(self
            .command("pg_ctl")
            .arg("start")
            .args(["-w", "-t", "60", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-o", &options]))
        .map(drop)
    }

    /// The `postgres` options: port, socket directory, loopback only, `fsync`.
    fn server_options(&self, port: u16) -> String {
        let fsync = if self.fsync {
            ""
        } else {
            " -c fsync=off -c full_page_writes=off"
        };
        format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300{fsync}",
            self.dir.path().display()
        )
    }

    /// The directory holding the data directory, the socket and `server.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A command running PostgreSQL's `program`, as the `postgres` user when we are root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    /// Starts a detached shell that stops the server and removes its directory once process
    /// `parent` is gone.
    fn watch(&self, parent: u32) -> Result<(), Error> {
        use std::os::unix::process::CommandExt;

        let stop = if self.as_postgres {
            "runuser -u postgres -- \"$1/pg_ctl\""
        } else {
            "\"$1/pg_ctl\""
        };
        let script = format!(
            "while kill -0 \"$0\" 2>/dev/null; do sleep 1; done; \
             {stop} stop -m immediate -D \"$2\" >/dev/null 2>&1; rm -rf \"$3\""
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(parent.to_string())
            .arg(&self.bin)
            .arg(&self.data)
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(Error::io("cannot start the PostgreSQL watchdog"))?;
        Ok(())
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        if self.port == 0 {
            return;
        }
        if let Err(err) = self.stop() {
            warn!(cause = %err, "cannot stop the test PostgreSQL server");
        }
    }
}

/// Whether this process runs as root (`id -u` says 0).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.trim_ascii() == b"0")
}

/// The directory with `initdb` and `pg_ctl`: on the `PATH` (symlinks resolved, so that
/// `psql` and `postgres` are found beside them), or the newest `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> Result<PathBuf, Error> {
    if let Some(initdb) = find_on_path("initdb") {
        let resolved = std::fs::canonicalize(&initdb).unwrap_or(initdb);
        if let Some(dir) = resolved.parent()
            && dir.join("pg_ctl").exists()
        {
            return Ok(dir.to_owned());
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) if bin.join("pg_ctl").exists() => Ok(bin),
        Some(_) => Err(Error::Missing("pg_ctl")),
        None => Err(Error::Missing("initdb")),
    }
}

/// `program` in a directory of the `PATH`.
fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16, Error> {
    crate::port::free_port().map_err(Error::io("cannot bind a loopback port"))
}

/// Runs `command` to completion; its output, or an [`Error::Command`] saying what it printed.
fn run(command: &mut Command) -> Result<Output, Error> {
    let line = format!("{command:?}");
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::Command {
                command: line.clone(),
                status: "not found".into(),
                output: "install postgresql: apt-get install -y postgresql".into(),
            },
            _ => Error::Io {
                what: format!("cannot run {line}"),
                source,
            },
        })?;
    if out.status.success() {
        return Ok(out);
    }
    Err(Error::Command {
        command: line,
        status: out.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_serves_and_stops() {
        let server = TempPostgres::start().expect("starts");
        let url = server.create_database("fleetbeat_t1").expect("creates");
        assert_eq!(
            url,
            format!(
                "postgres://postgres@127.0.0.1:{}/fleetbeat_t1",
                server.port()
            )
        );
        let out = server
            .psql("SELECT datname FROM pg_database WHERE datname = 'fleetbeat_t1'")
            .expect("queries");
        assert_eq!(out.trim(), "fleetbeat_t1");
        assert!(matches!(
            server.create_database("Bad-Name"),
            Err(Error::InvalidName(_))
        ));
        let dir = server.dir().to_owned();
        let port = server.port();
        drop(server);
        assert!(!dir.exists(), "directory removed");
        assert!(
            std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)).is_err(),
            "server stopped"
        );
    }

    #[test]
    fn shared_is_one_server() {
        let a = TempPostgres::shared();
        let b = TempPostgres::shared();
        assert_eq!(a.port(), b.port());
        assert_eq!(a.psql("SELECT 1").expect("queries").trim(), "1");
    }
}
