//! Custom geofences (`geofences` table) and the drop-offs of open orders, which the geofence
//! engine turns into fences. A fence's shape is stored as JSON text: the store neither reads
//! nor checks it (`geofence` does).

use shared::FleetId;

use super::backend::Backend;
use super::database::{Store, from_db, parse_id, to_db};
use super::error::StoreError;
use super::pool::DbTx;
use super::postgres;

/// A stored custom fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFence {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The fleet whose vehicles it watches.
    pub fleet: FleetId,
    /// Its shape, JSON text.
    pub shape: String,
    /// When it was created, ms since the Unix epoch.
    pub created_ms: u64,
}

/// An order not yet delivered nor cancelled, with its drop-off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOrderDropoff {
    /// The order id.
    pub order: String,
    /// The store that placed it.
    pub store: String,
    /// The fleet delivering it.
    pub fleet: FleetId,
    /// Drop-off latitude, 1e-7 degrees.
    pub lat_e7: i32,
    /// Drop-off longitude, 1e-7 degrees.
    pub lon_e7: i32,
    /// When it was placed, ms since the Unix epoch.
    pub created_ms: u64,
    /// The vehicle holding it (assigned, picked up, in transit), if any.
    pub vehicle: Option<String>,
}

/// An order changed since a time, as it is now: its drop-off, and whether it is still open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropoffChange {
    /// The order and its drop-off.
    pub dropoff: OpenOrderDropoff,
    /// Whether the order is neither delivered nor cancelled.
    pub open: bool,
}

/// The columns of an order's drop-off as `open_dropoffs` and `dropoffs_changed_since` read
/// them; the last is the order's state.
type DropoffRow = (
    String,
    String,
    String,
    i32,
    i32,
    i64,
    Option<String>,
    String,
);

fn dropoff_from_row(
    (order, store, fleet, lat_e7, lon_e7, created_ms, vehicle, state): DropoffRow,
) -> Result<DropoffChange, StoreError> {
    Ok(DropoffChange {
        open: !matches!(state.as_str(), "delivered" | "cancelled"),
        dropoff: OpenOrderDropoff {
            fleet: parse_id("order fleet", &fleet)?,
            order,
            store,
            lat_e7,
            lon_e7,
            created_ms: from_db(created_ms),
            vehicle,
        },
    })
}

/// The orders changed since `$1` (`Store::dropoffs_changed_since`): every state is named, so
/// that both engines read one range of `orders_by_updated (state, updated_ms, order_id)` per
/// state rather than every order.
const CHANGED_DROPOFFS: &str = "SELECT order_id, store, fleet, dropoff_lat_e7, dropoff_lon_e7, \
     created_ms, vehicle, state FROM orders WHERE state IN ('created', 'assigned', 'picked-up', \
     'in-transit', 'delivered', 'cancelled') AND updated_ms >= $1";

type FenceRow = (String, String, String, String, i64);

fn fence_from_row(
    (id, name, fleet, shape, created_ms): FenceRow,
) -> Result<StoredFence, StoreError> {
    Ok(StoredFence {
        fleet: parse_id("geofence fleet", &fleet)?,
        id,
        name,
        shape,
        created_ms: from_db(created_ms),
    })
}

/// What writing a custom fence did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceWrite {
    /// It was written.
    Written,
    /// Nothing was written: the fence's fleet has this many custom fences, the most allowed.
    Full(usize),
    /// Nothing was written: there is no such fence (a change).
    Missing,
}

