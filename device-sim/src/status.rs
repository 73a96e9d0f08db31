//! The live status line on a terminal, and a log writer that keeps it intact.
//!
//! On a terminal the simulator shows one line that redraws in place (an [`indicatif`]
//! spinner): connected vehicles, heartbeats sent (and the rate), delivery events acknowledged,
//! reconnects and errors. Log lines are written through [`StatusLine::make_writer`], which
//! hides the line while a log line is printed and redraws it after, so the two never garble
//! each other. When stderr is not a terminal there is no status line at all and the runner
//! logs a plain `progress` line every few seconds instead.

use std::io::{self, IsTerminal as _, Write as _};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::runner::SimReport;

/// The status line, or nothing when stderr is not a terminal. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StatusLine {
    bar: Option<ProgressBar>,
}

impl StatusLine {
    /// A status line on stderr if stderr is a terminal, else [`StatusLine::none`].
    pub fn for_stderr() -> Self {
        if !io::stderr().is_terminal() {
            return Self::none();
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4));
        let style = ProgressStyle::with_template("{spinner:.green} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(250));
        Self { bar: Some(bar) }
    }

    /// No status line: the runner logs periodic progress lines instead.
    pub const fn none() -> Self {
        Self { bar: None }
    }

    /// Whether a line is shown.
    pub const fn is_shown(&self) -> bool {
        self.bar.is_some()
    }

    /// Redraws the line from `report`; `rate` is heartbeats per second lately.
    pub fn update(&self, report: &SimReport, rate: f64) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "connected {}/{} · heartbeats {} ({rate:.0}/s) · events {} · reconnects {} · errors {}",
                report.connected,
                report.vehicles,
                report.heartbeats_sent,
                report.events_acked,
                report.reconnects,
                report.errors,
            ));
        }
    }

    /// Removes the line (at the end of the run).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    /// A `tracing_subscriber` writer for stderr that hides the status line while a log line
    /// is written.
    pub fn make_writer(&self) -> LogWriter {
        LogWriter {
            bar: self.bar.clone(),
        }
    }
}

/// Writes log lines to stderr around the status line; see [`StatusLine::make_writer`].
#[derive(Debug, Clone)]
pub struct LogWriter {
    bar: Option<ProgressBar>,
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
