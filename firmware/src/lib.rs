//! Fleetbeat's reference tracker firmware for the NUCLEO-F429ZI (STM32F429ZI, Cortex-M4F,
//! Ethernet): the device core and MQTT session of `device-sim`, fed by a real GPS, on embassy.
//!
//! This library holds the board-independent parts, `no_std` and without allocation; the
//! binaries put them on the board:
//!
//! - `tracker` (`src/main.rs`): the firmware. Reads the [`config`] record from flash, the GPS
//!   over USART2 ([`gps`]), keeps the [`clock`], and drives `device_sim::vehicle::Vehicle`
//!   (the device core on its MQTT session, the very code path the simulator runs) over an
//!   embassy-net TCP connection to the broker; the user button B1 confirms handovers.
//! - `device-stack` (`src/bin/device-stack.rs`): the device stack alone (no network stack,
//!   no executor), driven from canned bytes, to measure its RAM and flash (`size.sh`).
//!
//! # Layout
//! - [`config`]: the configuration record (vehicle, fleet, key, broker, password) in the last
//!   flash sector, with its magic, version, length and CRC checked.
//! - [`gps`]: NMEA sentences split from the UART's bytes, `RMC` parsed with the `nmea` crate
//!   into a position fix and the UTC time.
//! - [`clock`]: UTC from the GPS carried on by the monotonic timer (sealing needs real time).
//!
//! The glue between the device core and its MQTT session (CONNECT with the will, the command
//! subscription, the outbox flushed with DUP and PUBACK matching, commands answered) is not
//! here: it is `device_sim::vehicle`, shared with the simulator, so every simulator test of
//! store-and-forward, reconnects and commands tests the firmware's protocol logic too.
#![no_std]
#![forbid(unsafe_code)]

pub mod clock;
pub mod config;
pub mod gps;
