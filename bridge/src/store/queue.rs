//! The durable per-client message queue.
//!
//! A message is stored before it is emitted and stays until its client acknowledges it, so a
//! client that was away (or a bridge that was killed) loses nothing: [`Store::pending`]
//! returns what is still owed, in order. Message ids increase monotonically and are never
//! reused, so a client drops a re-sent message whose id it has already seen.

use serde_json::Value;

use super::database::{Store, from_db, to_db};
use super::error::StoreError;
pub use super::ids::{ClientId, Enqueued, MessageId};

/// A message waiting for its client's acknowledgement.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QueuedMessage {
    /// Its id.
    pub(crate) id: MessageId,
    /// What to send, as given to the store.
    pub(crate) payload: Value,
    /// When it was queued, ms since the Unix epoch (bridge clock).
    pub(crate) created_ms: u64,
}

impl Store {
    /// Queues `payload` for `client`, durably, and returns its id. Only the tests queue a
    /// message on its own: the bridge queues messages with the event they tell of
    /// ([`Store::record_event`]).
    ///
    /// # Errors
    /// [`StoreError::Database`] if it could not be committed.
    #[cfg(test)]
    pub(crate) async fn enqueue(
        &self,
        client: &ClientId,
        payload: &Value,
    ) -> Result<MessageId, StoreError> {
        let mut tx = self.begin_write().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO queue (client, payload, created_ms) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(client.as_str())
        .bind(payload.to_string())
        .bind(to_db(crate::clock::now_ms()))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(MessageId(from_db(id)))
    }

    /// Every message still waiting for `client`'s acknowledgement, oldest (lowest id) first.
    ///
    /// # Errors
    /// As [`Store::pending_page`].
    #[cfg(test)]
    pub(crate) async fn pending(
        &self,
        client: &ClientId,
    ) -> Result<Vec<QueuedMessage>, StoreError> {
        self.pending_page(client, MessageId(0), u32::MAX).await
    }

