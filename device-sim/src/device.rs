//! The per-vehicle state machine: what a tracker would run, minus the radio.
//!
//! A [`Device`] knows who it is ([`VehicleId`], [`FleetId`]), where it is (a [`Driver`] on the
//! [`StreetGrid`]), its battery, its heartbeat schedule and sequence number, and its current
//! [`Mission`]. It does no I/O and owns no clock: the caller passes the time in milliseconds
//! since the Unix epoch to [`Device::tick`] (or [`Device::advance`]) from a timer, publishes
//! the heartbeats it returns, and hands it every command that arrives. Nothing here allocates;
//! a `Device` is a few hundred bytes that can live in a `static`.
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

use shared::{
    AckResult, CodecError, Command, CommandAck, CommandKind, FleetId, Heartbeat, MAX_PAYLOAD,
    OfflineReason, OrderId, Position, Status, StatusFlags, Topic, TopicKind, VehicleId,
    WireMessage, topic::TopicName,
};

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
const HANDOVER_MS: core::ops::Range<u32> = 45_000..120_000;

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
}

impl DeviceConfig {
    /// A vehicle with its depot at the grid centre, a random start and 1 Hz heartbeats.
    pub fn new(vehicle: VehicleId, fleet: FleetId, grid: StreetGrid) -> Self {
        Self {
            vehicle,
            fleet,
            grid,
            depot: Node::CENTRE,
            start: None,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
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

/// An MQTT message ready to publish: topic, encoded payload, and the QoS and retain flag the
/// topic scheme prescribes for its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The topic name.
    pub topic: TopicName,
    /// The encoded message (version byte + postcard).
    pub payload: heapless::Vec<u8, MAX_PAYLOAD>,
    /// The MQTT QoS, 0 or 1.
    pub qos: u8,
    /// Whether the broker retains it.
    pub retain: bool,
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
    interval_ms: u32,
    last_heartbeat_ms: Option<u64>,
    next_heartbeat_ms: Option<u64>,
    /// The time the simulation has been advanced to (minus `carry_ms`).
    clock_ms: Option<u64>,
    /// Time received but not yet simulated, less than one step.
    carry_ms: u64,
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
            interval_ms: config
                .heartbeat_interval_ms
                .clamp(MIN_HEARTBEAT_INTERVAL_MS, MAX_HEARTBEAT_INTERVAL_MS),
            last_heartbeat_ms: None,
            next_heartbeat_ms: None,
            clock_ms: None,
            carry_ms: 0,
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

    /// The current position.
    pub fn position(&self) -> Position {
        self.driver.position()
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
        StatusFlags(StatusFlags::GPS_FIX)
            .with(StatusFlags::MOVING, self.driver.is_moving())
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

    /// Advances to `now_ms` and, if a heartbeat is due, returns it (taking the next sequence
    /// number and scheduling the one after). Call it at least as often as the interval.
    pub fn tick(&mut self, now_ms: u64) -> Option<Heartbeat> {
        self.advance(now_ms);
        let due = self.next_heartbeat_ms.is_none_or(|due| now_ms >= due);
        due.then(|| {
            let heartbeat = self.heartbeat(now_ms);
            self.sent_heartbeat(now_ms);
            heartbeat
        })
    }

    /// The heartbeat this device would send at `now_ms`, with the next sequence number; it
    /// neither advances the simulation nor takes the sequence number.
    pub fn heartbeat(&self, now_ms: u64) -> Heartbeat {
        Heartbeat {
            seq: self.seq,
            ts_ms: now_ms,
            pos: self.driver.position(),
            speed_cm_s: self.driver.speed_cm_s(),
            heading_deg: self.driver.heading_deg(),
            battery_pct: self.battery_pct(),
            flags: self.flags(),
        }
    }

    /// Advances to `now_ms` and sends a heartbeat now, due or not (e.g. right after
    /// connecting): encodes it into `buf` and returns the payload.
    ///
    /// # Errors
    /// [`CodecError::BufferFull`] cannot happen with a [`MAX_PAYLOAD`] buffer; the sequence
    /// number is only taken on success.
    pub fn encode_heartbeat<'b>(
        &mut self,
        now_ms: u64,
        buf: &'b mut [u8; MAX_PAYLOAD],
    ) -> Result<&'b [u8], CodecError> {
        self.advance(now_ms);
        let encoded = shared::encode(&self.heartbeat(now_ms), buf)?;
        self.sent_heartbeat(now_ms);
        Ok(encoded)
    }

    /// Makes the next heartbeat due at `at_ms` (ms since the epoch), e.g. to spread many
    /// devices' heartbeats over the interval. The cadence keeps this phase from then on.
    pub fn schedule_heartbeat(&mut self, at_ms: u64) {
        self.next_heartbeat_ms = Some(at_ms);
    }

    /// Takes the sequence number and schedules the next heartbeat on the cadence's phase: a
    /// whole number of intervals after this one's due time, and at least half an interval
    /// from now (a late heartbeat is not followed by a hurried one). Sent off schedule (before
    /// it was due), the next one follows a full interval later.
    fn sent_heartbeat(&mut self, now_ms: u64) {
        let interval = u64::from(self.interval_ms);
        self.seq = self.seq.wrapping_add(1);
        self.last_heartbeat_ms = Some(now_ms);
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

    /// Carries out a command and says how it went.
    ///
    /// - `Ping`: [`AckResult::Ok`].
    /// - `SetRate`: `Ok` and the new interval applies from the last heartbeat on; `Invalid`
    ///   outside [`MIN_HEARTBEAT_INTERVAL_MS`] ..= [`MAX_HEARTBEAT_INTERVAL_MS`].
    /// - `ReturnToDepot`: `Ok` and the vehicle drives to the depot; `Busy` during a delivery.
    /// - `AssignOrder`: `Ok` and the vehicle drives to the pickup; `Busy` during another
    ///   delivery; `Invalid` if pickup or drop-off lies outside the service area.
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
        if matches!(self.mission, Mission::Delivery(_)) {
            return AckResult::Busy;
        }
        let grid = self.driver.grid();
        let (Some(pickup), Some(dropoff)) = (grid.nearest_node(pickup), grid.nearest_node(dropoff))
        else {
            return AckResult::Invalid;
        };
        self.recharging = false;
        self.mission = Mission::Delivery(Delivery {
            order: order.clone(),
            pickup,
            dropoff,
            stage: DeliveryStage::ToPickup,
        });
        self.driver.set_goal(Some(pickup));
        self.driver.resume();
        AckResult::Ok
    }

    /// One [`STEP_MS`] of driving, battery and mission.
    fn step(&mut self) {
        if self.is_depleted() {
            return;
        }
        let step = self.driver.step(STEP_MS as f32 / 1000.0);
        self.battery_pct -= step.distance_m / 1000.0 * DRAIN_PCT_PER_KM;
        if self.battery_pct <= 0.0 {
            self.battery_pct = 0.0;
            self.driver.halt();
            return;
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
                }
                DeliveryStage::AtPickup { .. } | DeliveryStage::AtDropoff { .. } => {}
            },
            Mission::Cruising | Mission::AtDepot => {}
        }
    }

    /// Time passes while parked: charging at the depot, handing parcels over.
    fn wait(&mut self) {
        const STEP: u32 = STEP_MS as u32;
        match &mut self.mission {
            Mission::AtDepot => {
                let charge = CHARGE_PCT_PER_MIN * STEP_MS as f32 / 60_000.0;
                self.battery_pct = (self.battery_pct + charge).min(100.0);
            }
            Mission::Delivery(delivery) => match &mut delivery.stage {
                DeliveryStage::AtPickup { left_ms } => {
                    *left_ms = left_ms.saturating_sub(STEP);
                    if *left_ms == 0 {
                        // The later delivery-events issue publishes `Pickup` here.
                        delivery.stage = DeliveryStage::ToDropoff;
                        let dropoff = delivery.dropoff;
                        self.driver.set_goal(Some(dropoff));
                        self.driver.resume();
                    }
                }
                DeliveryStage::AtDropoff { left_ms } => {
                    *left_ms = left_ms.saturating_sub(STEP);
                    if *left_ms == 0 {
                        // The later delivery-events issue publishes `Delivered` here.
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

    /// `msg` addressed to this vehicle's topic of its kind, encoded, with that kind's QoS and
    /// retain flag.
    ///
    /// # Errors
    /// [`CodecError::BufferFull`] if `msg` does not fit [`MAX_PAYLOAD`] (no Fleetbeat message
    /// is that large).
    pub fn publication<M: WireMessage>(&self, msg: &M) -> Result<Publication, CodecError> {
        Ok(Publication {
            topic: self.topic(M::KIND).name(),
            payload: shared::encode_vec(msg)?,
            qos: M::KIND.qos(),
            retain: M::KIND.retained(),
        })
    }

    /// The retained `Online` status, to publish on every connection.
    ///
    /// # Errors
    /// None in practice; see [`publication`](Self::publication).
    pub fn online_status(&self) -> Result<Publication, CodecError> {
        self.publication(&Status::Online)
    }

    /// The last will to register when connecting: `Offline(ConnectionLost)`, retained, which
    /// the broker publishes if the connection dies without a goodbye.
    ///
    /// # Errors
    /// None in practice; see [`publication`](Self::publication).
    pub fn last_will_status(&self) -> Result<Publication, CodecError> {
        self.publication(&Status::Offline(OfflineReason::ConnectionLost))
    }

    /// The retained `Offline(reason)` status, to publish before disconnecting on purpose.
    ///
    /// # Errors
    /// None in practice; see [`publication`](Self::publication).
    pub fn offline_status(&self, reason: OfflineReason) -> Result<Publication, CodecError> {
        self.publication(&Status::Offline(reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::GridConfig;

    const T0: u64 = 1_764_230_400_000;

    fn device() -> Device {
        let grid = StreetGrid::new(GridConfig::default()).expect("valid grid");
        let config = DeviceConfig::new(
            VehicleId::new("demo-0001").expect("valid"),
            FleetId::new("demo").expect("valid"),
            grid,
        );
        Device::new(config, 7)
    }

    fn command(id: u32, kind: CommandKind) -> Command {
        Command { id, kind }
    }

    fn order(name: &str, device: &Device, pickup: Node, dropoff: Node) -> Command {
        let grid = device.driver().grid();
        command(
            100,
            CommandKind::AssignOrder {
                order: OrderId::new(name).expect("valid"),
                pickup: grid.position(pickup),
                dropoff: grid.position(dropoff),
            },
        )
    }

    /// Ticks every `poll_ms` from `from` for `for_ms`; returns the heartbeats.
    fn run(device: &mut Device, from: u64, for_ms: u64, poll_ms: u64) -> std::vec::Vec<Heartbeat> {
        (0..for_ms / poll_ms)
            .filter_map(|i| device.tick(from + i * poll_ms))
            .collect()
    }

    #[test]
    fn is_small() {
        let size = core::mem::size_of::<Device>();
        assert!(size <= 320, "Device is {size} bytes");
    }

    #[test]
    fn heartbeat_cadence_follows_the_rate() {
        let mut device = device();
        let beats = run(&mut device, T0, 10_000, 10);
        assert_eq!(beats.len(), 10);
        for (i, hb) in beats.iter().enumerate() {
            assert_eq!(hb.seq, i as u32);
            assert_eq!(hb.ts_ms, T0 + i as u64 * 1000);
        }
        // Polled coarsely, the cadence holds on average.
        let beats = run(&mut device, T0 + 10_000, 60_000, 300);
        assert!((59..=61).contains(&beats.len()), "{} beats", beats.len());
    }

    #[test]
    fn cadence_keeps_its_phase() {
        let mut device = device();
        device.schedule_heartbeat(T0 + 300);
        assert_eq!(device.tick(T0), None);
        // Late by 2.9 intervals: one heartbeat now, the next back on the phase.
        let late = device.tick(T0 + 3_200).expect("due");
        assert_eq!(late.seq, 0);
        assert_eq!(device.next_heartbeat_ms(), Some(T0 + 4_300));
        // Late by 0.6 intervals: the next is skipped rather than hurried.
        assert!(device.tick(T0 + 4_900).is_some());
        assert_eq!(device.next_heartbeat_ms(), Some(T0 + 6_300));
    }

    #[test]
    fn set_rate_changes_the_cadence() {
        let mut device = device();
        run(&mut device, T0, 3_000, 100);
        let ack = device.handle_command(&command(5, CommandKind::SetRate { interval_ms: 250 }));
        assert_eq!(
            ack,
            CommandAck {
                id: 5,
                result: AckResult::Ok
            }
        );
        assert_eq!(device.next_heartbeat_ms(), Some(T0 + 2_000 + 250));
        let beats = run(&mut device, T0 + 3_000, 2_000, 10);
        assert_eq!(beats.len(), 8);
        assert!(beats.windows(2).all(|w| w[1].ts_ms - w[0].ts_ms == 250));

        for bad in [0, 99, MAX_HEARTBEAT_INTERVAL_MS + 1, u32::MAX] {
            let ack = device.handle_command(&command(6, CommandKind::SetRate { interval_ms: bad }));
            assert_eq!(ack.result, AckResult::Invalid, "interval {bad}");
        }
        assert_eq!(device.heartbeat_interval_ms(), 250);
    }

    #[test]
    fn ping_acks_ok() {
        let mut device = device();
        let ack = device.handle_command(&command(7, CommandKind::Ping));
        assert_eq!(
            ack,
            CommandAck {
                id: 7,
                result: AckResult::Ok
            }
        );
    }

    #[test]
    fn second_order_is_busy() {
        let mut device = device();
        let first = order("ord-1", &device, Node::new(1, 1), Node::new(-3, 2));
        let second = order("ord-2", &device, Node::new(2, 1), Node::new(-3, 4));
        assert_eq!(device.handle_command(&first).result, AckResult::Ok);
        assert_eq!(device.handle_command(&second).result, AckResult::Busy);
        assert_eq!(
            device
                .handle_command(&command(3, CommandKind::ReturnToDepot))
                .result,
            AckResult::Busy
        );
        let Mission::Delivery(delivery) = device.mission() else {
            panic!("not delivering: {:?}", device.mission());
        };
        assert_eq!(delivery.order.as_str(), "ord-1");
        assert!(device.flags().has(StatusFlags::ON_ORDER));
    }

    #[test]
    fn order_outside_the_service_area_is_invalid() {
        let mut device = device();
        let far = command(
            1,
            CommandKind::AssignOrder {
                order: OrderId::new("ord-x").expect("valid"),
                pickup: Position::new(485_000_000, 23_500_000), // Paris
                dropoff: GridConfig::BERLIN,
            },
        );
        assert_eq!(device.handle_command(&far).result, AckResult::Invalid);
        assert_eq!(device.mission(), &Mission::Cruising);
    }

    #[test]
    fn delivers_an_order_then_cruises_again() {
        let mut device = device();
        let (pickup, dropoff) = (Node::new(4, -2), Node::new(-5, 3));
        assert_eq!(
            device
                .handle_command(&order("ord-1", &device, pickup, dropoff))
                .result,
            AckResult::Ok
        );
        let grid = *device.driver().grid();
        let mut stages = std::vec::Vec::new();
        let mut now = T0;
        while now < T0 + 3_600_000 && device.mission() != &Mission::Cruising {
            device.advance(now);
            if let Mission::Delivery(d) = device.mission() {
                let stage = core::mem::discriminant(&d.stage);
                if stages.last() != Some(&stage) {
                    stages.push(stage);
                    if matches!(d.stage, DeliveryStage::AtPickup { .. }) {
                        assert_eq!(device.position(), grid.position(pickup));
                    }
                    if matches!(d.stage, DeliveryStage::AtDropoff { .. }) {
                        assert_eq!(device.position(), grid.position(dropoff));
                    }
                }
            }
            now += 1000;
        }
        assert_eq!(
            device.mission(),
            &Mission::Cruising,
            "not delivered in an hour"
        );
        assert_eq!(stages.len(), 4, "went through every stage");
        device.advance(now + 30_000);
        assert!(device.driver().is_moving(), "cruises on after the delivery");
    }

    #[test]
    fn returns_to_depot_and_parks() {
        let mut device = device();
        let ack = device.handle_command(&command(1, CommandKind::ReturnToDepot));
        assert_eq!(ack.result, AckResult::Ok);
        let mut now = T0;
        while device.mission() != &Mission::AtDepot {
            device.advance(now);
            now += 1000;
            assert!(now < T0 + 1_800_000, "never got home");
        }
        let hb = device.heartbeat(now);
        assert_eq!(hb.pos, device.driver().grid().position(Node::CENTRE));
        assert_eq!(hb.speed_cm_s, 0);
        assert!(!hb.flags.has(StatusFlags::MOVING));
        assert!(!hb.flags.has(StatusFlags::IGNITION));
        // Parked, it is free for an order and drives off.
        let pickup = order("ord-9", &device, Node::new(2, 0), Node::new(0, 2));
        assert_eq!(device.handle_command(&pickup).result, AckResult::Ok);
        device.advance(now + 20_000);
        assert!(device.driver().is_moving());
    }

    #[test]
    fn battery_drains_with_distance() {
        let mut device = device();
        let start = device.battery_pct;
        for s in 0..3600 {
            device.advance(T0 + s * 1000);
        }
        let used = start - device.battery_pct;
        // Roughly 20–40 km in an hour of city driving at 0.6 %/km.
        assert!((5.0..30.0).contains(&used), "used {used} % in an hour");
        assert!(!device.is_depleted());
    }

    #[test]
    fn low_battery_sends_a_free_vehicle_to_recharge() {
        let mut device = device();
        device.battery_pct = f32::from(LOW_BATTERY_PCT) + 0.5;
        let mut missions = std::vec::Vec::new();
        let mut left_with = 0;
        for s in 0..4 * 3600 {
            device.advance(T0 + s * 1000);
            if missions.last() != Some(device.mission()) {
                missions.push(device.mission().clone());
                left_with = device.battery_pct();
            }
        }
        assert_eq!(
            missions,
            [
                Mission::Cruising,
                Mission::ToDepot,
                Mission::AtDepot,
                Mission::Cruising
            ]
        );
        assert!(left_with >= 95, "left the depot with {left_with} %");
    }

    #[test]
    fn dispatcher_sent_home_stays_home() {
        let mut device = device();
        device.battery_pct = 50.0;
        device.handle_command(&command(1, CommandKind::ReturnToDepot));
        for s in 0..4 * 3600 {
            device.advance(T0 + s * 1000);
        }
        assert_eq!(device.mission(), &Mission::AtDepot);
        assert_eq!(device.battery_pct(), 100);
    }

    #[test]
    fn empty_battery_stops_the_vehicle() {
        let mut device = device();
        device.battery_pct = 0.01;
        device.advance(T0);
        device.advance(T0 + 60_000);
        assert!(device.is_depleted());
        let before = device.position();
        device.advance(T0 + 120_000);
        assert_eq!(device.position(), before);
        let hb = device.heartbeat(T0 + 120_000);
        assert_eq!(hb.battery_pct, 0);
        assert!(hb.flags.has(StatusFlags::LOW_BATTERY));
        assert!(!hb.flags.has(StatusFlags::MOVING | StatusFlags::IGNITION));
    }

    #[test]
    fn encoded_heartbeats_decode_and_are_small() {
        let mut device = device();
        let mut buf = [0u8; MAX_PAYLOAD];
        for i in 0..600 {
            let now = T0 + i * 1000;
            let expected = {
                device.advance(now);
                device.heartbeat(now)
            };
            let encoded = device.encode_heartbeat(now, &mut buf).expect("fits");
            assert!(encoded.len() <= 30, "{} bytes", encoded.len());
            let decoded: Heartbeat = shared::decode(encoded).expect("decodes");
            assert_eq!(decoded, expected);
            assert_eq!(decoded.seq, i as u32);
            assert!(
                decoded
                    .flags
                    .has(StatusFlags::GPS_FIX | StatusFlags::IGNITION)
            );
        }
    }

    #[test]
    fn same_seed_same_vehicle() {
        let beats = |seed| {
            let mut device = device();
            device = Device::new(
                DeviceConfig::new(
                    device.vehicle().clone(),
                    device.fleet().clone(),
                    *device.driver().grid(),
                ),
                seed,
            );
            run(&mut device, T0, 120_000, 100)
        };
        assert_eq!(beats(1), beats(1));
        assert_ne!(beats(1), beats(2));
    }

    #[test]
    fn status_publications_follow_the_topic_scheme() {
        let device = device();
        let online = device.online_status().expect("fits");
        assert_eq!(online.topic.as_str(), "fleet/demo/demo-0001/status");
        assert_eq!(online.payload.as_slice(), &[1, 0]);
        assert_eq!((online.qos, online.retain), (1, true));
        let will = device.last_will_status().expect("fits");
        assert_eq!(will.payload.as_slice(), &[1, 1, 1]);
        let bye = device
            .offline_status(OfflineReason::Shutdown)
            .expect("fits");
        assert_eq!(bye.payload.as_slice(), &[1, 1, 0]);
        let ack = device
            .publication(&CommandAck {
                id: 7,
                result: AckResult::Ok,
            })
            .expect("fits");
        assert_eq!(ack.topic.as_str(), "fleet/demo/demo-0001/ack");
        assert_eq!((ack.qos, ack.retain), (1, false));
    }
}
