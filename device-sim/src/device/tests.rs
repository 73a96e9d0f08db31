//! The device core's unit tests: cadence, the delivery workflow and its events, the outbox
//! and the full-queue policy, commands, sealing.

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
    let outbox = core::mem::size_of::<Outbox>();
    // Most of it is the store-and-forward backlog.
    assert!(
        size - outbox <= 512,
        "Device is {size} bytes, {outbox} of them the outbox"
    );
    assert!(size <= 5 * 1024, "Device is {size} bytes");
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
fn a_cancelled_order_frees_the_vehicle() {
    let mut device = device();
    let cancel = |name: &str| {
        command(
            5,
            CommandKind::CancelOrder {
                order: OrderId::new(name).expect("valid"),
            },
        )
    };
    assert_eq!(
        device.handle_command(&cancel("ord-1")).result,
        AckResult::Invalid,
        "no order to cancel"
    );
    let (pickup, dropoff) = (Node::new(4, -2), Node::new(-5, 3));
    let assign = order("ord-1", &device, pickup, dropoff);
    assert_eq!(device.handle_command(&assign).result, AckResult::Ok);
    device.advance(T0 + 5_000);
    assert_eq!(
        device.handle_command(&cancel("ord-2")).result,
        AckResult::Invalid,
        "another order"
    );
    assert!(matches!(device.mission(), Mission::Delivery(_)));
    let ack = device.handle_command(&cancel("ord-1"));
    assert_eq!((ack.id, ack.result), (5, AckResult::Ok));
    assert_eq!(device.mission(), &Mission::Cruising);
    assert!(!device.flags().has(StatusFlags::ON_ORDER));
    assert_eq!(device.outbox().events_queued(), 0, "nothing was reported");
    device.advance(T0 + 35_000);
    assert!(device.driver().is_moving(), "cruises on");
    // Free again: the next order is taken.
    let next = order("ord-3", &device, dropoff, pickup);
    assert_eq!(device.handle_command(&next).result, AckResult::Ok);
    assert_eq!(
        device.handle_command(&cancel("ord-1")).result,
        AckResult::Invalid,
        "the cancelled order is gone"
    );
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

/// Opens a sealed publication of `device` with the vehicle's open-mode key.
fn open<M: WireMessage>(device: &Device, p: &Publication) -> shared::Opened<M> {
    let key = shared::open_mode_key(device.vehicle());
    shared::open(&p.payload, p.topic.as_str(), &key).expect("authentic")
}

#[test]
fn sealed_heartbeats_open_and_are_small() {
    let mut device = device();
    let mut last_counter = 0;
    for i in 0..600 {
        let now = T0 + i * 1000;
        let expected = device.tick(now).expect("due every second");
        let item = device.next_publication(now).expect("fits").expect("queued");
        assert_eq!(item.event_seq, None);
        let p = &item.publication;
        assert_eq!(p.topic.as_str(), "fleet/demo/demo-0001/hb");
        assert_eq!((p.qos, p.retain), (0, false));
        assert!(p.payload.len() <= 40, "{} bytes", p.payload.len());
        let opened = open::<Heartbeat>(&device, p);
        assert_eq!(opened.msg, expected);
        assert_eq!(opened.msg.seq, i as u32);
        assert!(opened.counter > last_counter, "counters increase");
        last_counter = opened.counter;
        assert!(
            opened
                .msg
                .flags
                .has(StatusFlags::GPS_FIX | StatusFlags::IGNITION)
        );
    }
    assert_eq!(device.next_publication(T0).expect("fits"), None);
}

#[test]
fn offline_heartbeats_are_kept_latest_first_and_counted() {
    let mut device = device();
    for i in 0..100 {
        device.tick(T0 + i * 1000);
    }
    assert_eq!(device.outbox().heartbeats_queued(), 64);
    assert_eq!(device.outbox().heartbeats_dropped(), 36);
    let seqs: std::vec::Vec<u32> = core::iter::from_fn(|| {
        device
            .next_publication(T0 + 100_000)
            .expect("fits")
            .map(|item| open::<Heartbeat>(&device, &item.publication).msg.seq)
    })
    .collect();
    assert_eq!(seqs, (36..100).collect::<std::vec::Vec<_>>());
}

#[test]
fn parked_vehicles_report_less_often() {
    let mut device = device();
    device.handle_command(&command(1, CommandKind::ReturnToDepot));
    let mut now = T0;
    while device.mission() != &Mission::AtDepot {
        device.tick(now);
        now += 1000;
        assert!(now < T0 + 1_800_000, "never got home");
    }
    let beats = run(&mut device, now, 60_000, 100);
    let expected = 60 / PARKED_INTERVAL_FACTOR as usize;
    assert!(
        (expected - 1..=expected + 1).contains(&beats.len()),
        "{} heartbeats in a parked minute",
        beats.len()
    );
    // Driving off, it reports every second again.
    let order = order("ord-5", &device, Node::new(3, 3), Node::new(-3, -3));
    assert_eq!(device.handle_command(&order).result, AckResult::Ok);
    let beats = run(&mut device, now + 60_000, 30_000, 100);
    assert!(beats.len() >= 29, "{} heartbeats driving", beats.len());
}

/// Drives `device` through an order, ticking every second until it is delivered; returns
/// the time it ended.
fn deliver(device: &mut Device, from: u64) -> u64 {
    let mut now = from;
    while matches!(device.mission(), Mission::Delivery(_)) {
        device.tick(now);
        now += 1000;
        assert!(now < from + 3_600_000, "not delivered within an hour");
    }
    now
}

#[test]
fn a_delivery_reports_pickup_in_transit_delivered() {
    let mut device = device();
    let (pickup, dropoff) = (Node::new(4, -2), Node::new(-5, 3));
    let order = order("ord-1", &device, pickup, dropoff);
    assert_eq!(device.handle_command(&order).result, AckResult::Ok);
    let grid = *device.driver().grid();
    let end = deliver(&mut device, T0);
    let events: std::vec::Vec<DeliveryEvent> = device.outbox().events().cloned().collect();
    let kinds: std::vec::Vec<DeliveryKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            DeliveryKind::Pickup,
            DeliveryKind::InTransit,
            DeliveryKind::Delivered
        ]
    );
    assert!(events.iter().all(|e| e.order.as_str() == "ord-1"));
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<std::vec::Vec<_>>(),
        [0, 1, 2]
    );
    assert!(events.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms));
    assert!(events[0].ts_ms > T0 + 8_000 && events[2].ts_ms <= end);
    assert_eq!(events[0].pos, grid.position(pickup));
    assert_eq!(events[2].pos, grid.position(dropoff));
    // In transit once it moved off the pickup corner, a few metres on.
    let moved = grid.to_local(events[1].pos).distance_to(grid.local(pickup));
    assert!(
        moved > 0.0 && moved < 5.0,
        "in-transit {moved} m from the pickup"
    );

    // Sent in order, sealed on the event topic at QoS 1; they stay until acknowledged.
    let mut sent = std::vec::Vec::new();
    while let Some(item) = device.next_publication(end).expect("fits") {
        if let Some(seq) = item.event_seq {
            assert_eq!(
                item.publication.topic.as_str(),
                "fleet/demo/demo-0001/event"
            );
            assert_eq!(item.publication.qos, 1);
            let opened = open::<DeliveryEvent>(&device, &item.publication);
            assert_eq!(opened.msg.seq, seq);
            sent.push(seq);
        }
    }
    assert_eq!(sent, [0, 1, 2]);
    assert_eq!(device.outbox().events_in_flight(), 3);
    // The link drops before the acks: all three go out again.
    device.connection_lost();
    let resent: std::vec::Vec<u32> =
        core::iter::from_fn(|| device.next_publication(end).expect("fits")?.event_seq).collect();
    assert_eq!(resent, [0, 1, 2]);
    assert_eq!(device.event_acked(0), 1);
    assert_eq!(device.event_acked(2), 2);
    assert_eq!(device.outbox().events_queued(), 0);
}

