//! The device's configuration record: who it is, its sealing key, its broker and login, read
//! from a dedicated flash sector at boot.
//!
//! The record lives at [`RECORD_ADDRESS`] (the last 128 KiB sector of bank 2, which
//! `nucleo-f429zi.x` keeps out of the program) and is written there once per device with
//! `firmware/config-record.py` and `probe-rs download` (see `docs/firmware.md`). Nothing
//! secret is compiled into the firmware: without a valid record it does not publish.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "FBDC" (Fleetbeat device configuration)
//!      4     1  version: 1
//!      5     1  reserved: 0
//!      6     2  body length N, little-endian
//!      8     N  body:
//!                 32  the device key (seals every payload)
//!                  4  the broker's IPv4 address
//!                  2  the broker's TCP port, little-endian
//!                1+n  the vehicle id (length byte, then UTF-8)
//!                1+n  the fleet id
//!                1+n  the MQTT password (length 0: the broker takes no login)
//!  8 + N     4  CRC-32 (IEEE, as zlib's crc32) of bytes 0 .. 8 + N, little-endian
//! ```

use shared::{DeviceKey, FleetId, IdError, VehicleId};

/// Where the record is: the start of flash sector 23.
pub const RECORD_ADDRESS: u32 = 0x081E_0000;
/// The record's offset from the start of flash (what `embassy_stm32::flash` takes).
pub const RECORD_OFFSET: u32 = RECORD_ADDRESS - 0x0800_0000;
/// The bytes read from flash at boot: the largest valid record is smaller.
pub const RECORD_MAX: usize = 256;
/// The record's first four bytes.
pub const MAGIC: [u8; 4] = *b"FBDC";
/// The only layout version this firmware reads.
pub const VERSION: u8 = 1;
/// The longest MQTT password the record may hold.
pub const PASSWORD_MAX: usize = 64;

/// Why the configuration record cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The sector is erased (all `0xFF`): the device was never configured.
    #[error("the configuration sector is blank: write a record (docs/firmware.md)")]
    Blank,
    /// The record does not start with [`MAGIC`].
    #[error("no configuration record (bad magic)")]
    Magic,
    /// A layout this firmware does not know.
    #[error("configuration record version {0}, this firmware reads version 1")]
    Version(u8),
    /// The body length runs past the bytes read, or a field past the body.
    #[error("the configuration record is truncated")]
    Truncated,
    /// The checksum does not match: a corrupt or half-written record.
    #[error("configuration record checksum {found:#010x}, expected {expected:#010x}")]
    Checksum {
        /// Stored in the record.
        found: u32,
        /// Computed over the record.
        expected: u32,
    },
    /// The vehicle id is not a valid [`VehicleId`].
    #[error("invalid vehicle id in the configuration record: {0}")]
    Vehicle(IdError),
    /// The fleet id is not a valid [`FleetId`].
    #[error("invalid fleet id in the configuration record: {0}")]
    Fleet(IdError),
    /// The password is longer than [`PASSWORD_MAX`].
    #[error("the MQTT password in the configuration record is longer than {PASSWORD_MAX} bytes")]
    Password,
    /// A text field is not UTF-8.
    #[error("the {0} in the configuration record is not UTF-8")]
    NotUtf8(&'static str),
    /// The broker port is 0.
    #[error("the broker port in the configuration record is 0")]
    Port,
}

/// A device's configuration, parsed from its record.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The vehicle id: MQTT client id, username and topic level.
    pub vehicle: VehicleId,
    /// The fleet.
    pub fleet: FleetId,
    /// The key payloads are sealed with.
    pub key: DeviceKey,
    /// The broker's IPv4 address.
    pub broker_ip: [u8; 4],
    /// The broker's TCP port.
    pub broker_port: u16,
    /// The MQTT password; empty: no login.
    pub password: heapless::String<PASSWORD_MAX>,
}

impl core::fmt::Debug for DeviceRecord {
    /// Never prints the key nor the password.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceRecord")
            .field("vehicle", &self.vehicle)
            .field("fleet", &self.fleet)
            .field("broker_ip", &self.broker_ip)
            .field("broker_port", &self.broker_port)
            .field("login", &!self.password.is_empty())
            .finish_non_exhaustive()
    }
}

impl DeviceRecord {
    /// Parses a record from the start of `bytes` (what was read from the sector; bytes after
    /// the record are ignored).
    ///
    /// # Errors
    /// A [`ConfigError`] saying what is wrong; [`ConfigError::Blank`] for an erased sector.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let header = bytes.get(..8).ok_or(ConfigError::Truncated)?;
        if header.iter().all(|&b| b == 0xFF) {
            return Err(ConfigError::Blank);
        }
        if header[..4] != MAGIC {
            return Err(ConfigError::Magic);
        }
        if header[4] != VERSION {
            return Err(ConfigError::Version(header[4]));
        }
        let body_len = usize::from(u16::from_le_bytes([header[6], header[7]]));
        let end = 8 + body_len;
        let crc_bytes = bytes.get(end..end + 4).ok_or(ConfigError::Truncated)?;
        let found = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
        let expected = crc32(&bytes[..end]);
        if found != expected {
            return Err(ConfigError::Checksum { found, expected });
        }
        let mut body = Fields(&bytes[8..end]);
        let key: DeviceKey = body.array::<32>()?;
        let broker_ip = body.array::<4>()?;
        let broker_port = u16::from_le_bytes(body.array::<2>()?);
        if broker_port == 0 {
            return Err(ConfigError::Port);
        }
        let vehicle = body
            .text("vehicle id")?
            .ok_or(ConfigError::Vehicle(IdError::Empty))?;
        let vehicle = VehicleId::new(vehicle).map_err(ConfigError::Vehicle)?;
        let fleet = body
            .text("fleet id")?
            .ok_or(ConfigError::Fleet(IdError::Empty))?;
        let fleet = FleetId::new(fleet).map_err(ConfigError::Fleet)?;
        let password = body.text("password")?.unwrap_or_default();
        let password = heapless::String::try_from(password).map_err(|_| ConfigError::Password)?;
        Ok(Self {
            vehicle,
            fleet,
            key,
            broker_ip,
            broker_port,
            password,
        })
    }

    /// The MQTT password, if the broker takes a login.
    pub fn password(&self) -> Option<&str> {
        (!self.password.is_empty()).then_some(self.password.as_str())
    }
}

/// The fields of a record body, taken in order.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ConfigError> {
        if self.0.len() < n {
            return Err(ConfigError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ConfigError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A length-prefixed string, the `field`; `None` if empty.
    fn text(&mut self, field: &'static str) -> Result<Option<&'a str>, ConfigError> {
        let len = usize::from(self.take(1)?[0]);
        let bytes = self.take(len)?;
        let text = core::str::from_utf8(bytes).map_err(|_| ConfigError::NotUtf8(field))?;
        Ok((!text.is_empty()).then_some(text))
    }
}

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`), bit by bit: the record is read once.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}
