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
