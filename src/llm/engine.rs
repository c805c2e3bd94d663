//! The llama-family decoder over the worker's tensor backends: the forward pass
//! examples/actors/smollm2.c runs through `ao_gpu`, written once in Rust for `wasi_ephemeral_nn`
//! and `ao-gpu-worker model run`.
//!
//! A [`Llama`] holds a model's weights on one backend (uploaded once from the GGUF's bytes, in
//! their storage dtype); a [`KvCache`] holds one context's keys and values. [`Llama::step`] runs
//! tokens at positions `pos0..` (a whole prompt at once, then one token at a time) and returns
//! the last position's logits. Every op goes through the checked dispatch
//! ([`TensorOps::run_with`]); before it runs, its plan (bytes moved, FLOPs) is shown to the
//! caller's [`Meter`], which charges gas and checks the deadline, and whose error stops the step
//! between two ops. The same ops in the same order as the actor: in reproducible mode the
//! logits are bitwise the actor's on every backend.

use std::fmt;

use super::params::LlamaParams;
use crate::gguf::Gguf;
use crate::gpu::{Backend, BinaryOp, DType, GpuError, HostTensor, Op, Plan, RawTensor, RopeMode, TensorId, TensorOps, UnaryOp};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model: {0}")]
    Model(String),
    #[error("tensor backend: {0}")]
    Gpu(#[from] GpuError),
    /// The meter refused an op (out of gas, past the deadline): the step stopped there.
    #[error("{0}")]
    Stopped(String),
    #[error("context full: {have} tokens are in the context and {adding} more do not fit in ctx-size {ctx}")]
    ContextFull { have: usize, adding: usize, ctx: usize },
    #[error("token id {0} is outside the vocabulary")]
    BadToken(u32),
}

/// Sees every op's plan before it runs; an error stops the step.
pub trait Meter {
    fn admit(&mut self, plan: &Plan) -> Result<(), String>;
}

/// A meter that admits everything and counts (for the command line and tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct Count {
    pub ops: u64,
    pub bytes: u64,
    pub flops: u64,
}

impl Meter for Count {
    fn admit(&mut self, plan: &Plan) -> Result<(), String> {
        self.ops += 1;
        self.bytes = self.bytes.saturating_add(plan.bytes);
        self.flops = self.flops.saturating_add(plan.flops);
        Ok(())
    }
}

struct Block {
    attn_norm: TensorId,
    q: TensorId,
    k: TensorId,
    v: TensorId,
    o: TensorId,
    ffn_norm: TensorId,
    gate: TensorId,
    up: TensorId,
    down: TensorId,
}

/// A llama-architecture model's weights on a backend.
pub struct Llama {
    pub hyper: LlamaParams,
    embd: TensorId,
    blocks: Vec<Block>,
    out_norm: TensorId,
    output: TensorId,
    weight_bytes: u64,
}

impl fmt::Debug for Llama {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Llama").field("hyper", &self.hyper).field("weight_bytes", &self.weight_bytes).finish_non_exhaustive()
    }
}

/// One context's key/value cache: per block, `[positions, kv_heads, head_dim]` tensors.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<TensorId>,
    v: Vec<TensorId>,
    /// Positions held.
    pub len: usize,
    /// Most positions it may hold.
    pub ctx: usize,
}

impl Llama {
    /// Uploads the weights of a llama GGUF (`file` is the whole file's bytes) to `backend`.
    pub fn load(backend: &mut Backend, g: &Gguf, file: &[u8]) -> Result<Self, EngineError> {
        let hyper = LlamaParams::from_gguf(g).map_err(EngineError::Model)?;
        let mut weight_bytes = 0u64;
        let mut upload = |backend: &mut Backend, name: &str| -> Result<TensorId, EngineError> {
            let t = g.tensor(name).ok_or_else(|| EngineError::Model(format!("the GGUF has no tensor {name}")))?;
            let dtype = t.dtype().map_err(|e| EngineError::Model(e.to_string()))?;
            let bytes = g.tensor_bytes(file, t).map_err(|e| EngineError::Model(e.to_string()))?;
            weight_bytes += bytes.len() as u64;
            let raw = RawTensor::new(dtype, t.shape(), bytes.to_vec())?;
            Ok(backend.upload_raw(&raw)?)
        };
        let embd = upload(backend, "token_embd.weight")?;
        let mut blocks = Vec::with_capacity(hyper.block_count as usize);
        for b in 0..hyper.block_count {
            let mut w = |part: &str| upload(backend, &format!("blk.{b}.{part}.weight"));
            blocks.push(Block {
                attn_norm: w("attn_norm")?,
                q: w("attn_q")?,
                k: w("attn_k")?,
                v: w("attn_v")?,
                o: w("attn_output")?,
                ffn_norm: w("ffn_norm")?,
                gate: w("ffn_gate")?,
                up: w("ffn_up")?,
                down: w("ffn_down")?,
            });
        }
        let out_norm = upload(backend, "output_norm.weight")?;
        let output = if hyper.tied_output { embd } else { upload(backend, "output.weight")? };
        Ok(Self { hyper, embd, blocks, out_norm, output, weight_bytes })
    }

