//! Prometheus metrics. Each subsystem registers its own; label values are fixed strings
//! from this crate, never free text from the network or a guest.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

type Result1 = [(&'static str, &'static str); 1];

/// The worker's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    /// Capacity advertisements by result (`ok`, `error`).
    pub advertisements: Family<Result1, Counter>,
    /// Unix time of the last advertisement the messenger accepted.
    pub last_advertisement_seconds: Gauge,
    /// 1 once the worker is registered (ready), else 0.
    pub ready: Gauge,
    /// The work loop's own metrics.
    pub jobs: crate::jobs::JobMetrics,
}

impl Metrics {
    pub fn new(
        address: &str,
        backends: &str,
        tensor: &crate::runtime::TensorBackendInfo,
        constants: Option<&crate::runtime::ConstantMetrics>,
        devices: Option<&crate::gpu::pool::DeviceMetrics>,
    ) -> Arc<Self> {
        let mut registry = Registry::with_prefix("ao_worker");
        let info = Info::new(vec![
            ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
            ("address".to_owned(), address.to_owned()),
            ("backends".to_owned(), backends.to_owned()),
        ]);
        registry.register("build", "Worker version, address and detected backends", info);
        let tensor_info = Info::new(vec![
            ("kind".to_owned(), tensor.kind.as_str().to_owned()),
            ("description".to_owned(), tensor.description.clone()),
            ("determinism".to_owned(), tensor.determinism.as_str().to_owned()),
        ]);
        registry.register("tensor_backend", "The tensor backend serving ao_gpu calls (chosen from gpu.backends)", tensor_info);
        // One series per device of the pool: which device each pool index is.
        let device_info = Family::<Vec<(String, String)>, Gauge>::default();
        for d in &tensor.devices {
            device_info
                .get_or_create(&vec![
                    ("device".to_owned(), d.index.to_string()),
                    ("kind".to_owned(), d.kind.as_str().to_owned()),
                    ("ordinal".to_owned(), d.ordinal.to_string()),
                    ("description".to_owned(), d.description.clone()),
                ])
                .set(1);
        }
        registry.register("tensor_device", "The devices ao_gpu evaluations are placed on (value 1), by pool index", device_info);
        if let Some(d) = devices {
            registry.register("tensor_device_in_flight", "Evaluations running on the device", d.in_flight.clone());
            registry.register("tensor_device_evaluations", "Evaluations finished on the device", d.evaluations.clone());
            registry.register(
                "tensor_device_live_bytes",
                "Bytes of live tensors on the device (evaluations' and cached constants') when its last evaluation ended",
                d.live_bytes.clone(),
            );
        }
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
        if let Some(c) = constants {
            registry.register("gpu_constant_hits", "ao_gpu.constant calls served from the constant cache", c.hits.clone());
            registry.register("gpu_constant_misses", "ao_gpu.constant calls that fetched the item from the gateway", c.misses.clone());
            registry.register("gpu_constant_evictions", "Constants evicted to stay under gpu.max_constant_memory", c.evictions.clone());
            registry.register("gpu_constant_bytes", "Bytes of constants resident on the tensor devices", c.bytes.clone());
            registry.register(
                "gpu_constant_entries",
                "Constants resident on the tensor devices (one per device holding it)",
                c.entries.clone(),
            );
        }
        let jobs = crate::jobs::JobMetrics::register(&mut registry);
        Arc::new(Self { registry, advertisements, last_advertisement_seconds, ready, jobs })
    }

    /// OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