#[test]
fn offline_too_long_it_refuses_orders_and_loses_no_event() {
    let mut device = device();
    let mut now = T0;
    let mut accepted = 0;
    // Never connected: every event stays queued.
    for i in 0..20 {
        let order = order(
            &format!("ord-{i}"),
            &device,
            Node::new(1, 1),
            Node::new(-1, 2),
        );
        match device.handle_command(&order).result {
            AckResult::Ok => {
                accepted += 1;
                now = deliver(&mut device, now);
            }
            AckResult::Busy => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let capacity = crate::outbox::EVENT_BACKLOG / EVENTS_PER_ORDER;
    assert_eq!(
        accepted, capacity,
        "orders accepted while the queue had room"
    );
    assert_eq!(device.outbox().events_queued(), capacity * EVENTS_PER_ORDER);
    let seqs: std::vec::Vec<u32> = device.outbox().events().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..seqs.len() as u32).collect::<std::vec::Vec<_>>());
}

#[test]
fn a_full_queue_stalls_the_handover_until_acknowledged() {
    let mut device = device();
    let order = order("ord-1", &device, Node::new(1, 0), Node::new(0, 1));
    assert_eq!(device.handle_command(&order).result, AckResult::Ok);
    // Fill the rest of the queue behind the order's back (as earlier deliveries would).
    while device.outbox.event_room() > 1 {
        device.report(DeliveryKind::Delivered);
    }
    let mut now = T0;
    while !device.is_stalled() {
        device.tick(now);
        now += 1000;
        assert!(now < T0 + 1_800_000, "never stalled");
    }
    let Mission::Delivery(delivery) = device.mission() else {
        panic!("not delivering");
    };
    assert_eq!(delivery.stage, DeliveryStage::AtPickup { left_ms: 0 });
    for _ in 0..600 {
        device.tick(now);
        now += 1000;
    }
    assert!(device.is_stalled(), "waits while the queue is full");
    // The link comes back and the broker acknowledges: it goes on.
    while let Some(item) = device.next_publication(now).expect("fits") {
        if let Some(seq) = item.event_seq {
            device.event_acked(seq);
        }
    }
    device.tick(now + 1000);
    assert!(!device.is_stalled());
    let end = deliver(&mut device, now + 1000);
    let kinds: std::vec::Vec<DeliveryKind> = device.outbox().events().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            DeliveryKind::Pickup,
            DeliveryKind::InTransit,
            DeliveryKind::Delivered
        ]
    );
    assert!(end > now);
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
    let mut device = device();
    let statuses = device.connect_statuses(T0).expect("fits");
    let online = &statuses.online;
    assert_eq!(online.topic.as_str(), "fleet/demo/demo-0001/status");
    assert_eq!((online.qos, online.retain), (1, true));
    let online = open::<Status>(&device, online);
    let will = open::<Status>(&device, &statuses.will);
    assert_eq!(online.msg, Status::Online);
    assert_eq!(will.msg, Status::Offline(OfflineReason::ConnectionLost));
    assert_eq!(
        (online.counter, will.counter),
        (T0, T0 + 1),
        "c for online, c + 1 for the will"
    );
    let bye = device
        .offline_status(OfflineReason::Shutdown, T0)
        .expect("fits");
    let bye = open::<Status>(&device, &bye);
    assert_eq!(bye.msg, Status::Offline(OfflineReason::Shutdown));
    assert!(bye.counter > will.counter);
    let ack = device
        .publication(
            &CommandAck {
                id: 7,
                result: AckResult::Ok,
            },
            T0,
        )
        .expect("fits");
    assert_eq!(ack.topic.as_str(), "fleet/demo/demo-0001/ack");
    assert_eq!((ack.qos, ack.retain), (1, false));
    // Another key does not open it.
    assert_eq!(
        shared::open::<CommandAck>(&ack.payload, ack.topic.as_str(), &[0; 32]),
        Err(CodecError::Unauthenticated)
    );
}

