//! The dispatchers: node processes (`tests/node/load-dispatchers.mjs`), each holding
//! `--clients-per-process` real `socket.io-client` connections joined to the room `all`, that
//! time and count every position they receive.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use tests::peer::Peer;
use tests::sio::DISPATCH_TOKEN;

use crate::ANSWER;
use crate::cli::RunArgs;
use crate::generator::vehicle_id;
use crate::measure::Env;
use crate::measured::{Latency, percentiles};

/// The running dispatcher processes.
pub struct Dispatchers {
    processes: Vec<Peer>,
}

/// What all dispatchers together received during the window.
pub struct Window {
    /// Device→dispatcher latency.
    pub latency: Latency,
    /// Positions received later than tick + slack.
    pub late: f64,
    /// Positions received.
    pub positions: f64,
    /// Position events (batches or single emits) received.
    pub events: f64,
    /// Heartbeats skipped beyond coalescing among the positions received.
    pub lost: f64,
}

/// Loss over the whole run, from the dispatchers' reports.
pub struct Losses {
    /// Heartbeats × dispatchers that should have arrived and did not.
    pub total: u64,
    /// The worst dispatcher's lost heartbeats.
    pub worst: u64,
    /// Dispatchers that disconnected.
    pub disconnects: u64,
}

impl Dispatchers {
    /// Starts `--dispatchers` clients against the bridges at `bridges` (`http://HOST:PORT`),
    /// client `i` on bridge `i mod N` (round-robin), several per node process, and waits
    /// until every one has joined `all`.
    ///
    /// # Errors
    /// If node cannot be started, or a client does not connect and join in time.
    pub async fn start(env: &Env, args: &RunArgs, bridges: &[String]) -> anyhow::Result<Self> {
        let mut processes = Vec::new();
        let mut first = 0;
        let n = bridges.len().max(1) as u32;
        for (b, http) in bridges.iter().enumerate() {
            // Clients i with i mod n = b.
            let mut left = (args.dispatchers + n - 1 - b as u32) / n;
            while left > 0 {
                let clients = args.clients_per_process.min(left);
                let config = json!({
                    "url": http,
                    "namespace": "/dispatch",
                    "token": DISPATCH_TOKEN,
                    "room": "all",
                    "clients": clients,
                    "first": first,
                    "intervalMs": 1000.0 / args.rate,
                    "tickMs": args.tick_ms(),
                    "slackMs": args.slack_ms,
                });
                processes.push(Peer::node(
                    &format!("dispatchers-{first}"),
                    &env.node_dir,
                    "load-dispatchers.mjs",
                    &[config.to_string()],
                )?);
                first += clients;
                left -= clients;
            }
        }
        let mut dispatchers = Self { processes };
        dispatchers.ask(None, "ready").await?;
        Ok(dispatchers)
    }

    /// The node processes' ids.
    pub fn pids(&self) -> impl Iterator<Item = Option<u32>> + '_ {
        self.processes.iter().map(Peer::pid)
    }

    /// Sends `command` (if any) to every process, then collects each one's answer of type
    /// `kind`, in order.
    async fn ask(&mut self, command: Option<&str>, kind: &str) -> anyhow::Result<Vec<Value>> {
        if let Some(command) = command {
            for process in &mut self.processes {
                process.send(command).await?;
            }
        }
        let mut answers = Vec::with_capacity(self.processes.len());
        for process in &mut self.processes {
            answers.push(process.expect(kind, ANSWER).await?);
        }
        Ok(answers)
    }

    /// Starts counting the window afresh.
    ///
    /// # Errors
    /// If a process does not answer in time.
    pub async fn open_window(&mut self) -> anyhow::Result<()> {
        self.ask(Some(r#"{"op":"window-start"}"#), "window-started")
            .await
            .map(drop)
    }

    /// Ends the window and sums what every process counted in it.
    ///
    /// # Errors
    /// If a process does not answer in time.
    pub async fn close_window(&mut self) -> anyhow::Result<Window> {
        let windows = self.ask(Some(r#"{"op":"window-end"}"#), "window").await?;
        let mut histogram: HashMap<usize, f64> = HashMap::new();
        let mut max_latency: f64 = 0.0;
        let mut sum = Window {
            latency: Latency::default(),
            late: 0.0,
            positions: 0.0,
            events: 0.0,
            lost: 0.0,
        };
        for w in &windows {
            for b in w["buckets"].as_array().into_iter().flatten() {
                let bucket = b[0].as_u64().unwrap_or(0) as usize;
                *histogram.entry(bucket).or_default() += b[1].as_f64().unwrap_or(0.0);
            }
            max_latency = max_latency.max(w["maxLatencyMs"].as_f64().unwrap_or(0.0));
            sum.late += w["late"].as_f64().unwrap_or(0.0);
            for c in w["clients"].as_array().into_iter().flatten() {
                sum.positions += c["positions"].as_f64().unwrap_or(0.0);
                sum.events += c["batches"].as_f64().unwrap_or(0.0);
                sum.lost += c["gapLost"].as_f64().unwrap_or(0.0);
            }
        }
        sum.latency = percentiles(&histogram, max_latency);
        Ok(sum)
    }

    /// Collects every process's report (its clients' loss and last sequence numbers), and
    /// lets the processes exit.
    ///
    /// # Errors
    /// If a process does not answer in time.
    pub async fn finish(mut self) -> anyhow::Result<Vec<Value>> {
        let reports = self.ask(Some(r#"{"op":"report"}"#), "report").await?;
        for process in self.processes {
            process.finish(Duration::from_secs(5)).await;
        }
        Ok(reports)
    }
}

/// Lost heartbeats per the definition in the crate docs: skipped beyond `allowed` inside
/// each client's stream (counted by the client), plus the tail each client never received
/// (`last_seq`: each vehicle's last sequence number sent, if known).
pub fn losses(reports: &[Value], last_seq: &[i64], allowed: i64) -> Losses {
    let ids: Vec<String> = (1..=last_seq.len() as u32).map(vehicle_id).collect();
    let mut losses = Losses {
        total: 0,
        worst: 0,
        disconnects: 0,
    };
    for report in reports {
        for client in report["clients"].as_array().into_iter().flatten() {
            let mut lost = client["gapLost"].as_u64().unwrap_or(0);
            losses.disconnects += client["disconnects"].as_u64().unwrap_or(0);
            let seen = &client["lastSeq"];
            for (id, &sent) in ids.iter().zip(last_seq) {
                let received = seen[id.as_str()].as_i64().unwrap_or(-1);
                lost += (sent - received - allowed).max(0) as u64;
            }
            losses.total += lost;
            losses.worst = losses.worst.max(lost);
        }
    }
    losses
}
