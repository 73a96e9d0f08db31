//! `tracker`: the Fleetbeat reference firmware on a NUCLEO-F429ZI. See `docs/firmware.md`
//! for the wiring, the configuration record and how to flash it.
//!
//! Tasks (embassy, one thread-mode executor):
//! - `main`, the vehicle: reads the configuration record from flash (a blank or bad record
//!   stops it here: nothing is published without the device's own key), waits for the GPS to
//!   tell the time and a position, then ticks the device core every 100 ms, feeds it GPS
//!   fixes and handovers, and keeps one MQTT connection to the broker (TCP over embassy-net,
//!   reconnecting with a doubling backoff) through [`Vehicle`], the device core on its MQTT
//!   session (`device_sim::vehicle`: the same code path the simulator runs).
//! - `net_task`: embassy-net's stack over the on-board Ethernet (LAN8742A, RMII), DHCP.
//! - `gps_task`: the GPS receiver's NMEA on USART2 (PD6 = RX, PD5 = TX, 9600 baud), split and
//!   parsed into [`Reading`]s for the vehicle.
//! - `button_task`: the blue user button B1 (PC13): the driver confirms a handover.
#![no_std]
#![no_main]

use core::pin::pin;

use defmt::{Display2Format, error, info, warn};
use defmt_rtt as _;
use device_sim::device::{DeviceConfig, Handover};
use device_sim::route::{GridConfig, StreetGrid};
use device_sim::vehicle::{Happened, Moment, Vehicle};
use embassy_executor::Spawner;
use embassy_futures::select::{Either, Either4, select, select4};
use embassy_net::tcp::TcpSocket;
use embassy_net::{Ipv4Address, Stack, StackResources};
use embassy_stm32::eth::{Ethernet, GenericPhy, PacketQueue, Sma};
use embassy_stm32::exti::{self, ExtiInput};
use embassy_stm32::flash::Flash;
use embassy_stm32::gpio::Pull;
use embassy_stm32::peripherals::{ETH, ETH_SMA};
use embassy_stm32::rng::{self, Rng};
use embassy_stm32::time::Hertz;
use embassy_stm32::usart::{self, BufferedUart};
use embassy_stm32::{Config, bind_interrupts, eth, interrupt, mode::Async, peripherals};
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_sync::channel::Channel;
use embassy_sync::signal::Signal;
use embassy_time::{Duration, Instant, Timer, with_timeout};
use embedded_io_async::Read as _;
use fleetbeat_firmware::clock::WallClock;
use fleetbeat_firmware::config::{self, DeviceRecord};
use fleetbeat_firmware::gps::{GpsError, Reading, SentenceSplitter, parse_sentence};
use panic_probe as _;
use static_cell::StaticCell;

bind_interrupts!(struct Irqs {
    ETH => eth::InterruptHandler;
    HASH_RNG => rng::InterruptHandler<peripherals::RNG>;
    USART2 => usart::BufferedInterruptHandler<peripherals::USART2>;
    EXTI15_10 => exti::InterruptHandler<interrupt::typelevel::EXTI15_10>;
});

type EthDevice = Ethernet<'static, ETH, GenericPhy<Sma<'static, ETH_SMA>>>;

/// The GPS receiver's baud rate (most modules' default).
const GPS_BAUD: u32 = 9_600;
/// The device core is ticked this often.
const TICK: Duration = Duration::from_millis(100);
/// The MQTT keep-alive.
const KEEP_ALIVE_SECS: u16 = 30;
/// How long the TCP connection to the broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first reconnect waits this long; each failed attempt doubles it, up to the maximum.
const RECONNECT_MIN: Duration = Duration::from_secs(1);
/// The longest wait between reconnects.
const RECONNECT_MAX: Duration = Duration::from_secs(60);
/// A press shorter than this after the last one is contact bounce.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// GPS readings, from `gps_task` to the vehicle; a full channel drops the newest.
static READINGS: Channel<CriticalSectionRawMutex, Reading, 4> = Channel::new();
/// The driver pressed B1: the parcel changed hands.
static HANDOVER: Signal<CriticalSectionRawMutex, ()> = Signal::new();