impl Store {
    /// Stores a new custom fence, unless its fleet has `most` custom fences already. The
    /// count and the insert are one transaction that no other adds a fence of the fleet
    /// during (on PostgreSQL, whichever bridge it is on), so fences created at the same
    /// moment cannot pass `most` together.
    ///
    /// # Errors
    /// [`StoreError::Database`] if it could not be committed (an id in use included).
    pub async fn insert_geofence(
        &self,
        fence: &StoredFence,
        most: usize,
    ) -> Result<FenceWrite, StoreError> {
        let mut tx = self.begin_write().await?;
        if let Some(has) = self.fleet_is_full(&mut tx, &fence.fleet, "", most).await? {
            // Ends the transaction (and its fence lock) now, not when the connection is next
            // used.
            tx.rollback().await?;
            return Ok(FenceWrite::Full(has));
        }
        sqlx::query(
            "INSERT INTO geofences (fence_id, name, fleet, shape, created_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .bind(fence.id.as_str())
        .bind(fence.name.as_str())
        .bind(fence.fleet.as_str())
        .bind(fence.shape.as_str())
        .bind(to_db(fence.created_ms))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(FenceWrite::Written)
    }

    /// Replaces the name, fleet and shape of custom fence `fence.id` (its `created_ms` is
    /// kept), unless it moves to a fleet that has `most` custom fences already (counted as
    /// [`Store::insert_geofence`] counts).
    ///
    /// # Errors
    /// [`StoreError::Database`] if it could not be committed.
    pub async fn update_geofence(
        &self,
        fence: &StoredFence,
        most: usize,
        now_ms: u64,
    ) -> Result<FenceWrite, StoreError> {
        let mut tx = self.begin_write().await?;
        let fleet: Option<String> =
            sqlx::query_scalar("SELECT fleet FROM geofences WHERE fence_id = $1")
                .bind(fence.id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let Some(fleet) = fleet else {
            tx.rollback().await?;
            return Ok(FenceWrite::Missing);
        };
        if fleet != fence.fleet.as_str()
            && let Some(has) = self
                .fleet_is_full(&mut tx, &fence.fleet, &fence.id, most)
                .await?
        {
            tx.rollback().await?;
            return Ok(FenceWrite::Full(has));
        }
        let changed = sqlx::query(
            "UPDATE geofences SET name = $2, fleet = $3, shape = $4, updated_ms = $5 WHERE fence_id = $1",
        )
        .bind(fence.id.as_str())
        .bind(fence.name.as_str())
        .bind(fence.fleet.as_str())
        .bind(fence.shape.as_str())
        .bind(to_db(now_ms))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        // Deleted meanwhile (by another bridge, between the read and the update).
        Ok(if changed > 0 {
            FenceWrite::Written
        } else {
            FenceWrite::Missing
        })
    }

    /// How many custom fences `fleet` has (fence `except` not counted), if `most` or more;
    /// on PostgreSQL under the fleet's fence lock, held until `tx` ends
    /// (`postgres::fence_lock`; SQLite's write transactions exclude each other already).
    async fn fleet_is_full(
        &self,
        tx: &mut DbTx,
        fleet: &FleetId,
        except: &str,
        most: usize,
    ) -> Result<Option<usize>, StoreError> {
        if self.backend == Backend::Postgres {
            postgres::fence_lock(tx, fleet.as_str()).await?;
        }
        let has: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM geofences WHERE fleet = $1 AND fence_id <> $2",
        )
        .bind(fleet.as_str())
        .bind(except)
        .fetch_one(&mut **tx)
        .await?;
        let has = usize::try_from(has).unwrap_or(usize::MAX);
        Ok((has >= most).then_some(has))
    }

    /// Deletes custom fence `id`; returns whether it existed.
    ///
    /// # Errors
    /// [`StoreError::Database`] if it could not be committed.
    pub async fn delete_geofence(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let deleted = sqlx::query("DELETE FROM geofences WHERE fence_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(deleted > 0)
    }

    /// Custom fence `id`, if it exists.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] for a bad fleet.
    pub async fn geofence(&self, id: &str) -> Result<Option<StoredFence>, StoreError> {
        let row: Option<FenceRow> = sqlx::query_as(
            "SELECT fence_id, name, fleet, shape, created_ms FROM geofences WHERE fence_id = $1",
        )
        .bind(id)
        .fetch_optional(&self.read)
        .await?;
        row.map(fence_from_row).transpose()
    }

    /// Every custom fence, by id.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] for a bad fleet.
    pub async fn geofences(&self) -> Result<Vec<StoredFence>, StoreError> {
        let rows: Vec<FenceRow> = sqlx::query_as(
            "SELECT fence_id, name, fleet, shape, created_ms FROM geofences ORDER BY fence_id",
        )
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(fence_from_row).collect()
    }

    /// The drop-offs of every order neither delivered nor cancelled, with the vehicle holding
    /// each, by order id.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] for a bad fleet.
    pub async fn open_dropoffs(&self) -> Result<Vec<OpenOrderDropoff>, StoreError> {
        let rows: Vec<DropoffRow> = sqlx::query_as(
            "SELECT order_id, store, fleet, dropoff_lat_e7, dropoff_lon_e7, created_ms, vehicle, \
             state FROM orders WHERE state NOT IN ('delivered', 'cancelled') ORDER BY order_id",
        )
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|row| dropoff_from_row(row).map(|change| change.dropoff))
            .collect()
    }

    /// The orders whose last change was at or after `since_ms` (`updated_ms`, the clock of the
    /// bridge that made it), open or not, in no order: what to bring the drop-off fences in
    /// step with between two reads of every open order. Read through `orders_by_updated`
    /// (state, updated_ms), one range per state.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] for a bad fleet.
    pub async fn dropoffs_changed_since(
        &self,
        since_ms: u64,
    ) -> Result<Vec<DropoffChange>, StoreError> {
        let rows: Vec<DropoffRow> = sqlx::query_as(CHANGED_DROPOFFS)
            .bind(to_db(since_ms))
            .fetch_all(&self.read)
            .await?;
        rows.into_iter().map(dropoff_from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use shared::{OrderId, Position};

    use super::*;
    use crate::store::NewOrder;
    use crate::store::testing::on_each_backend;

    fn fence(id: &str, fleet: &str) -> StoredFence {
        StoredFence {
            id: id.into(),
            name: format!("fence {id}"),
            fleet: FleetId::new(fleet).expect("valid"),
            shape: r#"{"type":"circle","lat":52.5,"lon":13.4,"radius_m":40.0}"#.into(),
            created_ms: 1_000,
        }
    }

    on_each_backend! {
        /// Custom fences are created, read, changed and deleted; a second insert of an id fails.
        async fn geofences_crud(store) {
            assert!(store.geofences().await.expect("list").is_empty());
            assert_eq!(store.insert_geofence(&fence("gf-b", "north"), MOST).await.expect("insert"), FenceWrite::Written);
            assert_eq!(store.insert_geofence(&fence("gf-a", "demo"), MOST).await.expect("insert"), FenceWrite::Written);
            assert!(store.insert_geofence(&fence("gf-a", "demo"), MOST).await.is_err(), "id in use");
            let all = store.geofences().await.expect("list");
            assert_eq!(all.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), ["gf-a", "gf-b"]);
            assert_eq!(store.geofence("gf-a").await.expect("get"), Some(fence("gf-a", "demo")));
            let changed = StoredFence { name: "renamed".into(), shape: "{}".into(), created_ms: 9, ..fence("gf-a", "south") };
            assert_eq!(store.update_geofence(&changed, MOST, 2_000).await.expect("update"), FenceWrite::Written);
            let read = store.geofence("gf-a").await.expect("get").expect("exists");
            assert_eq!((read.name.as_str(), read.fleet.as_str(), read.shape.as_str(), read.created_ms), ("renamed", "south", "{}", 1_000));
            assert_eq!(store.update_geofence(&fence("gf-x", "demo"), MOST, 1).await.expect("update"), FenceWrite::Missing);
            assert!(store.delete_geofence("gf-a").await.expect("delete"));
            assert!(!store.delete_geofence("gf-a").await.expect("delete"), "gone already");
            assert_eq!(store.geofence("gf-a").await.expect("get"), None);
        }
    }

    /// A cap no test reaches.
    const MOST: usize = 100;

    on_each_backend! {
        /// A fleet with `most` custom fences takes no more, neither new nor moved from
        /// another fleet; its own fences still change, and one deleted makes room.
        async fn a_full_fleet_takes_no_more_fences(store) {
            for id in ["gf-1", "gf-2"] {
                assert_eq!(store.insert_geofence(&fence(id, "north"), 2).await.expect("insert"), FenceWrite::Written);
            }
            assert_eq!(store.insert_geofence(&fence("gf-3", "north"), 2).await.expect("insert"), FenceWrite::Full(2));
            assert_eq!(store.insert_geofence(&fence("gf-3", "south"), 2).await.expect("insert"), FenceWrite::Written, "per fleet");
            assert_eq!(store.update_geofence(&fence("gf-3", "north"), 2, 5).await.expect("update"), FenceWrite::Full(2), "a move in counts");
            assert_eq!(store.geofence("gf-3").await.expect("get").map(|f| f.fleet.to_string()).as_deref(), Some("south"), "not moved");
            let renamed = StoredFence { name: "renamed".into(), ..fence("gf-1", "north") };
            assert_eq!(store.update_geofence(&renamed, 2, 5).await.expect("update"), FenceWrite::Written, "a change in place");
            assert!(store.delete_geofence("gf-2").await.expect("delete"));
            assert_eq!(store.update_geofence(&fence("gf-3", "north"), 2, 5).await.expect("update"), FenceWrite::Written);
            let north = store.geofences().await.expect("list").into_iter().filter(|f| f.fleet.as_str() == "north").count();
            assert_eq!(north, 2);
        }
    }

    /// Two stores on one database (two bridges on one PostgreSQL) create fences of one
    /// fleet at the same moment: together they make no more than the cap allows.
    #[tokio::test]
    async fn two_stores_creating_at_once_keep_the_cap() {
        let (a, b) = crate::store::testing::two_postgres().await;
        let mut creates = tokio::task::JoinSet::new();
        for i in 0..16 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            creates.spawn(async move {
                store
                    .insert_geofence(&fence(&format!("gf-{i}"), "north"), 3)
                    .await
            });
        }
        let writes: Vec<FenceWrite> = creates
            .join_all()
            .await
            .into_iter()
            .map(|write| write.expect("no store error"))
            .collect();
        let made = writes.iter().filter(|w| **w == FenceWrite::Written).count();
        assert_eq!(made, 3, "{writes:?}");
        assert!(
            writes
                .iter()
                .all(|w| matches!(w, FenceWrite::Written | FenceWrite::Full(3))),
            "{writes:?}"
        );
        assert_eq!(a.geofences().await.expect("list").len(), 3);
        a.close().await;
        b.close().await;
    }

    /// Order `id` of store-1 (fleet demo), its drop-off at `lat_e7`.
    fn order(id: &str, lat_e7: i32) -> NewOrder {
        NewOrder {
            order: OrderId::new(id).expect("valid"),
            store: "store-1".into(),
            fleet: FleetId::new("demo").expect("valid"),
            customer: "c".into(),
            pickup: Position::new(525_200_000, 134_050_000),
            dropoff: Position::new(lat_e7, 134_060_000),
        }
    }

    on_each_backend! {
        /// Open orders list their drop-offs; a delivered order does not.
        async fn open_dropoffs_follow_the_orders(store) {
            store.create_order(&order("o-1", 525_210_000)).await.expect("create");
            store.create_order(&order("o-2", 525_220_000)).await.expect("create");
            let open = store.open_dropoffs().await.expect("open");
            assert_eq!(open.len(), 2);
            assert_eq!((open[0].order.as_str(), open[0].store.as_str(), open[0].lat_e7, open[0].lon_e7), ("o-1", "store-1", 525_210_000, 134_060_000));
            assert_eq!(open[1].vehicle, None, "nobody holds o-2 yet");
            let carrier = shared::VehicleId::new("demo-0001").expect("valid");
            store.assign(&OrderId::new("o-2").expect("valid"), &carrier).await.expect("assign");
            let open = store.open_dropoffs().await.expect("open");
            assert_eq!(open[1].vehicle.as_deref(), Some("demo-0001"), "o-2 is demo-0001's");
            sqlx::query("UPDATE orders SET state = 'delivered' WHERE order_id = 'o-1'")
                .execute(&store.write)
                .await
                .expect("deliver");
            let open = store.open_dropoffs().await.expect("open");
            assert_eq!(open.iter().map(|o| o.order.as_str()).collect::<Vec<_>>(), ["o-2"]);
        }
    }

    on_each_backend! {
        /// The orders changed at or after a time are read with their drop-offs, closed ones
        /// too (their fences go); those changed before it are not.
        async fn dropoffs_changed_since_include_closed_orders(store) {
            for (id, lat_e7) in [("o-1", 525_210_000), ("o-2", 525_220_000), ("o-3", 525_230_000)] {
                store.create_order(&order(id, lat_e7)).await.expect("create");
            }
            for (id, updated_ms, state) in [("o-1", 1_000_i64, "created"), ("o-2", 2_000, "delivered"), ("o-3", 3_000, "created")] {
                sqlx::query("UPDATE orders SET updated_ms = $1, state = $2 WHERE order_id = $3")
                    .bind(updated_ms)
                    .bind(state)
                    .bind(id)
                    .execute(&store.write)
                    .await
                    .expect("change");
            }
            let mut changed = store.dropoffs_changed_since(2_000).await.expect("changed");
            changed.sort_by(|a, b| a.dropoff.order.cmp(&b.dropoff.order));
            let seen: Vec<(&str, bool, i32)> = changed.iter().map(|c| (c.dropoff.order.as_str(), c.open, c.dropoff.lat_e7)).collect();
            assert_eq!(seen, [("o-2", false, 525_220_000), ("o-3", true, 525_230_000)]);
            assert_eq!((changed[1].dropoff.store.as_str(), changed[1].dropoff.fleet.as_str(), changed[1].dropoff.lon_e7), ("store-1", "demo", 134_060_000));
            assert!(store.dropoffs_changed_since(3_001).await.expect("changed").is_empty());
        }
    }

    /// The read of changes is a range per state in an index, not a scan of every order.
    #[tokio::test]
    async fn dropoffs_changed_since_read_a_range() {
        let store = crate::store::testing::sqlite().await;
        let plan = crate::store::testing::sqlite_plan(&store, CHANGED_DROPOFFS, &[Ok(1)]).await;
        assert!(
            plan.contains("orders_by_updated (state=? AND updated_ms>?)"),
            "{plan}"
        );
    }

    /// The same on PostgreSQL: the index can serve it (sequential scans off for the check).
    #[tokio::test]
    async fn dropoffs_changed_since_read_a_range_on_postgres() {
        let store = crate::store::testing::postgres().await;
        let plan = crate::store::testing::postgres_plan(&store, CHANGED_DROPOFFS, &[Ok(1)]).await;
        // An index scan (plain or bitmap) of orders_by_updated, bounded by the time.
        let bounded = plan
            .lines()
            .any(|l| l.contains("Index Cond") && l.contains("updated_ms >= "));
        assert!(
            plan.contains("Index Scan") && plan.contains("orders_by_updated") && bounded,
            "{plan}"
        );
    }
}
