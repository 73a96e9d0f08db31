//! [`HeartbeatWriter`]: a task that stores heartbeats in batches, so that the MQTT loop never
//! waits for the disk.
//!
//! The MQTT loop hands each heartbeat to a [`HeartbeatSender`], which never blocks: when the
//! bounded channel is full (the disk cannot keep up), the heartbeat is dropped and counted.
//! Heartbeats are QoS 0 history, so that is acceptable; delivery events never go this way.
//! While the store cannot write, each batch is tried once and, if it fails, dropped and
//! counted (`history_failed_total`): history is not buffered beyond the channel. Every batch
//! tells the store's health (`StoreHealth`) whether the store could write.
//!
//! A batch waits up to [`HeartbeatWriterOptions::max_delay`] (5 s) for more heartbeats: what a
//! commit costs is mostly one page of the track index per vehicle in it, so five heartbeats of
//! a vehicle in one commit cost little more than one. A track read does not see that delay:
//! it asks the writer to commit what it holds first ([`HeartbeatSender::flush`]). The batch is
//! written vehicle by vehicle in transactions of at most [`SLICE`] rows, so that a delivery
//! event's commit (which shares the store's one write connection) never waits for a whole
//! batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::database::Store;
use super::track::{HeartbeatRow, by_vehicle_id};
use crate::metrics::{Counter, Metrics};

/// A batch grows up to this many times `max_batch` when the writer is behind.
const CATCH_UP_BATCHES: usize = 2;

/// Items one receive from the channel takes at most.
const RECEIVE: usize = 4_096;

/// Rows per transaction: a batch is committed in slices of this many (a vehicle's rows
/// together), each holding the store's write connection ≈50–100 ms under a 10 000-vehicle
/// fleet, so that delivery events' commits get their turn in between.
pub(crate) const SLICE: usize = 10_000;

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
    /// ...or once its first heartbeat has waited this long (default 5 s), or when a track
    /// read asks for it ([`HeartbeatSender::flush`]). What a commit costs is mostly one index
    /// page per vehicle in it, whatever its number of rows: a batch that spans several of a
    /// vehicle's heartbeats writes each page once for all of them (bench/HISTORY.md, "The
    /// history under a fleet"). On a crash, what the writer holds is lost: QoS 0 history.
    pub(crate) max_delay: Duration,
}