#[embassy_executor::task]
async fn net_task(mut runner: embassy_net::Runner<'static, EthDevice>) -> ! {
    runner.run().await
}

/// Reads NMEA from the receiver and hands every `RMC` reading to the vehicle.
#[embassy_executor::task]
async fn gps_task(mut uart: BufferedUart<'static>) -> ! {
    let mut splitter = SentenceSplitter::new();
    let mut bytes = [0u8; 64];
    loop {
        let n = match uart.read(&mut bytes).await {
            Ok(n) => n,
            Err(err) => {
                warn!("GPS UART: {}", err);
                continue;
            }
        };
        for &byte in &bytes[..n] {
            let Some(sentence) = splitter.push(byte) else {
                continue;
            };
            match parse_sentence(sentence) {
                Ok(reading) => {
                    if READINGS.try_send(reading).is_err() {
                        warn!("GPS reading dropped: the vehicle task is behind");
                    }
                }
                Err(GpsError::Skipped) => {}
                Err(GpsError::Malformed) => warn!("malformed NMEA sentence"),
            }
        }
    }
}

/// B1 pressed: a handover is done.
#[embassy_executor::task]
async fn button_task(mut button: ExtiInput<'static, Async>) -> ! {
    loop {
        button.wait_for_rising_edge().await;
        HANDOVER.signal(());
        Timer::after(DEBOUNCE).await;
        button.wait_for_falling_edge().await;
        Timer::after(DEBOUNCE).await;
    }
}

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    let p = embassy_stm32::init(clocks());
    info!("Fleetbeat tracker starting");

    // Who this device is: the record in the last flash sector, or nothing at all.
    let mut record = [0u8; config::RECORD_MAX];
    let mut flash = Flash::new_blocking(p.FLASH);
    let record = match flash.blocking_read(config::RECORD_OFFSET, &mut record) {
        Ok(()) => DeviceRecord::parse(&record),
        Err(err) => {
            error!("cannot read the configuration sector: {}", err);
            refuse_to_start().await
        }
    };
    let record = match record {
        Ok(record) => record,
        Err(err) => {
            error!(
                "{} at {=u32:#x}",
                Display2Format(&err),
                config::RECORD_ADDRESS
            );
            refuse_to_start().await
        }
    };
    info!(
        "vehicle {} of fleet {}, broker {}.{}.{}.{}:{}, login: {}",
        Display2Format(&record.vehicle),
        Display2Format(&record.fleet),
        record.broker_ip[0],
        record.broker_ip[1],
        record.broker_ip[2],
        record.broker_ip[3],
        record.broker_port,
        record.password().is_some()
    );

    let mut rng = Rng::new(p.RNG, Irqs);
    let mut seed = [0u8; 8];
    if rng.async_fill_bytes(&mut seed).await.is_err() {
        warn!("the RNG failed: the network seeds from the chip id");
        seed.copy_from_slice(&embassy_stm32::uid::uid()[..8]);
    }
    let seed = u64::from_le_bytes(seed);

    // Ethernet: the Nucleo's LAN8742A over RMII, DHCP.
    static PACKETS: StaticCell<PacketQueue<4, 4>> = StaticCell::new();
    let ethernet = Ethernet::new(
        PACKETS.init(PacketQueue::new()),
        p.ETH,
        Irqs,
        p.PA1,
        p.PA7,
        p.PC4,
        p.PC5,
        p.PG13,
        p.PB13,
        p.PG11,
        mac_address(),
        p.ETH_SMA,
        p.PA2,
        p.PC1,
    );
    static RESOURCES: StaticCell<StackResources<2>> = StaticCell::new();
    let (stack, runner) = embassy_net::new(
        ethernet,
        embassy_net::Config::dhcpv4(Default::default()),
        RESOURCES.init(StackResources::new()),
        seed,
    );
    spawner.spawn(net_task(runner).unwrap_or_else(|_| defmt::panic!("net task")));

    // The GPS receiver on USART2.
    static GPS_TX: StaticCell<[u8; 16]> = StaticCell::new();
    static GPS_RX: StaticCell<[u8; 256]> = StaticCell::new();
    let mut uart_config = usart::Config::default();
    uart_config.baudrate = GPS_BAUD;
    let uart = match BufferedUart::new(
        p.USART2,
        p.PD6,
        p.PD5,
        GPS_TX.init([0; 16]),
        GPS_RX.init([0; 256]),
        Irqs,
        uart_config,
    ) {
        Ok(uart) => uart,
        Err(err) => {
            error!("cannot set up USART2 for the GPS: {}", err);
            refuse_to_start().await
        }
    };
    spawner.spawn(gps_task(uart).unwrap_or_else(|_| defmt::panic!("GPS task")));

    let button = ExtiInput::new(p.PC13, p.EXTI13, Pull::Down, Irqs);
    spawner.spawn(button_task(button).unwrap_or_else(|_| defmt::panic!("button task")));

    // Sealing needs the real time, and the device a position: wait for the GPS.
    info!("waiting for the GPS: time and a fix");
    let mut clock = WallClock::new();
    let first_fix = loop {
        let reading = READINGS.receive().await;
        if let Some(utc) = reading.utc_ms {
            clock.set(utc, mono_ms());
        }
        if let Some(fix) = reading.fix
            && clock.is_set()
        {
            break fix;
        }
    };
    info!(
        "GPS fix at {} {}",
        first_fix.pos.lat_e7, first_fix.pos.lon_e7
    );

    let Ok(grid) = StreetGrid::new(GridConfig::default()) else {
        defmt::panic!("the default street grid is valid");
    };
    let mut device_config = DeviceConfig::new(record.vehicle.clone(), record.fleet.clone(), grid);
    device_config.key = record.key;
    static VEHICLE: StaticCell<Vehicle> = StaticCell::new();
    let vehicle = VEHICLE.init_with(|| Vehicle::new(device_config, seed, KEEP_ALIVE_SECS));
    vehicle.device_mut().gps_fix(first_fix);
    // The Nucleo has no vehicle battery to read: it reports mains power.
    vehicle.device_mut().set_battery_pct(100);

    let mut tracker = Tracker {
        vehicle,
        clock,
        next_tick: Instant::now(),
        record,
    };
    tracker.run(stack).await
}

