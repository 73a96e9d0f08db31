//! An order's life: its states, and how a delivery event moves it on.
//!
//! An order's state only moves forward: `created → assigned → picked-up → in-transit →
//! delivered`, or to `cancelled` from any state before `delivered` (who may cancel when is
//! `delivery`'s rule). Before pickup an order may also go back from `assigned` to `created`
//! (unassigned: reassigned, or re-offered because its vehicle went offline). A delivery event is stored whatever it says; one that cannot move its order
//! (an unknown order, another vehicle's order, a step behind the order's state) is stored
//! with an [`EventFlag`] saying why, never dropped. The store applies these rules inside its
//! transactions ([`judge`], [`OrderState::may_be_assigned`]); `delivery` places and assigns
//! orders by them.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use shared::{DeliveryKind, VehicleId};

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OrderState {
    /// Created, no vehicle yet.
    Created,
    /// A vehicle was assigned and is on its way to the pickup.
    Assigned,
    /// The vehicle has the parcel.
    PickedUp,
    /// The vehicle is on its way to the customer.
    InTransit,
    /// The customer has the parcel. The vehicle is free again.
    Delivered,
    /// Cancelled (by its store, a dispatcher or an admin) before it was delivered. The vehicle
    /// that held it, if any, is free again.
    Cancelled,
}

impl OrderState {
    /// Every state, in the order of an order's life.
    pub(crate) const ALL: [Self; 6] = [
        Self::Created,
        Self::Assigned,
        Self::PickedUp,
        Self::InTransit,
        Self::Delivered,
        Self::Cancelled,
    ];

    /// The state's name: `created`, `assigned`, `picked-up`, `in-transit`, `delivered`,
    /// `cancelled`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Assigned => "assigned",
            Self::PickedUp => "picked-up",
            Self::InTransit => "in-transit",
            Self::Delivered => "delivered",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state a delivery event of `kind` moves its order to.
    pub(crate) const fn after(kind: DeliveryKind) -> Self {
        match kind {
            DeliveryKind::Pickup => Self::PickedUp,
            DeliveryKind::InTransit => Self::InTransit,
            DeliveryKind::Delivered => Self::Delivered,
        }
    }

    /// Whether the order may still be given to a vehicle (or moved to another one): it has
    /// not been picked up.
    pub(crate) fn may_be_assigned(self) -> bool {
        self <= Self::Assigned
    }

    /// Whether the order's life is over: `delivered` or `cancelled`. Nothing moves it any more.
    pub(crate) fn is_final(self) -> bool {
        matches!(self, Self::Delivered | Self::Cancelled)
    }
}

/// Why a recorded delivery event did not move its order the usual one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventFlag {
    /// No order with this id (yet). The order is not changed.
    UnknownOrder,
    /// The order is not assigned to the reporting vehicle (another one, or none). The order is
    /// not changed.
    WrongVehicle,
    /// The event is behind the order's state (it arrived late, after a later step). The order
    /// is not changed.
    OutOfOrder,
    /// The same step was reported again under another event number. The order is not changed.
    Repeated,
    /// The event jumps over a step whose event has not arrived (yet): the order moves to the
    /// event's state anyway.
    SkippedStep,
    /// The order was cancelled: the event (from the vehicle that held it, reporting late or
    /// before it heard of the cancellation) is kept, the order is not changed.
    CancelledOrder,
}

impl EventFlag {
    /// Every flag.
    pub(crate) const ALL: [Self; 6] = [
        Self::UnknownOrder,
        Self::WrongVehicle,
        Self::OutOfOrder,
        Self::Repeated,
        Self::SkippedStep,
        Self::CancelledOrder,
    ];

    /// Whether an event with this flag is suspect: it does not come from the vehicle holding
    /// the order (another vehicle, or an order nobody placed). Its order is not changed, and it
    /// is not delivered to the order's vendor as genuine (`delivery::Hub::record_delivery`).
    pub(crate) const fn is_suspect(self) -> bool {
        matches!(self, Self::UnknownOrder | Self::WrongVehicle)
    }

    /// The flag's name: `unknown-order`, `wrong-vehicle`, `out-of-order`, `repeated`,
    /// `skipped-step`, `cancelled-order`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::UnknownOrder => "unknown-order",
            Self::WrongVehicle => "wrong-vehicle",
            Self::OutOfOrder => "out-of-order",
            Self::Repeated => "repeated",
            Self::SkippedStep => "skipped-step",
            Self::CancelledOrder => "cancelled-order",
        }
    }
}

/// The value of `all` whose name is `s`, or an error naming `what` was not recognised.
fn by_name<T: Copy>(
    all: &[T],
    name: impl Fn(T) -> &'static str,
    s: &str,
    what: &str,
) -> Result<T, String> {
    all.iter()
        .copied()
        .find(|value| name(*value) == s)
        .ok_or_else(|| format!("unknown {what} {s:?}"))
}

impl FromStr for OrderState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        by_name(&Self::ALL, Self::as_str, s, "order state")
    }
}

impl FromStr for EventFlag {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        by_name(&Self::ALL, Self::as_str, s, "event flag")
    }
}

