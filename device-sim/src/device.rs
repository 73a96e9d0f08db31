//! The per-vehicle state machine: what a tracker would run, minus the radio.
//!
//! A [`Device`] knows who it is ([`VehicleId`], [`FleetId`]), where it is (a [`Driver`] on the
//! [`StreetGrid`]), its battery, its heartbeat schedule and sequence number, and its current
//! [`Mission`]. It does no I/O and owns no clock: the caller passes the time in milliseconds
//! since the Unix epoch to [`Device::tick`] (or [`Device::advance`]) from a timer, publishes
//! what [`Device::next_publication`] hands out while it has a link, and hands it every command
//! that arrives. Nothing here allocates; a `Device` is under 5 KiB, most of it the
//! store-and-forward [`Outbox`], and can live in a `static`.
//!
//! ```text
//!            ReturnToDepot             arrives
//! Cruising ────────────────► ToDepot ──────────► AtDepot (charging, ignition off)
//!    ▲  │     or battery low                         │ recharged (if it came by itself)
//!    │  │ ◄──────────────────────────────────────────┘
//!    ▲  │ AssignOrder                                │ AssignOrder
//!    │  ▼                                            ▼
//!    │  Delivery: ToPickup ─► AtPickup ─► ToDropoff ─► AtDropoff ─┐
//!    └─────────────────────────────────────────────────────────────┘ handed over
//! ```
//!
//! Time advances in fixed [`STEP_MS`] steps whatever the calling rate, so the same seed and the
//! same step times give the same drive, and a late timer does not make a vehicle jump.
//!
//! # Delivery events
//! A delivery reports three [`DeliveryEvent`]s, each with the next per-vehicle event `seq`, the
//! order, the position and the time of the step it happened in:
//! `pickup` when the parcel is on board (the end of the handover at the vendor), `in-transit`
//! when the vehicle drives off with it, `delivered` when it has been handed to the customer.
//! Events go into the [`Outbox`] and leave it only when the broker acknowledges them, so a
//! device with a full event queue must not make more: it answers new orders
//! [`AckResult::Busy`] unless the queue has room for a whole order's events, and a delivery
//! whose next event does not fit waits at the handover ([`Device::is_stalled`]) until the link
//! is back and the queue drains.
//!
//! # Heartbeat cadence
//! Heartbeats follow the configured interval while the vehicle drives; parked (at the depot,
//! at a handover, or out of battery) it reports [`PARKED_INTERVAL_FACTOR`] times less often,
//! on the same phase, and at the normal rate again as soon as it drives off.
//!
//! # External positioning
//! A tracker with a GPS receiver feeds its fixes with [`Device::gps_fix`]. From the first fix
//! on the device is *externally positioned*: heartbeats and events carry the last fix's
//! position, speed and heading, [`StatusFlags::GPS_FIX`] says whether that fix is current
//! ([`Device::gps_lost`] clears it), [`StatusFlags::MOVING`] is a ground speed of at least
//! [`MOVING_MIN_CM_S`], and the simulated driver no longer moves the vehicle nor drains its
//! battery ([`Device::set_battery_pct`] reports a measured charge). Nothing arrives by itself
//! any more: the person at the wheel says when a parcel has changed hands, with
//! [`Device::complete_handover`] (`pickup` at the vendor, `delivered` at the customer), and
//! driving off with the parcel (the first moving fix after `pickup`) is `in-transit`. Orders
//! are accepted anywhere on the globe, not only in the street grid. A device that never gets
//! a fix behaves exactly as before: the simulator does not use any of this.
//!
//! # Sealing
//! Everything the device publishes is sealed ([`shared::seal()`]) with its 32-byte key for its
//! own topic, under a [`Counter`] read from the device clock. The sealing calls take that clock
//! (`clock_ms`) separately from the simulation time (`now_ms`): on a tracker they are the
//! same clock; the simulator passes its real-time clock, so a sped-up simulation does not
//! push counters into the future, where the receivers' replay guards would hold them against
//! the vehicle's next, normal run.

use shared::{
    AckResult, CodecError, Command, CommandAck, CommandKind, Counter, DeliveryEvent, DeliveryKind,
    DeviceKey, FleetId, Heartbeat, MAX_PAYLOAD, OfflineReason, OrderId, Position, Status,
    StatusFlags, Topic, TopicKind, VehicleId, WireMessage, topic::TopicName,
};

use crate::outbox::Outbox;
use crate::route::{Driver, Node, StreetGrid};

/// The heartbeat interval a device starts with: 1 Hz.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u32 = 1_000;
/// The shortest heartbeat interval a device accepts: 10 Hz.
pub const MIN_HEARTBEAT_INTERVAL_MS: u32 = 100;
/// The longest heartbeat interval a device accepts: one hour.
pub const MAX_HEARTBEAT_INTERVAL_MS: u32 = 3_600_000;
/// Below this charge the heartbeat carries [`StatusFlags::LOW_BATTERY`].
pub const LOW_BATTERY_PCT: u8 = 20;
/// The simulation step: time advances in whole steps of this many milliseconds.
pub const STEP_MS: u64 = 100;
/// Parked, a vehicle sends heartbeats this many times less often.
pub const PARKED_INTERVAL_FACTOR: u32 = 5;
/// The events one order produces: `pickup`, `in-transit`, `delivered`.
pub const EVENTS_PER_ORDER: usize = 3;
/// Externally positioned, a ground speed of at least this (1.8 km/h) counts as moving: below
/// it a parked receiver's jitter would look like driving.
pub const MOVING_MIN_CM_S: u16 = 50;

