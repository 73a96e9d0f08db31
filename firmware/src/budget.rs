//! The device stack driven in a loop from canned bytes, for `device-stack` and
//! `device-stack-gps` (included by both with `#[path]`; see their docs).

use core::hint::black_box;

use device_sim::device::{Device, DeviceConfig};
use device_sim::route::{GridConfig, StreetGrid};
use device_sim::vehicle::{Moment, Vehicle};
use fleetbeat_firmware::clock::WallClock;
use fleetbeat_firmware::config::{self, DeviceRecord};
use shared::{Command, CommandKind, OrderId, Position};
use static_cell::StaticCell;
// The interrupt vector table (cortex-m-rt's `device` feature wants one); nothing of the HAL
// is called.
use embassy_stm32 as _;

/// Where the positions and the time come from.
pub trait Positioning {
    /// Called every round at the monotonic `mono` (ms): set the clock, feed the device fixes.
    fn update(&mut self, mono: u64, clock: &mut WallClock, device: &mut Device);
}

/// The vehicle lives here, as in the tracker.
static VEHICLE: StaticCell<Vehicle> = StaticCell::new();

/// Runs the device stack for ever, positioned by `positioning`.
pub fn run(mut positioning: impl Positioning) -> ! {
    let mut record = [0u8; config::RECORD_MAX];
    let len = build_record(&mut record);
    let Ok(record) = DeviceRecord::parse(black_box(&record[..len])) else {
        halt()
    };
    let Ok(grid) = StreetGrid::new(GridConfig::default()) else {
        halt()
    };
    let mut device_config = DeviceConfig::new(record.vehicle.clone(), record.fleet.clone(), grid);
    device_config.key = record.key;
    let seed = black_box(7);
    let vehicle = VEHICLE.init_with(|| Vehicle::new(device_config, seed, 30));

    let mut clock = WallClock::new();
    let mut packet = [0u8; 256];
    let mut mono: u64 = 0;
    let mut round: u32 = 0;
    loop {
        mono += black_box(250);
        round = round.wrapping_add(1);
        positioning.update(mono, &mut clock, vehicle.device_mut());
        let Some(now) = clock.now_ms(mono) else {
            continue;
        };
        black_box(vehicle.device_mut().tick(now));

        match black_box(round % 64) {
            // A new connection: CONNECT, then the broker's CONNACK and SUBACK.
            0 => {
                vehicle.link_lost();
                if vehicle.begin(record.password(), mono, now).is_err() {
                    halt()
                }
                drain(vehicle);
                black_box(vehicle.feed(black_box(&[0x20, 0x02, 0x00, 0x00])));
            }
            1 => {
                black_box(vehicle.feed(black_box(&[0x90, 0x03, 0x00, 0x02, 0x01])));
            }
            // An order, and its handovers a while later.
            2 => {
                let len = command_publish(vehicle, round, &mut packet);
                black_box(vehicle.feed(black_box(&packet[..len])));
            }
            20 | 40 => {
                black_box(vehicle.complete_handover(now));
            }
            // The broker acknowledges what is in flight.
            n => {
                let pkid = (n % 24) as u8;
                black_box(vehicle.feed(black_box(&[0x40, 0x02, 0x00, pkid])));
            }
        }
        let moment = Moment {
            mono_ms: mono,
            utc_ms: now,
        };
        let happened = vehicle.on_input(&moment, |happened| {
            black_box(&happened);
        });
        if happened.is_err() || vehicle.on_timer(mono).is_err() {
            vehicle.link_lost();
        }
        black_box(vehicle.flush(mono, now, usize::MAX, &mut ()));
        drain(vehicle);
    }
}

/// "Writes" the session's output: the bytes go through `black_box`.
fn drain(vehicle: &mut Vehicle) {
    let n = black_box(vehicle.output()).len();
    vehicle.wrote(n);
}

/// A configuration record as `config-record.py` writes it, with a made-up key and password.
fn build_record(out: &mut [u8; config::RECORD_MAX]) -> usize {
    let mut body = heapless::Vec::<u8, 200>::new();
    let fields: [&[u8]; 3] = [b"demo-0001", b"demo", b"not-a-real-password"];
    let _ = body.extend_from_slice(&[0x5A; 32]);
    let _ = body.extend_from_slice(&[192, 168, 1, 10]);
    let _ = body.extend_from_slice(&1883u16.to_le_bytes());
    for field in fields {
        let _ = body.push(field.len() as u8);
        let _ = body.extend_from_slice(field);
    }
    out[..4].copy_from_slice(&config::MAGIC);
    out[4] = config::VERSION;
    out[6..8].copy_from_slice(&(body.len() as u16).to_le_bytes());
    let end = 8 + body.len();
    out[8..end].copy_from_slice(&body);
    let crc = config::crc32(&out[..end]);
    out[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    end + 4
}

/// A QoS 1 PUBLISH of an `AssignOrder` command on the vehicle's command topic, as the broker
/// would send it; returns its length.
fn command_publish(vehicle: &Vehicle, round: u32, out: &mut [u8; 256]) -> usize {
    let topic = vehicle.device().topic(shared::TopicKind::Command).name();
    let Ok(order) = OrderId::new("ord-1") else {
        halt()
    };
    let command = Command {
        id: round,
        kind: CommandKind::AssignOrder {
            order,
            pickup: Position::new(535_511_000, 99_937_000),
            dropoff: Position::new(535_600_000, 100_100_000),
        },
    };
    let mut payload = [0u8; shared::MAX_PAYLOAD];
    let Ok(payload) = shared::encode(&command, &mut payload) else {
        halt()
    };
    let topic = topic.as_bytes();
    let remaining = 2 + topic.len() + 2 + payload.len();
    out[0] = 0x32;
    out[1] = remaining as u8;
    out[2..4].copy_from_slice(&(topic.len() as u16).to_be_bytes());
    out[4..4 + topic.len()].copy_from_slice(topic);
    let at = 4 + topic.len();
    out[at..at + 2].copy_from_slice(&(round as u16 | 1).to_be_bytes());
    out[at + 2..at + 2 + payload.len()].copy_from_slice(payload);
    2 + remaining
}

/// Stops here: a trap the debugger shows.
pub fn halt() -> ! {
    cortex_m::asm::udf()
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    halt()
}
