//! wgpu probe: lists every adapter on the primary backends (Vulkan, Metal, DX12, WebGPU) with the
//! limits and features the kernels depend on. `WGPU_BACKEND` (and the other `WGPU_*` instance
//! variables) override the defaults.

use super::{WgpuAdapter, WgpuFeatures, WgpuLimits, WgpuReport};

pub(super) fn probe() -> WgpuReport {
    // wgpu reports most failures as an empty adapter list, but `Instance::new` panics when no
    // backend is compiled in and drivers can misbehave; a capacity probe must never take the worker down.
    match std::panic::catch_unwind(probe_inner) {
        Ok(report) => report,
        Err(payload) => {
            let msg = super::panic_message(&*payload);
            tracing::warn!(panic = %msg, "wgpu probe panicked");
            WgpuReport { adapters: Vec::new(), error: Some(format!("wgpu probe panicked: {msg}")) }
        }
    }
}

fn probe_inner() -> WgpuReport {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::PRIMARY;
    // Debug builds default to validation layers; a read-only probe does not need them (and they
    // are slow to load where installed). `WGPU_VALIDATION=1` etc. still turn them on via `with_env`.
    desc.flags = wgpu::InstanceFlags::empty();
    let desc = desc.with_env();
    let backends = desc.backends;
    let instance = wgpu::Instance::new(desc);
    let adapters = pollster::block_on(instance.enumerate_adapters(backends));

    let adapters: Vec<WgpuAdapter> = adapters.iter().map(describe).collect();
    let error = adapters.is_empty().then(|| format!("no wgpu adapters found on backends {backends:?}"));
    for a in &adapters {
        tracing::debug!(name = %a.name, backend = %a.backend, device_type = %a.device_type, "wgpu adapter");
    }
    WgpuReport { adapters, error }
}

fn describe(adapter: &wgpu::Adapter) -> WgpuAdapter {
    let info = adapter.get_info();
    let limits = adapter.limits();
    let features = adapter.features();
    WgpuAdapter {
        name: info.name,
        backend: info.backend.to_str().to_owned(),
        device_type: device_type_name(info.device_type).to_owned(),
        vendor_id: info.vendor,
        device_id: info.device,
        driver: info.driver,
        driver_info: info.driver_info,
        limits: WgpuLimits {
            max_buffer_size: limits.max_buffer_size,
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
        },
        features: WgpuFeatures {
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroup: features.contains(wgpu::Features::SUBGROUP),
            timestamp_query: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            shader_f64: features.contains(wgpu::Features::SHADER_F64),
        },
    }
}

fn device_type_name(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete_gpu",
        wgpu::DeviceType::IntegratedGpu => "integrated_gpu",
        wgpu::DeviceType::VirtualGpu => "virtual_gpu",
        wgpu::DeviceType::Cpu => "cpu",
        wgpu::DeviceType::Other => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set `REQUIRE_WGPU=1` where an adapter must exist (CI with lavapipe, GPU boxes); otherwise the
    /// test only prints what it found.
    #[test]
    fn probe_lists_adapters_without_panicking() {
        let started = std::time::Instant::now();
        let report = probe();
        println!("wgpu probe took {:?}: {report:#?}", started.elapsed());
        for a in &report.adapters {
            assert!(!a.name.is_empty());
            assert!(a.limits.max_compute_invocations_per_workgroup >= 1);
        }
        assert_eq!(report.adapters.is_empty(), report.error.is_some());
        if std::env::var("REQUIRE_WGPU").is_ok_and(|v| v == "1") {
            assert!(!report.adapters.is_empty(), "REQUIRE_WGPU=1 but no adapter: {:?}", report.error);
        }
    }
}