/// At most this much time is simulated in one call; a longer gap (a suspended host) is skipped,
/// the vehicle standing still.
const MAX_CATCH_UP_MS: u64 = 10 * 60 * 1000;
/// Battery use while driving, in percent per kilometre (an e-van's 150 km range).
const DRAIN_PCT_PER_KM: f32 = 0.6;
/// Charging at the depot, in percent per minute (a DC fast charger).
const CHARGE_PCT_PER_MIN: f32 = 2.0;
/// A vehicle that went to the depot to recharge by itself drives off again at this charge.
const RECHARGED_PCT: f32 = 95.0;
/// How long a parcel handover at the vendor or the customer takes, in milliseconds.
const HANDOVER_MS: core::ops::Range<u32> = 8_000..20_000;

/// Who a device is and where it drives.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceConfig {
    /// The vehicle's id, its MQTT client id and topic level.
    pub vehicle: VehicleId,
    /// The fleet the vehicle belongs to.
    pub fleet: FleetId,
    /// The streets it drives on.
    pub grid: StreetGrid,
    /// Where [`CommandKind::ReturnToDepot`] sends it.
    pub depot: Node,
    /// Where it starts; `None` picks a random intersection from the seed.
    pub start: Option<Node>,
    /// The initial heartbeat interval, clamped into
    /// [`MIN_HEARTBEAT_INTERVAL_MS`] ..= [`MAX_HEARTBEAT_INTERVAL_MS`].
    pub heartbeat_interval_ms: u32,
    /// The MQTT QoS of heartbeats: 0 (the topic scheme's rule) or 1.
    pub heartbeat_qos: u8,
    /// The key everything the vehicle publishes is sealed with.
    pub key: DeviceKey,
}

impl DeviceConfig {
    /// A vehicle with its depot at the grid centre, a random start, 1 Hz heartbeats at QoS 0
    /// and the open-mode key ([`shared::open_mode_key`]).
    pub fn new(vehicle: VehicleId, fleet: FleetId, grid: StreetGrid) -> Self {
        let key = shared::open_mode_key(&vehicle);
        Self {
            vehicle,
            fleet,
            grid,
            depot: Node::CENTRE,
            start: None,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            heartbeat_qos: TopicKind::Heartbeat.qos(),
            key,
        }
    }
}

/// What the vehicle is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mission {
    /// Driving around the city at random, free for an order.
    Cruising,
    /// Driving back to the depot, free for an order.
    ToDepot,
    /// Parked at the depot with the ignition off, charging, free for an order.
    AtDepot,
    /// Carrying out an order: busy.
    Delivery(Delivery),
}

/// An accepted order and how far along it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The order.
    pub order: OrderId,
    /// The intersection nearest to the pickup position.
    pub pickup: Node,
    /// The intersection nearest to the drop-off position.
    pub dropoff: Node,
    /// The step the delivery is at.
    pub stage: DeliveryStage,
    /// Whether `in-transit` has been reported (on driving off from the pickup).
    pub in_transit: bool,
}

/// The steps of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStage {
    /// Driving to the vendor.
    ToPickup,
    /// Collecting the parcel; `left_ms` to go.
    AtPickup {
        /// Milliseconds until the parcel is on board.
        left_ms: u32,
    },
    /// Driving to the customer with the parcel.
    ToDropoff,
    /// Handing the parcel over; `left_ms` to go.
    AtDropoff {
        /// Milliseconds until the parcel is handed over.
        left_ms: u32,
    },
}

/// A sealed payload ([`shared::seal()`]: version, counter, postcard body, tag).
pub type Payload = heapless::Vec<u8, MAX_PAYLOAD>;

/// An MQTT message ready to publish: topic, sealed payload, and the QoS and retain flag the
/// topic scheme prescribes for its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The topic name.
    pub topic: TopicName,
    /// The sealed message ([`shared::seal()`]: version, counter, postcard body, tag).
    pub payload: Payload,
    /// The MQTT QoS, 0 or 1.
    pub qos: u8,
    /// Whether the broker retains it.
    pub retain: bool,
}

/// The next thing to transmit from the [`Outbox`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// What to publish.
    pub publication: Publication,
    /// For a delivery event, its `seq`: report the broker's acknowledgement with
    /// [`Device::event_acked`]. `None` for a heartbeat, which is gone once handed out.
    pub event_seq: Option<u32>,
}

/// What [`Device::seal_next`] sealed into its caller's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// The MQTT QoS, 0 or 1.
    pub qos: u8,
    /// Whether the broker retains it.
    pub retain: bool,
    /// For a delivery event, its `seq` (as in [`OutboxItem::event_seq`]); `None` for a
    /// heartbeat.
    pub event_seq: Option<u32>,
}

/// A position fix from a GPS receiver: see [external positioning](self#external-positioning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GpsFix {
    /// Where the vehicle is.
    pub pos: Position,
    /// Ground speed in centimetres per second.
    pub speed_cm_s: u16,
    /// Course over ground in degrees clockwise from true north, 0 ..= 359.
    pub heading_deg: u16,
}

/// The last fix of an externally positioned device, and whether it is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ExternalFix {
    fix: GpsFix,
    current: bool,
}

