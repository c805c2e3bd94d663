//! The record of one `bench` run ([`BenchReport`], with the [`Hardware`] it ran on and one
//! [`BackendReport`] per backend), its figures as the capacity manifest's measured scores, and
//! the text table `ao-gpu-worker bench` prints.
//!
//! Plain data: it measures nothing and touches no file.

use serde::{Deserialize, Serialize};

use super::aos::AosFigure;
use crate::capacity::{BackendScore, CapacityManifest, MeasuredScores};
use crate::gpu::{BackendKind, DType, Determinism};

/// The `schema` of every bench.json this version writes.
pub const SCHEMA: &str = "ao-gpu-worker/bench/1";
/// The worker version recorded with (and required of) measured scores.
pub const WORKER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The hardware a report was measured on (from the capacity probe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hardware {
    pub cpu_model: String,
    pub cpu_vendor: String,
    pub logical_cores: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical_cores: Option<usize>,
    pub arch: String,
    pub cpu_features: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    pub memory_total_bytes: u64,
    /// Each wgpu adapter: "name (backend, type; driver, driver info)".
    pub wgpu_adapters: Vec<String>,
    /// The CUDA status, driver and devices.
    pub cuda: String,
}

impl Hardware {
    pub fn of(manifest: &CapacityManifest) -> Self {
        let cpu = &manifest.host.cpu;
        let cuda = &manifest.gpus.cuda;
        let mut cuda_text = cuda.status.as_str().to_owned();
        if let Some(v) = &cuda.driver_version {
            cuda_text.push_str(&format!(", driver {v}"));
        }
        for d in &cuda.devices {
            cuda_text.push_str(&format!(", #{} {} (sm {})", d.ordinal, d.name, d.compute_capability));
        }
        if let Some(r) = &cuda.reason {
            cuda_text.push_str(&format!(" ({r})"));
        }
        Hardware {
            cpu_model: cpu.model.clone(),
            cpu_vendor: cpu.vendor.clone(),
            logical_cores: cpu.logical_cores,
            physical_cores: cpu.physical_cores,
            arch: manifest.host.arch.clone(),
            cpu_features: cpu.features.clone(),
            os: manifest.host.os.clone(),
            memory_total_bytes: manifest.host.memory.total_bytes,
            wgpu_adapters: manifest
                .gpus
                .wgpu
                .adapters
                .iter()
                .map(|a| format!("{} ({}, {}; {}, {})", a.name, a.backend, a.device_type, a.driver, a.driver_info))
                .collect(),
            cuda: cuda_text,
        }
    }
}

/// The figures of one backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendReport {
    #[serde(flatten)]
    pub score: BackendScore,
    /// The device: the CPU model, the wgpu adapter or the CUDA device.
    pub device: String,
    /// The device driver and its version, where the backend reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// 100 small ops from Wasm, one host call each, then a read: µs per 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops100_one_by_one_us: Option<f64>,
    /// The same 100 ops in one batched host call: µs per 100 (once `ao_gpu.run` exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops100_batched_us: Option<f64>,
    /// Figures that could not be measured, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One `bench` run: `<data_dir>/bench.json`, and the `--json` output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Always [`SCHEMA`].
    pub schema: String,
    pub worker_version: String,
    /// Milliseconds since the Unix epoch.
    pub measured_at_ms: u64,
    pub quick: bool,
    /// [`CapacityManifest::hardware_fingerprint`] of the machine it ran on.
    pub fingerprint: String,
    pub hardware: Hardware,
    /// One empty host call from Wasm, in ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_call_ns: Option<f64>,
    /// The `ao_gpu` call path alone (`free` of an unknown handle), in ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ao_gpu_call_ns: Option<f64>,
    pub backends: Vec<BackendReport>,
    /// Backends asked for that could not start, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<String>,
    /// aos processes (AO's Lua modules) per second, when the fixtures were found.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aos: Vec<AosFigure>,
    /// Why aos figures are missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aos_notes: Vec<String>,
}

impl BenchReport {
    /// The figures as the capacity manifest's measured scores.
    pub fn scores(&self, source: &str) -> MeasuredScores {
        MeasuredScores {
            source: source.to_owned(),
            measured_at_ms: self.measured_at_ms,
            worker_version: self.worker_version.clone(),
            quick: self.quick,
            fingerprint: self.fingerprint.clone(),
            host_call_ns: self.host_call_ns,
            backends: self.backends.iter().map(|b| b.score.clone()).collect(),
        }
    }

