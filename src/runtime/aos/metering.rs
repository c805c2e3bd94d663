//! Gas metering of the `…-metering` aos module formats (docs/aos.md §7), in two variants:
//!
//! ```text
//! meter(wasm: &[u8], ty: MeterType) -> Result<Vec<u8>, MeterError>         // faithful: byte-identical to the reference
//! meter_inline(wasm: &[u8], ty: MeterType) -> Result<Vec<u8>, MeterError>  // fast: same charges, no host call per segment
//! ```
//!
//! [`meter`] reproduces what AO's loader runs for `wasm32-unknown-emscripten-metering`
//! ([`MeterType::I32`]) and `wasm64-unknown-emscripten-draft_2024_10_16-metering`
//! ([`MeterType::I64`]): npm `@permaweb/wasm-metering` 0.2.2 `meterWASM` with its default cost
//! table, reimplemented from the spec (not translated). Its output is byte-identical to the
//! reference's for the aos fixtures:
//! - a type `(param i32|i64)` is appended to the type section (even if an equal one exists) and an
//!   import `metering.usegas` of it after all existing imports; its function index is `F`, the
//!   number of imported functions, and every function index `>= F` moves up by one (in `call`,
//!   function exports, element segments, the start function; custom sections, `name` included,
//!   are copied unchanged, so their function indices are not shifted);
//! - each body is cut into segments ending after `if loop else end br br_if br_table return
//!   memory.grow`; a segment of nonzero cost `c` (the table in `metering/code.rs`) is preceded by
//!   `<ty>.const c+91; call F` (91 = the charge's own cost);
//! - the whole module is re-encoded with shortest LEB128 integers (as the reference's JSON
//!   round-trip does); float constants, data and custom payloads are copied byte for byte; a
//!   missing type or import section is created before the first later section.
//!
//! [`meter_inline`] makes the same charges at the same points without leaving wasm: the import at
//! index `F` is `metering.out_of_gas: () -> ()` (the host traps with `out of gas!`; keeping one
//! imported function at `F` keeps the index shift of the faithful variant), and each charge is
//! `used += c; if used > limit (unsigned) { call F }` on two module-defined mutable i64 globals
//! appended after all other globals and exported as [`GAS_USED_EXPORT`] (starts at 0) and
//! [`GAS_LIMIT_EXPORT`] (starts at `u64::MAX`, i.e. no limit). The host sets the limit
//! (`Compute-Limit`), resets `used` before each call and reads `GasUsed` from it afterwards.
//! This equals the reference host (`used += amount`, then trap if `used > limit`): the amounts are
//! positive constants, so the i32 sign extension never matters, and `used` is charged before the
//! trap just as the reference adds before it throws.
//!
//! Refused, with a [`MeterError`], like the reference refuses them: modules that already import
//! `metering.usegas`, and anything beyond MVP + mutable globals + sign-extension (+ memory64, which
//! the reference passes through): bulk memory, saturating truncation (`0xFC`), SIMD, reference
//! types, multi-value, … Also refused: invalid modules (the loader's compile would fail), import
//! or custom section names that are not ASCII (the reference writes their length in UTF-16 units
//! and would emit a malformed module), and an `i32` charge that does not fit an `i32.const`.
//! Nothing here panics on input.

mod code;
mod leb;
#[cfg(test)]
mod tests;

pub use code::METERING_OVERHEAD;

use code::Charge;
use leb::{write_len, write_u32, write_u64};
use wasmparser::{BinaryReader, BinaryReaderError, Validator, WasmFeatures};

/// The type the reference passes the charge in (`meterType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeterType {
    /// `wasm32-unknown-emscripten-metering`: `usegas(i32)`.
    I32,
    /// `wasm64-unknown-emscripten-draft_2024_10_16-metering`: `usegas(i64)`.
    I64,
}

/// Import module of the metering function.
pub const METERING_MODULE: &str = "metering";
/// The reference's gas function, `metering.usegas(i32|i64)`.
pub const USEGAS_FIELD: &str = "usegas";
/// The inline variant's trap function, `metering.out_of_gas()`; the host traps with `out of gas!`.
pub const OUT_OF_GAS_FIELD: &str = "out_of_gas";
/// Export of the inline variant's gas counter (mutable i64, unsigned).
pub const GAS_USED_EXPORT: &str = "__ao_gas_used";
/// Export of the inline variant's gas limit (mutable i64, unsigned; trap when used > limit).
pub const GAS_LIMIT_EXPORT: &str = "__ao_gas_limit";

