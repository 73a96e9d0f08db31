//! The device side of a run: `loadbench generate` as a child (exact per-vehicle counts), or
//! the real `device-sim`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tests::peer::Peer;
use tests::process::{Program, field};
use tests::stack::start_sim;
use tokio::process::Command;

use crate::ANSWER;
use crate::cli::{DeviceKind, RunArgs, StackKind};
use crate::measure::Env;
use crate::stack::Stack;

/// The device side of a run.
pub enum Devices {
    /// `loadbench generate`.
    Generator(Peer),
    /// The real `device-sim`.
    Sim(Program),
}

/// What the devices did, once stopped.
pub struct DevicesDone {
    /// Each vehicle's last sequence number, when known.
    pub last_seq: Option<Vec<i64>>,
    /// Heartbeats sent, whole run.
    pub sent_total: u64,
    /// Heartbeats the generator could not write (socket full) or lost to a dead connection.
    pub blocked: u64,
    /// Dead connections of the generator.
    pub errors: u64,
    /// The latest the generator sent behind its schedule, ms.
    pub max_late_ms: f64,
}

/// The last `progress` line of device-sim, as (connected, heartbeats sent).
fn sim_progress(sim: &Program) -> (u64, u64) {
    sim.log_text()
        .lines()
        .rev()
        .find(|l| l.contains("progress"))
        .map_or((0, 0), |line| {
            let get = |k: &str| field(line, k).and_then(|v| v.parse().ok()).unwrap_or(0);
            (get("connected"), get("heartbeats"))
        })
}

impl Devices {
    /// Starts the devices and waits until every vehicle is connected; returns them with
    /// (connections, seconds to connect).
    ///
    /// # Errors
    /// If they do not start, or do not connect every vehicle in time.
    pub async fn start(
        env: &Env,
        args: &RunArgs,
        stack: &Stack,
    ) -> anyhow::Result<(Self, u64, f64)> {
        let connect_timeout = ANSWER + Duration::from_millis(u64::from(args.vehicles) * 2);
        if args.devices == DeviceKind::DeviceSim {
            let began = Instant::now();
            let rate = args.rate.to_string();
            let sim = start_sim(stack.mqtt, args.vehicles, "bench", &["--rate", &rate])?;
            // It logs a progress line every 5 s: wait for one with every vehicle connected.
            let deadline = Instant::now() + connect_timeout;
            loop {
                if sim_progress(&sim).0 >= u64::from(args.vehicles) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "device-sim did not connect every vehicle:\n{}",
                        sim.log_text()
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let secs = began.elapsed().as_secs_f64();
            return Ok((Self::Sim(sim), u64::from(args.vehicles), secs));
        }
        let payload = match stack.kind {
            StackKind::Baseline | StackKind::Careful => "json",
            _ => "sealed",
        };
        let mut cmd = Command::new(&env.exe);
        cmd.arg("generate")
            .args(["--broker", &stack.mqtt.to_string()])
            .args(["--vehicles", &args.vehicles.to_string()])
            .args(["--rate", &args.rate.to_string()])
            .args(["--payload", payload])
            .args([
                "--per-connection",
                &args.per_connection(args.vehicles).to_string(),
            ]);
        if args.no_subscribe {
            cmd.arg("--no-subscribe");
        }
        let mut generator = Peer::spawn("devices", cmd)?;
        let connected = generator.expect("connected", connect_timeout).await?;
        let connections = connected["connections"].as_u64().unwrap_or(0);
        let secs = connected["secs"].as_f64().unwrap_or(0.0);
        generator.send("start").await?;
        Ok((Self::Generator(generator), connections, secs))
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::Generator(peer) => peer.pid(),
            Self::Sim(sim) => sim.pid(),
        }
    }

    /// Whether every heartbeat is counted as it is sent (the generator; `device-sim` reports
    /// every 5 s).
    pub fn exact(&self) -> bool {
        matches!(self, Self::Generator(_))
    }

    /// Heartbeats sent so far (device-sim: as of its last progress line, every 5 s).
    ///
    /// # Errors
    /// If the generator does not answer.
    pub async fn sent(&mut self) -> anyhow::Result<f64> {
        match self {
            Self::Generator(peer) => {
                peer.send("mark").await?;
                let mark = peer.expect("mark", ANSWER).await?;
                Ok(mark["sent"].as_f64().unwrap_or(0.0))
            }
            Self::Sim(sim) => Ok(sim_progress(sim).1 as f64),
        }
    }

    /// Stops the devices (the vehicles disconnect cleanly) and collects their counts.
    ///
    /// # Errors
    /// If they do not stop and answer in time.
    pub async fn stop(self) -> anyhow::Result<DevicesDone> {
        match self {
            Self::Generator(mut peer) => {
                peer.send("stop").await?;
                let done = peer.expect("done", ANSWER).await?;
                peer.finish(Duration::from_secs(5)).await;
                let last_seq: Vec<i64> = done["lastSeq"]
                    .as_array()
                    .context("no lastSeq from the devices")?
                    .iter()
                    .map(|v| v.as_i64().unwrap_or(-1))
                    .collect();
                Ok(DevicesDone {
                    sent_total: last_seq.iter().map(|&s| (s + 1).max(0) as u64).sum(),
                    last_seq: Some(last_seq),
                    blocked: done["blocked"].as_u64().unwrap_or(0),
                    errors: done["errors"].as_u64().unwrap_or(0),
                    max_late_ms: done["maxLateMs"].as_f64().unwrap_or(0.0),
                })
            }
            Self::Sim(mut sim) => {
                sim.terminate(Duration::from_secs(30))
                    .await
                    .context("stopping device-sim")?;
                let sent_total = sim
                    .find_line("simulation finished")
                    .and_then(|line| field(&line, "heartbeats")?.parse().ok())
                    .unwrap_or_else(|| sim_progress(&sim).1);
                Ok(DevicesDone {
                    last_seq: None,
                    sent_total,
                    blocked: 0,
                    errors: 0,
                    max_late_ms: 0.0,
                })
            }
        }
    }
}