/// What [`Device::complete_handover`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// The parcel is on board: `pickup` is queued; the vehicle heads for the customer.
    PickedUp,
    /// The parcel was handed to the customer: `delivered` is queued (after `in-transit` if the
    /// vehicle never drove off); the vehicle is free again.
    Delivered,
    /// There is no delivery under way: nothing happened.
    NoDelivery,
    /// The [`Outbox`] has no room for the handover's events: nothing happened; try again once
    /// the broker has acknowledged queued events.
    OutboxFull,
}

/// The last will of every connection: sealed by [`Device::connect_statuses`] and
/// `crate::vehicle::Vehicle::begin` with the will's counter of [`Device::connect_counters`].
pub const CONNECTION_LOST: Status = Status::Offline(OfflineReason::ConnectionLost);

/// The two statuses sealed when connecting: see [`Device::connect_statuses`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectStatuses {
    /// `Online`, sealed with counter `c`: publish it once connected.
    pub online: Publication,
    /// `Offline(ConnectionLost)`, sealed with counter `c + 1`: register it as the last will of
    /// this connection.
    pub will: Publication,
}

/// The seal counters of a new connection's two statuses: see [`Device::connect_counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectCounters {
    /// `Online`'s, `c`.
    pub online: u64,
    /// The last will's, `c + 1`.
    pub will: u64,
}

/// One simulated vehicle. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Device {
    vehicle: VehicleId,
    fleet: FleetId,
    driver: Driver,
    depot: Node,
    rng: fastrand::Rng,
    mission: Mission,
    /// The vehicle went to the depot by itself to recharge, and leaves when charged.
    recharging: bool,
    /// Charge in percent, 0.0 ..= 100.0.
    battery_pct: f32,
    /// The sequence number of the next heartbeat.
    seq: u32,
    /// The sequence number of the next delivery event.
    event_seq: u32,
    interval_ms: u32,
    heartbeat_qos: u8,
    key: DeviceKey,
    counter: Counter,
    outbox: Outbox,
    last_heartbeat_ms: Option<u64>,
    next_heartbeat_ms: Option<u64>,
    /// The time the simulation has been advanced to (minus `carry_ms`).
    clock_ms: Option<u64>,
    /// Time received but not yet simulated, less than one step.
    carry_ms: u64,
    /// The last GPS fix, once the device is externally positioned.
    external: Option<ExternalFix>,
}

impl Device {
    /// A device at its start intersection with 60–100 % battery, everything else drawn from
    /// `seed`. Give every vehicle its own seed.
    pub fn new(config: DeviceConfig, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let grid = config.grid;
        let start = config.start.unwrap_or_else(|| grid.random_node(&mut rng));
        let driver = Driver::new(grid, start, rng.u64(..));
        Self {
            vehicle: config.vehicle,
            fleet: config.fleet,
            driver,
            depot: grid.clamp(config.depot),
            battery_pct: 60.0 + 40.0 * rng.f32(),
            rng,
            mission: Mission::Cruising,
            recharging: false,
            seq: 0,
            event_seq: 0,
            interval_ms: config
                .heartbeat_interval_ms
                .clamp(MIN_HEARTBEAT_INTERVAL_MS, MAX_HEARTBEAT_INTERVAL_MS),
            heartbeat_qos: config.heartbeat_qos.min(1),
            key: config.key,
            counter: Counter::new(),
            outbox: Outbox::new(),
            last_heartbeat_ms: None,
            next_heartbeat_ms: None,
            clock_ms: None,
            carry_ms: 0,
            external: None,
        }
    }

    /// The vehicle's id.
    pub const fn vehicle(&self) -> &VehicleId {
        &self.vehicle
    }

    /// The vehicle's fleet.
    pub const fn fleet(&self) -> &FleetId {
        &self.fleet
    }

    /// This vehicle's topic of `kind`.
    pub fn topic(&self, kind: TopicKind) -> Topic {
        Topic::new(self.fleet.clone(), self.vehicle.clone(), kind)
    }

    /// What the vehicle is doing.
    pub const fn mission(&self) -> &Mission {
        &self.mission
    }

    /// The driver: position, speed, heading and route.
    pub const fn driver(&self) -> &Driver {
        &self.driver
    }

    /// The current position: the last GPS fix's when externally positioned, else the
    /// driver's.
    pub fn position(&self) -> Position {
        match self.external {
            Some(external) => external.fix.pos,
            None => self.driver.position(),
        }
    }

    /// Ground speed in centimetres per second (0 while the GPS fix is lost).
    pub fn speed_cm_s(&self) -> u16 {
        match self.external {
            Some(external) if external.current => external.fix.speed_cm_s,
            Some(_) => 0,
            None => self.driver.speed_cm_s(),
        }
    }

    /// Heading in degrees clockwise from true north.
    pub fn heading_deg(&self) -> u16 {
        match self.external {
            Some(external) => external.fix.heading_deg,
            None => self.driver.heading_deg(),
        }
    }

    /// Whether the vehicle is moving: the driver is, or the current fix's ground speed is at
    /// least [`MOVING_MIN_CM_S`].
    pub fn is_moving(&self) -> bool {
        match self.external {
            Some(_) => self.speed_cm_s() >= MOVING_MIN_CM_S,
            None => self.driver.is_moving(),
        }
    }

    /// Whether positions come from a GPS receiver ([`gps_fix`](Self::gps_fix)) rather than
    /// the simulated driver.
    pub const fn is_externally_positioned(&self) -> bool {
        self.external.is_some()
    }

