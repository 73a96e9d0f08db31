//! What one invocation does: side by side (the default), the scaling curve (`--curve`),
//! sustained throughput (`--saturate`), all of BENCHMARKS.md's end-to-end section
//! (`--report`), or the cost of each stage (`--stages`, in [`crate::stages`]).

use std::fmt::Write as _;

use anyhow::Context as _;

use crate::cli::{RunArgs, StackKind};
use crate::measure::{Env, measure};
use crate::measured::Measured;
use crate::report;

/// Runs what `args` asks for and prints the report (and appends it to `--out`).
///
/// # Errors
/// If the binaries cannot be built, or a run fails.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let bins = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .context("locating loadbench")?
            .parent()
            .context("loadbench has no directory")?
            .to_path_buf(),
    };
    if !args.no_build && args.stacks().contains(&StackKind::Fleetbeat) {
        // The release binaries, so that a run measures the current code.
        tests::bin::build(true)?;
    }
    let env = Env::new(bins)?;
    let mut report = String::new();
    report.push_str(&report::header(&args, &env));
    if args.report {
        for &vehicles in &args.report_fleets {
            let _ = writeln!(
                report,
                "### {vehicles} vehicles × {} Hz, {} dispatchers\n",
                args.rate, args.dispatchers
            );
            let fleet = RunArgs {
                vehicles,
                stack: StackKind::All,
                ..args.clone()
            };
            report.push_str(&side_by_side(&env, &fleet).await?);
        }
        let _ = writeln!(report, "### Scaling curve\n");
        let fleetbeat = RunArgs {
            stack: StackKind::Fleetbeat,
            ..args.clone()
        };
        report.push_str(&curve(&env, &fleetbeat).await?);
        let _ = writeln!(report, "### Sustained throughput at 10 000 vehicles\n");
        let all = RunArgs {
            vehicles: 10_000,
            stack: StackKind::All,
            ..args.clone()
        };
        report.push_str(&saturate(&env, &all).await?);
    } else if args.curve {
        report.push_str(&curve(&env, &args).await?);
    } else if args.saturate {
        report.push_str(&saturate(&env, &args).await?);
    } else if args.stages {
        report.push_str(&crate::stages::stages(&env, &args).await?);
    } else {
        report.push_str(&side_by_side(&env, &args).await?);
    }
    println!("{report}");
    if let Some(path) = &args.out {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(file, "{report}").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The scaling curve: Fleetbeat (or the baseline `--stack` names) at each of
/// `--curve-points` vehicles.
async fn curve(env: &Env, args: &RunArgs) -> anyhow::Result<String> {
    let mut points = Vec::new();
    for &vehicles in &args.curve_points {
        let point = RunArgs {
            vehicles,
            duration: args.curve_duration,
            ..args.clone()
        };
        let stack = if args.stack.is_baseline() {
            args.stack
        } else {
            StackKind::Fleetbeat
        };
        eprintln!("loadbench: curve point {vehicles} vehicles ({stack:?})");
        points.push(measure(env, &point, stack).await?);
    }
    Ok(report::curve(&points))
}

/// Sustained throughput: each stack at rising rates until a step is not sustained.
async fn saturate(env: &Env, args: &RunArgs) -> anyhow::Result<String> {
    let mut steps = Vec::new();
    for &stack in args.stacks() {
        for &rate in &args.saturate_rates {
            let step = RunArgs {
                rate,
                duration: args.curve_duration,
                ..args.clone()
            };
            eprintln!("loadbench: {stack:?} at {rate} Hz");
            let measured = measure(env, &step, stack).await?;
            let sustained = measured.sustained();
            steps.push(measured);
            if !sustained {
                break;
            }
        }
    }
    Ok(report::saturation(&steps))
}

/// Side by side: each stack `--repeat` times, alternating; the least disturbed run of each.
async fn side_by_side(env: &Env, args: &RunArgs) -> anyhow::Result<String> {
    let mut runs = Vec::new();
    for round in 1..=args.repeat.max(1) {
        for &stack in args.stacks() {
            eprintln!(
                "loadbench: {} vehicles, {stack:?}, run {round} of {}",
                args.vehicles,
                args.repeat.max(1)
            );
            runs.push(measure(env, args, stack).await?);
        }
    }
    let results: Vec<Measured> = args
        .stacks()
        .iter()
        .filter_map(|&kind| {
            runs.iter()
                .filter(|m| m.stack == kind)
                .min_by(|a, b| a.others_cores.total_cmp(&b.others_cores))
                .cloned()
        })
        .collect();
    let mut out = report::side_by_side(&results);
    if runs.len() > results.len() {
        out.push_str(&report::runs(&runs));
    }
    Ok(out)
}
