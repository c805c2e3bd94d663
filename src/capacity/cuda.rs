//! CUDA probe through the driver API, which cudarc loads at run time: reports "no CUDA driver"
//! instead of panicking on machines without libcuda.
//!
//! cudarc's `dynamic-loading` panics on the first call into a library that is not there (and on a
//! missing symbol), so this module checks for libcuda before any call, uses only the
//! `driver::result` / `driver::sys` layer (no `CudaContext`, which would create a context and
//! reserve device memory), and wraps everything in `catch_unwind` as a second line of defence.

use std::ffi::{CStr, c_char, c_int};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;

use super::{CudaDevice, CudaReport, CudaStatus};

pub fn probe() -> CudaReport {
    match std::panic::catch_unwind(probe_inner) {
        Ok(report) => report,
        Err(payload) => {
            let msg = super::panic_message(&*payload);
            tracing::warn!(panic = %msg, "cuda probe panicked");
            CudaReport::unavailable(format!("cuda probe panicked: {msg}"))
        }
    }
}

fn probe_inner() -> CudaReport {
    // SAFETY: `is_culib_present` only dlopen()s the candidate library names and closes them again;
    // loading libcuda runs its initialisers, exactly as any use of CUDA would.
    if !unsafe { sys::is_culib_present() } {
        return CudaReport::unavailable("no CUDA driver: libcuda not found");
    }

    // Valid before cuInit; still useful when init fails (e.g. a driver too old for the device).
    let driver_version = driver_version();

    if let Err(e) = result::init() {
        return CudaReport { driver_version, ..CudaReport::unavailable(format!("cuInit failed: {}", describe(e))) };
    }
    let count = match result::device::get_count() {
        Ok(n) => n,
        Err(e) => {
            return CudaReport { driver_version, ..CudaReport::unavailable(format!("cuDeviceGetCount failed: {}", describe(e))) };
        }
    };
    if count <= 0 {
        return CudaReport { driver_version, ..CudaReport::unavailable("no CUDA devices (device count is 0)") };
    }

    let mut devices = Vec::new();
    let mut failures = Vec::new();
    for ordinal in 0..count {
        match device(ordinal) {
            Ok(d) => devices.push(d),
            Err(e) => {
                tracing::warn!(ordinal, error = %e, "cuda device query failed; device not listed");
                failures.push(format!("device {ordinal}: {e}"));
            }
        }
    }
    let reason = (!failures.is_empty()).then(|| failures.join("; "));
    let status = if devices.is_empty() { CudaStatus::Unavailable } else { CudaStatus::Available };
    CudaReport { status, reason, driver_version, devices }
}

fn device(ordinal: c_int) -> Result<CudaDevice, String> {
    let dev = result::device::get(ordinal).map_err(|e| format!("cuDeviceGet: {}", describe(e)))?;
    let name = result::device::get_name(dev).map_err(|e| format!("cuDeviceGetName: {}", describe(e)))?;
    // SAFETY: `dev` was just returned by cuDeviceGet after a successful cuInit.
    let total = unsafe { result::device::total_mem(dev) }.map_err(|e| format!("cuDeviceTotalMem: {}", describe(e)))?;
    let attr = |a: sys::CUdevice_attribute| {
        // SAFETY: `dev` was just returned by cuDeviceGet after a successful cuInit.
        unsafe { result::device::get_attribute(dev, a) }.map_err(|e| format!("cuDeviceGetAttribute({a:?}): {}", describe(e)))
    };
    let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    Ok(CudaDevice {
        ordinal: ordinal as u32,
        name,
        total_memory_bytes: total as u64,
        compute_capability: format!("{major}.{minor}"),
        pci_bus_id: pci_bus_id(dev),
    })
}

/// The CUDA version the driver supports, as "major.minor" (the driver returns 1000 * major + 10 * minor).
fn driver_version() -> Option<String> {
    let mut v: c_int = 0;
    // SAFETY: libcuda is present (checked by the caller); the out-pointer is valid for the call.
    unsafe { sys::cuDriverGetVersion(&mut v) }.result().ok()?;
    (v > 0).then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
}

/// Such as "0000:01:00.0"; `None` when the driver does not say.
fn pci_bus_id(dev: sys::CUdevice) -> Option<String> {
    // The driver documents 13 bytes as enough ("dddd:bb:dd.f" plus NUL); leave room for longer domains.
    let mut buf = [0 as c_char; 64];
    // SAFETY: `dev` came from cuDeviceGet; the buffer and its length are valid and the driver
    // writes a NUL-terminated string of at most `len` bytes.
    unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as c_int, dev) }.result().ok()?;
    // SAFETY: `buf` is an initialised array of c_char, reinterpreted as bytes of the same length.
    let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), buf.len()) };
    let s = CStr::from_bytes_until_nul(bytes).ok()?.to_string_lossy().into_owned();
    (!s.is_empty()).then_some(s)
}

/// "CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected".
fn describe(e: DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{:?}: {}", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}
