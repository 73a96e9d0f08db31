//! The journal: gated messages committed to a SQLite file before their PUBACK, kept until a
//! durable consumer acknowledged them.
//!
//! SQLite through sqlx (a well-kept embedded engine rather than a hand-written log): WAL,
//! `synchronous = FULL` (every commit is fsynced), `locking_mode = EXCLUSIVE` (a second broker
//! on the same file is refused at start). One table, `journal (id, topic, payload,
//! received_ms)`; `PRAGMA user_version` is its format.
//!
//! One writer task does everything, in group commits: it takes the first command, then
//! everything else that arrived meanwhile (up to [`MAX_BATCH`]), runs them in one
//! transaction, commits, and only then releases the waiters of what it appended. Appends of a
//! message already journaled (a publisher sending it again) cost no row: they are released
//! with the batch. Deletes (a durable consumer's acknowledgement) ride along in the same
//! transactions. A full journal ([`Bounds`]) takes no more rows: those messages are routed
//! and released only by a durable consumer's acknowledgement (counted and logged).
//!
//! An index of the rows (id, message, when last published) is kept in memory, for the bounds,
//! the deduplication and the replays. It is loaded from the file at start.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteLockingMode, SqliteSynchronous};
use sqlx::{Connection as _, Row as _, SqliteConnection};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::{MessageKey, Waiters};
use crate::error::JournalError;
use crate::metrics::BrokerMetrics;

/// The journal's format (`PRAGMA user_version`).
const FORMAT: i64 = 1;

/// Most commands in one transaction.
const MAX_BATCH: usize = 4096;

/// How long opening waits for another process's lock on the file.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// At most one "journal full" warning this often.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// A failed transaction is retried after this long.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How much the journal may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    /// Rows.
    pub(crate) rows: u64,
    /// Bytes of topic + payload.
    pub(crate) bytes: u64,
}

/// What the writer is asked to do.
#[derive(Debug)]
enum Command {
    /// Journal a gated message (released once committed).
    Append(MessageKey),
    /// A durable consumer acknowledged it: delete its row.
    Delete(MessageKey),
}

/// One journaled message.
#[derive(Debug)]
struct Row {
    key: MessageKey,
    /// When it was last published (arrival, or a replay).
    sent: Instant,
}

/// The rows, in memory.
#[derive(Debug, Default)]
struct Index {
    rows: BTreeMap<i64, Row>,
    ids: HashMap<MessageKey, i64>,
    bytes: u64,
}

impl Index {
    fn insert(&mut self, id: i64, key: MessageKey, sent: Instant) {
        self.bytes += key.size();
        self.ids.insert(key.clone(), id);
        self.rows.insert(id, Row { key, sent });
    }

    fn remove(&mut self, key: &MessageKey) -> Option<i64> {
        let id = self.ids.remove(key)?;
        if let Some(row) = self.rows.remove(&id) {
            self.bytes = self.bytes.saturating_sub(row.key.size());
        }
        Some(id)
    }
}

/// The journal, as the rest of the broker uses it. Its writer runs as [`JournalWriter::run`].
#[derive(Debug)]
pub(crate) struct Journal {
    tx: UnboundedSender<Command>,
    index: Arc<Mutex<Index>>,
}

