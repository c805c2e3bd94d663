//! Checks of this machine's files and ports: the registry setting, the key file, the data and
//! cache directories, free disk, the bench scores' freshness and the API port.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::Check;
use super::account::{Account, READ, WRITE};
use crate::attest::{KeyError, Keypair};
use crate::capacity::CapacityManifest;
use crate::config::Config;
use crate::gpu::{BackendKind, Determinism};

pub(super) fn check(config: &Config, source: &str, account: &Account) -> Vec<Check> {
    vec![
        registry_setting(config, source),
        key_file(&config.worker.key_file, account),
        directory("data_dir", &config.worker.data_dir, account, &format!("[worker] data_dir = \"/var/lib/ao-gpu-worker\" in {source}")),
        directory(
            "cache_dir",
            &config.worker.cache_dir,
            account,
            &format!("[worker] cache_dir = \"/var/cache/ao-gpu-worker\" in {source}"),
        ),
    ]
}

fn registry_setting(config: &Config, source: &str) -> Check {
    match &config.registry.process {
        Some(p) => Check::pass("registry.process", p.clone()),
        None => Check::fail(
            "registry.process",
            "not set: `run` refuses to start without it",
            format!("set [registry] process = \"<43-character registry process id>\" in {source} (or {}=...)", crate::config::ENV_REGISTRY),
        ),
    }
}

fn key_file(path: &Path, account: &Account) -> Check {
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Check::fail("key_file", format!("{shown} does not exist"), format!("ao-gpu-worker keygen --out {shown}"));
        }
        Err(e) => {
            return Check::fail("key_file", format!("cannot read {shown}: {e}"), format!("ls -l {shown}; the key must be a readable file"));
        }
    };
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Check::fail("key_file", format!("{shown} has mode {mode:04o}: readable by group or others"), format!("chmod 600 {shown}"));
    }
    // Root-owned is what the unit expects (systemd hands it over as a credential); owned by the
    // service user is what a run outside systemd needs.
    if meta.uid() != 0 && meta.uid() != account.uid {
        return Check::fail(
            "key_file",
            format!("{shown} is owned by uid {}, neither root nor the service user {}", meta.uid(), account.name),
            format!("chown root:root {shown}"),
        );
    }
    if let Err(e) = std::fs::File::open(path)
        && e.kind() == std::io::ErrorKind::PermissionDenied
    {
        // Root-only is right for the unit (systemd reads it as a credential), but this run cannot
        // check what is inside.
        return Check::fail(
            "key_file",
            format!("{shown} (mode {mode:04o}, uid {}) cannot be read by this run: {e}", meta.uid()),
            "run doctor as root (sudo ao-gpu-worker doctor ...): the service receives this key as a systemd credential",
        );
    }
    match Keypair::load(path) {
        Ok(k) => Check::pass("key_file", format!("{shown}: {} key, address {}, mode {mode:04o}", k.key_type(), k.address())),
        Err(e @ KeyError::TooOpen { .. }) => Check::fail("key_file", e.to_string(), format!("chmod 600 {shown}")),
        Err(e) => Check::fail(
            "key_file",
            format!("{shown} is not a usable key: {e}"),
            format!("mv {shown} {shown}.bad && ao-gpu-worker keygen --out {shown}"),
        ),
    }
}

/// A directory the worker writes: it must exist (or be creatable) and be writable by the account.
fn directory(name: &str, dir: &Path, account: &Account, config_line: &str) -> Check {
    let shown = dir.display();
    let install = format!("install -d -m 0700 -o {} {shown}  (or set {config_line})", account.name);
    let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    let meta = match std::fs::metadata(existing) {
        Ok(m) => m,
        Err(e) => return Check::fail(name, format!("cannot read {}: {e}", existing.display()), install),
    };
    if !meta.is_dir() {
        return Check::fail(name, format!("{} is not a directory", existing.display()), install);
    }
    if !account.may(&meta, WRITE | READ) {
        let what = if existing == dir { "is not writable" } else { "does not exist and its parent is not writable" };
        return Check::fail(
            name,
            format!("{shown} {what} by {} (owner uid {}, mode {:04o})", account.name, meta.uid(), meta.mode() & 0o7777),
            if existing == dir { format!("chown {} {shown}", account.name) } else { install },
        );
    }
    // The mode bits say yes; a read-only mount or a full disk can still say no.
    if existing == dir {
        let probe = dir.join(format!(".doctor-{}", std::process::id()));
        if let Err(e) = std::fs::write(&probe, b"probe") {
            return Check::fail(name, format!("cannot write in {shown}: {e}"), install);
        }
        let _ = std::fs::remove_file(&probe);
        Check::pass(name, format!("{shown} writable by {}", account.name))
    } else {
        Check::pass(name, format!("{shown} will be created (in {}, writable by {})", existing.display(), account.name))
    }
}

