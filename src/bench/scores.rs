//! `<data_dir>/bench.json` on disk, and [`ScoreSlot`]: the measured scores the daemon advertises.
//!
//! At startup the daemon takes the scores from bench.json when it was written by this worker
//! version on this hardware (the same [`CapacityManifest::hardware_fingerprint`]) and holds figures
//! of the backend that serves evaluations, in its determinism mode; otherwise it runs the quick
//! suite for that backend once, on a background thread, saves it (keeping the other backends'
//! figures of a matching file), and advertises the scores from then on.
//!
//! This is all the daemon knows of `bench`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::report::{BenchReport, WORKER_VERSION, utc};
use super::{Options, run};
use crate::capacity::{CapacityManifest, MeasuredScores};
use crate::gpu::{BackendKind, Determinism};

/// The file in the worker's data directory.
pub const FILE_NAME: &str = "bench.json";

/// `<data_dir>/bench.json`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// The report saved in `data_dir`, if there is a readable one.
pub fn load(data_dir: &Path) -> Option<BenchReport> {
    let file = path(data_dir);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %file.display(), error = %e, "cannot read the saved bench results");
            return None;
        }
    };
    serde_json::from_str(&text)
        .inspect_err(|e| tracing::warn!(path = %file.display(), error = %e, "saved bench results do not parse; ignoring them"))
        .ok()
}

/// Writes `report` to `<data_dir>/bench.json` (creating the directory), atomically: a reader sees
/// the old file or the new one.
pub fn save(report: &BenchReport, data_dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(data_dir)?;
    let file = path(data_dir);
    let tmp = data_dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let mut text = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
    text.push('\n');
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &file).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(file)
}

/// The measured scores a running worker advertises, shared between the startup measurement and
/// the capacity heartbeat.
#[derive(Debug, Clone, Default)]
pub struct ScoreSlot(Arc<Mutex<Option<MeasuredScores>>>);

impl ScoreSlot {
    /// The scores in `<data_dir>/bench.json` when it was written by this worker version on this
    /// hardware and covers the serving backend (`kind` in `determinism` mode); otherwise an empty
    /// slot for [`ScoreSlot::measure_in_background`] to fill.
    pub fn load(manifest: &CapacityManifest, data_dir: &Path, kind: BackendKind, determinism: Determinism) -> Self {
        let slot = ScoreSlot::default();
        match load(data_dir) {
            Some(r) if r.matches(manifest) && r.covers(kind, determinism) => {
                tracing::info!(path = %path(data_dir).display(), measured_at = %utc(r.measured_at_ms), "measured scores from the saved bench results");
                slot.set(r.scores(FILE_NAME));
            }
            Some(r) => tracing::info!(
                path = %path(data_dir).display(),
                same_machine = r.fingerprint == manifest.hardware_fingerprint(),
                same_version = r.worker_version == WORKER_VERSION,
                covers_backend = r.covers(kind, determinism),
                "saved bench results do not describe this machine, version and backend; measuring again"
            ),
            None => {}
        }
        slot
    }

    pub fn current(&self) -> Option<MeasuredScores> {
        self.lock().clone()
    }

    fn set(&self, scores: MeasuredScores) {
        *self.lock() = Some(scores);
    }

