//! Configuration: TOML (the embedded default is `config/worker.toml`) plus a few documented
//! environment overrides, validated into types that cannot be invalid.
//!
//! Validation reports every problem at once as `section.key: message`, so an operator fixes a
//! file in one pass instead of one restart per mistake.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod actor_limits;
mod overload;
mod retention;
pub use actor_limits::ActorLimits;
pub use overload::{OverloadSection, RecoveryConfig};
pub use retention::RetentionSection;

/// The reference configuration, also the default when no file is given.
pub const DEFAULT_TOML: &str = include_str!("../config/worker.toml");

/// Environment variables that override the file. Nothing else is read from the environment.
pub const ENV_CONFIG: &str = "AO_WORKER_CONFIG";
pub const ENV_DATA_DIR: &str = "AO_WORKER_DATA_DIR";
pub const ENV_KEY_FILE: &str = "AO_WORKER_KEY_FILE";
pub const ENV_REGISTRY: &str = "AO_WORKER_REGISTRY";
pub const ENV_LOG: &str = "AO_WORKER_LOG";
/// Set by systemd's `CacheDirectory=`: where the unit lets the worker keep caches.
pub const ENV_CACHE_DIR: &str = "CACHE_DIRECTORY";

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub worker: WorkerSection,
    pub network: NetworkSection,
    pub registry: RegistrySection,
    pub jobs: JobsSection,
    pub limits: LimitsSection,
    pub attestation: AttestationSection,
    pub api: ApiSection,
    pub log: LogSection,
    pub gpu: GpuSection,
    pub aos: AosSection,
    pub overload: OverloadSection,
    /// `[retention]`: what the journal keeps, and how often it is compacted.
    pub retention: RetentionSection,
    /// `[models]`: models `wasi_ephemeral_nn`'s `load_by_name` serves, by name.
    pub models: crate::runtime::ModelRegistry,
    pub testing: TestingSection,
}