/// 180 MHz from the ST-LINK's 8 MHz clock (HSE bypass), as embassy's F4 Ethernet example.
fn clocks() -> Config {
    use embassy_stm32::rcc::{
        AHBPrescaler, APBPrescaler, Hse, HseMode, Pll, PllMul, PllPDiv, PllPreDiv, PllSource,
        Sysclk,
    };
    let mut config = Config::default();
    config.rcc.hse = Some(Hse {
        freq: Hertz(8_000_000),
        mode: HseMode::Bypass,
    });
    config.rcc.pll_src = PllSource::HSE;
    config.rcc.pll = Some(Pll {
        prediv: PllPreDiv::DIV4,
        mul: PllMul::MUL180,
        divp: Some(PllPDiv::DIV2),
        divq: None,
        divr: None,
    });
    config.rcc.ahb_pre = AHBPrescaler::DIV1;
    config.rcc.apb1_pre = APBPrescaler::DIV4;
    config.rcc.apb2_pre = APBPrescaler::DIV2;
    config.rcc.sys = Sysclk::PLL1_P;
    config
}

/// A locally administered MAC address from the chip's unique id.
fn mac_address() -> [u8; 6] {
    let uid = embassy_stm32::uid::uid();
    let mut mac = [0x02, 0, 0, 0, 0, 0];
    for (i, byte) in uid.iter().enumerate() {
        mac[1 + i % 5] ^= byte;
    }
    mac
}

/// Milliseconds since boot.
fn mono_ms() -> u64 {
    Instant::now().as_millis()
}

/// Without a configuration the tracker does nothing but say so, once a minute.
async fn refuse_to_start() -> ! {
    loop {
        error!("not publishing: no valid configuration record (see docs/firmware.md)");
        Timer::after_secs(60).await;
    }
}

