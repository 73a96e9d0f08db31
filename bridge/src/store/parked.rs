//! Parked messages: QoS 1 messages from vehicles whose key the bridge did not have, kept
//! durably after they were held for a while (`ingest::inbox`), so that they stop holding the
//! PUBACKs behind them. [`Store::park`] commits one before its message is acknowledged; once
//! the vehicle's key is known they are read back in the order they came
//! ([`Store::parked_of`]), handled, and removed ([`Store::unpark`]); retention removes the
//! ones whose vehicle never got a key ([`Store::expire_parked`]).

use shared::VehicleId;

use super::database::{Store, from_db, parse_id, to_db};
use super::error::StoreError;

/// A parked message, as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParkedMessage {
    /// Its id: increasing in the order messages were parked, never reused.
    pub(crate) id: u64,
    /// The vehicle that sent it.
    pub(crate) vehicle: VehicleId,
    /// The topic it was published on.
    pub(crate) topic: String,
    /// Its sealed payload, unopened.
    pub(crate) payload: Vec<u8>,
    /// When it was received, ms since the Unix epoch (bridge clock).
    pub(crate) received_ms: u64,
}

impl Store {
    /// Parks the message `payload`, published by `vehicle` on `topic` and received at
    /// `received_ms`, in one committed transaction; returns its id. Only then may the message
    /// be acknowledged.
    ///
    /// # Errors
    /// [`StoreError::Database`] if it could not be committed.
    pub(crate) async fn park(
        &self,
        vehicle: &VehicleId,
        topic: &str,
        payload: &[u8],
        received_ms: u64,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO parked (vehicle, topic, payload, received_ms) \
             VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(vehicle.as_str())
        .bind(topic)
        .bind(payload)
        .bind(to_db(received_ms))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(from_db(id))
    }

    /// At most `limit` parked messages of `vehicle`, in the order they were parked.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] if a row holds an
    /// invalid vehicle id.
    pub(crate) async fn parked_of(
        &self,
        vehicle: &VehicleId,
        limit: u32,
    ) -> Result<Vec<ParkedMessage>, StoreError> {
        let rows: Vec<(i64, String, String, Vec<u8>, i64)> = sqlx::query_as(
            "SELECT id, vehicle, topic, payload, received_ms FROM parked WHERE vehicle = $1 \
             ORDER BY id LIMIT $2",
        )
        .bind(vehicle.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.write)
        .await?;
        rows.into_iter()
            .map(|(id, vehicle, topic, payload, received_ms)| {
                Ok(ParkedMessage {
                    id: from_db(id),
                    vehicle: parse_id("vehicle of parked message", &vehicle)?,
                    topic,
                    payload,
                    received_ms: from_db(received_ms),
                })
            })
            .collect()
    }

    /// The vehicles with parked messages.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] if a row holds an
    /// invalid vehicle id.
    pub(crate) async fn parked_vehicles(&self) -> Result<Vec<VehicleId>, StoreError> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT vehicle FROM parked ORDER BY vehicle")
                .fetch_all(&self.write)
                .await?;
        rows.iter()
            .map(|vehicle| parse_id("vehicle of parked message", vehicle))
            .collect()
    }

    /// How many messages are parked.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails.
    pub(crate) async fn parked_count(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM parked")
            .fetch_one(&self.write)
            .await?;
        Ok(from_db(n))
    }

    /// Removes the parked message `id` (handled or rejected); returns whether it was there.
    ///
    /// # Errors
    /// [`StoreError::Database`] if it could not be committed.
    pub(crate) async fn unpark(&self, id: u64) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM parked WHERE id = $1")
            .bind(to_db(id))
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Removes every message parked before `older_than_ms` (ms since the Unix epoch, bridge
    /// clock), and returns how many.
    ///
    /// # Errors
    /// [`StoreError::Database`] if it could not be committed.
    pub(crate) async fn expire_parked(&self, older_than_ms: u64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM parked WHERE received_ms < $1")
            .bind(to_db(older_than_ms))
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;
    use crate::store::testing::on_each_backend;

    fn vehicle(id: &str) -> VehicleId {
        VehicleId::new(id).expect("valid")
    }

    fn topics(parked: &[ParkedMessage]) -> Vec<&str> {
        parked.iter().map(|p| p.topic.as_str()).collect()
    }

    on_each_backend! {
        /// Parked messages come back per vehicle in the order they were parked, payload intact;
        /// removing one leaves the others.
        async fn park_list_in_order_and_unpark(store) {
            let (v1, v2) = (vehicle("v1"), vehicle("v2"));
            let a = store
                .park(&v1, "fleet/f/v1/event", &[1, 2, 0, 255], 10)
                .await
                .expect("parks");
            store
                .park(&v2, "fleet/f/v2/event", &[9], 11)
                .await
                .expect("parks");
            let b = store
                .park(&v1, "fleet/f/v1/status", &[3], 12)
                .await
                .expect("parks");
            assert!(a < b);
            let parked = store.parked_of(&v1, 10).await.expect("lists");
            assert_eq!(topics(&parked), ["fleet/f/v1/event", "fleet/f/v1/status"]);
            assert_eq!(
                parked[0],
                ParkedMessage {
                    id: a,
                    vehicle: v1.clone(),
                    topic: "fleet/f/v1/event".into(),
                    payload: vec![1, 2, 0, 255],
                    received_ms: 10,
                }
            );
            assert_eq!(store.parked_of(&v1, 1).await.expect("lists").len(), 1);
            assert_eq!(
                store.parked_vehicles().await.expect("lists"),
                [v1.clone(), v2.clone()]
            );
            assert_eq!(store.parked_count().await.expect("counts"), 3);

            assert!(store.unpark(a).await.expect("removes"));
            assert!(!store.unpark(a).await.expect("removes"), "already removed");
            assert_eq!(
                topics(&store.parked_of(&v1, 10).await.expect("lists")),
                ["fleet/f/v1/status"]
            );
            assert_eq!(store.parked_count().await.expect("counts"), 2);
        }
    }

    on_each_backend! {
        async fn expire_removes_only_old_parked_messages(store) {
            let v = vehicle("v");
            store
                .park(&v, "fleet/f/v/event", &[1], 100)
                .await
                .expect("parks");
            store
                .park(&v, "fleet/f/v/event", &[2], 200)
                .await
                .expect("parks");
            assert_eq!(store.expire_parked(100).await.expect("expires"), 0);
            assert_eq!(store.expire_parked(150).await.expect("expires"), 1);
            let left = store.parked_of(&v, 10).await.expect("lists");
            assert_eq!(left.len(), 1);
            assert_eq!(left[0].payload, [2]);
            assert_eq!(store.expire_parked(u64::MAX).await.expect("expires"), 1);
            assert!(store.parked_vehicles().await.expect("lists").is_empty());
        }
    }

    /// A parked message survives a restart (reopened without a clean close).
    #[tokio::test]
    async fn parked_messages_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("parked.db");
        let path = path.to_str().expect("utf-8 path");
        {
            let store = Store::open(path, StoreOptions::default())
                .await
                .expect("opens");
            store
                .park(&vehicle("v"), "fleet/f/v/event", &[7], 1)
                .await
                .expect("parks");
        }
        let store = Store::open(path, StoreOptions::default())
            .await
            .expect("reopens");
        assert_eq!(
            store.parked_vehicles().await.expect("lists"),
            [vehicle("v")]
        );
        assert_eq!(
            store.parked_of(&vehicle("v"), 10).await.expect("lists")[0].payload,
            [7]
        );
        store.close().await;
    }
}