/// Switches for tests only.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TestingSection {
    /// An injected fault (`runtime::fault`): refused in release builds.
    pub fault: Option<crate::runtime::fault::Fault>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSection {
    pub data_dir: PathBuf,
    /// Absolute, or resolved against `data_dir`.
    pub key_file: PathBuf,
    /// Compiled modules (`<cache_dir>/modules`); `data_dir` when not configured.
    pub cache_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetworkSection {
    pub scheduler_url: String,
    pub messenger_url: String,
    pub gateway_url: String,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_attempts: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RegistrySection {
    /// Empty when not configured.
    pub process: Option<String>,
    pub advertise_interval: Duration,
    pub authorities: Vec<String>,
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobsSection {
    pub processes: Vec<String>,
    pub max_concurrent: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LimitsSection {
    pub max_memory: u64,
    pub max_compute: u64,
    pub deadline: Duration,
    /// Result, outbox, module and compilation limits.
    pub actor: ActorLimits,
}

/// How aos (emscripten Lua) processes are kept between messages.
#[derive(Debug, Clone, PartialEq)]
pub struct AosSection {
    /// A memory image is journaled every this many messages of a process; the ones between are
    /// replayed from it after a restart or an eviction.
    pub checkpoint_every: u64,
    /// Processes that keep a live instance (memory + rollback base) between messages.
    pub live_processes: usize,
    /// Messages between two moves of a live process's rollback base (one memory copy).
    pub rebase_every: usize,
    /// Spectre hardening of memory64 (wasm64) modules' bounds checks.
    pub heap_spectre_mitigation: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttestationSection {
    /// `None`: the registry process.
    pub target: Option<String>,
}

/// The tensor backend behind the `ao_gpu` host calls.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSection {
    /// Tried in order; the first that starts serves every evaluation. Never empty.
    pub backends: Vec<crate::gpu::BackendKind>,
    /// Which devices of the chosen backend serve evaluations (a list is never empty).
    pub devices: crate::gpu::pool::DeviceSelection,
    pub determinism: crate::gpu::Determinism,
    /// Cap on the bytes of live tensors per evaluation.
    pub max_device_memory: u64,
    /// Cap on the bytes of constants (`ao_gpu.constant`) cached on the device across evaluations.
    pub max_constant_memory: u64,
    /// Whether `run` measures the serving backend (the quick `bench`) at startup when
    /// `bench.json` does not match this machine, version and backend.
    pub startup_bench: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiSection {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogSection {
    pub level: String,
    pub format: LogFormat,
}

/// One problem in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// `section.key`, or `section` / `<file>` for problems above key level.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub issues: Vec<Issue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration {} ({} problem{}):",
            self.source_name,
            self.issues.len(),
            if self.issues.len() == 1 { "" } else { "s" }
        )?;
        for issue in &self.issues {
            writeln!(f, "  {issue}")?;
        }
        Ok(())
    }
}

/// Where a configuration came from, and its text.
pub struct Source {
    pub name: String,
    pub text: String,
}

impl Source {
    /// The file named by `path`, else `$AO_WORKER_CONFIG`, else the embedded default.
    pub fn locate(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = path.map(Path::to_owned).or_else(|| std::env::var_os(ENV_CONFIG).map(PathBuf::from));
        match path {
            None => Ok(Self { name: "(embedded default config/worker.toml)".into(), text: DEFAULT_TOML.into() }),
            Some(p) => {
                let name = p.display().to_string();
                match std::fs::read_to_string(&p) {
                    Ok(text) => Ok(Self { name, text }),
                    Err(e) => Err(ConfigError {
                        source_name: name,
                        issues: vec![Issue { path: "<file>".into(), message: format!("cannot read: {e}") }],
                    }),
                }
            }
        }
    }
}

/// Environment overrides, gathered once so tests can pass their own.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<String>,
    pub key_file: Option<String>,
    pub registry: Option<String>,
    pub cache_dir: Option<String>,
}

impl Overrides {
    pub fn from_env() -> Self {
        let get = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        Self { data_dir: get(ENV_DATA_DIR), key_file: get(ENV_KEY_FILE), registry: get(ENV_REGISTRY), cache_dir: get(ENV_CACHE_DIR) }
    }
}

impl Config {
    /// Loads the configuration: file or embedded default, environment overrides, validation.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let source = Source::locate(path)?;
        Self::parse(&source.name, &source.text, &Overrides::from_env())
    }

    /// Parses and validates TOML text, reporting every problem at once.
    pub fn parse(source_name: &str, text: &str, overrides: &Overrides) -> Result<Self, ConfigError> {
        let fail = |issues| ConfigError { source_name: source_name.into(), issues };
        let mut root: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                let message = e.message().to_owned();
                let at = e.span().map(|s| line_of(text, s.start)).map(|l| format!(" (line {l})")).unwrap_or_default();
                return Err(fail(vec![Issue { path: "<file>".into(), message: format!("not valid TOML{at}: {message}") }]));
            }
        };
        let mut v = Validator::default();

        let mut s = v.section(&mut root, "worker");
        let data_dir = v.string(&mut s, "worker", "data_dir", "/var/lib/ao-gpu-worker", overrides.data_dir.as_deref());
        let key_file = v.string(&mut s, "worker", "key_file", "worker.key", overrides.key_file.as_deref());
        let cache_dir = v.string(&mut s, "worker", "cache_dir", "", overrides.cache_dir.as_deref());
        v.unknown(s, "worker");
        if data_dir.is_empty() {
            v.issue("worker.data_dir", "must not be empty");
        }
        if key_file.is_empty() {
            v.issue("worker.key_file", "must not be empty");
        }
        let data_dir = PathBuf::from(data_dir);
        let key_file = data_dir.join(key_file);
        let cache_dir = if cache_dir.is_empty() { data_dir.clone() } else { data_dir.join(cache_dir) };

        let mut s = v.section(&mut root, "network");
        let scheduler_url = v.url(&mut s, "network", "scheduler_url", "http://127.0.0.1:8700");
        let messenger_url = v.url(&mut s, "network", "messenger_url", "http://127.0.0.1:8701");
        let gateway_url = v.url(&mut s, "network", "gateway_url", "http://127.0.0.1:8702");
        let request_timeout = v.duration(&mut s, "network", "request_timeout", "30s");
        let connect_timeout = v.duration(&mut s, "network", "connect_timeout", "5s");
        let max_attempts = v.integer(&mut s, "network", "max_attempts", 5, 1, 20) as u32;
        let backoff_min = v.duration(&mut s, "network", "backoff_min", "200ms");
        let backoff_max = v.duration(&mut s, "network", "backoff_max", "10s");
        v.unknown(s, "network");
        for (key, d) in [("request_timeout", request_timeout), ("connect_timeout", connect_timeout), ("backoff_max", backoff_max)] {
            if d.is_zero() {
                v.issue(&format!("network.{key}"), "must be greater than 0");
            }
        }
        if connect_timeout > request_timeout {
            v.issue("network.connect_timeout", format!("{connect_timeout:?} is longer than network.request_timeout ({request_timeout:?})"));
        }
        if backoff_min > backoff_max {
            v.issue("network.backoff_min", format!("{backoff_min:?} is longer than network.backoff_max ({backoff_max:?})"));
        }

        let mut s = v.section(&mut root, "registry");
        let process = v.string(&mut s, "registry", "process", "", overrides.registry.as_deref());
        let advertise_interval = v.duration(&mut s, "registry", "advertise_interval", "5m");
        let authorities = v.ids(&mut s, "registry", "authorities");
        let poll_interval = v.duration(&mut s, "registry", "poll_interval", "1s");
        v.unknown(s, "registry");
        if poll_interval.is_zero() {
            v.issue("registry.poll_interval", "must be greater than 0");
        }
        if !process.is_empty() && !crate::protocol::b64::is_id(&process) {
            v.issue("registry.process", format!("{process:?} is not a 43-character base64url process id"));
        }
        if advertise_interval < Duration::from_secs(1) {
            v.issue("registry.advertise_interval", "must be at least 1s");
        }

        let mut s = v.section(&mut root, "jobs");
        let processes = v.ids(&mut s, "jobs", "processes");
        let max_concurrent = v.integer(&mut s, "jobs", "max_concurrent", 4, 1, 1024) as usize;
        v.unknown(s, "jobs");

        let mut s = v.section(&mut root, "limits");
        let max_memory_text = v.string(&mut s, "limits", "max_memory", "1-gb", None);
        let max_compute = v.integer(&mut s, "limits", "max_compute", 9_000_000_000_000, 1, i64::MAX) as u64;
        let deadline = v.duration(&mut s, "limits", "deadline", "60s");
        let actor = actor_limits::parse(&mut v, &mut s);
        v.unknown(s, "limits");
        let max_memory = crate::runtime::limits::parse_memory_limit(&max_memory_text).unwrap_or_else(|| {
            v.issue("limits.max_memory", format!("{max_memory_text:?} is not a size such as 512-mb or 1-gb"));
            1 << 30
        });
        if max_memory > 4 << 30 {
            v.issue("limits.max_memory", format!("{max_memory_text} is more than the 4 GiB a wasm32 memory can hold"));
        }
        if deadline.is_zero() {
            v.issue("limits.deadline", "must be greater than 0");
        }

        let mut s = v.section(&mut root, "aos");
        let checkpoint_every = v.integer(&mut s, "aos", "checkpoint_every", 32, 1, 1_000_000) as u64;
        let live_processes = v.integer(&mut s, "aos", "live_processes", 4, 1, 4096) as usize;
        let rebase_every = v.integer(&mut s, "aos", "rebase_every", 256, 1, 1_000_000) as usize;
        let heap_spectre_mitigation = v.boolean(&mut s, "aos", "heap_spectre_mitigation", true);
        v.unknown(s, "aos");

        // [models] NAME = { path = "...", sha256 = "..." }: relative paths under data_dir.
        let mut models = crate::runtime::ModelRegistry::default();
        for (name, value) in v.section(&mut root, "models") {
            let at = format!("models.{name}");
            let entry = value.as_table().and_then(|t| {
                let path = t.get("path")?.as_str()?;
                let sha256 = t.get("sha256")?.as_str()?;
                let processes = match t.get("processes") {
                    None => None,
                    Some(list) => Some(list.as_array()?.iter().map(|p| p.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>()?),
                };
                let known = t.keys().all(|k| matches!(k.as_str(), "path" | "sha256" | "processes"));
                known.then(|| (path.to_owned(), sha256.to_ascii_lowercase(), processes))
            });
            match entry {
                Some((path, sha256, processes)) if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()) && !path.is_empty() => {
                    models.models.insert(name, crate::runtime::ModelEntry { path: data_dir.join(path), sha256, processes });
                }
                _ => v.issue(&at, "must be a table { path = \"FILE.gguf\", sha256 = \"<64 hex digits>\", processes = [\"<process id>\", ...] (optional) }"),
            }
        }

        let mut s = v.section(&mut root, "attestation");
        let target = v.string(&mut s, "attestation", "target", "", None);
        v.unknown(s, "attestation");
        if !target.is_empty() && !crate::protocol::b64::is_id(&target) {
            v.issue("attestation.target", format!("{target:?} is not a 43-character base64url process id"));
        }

        let mut s = v.section(&mut root, "api");
        let listen = v.string(&mut s, "api", "listen", "127.0.0.1:8703", None);
        v.unknown(s, "api");
        let listen = match listen.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                v.issue("api.listen", format!("{listen:?} is not an address:port such as 127.0.0.1:8703"));
                SocketAddr::from(([127, 0, 0, 1], 8703))
            }
        };

        let mut s = v.section(&mut root, "log");
        let level = v.string(&mut s, "log", "level", "info", None);
        let format = v.string(&mut s, "log", "format", "text", None);
        v.unknown(s, "log");
        if !matches!(level.as_str(), "error" | "warn" | "info" | "debug" | "trace") {
            v.issue("log.level", format!("{level:?} is not one of error, warn, info, debug, trace"));
        }
        let format = match format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                v.issue("log.format", format!("{other:?} is not one of text, json"));
                LogFormat::Text
            }
        };

        let mut s = v.section(&mut root, "gpu");
        let backends = v.backends(&mut s, "gpu", "backends", &["cuda", "wgpu", "cpu"]);
        let devices = v.devices(&mut s, "gpu", "devices");
        let determinism_text = v.string(&mut s, "gpu", "determinism", "reproducible", None);
        let max_device_memory_text = v.string(&mut s, "gpu", "max_device_memory", "256-mb", None);
        let max_constant_memory_text = v.string(&mut s, "gpu", "max_constant_memory", "1-gb", None);
        let startup_bench_text = v.string(&mut s, "gpu", "startup_bench", "when-stale", None);
        v.unknown(s, "gpu");
        let startup_bench = match startup_bench_text.as_str() {
            "when-stale" => true,
            "off" => false,
            other => {
                v.issue("gpu.startup_bench", format!("{other:?} is not one of when-stale, off"));
                true
            }
        };
        let determinism = crate::gpu::Determinism::parse(&determinism_text).unwrap_or_else(|| {
            v.issue("gpu.determinism", format!("{determinism_text:?} is not one of reproducible, fast"));
            crate::gpu::Determinism::Reproducible
        });
        let max_device_memory = match crate::runtime::limits::parse_memory_limit(&max_device_memory_text) {
            Some(0) => {
                v.issue("gpu.max_device_memory", "must be greater than 0");
                256 << 20
            }
            Some(n) => n,
            None => {
                v.issue("gpu.max_device_memory", format!("{max_device_memory_text:?} is not a size such as 256-mb or 1-gb"));
                256 << 20
            }
        };
        let max_constant_memory = match crate::runtime::limits::parse_memory_limit(&max_constant_memory_text) {
            Some(0) => {
                v.issue("gpu.max_constant_memory", "must be greater than 0");
                crate::runtime::DEFAULT_MAX_CONSTANT_MEMORY
            }
            Some(n) => n,
            None => {
                v.issue("gpu.max_constant_memory", format!("{max_constant_memory_text:?} is not a size such as 512-mb or 2-gb"));
                crate::runtime::DEFAULT_MAX_CONSTANT_MEMORY
            }
        };

        let overload = overload::parse(&mut v, &mut root);
        let retention = retention::parse(&mut v, &mut root);

        let mut s = v.section(&mut root, "testing");
        let fault_text = v.string(&mut s, "testing", "fault", "", None);
        v.unknown(s, "testing");
        let fault = match fault_text.as_str() {
            "" => None,
            _ if !cfg!(debug_assertions) => {
                v.issue("testing.fault", "fault injection exists only in test and debug builds; remove it");
                None
            }
            text => text.parse().map_err(|e| v.issue("testing.fault", format!("{text:?}: {e}"))).ok(),
        };

        for (name, _) in root {
            v.issue(
                &name,
                "unknown section (known: worker, network, registry, jobs, limits, aos, attestation, api, log, gpu, overload, retention, models, testing)",
            );
        }
        if !v.issues.is_empty() {
            return Err(fail(v.issues));
        }
        Ok(Config {
            worker: WorkerSection { data_dir, key_file, cache_dir },
            network: NetworkSection {
                scheduler_url,
                messenger_url,
                gateway_url,
                request_timeout,
                connect_timeout,
                max_attempts,
                backoff_min,
                backoff_max,
            },
            registry: RegistrySection { process: Some(process).filter(|p| !p.is_empty()), advertise_interval, authorities, poll_interval },
            jobs: JobsSection { processes, max_concurrent },
            limits: LimitsSection { max_memory, max_compute, deadline, actor },
            attestation: AttestationSection { target: Some(target).filter(|t| !t.is_empty()) },
            api: ApiSection { listen },
            log: LogSection { level, format },
            gpu: GpuSection { backends, devices, determinism, max_device_memory, max_constant_memory, startup_bench },
            aos: AosSection { checkpoint_every, live_processes, rebase_every, heap_spectre_mitigation },
            overload,
            retention,
            models,
            testing: TestingSection { fault },
        })
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parses durations such as `250ms`, `30s`, `5m`, `2h`, `1d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration such as 500ms, 30s, 5m, 1h"))?;
    let ms = match unit.trim() {
        "ms" => n,
        "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        other => return Err(format!("unknown unit {other:?} in {text:?} (use ms, s, m, h or d)")),
    };
    Ok(Duration::from_millis(ms))
}

/// Pulls typed values out of TOML tables, recording every problem instead of stopping.
#[derive(Default)]
struct Validator {
    issues: Vec<Issue>,
}

impl Validator {
    fn issue(&mut self, path: &str, message: impl Into<String>) {
        self.issues.push(Issue { path: path.into(), message: message.into() });
    }

    fn section(&mut self, root: &mut toml::Table, name: &str) -> BTreeMap<String, toml::Value> {
        match root.remove(name) {
            None => BTreeMap::new(),
            Some(toml::Value::Table(t)) => t.into_iter().collect(),
            Some(other) => {
                self.issue(name, format!("must be a table ([{name}]), found {}", other.type_str()));
                BTreeMap::new()
            }
        }
    }

    fn unknown(&mut self, rest: BTreeMap<String, toml::Value>, section: &str) {
        for key in rest.keys() {
            self.issue(&format!("{section}.{key}"), "unknown key");
        }
    }

    fn string(&mut self, s: &mut BTreeMap<String, toml::Value>, section: &str, key: &str, default: &str, env: Option<&str>) -> String {
        let from_file = match s.remove(key) {
            None => default.to_owned(),
            Some(toml::Value::String(v)) => v,
            Some(other) => {
                self.issue(&format!("{section}.{key}"), format!("expected a string, found {}", other.type_str()));
                default.to_owned()
            }
        };
        env.map(str::to_owned).unwrap_or(from_file)
    }

    /// A list of 43-character ids (process ids or addresses).
    fn ids(&mut self, s: &mut BTreeMap<String, toml::Value>, section: &str, key: &str) -> Vec<String> {
        let path = format!("{section}.{key}");
        match s.remove(key) {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        toml::Value::String(id) if crate::protocol::b64::is_id(&id) => out.push(id),
                        toml::Value::String(id) => {
                            self.issue(&format!("{path}[{i}]"), format!("{id:?} is not a 43-character base64url id"))
                        }
                        other => self.issue(&format!("{path}[{i}]"), format!("expected a string, found {}", other.type_str())),
                    }
                }
                out
            }
            Some(other) => {
                self.issue(&path, format!("expected an array of ids, found {}", other.type_str()));
                Vec::new()
            }
        }
    }

    /// A non-empty list of backend names (cuda, wgpu, cpu), each at most once.
    fn backends(
        &mut self,
        s: &mut BTreeMap<String, toml::Value>,
        section: &str,
        key: &str,
        default: &[&str],
    ) -> Vec<crate::gpu::BackendKind> {
        use crate::gpu::BackendKind;
        let path = format!("{section}.{key}");
        let fallback = || default.iter().filter_map(|n| BackendKind::parse(n)).collect::<Vec<_>>();
        let items = match s.remove(key) {
            None => return fallback(),
            Some(toml::Value::Array(items)) => items,
            Some(other) => {
                self.issue(&path, format!("expected an array of backend names, found {}", other.type_str()));
                return fallback();
            }
        };
        if items.is_empty() {
            self.issue(&path, "must name at least one backend (cuda, wgpu, cpu)");
            return fallback();
        }
        let mut out = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            match item {
                toml::Value::String(name) => match BackendKind::parse(&name) {
                    Some(kind) if out.contains(&kind) => self.issue(&format!("{path}[{i}]"), format!("{name:?} is listed twice")),
                    Some(kind) => out.push(kind),
                    None => self.issue(&format!("{path}[{i}]"), format!("{name:?} is not one of cuda, wgpu, cpu")),
                },
                other => self.issue(&format!("{path}[{i}]"), format!("expected a string, found {}", other.type_str())),
            }
        }
        if out.is_empty() { fallback() } else { out }
    }

    /// `"all"` (the default), or a non-empty list of device indices (0..=1023) and names, each
    /// at most once.
    fn devices(&mut self, s: &mut BTreeMap<String, toml::Value>, section: &str, key: &str) -> crate::gpu::pool::DeviceSelection {
        use crate::gpu::pool::{DeviceRef, DeviceSelection};
        const MAX_INDEX: i64 = 1023;
        let path = format!("{section}.{key}");
        let items = match s.remove(key) {
            None => return DeviceSelection::All,
            Some(toml::Value::String(all)) if all == "all" => return DeviceSelection::All,
            Some(toml::Value::Array(items)) => items,
            Some(toml::Value::String(other)) => {
                self.issue(&path, format!("{other:?} is not \"all\"; name devices in a list, such as [0, 1] or [\"H100\"]"));
                return DeviceSelection::All;
            }
            Some(other) => {
                self.issue(&path, format!("expected \"all\" or an array of device indices and names, found {}", other.type_str()));
                return DeviceSelection::All;
            }
        };
        if items.is_empty() {
            self.issue(&path, "must name at least one device, or be \"all\"");
            return DeviceSelection::All;
        }
        let mut out: Vec<DeviceRef> = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let at = format!("{path}[{i}]");
            let entry = match item {
                toml::Value::Integer(n) if (0..=MAX_INDEX).contains(&n) => DeviceRef::Index(n as usize),
                toml::Value::Integer(n) => {
                    self.issue(&at, format!("{n} is out of range 0..={MAX_INDEX}"));
                    continue;
                }
                toml::Value::String(name) if name.trim().is_empty() => {
                    self.issue(&at, "a device name must not be empty");
                    continue;
                }
                toml::Value::String(name) if name == "all" => {
                    self.issue(&at, "\"all\" stands alone: devices = \"all\"");
                    continue;
                }
                toml::Value::String(name) => DeviceRef::Name(name),
                other => {
                    self.issue(&at, format!("expected a device index or name, found {}", other.type_str()));
                    continue;
                }
            };
            if out.contains(&entry) {
                self.issue(&at, format!("{entry} is listed twice"));
            } else {
                out.push(entry);
            }
        }
        if out.is_empty() { DeviceSelection::All } else { DeviceSelection::Only(out) }
    }

    fn url(&mut self, s: &mut BTreeMap<String, toml::Value>, section: &str, key: &str, default: &str) -> String {
        let v = self.string(s, section, key, default, None);
        match reqwest::Url::parse(&v) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => v.trim_end_matches('/').to_owned(),
            Ok(u) => {
                self.issue(
                    &format!("{section}.{key}"),
                    format!("{v:?} must be an http or https URL with a host (scheme {:?})", u.scheme()),
                );
                v
            }
            Err(e) => {
                self.issue(&format!("{section}.{key}"), format!("{v:?} is not a URL: {e}"));
                v
            }
        }
    }

    fn duration(&mut self, s: &mut BTreeMap<String, toml::Value>, section: &str, key: &str, default: &str) -> Duration {
        let v = self.string(s, section, key, default, None);
        match parse_duration(&v) {
            Ok(d) => d,
            Err(e) => {
                self.issue(&format!("{section}.{key}"), e);
                parse_duration(default).expect("defaults parse")
            }
        }
    }

    fn boolean(&mut self, s: &mut BTreeMap<String, toml::Value>, section: &str, key: &str, default: bool) -> bool {
        match s.remove(key) {
            None => default,
            Some(toml::Value::Boolean(b)) => b,
            Some(other) => {
                self.issue(&format!("{section}.{key}"), format!("expected true or false, found {}", other.type_str()));
                default
            }
        }
    }

    fn integer(&mut self, s: &mut BTreeMap<String, toml::Value>, section: &str, key: &str, default: i64, min: i64, max: i64) -> i64 {
        let v = match s.remove(key) {
            None => return default,
            Some(toml::Value::Integer(v)) => v,
            Some(other) => {
                self.issue(&format!("{section}.{key}"), format!("expected an integer, found {}", other.type_str()));
                return default;
            }
        };
        if v < min || v > max {
            self.issue(&format!("{section}.{key}"), format!("{v} is out of range {min}..={max}"));
            return default;
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse("test.toml", text, &Overrides::default())
    }

    #[test]
    fn a_test_fault_is_parsed_in_test_builds_and_checked() {
        assert_eq!(parse("").unwrap().testing.fault, None);
        let c = parse("[testing]\nfault = \"message=M,call=2\"\n").unwrap();
        let f = c.testing.fault.unwrap();
        assert_eq!((f.message.as_str(), f.at), ("M", crate::runtime::fault::FaultAt::Call(2)));
        let e = parse("[testing]\nfault = \"call=2\"\n").unwrap_err();
        assert!(e.to_string().contains("testing.fault") && e.to_string().contains("message=<id> is required"), "{e}");
    }

    #[test]
    fn embedded_default_is_valid_and_matches_documented_defaults() {
        let from_file = parse(DEFAULT_TOML).unwrap();
        let from_nothing = parse("").unwrap();
        assert_eq!(from_file, from_nothing, "config/worker.toml must document the built-in defaults");
        assert_eq!(from_file.network.max_attempts, 5);
        assert_eq!(from_file.registry.advertise_interval, Duration::from_secs(300));
        assert_eq!(from_file.worker.key_file, PathBuf::from("/var/lib/ao-gpu-worker/worker.key"));
        assert_eq!(from_file.registry.process, None);
        assert_eq!(from_file.gpu.backends, crate::gpu::DEFAULT_ORDER);
        assert_eq!(from_file.gpu.determinism, crate::gpu::Determinism::Reproducible);
        assert_eq!(from_file.gpu.max_device_memory, crate::runtime::DEFAULT_MAX_DEVICE_MEMORY);
        assert_eq!(from_file.gpu.max_constant_memory, crate::runtime::DEFAULT_MAX_CONSTANT_MEMORY);
        let aos = crate::runtime::AosSettings::default();
        assert_eq!((from_file.aos.live_processes, from_file.aos.rebase_every), (aos.live_processes, aos.rebase_every));
        assert_eq!(from_file.aos.heap_spectre_mitigation, aos.heap_spectre_mitigation);
        assert_eq!(from_file.aos.checkpoint_every, 32);
    }

    #[test]
    fn models_section() {
        let sha = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
        let c = parse(&format!("[worker]\ndata_dir = \"/d\"\n[models]\nsmollm2 = {{ path = \"m.gguf\", sha256 = \"{sha}\" }}\n")).unwrap();
        let e = &c.models.models["smollm2"];
        assert_eq!((e.path.as_path(), e.sha256.as_str(), e.processes.as_ref()), (std::path::Path::new("/d/m.gguf"), sha, None));
        let c = parse(&format!("[models]\nm = {{ path = \"m.gguf\", sha256 = \"{sha}\", processes = [\"p1\"] }}\n")).unwrap();
        assert_eq!(c.models.models["m"].processes, Some(vec!["p1".to_owned()]));
        let err = parse("[models]\nbad = { path = \"m.gguf\", sha256 = \"xyz\" }\n").unwrap_err();
        assert!(err.to_string().contains("models.bad"), "{err}");
    }

    #[test]
    fn aos_section() {
        let c = parse("[aos]\ncheckpoint_every = 8\nlive_processes = 16\nrebase_every = 64\n").unwrap();
        assert_eq!(c.aos, AosSection { checkpoint_every: 8, live_processes: 16, rebase_every: 64, heap_spectre_mitigation: true });
        assert!(!parse("[aos]\nheap_spectre_mitigation = false\n").unwrap().aos.heap_spectre_mitigation);
        let e = parse("[aos]\ncheckpoint_every = 0\nlive_processes = 0\nrebase = 3\nheap_spectre_mitigation = 1\n").unwrap_err();
        let paths: Vec<&str> = e.issues.iter().map(|i| i.path.as_str()).collect();
        assert!(
            paths.contains(&"aos.checkpoint_every")
                && paths.contains(&"aos.live_processes")
                && paths.contains(&"aos.rebase")
                && paths.contains(&"aos.heap_spectre_mitigation"),
            "{e}"
        );
    }

    #[test]
    fn gpu_section() {
        use crate::gpu::{BackendKind, Determinism};
        let c = parse(
            "[gpu]\nbackends = [\"cuda\", \"cpu\"]\ndeterminism = \"fast\"\nmax_device_memory = \"1-gb\"\nmax_constant_memory = \"3-gb\"\n",
        )
        .unwrap();
        assert_eq!(c.gpu.backends, vec![BackendKind::Cuda, BackendKind::Cpu]);
        assert_eq!(c.gpu.determinism, Determinism::Fast);
        assert_eq!(c.gpu.max_device_memory, 1 << 30);
        assert_eq!(c.gpu.max_constant_memory, 3 << 30);
        assert!(c.gpu.startup_bench);
        assert!(!parse("[gpu]\nstartup_bench = \"off\"\n").unwrap().gpu.startup_bench);
        let err = parse("[gpu]\nstartup_bench = \"sometimes\"\n").unwrap_err();
        assert_eq!(err.issues[0].path, "gpu.startup_bench", "{err}");
        let err = parse("[gpu]\nbackends = []\n").unwrap_err();
        assert_eq!(err.to_string().lines().nth(1).unwrap().trim(), "gpu.backends: must name at least one backend (cuda, wgpu, cpu)");
        let err = parse("[gpu]\nbackends = [\"cpu\", \"cpu\"]\nspeed = 1\n").unwrap_err();
        let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["gpu.backends[1]", "gpu.speed"], "{err}");
        let err = parse("[gpu]\nbackends = \"cpu\"\nmax_device_memory = \"0\"\nmax_constant_memory = \"0\"\n").unwrap_err();
        let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["gpu.backends", "gpu.max_device_memory", "gpu.max_constant_memory"], "{err}");
        let err = parse("[gpu]\nmax_constant_memory = \"much\"\n").unwrap_err();
        assert!(err.to_string().contains("gpu.max_constant_memory: \"much\" is not a size"), "{err}");
    }

    #[test]
    fn gpu_devices() {
        use crate::gpu::pool::{DeviceRef, DeviceSelection};
        assert_eq!(parse("").unwrap().gpu.devices, DeviceSelection::All);
        assert_eq!(parse("[gpu]\ndevices = \"all\"\n").unwrap().gpu.devices, DeviceSelection::All);
        let c = parse("[gpu]\ndevices = [1, 0, \"H100\"]\n").unwrap();
        assert_eq!(c.gpu.devices, DeviceSelection::Only(vec![DeviceRef::Index(1), DeviceRef::Index(0), DeviceRef::Name("H100".into())]));
        let issues = |text: &str| -> Vec<String> { parse(text).unwrap_err().issues.iter().map(ToString::to_string).collect() };
        assert_eq!(issues("[gpu]\ndevices = []\n"), ["gpu.devices: must name at least one device, or be \"all\""]);
        assert_eq!(
            issues("[gpu]\ndevices = \"first\"\n"),
            ["gpu.devices: \"first\" is not \"all\"; name devices in a list, such as [0, 1] or [\"H100\"]"]
        );
        assert_eq!(
            issues("[gpu]\ndevices = 3\n"),
            ["gpu.devices: expected \"all\" or an array of device indices and names, found integer"]
        );
        assert_eq!(
            issues("[gpu]\ndevices = [0, -1, 2048, \"\", \"all\", 1.5, 0, \"a\", \"a\"]\n"),
            [
                "gpu.devices[1]: -1 is out of range 0..=1023",
                "gpu.devices[2]: 2048 is out of range 0..=1023",
                "gpu.devices[3]: a device name must not be empty",
                "gpu.devices[4]: \"all\" stands alone: devices = \"all\"",
                "gpu.devices[5]: expected a device index or name, found float",
                "gpu.devices[6]: 0 is listed twice",
                "gpu.devices[8]: \"a\" is listed twice",
            ]
        );
    }

    #[test]
    fn reports_every_problem_at_once() {
        let text = r#"
            bogus = 1
            [worker]
            data_dir = 7
            colour = "blue"
            [network]
            scheduler_url = "ftp://x"
            messenger_url = "not a url"
            request_timeout = "3 fortnights"
            connect_timeout = "1m"
            max_attempts = 0
            backoff_max = "0ms"
            [registry]
            process = "short"
            authorities = ["nope", 3]
            [jobs]
            max_concurrent = 0
            [limits]
            max_memory = "lots"
            [attestation]
            target = "x"
            [api]
            listen = "everywhere"
            [log]
            level = "loud"
            format = "xml"
            [gpu]
            backends = ["tpu", 3]
            determinism = "sloppy"
            max_device_memory = "heaps"
        "#;
        let err = parse(text).unwrap_err();
        let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
        for expected in [
            "worker.data_dir",
            "worker.colour",
            "network.scheduler_url",
            "network.messenger_url",
            "network.request_timeout",
            "network.connect_timeout",
            "network.max_attempts",
            "network.backoff_max",
            "registry.process",
            "registry.authorities[0]",
            "registry.authorities[1]",
            "jobs.max_concurrent",
            "limits.max_memory",
            "attestation.target",
            "api.listen",
            "log.level",
            "log.format",
            "gpu.backends[0]",
            "gpu.backends[1]",
            "gpu.determinism",
            "gpu.max_device_memory",
            "bogus",
        ] {
            assert!(paths.contains(&expected), "missing {expected} in {err}");
        }
        let text = err.to_string();
        assert!(text.contains("worker.colour: unknown key"), "{text}");
        assert!(text.contains("network.max_attempts: 0 is out of range 1..=20"), "{text}");
    }

    #[test]
    fn toml_syntax_error_names_the_line() {
        let err = parse("[worker]\ndata_dir = \n").unwrap_err();
        assert_eq!(err.issues.len(), 1);
        assert!(err.issues[0].message.contains("line 2"), "{}", err.issues[0]);
    }

    #[test]
    fn env_overrides_win() {
        let o = Overrides {
            data_dir: Some("/tmp/x".into()),
            key_file: Some("/etc/k.json".into()),
            registry: Some("A".repeat(43)),
            cache_dir: Some("/var/cache/w".into()),
        };
        let c = Config::parse("t", "[worker]\ndata_dir = \"/srv\"\ncache_dir = \"c\"\n", &o).unwrap();
        assert_eq!(c.worker.cache_dir, PathBuf::from("/var/cache/w"), "$CACHE_DIRECTORY (systemd's CacheDirectory=) wins");
        assert_eq!(c.worker.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.worker.key_file, PathBuf::from("/etc/k.json"), "absolute key_file is kept");
        assert_eq!(c.registry.process.as_deref(), Some("A".repeat(43).as_str()));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