/// Why a module cannot be metered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MeterError {
    #[error(
        "importing metering function is not allowed: the module already imports `metering.usegas` (a pre-metered binary: run it with the host `usegas`, do not meter it again)"
    )]
    AlreadyMetered,
    #[error(
        "the module is not valid WebAssembly with the features ao metering accepts (MVP, mutable globals, sign-extension, memory64): {0}; rebuild it without bulk memory, saturating float-to-int, SIMD, reference types or multi-value (emcc -mno-bulk-memory -mno-nontrapping-fptoint -mno-multivalue …)"
    )]
    Invalid(String),
    #[error(
        "opcode 0x{opcode:02x} at byte {offset} is outside MVP + sign-extension, which is all ao metering accepts; rebuild the module without it"
    )]
    UnsupportedOpcode { opcode: u8, offset: usize },
    #[error("the {what} name {name:?} is not ASCII: the reference metering would write a malformed module; rename it")]
    NonAsciiName { what: &'static str, name: String },
    #[error(
        "a segment of function body {func} costs {cost} gas, more than an i32 charge can hold (the reference would emit an invalid i32.const); split the function or use the i64 meter type"
    )]
    SegmentCost { func: u32, cost: u64 },
    #[error("the module already exports `{0}`, a name the inline metering reserves for its gas globals; rename that export")]
    ReservedExport(String),
    #[error("malformed module at byte {offset}: {message}")]
    Malformed { offset: usize, message: String },
}

impl From<BinaryReaderError> for MeterError {
    fn from(e: BinaryReaderError) -> Self {
        MeterError::Malformed { offset: e.offset(), message: e.message().to_string() }
    }
}

/// The reference's transformation: charges are `<ty>.const cost; call $metering.usegas`.
pub fn meter(wasm: &[u8], ty: MeterType) -> Result<Vec<u8>, MeterError> {
    rewrite(wasm, ty, false)
}

/// The same charges at the same points, counted inline in exported i64 globals (see the module
/// documentation for the layout and the host's part).
pub fn meter_inline(wasm: &[u8], ty: MeterType) -> Result<Vec<u8>, MeterError> {
    rewrite(wasm, ty, true)
}

/// The features the reference's parser can read (memory64 limits and offsets included).
fn features() -> WasmFeatures {
    WasmFeatures::WASM1 | WasmFeatures::SIGN_EXTENSION | WasmFeatures::MEMORY64
}

const CUSTOM: u8 = 0;
const TYPE: u8 = 1;
const IMPORT: u8 = 2;
const FUNCTION: u8 = 3;
const TABLE: u8 = 4;
const MEMORY: u8 = 5;
const GLOBAL: u8 = 6;
const EXPORT: u8 = 7;
const START: u8 = 8;
const ELEMENT: u8 = 9;
const CODE: u8 = 10;
const DATA: u8 = 11;
const DATA_COUNT: u8 = 12;

/// Position of a section id in the binary's order (`data_count` sits between element and code).
fn rank(id: u8) -> u8 {
    match id {
        DATA_COUNT => 10,
        CODE => 11,
        DATA => 12,
        other => other,
    }
}

/// A section of the input, or one the transformation adds (empty payload).
struct Section<'a> {
    id: u8,
    payload: &'a [u8],
    offset: usize,
}

/// What the rewrite needs to know before writing sections.
struct Layout {
    /// Index of the metering import: the number of imported functions.
    func: u32,
    /// Number of types before the appended one.
    types: u32,
    /// Globals (imported + defined) before the inline counter.
    globals: u32,
}