    /// One page of the messages still waiting for `client`'s acknowledgement: at most `limit`
    /// of those with an id above `after`, oldest (lowest id) first. The last id of a page is
    /// the cursor (`after`) of the next one; a client's queue is never loaded whole.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] if a stored
    /// payload is not JSON.
    pub(crate) async fn pending_page(
        &self,
        client: &ClientId,
        after: MessageId,
        limit: u32,
    ) -> Result<Vec<QueuedMessage>, StoreError> {
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT id, payload, created_ms FROM queue WHERE client = $1 AND id > $2 \
             ORDER BY id LIMIT $3",
        )
        .bind(client.as_str())
        .bind(i64::try_from(after.0).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|(id, payload, created_ms)| {
                let payload = serde_json::from_str(&payload).map_err(|e| {
                    StoreError::corrupt("queue payload of message", &id.to_string(), e)
                })?;
                Ok(QueuedMessage {
                    id: MessageId(from_db(id)),
                    payload,
                    created_ms: from_db(created_ms),
                })
            })
            .collect()
    }

    /// `client` acknowledges message `id`: it is removed. Returns whether it was pending; an
    /// unknown id, an id already acknowledged, or another client's message is left alone and
    /// returns `false`.
    ///
    /// # Errors
    /// [`StoreError::Database`] if it could not be committed.
    pub(crate) async fn ack(&self, client: &ClientId, id: MessageId) -> Result<bool, StoreError> {
        let Ok(id) = i64::try_from(id.0) else {
            return Ok(false);
        };
        let done = sqlx::query("DELETE FROM queue WHERE id = $1 AND client = $2")
            .bind(id)
            .bind(client.as_str())
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Removes every message queued before `older_than_ms` (ms since the Unix epoch, bridge
    /// clock) whatever its client, and returns how many.
    ///
    /// # Errors
    /// [`StoreError::Database`] if it could not be committed.
    pub(crate) async fn expire(&self, older_than_ms: u64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM queue WHERE created_ms < $1")
            .bind(to_db(older_than_ms))
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::clock::now_ms;
    use crate::store::StoreOptions;
    use crate::store::testing::on_each_backend;

    /// Queues `{"n": 0}`, `{"n": 1}`, ... for `client`; returns their ids.
    async fn enqueue_numbered(store: &Store, client: &ClientId, count: u32) -> Vec<MessageId> {
        let mut ids = Vec::new();
        for n in 0..count {
            ids.push(
                store
                    .enqueue(client, &json!({ "n": n }))
                    .await
                    .expect("enqueues"),
            );
        }
        ids
    }

    on_each_backend! {
        async fn pending_in_order_and_ack_removes(store) {
            let vendor = ClientId::vendor("store-1");
            let other = ClientId::vendor("store-2");
            let ids = enqueue_numbered(&store, &vendor, 5).await;
            store
                .enqueue(&other, &json!("elsewhere"))
                .await
                .expect("enqueues");
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "increasing: {ids:?}");

            let pending = store.pending(&vendor).await.expect("pending");
            assert_eq!(pending.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
            assert_eq!(pending[3].payload, json!({ "n": 3 }));

            assert!(store.ack(&vendor, ids[1]).await.expect("acks"));
            assert!(
                !store.ack(&vendor, ids[1]).await.expect("acks"),
                "already acked"
            );
            assert!(
                !store.ack(&vendor, MessageId(9_999)).await.expect("acks"),
                "unknown"
            );
            assert!(
                !store.ack(&vendor, MessageId(u64::MAX)).await.expect("acks"),
                "out of range"
            );
            assert!(
                !store.ack(&other, ids[0]).await.expect("acks"),
                "not its message"
            );

            let left: Vec<MessageId> = store
                .pending(&vendor)
                .await
                .expect("pending")
                .iter()
                .map(|m| m.id)
                .collect();
            assert_eq!(left, [ids[0], ids[2], ids[3], ids[4]]);
            assert_eq!(store.pending(&other).await.expect("pending").len(), 1);
        }
    }

    on_each_backend! {
        /// Pages follow their cursor, never mix clients, and end with an empty page.
        async fn pages_follow_the_cursor(store) {
            let vendor = ClientId::vendor("store-1");
            let ids = enqueue_numbered(&store, &vendor, 5).await;
            store
                .enqueue(&ClientId::vendor("store-2"), &json!("elsewhere"))
                .await
                .expect("enqueues");
            let page = |after, limit| {
                let (store, vendor) = (&store, &vendor);
                async move {
                    store
                        .pending_page(vendor, after, limit)
                        .await
                        .expect("page")
                        .iter()
                        .map(|m| m.id)
                        .collect::<Vec<_>>()
                }
            };
            assert_eq!(page(MessageId(0), 2).await, ids[..2]);
            assert_eq!(page(ids[1], 2).await, ids[2..4]);
            assert_eq!(page(ids[3], 2).await, ids[4..]);
            assert!(page(ids[4], 2).await.is_empty());
            assert!(page(MessageId(u64::MAX), 2).await.is_empty());
        }
    }

    on_each_backend! {
        /// Acknowledging the newest message and queueing again never hands out its id again.
        async fn ids_are_never_reused(store) {
            let client = ClientId::dispatch();
            let first = store.enqueue(&client, &json!(1)).await.expect("enqueues");
            assert!(store.ack(&client, first).await.expect("acks"));
            let second = store.enqueue(&client, &json!(2)).await.expect("enqueues");
            assert!(second > first, "{second} after {first}");
        }
    }

    on_each_backend! {
        async fn expire_removes_only_old_messages(store) {
            let client = ClientId::dispatch();
            store.enqueue(&client, &json!("a")).await.expect("enqueues");
            store
                .enqueue(&ClientId::vendor("s"), &json!("b"))
                .await
                .expect("enqueues");
            let created = store.pending(&client).await.expect("pending")[0].created_ms;
            assert_eq!(
                store.expire(created).await.expect("expires"),
                0,
                "not older"
            );
            assert_eq!(store.expire(now_ms() + 1).await.expect("expires"), 2);
            assert!(store.pending(&client).await.expect("pending").is_empty());
        }
    }

    /// Pending messages survive a restart (the file reopened without a clean close), and
    /// acknowledgements do too.
    #[tokio::test]
    async fn pending_survives_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("queue.db");
        let path = path.to_str().expect("utf-8 path");
        let client = ClientId::vendor("store-1");
        let ids = {
            let store = Store::open(path, StoreOptions::default())
                .await
                .expect("opens");
            let ids = enqueue_numbered(&store, &client, 3).await;
            assert!(store.ack(&client, ids[0]).await.expect("acks"));
            ids
        };
        let store = Store::open(path, StoreOptions::default())
            .await
            .expect("reopens");
        let pending = store.pending(&client).await.expect("pending");
        assert_eq!(pending.iter().map(|m| m.id).collect::<Vec<_>>(), ids[1..]);
        assert_eq!(pending[0].payload, json!({ "n": 1 }));
        let next = store
            .enqueue(&client, &json!("after"))
            .await
            .expect("enqueues");
        assert!(next > ids[2]);
        store.close().await;
    }
}