/// What woke the vehicle up.
enum Event {
    /// The tick (or the session's deadline) is due.
    Timer,
    /// The GPS sent a reading.
    Reading(Reading),
    /// The driver pressed B1.
    Handover,
}

/// Waits for the next event, or `until`.
async fn next_event(until: Instant) -> Event {
    match select(
        Timer::at(until),
        select(READINGS.receive(), HANDOVER.wait()),
    )
    .await
    {
        Either::First(()) => Event::Timer,
        Either::Second(Either::First(reading)) => Event::Reading(reading),
        Either::Second(Either::Second(())) => Event::Handover,
    }
}

/// Why a connection ended.
#[derive(defmt::Format)]
enum Ended {
    /// The socket failed or the broker closed it.
    Socket,
    /// The session gave up (the error's text is logged).
    Session,
}

/// The vehicle and what it runs on.
struct Tracker {
    vehicle: &'static mut Vehicle,
    clock: WallClock,
    /// When the device core is ticked next.
    next_tick: Instant,
    record: DeviceRecord,
}

impl Tracker {
    /// UTC now; the clock was set before the tracker was made.
    fn clock_ms(&self) -> u64 {
        self.clock.now_ms(mono_ms()).unwrap_or_default()
    }

    /// Monotonic and UTC time now, read once.
    fn moment(&self) -> Moment {
        let mono_ms = mono_ms();
        Moment {
            mono_ms,
            utc_ms: self.clock.now_ms(mono_ms).unwrap_or_default(),
        }
    }