fn rewrite(wasm: &[u8], ty: MeterType, inline: bool) -> Result<Vec<u8>, MeterError> {
    Validator::new_with_features(features()).validate_all(wasm).map_err(|e| MeterError::Invalid(e.to_string()))?;
    let mut sections = split(wasm)?;
    ensure(&mut sections, TYPE, inline);
    ensure(&mut sections, IMPORT, inline);
    if inline {
        ensure(&mut sections, GLOBAL, true);
        ensure(&mut sections, EXPORT, true);
    }
    let layout = scan(&sections, inline)?;
    let charge = if inline {
        Charge::Inline { used: layout.globals, limit: layout.globals + 1, func: layout.func }
    } else {
        Charge::Call { wide: ty == MeterType::I64, func: layout.func }
    };
    let cost_limit = match ty {
        MeterType::I32 => i32::MAX as u64,
        MeterType::I64 => i64::MAX as u64,
    };
    let mut out = Vec::with_capacity(wasm.len() + wasm.len() / 4);
    out.extend_from_slice(wasm.get(..8).ok_or_else(|| MeterError::Invalid("shorter than the 8-byte header".into()))?);
    let mut buf = Vec::new();
    for s in &sections {
        buf.clear();
        let mut r = BinaryReader::new(s.payload, s.offset);
        match s.id {
            CUSTOM => custom(&mut r, &mut buf)?,
            TYPE => types(&mut r, &mut buf, ty, inline)?,
            IMPORT => imports(&mut r, &mut buf, inline, layout.types)?,
            FUNCTION => vec_of(&mut r, &mut buf, |r, b| {
                write_u32(b, r.read_var_u32()?);
                Ok(())
            })?,
            TABLE => vec_of(&mut r, &mut buf, |r, b| {
                b.push(r.read_u8()?);
                limits(r, b)
            })?,
            MEMORY => vec_of(&mut r, &mut buf, limits)?,
            GLOBAL => globals(&mut r, &mut buf, inline)?,
            EXPORT => exports(&mut r, &mut buf, layout.func, inline.then_some(layout.globals))?,
            START => write_u32(&mut buf, shift(r.read_var_u32()?, layout.func)),
            ELEMENT => vec_of(&mut r, &mut buf, |r, b| {
                write_u32(b, r.read_var_u32()?);
                const_expr(r, b)?;
                vec_of(r, b, |r, b| {
                    write_u32(b, shift(r.read_var_u32()?, layout.func));
                    Ok(())
                })
            })?,
            DATA_COUNT => write_u32(&mut buf, r.read_var_u32()?),
            CODE => {
                let count = r.read_var_u32()?;
                write_u32(&mut buf, count);
                let mut body = Vec::new();
                for i in 0..count {
                    let size = r.read_var_u32()? as usize;
                    let at = r.original_position();
                    let bytes = r.read_bytes(size)?;
                    body.clear();
                    code::meter_body(bytes, at, i, charge, layout.func, cost_limit, &mut body)?;
                    write_len(&mut buf, body.len());
                    buf.extend_from_slice(&body);
                }
            }
            DATA => vec_of(&mut r, &mut buf, |r, b| {
                write_u32(b, r.read_var_u32()?);
                const_expr(r, b)?;
                let len = r.read_var_u32()? as usize;
                write_len(b, len);
                b.extend_from_slice(r.read_bytes(len)?);
                Ok(())
            })?,
            id => return Err(MeterError::Malformed { offset: s.offset, message: format!("unknown section id {id}") }),
        }
        if s.id != CUSTOM && s.id != START && !r.eof() {
            return Err(MeterError::Malformed { offset: r.original_position(), message: format!("trailing bytes in section {}", s.id) });
        }
        out.push(s.id);
        write_len(&mut out, buf.len());
        out.extend_from_slice(&buf);
    }
    Ok(out)
}

/// The sections of a (validated) module, in order.
fn split(wasm: &[u8]) -> Result<Vec<Section<'_>>, MeterError> {
    let mut r = BinaryReader::new(wasm, 0);
    r.read_bytes(8)?;
    let mut sections = Vec::new();
    while !r.eof() {
        let id = r.read_u8()?;
        let size = r.read_var_u32()? as usize;
        let offset = r.original_position();
        let payload = r.read_bytes(size)?;
        sections.push(Section { id, payload, offset });
    }
    Ok(sections)
}

