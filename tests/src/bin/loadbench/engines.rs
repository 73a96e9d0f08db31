//! The engines of a Fleetbeat cluster run (`--bridges N`, `--cluster-engines`): a
//! redis-server and a PostgreSQL server (the `testengines` crate), their process ids, and the
//! counters read at both ends of the window: Redis commands (`INFO stats`, `INFO
//! commandstats`) and PostgreSQL writes (`pg_stat_database`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, bail};
use testengines::postgres::TempPostgres;
use testengines::redis::TempRedis;
use tokio::process::Command;

/// The database the bridges share.
pub const DATABASE: &str = "loadbench";

/// Redis and PostgreSQL of one run, stopped when dropped.
pub struct Engines {
    /// The Redis server (the socket.io adapter and the latest vehicle state).
    pub redis: TempRedis,
    /// The PostgreSQL server.
    pub postgres: TempPostgres,
    /// `postgres://…/loadbench`, the bridges' `--store`.
    pub store_url: String,
    /// redis-server's process id.
    pub redis_pid: u32,
    /// The postmaster's process id (its backends are its children).
    pub postgres_pid: u32,
}

/// The engines' counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct EngineCounters {
    /// Redis `total_commands_processed`.
    pub redis_commands: f64,
    /// Redis calls per command (`INFO commandstats`), e.g. `publish`.
    pub redis_by_command: BTreeMap<String, f64>,
    /// `pg_stat_database.xact_commit` of the bridges' database.
    pub pg_commits: f64,
    /// Rows inserted, updated and deleted in that database.
    pub pg_rows_written: f64,
    /// Of which inserted.
    pub pg_inserted: f64,
}

impl Engines {
    /// Starts redis-server and PostgreSQL (with a database [`DATABASE`]) on free loopback
    /// ports.
    ///
    /// # Errors
    /// If either does not start, or its process id cannot be read.
    pub async fn start() -> anyhow::Result<Self> {
        let (postgres, redis) = ::tests::cluster::start_engines().await?;
        let store_url = postgres
            .create_database(DATABASE)
            .context("creating the bridges' database")?;
        let info = redis_info(redis.port(), "server").await?;
        let redis_pid = info_field(&info, "process_id")
            .context("no process_id in redis INFO server")?
            .parse()
            .context("redis process_id")?;
        let postgres_pid = postmaster_pid(postgres.dir())?;
        Ok(Self {
            redis,
            postgres,
            store_url,
            redis_pid,
            postgres_pid,
        })
    }

    /// Reads the counters now.
    ///
    /// # Errors
    /// If `redis-cli` or `psql` fails.
    pub async fn counters(&self) -> anyhow::Result<EngineCounters> {
        let port = self.redis.port();
        let stats = redis_info(port, "stats").await?;
        let redis_commands = info_field(&stats, "total_commands_processed")
            .context("no total_commands_processed in redis INFO stats")?
            .parse()
            .context("total_commands_processed")?;
        let commandstats = redis_info(port, "commandstats").await?;
        let redis_by_command = commandstats
            .lines()
            .filter_map(|line| {
                // cmdstat_publish:calls=12,usec=...
                let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().ok()?))
            })
            .collect();
        let sql = format!(
            "SELECT xact_commit, tup_inserted, tup_inserted + tup_updated + tup_deleted \
             FROM pg_stat_database WHERE datname = '{DATABASE}'"
        );
        // A short blocking call (psql, once before and once after the window).
        let row = tokio::task::block_in_place(|| self.postgres.psql(&sql))
            .context("reading pg_stat_database with psql")?;
        let values: Vec<f64> = row
            .trim()
            .split('|')
            .map(|v| v.trim().parse().unwrap_or(0.0))
            .collect();
        let [pg_commits, pg_inserted, pg_rows_written] = values[..] else {
            bail!("unexpected pg_stat_database row {row:?}");
        };
        Ok(EngineCounters {
            redis_commands,
            redis_by_command,
            pg_commits,
            pg_rows_written,
            pg_inserted,
        })
    }
}

/// `redis-cli -p PORT INFO section`.
async fn redis_info(port: u16, section: &str) -> anyhow::Result<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "INFO", section])
        .output()
        .await
        .context("running redis-cli (apt-get install -y redis-tools)")?;
    if !out.status.success() {
        bail!(
            "redis-cli INFO {section}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `key:value` of a Redis INFO text.
fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// The postmaster's pid: the first line of `data/postmaster.pid` in the server's directory.
fn postmaster_pid(dir: &Path) -> anyhow::Result<u32> {
    let path = dir.join("data").join("postmaster.pid");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("no pid in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_info_fields() {
        let info = "# Stats\r\ntotal_connections_received:3\r\ntotal_commands_processed:42\r\n";
        assert_eq!(info_field(info, "total_commands_processed"), Some("42"));
        assert_eq!(info_field(info, "total_commands"), None);
    }
}
