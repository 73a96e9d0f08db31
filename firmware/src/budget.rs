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
    let (vehicle, password) = start();
    let password = (!password.is_empty()).then_some(password.as_str());
    let mut clock = WallClock::new();
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
                if vehicle.begin(password, mono, now).is_err() {
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
                receive_command(vehicle, round);
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

/// Makes the vehicle (in its static) from the configuration record; returns it with the MQTT
/// password. Not inlined, nor is what it calls: what they take of the stack is gone before
/// the loop starts.
#[inline(never)]
fn start() -> (
    &'static mut Vehicle,
    heapless::String<{ config::PASSWORD_MAX }>,
) {
    let record = read_record();
    let Ok(grid) = StreetGrid::new(GridConfig::default()) else {
        halt()
    };
    let mut device_config = DeviceConfig::new(record.vehicle.clone(), record.fleet.clone(), grid);
    device_config.key = record.key;
    (make_vehicle(device_config), record.password)
}

/// The vehicle, made in its static.
#[inline(never)]
fn make_vehicle(device_config: DeviceConfig) -> &'static mut Vehicle {
    let seed = black_box(7);
    VEHICLE.init_with(|| Vehicle::new(device_config, seed, 30))
}

/// The configuration record, parsed. Not inlined: its bytes are gone once it is parsed.
#[inline(never)]
fn read_record() -> DeviceRecord {
    let mut record = [0u8; config::RECORD_MAX];
    let len = build_record(&mut record);
    let Ok(record) = DeviceRecord::parse(black_box(&record[..len])) else {
        halt()
    };
    record
}

/// "Writes" the session's output: the bytes go through `black_box`.
fn drain(vehicle: &mut Vehicle) {
    let n = black_box(vehicle.output()).len();
    vehicle.wrote(n);
}

/// A configuration record as `config-record.py` writes it, with a made-up key and password.
fn build_record(out: &mut [u8; config::RECORD_MAX]) -> usize {
    let fields: [&[u8]; 3] = [b"demo-0001", b"demo", b"not-a-real-password"];
    out[..4].copy_from_slice(&config::MAGIC);
    out[4] = config::VERSION;
    out[8..40].copy_from_slice(&[0x5A; 32]);
    out[40..44].copy_from_slice(&[192, 168, 1, 10]);
    out[44..46].copy_from_slice(&1883u16.to_le_bytes());
    let mut end = 46;
    for field in fields {
        out[end] = field.len() as u8;
        out[end + 1..end + 1 + field.len()].copy_from_slice(field);
        end += 1 + field.len();
    }
    out[6..8].copy_from_slice(&((end - 8) as u16).to_le_bytes());
    let crc = config::crc32(&out[..end]);
    out[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    end + 4
}

/// The broker's command publish arrives: written into the receive buffer, as the tracker
/// reads its socket. Not inlined: the loop's frame stays small.
#[inline(never)]
fn receive_command(vehicle: &mut Vehicle, round: u32) {
    let topic = vehicle.command_topic();
    let buffer = black_box(vehicle.receive_buffer());
    let len = command_publish(&topic, round, buffer);
    vehicle.received(black_box(len));
}

/// A QoS 1 PUBLISH of an `AssignOrder` command on the command `topic`, as the broker would
/// send it, written into `out`; returns its length (0 if it does not fit).
fn command_publish(topic: &str, round: u32, out: &mut [u8]) -> usize {
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
    let topic = topic.as_bytes();
    let at = 4 + topic.len() + 2;
    let Some(Ok(payload)) = out.get_mut(at..).map(|rest| shared::encode(&command, rest)) else {
        return 0;
    };
    let remaining = 2 + topic.len() + 2 + payload.len();
    out[0] = 0x32;
    out[1] = remaining as u8;
    out[2..4].copy_from_slice(&(topic.len() as u16).to_be_bytes());
    out[4..4 + topic.len()].copy_from_slice(topic);
    out[at - 2..at].copy_from_slice(&(round as u16 | 1).to_be_bytes());
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