#[test]
fn heartbeats_at_qos_1_and_own_keys() {
    let grid = StreetGrid::new(GridConfig::default()).expect("valid grid");
    let mut config = DeviceConfig::new(
        VehicleId::new("demo-0002").expect("valid"),
        FleetId::new("demo").expect("valid"),
        grid,
    );
    config.heartbeat_qos = 1;
    config.key = [9; 32];
    let mut device = Device::new(config, 1);
    device.tick(T0);
    let item = device.next_publication(T0).expect("fits").expect("queued");
    let p = item.publication;
    assert_eq!(p.qos, 1);
    let opened: shared::Opened<Heartbeat> =
        shared::open(&p.payload, p.topic.as_str(), &[9; 32]).expect("authentic");
    assert_eq!(opened.msg.seq, 0);
}

/// A fix in Hamburg, well outside the default Berlin grid.
const HAMBURG: Position = Position::new(535_511_000, 99_937_000);

fn fix(pos: Position, speed_cm_s: u16, heading_deg: u16) -> GpsFix {
    GpsFix {
        pos,
        speed_cm_s,
        heading_deg,
    }
}

#[test]
fn gps_fixes_position_the_heartbeats_and_the_driver_stops() {
    let mut device = device();
    assert!(!device.is_externally_positioned());
    device.gps_fix(fix(HAMBURG, 1_200, 87));
    assert!(device.is_externally_positioned());
    let beats = run(&mut device, T0, 60_000, 100);
    assert_eq!(beats.len(), 60, "moving: the normal cadence");
    for hb in &beats {
        assert_eq!(hb.pos, HAMBURG, "the simulated drive no longer moves it");
        assert_eq!((hb.speed_cm_s, hb.heading_deg), (1_200, 87));
        assert!(hb.flags.has(StatusFlags::GPS_FIX | StatusFlags::MOVING));
    }
    assert_eq!(
        beats[0].battery_pct, beats[59].battery_pct,
        "no simulated drain"
    );

    // Slower than a walk is standing still: parked, heartbeats five times less often.
    device.gps_fix(fix(HAMBURG, MOVING_MIN_CM_S - 1, 87));
    let parked = run(&mut device, T0 + 60_000, 60_000, 100);
    assert!((11..=13).contains(&parked.len()), "{} beats", parked.len());
    assert!(parked.iter().all(|hb| !hb.flags.has(StatusFlags::MOVING)));

    // The fix is lost: the last position, no speed, no GPS_FIX flag.
    device.gps_fix(fix(HAMBURG, 900, 10));
    device.gps_lost();
    let hb = device.heartbeat(T0 + 200_000);
    assert_eq!((hb.pos, hb.speed_cm_s), (HAMBURG, 0));
    assert!(!hb.flags.has(StatusFlags::GPS_FIX));
    assert!(!hb.flags.has(StatusFlags::MOVING));
    assert_eq!(device.position(), HAMBURG);

    device.set_battery_pct(150);
    assert_eq!(device.battery_pct(), 100);
    device.set_battery_pct(12);
    assert!(device.flags().has(StatusFlags::LOW_BATTERY));
}

