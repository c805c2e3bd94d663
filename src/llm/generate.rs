//! Text in, text out: a loaded model (weights, tokenizer, chat template) and a generation
//! [`Session`] over it: the prompt read in one step, then one token at a time until an
//! end-of-generation token, `n_predict` tokens or the context's end. What `wasi_ephemeral_nn`'s
//! `compute` / `compute_single` and `ao-gpu-worker model run` drive.

use std::time::{Duration, Instant};

use super::chat::ChatTemplate;
use super::engine::{EngineError, KvCache, Llama, Meter, Sampler, Sampling};
use super::tokenizer::{Detokenizer, Tokenizer};
use crate::gguf::Gguf;
use crate::gpu::Backend;

/// A model ready to run: weights on a backend, its tokenizer and chat template.
#[derive(Debug)]
pub struct LoadedModel {
    pub name: String,
    /// Hex sha256 of the GGUF file.
    pub sha256: String,
    pub llama: Llama,
    pub tokenizer: Tokenizer,
    /// `None` when the GGUF has none or one this worker does not render.
    pub chat: Option<ChatTemplate>,
}

impl LoadedModel {
    /// Parses `file` (a whole GGUF file) and uploads its weights to `backend`.
    pub fn load(backend: &mut Backend, file: &[u8]) -> Result<Self, EngineError> {
        let g = Gguf::parse(file).map_err(|e| EngineError::Model(e.to_string()))?;
        let tokenizer = Tokenizer::from_gguf(&g).map_err(|e| EngineError::Model(e.to_string()))?;
        let chat = ChatTemplate::from_gguf(&g).ok();
        let llama = Llama::load(backend, &g, file)?;
        let name = g.get_str("general.name").unwrap_or("model").to_owned();
        Ok(Self { name, sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(file)), llama, tokenizer, chat })
    }
}

/// Generation settings (WasmEdge GGML plugin names: see `runtime::host::nn`).
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Most tokens generated per `compute` (`n-predict`).
    pub n_predict: usize,
    /// Positions the context holds (`ctx-size`).
    pub ctx_size: usize,
    pub sampling: Sampling,
}

impl Default for Options {
    fn default() -> Self {
        Self { n_predict: 128, ctx_size: 512, sampling: Sampling::default() }
    }
}

/// What one generation made.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Output {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub prompt_time: Duration,
    pub decode_time: Duration,
    /// Whether it stopped at an end-of-generation token (not at `n_predict`).
    pub ended: bool,
}

/// One context: its KV cache, the tokens it holds, the sampler.
#[derive(Debug)]
pub struct Session {
    pub cache: KvCache,
    pub history: Vec<u32>,
    sampler: Sampler,
    detok: Detokenizer,
    /// The logits after the last token read, when a next token is still to be chosen.
    pending: Option<Vec<f32>>,
}

/// What [`Session::next`] made.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// A token and the text it completes (possibly empty).
    Token(u32, String),
    /// An end-of-generation token came.
    End,
}

impl Session {
    pub fn new(model: &LoadedModel, backend: &mut Backend, options: &Options) -> Result<Self, EngineError> {
        let cache = model.llama.new_cache(backend, options.ctx_size)?;
        Ok(Self {
            cache,
            history: Vec::new(),
            sampler: Sampler::new(options.sampling.clone()),
            detok: Detokenizer::default(),
            pending: None,
        })
    }

    pub fn free(self, backend: &mut Backend) {
        self.cache.free(backend);
    }

    /// Reads `tokens` (a prompt, or a continuation) in one step.
    pub fn feed(&mut self, model: &LoadedModel, backend: &mut Backend, tokens: &[u32], meter: &mut dyn Meter) -> Result<(), EngineError> {
        let logits = model.llama.step(backend, &mut self.cache, tokens, meter)?;
        self.history.extend_from_slice(tokens);
        self.pending = Some(logits);
        Ok(())
    }

    /// Chooses the next token and, unless it ends the generation, reads it.
    pub fn next(&mut self, model: &LoadedModel, backend: &mut Backend, meter: &mut dyn Meter) -> Result<Next, EngineError> {
        let logits = self.pending.take().ok_or_else(|| EngineError::Model("nothing was read yet: set a prompt first".into()))?;
        let id = self.sampler.sample(&logits, &self.history);
        if model.tokenizer.is_end_of_generation(id) {
            return Ok(Next::End);
        }
        let text = self.detok.push(&model.tokenizer, id);
        if self.cache.len >= self.cache.ctx {
            // The token is chosen but cannot be read: report it, then the context is full.
            self.history.push(id);
            return Ok(Next::Token(id, text));
        }
        let logits = model.llama.step(backend, &mut self.cache, &[id], meter)?;
        self.history.push(id);
        self.pending = Some(logits);
        Ok(Next::Token(id, text))
    }

    /// The text held back at the end (an incomplete character).
    pub fn finish_text(&mut self) -> String {
        self.detok.finish()
    }

    /// Whether a next token can be chosen.
    pub fn ready(&self) -> bool {
        self.pending.is_some()
    }
}

/// Reads `prompt` (special tokens parsed) and generates up to `options.n_predict` tokens.
pub fn generate(
    model: &LoadedModel,
    backend: &mut Backend,
    prompt: &str,
    options: &Options,
    meter: &mut dyn Meter,
) -> Result<Output, EngineError> {
    let mut prompt_tokens = Vec::new();
    if model.tokenizer.adds_bos()
        && let Some(bos) = model.tokenizer.bos()
    {
        prompt_tokens.push(bos);
    }
    prompt_tokens.extend(model.tokenizer.encode(prompt, true));
    if prompt_tokens.is_empty() {
        return Err(EngineError::Model("the prompt is empty".into()));
    }
    let mut session = Session::new(model, backend, options)?;
    let result = run(model, backend, &mut session, prompt_tokens, options, meter);
    session.free(backend);
    result
}

fn run(
    model: &LoadedModel,
    backend: &mut Backend,
    session: &mut Session,
    prompt_tokens: Vec<u32>,
    options: &Options,
    meter: &mut dyn Meter,
) -> Result<Output, EngineError> {
    let started = Instant::now();
    session.feed(model, backend, &prompt_tokens, meter)?;
    let prompt_time = started.elapsed();
    let started = Instant::now();
    let mut out = Output { prompt_tokens, prompt_time, ..Output::default() };
    while out.tokens.len() < options.n_predict && session.ready() {
        match session.next(model, backend, meter)? {
            Next::End => {
                out.ended = true;
                break;
            }
            Next::Token(id, text) => {
                out.tokens.push(id);
                out.text.push_str(&text);
            }
        }
    }
    out.text.push_str(&session.finish_text());
    out.decode_time = started.elapsed();
    Ok(out)
}