    fn lock(&self) -> MutexGuard<'_, Option<MeasuredScores>> {
        crate::sync::lock(&self.0)
    }

    /// When the slot is empty: runs the quick suite for the serving backend on a thread of its own
    /// (off the async runtime; a few seconds of CPU once per machine and version), saves it to
    /// `<data_dir>/bench.json` (keeping the other backends' figures of a saved report from this
    /// machine and version), fills the slot and calls `done`. Stops early, saving nothing, when
    /// `cancel` fires.
    pub fn measure_in_background(
        &self,
        manifest: &CapacityManifest,
        data_dir: &Path,
        kind: BackendKind,
        determinism: Determinism,
        cancel: CancellationToken,
        done: impl FnOnce(&MeasuredScores) + Send + 'static,
    ) {
        if self.current().is_some() {
            return;
        }
        let (slot, manifest, data_dir) = (self.clone(), manifest.clone(), data_dir.to_path_buf());
        let spawned = std::thread::Builder::new().name("startup-bench".to_owned()).spawn(move || {
            let started = Instant::now();
            let opts = Options { backends: vec![kind], determinism, quick: true };
            // Periodic info lines (a bar would tear the daemon's log lines).
            let progress =
                crate::progress::Progress::lines("startup bench", None, crate::progress::Unit::Items, crate::progress::Lines::Log);
            let mut report = run(&opts, &manifest, &|line| progress.inc(1, line), &|| cancel.is_cancelled());
            progress.finish("done");
            if cancel.is_cancelled() {
                return;
            }
            if let Some(old) = load(&data_dir).filter(|old| old.matches(&manifest)) {
                let measured: Vec<String> = report.backends.iter().map(|b| b.score.kind.clone()).collect();
                report.backends.extend(old.backends.into_iter().filter(|b| !measured.contains(&b.score.kind)));
            }
            match save(&report, &data_dir) {
                Ok(file) => tracing::info!(path = %file.display(), "bench results saved"),
                Err(e) => tracing::warn!(data_dir = %data_dir.display(), error = %e, "cannot save the bench results"),
            }
            let scores = report.scores("startup");
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                scores = %serde_json::to_string(&scores).unwrap_or_default(),
                "measured scores"
            );
            slot.set(scores.clone());
            done(&scores);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the startup bench; advertising without measured scores");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::report::tests::report_for;
    use super::*;
    use crate::capacity::{DetectOptions, GemmScore, detect};

    #[test]
    fn saved_scores_are_used_only_on_the_machine_version_and_backend_that_measured_them() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = detect(&DetectOptions { data_dir: dir.path().to_path_buf(), worker_address: None });
        let report = report_for(&manifest);
        let file = save(&report, dir.path()).unwrap();
        assert_eq!(file, dir.path().join("bench.json"));
        assert_eq!(load(dir.path()).as_ref(), Some(&report));

        let slot = ScoreSlot::load(&manifest, dir.path(), BackendKind::Cpu, Determinism::Reproducible);
        let scores = slot.current().expect("matching bench.json is used");
        assert_eq!(scores.source, "bench.json");
        assert_eq!(scores.host_call_ns, Some(42.0));
        assert_eq!(scores.backends[0].gemm_f32, Some(GemmScore { n: 256, gflops: 1.5 }));
        assert_eq!(scores.fingerprint, manifest.hardware_fingerprint());

        // Another backend or mode: not covered.
        assert!(ScoreSlot::load(&manifest, dir.path(), BackendKind::Wgpu, Determinism::Reproducible).current().is_none());
        assert!(ScoreSlot::load(&manifest, dir.path(), BackendKind::Cpu, Determinism::Fast).current().is_none());
        // Another machine, another version, another schema: ignored.
        for change in [
            (|r: &mut BenchReport| r.fingerprint = "0".repeat(64)) as fn(&mut BenchReport),
            |r| r.worker_version = "0.0.0-other".to_owned(),
            |r| r.schema = "ao-gpu-worker/bench/0".to_owned(),
        ] {
            let mut other = report.clone();
            change(&mut other);
            save(&other, dir.path()).unwrap();
            assert!(ScoreSlot::load(&manifest, dir.path(), BackendKind::Cpu, Determinism::Reproducible).current().is_none());
        }
        // A file that does not parse: ignored, not fatal.
        std::fs::write(dir.path().join("bench.json"), "{not json").unwrap();
        assert!(ScoreSlot::load(&manifest, dir.path(), BackendKind::Cpu, Determinism::Reproducible).current().is_none());
    }
}