    /// Bytes of weights uploaded.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Frees the weights (and nothing else) on `backend`.
    pub fn free(self, backend: &mut Backend) {
        let mut ids = vec![self.embd, self.out_norm];
        if !self.hyper.tied_output {
            ids.push(self.output);
        }
        for b in &self.blocks {
            ids.extend([b.attn_norm, b.q, b.k, b.v, b.o, b.ffn_norm, b.gate, b.up, b.down]);
        }
        for id in ids {
            let _ = backend.free(id);
        }
    }

    /// An empty cache for up to `ctx` positions (at most the model's context length).
    pub fn new_cache(&self, backend: &mut Backend, ctx: usize) -> Result<KvCache, EngineError> {
        let ctx = ctx.clamp(1, self.hyper.context_length.max(1) as usize);
        let shape = vec![0, self.hyper.head_count_kv as usize, self.hyper.head_dim as usize];
        let mut k = Vec::with_capacity(self.blocks.len());
        let mut v = Vec::with_capacity(self.blocks.len());
        for _ in &self.blocks {
            k.push(backend.upload(&HostTensor::new(shape.clone(), Vec::new())?)?);
            v.push(backend.upload(&HostTensor::new(shape.clone(), Vec::new())?)?);
        }
        Ok(KvCache { k, v, len: 0, ctx })
    }

    /// Runs `tokens` at positions `cache.len..` and returns the last one's logits. On an error
    /// the cache may hold part of the step: drop it and start again.
    pub fn step(&self, backend: &mut Backend, cache: &mut KvCache, tokens: &[u32], meter: &mut dyn Meter) -> Result<Vec<f32>, EngineError> {
        let n = tokens.len();
        if n == 0 {
            return Err(EngineError::Model("a step needs at least one token".into()));
        }
        if cache.len + n > cache.ctx {
            return Err(EngineError::ContextFull { have: cache.len, adding: n, ctx: cache.ctx });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| u64::from(t) >= self.hyper.vocab_size) {
            return Err(EngineError::BadToken(bad));
        }
        let mut live = Live { backend, ids: Vec::new(), meter };
        let result = self.forward(&mut live, cache, tokens);
        let Live { backend, ids, .. } = live;
        for id in ids {
            let _ = backend.free(id);
        }
        let logits = result?;
        cache.len += n;
        Ok(logits)
    }

    fn forward(&self, x_: &mut Live<'_>, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let h = &self.hyper;
        let n = tokens.len();
        let pos0 = u32::try_from(cache.len).map_err(|_| EngineError::Model("position beyond u32".into()))?;
        let ids_bytes: Vec<u8> = tokens.iter().flat_map(|&t| (t as i32).to_le_bytes()).collect();
        let uploaded = x_.backend.upload_raw(&RawTensor::new(DType::I32, vec![n], ids_bytes)?)?;
        let ids = x_.keep(uploaded);
        let mut x = x_.op(&Op::Gather, &[self.embd, ids])?;
        let (heads, kv_heads, dim) = (h.head_count as usize, h.head_count_kv as usize, h.head_dim as usize);
        let scale = 1.0 / (dim as f32).sqrt();
        let eps = h.rms_eps as f32;
        let theta = h.rope_freq_base as f32;
        let width = h.embedding_length as usize;
        for (b, w) in self.blocks.iter().enumerate() {
            let hn = x_.op(&Op::Rmsnorm { eps }, &[x, w.attn_norm])?;
            let q = x_.linear(hn, w.q)?;
            let k = x_.linear(hn, w.k)?;
            let v = x_.linear(hn, w.v)?;
            let q3 = x_.op(&Op::Reshape(vec![n, heads, dim]), &[q])?;
            let k3 = x_.op(&Op::Reshape(vec![n, kv_heads, dim]), &[k])?;
            let v3 = x_.op(&Op::Reshape(vec![n, kv_heads, dim]), &[v])?;
            let qr = x_.op(&Op::Rope { pos0, theta, mode: RopeMode::Interleaved }, &[q3])?;
            let kr = x_.op(&Op::Rope { pos0, theta, mode: RopeMode::Interleaved }, &[k3])?;
            x_.run(&Op::Append, &[cache.k[b], kr])?;
            x_.run(&Op::Append, &[cache.v[b], v3])?;
            let a = x_.op(&Op::Attention { pos0, scale }, &[qr, cache.k[b], cache.v[b]])?;
            let a2 = x_.op(&Op::Reshape(vec![n, width]), &[a])?;
            let o = x_.linear(a2, w.o)?;
            let x2 = x_.op(&Op::Binary(BinaryOp::Add), &[x, o])?;
            let h2 = x_.op(&Op::Rmsnorm { eps }, &[x2, w.ffn_norm])?;
            let g = x_.linear(h2, w.gate)?;
            let u = x_.linear(h2, w.up)?;
            let gs = x_.op(&Op::Unary(UnaryOp::Silu), &[g])?;
            let gu = x_.op(&Op::Binary(BinaryOp::Mul), &[gs, u])?;
            let d = x_.linear(gu, w.down)?;
            x = x_.op(&Op::Binary(BinaryOp::Add), &[x2, d])?;
            // Free this block's intermediates now (the residual `x` lives on).
            x_.release_except(x);
        }
        let last = if n > 1 { x_.op(&Op::Slice { axis: 0, start: n - 1, len: 1 }, &[x])? } else { x };
        let xn = x_.op(&Op::Rmsnorm { eps }, &[last, self.out_norm])?;
        let logits = x_.linear(xn, self.output)?;
        Ok(x_.backend.read(logits)?.data)
    }

