//! An order as a row of the `orders` table and as the bridge shows it ([`OrderView`]): the
//! columns every read of a whole order takes, and how a row becomes a view. Below both the
//! order queries (`store::order`) and the group commit (`store::group`), which read orders
//! in their own transactions.

use shared::{DeliveryKind, FleetId, OrderId, Position, VehicleId};

use super::backend::{from_db, parse_id};
use super::error::StoreError;
use crate::domain::order::{EventFlag, OrderState};

/// What an entry of an order's timeline records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum TimelineKind {
    /// The order was assigned to a vehicle (bridge clock).
    Assigned,
    /// A vehicle reported a delivery step (device clock).
    Delivery(DeliveryKind),
}

impl TimelineKind {
    /// `assigned`, `pickup`, `in-transit` or `delivered`.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Assigned => "assigned",
            Self::Delivery(kind) => kind.as_str(),
        }
    }
}

/// One entry of an order's timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TimelineEntry {
    /// What happened.
    pub(crate) kind: TimelineKind,
    /// When, ms since the Unix epoch.
    pub(crate) ts_ms: u64,
    /// Where the vehicle was (delivery events only).
    pub(crate) position: Option<Position>,
    /// The vehicle assigned, or the vehicle that reported.
    pub(crate) vehicle: VehicleId,
    /// The vehicle's event number (delivery events only).
    pub(crate) seq: Option<u32>,
    /// Why the event did not move the order the usual step, if it did not.
    pub(crate) flag: Option<EventFlag>,
}

/// An order with its state and timeline, for `GET /api/orders/{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OrderView {
    /// The order id.
    pub(crate) order: OrderId,
    /// The vendor's store.
    pub(crate) store: String,
    /// The fleet delivering it.
    pub(crate) fleet: FleetId,
    /// Who receives the parcel.
    pub(crate) customer: String,
    /// Where it is in its life.
    pub(crate) state: OrderState,
    /// The vehicle assigned, if any.
    pub(crate) vehicle: Option<VehicleId>,
    /// Where the parcel is collected.
    pub(crate) pickup: Position,
    /// Where the parcel goes.
    pub(crate) dropoff: Position,
    /// When it was created, ms since the Unix epoch (bridge clock).
    pub(crate) created_ms: u64,
    /// When it last changed, ms since the Unix epoch (bridge clock).
    pub(crate) updated_ms: u64,
    /// Its assignments and delivery events, by time (assignments on the bridge's clock,
    /// events on the device's).
    pub(crate) timeline: Vec<TimelineEntry>,
}

/// The columns of an order row as [`OrderRow`] holds them, in that order: a macro, so that
/// fixed statement texts can be put together with `concat!`.
macro_rules! order_fields {
    () => {
        "store, fleet, customer, pickup_lat_e7, pickup_lon_e7, dropoff_lat_e7, dropoff_lon_e7, \
         state, vehicle, created_ms, updated_ms"
    };
}
pub(super) use order_fields;

/// The columns of an order row, as stored ([`order_fields`]).
pub(super) type OrderRow = (
    String,
    String,
    String,
    i32,
    i32,
    i32,
    i32,
    String,
    Option<String>,
    i64,
    i64,
);

/// The columns of the order `$1` (see [`order_fields`]).
pub(super) const ORDER_COLUMNS: &str = concat!(
    "SELECT ",
    order_fields!(),
    " FROM orders WHERE order_id = $1"
);

/// The order of a row that holds its id, then the columns of [`order_fields`] (`SELECT
/// order_id, ...`): its id as stored, and the order.
pub(super) fn order_with_id(row: &sqlx::any::AnyRow) -> Result<(String, OrderView), StoreError> {
    use sqlx::Row as _;
    let id: String = row.try_get(0)?;
    let fields: OrderRow = (
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
        row.try_get(5)?,
        row.try_get(6)?,
        row.try_get(7)?,
        row.try_get(8)?,
        row.try_get(9)?,
        row.try_get(10)?,
        row.try_get(11)?,
    );
    let order = order_from_row(&parse_id("order id", &id)?, fields)?;
    Ok((id, order))
}

/// The order `id` as stored in `row`, without its timeline.
pub(super) fn order_from_row(id: &OrderId, row: OrderRow) -> Result<OrderView, StoreError> {
    let (store, fleet, customer, p_lat, p_lon, d_lat, d_lon, state, vehicle, created, updated) =
        row;
    Ok(OrderView {
        order: id.clone(),
        store,
        fleet: parse_id("order fleet", &fleet)?,
        customer,
        state: parse_id("order state", &state)?,
        vehicle: vehicle
            .as_deref()
            .map(|v| parse_id("order vehicle", v))
            .transpose()?,
        pickup: Position::new(p_lat, p_lon),
        dropoff: Position::new(d_lat, d_lon),
        created_ms: from_db(created),
        updated_ms: from_db(updated),
        timeline: Vec::new(),
    })
}