    /// Whether this report was measured by this worker version on the machine `manifest` describes.
    pub fn matches(&self, manifest: &CapacityManifest) -> bool {
        self.schema == SCHEMA && self.worker_version == WORKER_VERSION && self.fingerprint == manifest.hardware_fingerprint()
    }

    /// Whether it holds figures of `kind` measured in `determinism` mode.
    pub fn covers(&self, kind: BackendKind, determinism: Determinism) -> bool {
        self.backends.iter().any(|b| b.score.kind == kind.as_str() && b.score.determinism == determinism.as_str())
    }

    /// The table `ao-gpu-worker bench` prints: the hardware, then one column per backend.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        let h = &self.hardware;
        line(
            &mut out,
            format!(
                "ao-gpu-worker {} bench{} at {}",
                self.worker_version,
                if self.quick { " --quick" } else { "" },
                utc(self.measured_at_ms)
            ),
        );
        let physical = h.physical_cores.map(|p| format!(", {p} physical")).unwrap_or_default();
        line(&mut out, format!("cpu      {} ({} logical cores{physical}), {}", h.cpu_model, h.logical_cores, h.arch));
        if !h.cpu_features.is_empty() {
            line(&mut out, format!("         features: {}", h.cpu_features.join(" ")));
        }
        if let Some(os) = &h.os {
            line(&mut out, format!("os       {os}, {:.1} GiB memory", h.memory_total_bytes as f64 / (1u64 << 30) as f64));
        }
        for a in &h.wgpu_adapters {
            line(&mut out, format!("wgpu     {a}"));
        }
        if h.wgpu_adapters.is_empty() {
            line(&mut out, "wgpu     no adapter".to_owned());
        }
        line(&mut out, format!("cuda     {}", h.cuda));
        line(&mut out, format!("machine  fingerprint {}", short(&self.fingerprint)));
        line(&mut out, String::new());
        for b in &self.backends {
            let driver = b.driver.as_ref().map(|d| format!(", driver {d}")).unwrap_or_default();
            line(&mut out, format!("backend  {} [{}] on {}{driver}", b.score.description, b.score.determinism, b.device));
        }
        for u in &self.unavailable {
            line(&mut out, format!("skipped  {u}"));
        }
        line(&mut out, String::new());

        let fmt_opt = |v: Option<f64>, unit: &str| v.map(|v| format!("{v} {unit}")).unwrap_or_else(|| "-".to_owned());
        let mut rows: Vec<(String, Vec<String>)> = Vec::new();
        rows.push((
            "f32 gemm".to_owned(),
            self.backends
                .iter()
                .map(|b| b.score.gemm_f32.as_ref().map_or("-".to_owned(), |g| format!("{} GFLOP/s @{}³", g.gflops, g.n)))
                .collect(),
        ));
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            rows.push((
                format!("{dtype} matvec"),
                self.backends.iter().map(|b| fmt_opt(b.score.qmatvec_gbps.get(dtype.as_str()).copied(), "GB/s")).collect(),
            ));
        }
        rows.push(("h2d upload".to_owned(), self.backends.iter().map(|b| fmt_opt(b.score.h2d_gbps, "GB/s")).collect()));
        rows.push(("d2h read".to_owned(), self.backends.iter().map(|b| fmt_opt(b.score.d2h_gbps, "GB/s")).collect()));
        rows.push(("tiny op (wasm)".to_owned(), self.backends.iter().map(|b| fmt_opt(b.score.tiny_op_ns, "ns")).collect()));
        rows.push(("100 ops 1-by-1".to_owned(), self.backends.iter().map(|b| fmt_opt(b.ops100_one_by_one_us, "µs")).collect()));
        rows.push(("100 ops batched".to_owned(), self.backends.iter().map(|b| fmt_opt(b.ops100_batched_us, "µs")).collect()));
        let headers: Vec<String> = self.backends.iter().map(|b| b.score.kind.clone()).collect();
        let widths: Vec<usize> = (0..headers.len())
            .map(|i| rows.iter().map(|(_, cells)| cells[i].chars().count()).chain([headers[i].len()]).max().unwrap_or(0))
            .collect();
        let label_width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0).max(6);
        let mut header = format!("{:label_width$}", "figure");
        for (h, w) in headers.iter().zip(&widths) {
            header.push_str(&format!("  {h:>w$}"));
        }
        line(&mut out, header);
        for (label, cells) in &rows {
            let mut row = format!("{label:label_width$}");
            for (c, &w) in cells.iter().zip(&widths) {
                let pad = w.saturating_sub(c.chars().count());
                row.push_str(&format!("  {}{c}", " ".repeat(pad)));
            }
            line(&mut out, row);
        }
        line(&mut out, String::new());
        line(&mut out, format!("host call from wasm (empty): {}", fmt_opt(self.host_call_ns, "ns")));
        line(&mut out, format!("ao_gpu call path (no op):    {}", fmt_opt(self.ao_gpu_call_ns, "ns")));
        for a in &self.aos {
            line(
                &mut out,
                format!(
                    "aos {} as {}: {} msg/s (first message {} ms, {} MB memory)",
                    a.fixture,
                    a.format,
                    a.msgs_per_s,
                    a.first_message_ms,
                    a.memory_bytes / 1_000_000
                ),
            );
        }
        for n in &self.aos_notes {
            line(&mut out, format!("note: {n}"));
        }
        for b in &self.backends {
            for n in &b.notes {
                line(&mut out, format!("note: {}: {n}", b.score.kind));
            }
        }
        out
    }
}

