//! The firmware's board-independent modules, compiled for the host and tested here: the
//! configuration record (against records written by `config-record.py`), NMEA splitting and
//! parsing, and the wall clock. (The vehicle, the device core on its MQTT session, is
//! `device_sim::vehicle`, tested in device-sim with the simulator.)

#[path = "../../src/clock.rs"]
#[allow(dead_code)]
mod clock;
#[path = "../../src/config.rs"]
#[allow(dead_code)]
mod config;
#[path = "../../src/gps.rs"]
#[allow(dead_code)]
mod gps;

use config::{ConfigError, DeviceRecord};
use shared::{Position, VehicleId};

/// `config-record.py --vehicle demo-0001 --fleet demo --broker 192.168.1.10:1883 --open-mode`
const OPEN_MODE_RECORD: [u8; 66] = [
    0x46, 0x42, 0x44, 0x43, 0x01, 0x00, 0x36, 0x00, 0xe7, 0xc8, 0x72, 0xc4, 0x3e, 0x25, 0x9b, 0xb7,
    0xc7, 0xe4, 0x5c, 0x90, 0x4e, 0xfa, 0x89, 0x4a, 0x3d, 0x1d, 0x4f, 0x73, 0x39, 0xcb, 0x0b, 0xe1,
    0xf4, 0x23, 0x4a, 0x0e, 0xa4, 0x14, 0x96, 0xea, 0xc0, 0xa8, 0x01, 0x0a, 0x5b, 0x07, 0x09, 0x64,
    0x65, 0x6d, 0x6f, 0x2d, 0x30, 0x30, 0x30, 0x31, 0x04, 0x64, 0x65, 0x6d, 0x6f, 0x00, 0x77, 0x5d,
    0x3f, 0x2b,
];

/// `config-record.py --vehicle north-0001 --fleet north --broker 10.0.0.2:8883 --secrets ..`
/// with key `ab` × 32 and password `Vq3abcdefghijklmnopqrstu`.
fn login_record() -> Vec<u8> {
    let mut record = b"FBDC\x01\x00\x50\x00".to_vec();
    record.extend([0xab; 32]);
    record.extend([10, 0, 0, 2, 0xb3, 0x22]);
    record.extend(b"\x0anorth-0001\x05north\x18Vq3abcdefghijklmnopqrstu");
    record.extend([0x28, 0x3a, 0x73, 0xca]);
    record
}

#[test]
fn reads_the_records_the_script_writes() {
    // Followed by the erased rest of the sector.
    let mut sector = OPEN_MODE_RECORD.to_vec();
    sector.resize(config::RECORD_MAX, 0xFF);
    let record = DeviceRecord::parse(&sector).expect("valid");
    let vehicle = VehicleId::new("demo-0001").expect("valid");
    assert_eq!(record.key, shared::open_mode_key(&vehicle));
    assert_eq!(record.vehicle, vehicle);
    assert_eq!(record.fleet.as_str(), "demo");
    assert_eq!(
        (record.broker_ip, record.broker_port),
        ([192, 168, 1, 10], 1883)
    );
    assert_eq!(record.password(), None);

    let record = DeviceRecord::parse(&login_record()).expect("valid");
    assert_eq!(record.key, [0xab; 32]);
    assert_eq!(record.vehicle.as_str(), "north-0001");
    assert_eq!(
        (record.broker_ip, record.broker_port),
        ([10, 0, 0, 2], 8883)
    );
    assert_eq!(record.password(), Some("Vq3abcdefghijklmnopqrstu"));
    let shown = format!("{record:?}");
    assert!(!shown.contains("Vq3") && !shown.contains("171"), "{shown}");
}

#[test]
fn refuses_what_is_not_a_good_record() {
    assert_eq!(
        DeviceRecord::parse(&[0xFF; config::RECORD_MAX]),
        Err(ConfigError::Blank)
    );
    assert_eq!(
        DeviceRecord::parse(&[0; config::RECORD_MAX]),
        Err(ConfigError::Magic)
    );
    let mut record = login_record();
    record[4] = 2;
    assert_eq!(DeviceRecord::parse(&record), Err(ConfigError::Version(2)));
    let mut record = login_record();
    record[40] ^= 1;
    assert!(matches!(
        DeviceRecord::parse(&record),
        Err(ConfigError::Checksum { .. })
    ));
    let record = login_record();
    assert_eq!(
        DeviceRecord::parse(&record[..record.len() - 1]),
        Err(ConfigError::Truncated)
    );
    // A field running past the body, with a matching checksum.
    let mut record = b"FBDC\x01\x00\x22\x00".to_vec();
    record.extend([0; 32]);
    record.extend([1, 2]);
    let crc = config::crc32(&record);
    record.extend(crc.to_le_bytes());
    assert_eq!(DeviceRecord::parse(&record), Err(ConfigError::Truncated));
}

#[test]
fn crc_is_zlibs() {
    assert_eq!(config::crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(config::crc32(b""), 0);
}

fn sentences(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut splitter = gps::SentenceSplitter::new();
    bytes
        .iter()
        .filter_map(|&b| splitter.push(b).map(<[u8]>::to_vec))
        .collect()
}

#[test]
fn splits_sentences_and_drops_the_rest() {
    let long = format!("${}\r\n", "X".repeat(gps::SENTENCE_MAX + 5));
    let stream = [
        b"garbage before$GPRMC,1*00\r\n".as_slice(),
        long.as_bytes(),
        b"\r\n\n$GPGGA,2*00\n$GPRMC,half$GPRMC,3*00\r\n",
    ]
    .concat();
    assert_eq!(
        sentences(&stream),
        [
            b"$GPRMC,1*00".to_vec(),
            b"$GPGGA,2*00".to_vec(),
            b"$GPRMC,3*00".to_vec()
        ]
    );
}

#[test]
fn parses_rmc_into_a_fix_and_the_time() {
    let reading = gps::parse_sentence(
        b"$GPRMC,092751.000,A,5321.6802,N,00630.3371,W,0.06,31.66,280511,,,A*45",
    )
    .expect("valid RMC");
    // 2011-05-28 09:27:51 UTC
    assert_eq!(reading.utc_ms, Some(1_306_574_871_000));
    let fix = reading.fix.expect("a fix");
    assert_eq!(fix.pos, Position::new(533_613_367, -65_056_183));
    assert_eq!((fix.speed_cm_s, fix.heading_deg), (3, 32));

    // No fix yet, but the time.
    let reading = gps::parse_sentence(b"$GNRMC,000012.00,V,,,,,,,060180,,,N*6F").expect("valid");
    assert!(reading.fix.is_none());
    assert!(reading.utc_ms.is_some());

    assert_eq!(
        gps::parse_sentence(
            b"$GPGGA,092750.000,5321.6802,N,00630.3372,W,1,8,1.03,61.7,M,55.2,M,,*76"
        ),
        Err(gps::GpsError::Skipped)
    );
    assert_eq!(
        gps::parse_sentence(
            b"$GPRMC,092751.000,A,5321.6802,N,00630.3371,W,0.06,31.66,280511,,,A*44"
        ),
        Err(gps::GpsError::Malformed),
        "bad checksum"
    );
}

#[test]
fn the_wall_clock_runs_on_from_the_gps_time() {
    let mut clock = clock::WallClock::new();
    assert_eq!(clock.now_ms(5_000), None);
    clock.set(1_764_230_400_000, 5_000);
    assert_eq!(clock.now_ms(6_250), Some(1_764_230_401_250));
}