#[test]
fn gps_lost_before_any_fix_changes_nothing() {
    let mut device = device();
    let before = device.heartbeat(T0);
    device.gps_lost();
    assert!(!device.is_externally_positioned());
    assert_eq!(device.heartbeat(T0), before);
    assert!(before.flags.has(StatusFlags::GPS_FIX));
}

/// Orders anywhere on the globe, completed by hand: pickup, in-transit on driving off,
/// delivered; each event where the last fix was.
#[test]
fn a_tracker_delivers_by_hand_where_the_gps_says() {
    let mut device = device();
    device.gps_fix(fix(HAMBURG, 0, 0));
    run(&mut device, T0, 1_000, 100);
    let customer = Position::new(535_600_000, 100_100_000);
    let assign = command(
        7,
        CommandKind::AssignOrder {
            order: OrderId::new("ord-hh").expect("valid"),
            pickup: HAMBURG,
            dropoff: customer,
        },
    );
    assert_eq!(device.handle_command(&assign).result, AckResult::Ok);
    // Standing at the vendor for a minute: nothing happens by itself.
    run(&mut device, T0 + 1_000, 60_000, 100);
    assert_eq!(device.outbox().events_queued(), 0);
    assert_eq!(device.complete_handover(T0 + 61_000), Handover::PickedUp);
    // Driving off with the parcel is in-transit, once.
    device.gps_fix(fix(Position::new(535_520_000, 99_950_000), 800, 45));
    run(&mut device, T0 + 61_000, 10_000, 100);
    device.gps_fix(fix(customer, 0, 45));
    run(&mut device, T0 + 71_000, 5_000, 100);
    assert_eq!(device.complete_handover(T0 + 80_000), Handover::Delivered);
    assert_eq!(*device.mission(), Mission::Cruising);
    assert_eq!(device.complete_handover(T0 + 81_000), Handover::NoDelivery);

    let events: std::vec::Vec<DeliveryEvent> = device.outbox().events().cloned().collect();
    let kinds: std::vec::Vec<DeliveryKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            DeliveryKind::Pickup,
            DeliveryKind::InTransit,
            DeliveryKind::Delivered
        ]
    );
    assert_eq!(events[0].pos, HAMBURG);
    assert_eq!(events[0].ts_ms, T0 + 61_000);
    assert_eq!(events[1].pos, Position::new(535_520_000, 99_950_000));
    assert_eq!(events[2].pos, customer);
    assert_eq!(events[2].ts_ms, T0 + 80_000);

    // Positions off the globe stay invalid.
    let bad = command(
        8,
        CommandKind::AssignOrder {
            order: OrderId::new("ord-x").expect("valid"),
            pickup: Position::new(900_000_001, 0),
            dropoff: customer,
        },
    );
    assert_eq!(device.handle_command(&bad).result, AckResult::Invalid);
}

