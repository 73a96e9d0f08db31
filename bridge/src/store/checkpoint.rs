//! The SQLite store's checkpoints, off the commit path.
//!
//! In WAL mode a commit appends pages to the log; a checkpoint copies them into the database
//! file and syncs it, so the log can start over. By default SQLite checkpoints in the commit
//! that takes the log past 1 000 pages, on the one write connection every write waits for:
//! under a stream of delivery events that was about every eighth commit, each time a few
//! hundred page writes and an fsync of the database file (≈5 ms) that the events of the next
//! groups waited through.
//!
//! So a task of its own, on a connection of its own, runs a `PASSIVE` checkpoint every
//! [`EVERY`]: it copies what is committed while the writer goes on writing (it never blocks
//! the writer, nor waits for it). The write connection still checkpoints itself past
//! [`WRITER_PAGES`]: a backstop that bounds the log if this task falls behind or fails (a
//! checkpoint that readers keep from finishing, say), and that finds little left to copy
//! when the task keeps up. A checkpoint that fails is logged (once, then again when it
//! works), never fatal: the log only grows until the backstop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::pool::DbPool;

/// How often the checkpoint task copies the committed log into the database file.
pub(crate) const EVERY: Duration = Duration::from_millis(100);

/// Log pages past which the write connection checkpoints itself (`wal_autocheckpoint`): the
/// backstop, 8× SQLite's default (≈32 MiB of log with 4 KiB pages).
pub(crate) const WRITER_PAGES: u32 = 8_000;

/// The checkpoint task of one store: stopped by [`Checkpoints::stop`].
#[derive(Debug)]
pub(super) struct Checkpoints {
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
    done: Arc<AtomicU64>,
}

impl Checkpoints {
    /// Starts the task on `pool`, a connection of its own to the database (closed when the
    /// task ends).
    pub(super) fn start(pool: DbPool) -> Self {
        let cancel = CancellationToken::new();
        let done = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(pool, cancel.clone(), Arc::clone(&done)));
        Self {
            cancel,
            task: Mutex::new(Some(task)),
            done,
        }
    }

    /// Checkpoints that copied pages so far (one that found the log already copied is not
    /// counted).
    pub(super) fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Stops the task (after the checkpoint under way, if any) and closes its connection.
    pub(super) async fn stop(&self) {
        self.cancel.cancel();
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            // An error: its runtime ended, or it panicked (logged by Tokio).
            let _ = task.await;
        }
    }
}

