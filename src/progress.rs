//! Progress of long operations (model publishing, the bench, a process's catch-up): a bar on
//! stderr when stderr is a terminal, else a plain line at most every [`LOG_EVERY`] (and at the
//! end), so logs and pipes get a readable trace. Nothing is ever written to stdout, which carries
//! command output (JSON included).
//!
//! Contract: a [`Progress`] is cheap to update from any thread; it never fails and never panics.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Least time between two plain progress lines.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// What the counts are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Items,
    Bytes,
}

/// Where plain lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lines {
    /// `eprintln!` (commands: their log level hides info lines).
    Stderr,
    /// `tracing::info!` (the daemon: its stderr is the journal).
    Log,
}

/// A progress report; see the module doc.
pub struct Progress {
    label: String,
    unit: Unit,
    bar: Option<ProgressBar>,
    lines: Lines,
    state: Mutex<State>,
}

struct State {
    pos: u64,
    total: Option<u64>,
    message: String,
    last_line: Option<Instant>,
    started: Instant,
}

impl Progress {
    /// A bar when stderr is a terminal, else plain lines to `lines`.
    pub fn new(label: &str, total: Option<u64>, unit: Unit, lines: Lines) -> Self {
        use std::io::IsTerminal;
        Self::build(label, total, unit, lines, std::io::stderr().is_terminal())
    }

    /// Plain lines only, whatever stderr is.
    pub fn lines(label: &str, total: Option<u64>, unit: Unit, lines: Lines) -> Self {
        Self::build(label, total, unit, lines, false)
    }

    fn build(label: &str, total: Option<u64>, unit: Unit, lines: Lines, tty: bool) -> Self {
        let bar = tty.then(|| {
            let bar = match total {
                Some(t) => ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()),
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            };
            let counts = match unit {
                Unit::Items => "{pos}/{len}",
                Unit::Bytes => "{bytes}/{total_bytes} {bytes_per_sec}",
            };
            let template = match total {
                Some(_) => format!("{{prefix}} [{{bar:30}}] {counts} eta {{eta}} {{msg}}"),
                None => "{prefix} {spinner} {pos} {elapsed} {msg}".to_owned(),
            };
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(label.to_owned());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let state = State { pos: 0, total, message: String::new(), last_line: None, started: Instant::now() };
        Self { label: label.to_owned(), unit, bar, lines, state: Mutex::new(state) }
    }

    /// Whether this draws a bar (rather than lines).
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    pub fn set_total(&self, total: u64) {
        self.lock().total = Some(total);
        if let Some(b) = &self.bar {
            b.set_length(total);
        }
    }

    /// Adds `n` done, with what is being done now (may be empty).
    pub fn inc(&self, n: u64, message: &str) {
        if let Some(b) = &self.bar {
            b.inc(n);
            if !message.is_empty() {
                b.set_message(message.to_owned());
            }
            return;
        }
        let line = {
            let mut s = self.lock();
            s.pos += n;
            if !message.is_empty() {
                s.message = message.to_owned();
            }
            let due = s.last_line.is_none_or(|t| t.elapsed() >= LOG_EVERY);
            if due {
                s.last_line = Some(Instant::now());
            }
            due.then(|| self.describe(&s))
        };
        if let Some(line) = line {
            self.emit(&line);
        }
    }

    /// Ends the report with a last line (or clears the bar and prints it).
    pub fn finish(&self, message: &str) {
        let line = {
            let mut s = self.lock();
            if !message.is_empty() {
                s.message = message.to_owned();
            }
            self.describe(&s)
        };
        match &self.bar {
            Some(b) => {
                b.finish_and_clear();
                eprintln!("{line}");
            }
            None => self.emit(&line),
        }
    }

    fn describe(&self, s: &State) -> String {
        let amount = |n: u64| match self.unit {
            Unit::Items => n.to_string(),
            Unit::Bytes => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        };
        let pos = if let Some(b) = &self.bar { b.position() } else { s.pos };
        let counts = match s.total {
            Some(t) if t > 0 => format!("{}/{} ({:.0}%)", amount(pos), amount(t), pos as f64 * 100.0 / t as f64),
            _ => amount(pos),
        };
        let msg = if s.message.is_empty() { String::new() } else { format!(" {}", s.message) };
        format!("{}: {counts} in {:.0?}{msg}", self.label, s.started.elapsed())
    }

    fn emit(&self, line: &str) {
        match self.lines {
            Lines::Stderr => eprintln!("{line}"),
            Lines::Log => tracing::info!("{line}"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_count_and_rate_limit() {
        let p = Progress::lines("publish", Some(200), Unit::Items, Lines::Log);
        assert!(!p.is_bar());
        p.inc(50, "tensor a");
        // The first inc printed a line; the next ones within LOG_EVERY do not.
        let first = p.lock().last_line.unwrap();
        p.inc(50, "tensor b");
        assert_eq!(p.lock().last_line.unwrap(), first);
        assert_eq!(p.describe(&p.lock()).split(" in ").next().unwrap(), "publish: 100/200 (50%)");
        let b = Progress::lines("fetch", None, Unit::Bytes, Lines::Log);
        b.inc(3 << 20, "");
        assert!(b.describe(&b.lock()).starts_with("fetch: 3.0 MiB in "));
    }
}
