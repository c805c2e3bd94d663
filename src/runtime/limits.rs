//! Per-process resource limits: `Memory-Limit` / `Compute-Limit` tags parsed like the AO CU, and the
//! store's `ResourceLimiter` that enforces the memory limit on every grow.

use wasmtime::ResourceLimiter;

use super::RuntimeError;
use crate::protocol::Tag;

pub const MEMORY_LIMIT_TAG: &str = "Memory-Limit";
pub const COMPUTE_LIMIT_TAG: &str = "Compute-Limit";

/// Table elements one store may hold in all (about 8 bytes of host memory each). Generous for C and
/// C++ programs' function-pointer tables, small next to any sensible memory limit.
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// What one evaluation may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest linear memory, in bytes.
    pub memory_bytes: u64,
    /// Fuel for one message (roughly Wasm instructions).
    pub compute: u64,
}

/// The limits for a process: the module's tags, overridden by the process's (which may not ask for
/// more than the module's), capped by the worker's maxima. A missing tag means the maximum allowed.
pub(super) fn resolve(module_tags: &[Tag], process_tags: &[Tag], max: Limits) -> Result<Limits, RuntimeError> {
    let memory_bytes = resolve_one(MEMORY_LIMIT_TAG, parse_memory_limit, module_tags, process_tags, max.memory_bytes)?;
    let compute = resolve_one(COMPUTE_LIMIT_TAG, parse_compute_limit, module_tags, process_tags, max.compute)?;
    Ok(Limits { memory_bytes, compute })
}

fn resolve_one(
    tag: &'static str,
    parse: fn(&str) -> Option<u64>,
    module_tags: &[Tag],
    process_tags: &[Tag],
    worker_max: u64,
) -> Result<u64, RuntimeError> {
    let parsed = |tags: &[Tag]| -> Result<Option<u64>, RuntimeError> {
        match first_tag(tags, tag) {
            None => Ok(None),
            Some(value) => match parse(value) {
                Some(v) if v > 0 => Ok(Some(v)),
                _ => Err(RuntimeError::BadLimit { tag, value: value.to_owned() }),
            },
        }
    };
    let module = parsed(module_tags)?;
    if let Some(asked) = module
        && asked > worker_max
    {
        return Err(RuntimeError::LimitTooLarge { what: tag, asked, max: worker_max, bound: "the worker's maximum" });
    }
    let module_max = module.unwrap_or(worker_max);
    match parsed(process_tags)? {
        Some(asked) if asked > module_max => {
            let bound = if module.is_some() { "the module's limit" } else { "the worker's maximum" };
            Err(RuntimeError::LimitTooLarge { what: tag, asked, max: module_max, bound })
        }
        Some(asked) => Ok(asked),
        None => Ok(module_max),
    }
}

/// The first tag of that name, as the AO CU reads tags.
pub(super) fn first_tag<'t>(tags: &'t [Tag], name: &str) -> Option<&'t str> {
    tags.iter().find(|t| t.name == name).map(|t| t.value.as_str())
}

/// `16-mb`, `16mb`, `1-GB`, `512-kb`, `65536-b` or a plain byte count; 1 kb = 1024 b. `None` when it
/// is not that shape or does not fit in 64 bits.
pub fn parse_memory_limit(value: &str) -> Option<u64> {
    let s = value.trim().to_ascii_lowercase();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, rest) = s.split_at(digits_end);
    if number.is_empty() {
        return None;
    }
    let unit = rest.strip_prefix('-').unwrap_or(rest);
    let shift = match unit {
        "" if rest.is_empty() => 0,
        "b" => 0,
        "kb" => 10,
        "mb" => 20,
        "gb" => 30,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// A decimal integer.
pub fn parse_compute_limit(value: &str) -> Option<u64> {
    let s = value.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The store's limiter: one memory of at most `memory_bytes`, a bounded table, one instance. It
/// remembers a refused memory grow so that a trap which follows (a guest that ignores the -1) is
/// reported as out of memory rather than as the trap it caused.
#[derive(Debug)]
pub(super) struct StoreLimiter {
    memory_bytes: u64,
    pub(super) memory_refused: bool,
}

impl StoreLimiter {
    pub(super) fn new(memory_bytes: u64) -> Self {
        Self { memory_bytes, memory_refused: false }
    }
}

impl ResourceLimiter for StoreLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let within_module_max = maximum.is_none_or(|m| desired <= m);
        let allowed = (desired as u64) <= self.memory_bytes;
        // Growth past the module's own declared maximum fails by itself and is the module's doing,
        // not the limit's.
        if !allowed && within_module_max {
            self.memory_refused = true;
        }
        Ok(allowed)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        1
    }

    fn memories(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        16
    }
}