    /// A new fix from the GPS receiver. The first one makes the device externally positioned
    /// for good (see [the module docs](self#external-positioning)); the vehicle is where the
    /// fix says from now on. Driving off with a parcel after `pickup` reports `in-transit`
    /// at the next step.
    pub fn gps_fix(&mut self, fix: GpsFix) {
        if self.external.is_none() {
            // The simulated drive ends here; the driver only keeps the goals of the mission.
            self.driver.halt();
        }
        self.external = Some(ExternalFix { fix, current: true });
    }

    /// The GPS receiver lost its fix: heartbeats keep the last position, with speed 0 and
    /// without [`StatusFlags::GPS_FIX`], until the next [`gps_fix`](Self::gps_fix). Ignored
    /// unless externally positioned.
    pub fn gps_lost(&mut self) {
        if let Some(external) = &mut self.external {
            external.current = false;
        }
    }

    /// Sets the battery charge to a measured `pct` (clamped to 100), for a tracker that reads
    /// its vehicle's battery; externally positioned, nothing else changes it except charging
    /// at the depot.
    pub fn set_battery_pct(&mut self, pct: u8) {
        self.battery_pct = f32::from(pct.min(100));
    }

    /// The depot intersection.
    pub const fn depot(&self) -> Node {
        self.depot
    }

    /// The battery charge in whole percent, rounded up (0 means empty).
    pub fn battery_pct(&self) -> u8 {
        // 0.0 ..= 100.0 by construction.
        libm::ceilf(self.battery_pct).clamp(0.0, 100.0) as u8
    }

    /// Whether the battery is empty: the vehicle has stopped for good and should go offline
    /// with [`OfflineReason::LowBattery`].
    pub fn is_depleted(&self) -> bool {
        self.battery_pct <= 0.0
    }

    /// The heartbeat interval in milliseconds.
    pub const fn heartbeat_interval_ms(&self) -> u32 {
        self.interval_ms
    }

    /// When the next heartbeat is due (ms since the epoch); `None` before the first one, which
    /// is due at once.
    pub const fn next_heartbeat_ms(&self) -> Option<u64> {
        self.next_heartbeat_ms
    }

    /// The status flags as of now.
    pub fn flags(&self) -> StatusFlags {
        let fix = self.external.is_none_or(|external| external.current);
        StatusFlags(0)
            .with(StatusFlags::GPS_FIX, fix)
            .with(StatusFlags::MOVING, self.is_moving())
            .with(
                StatusFlags::IGNITION,
                self.mission != Mission::AtDepot && !self.is_depleted(),
            )
            .with(
                StatusFlags::LOW_BATTERY,
                self.battery_pct() < LOW_BATTERY_PCT,
            )
            .with(
                StatusFlags::ON_ORDER,
                matches!(self.mission, Mission::Delivery(_)),
            )
    }

    /// Advances the simulation to `now_ms` in whole [`STEP_MS`] steps. Time never runs
    /// backwards: an earlier `now_ms` is ignored. The first call only sets the clock.
    pub fn advance(&mut self, now_ms: u64) {
        let Some(clock) = self.clock_ms else {
            self.clock_ms = Some(now_ms);
            return;
        };
        if now_ms <= clock {
            return;
        }
        self.clock_ms = Some(now_ms);
        self.carry_ms += (now_ms - clock).min(MAX_CATCH_UP_MS);
        while self.carry_ms >= STEP_MS {
            self.carry_ms -= STEP_MS;
            self.step();
        }
    }

    /// Advances to `now_ms` and, if a heartbeat is due, queues it in the [`Outbox`] and returns
    /// a copy (taking the next sequence number and scheduling the one after). Call it at least
    /// as often as the interval. Parked, only every [`PARKED_INTERVAL_FACTOR`]-th slot is due.
    pub fn tick(&mut self, now_ms: u64) -> Option<Heartbeat> {
        self.advance(now_ms);
        let due = self.next_heartbeat_ms.is_none_or(|due| now_ms >= due);
        if !due {
            return None;
        }
        let parked_interval = u64::from(self.interval_ms.saturating_mul(PARKED_INTERVAL_FACTOR));
        let quiet = self.is_parked()
            && self.last_heartbeat_ms.is_some_and(|last| {
                now_ms.saturating_sub(last) + u64::from(self.interval_ms / 2) < parked_interval
            });
        if quiet {
            self.reschedule(now_ms);
            return None;
        }
        let heartbeat = self.heartbeat(now_ms);
        self.outbox.push_heartbeat(heartbeat);
        self.seq = self.seq.wrapping_add(1);
        self.last_heartbeat_ms = Some(now_ms);
        self.reschedule(now_ms);
        Some(heartbeat)
    }

    /// Whether the vehicle is parked: at the depot, at a handover, or out of battery.
    pub fn is_parked(&self) -> bool {
        let stopped = match self.external {
            Some(_) => !self.is_moving(),
            None => self.driver.is_parked(),
        };
        stopped || self.mission == Mission::AtDepot || self.is_depleted()
    }

    /// The heartbeat this device would send at `now_ms`, with the next sequence number; it
    /// neither advances the simulation nor takes the sequence number.
    pub fn heartbeat(&self, now_ms: u64) -> Heartbeat {
        Heartbeat {
            seq: self.seq,
            ts_ms: now_ms,
            pos: self.position(),
            speed_cm_s: self.speed_cm_s(),
            heading_deg: self.heading_deg(),
            battery_pct: self.battery_pct(),
            flags: self.flags(),
        }
    }

