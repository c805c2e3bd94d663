//! What the work loop knows about its own health and its processes' progress.
//!
//! * Heartbeats: the work loop and the poster each beat once per round; `/healthz` fails (and
//!   the systemd watchdog is not pinged) when one of them has not beaten for
//!   `overload.stall_after`, when a process's catch-up has made no progress (no message
//!   committed) for that long, or when a device has had evaluations in flight and completed none
//!   for that long.
//! * Process states: each served process is `serving` (caught up), `catching-up` (a catch-up
//!   running), `backing-off` (its last catch-up failed for a reason retrying may fix: it waits
//!   `poll * 2^failures`, at most `overload.process_backoff_max`) or `halted` (with the
//!   journaled reason). A process that has failed without a success for
//!   `overload.process_halt_after` is halted with a reason saying so; an operator resumes it
//!   (`ao-gpu-worker processes --resume`, `POST /processes/{id}/resume`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use crate::config::RecoveryConfig;

/// The loops that beat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    Work,
    Poster,
}

/// When each loop last went round.
pub struct Heartbeats {
    start: Instant,
    work_ms: AtomicU64,
    poster_ms: AtomicU64,
}

impl Default for Heartbeats {
    fn default() -> Self {
        Self { start: Instant::now(), work_ms: AtomicU64::new(0), poster_ms: AtomicU64::new(0) }
    }
}

impl Heartbeats {
    pub fn beat(&self, l: Loop) {
        let now = self.start.elapsed().as_millis() as u64;
        self.slot(l).store(now, Ordering::Relaxed);
    }

    /// Time since `l` last beat (since the start if it never did).
    pub fn age(&self, l: Loop) -> Duration {
        let last = self.slot(l).load(Ordering::Relaxed);
        self.start.elapsed().saturating_sub(Duration::from_millis(last))
    }

    fn slot(&self, l: Loop) -> &AtomicU64 {
        match l {
            Loop::Work => &self.work_ms,
            Loop::Poster => &self.poster_ms,
        }
    }
}

/// One process as the work loop sees it.
#[derive(Debug, Clone, Default)]
pub(super) struct Tracked {
    /// Consecutive failed catch-ups, the first one's time, the last error.
    failures: u32,
    failing_since: Option<Instant>,
    last_error: Option<String>,
    /// Not before this instant is it caught up again.
    next_try: Option<Instant>,
    /// A catch-up is running since, and last committed a message at.
    busy_since: Option<Instant>,
    last_progress: Option<Instant>,
}

/// A served process's state, as `GET /processes` and `ao-gpu-worker processes` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessView {
    pub process: String,
    /// `serving`, `catching-up`, `backing-off` or `halted`.
    pub state: &'static str,
    /// Why it is halted, or the error it is backing off from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Consecutive failures (backing off).
    #[serde(skip_serializing_if = "is_zero")]
    pub failures: u32,
    /// When it is tried again, in ms from now (backing off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The processes' states, shared by the work loop, the API and the health check.
#[derive(Default)]
pub(super) struct Processes {
    tracked: Mutex<HashMap<String, Tracked>>,
}

/// What a failed catch-up leads to.
pub(super) enum AfterFailure {
    BackOff(Duration),
    Halt(String),
}

impl Processes {
    /// Whether `process` may be caught up now (not backing off).
    pub(super) fn due(&self, process: &str, now: Instant) -> bool {
        crate::sync::lock(&self.tracked).get(process).and_then(|t| t.next_try).is_none_or(|at| at <= now)
    }

    pub(super) fn started(&self, process: &str) {
        let mut map = crate::sync::lock(&self.tracked);
        let t = map.entry(process.to_owned()).or_default();
        t.busy_since = Some(Instant::now());
        t.last_progress = None;
    }

    /// A message of `process` was committed.
    pub(super) fn progressed(&self, process: &str) {
        if let Some(t) = crate::sync::lock(&self.tracked).get_mut(process) {
            t.last_progress = Some(Instant::now());
        }
    }

    pub(super) fn succeeded(&self, process: &str) {
        let mut map = crate::sync::lock(&self.tracked);
        map.insert(process.to_owned(), Tracked::default());
    }