/// The kind of a delivery event by its name (`pickup`, `in-transit`, `delivered`).
///
/// # Errors
/// A message naming the unknown kind.
pub(crate) fn delivery_kind(s: &str) -> Result<DeliveryKind, String> {
    const ALL: [DeliveryKind; 3] = [
        DeliveryKind::Pickup,
        DeliveryKind::InTransit,
        DeliveryKind::Delivered,
    ];
    by_name(&ALL, DeliveryKind::as_str, s, "event kind")
}

impl fmt::Display for OrderState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for EventFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a delivery event of `kind` reported by `vehicle` relates to its order (its state and
/// the vehicle holding it, `None` if there is no such order): the flag to record with the
/// event, and the state to move the order to.
pub(crate) fn judge(
    order: Option<(OrderState, Option<&str>)>,
    vehicle: &VehicleId,
    kind: DeliveryKind,
) -> (Option<EventFlag>, Option<OrderState>) {
    let Some((state, holder)) = order else {
        return (Some(EventFlag::UnknownOrder), None);
    };
    if holder != Some(vehicle.as_str()) {
        return (Some(EventFlag::WrongVehicle), None);
    }
    if state == OrderState::Cancelled {
        return (Some(EventFlag::CancelledOrder), None);
    }
    let target = OrderState::after(kind);
    if target == state {
        (Some(EventFlag::Repeated), None)
    } else if target < state {
        (Some(EventFlag::OutOfOrder), None)
    } else if target as u8 == state as u8 + 1 {
        (None, Some(target))
    } else {
        (Some(EventFlag::SkippedStep), Some(target))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn id<T: FromStr>(s: &str) -> T
    where
        T::Err: fmt::Debug,
    {
        s.parse().expect("valid id")
    }

    #[test]
    fn judge_covers_the_state_machine() {
        let v: VehicleId = id("v-1");
        let mine = |state| Some((state, Some("v-1")));
        use DeliveryKind::{Delivered as D, InTransit as T, Pickup as P};
        use OrderState::{Assigned, Cancelled, Created, Delivered, InTransit, PickedUp};
        assert_eq!(judge(mine(Assigned), &v, P), (None, Some(PickedUp)));
        for kind in [P, T, D] {
            assert_eq!(
                judge(mine(Cancelled), &v, kind),
                (Some(EventFlag::CancelledOrder), None),
                "a cancelled order never moves"
            );
        }
        assert_eq!(
            judge(Some((Cancelled, Some("v-2"))), &v, P),
            (Some(EventFlag::WrongVehicle), None)
        );
        assert_eq!(judge(mine(PickedUp), &v, T), (None, Some(InTransit)));
        assert_eq!(judge(mine(InTransit), &v, D), (None, Some(Delivered)));
        assert_eq!(
            judge(mine(Assigned), &v, D),
            (Some(EventFlag::SkippedStep), Some(Delivered))
        );
        assert_eq!(
            judge(mine(Delivered), &v, P),
            (Some(EventFlag::OutOfOrder), None)
        );
        assert_eq!(
            judge(mine(Delivered), &v, D),
            (Some(EventFlag::Repeated), None)
        );
        assert_eq!(
            judge(Some((Created, None)), &v, P),
            (Some(EventFlag::WrongVehicle), None)
        );
        assert_eq!(judge(None, &v, P), (Some(EventFlag::UnknownOrder), None));
    }

    /// Every value's name parses back to it, and is what it serializes to.
    fn assert_names_round_trip<T>(all: &[T], name: impl Fn(T) -> &'static str)
    where
        T: Copy + fmt::Debug + PartialEq + FromStr<Err = String> + serde::Serialize,
    {
        for &value in all {
            assert_eq!(name(value).parse(), Ok(value));
            assert_eq!(
                serde_json::to_value(value).expect("json"),
                json!(name(value))
            );
        }
    }

    #[test]
    fn names_round_trip() {
        use EventFlag::{
            CancelledOrder, OutOfOrder, Repeated, SkippedStep, UnknownOrder, WrongVehicle,
        };
        use OrderState::{Assigned, Cancelled, Created, Delivered, InTransit, PickedUp};
        let states = [Created, Assigned, PickedUp, InTransit, Delivered, Cancelled];
        assert_names_round_trip(&states, OrderState::as_str);
        let flags = [
            UnknownOrder,
            WrongVehicle,
            OutOfOrder,
            Repeated,
            SkippedStep,
            CancelledOrder,
        ];
        assert_names_round_trip(&flags, EventFlag::as_str);
        for kind in [
            DeliveryKind::Pickup,
            DeliveryKind::InTransit,
            DeliveryKind::Delivered,
        ] {
            assert_eq!(delivery_kind(kind.as_str()), Ok(kind));
        }
        assert!("lost".parse::<OrderState>().is_err());
        assert!(delivery_kind("lost").is_err());
    }

    #[test]
    fn only_events_not_from_the_holder_are_suspect() {
        let suspect: Vec<bool> = EventFlag::ALL.map(EventFlag::is_suspect).to_vec();
        assert_eq!(suspect, [true, true, false, false, false, false]);
    }

    #[test]
    fn only_orders_not_picked_up_may_be_assigned() {
        let assignable: Vec<bool> = OrderState::ALL.map(OrderState::may_be_assigned).to_vec();
        assert_eq!(assignable, [true, true, false, false, false, false]);
        let last: Vec<bool> = OrderState::ALL.map(OrderState::is_final).to_vec();
        assert_eq!(last, [false, false, false, false, true, true]);
    }
}