impl Drop for Checkpoints {
    /// The last handle of the store went away without `Store::close`: the task ends too.
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Checkpoints every [`EVERY`] until `cancel` fires.
async fn run(pool: DbPool, cancel: CancellationToken, done: Arc<AtomicU64>) {
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    // What the last checkpoint reported: its columns count the log as it stands (since the
    // writer last started it over), not what one call copied.
    let mut last = (0, 0);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = every.tick() => {}
        }
        // (busy, pages in the log, pages of it in the database file)
        let outcome: Result<(i64, i64, i64), sqlx::Error> =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&pool)
                .await;
        match outcome {
            Ok((_, log, copied)) => {
                if copied > 0 && (log, copied) != last {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                last = (log, copied);
                if failing {
                    failing = false;
                    info!("the store's checkpoints work again");
                }
                debug!(log, copied, "checkpoint");
            }
            Err(err) if !failing => {
                failing = true;
                warn!(cause = %err, "the store's checkpoint failed: the write connection checkpoints past its backstop until one works");
            }
            Err(err) => debug!(cause = %err, "the store's checkpoint failed again"),
        }
    }
    pool.close().await;
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use shared::{FleetId, VehicleId};

    use super::super::{HeartbeatRow, Store, StoreOptions};
    use super::*;

    fn rows(n: u32) -> Vec<HeartbeatRow> {
        let fleet: FleetId = "demo".parse().expect("fleet id");
        (0..n)
            .map(|i| HeartbeatRow {
                vehicle: format!("v-{}", i % 100).parse::<VehicleId>().expect("id"),
                fleet: fleet.clone(),
                seq: i,
                ts_ms: 1_000 + u64::from(i),
                lat_e7: 525_000_000,
                lon_e7: 134_000_000,
                speed_cm_s: 100,
                heading_deg: 90,
                battery_pct: 80,
                flags: 0,
                received_ms: 1_000 + u64::from(i),
            })
            .collect()
    }

    /// A store on `store.db` in a new temporary directory (kept while the directory is).
    async fn temp_store() -> (tempfile::TempDir, String, Store) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let target = dir.path().join("store.db");
        let target = target.to_str().expect("a UTF-8 path").to_owned();
        let store = Store::open(&target, StoreOptions::default())
            .await
            .expect("opens");
        (dir, target, store)
    }

    /// Commits well under the write connection's backstop still reach the database file,
    /// through the checkpoint task alone: the file grows, the task counts its checkpoints
    /// (and none once there is nothing more to copy), and the rows are read back after the
    /// store is opened again.
    #[tokio::test]
    async fn the_task_copies_the_log_into_the_database_file() {
        let (dir, target, store) = temp_store().await;
        let path = dir.path().join("store.db");
        let size = || std::fs::metadata(&path).map_or(0, |m| m.len());
        let before = size();
        for _ in 0..10 {
            store.record_heartbeats(&rows(1_000)).await.expect("writes");
        }
        let wal = std::fs::metadata(dir.path().join("store.db-wal")).map_or(0, |m| m.len());
        assert!(
            wal < u64::from(WRITER_PAGES) * 4096,
            "the test stays under the backstop ({wal} B of log)"
        );
        // The heartbeats take more than 100 pages (the migrations' own are fewer).
        let grown = before + 100 * 4096;
        let deadline = Instant::now() + Duration::from_secs(10);
        while (store.checkpoints() == 0 || size() <= grown) && Instant::now() < deadline {
            tokio::time::sleep(EVERY).await;
        }
        assert!(store.checkpoints() > 0, "no checkpoint counted");
        // Nothing written since: the log is copied, later checkpoints copy nothing and are
        // not counted (an absence, so a bounded look: three of the task's periods more).
        let mut counted = store.checkpoints();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            tokio::time::sleep(EVERY * 3).await;
            let now = store.checkpoints();
            if now == counted || Instant::now() >= deadline {
                break;
            }
            counted = now;
        }
        tokio::time::sleep(EVERY * 3).await;
        assert_eq!(
            store.checkpoints(),
            counted,
            "an idle store counts no checkpoints"
        );
        assert!(
            size() > grown,
            "the database file did not grow: {} B, {before} B before",
            size()
        );
        store.close().await;
        let again = Store::open(&target, StoreOptions::default())
            .await
            .expect("opens again");
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM heartbeats")
            .fetch_one(&again.read)
            .await
            .expect("counts");
        assert_eq!(count, 10_000);
        again.close().await;
    }

    /// Closing the store stops the task (its handle is taken and awaited), and dropping the
    /// last handle of a store without `close` cancels it.
    #[tokio::test]
    async fn closing_or_dropping_the_store_stops_the_task() {
        let (_dir, target, store) = temp_store().await;
        let checkpoints = store
            .checkpoints
            .clone()
            .expect("a file store has the task");
        store.close().await;
        assert!(checkpoints.task.lock().expect("lock").is_none(), "stopped");

        let store = Store::open(&target, StoreOptions::default())
            .await
            .expect("opens again");
        let checkpoints = Arc::downgrade(store.checkpoints.as_ref().expect("the task"));
        let cancel = checkpoints.upgrade().expect("alive").cancel.clone();
        drop(store);
        assert!(checkpoints.upgrade().is_none(), "the last handle is gone");
        assert!(cancel.is_cancelled(), "dropping the store cancels the task");
    }
}