    /// Records a failed catch-up: the backoff before the next, or the halt once the process has
    /// failed for `cfg.process_halt_after` without a success.
    pub(super) fn failed(&self, process: &str, error: &str, poll: Duration, cfg: &RecoveryConfig) -> AfterFailure {
        let mut map = crate::sync::lock(&self.tracked);
        let t = map.entry(process.to_owned()).or_default();
        let now = Instant::now();
        t.busy_since = None;
        t.failures = t.failures.saturating_add(1);
        let since = *t.failing_since.get_or_insert(now);
        t.last_error = Some(error.to_owned());
        if now.duration_since(since) >= cfg.process_halt_after {
            let reason = format!(
                "no progress for {:?} ({} failed attempts; overload.process_halt_after = {:?}); last error: {error}",
                now.duration_since(since),
                t.failures,
                cfg.process_halt_after
            );
            map.remove(process);
            return AfterFailure::Halt(reason);
        }
        let wait = poll.saturating_mul(1u32 << t.failures.saturating_sub(1).min(20)).min(cfg.process_backoff_max);
        t.next_try = Some(now + wait);
        AfterFailure::BackOff(wait)
    }

    /// Forgets `process` (resumed, or no longer served).
    pub(super) fn forget(&self, process: &str) {
        crate::sync::lock(&self.tracked).remove(process);
    }

    /// The view of `process` (not halted: the caller knows halts).
    pub(super) fn view(&self, process: &str) -> ProcessView {
        let map = crate::sync::lock(&self.tracked);
        let now = Instant::now();
        let base = ProcessView { process: process.to_owned(), state: "serving", reason: None, failures: 0, retry_in_ms: None };
        match map.get(process) {
            Some(t) if t.busy_since.is_some() => ProcessView { state: "catching-up", failures: t.failures, ..base },
            Some(t) if t.next_try.is_some_and(|at| at > now) => ProcessView {
                state: "backing-off",
                reason: t.last_error.clone(),
                failures: t.failures,
                retry_in_ms: t.next_try.map(|at| at.duration_since(now).as_millis() as u64),
                ..base
            },
            Some(t) if t.failures > 0 => ProcessView { reason: t.last_error.clone(), failures: t.failures, ..base },
            _ => base,
        }
    }

    /// Processes whose catch-up has committed nothing for `stall` (a hung evaluation or unit).
    pub(super) fn stuck(&self, stall: Duration) -> Vec<String> {
        let now = Instant::now();
        crate::sync::lock(&self.tracked)
            .iter()
            .filter_map(|(p, t)| {
                let last = t.last_progress.or(t.busy_since)?;
                t.busy_since?;
                (now.duration_since(last) >= stall).then(|| p.clone())
            })
            .collect()
    }
}

/// Devices with evaluations in flight that completed none for `stall`: each device's completed
/// count and when it last changed (or when it became busy).
#[derive(Default)]
pub(super) struct DeviceWatch {
    seen: Mutex<Vec<(u64, Instant)>>,
}

impl DeviceWatch {
    /// `loads` are (in flight, completed) per device.
    pub(super) fn stuck(&self, loads: &[(u64, u64)], stall: Duration) -> Vec<usize> {
        let now = Instant::now();
        let mut seen = crate::sync::lock(&self.seen);
        seen.resize(loads.len(), (0, now));
        let mut stuck = Vec::new();
        for (i, &(in_flight, done)) in loads.iter().enumerate() {
            if in_flight == 0 || seen[i].0 != done {
                seen[i] = (done, now);
            } else if now.duration_since(seen[i].1) >= stall {
                stuck.push(i);
            }
        }
        stuck
    }
}

