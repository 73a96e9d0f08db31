//! The live status line on a terminal, and a log writer that keeps it intact.
//!
//! On a terminal the simulator shows one line that redraws in place (an [`indicatif`]
//! spinner): connected vehicles, heartbeats sent (and the rate), delivery events acknowledged,
//! reconnects and errors. Log lines are written through a [`LogWriter`], which hides the line
//! while a log line is printed and redraws it after, so the two never garble each other. When
//! stderr is not a terminal there is no status line at all and the runner logs a plain
//! `progress` line every few seconds instead.

use std::io::{self, IsTerminal as _, Write as _};
use std::time::Duration;

use device_sim::runner::{ProgressDisplay, SimReport};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The status line on stderr. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StatusLine {
    bar: ProgressBar,
}

impl StatusLine {
    /// A status line on stderr if stderr is a terminal; `None` otherwise.
    pub fn for_stderr() -> Option<Self> {
        if !io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4));
        let style = ProgressStyle::with_template("{spinner:.green} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(250));
        Some(Self { bar })
    }
}

impl ProgressDisplay for StatusLine {
    /// Redraws the line from `report`.
    fn update(&self, report: &SimReport, heartbeats_per_s: f64) {
        self.bar.set_message(format!(
            "connected {}/{} · heartbeats {} ({heartbeats_per_s:.0}/s) · events {} · reconnects {} · errors {}",
            report.connected,
            report.vehicles,
            report.heartbeats_sent,
            report.events_acked,
            report.reconnects,
            report.errors,
        ));
    }

    /// Removes the line (at the end of the run).
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// A `tracing_subscriber` writer for stderr that hides the status line, if there is one,
/// while a log line is written.
#[derive(Debug, Clone)]
pub struct LogWriter {
    bar: Option<ProgressBar>,
}

impl LogWriter {
    /// Log lines to stderr, around `status` if there is one.
    pub fn around(status: Option<&StatusLine>) -> Self {
        Self {
            bar: status.map(|status| status.bar.clone()),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;

    fn make_writer(&'a self) -> Self::Writer {
        LogLine {
            bar: self.bar.clone(),
            buf: Vec::new(),
        }
    }
}

/// One log line, buffered and written in one go when dropped.
#[derive(Debug)]
pub struct LogLine {
    bar: Option<ProgressBar>,
    buf: Vec<u8>,
}

impl io::Write for LogLine {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let write = || {
            // Nowhere left to report a failing stderr.
            let _ = io::stderr().lock().write_all(&self.buf);
        };
        match &self.bar {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }
}