/// Free space on the data directory's file system.
pub(super) fn disk(manifest: &CapacityManifest, min_free: u64, source: &str) -> Check {
    let d = &manifest.host.disk;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let on = d.mount_point.as_deref().unwrap_or("?");
    if d.mount_point.is_none() {
        return Check::fail(
            "disk",
            format!("no file system found for {}", d.path),
            format!("set [worker] data_dir to a directory on a mounted disk in {source}"),
        );
    }
    if d.available_bytes < min_free {
        return Check::fail(
            "disk",
            format!("{:.1} GiB free on {on} (holding {}), less than {:.1} GiB", gib(d.available_bytes), d.path, gib(min_free)),
            format!("free space on {on} (du -sh {}/* shows what the worker keeps) or set [worker] data_dir on a larger disk", d.path),
        );
    }
    Check::pass("disk", format!("{:.1} GiB free of {:.1} GiB on {on}", gib(d.available_bytes), gib(d.total_bytes)))
}

/// Whether `<data_dir>/bench.json` describes this machine, version and the serving backend.
pub(super) fn bench(config: &Config, manifest: &CapacityManifest, serving: Option<(BackendKind, Determinism)>, source: &str) -> Check {
    let path = crate::bench::scores::path(&config.worker.data_dir);
    let fix = format!("ao-gpu-worker bench --config {source}");
    let Some(report) = crate::bench::scores::load(&config.worker.data_dir) else {
        if config.gpu.startup_bench {
            return Check::pass(
                "bench",
                format!("{} missing: `run` measures the quick suite at startup (gpu.startup_bench)", path.display()),
            );
        }
        return Check::fail(
            "bench",
            format!("{} missing and gpu.startup_bench = \"off\": the manifest has no scores", path.display()),
            fix,
        );
    };
    let age_h = crate::clock::now_ms().saturating_sub(report.measured_at_ms) as f64 / 3.6e6;
    let mut stale = Vec::new();
    if !report.matches(manifest) {
        stale.push("measured by another version or on other hardware");
    }
    if let Some((kind, mode)) = serving
        && !report.covers(kind, mode)
    {
        stale.push("does not cover the serving backend");
    }
    if stale.is_empty() {
        Check::pass("bench", format!("{} fresh ({age_h:.1} h old)", path.display()))
    } else if config.gpu.startup_bench {
        Check::pass("bench", format!("{} stale ({}): `run` measures again at startup", path.display(), stale.join(", ")))
    } else {
        Check::fail("bench", format!("{} stale: {}", path.display(), stale.join(", ")), fix)
    }
}

/// The API address must be free, or held by a running ao-gpu-worker.
pub(super) async fn api_port(config: &Config, source: &str) -> Check {
    let addr = config.api.listen;
    match std::net::TcpListener::bind(addr) {
        Ok(l) => {
            drop(l);
            Check::pass("api.listen", format!("{addr} is free"))
        }
        Err(e) => {
            // A worker already running there is what `doctor` beside a live service sees.
            let url = format!("http://{addr}");
            let client = crate::net::HttpClient::new(crate::net::Unit::Messenger, &url, quick_policy());
            if let Ok(a) = client.json::<serde_json::Value>(reqwest::Method::GET, "/", None).await
                && a.get("address").is_some()
                && a.get("timestamp").is_some()
            {
                return Check::pass(
                    "api.listen",
                    format!("{addr} is served by a running worker ({})", a["address"].as_str().unwrap_or("?")),
                );
            }
            Check::fail(
                "api.listen",
                format!("cannot listen on {addr}: {e}"),
                format!(
                    "ss -ltnp 'sport = :{}' shows who holds it; stop it or set [api] listen = \"127.0.0.1:<free port>\" in {source}",
                    addr.port()
                ),
            )
        }
    }
}

/// One quick attempt: doctor reports, it does not wait out outages.
pub(super) fn quick_policy() -> crate::net::Policy {
    crate::net::Policy {
        request_timeout: std::time::Duration::from_secs(5),
        connect_timeout: std::time::Duration::from_secs(3),
        max_attempts: 1,
        ..crate::net::Policy::default()
    }
}
