//! The vehicle's unit tests: a whole conversation with a scripted broker, byte by byte.

use super::*;
use crate::device::GpsFix;
use crate::route::{GridConfig, StreetGrid};
use shared::{CommandKind, FleetId, OrderId, Position, VehicleId};

const T0: u64 = 1_764_230_400_000;
const PASSWORD: &str = "Vq3abcdefghijklmnopqrstu";

fn vehicle() -> Vehicle {
    let grid = StreetGrid::new(GridConfig::default()).expect("valid");
    let mut config = DeviceConfig::new(
        VehicleId::new("north-0001").expect("valid"),
        FleetId::new("north").expect("valid"),
        grid,
    );
    config.key = [0xab; 32];
    let mut vehicle = Vehicle::new(config, 1, 30);
    vehicle.device_mut().gps_fix(GpsFix {
        pos: Position::new(535_511_000, 99_937_000),
        speed_cm_s: 0,
        heading_deg: 0,
    });
    vehicle
}

const fn at(mono_ms: u64, utc_ms: u64) -> Moment {
    Moment { mono_ms, utc_ms }
}

/// MQTT packets in `bytes`, as (first byte, whole packet); remaining lengths below 128.
fn packets(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 2 {
        let len = 2 + usize::from(rest[1]);
        out.push((rest[0], rest[..len].to_vec()));
        rest = &rest[len..];
    }
    out
}

fn take_output(vehicle: &mut Vehicle) -> Vec<u8> {
    let out = vehicle.output().to_vec();
    vehicle.wrote(out.len());
    out
}

fn kinds(vehicle: &mut Vehicle) -> Vec<u8> {
    packets(&take_output(vehicle)).iter().map(|p| p.0).collect()
}

/// The packet id of a QoS 1 PUBLISH.
fn pkid(packet: &[u8]) -> u16 {
    let topic_len = usize::from(packet[3]);
    u16::from_be_bytes([packet[4 + topic_len], packet[5 + topic_len]])
}

/// A QoS 1 PUBLISH of `command` on `topic` with packet id 7, as the broker sends it.
fn command_publish(topic: &str, command: &Command) -> Vec<u8> {
    let mut payload = [0u8; 128];
    let payload = shared::encode(command, &mut payload).expect("fits");
    let mut publish = vec![0x32, 0];
    publish.extend((topic.len() as u16).to_be_bytes());
    publish.extend(topic.as_bytes());
    publish.extend(7u16.to_be_bytes());
    publish.extend(&*payload);
    publish[1] = (publish.len() - 2) as u8;
    publish
}

#[test]
fn connects_subscribes_answers_commands_and_releases_acked_events() {
    let mut vehicle = vehicle();
    vehicle.begin(Some(PASSWORD), 0, T0).expect("begins");
    let connect = take_output(&mut vehicle);
    assert_eq!(connect[0], 0x10, "CONNECT");
    let as_text = String::from_utf8_lossy(&connect);
    assert!(
        as_text.contains("fleet/north/north-0001/status"),
        "the will"
    );
    assert!(as_text.contains(PASSWORD), "the login");

    let mut happened = Vec::new();
    vehicle.feed(&[0x20, 0x02, 0x00, 0x00]);
    vehicle
        .on_input(&at(10, T0), |h| happened.push(h))
        .expect("CONNACK");
    assert_eq!(happened, [Happened::Connected]);
    assert_eq!(
        kinds(&mut vehicle),
        [0x33, 0x82],
        "the retained Online status (QoS 1), then SUBSCRIBE"
    );

    // An order arrives; the ack goes out; two handovers make three events.
    let command = Command {
        id: 5,
        kind: CommandKind::AssignOrder {
            order: OrderId::new("ord-1").expect("valid"),
            pickup: Position::new(535_511_000, 99_937_000),
            dropoff: Position::new(535_511_000, 99_937_000),
        },
    };
    vehicle.feed(&command_publish(&vehicle.command_topic(), &command));
    happened.clear();
    vehicle
        .on_input(&at(20, T0 + 20), |h| happened.push(h))
        .expect("publish");
    assert!(
        matches!(
            happened[..],
            [Happened::Command {
                result: AckResult::Ok,
                ack: Ok(()),
                ..
            }]
        ),
        "{happened:?}"
    );
    assert_eq!(
        kinds(&mut vehicle),
        [0x40, 0x32],
        "PUBACK of the command, then the sealed ack"
    );
    vehicle.complete_handover(T0 + 1_000);
    vehicle.complete_handover(T0 + 2_000);
    assert_eq!(vehicle.device().outbox().events_queued(), 3);

    assert_eq!(vehicle.flush(30, T0 + 2_000, usize::MAX, &mut ()), 3);
    let sent = packets(&take_output(&mut vehicle));
    assert!(sent.iter().all(|p| p.0 == 0x32), "QoS 1, no DUP");
    // Packet ids 1 (Online), 2 (SUBSCRIBE), 3 (command ack), then 4, 5, 6 for the events.
    let ids: Vec<u16> = sent.iter().map(|p| pkid(&p.1)).collect();
    assert_eq!(ids, [4, 5, 6]);

    // The link drops before any PUBACK: the events go out again, with DUP.
    vehicle.link_lost();
    assert_eq!(vehicle.device().outbox().events_in_flight(), 0);
    vehicle.begin(None, 40, T0 + 3_000).expect("begins");
    take_output(&mut vehicle);
    vehicle.feed(&[0x20, 0x02, 0x00, 0x00]);
    vehicle
        .on_input(&at(50, T0 + 3_000), |_| {})
        .expect("CONNACK");
    take_output(&mut vehicle);
    assert_eq!(vehicle.flush(60, T0 + 3_000, usize::MAX, &mut ()), 3);
    let resent = packets(&take_output(&mut vehicle));
    assert!(resent.iter().all(|p| p.0 == 0x3A), "QoS 1 with DUP");

    // The broker acknowledges the last one: all three leave the outbox.
    let last = pkid(&resent[2].1);
    happened.clear();
    vehicle.feed(&[0x40, 0x02, (last >> 8) as u8, last as u8]);
    vehicle
        .on_input(&at(70, T0 + 3_000), |h| happened.push(h))
        .expect("PUBACK");
    assert!(happened.contains(&Happened::EventsAcked(3)), "{happened:?}");
    assert_eq!(vehicle.device().outbox().events_queued(), 0);
}

