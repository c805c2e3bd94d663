//! The `Module-Format` names of AO's emscripten modules (the compute unit's default allow-list) and
//! the runtime profile each one selects: pointer width, Asyncify, the stack-string size rule, the
//! clock, the environment, the heap maximum and whether the loader meters the module.

use std::fmt;
use std::str::FromStr;

use super::AosError;
use super::metering::MeterType;

/// One of the seven emscripten formats the AO compute unit accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AosFormat {
    /// `wasm32-unknown-emscripten` (E1: minified imports `a.a`…).
    Emscripten,
    /// `wasm32-unknown-emscripten2` (E2: aos 1.x).
    Emscripten2,
    /// `wasm32-unknown-emscripten3` (E3).
    Emscripten3,
    /// `wasm32-unknown-emscripten4` (E4: aos 2.0, Asyncify).
    Emscripten4,
    /// `wasm32-unknown-emscripten-metering` (E4 glue, metered by the loader with i32 gas).
    EmscriptenMetering,
    /// `wasm64-unknown-emscripten-draft_2024_02_15` (W64: memory64, Asyncify).
    Wasm64,
    /// `wasm64-unknown-emscripten-draft_2024_10_16-metering` (W64, metered with i64 gas).
    Wasm64Metering,
}

impl AosFormat {
    /// Every format, in the compute unit's allow-list order.
    pub const ALL: [AosFormat; 7] = [
        AosFormat::Emscripten,
        AosFormat::Emscripten2,
        AosFormat::Emscripten3,
        AosFormat::Emscripten4,
        AosFormat::EmscriptenMetering,
        AosFormat::Wasm64,
        AosFormat::Wasm64Metering,
    ];

    /// The `Module-Format` tag value.
    pub fn name(self) -> &'static str {
        match self {
            AosFormat::Emscripten => "wasm32-unknown-emscripten",
            AosFormat::Emscripten2 => "wasm32-unknown-emscripten2",
            AosFormat::Emscripten3 => "wasm32-unknown-emscripten3",
            AosFormat::Emscripten4 => "wasm32-unknown-emscripten4",
            AosFormat::EmscriptenMetering => "wasm32-unknown-emscripten-metering",
            AosFormat::Wasm64 => "wasm64-unknown-emscripten-draft_2024_02_15",
            AosFormat::Wasm64Metering => "wasm64-unknown-emscripten-draft_2024_10_16-metering",
        }
    }

    /// Whether this build runs the format. E3's glue is not implemented: no E3 module exists to
    /// check one against.
    pub fn is_supported(self) -> bool {
        self != AosFormat::Emscripten3
    }

    /// The runtime profile of the format (docs/aos.md of the spec, §2).
    pub fn profile(self) -> Profile {
        let glue = match self {
            AosFormat::Emscripten => Glue::E1,
            AosFormat::Emscripten2 => Glue::E2,
            AosFormat::Emscripten3 => Glue::E3,
            AosFormat::Emscripten4 | AosFormat::EmscriptenMetering => Glue::E4,
            AosFormat::Wasm64 | AosFormat::Wasm64Metering => Glue::W64,
        };
        let wasm64 = glue == Glue::W64;
        Profile {
            format: self,
            glue,
            wasm64,
            asyncify: matches!(glue, Glue::E4 | Glue::W64),
            stack_alloc: if matches!(glue, Glue::E1 | Glue::E2) { StackAllocRule::Utf16Times4 } else { StackAllocRule::Utf8 },
            date: if matches!(glue, Glue::E1 | Glue::E2) { DateMode::Zero } else { DateMode::Counter },
            default_env: matches!(glue, Glue::E1 | Glue::E2 | Glue::E3),
            heap_max: match glue {
                Glue::E1 | Glue::E2 => 524_288_000,
                Glue::E3 | Glue::E4 => 4_294_901_760,
                Glue::W64 => 17_179_869_184,
            },
            call_main: matches!(glue, Glue::E1 | Glue::E2 | Glue::E3),
            needs_metering: match self {
                AosFormat::EmscriptenMetering => Some(MeterType::I32),
                AosFormat::Wasm64Metering => Some(MeterType::I64),
                _ => None,
            },
        }
    }
}

impl fmt::Display for AosFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AosFormat {
    type Err = AosError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AosFormat::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| AosError::UnknownFormat(s.to_owned()))
    }
}

/// Which emscripten JS glue of the loader the format corresponds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Glue {
    E1,
    E2,
    E3,
    E4,
    W64,
}

/// How many bytes the glue reserves on the wasm stack for a string argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackAllocRule {
    /// `4 * UTF-16 length + 1` (`stackAlloc`, E1/E2).
    Utf16Times4,
    /// `UTF-8 length + 1` (`_emscripten_stack_alloc`, E3/E4/W64).
    Utf8,
}

/// What the wasm sees as `Date.now()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateMode {
    /// Always 0 (E1/E2 glue).
    Zero,
    /// A per-instance counter starting at 10004 ms, +1 per call (E3/E4/W64 glue).
    Counter,
}

/// Everything the host does differently per format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub format: AosFormat,
    pub glue: Glue,
    /// Pointers and sizes are i64 (memory64).
    pub wasm64: bool,
    /// `handle` is driven through Asyncify (E4/W64).
    pub asyncify: bool,
    pub stack_alloc: StackAllocRule,
    pub date: DateMode,
    /// The glue exposes the 7 default environment variables (loader 0.0.49: E1/E2/E3 only).
    pub default_env: bool,
    /// `getHeapMax()` of the glue, in bytes.
    pub heap_max: u64,
    /// The glue calls `main` at boot.
    pub call_main: bool,
    /// The loader meters the module at compile time.
    pub needs_metering: Option<MeterType>,
}

impl Profile {
    /// Bytes of a pointer in linear memory.
    pub fn ptr_size(&self) -> u64 {
        if self.wasm64 { 8 } else { 4 }
    }

    /// The stack bytes reserved for `s` (without alignment, which the allocator adds).
    pub fn stack_string_size(&self, s: &str) -> u64 {
        match self.stack_alloc {
            StackAllocRule::Utf16Times4 => 4 * s.encode_utf16().count() as u64 + 1,
            StackAllocRule::Utf8 => s.len() as u64 + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips() {
        for f in AosFormat::ALL {
            assert_eq!(f.name().parse::<AosFormat>().unwrap(), f);
            assert_eq!(f.to_string(), f.name());
        }
        assert!(matches!("wasm32-unknown-ao-gpu-worker".parse::<AosFormat>(), Err(AosError::UnknownFormat(_))));
    }

    #[test]
    fn profiles_follow_the_glue() {
        let e4 = AosFormat::Emscripten4.profile();
        assert!(e4.asyncify && !e4.wasm64 && !e4.default_env && e4.date == DateMode::Counter && !e4.call_main);
        assert_eq!(e4.stack_string_size("é"), 3);
        let e2 = AosFormat::Emscripten2.profile();
        assert!(!e2.asyncify && e2.default_env && e2.call_main && e2.date == DateMode::Zero);
        assert_eq!(e2.stack_string_size("é"), 5);
        assert_eq!(e2.heap_max, 524_288_000);
        let w = AosFormat::Wasm64Metering.profile();
        assert!(w.wasm64 && w.asyncify && w.needs_metering == Some(MeterType::I64));
        assert_eq!(w.ptr_size(), 8);
    }
}