    /// Greedy choice: the highest logit (the lowest id on ties), as `argmax` reduces.
    pub fn argmax(logits: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    }
}

impl KvCache {
    /// Frees the cache's tensors.
    pub fn free(self, backend: &mut Backend) {
        for id in self.k.into_iter().chain(self.v) {
            let _ = backend.free(id);
        }
    }
}

/// A step's tensors: every output made is freed when the step ends.
struct Live<'a> {
    backend: &'a mut Backend,
    ids: Vec<TensorId>,
    meter: &'a mut dyn Meter,
}

impl Live<'_> {
    fn keep(&mut self, id: TensorId) -> TensorId {
        self.ids.push(id);
        id
    }

    fn run(&mut self, op: &Op, inputs: &[TensorId]) -> Result<TensorId, EngineError> {
        let meter = &mut *self.meter;
        let (id, _) = self.backend.run_with(op, inputs, |plan| meter.admit(plan).map_err(EngineError::Stopped))?;
        Ok(id)
    }

    fn op(&mut self, op: &Op, inputs: &[TensorId]) -> Result<TensorId, EngineError> {
        let id = self.run(op, inputs)?;
        Ok(self.keep(id))
    }

    /// `x @ w^T`: a GGUF weight is `[out, in]`.
    fn linear(&mut self, x: TensorId, w: TensorId) -> Result<TensorId, EngineError> {
        self.op(&Op::Matmul { transpose_a: false, transpose_b: true }, &[x, w])
    }

    fn release_except(&mut self, keep: TensorId) {
        for id in std::mem::take(&mut self.ids) {
            if id != keep {
                let _ = self.backend.free(id);
            }
        }
        self.ids.push(keep);
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0: greedy.
    pub temperature: f32,
    /// Nucleus: the smallest set of tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// llama.cpp's repeat penalty over the last `repeat_last_n` tokens (1: none).
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, repeat_penalty: 1.0, repeat_last_n: 64, seed: 0 }
    }
}

/// A deterministic sampler: the same logits, history and seed give the same tokens everywhere.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub params: Sampling,
    rng: fastrand::Rng,
}

impl Sampler {
    pub fn new(params: Sampling) -> Self {
        let rng = fastrand::Rng::with_seed(params.seed);
        Self { params, rng }
    }

    /// The next token after `history` (prompt and generated tokens so far).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut l = logits.to_vec();
        if p.repeat_penalty != 1.0 && p.repeat_penalty > 0.0 {
            let from = history.len().saturating_sub(p.repeat_last_n);
            let mut seen: Vec<u32> = history[from..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(v) = l.get_mut(t as usize) {
                    *v = if *v > 0.0 { *v / p.repeat_penalty } else { *v * p.repeat_penalty };
                }
            }
        }
        if p.temperature.is_nan() || p.temperature <= 0.0 {
            return Llama::argmax(&l);
        }
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // f64 probabilities in a fixed order: the same draw on every machine.
        let mut probs: Vec<(u32, f64)> =
            l.iter().enumerate().map(|(i, &v)| (i as u32, f64::from((v - max) / p.temperature).exp())).collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = probs.iter().map(|x| x.1).sum();
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, x) in probs.iter().enumerate() {
                acc += x.1 / total;
                if acc >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept = &probs[..keep.max(1)];
        let sum: f64 = kept.iter().map(|x| x.1).sum();
        let mut r = self.rng.f64() * sum;
        for x in kept {
            if r < x.1 {
                return x.0;
            }
            r -= x.1;
        }
        kept[kept.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_highest_logit() {
        assert_eq!(Llama::argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
        let mut s = Sampler::new(Sampling::default());
        assert_eq!(s.sample(&[0.0, 2.0, 2.0, 1.0], &[]), 1);
    }

    #[test]
    fn sampling_is_deterministic_per_seed_and_repeat_penalty_applies() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = Sampling { temperature: 0.8, top_p: 0.9, seed: 7, ..Sampling::default() };
        let draw = |p: &Sampling| {
            let mut s = Sampler::new(p.clone());
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
        assert_ne!(draw(&params), draw(&Sampling { seed: 8, ..params.clone() }));
        let mut s = Sampler::new(Sampling { repeat_penalty: 100.0, ..Sampling::default() });
        let best = Llama::argmax(&logits);
        assert_ne!(s.sample(&logits, &[best]), best);
    }
}