fn lock(index: &Mutex<Index>) -> MutexGuard<'_, Index> {
    index.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Journal {
    /// Opens (creating it if needed) the journal at `path` and loads its rows. Appended
    /// messages release their waiters in `waiters` once committed.
    ///
    /// # Errors
    /// [`JournalError`] if the file cannot be created, opened (another broker holds it),
    /// set up or read, or was written by a newer broker.
    pub(crate) async fn open(
        path: &Path,
        bounds: Bounds,
        waiters: Arc<Waiters>,
        metrics: BrokerMetrics,
    ) -> Result<(Journal, JournalWriter), JournalError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| JournalError::Directory {
                path: dir.to_owned(),
                source,
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .locking_mode(SqliteLockingMode::Exclusive)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(LOCK_WAIT);
        let open_error = |source| JournalError::Open {
            path: path.to_owned(),
            source,
        };
        let read_error = |source| JournalError::Read {
            path: path.to_owned(),
            source,
        };
        let mut db = SqliteConnection::connect_with(&options)
            .await
            .map_err(open_error)?;
        // Takes the file's write lock now, and keeps it (exclusive locking mode).
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut db)
            .await
            .map_err(open_error)?;
        let format: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut db)
            .await
            .map_err(read_error)?;
        if format > FORMAT {
            return Err(JournalError::Format {
                path: path.to_owned(),
                found: format,
                known: FORMAT,
            });
        }
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS journal (\
                 id INTEGER PRIMARY KEY AUTOINCREMENT, \
                 topic BLOB NOT NULL, \
                 payload BLOB NOT NULL, \
                 received_ms INTEGER NOT NULL)",
        )
        .execute(&mut db)
        .await
        .map_err(read_error)?;
        // PRAGMA takes no bound parameters; FORMAT is ours.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA user_version = {FORMAT}"
        )))
        .execute(&mut db)
        .await
        .map_err(read_error)?;
        sqlx::query("COMMIT")
            .execute(&mut db)
            .await
            .map_err(read_error)?;

        let rows = sqlx::query("SELECT id, topic, payload FROM journal ORDER BY id")
            .fetch_all(&mut db)
            .await
            .map_err(read_error)?;
        let mut index = Index::default();
        let mut duplicates = Vec::new();
        let now = Instant::now();
        for row in rows {
            let id: i64 = row.try_get(0).map_err(read_error)?;
            let topic: Vec<u8> = row.try_get(1).map_err(read_error)?;
            let payload: Vec<u8> = row.try_get(2).map_err(read_error)?;
            let key = MessageKey {
                topic: Bytes::from(topic),
                payload: Bytes::from(payload),
            };
            if index.ids.contains_key(&key) {
                duplicates.push(id);
            } else {
                index.insert(id, key, now);
            }
        }
        for id in duplicates {
            sqlx::query("DELETE FROM journal WHERE id = ?")
                .bind(id)
                .execute(&mut db)
                .await
                .map_err(read_error)?;
        }
        metrics.set_journal(index.rows.len() as u64, index.bytes);
        info!(
            journal = %path.display(),
            rows = index.rows.len(),
            bytes = index.bytes,
            "journal open: unacknowledged messages go to durable consumers once one subscribes"
        );

        let (tx, rx) = unbounded_channel();
        let index = Arc::new(Mutex::new(index));
        let writer = JournalWriter {
            db,
            rx,
            index: Arc::clone(&index),
            waiters,
            metrics,
            bounds,
            path: path.to_owned(),
            last_full_warning: None,
            full_since_warning: 0,
        };
        Ok((Journal { tx, index }, writer))
    }

    /// Journals `key`; its waiters are released once it is committed.
    pub(crate) fn append(&self, key: MessageKey) {
        // The writer runs as long as the broker: a send fails only during its teardown.
        let _ = self.tx.send(Command::Append(key));
    }

    /// A durable consumer acknowledged `key`: its row goes.
    pub(crate) fn acknowledged(&self, key: MessageKey) {
        let _ = self.tx.send(Command::Delete(key));
    }

    /// Whether `key` has a row.
    pub(crate) fn contains(&self, key: &MessageKey) -> bool {
        lock(&self.index).ids.contains_key(key)
    }

    /// The journaled messages last published before `before` (all with `None`), oldest
    /// first, marked as published now.
    pub(crate) fn due(&self, before: Option<Instant>) -> Vec<MessageKey> {
        let now = Instant::now();
        let mut index = lock(&self.index);
        index
            .rows
            .values_mut()
            .filter(|row| before.is_none_or(|before| row.sent <= before))
            .map(|row| {
                row.sent = now;
                row.key.clone()
            })
            .collect()
    }
}

/// The journal's one writer: group commits (see the [module docs](self)).
pub(crate) struct JournalWriter {
    db: SqliteConnection,
    rx: UnboundedReceiver<Command>,
    index: Arc<Mutex<Index>>,
    waiters: Arc<Waiters>,
    metrics: BrokerMetrics,
    bounds: Bounds,
    path: PathBuf,
    last_full_warning: Option<Instant>,
    full_since_warning: u64,
}

opaque_debug!(JournalWriter);

/// What one transaction did, applied to the index once committed.
#[derive(Default)]
struct Batch {
    inserted: Vec<(i64, MessageKey)>,
    deleted: Vec<MessageKey>,
    /// Messages durable once the transaction is committed.
    durable: Vec<MessageKey>,
}

