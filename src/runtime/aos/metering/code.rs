//! Function bodies: the instruction decoder (MVP + sign-extension only), the reference cost table,
//! and the segmentation that inserts a charge before every segment with a nonzero cost.
//!
//! Every instruction is re-encoded canonically (minimal LEB128 immediates), as the reference
//! toolkit does when it turns its JSON back into bytes; only `call` immediates change (shifted by
//! one at and above the metering import's index `F`).

use super::MeterError;
use super::leb::{write_i32, write_i64, write_u32, write_u64};
use wasmparser::BinaryReader;

/// What follows an opcode byte in the MVP binary format.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Imm {
    /// Not an MVP or sign-extension opcode: refused.
    Invalid,
    None,
    /// `block`, `loop`, `if`: one byte (`0x40` or a value type; type indices need multi-value).
    BlockType,
    /// One unsigned LEB128 index (`br`, `br_if`, `local.*`, `global.*`).
    Index,
    /// `call`: a function index, shifted.
    Call,
    BrTable,
    /// `call_indirect`: a type index and a table byte.
    CallIndirect,
    /// Loads and stores: alignment and offset (u64 offsets under memory64).
    MemArg,
    /// `memory.size`, `memory.grow`: one memory byte.
    MemByte,
    I32,
    I64,
    F32,
    F64,
}

/// The immediates of every opcode byte.
const IMMEDIATES: [Imm; 256] = {
    let mut t = [Imm::Invalid; 256];
    let mut op = 0;
    while op <= 0xc4 {
        t[op] = match op {
            0x00 | 0x01 | 0x05 | 0x0b | 0x0f | 0x1a | 0x1b | 0x45..=0xc4 => Imm::None,
            0x02..=0x04 => Imm::BlockType,
            0x0c | 0x0d | 0x20..=0x24 => Imm::Index,
            0x0e => Imm::BrTable,
            0x10 => Imm::Call,
            0x11 => Imm::CallIndirect,
            0x28..=0x3e => Imm::MemArg,
            0x3f | 0x40 => Imm::MemByte,
            0x41 => Imm::I32,
            0x42 => Imm::I64,
            0x43 => Imm::F32,
            0x44 => Imm::F64,
            _ => Imm::Invalid,
        };
        op += 1;
    }
    t
};

/// The reference (`@permaweb/wasm-metering` 0.2.2 default table) cost of every opcode byte. The
/// reference looks costs up by the instruction's name *without* its type prefix, so `f32.add`
/// costs what `i32.add` costs, while float `lt`/`div`/`min`… and all conversions cost 0 because
/// their unprefixed names are not in the table.
pub(super) const COSTS: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut op = 0;
    while op < 256 {
        t[op] = match op {
            0x00..=0x04 => 1,                       // unreachable nop block loop if
            0x05 | 0x0c | 0x0d | 0x0f | 0x10 => 90, // else br br_if return call
            0x0e | 0x1a | 0x1b => 120,              // br_table drop select
            0x11 | 0x40 => 10_000,                  // call_indirect memory.grow
            0x20..=0x24 | 0x28..=0x3e => 120,       // locals, globals, loads, stores
            0x3f => 100,                            // memory.size
            0x41..=0x44 => 1,                       // const
            0x45..=0x5a => 45,                      // integer eqz eq ne lt gt le ge
            0x5b | 0x5c | 0x61 | 0x62 => 45,        // float eq ne
            0x67..=0x6c | 0x79..=0x7e => 45,        // clz ctz popcnt add sub mul
            0x6d..=0x70 | 0x7f..=0x82 => 36_000,    // div_s div_u rem_s rem_u
            0x71..=0x73 | 0x83..=0x85 => 45,        // and or xor
            0x74..=0x76 | 0x86..=0x88 => 67,        // shl shr_s shr_u
            0x77 | 0x78 | 0x89 | 0x8a => 90,        // rotl rotr
            0x92..=0x94 | 0xa0..=0xa2 => 45,        // float add sub mul
            _ => 0,
        };
        op += 1;
    }
    t
};

/// The reference's cost of its own charge (`<t>.const` 1 + `call` 90), added to every charged
/// segment.
pub const METERING_OVERHEAD: u64 = 91;

/// Opcodes after which a segment ends: `if loop else end br br_if br_table return memory.grow`.
pub(super) fn ends_segment(op: u8) -> bool {
    matches!(op, 0x03 | 0x04 | 0x05 | 0x0b | 0x0c | 0x0d | 0x0e | 0x0f | 0x40)
}

