//! `--stages`: what each stage of Fleetbeat costs per heartbeat, by ablation (issue #17).
//!
//! Fleetbeat runs at the same load once as deployed and then once per part that a flag or
//! the configuration switches off, without any change to the bridge; the difference in broker
//! and bridge CPU µs per heartbeat between a run and its reference is what the part costs.
//! What no flag switches off (the seal check, the fleet update, the history rows themselves,
//! the router, the socket read and decode) is listed below the table with the flag it would
//! need; the separate-broker run splits the broker's share (socket read and decode, router)
//! from the bridge's.

use std::io::Write as _;

use anyhow::Context as _;

use crate::cli::{BrokerMode, RunArgs, StackKind};
use crate::measure::{Env, measure};
use crate::measured::Measured;
use crate::report;

/// One run of the ablation.
pub struct Variant {
    /// What runs, for the table.
    pub name: &'static str,
    /// The run it is compared with (an index into the variants), if any.
    pub reference: Option<usize>,
    /// What the difference (reference − this run) is the cost of.
    pub stage: &'static str,
    /// The run's arguments.
    args: RunArgs,
}

/// A measured variant.
pub struct StageRun {
    /// The variant.
    pub variant: Variant,
    /// What it measured (the least disturbed of `--repeat` runs).
    pub measured: Measured,
}

/// The variants at the load of `args`; `no_mirror` is a bridge configuration file that turns
/// the embedded broker's JSON mirror off.
fn variants(args: &RunArgs, no_mirror: &str) -> Vec<Variant> {
    let base = RunArgs {
        stack: StackKind::Fleetbeat,
        broker: BrokerMode::Embedded,
        bridges: 1,
        cluster_engines: false,
        ..args.clone()
    };
    let with = |extra: &[&str], change: &dyn Fn(&mut RunArgs)| {
        let mut run = base.clone();
        run.bridge_args.extend(extra.iter().map(|&a| a.to_owned()));
        change(&mut run);
        run
    };
    let mirror_off = ["--config", no_mirror];
    let same = |_: &mut RunArgs| {};
    vec![
        Variant {
            name: "as deployed (embedded broker, JSON mirror on, SQLite file, synchronous=full)",
            reference: None,
            stage: "",
            args: base.clone(),
        },
        Variant {
            name: "JSON mirror off (`[broker] json_mirror = false`)",
            reference: Some(0),
            stage: "the broker's JSON mirror (re-encode and route json/fleet/...)",
            args: with(&mirror_off, &same),
        },
        Variant {
            name: "… and no dispatchers (`--dispatchers 0`)",
            reference: Some(1),
            stage: "emit: batches serialised and written to the dispatchers' sockets",
            args: with(&mirror_off, &|r| r.dispatchers = 0),
        },
        Variant {
            name: "… and `--synchronous normal`",
            reference: Some(1),
            stage: "history write: the fsync of each commit",
            args: with(
                &[&mirror_off[..], &["--synchronous", "normal"]].concat(),
                &same,
            ),
        },
        Variant {
            name: "… and `--store :memory:`",
            reference: Some(1),
            stage: "history write: the store's file I/O (WAL, fsync, checkpoints); the SQL stays",
            args: with(&[&mirror_off[..], &["--store", ":memory:"]].concat(), &same),
        },
        Variant {
            name: "… and devices not subscribed (`--no-subscribe`)",
            reference: Some(1),
            stage: "router: one `cmd` subscription per vehicle",
            args: with(&mirror_off, &|r| r.no_subscribe = true),
        },
        Variant {
            name: "separate `broker` process (JSON mirror off)",
            reference: Some(1),
            stage: "the extra hop (negative: what the second process costs)",
            args: RunArgs {
                broker: BrokerMode::Separate,
                ..base
            },
        },
    ]
}

/// Runs every variant (`--repeat` times each, alternating) and returns the table.
///
/// # Errors
/// If a run fails, or the configuration file cannot be written.
pub async fn stages(env: &Env, args: &RunArgs) -> anyhow::Result<String> {
    let mut config = tempfile::Builder::new()
        .prefix("loadbench-no-mirror-")
        .suffix(".toml")
        .tempfile()
        .context("a temporary configuration file")?;
    config
        .write_all(b"[broker]\njson_mirror = false\n")
        .context("writing the configuration file")?;
    let path = config
        .path()
        .to_str()
        .context("a UTF-8 temporary path")?
        .to_owned();
    let all = variants(args, &path);
    let mut measured: Vec<Vec<Measured>> = all.iter().map(|_| Vec::new()).collect();
    let repeat = args.repeat.max(1);
    for round in 1..=repeat {
        for (i, variant) in all.iter().enumerate() {
            eprintln!(
                "loadbench: stages, {} ({}/{}), run {round} of {repeat}",
                variant.name,
                i + 1,
                all.len()
            );
            measured[i].push(measure(env, &variant.args, StackKind::Fleetbeat).await?);
        }
    }
    let mut runs = Vec::new();
    for (variant, tries) in all.into_iter().zip(measured) {
        let best = tries
            .into_iter()
            .min_by(|a, b| a.others_cores.total_cmp(&b.others_cores))
            .context("no run")?;
        runs.push(StageRun {
            variant,
            measured: best,
        });
    }
    Ok(report::stages(&runs))
}