impl JournalWriter {
    /// Runs the writer until the journal is dropped.
    pub(crate) async fn run(mut self) {
        let mut commands = Vec::with_capacity(64);
        while let Some(first) = self.rx.recv().await {
            commands.push(first);
            while commands.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(command) => commands.push(command),
                    Err(_) => break,
                }
            }
            loop {
                match self.commit(&commands).await {
                    Ok(batch) => {
                        self.apply(batch);
                        break;
                    }
                    Err(err) => {
                        // Nothing of the batch is durable: its waiters keep waiting (a
                        // durable consumer's acknowledgement still releases them).
                        error!(journal = %self.path.display(), cause = %err, retry_in = ?RETRY_AFTER, "journal commit failed");
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                }
            }
            commands.clear();
            if commands.capacity() > 4 * 64 {
                commands = Vec::with_capacity(64);
            }
        }
        // Releases the file's lock for the next broker.
        if let Err(err) = self.db.close().await {
            warn!(journal = %self.path.display(), cause = %err, "closing the journal failed");
        }
    }

    /// Runs `commands` in one transaction and commits it.
    async fn commit(&mut self, commands: &[Command]) -> Result<Batch, sqlx::Error> {
        let mut batch = Batch::default();
        let (mut rows, mut bytes) = {
            let index = lock(&self.index);
            (index.rows.len() as u64, index.bytes)
        };
        let received_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut full = 0;
        let mut tx = self.db.begin().await?;
        for command in commands {
            match command {
                Command::Append(key) => {
                    let journaled = lock(&self.index).ids.contains_key(key)
                        || batch.inserted.iter().any(|(_, k)| k == key);
                    if journaled {
                        batch.durable.push(key.clone());
                        continue;
                    }
                    if rows >= self.bounds.rows || bytes + key.size() > self.bounds.bytes {
                        full += 1;
                        continue;
                    }
                    let id = sqlx::query(
                        "INSERT INTO journal (topic, payload, received_ms) VALUES (?, ?, ?)",
                    )
                    .bind(&key.topic[..])
                    .bind(&key.payload[..])
                    .bind(received_ms)
                    .execute(&mut *tx)
                    .await?
                    .last_insert_rowid();
                    rows += 1;
                    bytes += key.size();
                    batch.inserted.push((id, key.clone()));
                    batch.durable.push(key.clone());
                }
                Command::Delete(key) => {
                    let id = match batch.inserted.iter().position(|(_, k)| k == key) {
                        Some(at) => Some(batch.inserted.swap_remove(at).0),
                        None => lock(&self.index).ids.get(key).copied(),
                    };
                    if let Some(id) = id {
                        sqlx::query("DELETE FROM journal WHERE id = ?")
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                        rows = rows.saturating_sub(1);
                        bytes = bytes.saturating_sub(key.size());
                        batch.deleted.push(key.clone());
                    }
                }
            }
        }
        tx.commit().await?;
        if full > 0 {
            self.journal_full(full);
        }
        Ok(batch)
    }

    /// The committed `batch`: the index follows, the waiters are released.
    fn apply(&mut self, batch: Batch) {
        let (rows, bytes) = {
            let mut index = lock(&self.index);
            let now = Instant::now();
            for (id, key) in batch.inserted {
                index.insert(id, key, now);
            }
            for key in &batch.deleted {
                index.remove(key);
            }
            (index.rows.len() as u64, index.bytes)
        };
        self.metrics.journal_commit();
        self.metrics.set_journal(rows, bytes);
        for key in &batch.durable {
            self.waiters.release(key);
        }
    }

    /// `count` messages found the journal full: counted, and logged now and then.
    fn journal_full(&mut self, count: u64) {
        for _ in 0..count {
            self.metrics.journal_full();
        }
        self.full_since_warning += count;
        if self
            .last_full_warning
            .is_none_or(|at| at.elapsed() >= FULL_WARNING_EVERY)
        {
            warn!(
                journal = %self.path.display(),
                messages = self.full_since_warning,
                max_rows = self.bounds.rows,
                max_bytes = self.bounds.bytes,
                "journal full: PUBACKs withheld until a durable consumer acknowledges (the publishers keep their messages)"
            );
            self.last_full_warning = Some(Instant::now());
            self.full_since_warning = 0;
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::durability::Waiter;
    use crate::mux::MuxEvent;

    /// A journal path in a fresh directory, removed when the guard is dropped.
    fn temp_journal() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::Builder::new()
            .prefix("fleetbeat-journal-unit-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("journal.db");
        (dir, path)
    }

    fn key(n: u32) -> MessageKey {
        MessageKey::new(
            &Bytes::from_static(b"fleet/f/v/event"),
            &Bytes::from(n.to_be_bytes().to_vec()),
        )
    }

    struct Opened {
        journal: Journal,
        waiters: Arc<Waiters>,
        metrics: BrokerMetrics,
        writer: tokio::task::JoinHandle<()>,
    }

    async fn open(path: &Path, bounds: Bounds) -> Opened {
        let metrics = BrokerMetrics::default();
        let waiters = Arc::new(Waiters::new(metrics.clone()));
        let (journal, writer) = Journal::open(path, bounds, Arc::clone(&waiters), metrics.clone())
            .await
            .unwrap();
        Opened {
            journal,
            waiters,
            metrics,
            writer: tokio::spawn(writer.run()),
        }
    }

    const ROOMY: Bounds = Bounds {
        rows: 1000,
        bytes: 1 << 20,
    };

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Three messages (keys 0, 1, 2) appended to the journal, each with a waiter of
    /// connection 1 whose entry is its key number; returns where the waiters are released.
    fn wait_for_three(journal: &Journal, waiters: &Waiters) -> crate::mux::PortRx {
        let (tx, rx) = crate::mux::port();
        for n in 0..3 {
            waiters.add(
                key(n),
                Waiter {
                    connection: 1,
                    entry: u64::from(n),
                    tx: tx.clone(),
                },
            );
            journal.append(key(n));
        }
        rx
    }

    #[tokio::test]
    async fn appends_release_once_committed_survive_reopening_and_go_when_acknowledged() {
        let (_dir, path) = temp_journal();
        let writer = {
            let Opened {
                journal,
                waiters,
                metrics,
                writer,
            } = open(&path, ROOMY).await;
            let mut rx = wait_for_three(&journal, &waiters);
            for n in 0..3u32 {
                let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .unwrap();
                assert!(matches!(event, Ok(MuxEvent::Durable(e)) if e == u64::from(n)));
            }
            assert_eq!(metrics.journal_rows(), 3);
            assert!(metrics.journal_commits_total() >= 1);
            journal.acknowledged(key(1));
            eventually("the acknowledged row goes", || !journal.contains(&key(1))).await;
            assert_eq!(metrics.journal_rows(), 2);
            // The same message again costs no row.
            journal.append(key(0));
            journal.append(key(9));
            eventually("appended", || journal.contains(&key(9))).await;
            assert_eq!(metrics.journal_rows(), 3);
            writer
        };
        // The journal is dropped: its writer closes the file. A restarted broker finds the
        // unacknowledged rows, in their order.
        writer.await.unwrap();
        let reopened = open(&path, ROOMY).await;
        assert_eq!(reopened.journal.due(None), [key(0), key(2), key(9)]);
        assert_eq!(reopened.metrics.journal_rows(), 3);
    }

    #[tokio::test]
    async fn a_full_journal_takes_no_more_and_counts_it() {
        let (_dir, path) = temp_journal();
        let Opened {
            journal,
            waiters,
            metrics,
            ..
        } = open(
            &path,
            Bounds {
                rows: 2,
                bytes: 1 << 20,
            },
        )
        .await;
        let mut rx = wait_for_three(&journal, &waiters);
        eventually("counted", || metrics.journal_full_total() == 1).await;
        let mut released = Vec::new();
        while let Ok(MuxEvent::Durable(entry)) = rx.try_recv() {
            released.push(entry);
        }
        assert_eq!(released, [0, 1], "the third waits for a durable consumer");
        assert!(!journal.contains(&key(2)));
    }

    #[tokio::test]
    async fn a_second_broker_cannot_open_a_journal_in_use() {
        let (_dir, path) = temp_journal();
        let _first = open(&path, ROOMY).await;
        let metrics = BrokerMetrics::default();
        let waiters = Arc::new(Waiters::new(metrics.clone()));
        let err = Journal::open(&path, ROOMY, waiters, metrics)
            .await
            .unwrap_err();
        assert!(matches!(err, JournalError::Open { .. }), "{err:?}");
    }
}
