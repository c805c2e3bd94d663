//! Prometheus metrics: the registry the worker's `/metrics` renders, the build info, and the
//! daemon's own advertisement and readiness gauges. Each subsystem registers its own metrics into
//! the registry (the device pool, the constant cache, the work loop); this module knows none of
//! them. Label values are fixed strings from this crate, never free text from the network or a
//! guest.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

type Result1 = [(&'static str, &'static str); 1];

/// The worker's registry (prefix `ao_worker`), starting with the build info.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// A registry holding the build info: the worker version, its address and detected backends.
    pub fn new(address: &str, backends: &str) -> Self {
        let mut registry = Registry::with_prefix("ao_worker");
        let info = Info::new(vec![
            ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
            ("address".to_owned(), address.to_owned()),
            ("backends".to_owned(), backends.to_owned()),
        ]);
        registry.register("build", "Worker version, address and detected backends", info);
        Self { registry }
    }

    /// The registry, for the subsystems to register their metrics into.
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// The same metrics in the Prometheus text format 0.0.4 (what `promtool check metrics` and
    /// clients that do not ask for OpenMetrics read): see [`openmetrics_to_text`].
    pub fn render_text(&self) -> String {
        openmetrics_to_text(&self.render())
    }
}

/// Content type of [`Metrics::render`].
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of [`Metrics::render_text`].
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites an OpenMetrics exposition (as this crate's registry writes it) in the Prometheus text
/// format: a counter family `x` becomes `x_total` (its samples already are), an info family `x`
/// becomes the gauge `x_info`, `# UNIT` and `# EOF` lines go, `_created` samples of counters go.
/// Sample lines are otherwise kept byte for byte.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    let mut counter: Option<String> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gauge" | "histogram" | "summary" => (name.to_owned(), kind),
                "gaugehistogram" => (name.to_owned(), "histogram"),
                "stateset" => (name.to_owned(), "gauge"),
                _ => (name.to_owned(), "untyped"),
            };
            counter = (kind == "counter").then(|| name.trim_end_matches("_total").to_owned());
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some(c) = &counter
            && line.strip_prefix(c.as_str()).is_some_and(|r| r.starts_with("_created"))
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The daemon's own metrics: capacity advertisements and readiness.
pub struct DaemonMetrics {
    /// Capacity advertisements by result (`ok`, `error`).
    pub advertisements: Family<Result1, Counter>,
    /// Unix time of the last advertisement the messenger accepted.
    pub last_advertisement_seconds: Gauge,
    /// 1 once the worker is registered (ready), else 0.
    pub ready: Gauge,
}

impl DaemonMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let advertisements = Family::<Result1, Counter>::default();
        registry.register("advertisements", "Capacity advertisements posted, by result", advertisements.clone());
        let last_advertisement_seconds = Gauge::default();
        registry.register(
            "last_advertisement_timestamp_seconds",
            "Unix time of the last capacity advertisement the messenger accepted",
            last_advertisement_seconds.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 when the worker is registered and serving", ready.clone());
        Self { advertisements, last_advertisement_seconds, ready }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_infos_get_their_text_format_names() {
        let mut m = Metrics::new("addr", "cpu");
        let c = Family::<Result1, Counter>::default();
        m.registry().register("things", "Things done", c.clone());
        c.get_or_create(&[("result", "ok")]).inc();
        let text = m.render_text();
        assert!(text.contains("# HELP ao_worker_build_info Worker version"), "{text}");
        assert!(text.contains("# TYPE ao_worker_build_info gauge\nao_worker_build_info{"), "{text}");
        assert!(text.contains("# TYPE ao_worker_things_total counter\nao_worker_things_total{result=\"ok\"} 1\n"), "{text}");
        assert!(!text.contains("# EOF") && !text.contains(" info\n"), "{text}");
    }
}
