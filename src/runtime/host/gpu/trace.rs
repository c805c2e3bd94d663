//! How a host call is written into its trace leaf (`attest::trace`, docs/attestation.md): the
//! canonical text of metas (`f32[2,3]`) and ops (`matmul:ta=0:tb=1`, floats as their IEEE bits
//! in hex, so the text is exact), and the fault a test may inject into an op's output.

use std::fmt;

use crate::gpu::{Meta, Op, UnaryOp};

/// `dtype[d0,d1,...]`.
pub(super) struct MetaText<'a>(pub(super) &'a Meta);

impl fmt::Display for MetaText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.0.dtype.as_str())?;
        for (i, d) in self.0.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// The op's name and its parameters, `:`-separated.
pub(super) struct OpText<'a>(pub(super) &'a Op);

fn bits(x: f32) -> String {
    format!("0x{:08x}", x.to_bits())
}

fn list(v: &[usize]) -> String {
    v.iter().map(usize::to_string).collect::<Vec<_>>().join(".")
}

impl fmt::Display for OpText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = self.0;
        f.write_str(op.name())?;
        match op {
            Op::Matmul { transpose_a, transpose_b } => write!(f, ":ta={}:tb={}", u8::from(*transpose_a), u8::from(*transpose_b)),
            Op::Unary(UnaryOp::Scale(k)) => write!(f, ":k={}", bits(*k)),
            Op::Rmsnorm { eps } | Op::Layernorm { eps } => write!(f, ":eps={}", bits(*eps)),
            Op::Cast(d) => write!(f, ":to={}", d.as_str()),
            Op::Reshape(s) => write!(f, ":shape={}", list(s)),
            Op::Permute(a) => write!(f, ":axes={}", list(a)),
            Op::Slice { axis, start, len } => write!(f, ":axis={axis}:start={start}:len={len}"),
            Op::Concat { axis } => write!(f, ":axis={axis}"),
            Op::Rope { pos0, theta, mode } => write!(f, ":pos0={pos0}:theta={}:mode={}", bits(*theta), mode.ggml_code()),
            Op::Attention { pos0, scale } => write!(f, ":pos0={pos0}:scale={}", bits(*scale)),
            Op::Binary(_) | Op::Unary(_) | Op::Softmax | Op::Reduce(_) | Op::Append | Op::Gather => Ok(()),
        }
    }
}

/// Replaces the tensor `id` by a wrong copy of it (`runtime::fault::corrupt`), freeing the right
/// one; returns the copy's id.
#[cfg(debug_assertions)]
pub(super) fn corrupt_tensor(be: &mut crate::gpu::Backend, id: crate::gpu::TensorId) -> crate::gpu::Result<crate::gpu::TensorId> {
    let mut raw = be.read_raw(id)?;
    crate::runtime::fault::corrupt(&mut raw.bytes);
    let copy = be.upload_raw(&raw)?;
    be.free(id)?;
    Ok(copy)
}