    /// Makes the next heartbeat due at `at_ms` (ms since the epoch), e.g. to spread many
    /// devices' heartbeats over the interval. The cadence keeps this phase from then on.
    pub fn schedule_heartbeat(&mut self, at_ms: u64) {
        self.next_heartbeat_ms = Some(at_ms);
    }

    /// Schedules the next heartbeat slot on the cadence's phase: a whole number of intervals
    /// after this one's due time, and at least half an interval from now (a late heartbeat is
    /// not followed by a hurried one). Off schedule (before it was due), the next one follows
    /// a full interval later.
    fn reschedule(&mut self, now_ms: u64) {
        let interval = u64::from(self.interval_ms);
        self.next_heartbeat_ms = Some(match self.next_heartbeat_ms {
            Some(due) if due <= now_ms => {
                let mut next = due + ((now_ms - due) / interval + 1) * interval;
                if next - now_ms < interval / 2 {
                    next += interval;
                }
                next
            }
            _ => now_ms + interval,
        });
    }

    /// The `seq` the next delivery event will carry.
    pub const fn next_event_seq(&self) -> u32 {
        self.event_seq
    }

    /// The store-and-forward queues.
    pub const fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Whether a delivery waits at a handover because its next event does not fit the full
    /// [`Outbox`]: it goes on once the broker has acknowledged queued events.
    pub fn is_stalled(&self) -> bool {
        let Mission::Delivery(delivery) = &self.mission else {
            return false;
        };
        match delivery.stage {
            DeliveryStage::AtPickup { left_ms: 0 } => self.outbox.event_room() < 2,
            DeliveryStage::AtDropoff { left_ms: 0 } => self.outbox.event_room() < 1,
            _ => false,
        }
    }

    /// The next publication to transmit from the [`Outbox`], sealed with the counter at
    /// `clock_ms`: the oldest delivery event not yet in flight, else the oldest queued
    /// heartbeat; `None` when there is nothing to send. Call it only while connected, and
    /// report acknowledged events with [`event_acked`](Self::event_acked) and a lost
    /// connection with [`connection_lost`](Self::connection_lost).
    ///
    /// # Errors
    /// None in practice (every message fits [`MAX_PAYLOAD`]); the item stays queued.
    pub fn next_publication(&mut self, clock_ms: u64) -> Result<Option<OutboxItem>, CodecError> {
        let mut topic = TopicName::new();
        let mut payload = Payload::new();
        let Some(sealed) = self.seal_next(clock_ms, &mut topic, &mut payload)? else {
            return Ok(None);
        };
        Ok(Some(OutboxItem {
            publication: Publication {
                topic,
                payload,
                qos: sealed.qos,
                retain: sealed.retain,
            },
            event_seq: sealed.event_seq,
        }))
    }

    /// [`next_publication`](Self::next_publication) into the caller's `topic` and `payload`
    /// (overwritten), without building a [`Publication`]: what [`Vehicle`] uses, to keep its
    /// stack small. `None`: nothing to send (the buffers are left as they were).
    ///
    /// [`Vehicle`]: crate::vehicle::Vehicle
    ///
    /// # Errors
    /// As [`next_publication`](Self::next_publication).
    pub fn seal_next(
        &mut self,
        clock_ms: u64,
        topic: &mut TopicName,
        payload: &mut Payload,
    ) -> Result<Option<Sealed>, CodecError> {
        if let Some(event) = self.outbox.next_event() {
            let seq = event.seq;
            let counter = self.counter.next(clock_ms);
            let to = Topic::new(self.fleet.clone(), self.vehicle.clone(), TopicKind::Event);
            return match seal_into(event, counter, to, &self.key, topic, payload) {
                Ok(()) => Ok(Some(Sealed {
                    qos: 1,
                    retain: TopicKind::Event.retained(),
                    event_seq: Some(seq),
                })),
                Err(err) => {
                    self.outbox.unsend_last();
                    Err(err)
                }
            };
        }
        let Some(heartbeat) = self.outbox.pop_heartbeat() else {
            return Ok(None);
        };
        let counter = self.counter.next(clock_ms);
        let kind = TopicKind::Heartbeat;
        seal_into(
            &heartbeat,
            counter,
            self.topic(kind),
            &self.key,
            topic,
            payload,
        )?;
        Ok(Some(Sealed {
            qos: self.heartbeat_qos,
            retain: kind.retained(),
            event_seq: None,
        }))
    }

    /// The broker acknowledged the event `seq` (the PUBACK of its publish): it leaves the
    /// [`Outbox`], with every in-flight event before it. Returns how many left.
    pub fn event_acked(&mut self, seq: u32) -> usize {
        self.outbox.acked(seq)
    }

    /// Takes back the event just handed out by [`next_publication`](Self::next_publication),
    /// because it could not be handed to the radio after all.
    pub fn event_unsent(&mut self) {
        self.outbox.unsend_last();
    }

    /// The link dropped: the events in flight are sent again after the reconnect.
    pub fn connection_lost(&mut self) {
        self.outbox.requeue_in_flight();
    }

