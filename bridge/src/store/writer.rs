//! [`HeartbeatWriter`]: a task that stores heartbeats in batches, so that the MQTT loop never
//! waits for the disk.
//!
//! The MQTT loop hands each heartbeat to a [`HeartbeatSender`], which never blocks: when the
//! bounded channel is full (the disk cannot keep up), the heartbeat is dropped and counted.
//! Heartbeats are QoS 0 history, so that is acceptable; delivery events never go this way.
//! While the store cannot write, each batch is tried once and, if it fails, dropped and
//! counted (`history_failed_total`): history is not buffered beyond the channel. Every batch
//! tells the store's health (`StoreHealth`) whether the store could write.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::database::Store;
use super::track::HeartbeatRow;
use crate::metrics::{Counter, Metrics};

/// A batch grows up to this many times `max_batch` when the writer is behind.
const CATCH_UP_BATCHES: usize = 2;

/// Heartbeats the batch buffer always has room for (≈ 0.5 MiB). A catch-up after a slow
/// commit can grow it to `max_batch * (1 + CATCH_UP_BATCHES)` rows (≈ 16 MiB with the
/// defaults); kept, that room would hold the worst backlog's peak for the rest of the
/// process's life, so what is beyond twice the last batch is given back.
const KEEP_ROWS: usize = 4096;

/// How the [`HeartbeatWriter`] batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeartbeatWriterOptions {
    /// Heartbeats the channel holds while the writer is busy (default 131 072: 13 s of a
    /// 10 000-vehicle fleet at 1 Hz, 2.6 s at 5 Hz; about 12 MiB when full).
    pub(crate) capacity: usize,
    /// Write a batch once it has this many heartbeats (default 50 000)...
    pub(crate) max_batch: usize,
    /// ...or once its first heartbeat has waited this long (default 1 s). What a commit costs
    /// is mostly one index page per vehicle in it, whatever its number of rows: a batch that
    /// spans a vehicle's whole reporting interval writes each page once per second instead of
    /// once per heartbeat (bench/HISTORY.md, end to end).
    pub(crate) max_delay: Duration,
}

impl Default for HeartbeatWriterOptions {
    fn default() -> Self {
        Self {
            capacity: 131_072,
            max_batch: 50_000,
            max_delay: Duration::from_secs(1),
        }
    }
}

/// What the writer did, shared between the senders and the task.
#[derive(Debug, Default)]
pub(crate) struct WriterCounters {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

impl WriterCounters {
    /// Heartbeats stored.
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Heartbeats dropped because the channel was full or the writer had stopped.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Heartbeats lost because their batch could not be written.
    pub(crate) fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// Hands heartbeats to the [`HeartbeatWriter`]. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct HeartbeatSender {
    tx: mpsc::Sender<HeartbeatRow>,
    counters: Arc<WriterCounters>,
}

impl HeartbeatSender {
    /// Queues `row` for the next batch without waiting. Returns `false` if it was dropped (the
    /// channel is full or the writer stopped); drops are counted and logged.
    pub(crate) fn send(&self, row: HeartbeatRow) -> bool {
        match self.tx.try_send(row) {
            Ok(()) => true,
            Err(err) => {
                let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                let why = match err {
                    mpsc::error::TrySendError::Full(_) => "the store is behind",
                    mpsc::error::TrySendError::Closed(_) => "the writer stopped",
                };
                // The first drop, then every thousandth: a slow disk must not flood the log.
                if dropped == 1 || dropped.is_multiple_of(1_000) {
                    warn!(dropped, "heartbeat not stored: {why}");
                }
                false
            }
        }
    }

    /// The writer's counters.
    #[cfg(test)]
    pub(crate) fn counters(&self) -> &Arc<WriterCounters> {
        &self.counters
    }
}

/// The task that writes heartbeats in batches: build one with [`HeartbeatWriter::new`], spawn
/// [`HeartbeatWriter::run`].
#[derive(Debug)]
pub(crate) struct HeartbeatWriter {
    store: Store,
    rx: mpsc::Receiver<HeartbeatRow>,
    options: HeartbeatWriterOptions,
    counters: Arc<WriterCounters>,
    metrics: Arc<Metrics>,
}

impl HeartbeatWriter {
    /// A writer into `store` and the sender that feeds it; what it writes or loses is counted
    /// in `metrics`, whether the store could write reported to its store health.
    pub(crate) fn new(
        store: Store,
        options: HeartbeatWriterOptions,
        metrics: Arc<Metrics>,
    ) -> (Self, HeartbeatSender) {
        let (tx, rx) = mpsc::channel(options.capacity.max(1));
        let counters = Arc::new(WriterCounters::default());
        let sender = HeartbeatSender {
            tx,
            counters: Arc::clone(&counters),
        };
        let writer = Self {
            store,
            rx,
            options,
            counters,
            metrics,
        };
        (writer, sender)
    }