#[test]
fn handed_over_without_driving_off_reports_in_transit_first() {
    let mut device = device();
    device.gps_fix(fix(HAMBURG, 0, 0));
    let assign = command(
        7,
        CommandKind::AssignOrder {
            order: OrderId::new("ord-1").expect("valid"),
            pickup: HAMBURG,
            dropoff: HAMBURG,
        },
    );
    assert_eq!(device.handle_command(&assign).result, AckResult::Ok);
    assert_eq!(device.complete_handover(T0), Handover::PickedUp);
    assert_eq!(device.complete_handover(T0 + 5_000), Handover::Delivered);
    let kinds: std::vec::Vec<DeliveryKind> = device.outbox().events().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            DeliveryKind::Pickup,
            DeliveryKind::InTransit,
            DeliveryKind::Delivered
        ]
    );
}

/// Handovers never make an event the outbox cannot hold: an order is only accepted with
/// room for all three ([`Handover::OutboxFull`] guards the rest).
#[test]
fn a_long_offline_tracker_refuses_orders_it_could_not_report() {
    let mut device = device();
    device.gps_fix(fix(HAMBURG, 0, 0));
    let assign = |id: u32| {
        command(
            id,
            CommandKind::AssignOrder {
                order: OrderId::new("ord-1").expect("valid"),
                pickup: HAMBURG,
                dropoff: HAMBURG,
            },
        )
    };
    let mut now = T0;
    let capacity = crate::outbox::EVENT_BACKLOG / EVENTS_PER_ORDER;
    for id in 0..capacity as u32 {
        assert_eq!(device.handle_command(&assign(id)).result, AckResult::Ok);
        assert_eq!(device.complete_handover(now), Handover::PickedUp);
        assert_eq!(device.complete_handover(now + 1), Handover::Delivered);
        now += 1_000;
    }
    assert!(device.outbox().event_room() < EVENTS_PER_ORDER);
    assert_eq!(device.handle_command(&assign(99)).result, AckResult::Busy);
    assert_eq!(device.complete_handover(now), Handover::NoDelivery);
    assert_eq!(
        device.outbox().events_queued(),
        capacity * EVENTS_PER_ORDER,
        "every event kept"
    );
    // Acknowledged, there is room again.
    let mut acked = 0;
    while let Some(item) = device.next_publication(now).expect("fits") {
        if let Some(seq) = item.event_seq {
            acked += device.event_acked(seq);
        }
    }
    assert_eq!(acked, capacity * EVENTS_PER_ORDER);
    assert_eq!(device.handle_command(&assign(100)).result, AckResult::Ok);
}