/// Reads one instruction and writes its canonical encoding to `out`, shifting `call` targets
/// `>= shift_from` by one. Returns the opcode byte.
pub(super) fn copy_instr(r: &mut BinaryReader<'_>, out: &mut Vec<u8>, shift_from: u32) -> Result<u8, MeterError> {
    let at = r.original_position();
    let op = r.read_u8()?;
    let imm = IMMEDIATES[usize::from(op)];
    if imm == Imm::Invalid {
        return Err(MeterError::UnsupportedOpcode { opcode: op, offset: at });
    }
    out.push(op);
    match imm {
        Imm::Invalid | Imm::None => {}
        Imm::BlockType => {
            let b = r.read_u8()?;
            if !matches!(b, 0x40 | 0x7c..=0x7f) {
                return Err(MeterError::UnsupportedOpcode { opcode: op, offset: at });
            }
            out.push(b);
        }
        Imm::Index => write_u32(out, r.read_var_u32()?),
        Imm::Call => {
            let f = r.read_var_u32()?;
            write_u32(out, if f >= shift_from { f + 1 } else { f });
        }
        Imm::BrTable => {
            let n = r.read_var_u32()?;
            write_u32(out, n);
            for _ in 0..n {
                write_u32(out, r.read_var_u32()?);
            }
            write_u32(out, r.read_var_u32()?);
        }
        Imm::CallIndirect => {
            write_u32(out, r.read_var_u32()?);
            out.push(r.read_u8()?);
        }
        Imm::MemArg => {
            write_u32(out, r.read_var_u32()?);
            write_u64(out, r.read_var_u64()?);
        }
        Imm::MemByte => out.push(r.read_u8()?),
        Imm::I32 => write_i32(out, r.read_var_i32()?),
        Imm::I64 => write_i64(out, r.read_var_i64()?),
        Imm::F32 => out.extend_from_slice(r.read_bytes(4)?),
        Imm::F64 => out.extend_from_slice(r.read_bytes(8)?),
    }
    Ok(op)
}

/// How a charge is written in front of a segment.
#[derive(Clone, Copy)]
pub(super) enum Charge {
    /// `<i32|i64>.const cost; call F` (the reference).
    Call { wide: bool, func: u32 },
    /// `used += cost; if used > limit { call F }` on the exported i64 globals.
    Inline { used: u32, limit: u32, func: u32 },
}

impl Charge {
    fn write(self, out: &mut Vec<u8>, cost: u64) {
        match self {
            Charge::Call { wide, func } => {
                if wide {
                    out.push(0x42);
                    write_i64(out, cost as i64);
                } else {
                    out.push(0x41);
                    write_i32(out, cost as i32);
                }
                out.push(0x10);
                write_u32(out, func);
            }
            Charge::Inline { used, limit, func } => {
                out.push(0x23); // global.get used
                write_u32(out, used);
                out.push(0x42); // i64.const cost
                write_i64(out, cost as i64);
                out.push(0x7c); // i64.add
                out.push(0x24); // global.set used
                write_u32(out, used);
                out.push(0x23); // global.get used
                write_u32(out, used);
                out.push(0x23); // global.get limit
                write_u32(out, limit);
                out.push(0x56); // i64.gt_u
                out.extend_from_slice(&[0x04, 0x40]); // if (no result)
                out.push(0x10); // call out_of_gas
                write_u32(out, func);
                out.push(0x0b); // end
            }
        }
    }
}

/// Rewrites one function body (locals and instructions, without its size prefix) into `out`.
/// `func` is the body's index in the code section, for error messages.
pub(super) fn meter_body(
    body: &[u8],
    offset: usize,
    func: u32,
    charge: Charge,
    shift_from: u32,
    cost_limit: u64,
    out: &mut Vec<u8>,
) -> Result<(), MeterError> {
    let mut r = BinaryReader::new(body, offset);
    let groups = r.read_var_u32()?;
    write_u32(out, groups);
    for _ in 0..groups {
        write_u32(out, r.read_var_u32()?);
        out.push(r.read_u8()?);
    }
    let mut segment = Vec::with_capacity(64);
    let mut cost = 0u64;
    while !r.eof() {
        let op = copy_instr(&mut r, &mut segment, shift_from)?;
        cost += u64::from(COSTS[usize::from(op)]);
        if ends_segment(op) {
            if cost != 0 {
                cost += METERING_OVERHEAD;
                if cost > cost_limit {
                    return Err(MeterError::SegmentCost { func, cost });
                }
                charge.write(out, cost);
            }
            out.extend_from_slice(&segment);
            segment.clear();
            cost = 0;
        }
    }
    if !segment.is_empty() {
        return Err(MeterError::Malformed {
            offset: r.original_position(),
            message: format!("function body {func} does not end with `end`"),
        });
    }
    Ok(())
}