impl super::Context {
    /// Settles a finished catch-up of `process`: success resets its backoff, a halt is recorded,
    /// another failure backs off (or halts, past the budget).
    pub(super) fn after_catch_up(&self, process: &str, outcome: Result<usize, super::JobError>) {
        match outcome {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(%process, evaluated = n, "caught up");
                }
                self.tracked.succeeded(process);
            }
            Err(super::JobError::Halted { process: halted, reason }) => {
                tracing::error!(process = %halted, %reason, "process halted");
                self.record_halt(&halted, &reason);
                self.tracked.forget(process);
            }
            Err(e) => match self.tracked.failed(process, &e.to_string(), self.poll, &self.recovery) {
                AfterFailure::BackOff(wait) => tracing::warn!(%process, error = %e, retry_in = ?wait, "catch-up failed; backing off"),
                AfterFailure::Halt(reason) => {
                    tracing::error!(%process, %reason, "process halted: no progress within overload.process_halt_after");
                    self.record_halt(process, &reason);
                }
            },
        }
    }

    /// Every served or halted process with its state (reads the journal: call off the async
    /// threads).
    pub fn processes(&self) -> Result<Vec<ProcessView>, super::JobError> {
        let halted = self.halted();
        let mut ids: Vec<String> = self.journal.served()?.into_iter().map(|s| s.process).collect();
        ids.extend(halted.keys().cloned());
        ids.sort();
        ids.dedup();
        Ok(ids
            .into_iter()
            .map(|p| match halted.get(&p) {
                Some(reason) => ProcessView { process: p, state: "halted", reason: Some(reason.clone()), failures: 0, retry_in_ms: None },
                None => self.tracked.view(&p),
            })
            .collect())
    }

    /// Clears the halt of `process` (journaled and in memory) and its backoff, and wakes the
    /// work loop; false when it was not halted.
    pub fn resume(&self, process: &str) -> Result<bool, super::JobError> {
        let journaled = self.journal.unhalt(process)?;
        let mut halted = crate::sync::lock(&self.halted);
        let held = halted.remove(process).is_some();
        self.metrics.halted.set(halted.len() as i64);
        drop(halted);
        self.tracked.forget(process);
        if journaled || held {
            tracing::info!(%process, "process resumed by an operator");
            self.wake();
        }
        Ok(journaled || held)
    }

    /// What keeps the worker from being healthy: loops that stopped going round, catch-ups and
    /// devices that make no progress (see the module doc). Empty when healthy.
    pub fn stalls(&self) -> Vec<String> {
        let stall = self.recovery.stall_after;
        let mut out = Vec::new();
        for (l, name) in [(Loop::Work, "the work loop"), (Loop::Poster, "the poster")] {
            let age = self.heartbeats.age(l);
            if age >= stall {
                out.push(format!("{name} has not gone round for {age:?} (overload.stall_after = {stall:?})"));
            }
        }
        for p in self.tracked.stuck(stall) {
            out.push(format!("process {p}: its catch-up has committed nothing for {stall:?}"));
        }
        let loads: Vec<(u64, u64)> = self.runtime.pool().loads().iter().map(|l| (l.in_flight, l.evaluations)).collect();
        for d in self.device_watch.stuck(&loads, stall) {
            out.push(format!("device {d}: evaluations in flight and none completed for {stall:?}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_exponentially_then_halt_and_a_success_resets() {
        let cfg = RecoveryConfig {
            process_backoff_max: Duration::from_millis(400),
            process_halt_after: Duration::from_millis(300),
            ..Default::default()
        };
        let p = Processes::default();
        let poll = Duration::from_millis(100);
        let waits: Vec<Duration> = (0..4)
            .map(|_| match p.failed("P", "down", poll, &cfg) {
                AfterFailure::BackOff(w) => w,
                AfterFailure::Halt(r) => panic!("halted too soon: {r}"),
            })
            .collect();
        assert_eq!(waits, [100, 200, 400, 400].map(Duration::from_millis));
        let v = p.view("P");
        assert_eq!((v.state, v.failures, v.reason.as_deref()), ("backing-off", 4, Some("down")));
        assert!(!p.due("P", Instant::now()));
        std::thread::sleep(Duration::from_millis(320));
        match p.failed("P", "still down", poll, &cfg) {
            AfterFailure::Halt(r) => assert!(r.contains("no progress") && r.contains("still down"), "{r}"),
            AfterFailure::BackOff(_) => panic!("not halted after the budget"),
        }
        assert!(p.due("P", Instant::now()), "a halt forgets the backoff");
        p.failed("Q", "x", poll, &cfg);
        p.succeeded("Q");
        assert_eq!(p.view("Q").state, "serving");
        assert!(p.due("Q", Instant::now()));
    }

    #[test]
    fn a_catch_up_without_progress_and_a_busy_device_without_completions_are_stuck() {
        let p = Processes::default();
        p.started("P");
        assert_eq!(p.view("P").state, "catching-up");
        assert!(p.stuck(Duration::from_secs(60)).is_empty());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(p.stuck(Duration::from_millis(20)), ["P"]);
        p.progressed("P");
        assert!(p.stuck(Duration::from_millis(20)).is_empty());

        let d = DeviceWatch::default();
        assert!(d.stuck(&[(1, 5), (0, 0)], Duration::from_millis(20)).is_empty());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(d.stuck(&[(1, 5), (0, 0)], Duration::from_millis(20)), [0]);
        assert!(d.stuck(&[(1, 6), (0, 0)], Duration::from_millis(20)).is_empty(), "it completed one");
        let h = Heartbeats::default();
        h.beat(Loop::Work);
        assert!(h.age(Loop::Work) < Duration::from_secs(1));
    }
}
