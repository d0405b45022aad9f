//! Ingest progress on stderr: an indicatif bar (rows, rows/s, ETA) on a terminal, a plain line
//! every few seconds otherwise (logs, CI), so a long run is never silent.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often the plain line is printed.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    started: Instant,
    last_plain: Instant,
    total_bytes: u64,
}

impl Progress {
    /// Progress over a catalogue of `total_bytes`; nothing is shown when `show` is false.
    pub fn new(total_bytes: u64, show: bool) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = (show && terminal).then(|| {
            let bar = indicatif::ProgressBar::new(total_bytes.max(1));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} ingesting [{bar:30}] {percent}% {msg}, ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar
        });
        let now = Instant::now();
        Self { bar, plain: show && !terminal, started: now, last_plain: now, total_bytes }
    }

    /// `rows` done so far, `bytes` of the catalogue read.
    pub fn update(&mut self, rows: u64, bytes: u64) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-6);
        let rate = rows as f64 / secs;
        if let Some(bar) = &self.bar {
            bar.set_position(bytes);
            bar.set_message(format!("{rows} rows, {rate:.1} rows/s"));
        } else if self.plain && self.last_plain.elapsed() >= PLAIN_EVERY {
            self.last_plain = Instant::now();
            let frac = if self.total_bytes == 0 { 1.0 } else { bytes as f64 / self.total_bytes as f64 };
            let eta = if frac > 0.0 { secs * (1.0 - frac) / frac } else { f64::NAN };
            eprintln!(
                "ingest: {rows} rows ({:.0}% of the catalogue), {rate:.1} rows/s, ETA {}",
                frac * 100.0,
                fmt_secs(eta)
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn fmt_secs(s: f64) -> String {
    if !s.is_finite() {
        return "unknown".into();
    }
    let s = s.round() as u64;
    if s >= 3600 { format!("{}h{:02}m", s / 3600, s / 60 % 60) } else { format!("{}m{:02}s", s / 60, s % 60) }
}