    /// Carries out a command and says how it went.
    ///
    /// - `Ping`: [`AckResult::Ok`].
    /// - `SetRate`: `Ok` and the new interval applies from the last heartbeat on; `Invalid`
    ///   outside [`MIN_HEARTBEAT_INTERVAL_MS`] ..= [`MAX_HEARTBEAT_INTERVAL_MS`].
    /// - `ReturnToDepot`: `Ok` and the vehicle drives to the depot; `Busy` during a delivery.
    /// - `AssignOrder`: `Ok` and the vehicle drives to the pickup; `Busy` during another
    ///   delivery, or while the [`Outbox`] has no room for the order's
    ///   [`EVENTS_PER_ORDER`] events (a long time offline); `Invalid` if pickup or drop-off
    ///   lies outside the service area.
    /// - `CancelOrder`: `Ok` and the vehicle drops the delivery of that order and cruises
    ///   again (events already reported stay in the [`Outbox`]); `Invalid` if it is not
    ///   delivering that order.
    pub fn handle_command(&mut self, command: &Command) -> CommandAck {
        let result = match &command.kind {
            CommandKind::Ping => AckResult::Ok,
            CommandKind::SetRate { interval_ms } => self.set_heartbeat_interval(*interval_ms),
            CommandKind::ReturnToDepot => self.return_to_depot(),
            CommandKind::AssignOrder {
                order,
                pickup,
                dropoff,
            } => self.assign_order(order, *pickup, *dropoff),
            CommandKind::CancelOrder { order } => self.cancel_order(order),
        };
        CommandAck {
            id: command.id,
            result,
        }
    }

    fn set_heartbeat_interval(&mut self, interval_ms: u32) -> AckResult {
        if !(MIN_HEARTBEAT_INTERVAL_MS..=MAX_HEARTBEAT_INTERVAL_MS).contains(&interval_ms) {
            return AckResult::Invalid;
        }
        self.interval_ms = interval_ms;
        if let Some(last) = self.last_heartbeat_ms {
            self.next_heartbeat_ms = Some(last + u64::from(interval_ms));
        }
        AckResult::Ok
    }

    fn return_to_depot(&mut self) -> AckResult {
        // Sent home by the dispatcher, it stays there.
        self.recharging = false;
        match self.mission {
            Mission::Delivery(_) => AckResult::Busy,
            Mission::ToDepot | Mission::AtDepot => AckResult::Ok,
            Mission::Cruising => {
                self.mission = Mission::ToDepot;
                self.driver.set_goal(Some(self.depot));
                AckResult::Ok
            }
        }
    }

    fn assign_order(&mut self, order: &OrderId, pickup: Position, dropoff: Position) -> AckResult {
        if matches!(self.mission, Mission::Delivery(_))
            || self.outbox.event_room() < EVENTS_PER_ORDER
        {
            return AckResult::Busy;
        }
        let grid = self.driver.grid();
        let nodes = match self.external {
            // A real vehicle delivers wherever it is sent; the grid nodes only steer the
            // (halted) driver, so outside the grid they are the depot.
            Some(_) if pickup.is_valid() && dropoff.is_valid() => Some((
                grid.nearest_node(pickup).unwrap_or(self.depot),
                grid.nearest_node(dropoff).unwrap_or(self.depot),
            )),
            Some(_) => None,
            None => grid.nearest_node(pickup).zip(grid.nearest_node(dropoff)),
        };
        let Some((pickup, dropoff)) = nodes else {
            return AckResult::Invalid;
        };
        self.recharging = false;
        self.mission = Mission::Delivery(Delivery {
            order: order.clone(),
            pickup,
            dropoff,
            stage: DeliveryStage::ToPickup,
            in_transit: false,
        });
        self.driver.set_goal(Some(pickup));
        self.driver.resume();
        AckResult::Ok
    }

    fn cancel_order(&mut self, order: &OrderId) -> AckResult {
        match &self.mission {
            Mission::Delivery(delivery) if delivery.order == *order => {
                self.mission = Mission::Cruising;
                self.driver.set_goal(None);
                self.driver.resume();
                AckResult::Ok
            }
            _ => AckResult::Invalid,
        }
    }

    /// One [`STEP_MS`] of driving, battery and mission.
    fn step(&mut self) {
        if self.is_depleted() {
            return;
        }
        if self.external.is_some() {
            // Where the vehicle is, and whether it moves, is up to the GPS; handovers are
            // completed by hand (`complete_handover`).
            if self.is_moving() {
                self.drove_off();
            }
            self.wait();
            self.mind_the_battery();
            return;
        }
        let step = self.driver.step(STEP_MS as f32 / 1000.0);
        self.battery_pct -= step.distance_m / 1000.0 * DRAIN_PCT_PER_KM;
        if self.battery_pct <= 0.0 {
            self.battery_pct = 0.0;
            self.driver.halt();
            return;
        }
        if step.distance_m > 0.0 {
            self.drove_off();
        }
        if step.arrived {
            self.arrive();
        }
        self.wait();
        self.mind_the_battery();
    }

    /// A free vehicle low on battery goes to the depot to recharge, and back to work when
    /// recharged (a long-running demo does not run its fleet flat).
    fn mind_the_battery(&mut self) {
        if self.mission == Mission::Cruising && self.battery_pct < f32::from(LOW_BATTERY_PCT) {
            self.recharging = true;
            self.mission = Mission::ToDepot;
            self.driver.set_goal(Some(self.depot));
        } else if self.recharging
            && self.mission == Mission::AtDepot
            && self.battery_pct >= RECHARGED_PCT
        {
            self.recharging = false;
            self.mission = Mission::Cruising;
            self.driver.set_goal(None);
            self.driver.resume();
        }
    }

