//! Fault injection, for tests only: makes one chosen `ao_gpu` host call (by index or by op) of the
//! evaluation of one chosen message return a wrong value, or flips a byte of the state a message
//! leaves, so that the tests of `verify` can show it pinpointing exactly that message and call.
//!
//! Set by the worker's `[testing] fault` key, which the configuration refuses in release builds;
//! the code that applies a fault is compiled only with `debug_assertions` (test and debug builds),
//! so a release binary cannot lie even when asked to. Spec: comma-separated `key=value` fields,
//! `message=<id>` (required) and exactly one of `call=<index>` (the host call at that trace
//! index), `op=<name>` (the first command of that op, e.g. `matmul`, `add`, `read_f32`) or
//! `state` (flip a byte of the memory after the message); optionally `backend=cpu|wgpu|cuda` (the
//! fault fires only on that backend).
//!
//! The wrong value: bit 4 of the third byte of the output (bit 20 of a little-endian f32, a
//! relative change of about 1/8 in the first element) is flipped.

use std::str::FromStr;

use crate::gpu::BackendKind;

/// Where a fault strikes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAt {
    /// The host call at this index of the trace.
    Call(usize),
    /// The first command of this op (its `gpu::Op::name`, or a call name such as `read_f32`).
    Op(String),
    /// The memory after the message.
    State,
}

/// One injected fault (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub message: String,
    pub at: FaultAt,
    pub backend: Option<BackendKind>,
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (mut message, mut at, mut backend) = (None, None, None);
        for field in s.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            let (key, value) = field.split_once('=').unwrap_or((field, ""));
            let set = |slot: &mut Option<FaultAt>, v: FaultAt| match slot.replace(v) {
                None => Ok(()),
                Some(_) => Err("give only one of call=, op= and state".to_owned()),
            };
            match key {
                "message" if !value.is_empty() => message = Some(value.to_owned()),
                "call" => set(&mut at, FaultAt::Call(value.parse().map_err(|_| format!("call={value:?} is not an index"))?))?,
                "op" if !value.is_empty() => set(&mut at, FaultAt::Op(value.to_owned()))?,
                "state" if value.is_empty() => set(&mut at, FaultAt::State)?,
                "backend" => backend = Some(BackendKind::parse(value).ok_or_else(|| format!("backend={value:?}: cpu, wgpu or cuda"))?),
                _ => return Err(format!("unknown field {field:?} (known: message=<id>, call=<index>, op=<name>, state, backend=<kind>)")),
            }
        }
        let message = message.ok_or("message=<id> is required")?;
        let at = at.ok_or("one of call=<index>, op=<name> or state is required")?;
        Ok(Self { message, at, backend })
    }
}

impl Fault {
    /// Whether the fault applies to an evaluation of `message` on `backend`.
    pub fn applies(&self, message: &str, backend: BackendKind) -> bool {
        self.message == message && self.backend.is_none_or(|b| b == backend)
    }

    /// Whether the call at `index` running `op` (an op or call name) is the one struck.
    pub fn strikes(&self, index: usize, op: &str) -> bool {
        match &self.at {
            FaultAt::Call(i) => *i == index,
            FaultAt::Op(name) => name == op,
            FaultAt::State => false,
        }
    }
}

/// Makes `bytes` wrong (see the module doc).
pub fn corrupt(bytes: &mut [u8]) {
    match bytes.len() {
        0 => {}
        1 | 2 => bytes[0] ^= 1,
        _ => bytes[2] ^= 0x10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let f: Fault = "message=M, call=3, backend=cpu".parse().unwrap();
        assert_eq!(f, Fault { message: "M".into(), at: FaultAt::Call(3), backend: Some(BackendKind::Cpu) });
        assert!(f.applies("M", BackendKind::Cpu) && !f.applies("M", BackendKind::Wgpu) && !f.applies("N", BackendKind::Cpu));
        assert!(f.strikes(3, "matmul") && !f.strikes(2, "matmul"));
        let f: Fault = "op=matmul,message=M".parse().unwrap();
        assert!(f.strikes(9, "matmul") && !f.strikes(9, "add"));
        assert_eq!("message=M,state".parse::<Fault>().unwrap().at, FaultAt::State);
        for bad in ["", "call=1", "message=M", "message=M,call=x", "message=M,call=1,state", "message=M,op=", "message=M,what=1"] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
        let mut b = [0u8, 0, 0, 0];
        corrupt(&mut b);
        assert_eq!(f32::from_le_bytes(b).to_bits(), 1 << 20);
    }
}