/// Adds an empty section `id` if there is none, before the first non-custom section that comes
/// after it. Like the reference, the faithful variant adds nothing when no such section exists
/// (a module without code needs no import); `always` appends it at the end then.
fn ensure(sections: &mut Vec<Section<'_>>, id: u8, always: bool) {
    if sections.iter().any(|s| s.id == id) {
        return;
    }
    let at = sections.iter().position(|s| s.id != CUSTOM && rank(id) < rank(s.id));
    let new = Section { id, payload: &[], offset: 0 };
    match at {
        Some(at) => sections.insert(at, new),
        None if always => sections.push(new),
        None => {}
    }
}

/// Counts imported functions and globals, refuses `metering.usegas`, and (inline) reserved export names.
fn scan(sections: &[Section<'_>], inline: bool) -> Result<Layout, MeterError> {
    let mut layout = Layout { func: 0, types: 0, globals: 0 };
    for s in sections.iter().filter(|s| !s.payload.is_empty()) {
        let mut r = BinaryReader::new(s.payload, s.offset);
        match s.id {
            TYPE => layout.types = r.read_var_u32()?,
            IMPORT => {
                for _ in 0..r.read_var_u32()? {
                    let module = name(&mut r, "import module")?;
                    let field = name(&mut r, "import field")?;
                    if module == METERING_MODULE && field == USEGAS_FIELD {
                        return Err(MeterError::AlreadyMetered);
                    }
                    match r.read_u8()? {
                        0 => {
                            r.read_var_u32()?;
                            layout.func += 1;
                        }
                        1 => {
                            r.read_u8()?;
                            limits(&mut r, &mut Vec::new())?;
                        }
                        2 => limits(&mut r, &mut Vec::new())?,
                        3 => {
                            r.read_bytes(2)?;
                            layout.globals += 1;
                        }
                        kind => {
                            return Err(MeterError::Malformed {
                                offset: r.original_position(),
                                message: format!("unsupported import kind {kind}"),
                            });
                        }
                    }
                }
            }
            GLOBAL => layout.globals += r.read_var_u32()?,
            EXPORT if inline => {
                for _ in 0..r.read_var_u32()? {
                    let n = r.read_string()?;
                    if n == GAS_USED_EXPORT || n == GAS_LIMIT_EXPORT {
                        return Err(MeterError::ReservedExport(n.to_string()));
                    }
                    r.read_u8()?;
                    r.read_var_u32()?;
                }
            }
            _ => {}
        }
    }
    Ok(layout)
}

fn shift(func: u32, from: u32) -> u32 {
    if func >= from { func + 1 } else { func }
}

/// Reads a name that the reference writes with its UTF-16 length (import names, custom section
/// names): only ASCII round-trips.
fn name<'a>(r: &mut BinaryReader<'a>, what: &'static str) -> Result<&'a str, MeterError> {
    let s = r.read_string()?;
    if !s.is_ascii() {
        return Err(MeterError::NonAsciiName { what, name: s.to_string() });
    }
    Ok(s)
}

fn write_name(out: &mut Vec<u8>, s: &str) {
    write_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// `count` then `count` items, each re-encoded by `item`.
fn vec_of<'a>(
    r: &mut BinaryReader<'a>,
    out: &mut Vec<u8>,
    mut item: impl FnMut(&mut BinaryReader<'a>, &mut Vec<u8>) -> Result<(), MeterError>,
) -> Result<(), MeterError> {
    let n = r.read_var_u32()?;
    write_u32(out, n);
    for _ in 0..n {
        item(r, out)?;
    }
    Ok(())
}

/// Table and memory limits: flags, initial, and a maximum when flags is odd (memory64 sizes fit).
fn limits(r: &mut BinaryReader<'_>, out: &mut Vec<u8>) -> Result<(), MeterError> {
    let flags = r.read_var_u32()?;
    write_u32(out, flags);
    write_u64(out, r.read_var_u64()?);
    if flags & 1 == 1 {
        write_u64(out, r.read_var_u64()?);
    }
    Ok(())
}

/// A constant expression: one instruction and `end` (all MVP allows).
fn const_expr(r: &mut BinaryReader<'_>, out: &mut Vec<u8>) -> Result<(), MeterError> {
    code::copy_instr(r, out, u32::MAX)?;
    let at = r.original_position();
    if r.read_u8()? != 0x0b {
        return Err(MeterError::Malformed { offset: at, message: "constant expression longer than one instruction".into() });
    }
    out.push(0x0b);
    Ok(())
}

fn custom(r: &mut BinaryReader<'_>, out: &mut Vec<u8>) -> Result<(), MeterError> {
    let n = name(r, "custom section")?;
    write_name(out, n);
    out.extend_from_slice(r.read_bytes(r.bytes_remaining())?);
    Ok(())
}

fn types(r: &mut BinaryReader<'_>, out: &mut Vec<u8>, ty: MeterType, inline: bool) -> Result<(), MeterError> {
    let n = if r.eof() { 0 } else { r.read_var_u32()? };
    write_u32(out, n + 1);
    for _ in 0..n {
        let at = r.original_position();
        if r.read_u8()? != 0x60 {
            return Err(MeterError::Malformed { offset: at, message: "type is not a function type".into() });
        }
        out.push(0x60);
        for _ in 0..2 {
            let count = r.read_var_u32()?;
            write_u32(out, count);
            for _ in 0..count {
                out.push(r.read_u8()?);
            }
        }
    }
    match (inline, ty) {
        (true, _) => out.extend_from_slice(&[0x60, 0, 0]),
        (false, MeterType::I32) => out.extend_from_slice(&[0x60, 1, 0x7f, 0]),
        (false, MeterType::I64) => out.extend_from_slice(&[0x60, 1, 0x7e, 0]),
    }
    Ok(())
}

/// The imports, then the metering import, of the appended type (index `types`).
fn imports(r: &mut BinaryReader<'_>, out: &mut Vec<u8>, inline: bool, types: u32) -> Result<(), MeterError> {
    let n = if r.eof() { 0 } else { r.read_var_u32()? };
    write_u32(out, n + 1);
    for _ in 0..n {
        write_name(out, name(r, "import module")?);
        write_name(out, name(r, "import field")?);
        let kind = r.read_u8()?;
        out.push(kind);
        match kind {
            0 => write_u32(out, r.read_var_u32()?),
            1 => {
                out.push(r.read_u8()?);
                limits(r, out)?;
            }
            2 => limits(r, out)?,
            _ => out.extend_from_slice(r.read_bytes(2)?),
        }
    }
    write_name(out, METERING_MODULE);
    write_name(out, if inline { OUT_OF_GAS_FIELD } else { USEGAS_FIELD });
    out.push(0);
    write_u32(out, types);
    Ok(())
}

fn globals(r: &mut BinaryReader<'_>, out: &mut Vec<u8>, inline: bool) -> Result<(), MeterError> {
    let n = if r.eof() { 0 } else { r.read_var_u32()? };
    write_u32(out, n + if inline { 2 } else { 0 });
    for _ in 0..n {
        out.extend_from_slice(r.read_bytes(2)?);
        const_expr(r, out)?;
    }
    if inline {
        out.extend_from_slice(&[0x7e, 0x01, 0x42, 0x00, 0x0b]); // used: mut i64 = 0
        out.extend_from_slice(&[0x7e, 0x01, 0x42, 0x7f, 0x0b]); // limit: mut i64 = -1 (u64::MAX)
    }
    Ok(())
}

fn exports(r: &mut BinaryReader<'_>, out: &mut Vec<u8>, func: u32, gas_globals: Option<u32>) -> Result<(), MeterError> {
    let n = if r.eof() { 0 } else { r.read_var_u32()? };
    write_u32(out, n + if gas_globals.is_some() { 2 } else { 0 });
    for _ in 0..n {
        write_name(out, r.read_string()?);
        let kind = r.read_u8()?;
        out.push(kind);
        let index = r.read_var_u32()?;
        write_u32(out, if kind == 0 { shift(index, func) } else { index });
    }
    if let Some(g) = gas_globals {
        for (name, index) in [(GAS_USED_EXPORT, g), (GAS_LIMIT_EXPORT, g + 1)] {
            write_name(out, name);
            out.push(3);
            write_u32(out, index);
        }
    }
    Ok(())
}
