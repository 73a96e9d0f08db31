//! The numbers of the heartbeat history's tracks (schema 8): a track is the heartbeats of one
//! vehicle in one fleet, `tracks` gives each (vehicle, fleet) a number the first time a
//! heartbeat of it is written, and every heartbeat row carries that number instead of the two
//! names. A heartbeat then binds only integers: no text copied on its way to the database
//! (five allocations per name through sqlx's `Any`), a smaller row and track index.
//!
//! The store keeps the numbers it has used in memory ([`TrackKeys`]): one entry per (vehicle,
//! fleet) written since it opened, as many as the vehicles that report. A number missing there
//! is made (`INSERT ... ON CONFLICT DO NOTHING`, committed on its own) and read back before the
//! heartbeats that use it are written, so a row never names a track that is not committed,
//! even if its own transaction rolls back. Bridges that share a PostgreSQL database make the
//! same track at once without harm: one insert wins, both read its number. A number is never
//! removed or reused.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use shared::{FleetId, VehicleId};

use super::backend::{Backend, parse_id};
use super::error::StoreError;
use super::pool::DbPool;

/// The most (vehicle, fleet) pairs one statement makes or reads (two bound values each: far
/// below both backends' limits).
const PAIRS_PER_STATEMENT: usize = 256;

/// The track numbers the store has used, by vehicle (then fleet: nearly always one).
#[derive(Debug, Default)]
pub(super) struct TrackKeys {
    known: Mutex<HashMap<VehicleId, Vec<(FleetId, i64)>>>,
}

impl TrackKeys {
    /// The number of each track of `pairs` (vehicle, fleet), in order: from memory, else from
    /// `tracks` in `pool`, where the missing ones are made (and committed) first.
    ///
    /// # Errors
    /// [`StoreError::Database`] if a missing number could not be made or read,
    /// [`StoreError::Corrupt`] if `tracks` does not give one it was asked for.
    pub(super) async fn of(
        &self,
        pool: &DbPool,
        backend: Backend,
        pairs: &[(&VehicleId, &FleetId)],
    ) -> Result<Vec<i64>, StoreError> {
        if let Some(numbers) = self.known(pairs) {
            return Ok(numbers);
        }
        let made = make(pool, backend, &self.missing(pairs)).await?;
        {
            let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
            for (vehicle, fleet, id) in made {
                remember(&mut known, vehicle, fleet, id);
            }
        }
        self.known(pairs).ok_or_else(|| {
            StoreError::Corrupt("`tracks` did not give a track it was asked for".into())
        })
    }

    /// The number of each track of `pairs`, in order, if all are in memory.
    fn known(&self, pairs: &[(&VehicleId, &FleetId)]) -> Option<Vec<i64>> {
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        pairs
            .iter()
            .map(|(vehicle, fleet)| find(&known, vehicle, fleet))
            .collect()
    }

    /// The pairs of `pairs` that have no number in memory, each once, sorted: bridges that
    /// make the same tracks at once on PostgreSQL take their rows' locks in the same order,
    /// and wait for each other instead of deadlocking.
    fn missing<'p>(
        &self,
        pairs: &[(&'p VehicleId, &'p FleetId)],
    ) -> Vec<(&'p VehicleId, &'p FleetId)> {
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        let mut missing: Vec<(&VehicleId, &FleetId)> = pairs
            .iter()
            .filter(|(vehicle, fleet)| find(&known, vehicle, fleet).is_none())
            .copied()
            .collect();
        drop(known);
        missing.sort_unstable();
        missing.dedup();
        missing
    }
}

/// `vehicle`'s track number in `fleet`, if known.
fn find(
    known: &HashMap<VehicleId, Vec<(FleetId, i64)>>,
    vehicle: &VehicleId,
    fleet: &FleetId,
) -> Option<i64> {
    known
        .get(vehicle)?
        .iter()
        .find(|(f, _)| f == fleet)
        .map(|(_, id)| *id)
}

/// Keeps `id` as `vehicle`'s track number in `fleet`.
fn remember(
    known: &mut HashMap<VehicleId, Vec<(FleetId, i64)>>,
    vehicle: VehicleId,
    fleet: FleetId,
    id: i64,
) {
    let fleets = known.entry(vehicle).or_default();
    if !fleets.iter().any(|(f, _)| *f == fleet) {
        fleets.push((fleet, id));
    }
}

/// Makes the tracks `pairs` in `tracks` where missing (committed) and reads their numbers.
async fn make(
    pool: &DbPool,
    backend: Backend,
    pairs: &[(&VehicleId, &FleetId)],
) -> Result<Vec<(VehicleId, FleetId, i64)>, StoreError> {
    let mut made = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(PAIRS_PER_STATEMENT) {
        let mut insert = String::from("INSERT INTO tracks (vehicle, fleet) VALUES ");
        backend.push_rows(&mut insert, chunk.len(), 2);
        insert.push_str(" ON CONFLICT (vehicle, fleet) DO NOTHING");
        let mut select = String::from("SELECT id, vehicle, fleet FROM tracks WHERE ");
        backend.push_any_of(&mut select, chunk.len(), &["vehicle", "fleet"]);
        // Only placeholders are formatted in; every value is bound.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(insert));
        for (vehicle, fleet) in chunk {
            query = query.bind(vehicle.as_str()).bind(fleet.as_str());
        }
        query.execute(pool).await?;
        // Only placeholders are formatted in; every value is bound.
        let mut query = sqlx::query_as(sqlx::AssertSqlSafe(select));
        for (vehicle, fleet) in chunk {
            query = query.bind(vehicle.as_str()).bind(fleet.as_str());
        }
        let rows: Vec<(i64, String, String)> = query.fetch_all(pool).await?;
        for (id, vehicle, fleet) in rows {
            let vehicle = parse_id("track vehicle", &vehicle)?;
            let fleet = parse_id("track fleet", &fleet)?;
            made.push((vehicle, fleet, id));
        }
    }
    Ok(made)
}