/// Records what a flush showed its hook, and garbles heartbeats.
#[derive(Default)]
struct Recorder {
    handing: Vec<Option<u32>>,
    handed: Vec<(Option<u32>, bool)>,
    refused: Vec<Option<u32>>,
}

impl FlushHook for Recorder {
    fn handing(&mut self, payload: &mut Payload, event_seq: Option<u32>) {
        if event_seq.is_none() {
            payload.clear();
            payload.extend_from_slice(b"garbage").expect("fits");
        }
        self.handing.push(event_seq);
    }

    fn handed(&mut self, event_seq: Option<u32>, dup: bool) {
        self.handed.push((event_seq, dup));
    }

    fn refused(&mut self, event_seq: Option<u32>, _error: SendError) {
        self.refused.push(event_seq);
    }
}

#[test]
fn the_flush_hook_sees_and_may_change_each_publication_within_the_limit() {
    let mut vehicle = vehicle();
    // Heartbeats queue while offline.
    for i in 0..4 {
        vehicle.device_mut().tick(T0 + i * 10_000);
    }
    let queued = vehicle.device().outbox().heartbeats_queued();
    assert!(queued >= 2, "{queued} heartbeats queued");

    let mut hook = Recorder::default();
    assert_eq!(
        vehicle.flush(0, T0, usize::MAX, &mut hook),
        0,
        "not connected"
    );
    assert!(hook.handing.is_empty());

    vehicle.begin(None, 0, T0).expect("begins");
    vehicle.feed(&[0x20, 0x02, 0x00, 0x00]);
    vehicle.on_input(&at(10, T0), |_| {}).expect("CONNACK");
    take_output(&mut vehicle);

    assert_eq!(vehicle.flush(20, T0 + 40_000, 1, &mut hook), 1, "the limit");
    assert_eq!(hook.handing, [None]);
    assert_eq!(hook.handed, [(None, false)]);
    assert!(hook.refused.is_empty());
    let sent = take_output(&mut vehicle);
    assert!(
        sent.windows(7).any(|w| w == b"garbage"),
        "the hook's payload went out"
    );
    assert_eq!(vehicle.device().outbox().heartbeats_queued(), queued - 1);
}

#[test]
fn a_command_waits_while_its_ack_would_not_fit() {
    let mut vehicle = vehicle();
    vehicle.begin(None, 0, T0).expect("begins");
    vehicle.feed(&[0x20, 0x02, 0x00, 0x00]);
    vehicle.on_input(&at(10, T0), |_| {}).expect("CONNACK");
    // Fill the transmit buffer with heartbeats, then a command arrives.
    for i in 0..40 {
        vehicle.device_mut().tick(T0 + i * 10_000);
    }
    vehicle.flush(20, T0, usize::MAX, &mut ());
    assert!(vehicle.session().output_room() < LARGEST_PUBLISH);
    let ping = Command {
        id: 9,
        kind: CommandKind::Ping,
    };
    vehicle.feed(&command_publish(&vehicle.command_topic(), &ping));
    assert_eq!(vehicle.next_input(&at(30, T0)), Ok(None), "waits for room");
    take_output(&mut vehicle);
    assert!(matches!(
        vehicle.next_input(&at(40, T0)),
        Ok(Some(Happened::Command { ack: Ok(()), .. }))
    ));
}

/// The will in the CONNECT and the `Online` status published on the CONNACK are the very
/// bytes `Device::connect_statuses` seals at the start of the connection (`Online` with the
/// counter `c`, the will with `c + 1`), though `Online` is sealed only on the CONNACK.
#[test]
fn the_connection_statuses_are_those_of_connect_statuses() {
    let mut vehicle = vehicle();
    let statuses = vehicle.device().clone().connect_statuses(T0).expect("fits");
    let contains =
        |bytes: &[u8], payload: &[u8]| bytes.windows(payload.len()).any(|w| w == payload);

    vehicle.begin(Some(PASSWORD), 0, T0).expect("queued");
    let connect = take_output(&mut vehicle);
    assert!(contains(&connect, &statuses.will.payload));
    assert!(!contains(&connect, &statuses.online.payload));

    vehicle.feed(&[0x20, 2, 0, 0]);
    vehicle
        .on_input(&at(1_000, T0 + 1_000), |_| {})
        .expect("connected");
    let online = take_output(&mut vehicle);
    assert!(contains(&online, &statuses.online.payload));
    assert!(contains(&online, statuses.online.topic.as_bytes()));
}