impl Default for HeartbeatWriterOptions {
    fn default() -> Self {
        Self {
            capacity: 131_072,
            max_batch: 50_000,
            max_delay: Duration::from_secs(5),
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

/// What the writer's channel carries: heartbeats, and requests to commit what came before.
#[derive(Debug)]
enum Queued {
    /// A heartbeat to store.
    Row(HeartbeatRow),
    /// Commit every heartbeat queued before this, then answer.
    Flush(oneshot::Sender<()>),
}

/// Hands heartbeats to the [`HeartbeatWriter`]. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct HeartbeatSender {
    tx: mpsc::Sender<Queued>,
    counters: Arc<WriterCounters>,
}

impl HeartbeatSender {
    /// Queues `row` for the next batch without waiting. Returns `false` if it was dropped (the
    /// channel is full or the writer stopped); drops are counted and logged.
    pub(crate) fn send(&self, row: HeartbeatRow) -> bool {
        match self.tx.try_send(Queued::Row(row)) {
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

    /// Asks the writer to commit every heartbeat sent before this call, and waits for it, at
    /// most `wait`: a track read then sees them. Returns whether the writer got through them
    /// in time; `false` when it has stopped or the wait ran out (the read goes on with what
    /// the store has). A slice that failed to commit is counted and logged by the writer, and
    /// still answers `true`.
    pub(crate) async fn flush(&self, wait: Duration) -> bool {
        let (done, committed) = oneshot::channel();
        tokio::time::timeout(wait, async {
            // Behind the heartbeats already queued: waits for room if the channel is full.
            self.tx.send(Queued::Flush(done)).await.is_ok() && committed.await.is_ok()
        })
        .await
        .unwrap_or(false)
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
    rx: mpsc::Receiver<Queued>,
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
        let mut batch = Batch::default();
        loop {
            // Wait for the first heartbeat (or flush request) of a batch...
            let received = tokio::select! {
                // Cancel first: what is queued then goes out through the shutdown path below.
                biased;
                () = cancel.cancelled() => break,
                n = batch.receive(&mut self.rx, max_batch) => n,
            };
            if received == 0 {
                break; // every sender is gone
            }
            // ...then for more, until the batch is full, its first heartbeat is due, or a
            // track read waits for it.
            let due = Instant::now() + self.options.max_delay;
            while batch.rows.len() < max_batch && batch.waiting.is_empty() {
                let room = max_batch - batch.rows.len();
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep_until(due) => break,
                    n = batch.receive(&mut self.rx, room) => if n == 0 { break },
                }
            }
            // Behind (the last commit was slow): take what is already queued into this batch,
            // so one commit catches up instead of falling further behind one batch at a time.
            let mut queued = self.rx.len().min(max_batch * CATCH_UP_BATCHES);
            while queued > 0 {
                let n = batch.receive(&mut self.rx, queued).await;
                if n == 0 {
                    break; // every sender is gone
                }
                queued = queued.saturating_sub(n);
            }
            self.flush(&mut batch).await;
            self.metrics.set_history_queued(self.rx.len());
        }
        // Shutting down: write what is still queued. (The batch is empty here: the loop above
        // ends only while it waits for a batch's first item.)
        self.rx.close();
        loop {
            while batch.rows.len() < max_batch
                && batch
                    .receive(&mut self.rx, max_batch - batch.rows.len())
                    .await
                    > 0
            {}
            if batch.rows.is_empty() && batch.waiting.is_empty() {
                break; // closed and empty
            }
            self.flush(&mut batch).await;
        }
        debug!(
            written = self.counters.written(),
            dropped = self.counters.dropped(),
            failed = self.counters.failed(),
            "heartbeat writer stopped"
        );
    }

    /// Writes the batch, vehicle by vehicle, in transactions of at most [`SLICE`] rows; then
    /// answers the flush requests it holds (all of them: a failed slice is counted and logged,
    /// and the read goes on with what the store has).
    async fn flush(&self, batch: &mut Batch) {
        let rows = &mut batch.rows;
        // Stable: each vehicle's rows keep their order. The slices then split the fleet, not
        // the rounds. (References: a row is 104 bytes, not worth moving about in a sort.)
        let mut by_vehicle: Vec<&HeartbeatRow> = rows.iter().collect();
        by_vehicle.sort_by(|a, b| by_vehicle_id(a, b));
        for slice in by_vehicle.chunks(SLICE) {
            self.write(slice).await;
        }
        drop(by_vehicle);
        for done in batch.waiting.drain(..) {
            // The reader may have given up waiting.
            let _ = done.send(());
        }
        // Room for twice this batch is kept (no reallocation from one batch to the next);
        // more than that is what a catch-up left behind.
        let kept = rows.len().max(KEEP_ROWS);
        rows.clear();
        if rows.capacity() > 2 * kept {
            rows.shrink_to(kept);
        }
    }

    /// One transaction of the batch.
    async fn write(&self, rows: &[&HeartbeatRow]) {
        let n = rows.len() as u64;
        match self.store.record_sorted_heartbeats(rows).await {
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
    }
}

/// The batch the writer gathers: heartbeats, and the flush requests that came with them.
#[derive(Debug, Default)]
struct Batch {
    rows: Vec<HeartbeatRow>,
    /// Answered once every row before them is written.
    waiting: Vec<oneshot::Sender<()>>,
    /// What one receive takes, moved into `rows` and `waiting` at once: at most [`RECEIVE`]
    /// items, so this buffer stays small.
    incoming: Vec<Queued>,
}

impl Batch {
    /// Waits for queued items and moves up to `most` (and up to [`RECEIVE`]) of them into the
    /// batch; returns how many, 0 once the channel is closed and empty. Cancel-safe: an item
    /// is either in the batch or still queued.
    async fn receive(&mut self, rx: &mut mpsc::Receiver<Queued>, most: usize) -> usize {
        let n = rx.recv_many(&mut self.incoming, most.min(RECEIVE)).await;
        for queued in self.incoming.drain(..) {
            match queued {
                Queued::Row(row) => self.rows.push(row),
                Queued::Flush(done) => self.waiting.push(done),
            }
        }
        n
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
        async fn what_is_queued_at_shutdown_is_written_in_batches(store) {
            let options = HeartbeatWriterOptions {
                capacity: 10_000,
                max_batch: 100,
                max_delay: Duration::from_secs(60),
            };
            let (writer, sender) = HeartbeatWriter::new(store.clone(), options, Arc::default());
            for seq in 0..250 {
                assert!(sender.send(row(seq)));
            }
            // A track read that came with them is answered once they are written.
            let flushing = {
                let sender = sender.clone();
                tokio::spawn(async move { sender.flush(Duration::from_secs(5)).await })
            };
            tokio::time::timeout(Duration::from_secs(5), async {
                while writer.rx.len() < 251 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the flush request is queued");
            // Cancelled before it starts: nothing goes out through the normal path.
            let cancel = CancellationToken::new();
            cancel.cancel();
            tokio::time::timeout(Duration::from_secs(5), writer.run(cancel))
                .await
                .expect("stops");
            assert!(flushing.await.expect("no panic"), "the flush is answered");
            assert_eq!(sender.counters().written(), 250);
            let vehicle = "v-1".parse().expect("vehicle");
            let track = store.track(&vehicle, 0, u64::MAX, 1_000).await.expect("track");
            let seqs: Vec<u32> = track.iter().map(|r| r.seq).collect();
            assert_eq!(seqs, (0..250).collect::<Vec<_>>(), "all of them, in order");
        }
    }

    on_each_backend! {
        async fn a_flush_commits_what_came_before_at_once(store) {
            // A batch that would wait an hour: only the flush makes it go.
            let options = HeartbeatWriterOptions {
                max_delay: Duration::from_secs(3_600),
                ..HeartbeatWriterOptions::default()
            };
            let (writer, sender) = HeartbeatWriter::new(store.clone(), options, Arc::default());
            let cancel = CancellationToken::new();
            let task = tokio::spawn(writer.run(cancel.clone()));
            // Three vehicles, interleaved, more than a slice: every row comes back, each
            // vehicle's in the order sent.
            let per_vehicle = 4_000u32;
            for seq in 0..per_vehicle {
                for vehicle in ["v-1", "v-2", "v-3"] {
                    let mut row = row(seq);
                    row.vehicle = vehicle.parse().expect("vehicle");
                    row.ts_ms = 7; // one device millisecond: only the order sent tells them apart
                    assert!(sender.send(row));
                }
            }
            assert!(3 * per_vehicle as usize > SLICE, "the batch spans several slices");
            assert!(sender.flush(Duration::from_secs(20)).await, "committed in time");
            assert_eq!(sender.counters().written(), 3 * u64::from(per_vehicle));
            for vehicle in ["v-1", "v-2", "v-3"] {
                let track = store
                    .track(&vehicle.parse().expect("vehicle"), 0, u64::MAX, 10_000)
                    .await
                    .expect("track");
                assert_eq!(track.len(), per_vehicle as usize, "{vehicle}");
                assert!(
                    track.iter().map(|r| r.seq).eq(0..per_vehicle),
                    "{vehicle}: in the order sent"
                );
            }
            // Nothing held: a flush answers at once.
            assert!(sender.flush(Duration::from_secs(5)).await);
            // Rows the writer holds in its batch when it is stopped are written too.
            for seq in per_vehicle..per_vehicle + 10 {
                assert!(sender.send(row(seq)));
            }
            tokio::time::timeout(Duration::from_secs(5), async {
                while sender.tx.capacity() < sender.tx.max_capacity() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the writer took them into its batch");
            cancel.cancel();
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("stops")
                .expect("no panic");
            assert_eq!(sender.counters().written(), 3 * u64::from(per_vehicle) + 10);
            // The writer is gone: a flush says so instead of waiting.
            assert!(!sender.flush(Duration::from_secs(5)).await);
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