    /// The simulation time of the step being taken.
    fn step_time_ms(&self) -> u64 {
        self.clock_ms.unwrap_or(0).saturating_sub(self.carry_ms)
    }

    /// Queues the delivery event `kind` of the current order, here and now. The callers made
    /// sure there is room (orders are only accepted with room for all their events, and
    /// handovers wait for it).
    fn report(&mut self, kind: DeliveryKind) {
        let Mission::Delivery(delivery) = &self.mission else {
            return;
        };
        let event = DeliveryEvent {
            seq: self.event_seq,
            order: delivery.order.clone(),
            kind,
            ts_ms: self.step_time_ms(),
            pos: self.position(),
        };
        let queued = self.outbox.push_event(event).is_ok();
        debug_assert!(queued, "an event was produced without room for it");
        if queued {
            self.event_seq = self.event_seq.wrapping_add(1);
        }
    }

    /// The parcel changed hands at the vendor or the customer, now (`now_ms`, ms since the
    /// epoch; the device is [advanced](Self::advance) to it first): for a tracker whose
    /// driver confirms handovers (a button), rather than the simulated handover time.
    ///
    /// - On the way to or at the pickup: queues `pickup`, and the vehicle heads for the
    ///   customer ([`Handover::PickedUp`]); it needs room for `pickup` and `in-transit`.
    /// - On the way to or at the drop-off: queues `in-transit` if it was not reported yet,
    ///   then `delivered`, and the vehicle is free again ([`Handover::Delivered`]).
    ///
    /// Without a delivery it does nothing ([`Handover::NoDelivery`]), and with too little room
    /// in the [`Outbox`] neither ([`Handover::OutboxFull`]).
    pub fn complete_handover(&mut self, now_ms: u64) -> Handover {
        self.advance(now_ms);
        let room = self.outbox.event_room();
        let Mission::Delivery(delivery) = &mut self.mission else {
            return Handover::NoDelivery;
        };
        match delivery.stage {
            DeliveryStage::ToPickup | DeliveryStage::AtPickup { .. } => {
                if room < 2 {
                    return Handover::OutboxFull;
                }
                delivery.stage = DeliveryStage::ToDropoff;
                let dropoff = delivery.dropoff;
                self.report(DeliveryKind::Pickup);
                self.driver.set_goal(Some(dropoff));
                self.driver.resume();
                Handover::PickedUp
            }
            DeliveryStage::ToDropoff | DeliveryStage::AtDropoff { .. } => {
                let in_transit = delivery.in_transit;
                if room < if in_transit { 1 } else { 2 } {
                    return Handover::OutboxFull;
                }
                if !in_transit {
                    delivery.in_transit = true;
                    self.report(DeliveryKind::InTransit);
                }
                self.report(DeliveryKind::Delivered);
                self.mission = Mission::Cruising;
                self.driver.set_goal(None);
                self.driver.resume();
                Handover::Delivered
            }
        }
    }

    /// The vehicle moved: leaving the pickup with the parcel is `in-transit`.
    fn drove_off(&mut self) {
        if let Mission::Delivery(delivery) = &mut self.mission
            && delivery.stage == DeliveryStage::ToDropoff
            && !delivery.in_transit
        {
            delivery.in_transit = true;
            self.report(DeliveryKind::InTransit);
        }
    }

    /// The driver stopped at its goal.
    fn arrive(&mut self) {
        let handover = self.rng.u32(HANDOVER_MS);
        match &mut self.mission {
            Mission::ToDepot => self.mission = Mission::AtDepot,
            Mission::Delivery(delivery) => match delivery.stage {
                DeliveryStage::ToPickup => {
                    delivery.stage = DeliveryStage::AtPickup { left_ms: handover };
                }
                DeliveryStage::ToDropoff => {
                    delivery.stage = DeliveryStage::AtDropoff { left_ms: handover };
                    if !delivery.in_transit {
                        // Pickup and drop-off at the same corner: it never drove.
                        delivery.in_transit = true;
                        self.report(DeliveryKind::InTransit);
                    }
                }
                DeliveryStage::AtPickup { .. } | DeliveryStage::AtDropoff { .. } => {}
            },
            Mission::Cruising | Mission::AtDepot => {}
        }
    }

    /// Time passes while parked: charging at the depot, handing parcels over. A handover
    /// whose event does not fit the [`Outbox`] waits (see [`is_stalled`](Self::is_stalled)).
    fn wait(&mut self) {
        const STEP: u32 = STEP_MS as u32;
        let room = self.outbox.event_room();
        match &mut self.mission {
            Mission::AtDepot => {
                let charge = CHARGE_PCT_PER_MIN * STEP_MS as f32 / 60_000.0;
                self.battery_pct = (self.battery_pct + charge).min(100.0);
            }
            Mission::Delivery(delivery) => match &mut delivery.stage {
                DeliveryStage::AtPickup { left_ms } => {
                    *left_ms = left_ms.saturating_sub(STEP);
                    // Room for `pickup` and the `in-transit` that follows it.
                    if *left_ms == 0 && room >= 2 {
                        delivery.stage = DeliveryStage::ToDropoff;
                        let dropoff = delivery.dropoff;
                        self.report(DeliveryKind::Pickup);
                        self.driver.set_goal(Some(dropoff));
                        self.driver.resume();
                    }
                }
                DeliveryStage::AtDropoff { left_ms } => {
                    *left_ms = left_ms.saturating_sub(STEP);
                    if *left_ms == 0 && room >= 1 {
                        self.report(DeliveryKind::Delivered);
                        self.mission = Mission::Cruising;
                        self.driver.set_goal(None);
                        self.driver.resume();
                    }
                }
                DeliveryStage::ToPickup | DeliveryStage::ToDropoff => {}
            },
            Mission::Cruising | Mission::ToDepot => {}
        }
    }