    /// Connects, converses, and reconnects with backoff, for ever.
    async fn run(&mut self, stack: Stack<'static>) -> ! {
        let [a, b, c, d] = self.record.broker_ip;
        let broker = (Ipv4Address::new(a, b, c, d), self.record.broker_port);
        let mut rx = [0u8; 512];
        let mut tx = [0u8; 1024];
        let mut backoff = Duration::from_ticks(0);
        loop {
            let retry_at = Instant::now() + backoff;
            while Instant::now() < retry_at {
                let event = next_event(retry_at.min(self.next_tick)).await;
                self.on_event(event);
            }
            backoff = (backoff * 2).clamp(RECONNECT_MIN, RECONNECT_MAX);
            if !stack.is_config_up() {
                info!("waiting for the network (DHCP)");
                backoff = RECONNECT_MIN;
                continue;
            }
            let mut socket = TcpSocket::new(stack, &mut rx, &mut tx);
            socket.set_timeout(Some(Duration::from_secs(u64::from(KEEP_ALIVE_SECS) * 2)));
            let connected = {
                let mut connect = pin!(with_timeout(CONNECT_TIMEOUT, socket.connect(broker)));
                loop {
                    match select(&mut connect, next_event(self.next_tick)).await {
                        Either::First(connected) => break connected,
                        Either::Second(event) => self.on_event(event),
                    }
                }
            };
            match connected {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    warn!("cannot connect to the broker: {}", err);
                    continue;
                }
                Err(_) => {
                    warn!("cannot connect to the broker: timed out");
                    continue;
                }
            }
            let ended = self.converse(&mut socket).await;
            let was_connected = self.vehicle.is_connected();
            warn!("connection lost: {}", ended);
            self.vehicle.link_lost();
            socket.abort();
            // Lets the RST go out; the socket is dropped right after.
            let _ = with_timeout(Duration::from_millis(100), socket.flush()).await;
            if was_connected {
                backoff = RECONNECT_MIN;
            }
        }
    }

    /// One MQTT connection over `socket`, until it fails.
    async fn converse(&mut self, socket: &mut TcpSocket<'_>) -> Ended {
        let password = self.record.password();
        if let Err(err) = self.vehicle.begin(password, mono_ms(), self.clock_ms()) {
            error!("{}", Display2Format(&err));
            return Ended::Session;
        }
        loop {
            while !self.vehicle.output().is_empty() {
                match socket.write(self.vehicle.output()).await {
                    Ok(n) if n > 0 => self.vehicle.wrote(n),
                    _ => return Ended::Socket,
                }
            }
            let wake = match self.vehicle.deadline() {
                Some(deadline) => self.next_tick.min(Instant::from_millis(deadline)),
                None => self.next_tick,
            };
            if self.vehicle.receive_buffer().is_empty() {
                // Complete packets wait that were left for want of room to answer them; the
                // output is written now.
                let now = self.moment();
                if let Err(err) = self.vehicle.on_input(&now, log_happened) {
                    warn!("{}", Display2Format(&err));
                    return Ended::Session;
                }
                if self.vehicle.output().is_empty() && self.vehicle.receive_buffer().is_empty() {
                    // Nothing taken, nothing to write: cannot happen.
                    return Ended::Session;
                }
                continue;
            }
            let buffer = self.vehicle.receive_buffer();
            let woke = select4(
                socket.read(buffer),
                Timer::at(wake),
                READINGS.receive(),
                HANDOVER.wait(),
            )
            .await;
            let event = match woke {
                Either4::First(Ok(0) | Err(_)) => return Ended::Socket,
                Either4::First(Ok(n)) => {
                    self.vehicle.received(n);
                    None
                }
                Either4::Second(()) => Some(Event::Timer),
                Either4::Third(reading) => Some(Event::Reading(reading)),
                Either4::Fourth(()) => Some(Event::Handover),
            };
            if let Some(event) = event {
                self.on_event(event);
            }
            let now = self.moment();
            let input = self.vehicle.on_input(&now, log_happened);
            let timer = input.and_then(|()| self.vehicle.on_timer(now.mono_ms));
            if let Err(err) = timer {
                warn!("{}", Display2Format(&err));
                return Ended::Session;
            }
            self.vehicle
                .flush(now.mono_ms, now.utc_ms, usize::MAX, &mut ());
        }
    }

    /// Ticks, GPS readings and handovers, connected or not.
    fn on_event(&mut self, event: Event) {
        match event {
            Event::Timer => {
                let now = Instant::now();
                if now >= self.next_tick {
                    let clock = self.clock_ms();
                    self.vehicle.device_mut().tick(clock);
                    // Keeps the phase; after a long stall it starts afresh.
                    self.next_tick = (self.next_tick + TICK).max(now);
                }
            }
            Event::Reading(reading) => {
                if let Some(utc) = reading.utc_ms {
                    self.clock.set(utc, mono_ms());
                }
                match reading.fix {
                    Some(fix) => self.vehicle.device_mut().gps_fix(fix),
                    None => self.vehicle.device_mut().gps_lost(),
                }
            }
            Event::Handover => {
                let clock = self.clock_ms();
                match self.vehicle.complete_handover(clock) {
                    Handover::PickedUp => info!("handover: picked up"),
                    Handover::Delivered => info!("handover: delivered"),
                    Handover::NoDelivery => info!("handover pressed, but no delivery is under way"),
                    Handover::OutboxFull => {
                        warn!(
                            "handover refused: the event queue is full until the broker acknowledges"
                        );
                    }
                }
            }
        }
    }
}

/// Logs what the session reported.
fn log_happened(happened: Happened) {
    match happened {
        Happened::Connected => info!("connected to the broker"),
        Happened::Command {
            command,
            result,
            ack,
        } => match ack {
            Ok(()) => info!(
                "command {}: {}, {}",
                command.id,
                defmt::Debug2Format(&command.kind),
                result.as_str()
            ),
            Err(err) => warn!(
                "command {}: {}, {}, but {}",
                command.id,
                defmt::Debug2Format(&command.kind),
                result.as_str(),
                Display2Format(&err)
            ),
        },
        Happened::BadCommand { error, bytes } => warn!(
            "bad command payload ({} bytes): {}",
            bytes,
            Display2Format(&error)
        ),
        Happened::EventsAcked(n) => info!("{} delivery event(s) acknowledged", n),
        Happened::Subscribed { refused: true } => {
            warn!("the broker refused the command subscription");
        }
        Happened::ForeignPublish => info!("ignoring a message on a foreign topic"),
        Happened::Subscribed { refused: false } | Happened::Acked | Happened::UnknownAck { .. } => {
        }
    }
}
