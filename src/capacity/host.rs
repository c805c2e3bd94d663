//! Host probe: OS, CPU (with run-time SIMD features), memory, and the disk holding the data directory.

use std::path::{Path, PathBuf};

use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

use super::{CpuInfo, DiskInfo, HostInfo, MemoryInfo};

pub(super) fn probe(data_dir: &Path) -> HostInfo {
    // Only what the manifest reports: no process table (slow on busy hosts) and no CPU usage sampling.
    let refresh =
        RefreshKind::nothing().with_cpu(CpuRefreshKind::nothing().with_frequency()).with_memory(MemoryRefreshKind::nothing().with_ram());
    let sys = System::new_with_specifics(refresh)
        .inspect_err(|e| tracing::warn!(error = %e, "sysinfo could not read the system; cpu and memory left empty"))
        .ok();

    HostInfo {
        hostname: ok_or_log("hostname", System::host_name()),
        os: ok_or_log("os", System::long_os_version()),
        kernel: ok_or_log("kernel", System::kernel_version()),
        arch: System::cpu_arch(),
        cpu: cpu_info(sys.as_ref()),
        memory: MemoryInfo {
            total_bytes: sys.as_ref().map_or(0, System::total_memory),
            available_bytes: sys.as_ref().map_or(0, System::available_memory),
        },
        disk: disk_info(data_dir),
    }
}

fn ok_or_log(what: &str, r: Result<String, sysinfo::Error>) -> Option<String> {
    r.inspect_err(|e| tracing::debug!(error = %e, "sysinfo could not read the {what}")).ok().filter(|s| !s.is_empty())
}

fn cpu_info(sys: Option<&System>) -> CpuInfo {
    let cpus = sys.map_or(&[][..], System::cpus);
    let first = cpus.first();
    // sysinfo counts every CPU the kernel lists; fall back to std when it could not read them.
    let logical_cores = if cpus.is_empty() { std::thread::available_parallelism().map_or(1, usize::from) } else { cpus.len() };
    CpuInfo {
        model: first.map(|c| c.brand().trim().to_owned()).unwrap_or_default(),
        vendor: first.map(|c| c.vendor_id().trim().to_owned()).unwrap_or_default(),
        logical_cores,
        physical_cores: System::physical_core_count().ok().filter(|&n| n > 0),
        frequency_mhz: cpus.iter().map(|c| c.frequency()).max().unwrap_or(0),
        features: cpu_features(),
    }
}

/// SIMD features the CPU kernels can use, detected at run time (not the compile-time target).
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn cpu_features() -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! probe {
        ($($f:tt),* $(,)?) => {
            $( if std::arch::is_x86_feature_detected!($f) { out.push($f.to_owned()); } )*
        };
    }
    probe!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16", "avx512fp16", "avxvnni",);
    out
}

/// SIMD features the CPU kernels can use, detected at run time (not the compile-time target).
#[cfg(target_arch = "aarch64")]
fn cpu_features() -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! probe {
        ($($f:tt),* $(,)?) => {
            $( if std::arch::is_aarch64_feature_detected!($f) { out.push($f.to_owned()); } )*
        };
    }
    probe!("neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2");
    out
}

/// No run-time SIMD detection on this architecture.
#[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
fn cpu_features() -> Vec<String> {
    Vec::new()
}

fn disk_info(data_dir: &Path) -> DiskInfo {
    let path = data_dir.display().to_string();
    let empty = || DiskInfo { path: path.clone(), mount_point: None, total_bytes: 0, available_bytes: 0 };

    let Some(target) = existing_ancestor(data_dir) else {
        tracing::warn!(data_dir = %data_dir.display(), "no existing ancestor of the data dir; disk left empty");
        return empty();
    };
    let disks = match Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage()) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "sysinfo could not list disks; disk left empty");
            return empty();
        }
    };
    // `Path::starts_with` compares whole components, so "/data" does not contain "/database".
    // `max_by_key` keeps the last of equal keys: a later mount over the same point hides earlier ones.
    let best = disks.iter().filter(|d| target.starts_with(d.mount_point())).max_by_key(|d| d.mount_point().components().count());
    match best {
        Some(d) => DiskInfo {
            path,
            mount_point: Some(d.mount_point().display().to_string()),
            total_bytes: d.total_space(),
            available_bytes: d.available_space(),
        },
        None => {
            tracing::warn!(resolved = %target.display(), "no listed file system contains the data dir; disk left empty");
            empty()
        }
    }
}

/// The canonical form of `dir`, or of its nearest existing ancestor when `dir` does not exist yet.
/// Relative paths are taken from the current directory.
fn existing_ancestor(dir: &Path) -> Option<PathBuf> {
    let absolute = if dir.is_absolute() { dir.to_path_buf() } else { std::env::current_dir().ok()?.join(dir) };
    absolute.ancestors().find_map(|p| p.canonicalize().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_ancestor_walks_up_to_what_exists() {
        let dir = tempfile::tempdir().unwrap();
        let canonical = dir.path().canonicalize().unwrap();
        assert_eq!(existing_ancestor(dir.path()).unwrap(), canonical);
        assert_eq!(existing_ancestor(&dir.path().join("a/b/c")).unwrap(), canonical);
        assert!(existing_ancestor(Path::new("relative/does/not/exist")).is_some());
    }

    #[test]
    fn cpu_features_are_consistent_with_the_compile_target() {
        let f = cpu_features();
        println!("cpu features: {f:?}");
        // The binary runs, so every feature it was compiled to assume is present.
        if cfg!(target_feature = "avx2") {
            assert!(f.iter().any(|x| x == "avx2"));
        }
        if cfg!(all(target_arch = "aarch64", target_feature = "neon")) {
            assert!(f.iter().any(|x| x == "neon"));
        }
    }
}