    /// `msg` addressed to this vehicle's topic of its kind, sealed with the next counter at
    /// `clock_ms`, with that kind's QoS (heartbeats: the configured one) and retain flag.
    ///
    /// # Errors
    /// [`CodecError::BufferFull`] if `msg` does not fit [`MAX_PAYLOAD`] (no Fleetbeat message
    /// is that large).
    pub fn publication<M: WireMessage>(
        &mut self,
        msg: &M,
        clock_ms: u64,
    ) -> Result<Publication, CodecError> {
        let counter = self.next_counter(clock_ms);
        self.sealed_publication(msg, counter)
    }

    /// `msg` sealed with `counter` as a [`Publication`].
    fn sealed_publication<M: WireMessage>(
        &self,
        msg: &M,
        counter: u64,
    ) -> Result<Publication, CodecError> {
        let mut topic = TopicName::new();
        let mut payload = Payload::new();
        let qos = self.seal(msg, counter, &mut topic, &mut payload)?;
        Ok(Publication {
            topic,
            payload,
            qos,
            retain: M::KIND.retained(),
        })
    }

    /// The next seal counter at `clock_ms` (strictly increasing), for [`seal`](Self::seal).
    pub fn next_counter(&mut self, clock_ms: u64) -> u64 {
        self.counter.next(clock_ms)
    }

    /// `msg` sealed with `counter` (from [`next_counter`](Self::next_counter)) for this
    /// vehicle's topic of its kind, into the caller's `topic` and `payload` (overwritten);
    /// returns its QoS (heartbeats: the configured one). [`publication`](Self::publication)
    /// without building a [`Publication`], for a caller that keeps its stack small.
    ///
    /// # Errors
    /// As [`publication`](Self::publication).
    pub fn seal<M: WireMessage>(
        &self,
        msg: &M,
        counter: u64,
        topic: &mut TopicName,
        payload: &mut Payload,
    ) -> Result<u8, CodecError> {
        let qos = match M::KIND {
            TopicKind::Heartbeat => self.heartbeat_qos,
            kind => kind.qos(),
        };
        seal_into(msg, counter, self.topic(M::KIND), &self.key, topic, payload)?;
        Ok(qos)
    }

    /// The statuses of a new connection, sealed with two consecutive counters: `Online` with
    /// `c`, the last will `Offline(ConnectionLost)` with `c + 1`. Call it right before each
    /// connection attempt and register `will` in that CONNECT: the broker publishes the will
    /// only when the connection is lost, later than the heartbeats sealed meanwhile, but its
    /// counter must still beat this connection's `Online` (receivers guard each topic kind
    /// separately, see [`shared::ReplayGuard`]); and a will sealed for an earlier connection
    /// would be refused as a replay.
    ///
    /// # Errors
    /// None in practice; see [`publication`](Self::publication).
    pub fn connect_statuses(&mut self, clock_ms: u64) -> Result<ConnectStatuses, CodecError> {
        let counters = self.connect_counters(clock_ms);
        let online = self.sealed_publication(&Status::Online, counters.online)?;
        let will = self.sealed_publication(&CONNECTION_LOST, counters.will)?;
        Ok(ConnectStatuses { online, will })
    }

    /// The counters [`connect_statuses`](Self::connect_statuses) seals with, drawn at
    /// `clock_ms`, for a caller that seals the statuses itself ([`seal`](Self::seal)) when
    /// it needs them (`crate::vehicle::Vehicle` keeps only `Online`'s counter until the
    /// CONNACK).
    pub fn connect_counters(&mut self, clock_ms: u64) -> ConnectCounters {
        let online = self.next_counter(clock_ms);
        let will = self.next_counter(clock_ms);
        ConnectCounters { online, will }
    }

    /// The retained `Offline(reason)` status, to publish before disconnecting on purpose.
    ///
    /// # Errors
    /// None in practice; see [`publication`](Self::publication).
    pub fn offline_status(
        &mut self,
        reason: OfflineReason,
        clock_ms: u64,
    ) -> Result<Publication, CodecError> {
        self.publication(&Status::Offline(reason), clock_ms)
    }
}

/// Seals `msg` for `to` with `counter` and `key` into `topic` (its name) and `payload`.
fn seal_into<M: WireMessage>(
    msg: &M,
    counter: u64,
    to: Topic,
    key: &DeviceKey,
    topic: &mut TopicName,
    payload: &mut Payload,
) -> Result<(), CodecError> {
    *topic = to.name();
    payload.clear();
    // Cannot fail: to its capacity.
    let _ = payload.resize(MAX_PAYLOAD, 0);
    let len = shared::seal(msg, topic.as_str(), counter, key, payload)?.len();
    payload.truncate(len);
    Ok(())
}

#[cfg(test)]
mod tests;