    /// Writes batches until `cancel` fires or every sender is dropped, then writes what is
    /// still queued and returns.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let max_batch = self.options.max_batch.max(1);
        let mut batch: Vec<HeartbeatRow> = Vec::new();
        loop {
            // Wait for the first heartbeat of a batch...
            let received = tokio::select! {
                () = cancel.cancelled() => break,
                n = self.rx.recv_many(&mut batch, max_batch) => n,
            };
            if received == 0 {
                break; // every sender is gone
            }
            // ...then for more, until the batch is full or its first heartbeat is due.
            let due = Instant::now() + self.options.max_delay;
            while batch.len() < max_batch {
                let room = max_batch - batch.len();
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep_until(due) => break,
                    n = self.rx.recv_many(&mut batch, room) => if n == 0 { break },
                }
            }
            // Behind (the last commit was slow): take what is already queued into this batch,
            // so one commit catches up instead of falling further behind one batch at a time.
            let queued = self.rx.len().min(max_batch * CATCH_UP_BATCHES);
            if queued > 0 {
                self.rx.recv_many(&mut batch, queued).await;
            }
            self.flush(&mut batch).await;
            self.metrics.set_history_queued(self.rx.len());
        }
        // Shutting down: write what is left.
        self.rx.close();
        while self.rx.recv_many(&mut batch, max_batch).await > 0 {
            self.flush(&mut batch).await;
        }
        debug!(
            written = self.counters.written(),
            dropped = self.counters.dropped(),
            failed = self.counters.failed(),
            "heartbeat writer stopped"
        );
    }

    async fn flush(&self, batch: &mut Vec<HeartbeatRow>) {
        let n = batch.len() as u64;
        match self.store.record_heartbeats(batch).await {
            Ok(()) => {
                self.counters.written.fetch_add(n, Ordering::Relaxed);
                self.metrics.store().succeeded();
            }
            Err(err) => {
                self.counters.failed.fetch_add(n, Ordering::Relaxed);
                self.metrics.add(Counter::HistoryFailed, n);
                if err.is_outage() {
                    // Logged by the store's health, once per outage and then a reminder.
                    debug!(rows = n, cause = %err, "heartbeat batch not stored");
                    let waiting = self.metrics.acks_waiting();
                    self.metrics
                        .store()
                        .failed("heartbeat batch", &err, waiting);
                } else {
                    warn!(rows = n, cause = %err, "heartbeat batch not stored");
                }
            }
        }
        // Room for twice this batch is kept (no reallocation from one batch to the next);
        // more than that is what a catch-up left behind.
        let rows = batch.len().max(KEEP_ROWS);
        batch.clear();
        if batch.capacity() > 2 * rows {
            batch.shrink_to(rows);
        }
    }
}

#[cfg(test)]
mod tests {
    use shared::{Heartbeat, Position};

    use super::*;
    use crate::store::testing::on_each_backend;

    fn row(seq: u32) -> HeartbeatRow {
        let hb = Heartbeat {
            seq,
            ts_ms: 1_000 + u64::from(seq),
            pos: Position::new(1, 2),
            ..Heartbeat::default()
        };
        HeartbeatRow::new(
            "demo".parse().expect("fleet"),
            "v-1".parse().expect("vehicle"),
            &hb,
            0,
        )
    }

    on_each_backend! {
        async fn writes_everything_sent_then_stops(store) {
            let options = HeartbeatWriterOptions {
                capacity: 10_000,
                max_batch: 100,
                max_delay: Duration::from_millis(20),
            };
            let (writer, sender) = HeartbeatWriter::new(store.clone(), options, Arc::default());
            let cancel = CancellationToken::new();
            let task = tokio::spawn(writer.run(cancel.clone()));
            for seq in 0..1_050 {
                assert!(sender.send(row(seq)));
            }
            // A partial batch goes out after max_delay, without waiting for more.
            let vehicle = "v-1".parse().expect("vehicle");
            tokio::time::timeout(Duration::from_secs(5), async {
                while sender.counters().written() < 1_050 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("written in time");
            assert!(sender.send(row(2_000)));
            cancel.cancel();
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("stops")
                .expect("no panic");
            let track = store
                .track(&vehicle, 0, u64::MAX, 10_000)
                .await
                .expect("track");
            assert_eq!(
                track.len(),
                1_051,
                "what was queued at shutdown is written too"
            );
            assert_eq!(sender.counters().dropped(), 0);
            assert!(!sender.send(row(3_000)), "the writer stopped");
            assert_eq!(sender.counters().dropped(), 1);
        }
    }

    on_each_backend! {
        async fn a_full_channel_drops_and_counts(store) {
            let options = HeartbeatWriterOptions {
                capacity: 4,
                ..HeartbeatWriterOptions::default()
            };
            let (writer, sender) = HeartbeatWriter::new(store.clone(), options, Arc::default());
            // The writer is not running: the channel fills up.
            let sent = (0..10).filter(|&seq| sender.send(row(seq))).count();
            assert_eq!(sent, 4);
            assert_eq!(sender.counters().dropped(), 6);
            // Dropping every sender stops the writer once it has written what was queued.
            drop(sender);
            let counters = Arc::clone(&writer.counters);
            tokio::time::timeout(Duration::from_secs(5), writer.run(CancellationToken::new()))
                .await
                .expect("stops");
            assert_eq!(counters.written(), 4);
        }
    }
}