fn short(fingerprint: &str) -> &str {
    fingerprint.get(..16).unwrap_or(fingerprint)
}

/// "2023-11-14 22:13:20 UTC" for milliseconds since the Unix epoch.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days to a civil date (proleptic Gregorian), after Howard Hinnant's `civil_from_days`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::capacity::{DetectOptions, GemmScore, detect};

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(4_107_542_399_000), "2100-02-28 23:59:59 UTC");
    }

    pub(in crate::bench) fn report_for(manifest: &CapacityManifest) -> BenchReport {
        BenchReport {
            schema: SCHEMA.to_owned(),
            worker_version: WORKER_VERSION.to_owned(),
            measured_at_ms: 1_700_000_000_000,
            quick: true,
            fingerprint: manifest.hardware_fingerprint(),
            hardware: Hardware::of(manifest),
            host_call_ns: Some(42.0),
            ao_gpu_call_ns: Some(80.0),
            backends: vec![BackendReport {
                score: BackendScore {
                    kind: "cpu".to_owned(),
                    description: "cpu (2 threads)".to_owned(),
                    determinism: "reproducible".to_owned(),
                    gemm_f32: Some(GemmScore { n: 256, gflops: 1.5 }),
                    qmatvec_gbps: BTreeMap::new(),
                    h2d_gbps: Some(3.25),
                    d2h_gbps: Some(4.5),
                    tiny_op_ns: Some(700.0),
                },
                device: "some cpu".to_owned(),
                driver: None,
                ops100_one_by_one_us: Some(70.0),
                ops100_batched_us: None,
                notes: vec!["q8_0 matvec: unsupported".to_owned()],
            }],
            unavailable: vec!["cuda: unavailable: no CUDA driver".to_owned()],
            aos: vec![AosFigure {
                fixture: "emscripten4.wasm".to_owned(),
                format: "wasm32-unknown-emscripten4".to_owned(),
                msgs_per_s: 1500.5,
                first_message_ms: 20.0,
                memory_bytes: 109_903_872,
            }],
            aos_notes: Vec::new(),
        }
    }

    #[test]
    fn the_table_shows_hardware_and_figures() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = detect(&DetectOptions { data_dir: dir.path().to_path_buf(), worker_address: None });
        let table = report_for(&manifest).table();
        assert!(table.contains(&format!("({} logical cores", manifest.host.cpu.logical_cores)), "{table}");
        assert!(table.contains("1.5 GFLOP/s @256³"), "{table}");
        assert!(table.contains("3.25 GB/s"), "{table}");
        assert!(table.contains("host call from wasm (empty): 42 ns"), "{table}");
        assert!(table.contains("skipped  cuda: unavailable"), "{table}");
        assert!(table.contains("note: cpu: q8_0 matvec: unsupported"), "{table}");
        assert!(
            table.contains("aos emscripten4.wasm as wasm32-unknown-emscripten4: 1500.5 msg/s (first message 20 ms, 109 MB memory)"),
            "{table}"
        );
    }
}
