//! `ao-gpu-worker model ...`: inspect a GGUF file, publish its tensors to a gateway, run the
//! SmolLM2 demo. Parses, calls the library ([`crate::model`], [`crate::demo::smollm2`]) and prints
//! its results as JSON.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::gguf::Gguf;
use crate::model::{DEFAULT_MAX_ITEM_BYTES, Hyperparameters, PublishOptions, publish};
use crate::net::GatewayClient;
use crate::progress::{Lines, Progress, Unit};

/// `ao-gpu-worker model ...`: model weights for actors.
#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Print a GGUF file's hyperparameters and tensors (name, dtype, row-major shape) as JSON.
    Inspect {
        /// The .gguf file.
        file: PathBuf,
    },
    /// Publish every tensor of a GGUF file to a gateway as signed data items and print the
    /// model manifest (JSON) an actor loads the weights by. Idempotent: the same key and file
    /// give the same item ids, and items already on the gateway are not uploaded again.
    Publish {
        /// The .gguf file (llama architecture; f32, f16, q8_0, q4_0, q4_1 tensors).
        file: PathBuf,
        /// Gateway base URL (`POST /tx`).
        #[arg(long, default_value = "http://127.0.0.1:8702")]
        gateway: String,
        /// Signing key (a JWK from `ao-gpu-worker keygen`). Without it a fresh key signs, so
        /// the item ids differ on every run.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Largest item in bytes, headers included; larger tensors are split by rows.
        #[arg(long, default_value_t = DEFAULT_MAX_ITEM_BYTES)]
        max_item_bytes: u64,
        /// Write the manifest here instead of stdout (a summary line goes to stdout).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Run a GGUF model inside an AO actor (examples/actors/smollm2.c) on an embedded devnet and
    /// worker: publish the weights, spawn the actor with the manifest, send Generate messages
    /// and print the generated tokens, their text and the speed (one JSON line each).
    Demo {
        /// The .gguf file (scripts/fetch-model gets SmolLM2-135M-Instruct Q4_1).
        file: PathBuf,
        /// Prompt token ids, comma-separated (repeat for several prompts). Default: "The
        /// permanent storage network Arweave" in SmolLM2's vocabulary.
        #[arg(long = "tokens")]
        prompts: Vec<String>,
        /// A prompt as text, tokenized with the GGUF's own tokenizer (special tokens such as
        /// `<|im_start|>` parsed); repeat for several, after any --tokens prompts.
        #[arg(long = "prompt")]
        texts: Vec<String>,
        /// Tokens to generate per prompt.
        #[arg(long, default_value_t = 32)]
        max_new_tokens: u32,
        /// Tensor backend of the worker: cpu, wgpu or cuda.
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// The backend's determinism mode: reproducible (bitwise across backends) or fast.
        #[arg(long, default_value = "reproducible")]
        determinism: String,
        /// Devnet and worker data (default: a temporary directory, removed at the end).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Generate text from a prompt with the worker's own engine (the one actors reach through
    /// `wasi_ephemeral_nn`): prints one JSON object with prompt_tokens, tokens, text and the
    /// prompt and decode speeds. Greedy unless --temp is above 0.
    Run {
        /// The .gguf file (llama architecture, byte-level BPE tokenizer).
        file: PathBuf,
        /// The prompt text; special tokens such as `<|im_start|>` are parsed as such.
        #[arg(long)]
        prompt: String,
        /// Apply the GGUF's chat template to the prompt as one user message.
        #[arg(long)]
        chat: bool,
        /// Most tokens to generate (stops earlier at an end-of-generation token).
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Positions the context holds (prompt plus generated tokens).
        #[arg(long, default_value_t = 512)]
        ctx_size: usize,
        /// Sampling temperature (0: greedy).
        #[arg(long, default_value_t = 0.0)]
        temp: f32,
        /// Nucleus sampling threshold.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Seed of the sampler (deterministic for a given seed).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Tensor backend: cpu, wgpu or cuda.
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// The backend's determinism mode: reproducible or fast.
        #[arg(long, default_value = "reproducible")]
        determinism: String,
        /// Print the JSON object (the only output format; accepted for scripts).
        #[arg(long)]
        json: bool,
    },
}

fn print_json(v: &serde_json::Value, pretty: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let text = if pretty { serde_json::to_string_pretty(v)? } else { serde_json::to_string(v)? };
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}

/// Runs a `model` subcommand.
pub fn run_cli(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Inspect { file } => {
            let g = Gguf::open(&file)?;
            let hyper = Hyperparameters::from_gguf(&g);
            let tensors: Vec<serde_json::Value> = g
                .tensors
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "name": t.name,
                        "type": t.ggml_type.name(),
                        "shape": t.dims.iter().rev().collect::<Vec<_>>(),
                        "bytes": t.size,
                    })
                })
                .collect();
            let metadata: serde_json::Map<String, serde_json::Value> = g.metadata.iter().map(|(k, v)| (k.clone(), value_json(v))).collect();
            print_json(
                &serde_json::json!({
                    "version": g.version,
                    "alignment": g.alignment,
                    "data_offset": g.data_offset,
                    "hyperparameters": hyper.as_ref().ok(),
                    "unsupported": hyper.as_ref().err().map(|e| format!("{e:#}")),
                    "metadata": metadata,
                    "tensors": tensors,
                }),
                true,
            )
        }
        ModelCommand::Publish { file, gateway, key, max_item_bytes, out } => {
            let key = match key {
                Some(path) => crate::attest::Keypair::load(&path)?,
                None => {
                    tracing::warn!("no --key: signing with a fresh key, so the item ids are new on every run");
                    crate::attest::Keypair::generate()?
                }
            };
            let client = GatewayClient::new(&gateway, crate::net::Policy::default());
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
            let opts = PublishOptions { max_item_bytes };
            let total: u64 = Gguf::open(&file).map(|g| g.tensors.iter().filter_map(|t| t.size).sum()).unwrap_or(0);
            let progress = Progress::new("publish", (total > 0).then_some(total), Unit::Bytes, Lines::Stderr);
            let (manifest, report) = rt.block_on(publish(&file, &client, &key, &key.address(), &opts, &|chunk, present, bytes| {
                progress.inc(bytes, if present { "already on the gateway" } else { &chunk.id });
            }))?;
            progress.finish(&format!("{} items, {} uploaded", report.items, report.uploaded));
            let summary = serde_json::json!({
                "model": manifest.name,
                "owner": manifest.owner,
                "items": report.items,
                "uploaded": report.uploaded,
                "already_present": report.already_present,
                "bytes": report.bytes,
                "manifest": out,
            });
            match out {
                Some(path) => {
                    std::fs::write(&path, serde_json::to_vec_pretty(&manifest)?)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    print_json(&summary, false)
                }
                None => print_json(&serde_json::to_value(&manifest)?, true),
            }
        }
        ModelCommand::Demo { file, prompts, texts, max_new_tokens, backend, determinism, data_dir } => {
            let prompts = if prompts.is_empty() && texts.is_empty() { vec![crate::demo::smollm2::DEMO_PROMPT.to_owned()] } else { prompts };
            let mut prompts = prompts
                .iter()
                .map(|p| {
                    p.split(',')
                        .map(|t| t.trim().parse::<u32>().with_context(|| format!("--tokens {p:?}: not a list of token ids")))
                        .collect()
                })
                .collect::<anyhow::Result<Vec<Vec<u32>>>>()?;
            if !texts.is_empty() {
                let tokenizer = crate::llm::Tokenizer::from_gguf(&Gguf::open(&file)?)?;
                for text in &texts {
                    let ids = tokenizer.encode(text, true);
                    anyhow::ensure!(!ids.is_empty(), "--prompt {text:?} has no tokens");
                    prompts.push(ids);
                }
            }
            let kind = crate::gpu::BackendKind::parse(&backend).with_context(|| format!("--backend {backend:?}: cpu, wgpu or cuda"))?;
            let determinism = crate::gpu::Determinism::parse(&determinism)
                .with_context(|| format!("--determinism {determinism:?}: reproducible or fast"))?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
            let tmp;
            let dir = match data_dir {
                Some(d) => d,
                None => {
                    tmp = tempdir()?;
                    tmp.path.clone()
                }
            };
            let report = |v: &serde_json::Value| print_json(v, false);
            rt.block_on(crate::demo::smollm2::run(&file, &prompts, max_new_tokens, kind, determinism, &dir, &report))
        }
        ModelCommand::Run { file, prompt, chat, max_new_tokens, ctx_size, temp, top_p, seed, backend, determinism, json: _ } => {
            use crate::llm::engine::{Count, Sampling};
            use crate::llm::generate::{LoadedModel, Options, generate};
            let kind = crate::gpu::BackendKind::parse(&backend).with_context(|| format!("--backend {backend:?}: cpu, wgpu or cuda"))?;
            let determinism = crate::gpu::Determinism::parse(&determinism)
                .with_context(|| format!("--determinism {determinism:?}: reproducible or fast"))?;
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let mut be = crate::gpu::Backend::new(kind, determinism)?;
            let model = LoadedModel::load(&mut be, &bytes)?;
            drop(bytes);
            let prompt = if chat {
                let template = model.chat.as_ref().context("the GGUF has no chat template this worker renders: drop --chat")?;
                template.render(&[crate::llm::chat::Message { role: "user".into(), content: prompt }], true)
            } else {
                prompt
            };
            let options = Options {
                n_predict: max_new_tokens,
                ctx_size,
                sampling: Sampling { temperature: temp, top_p, seed, ..Sampling::default() },
            };
            let mut meter = Count::default();
            let out = generate(&model, &mut be, &prompt, &options, &mut meter)?;
            let per_second = |n: usize, t: std::time::Duration| if t.is_zero() { 0.0 } else { n as f64 / t.as_secs_f64() };
            print_json(
                &serde_json::json!({
                    "model": model.name,
                    "sha256": model.sha256,
                    "backend": be.describe(),
                    "determinism": determinism.as_str(),
                    "prompt_tokens": out.prompt_tokens,
                    "tokens": out.tokens,
                    "text": out.text,
                    "ended": out.ended,
                    "prompt_tokens_per_second": per_second(out.prompt_tokens.len(), out.prompt_time),
                    "decode_tokens_per_second": per_second(out.tokens.len(), out.decode_time),
                    "flops": meter.flops,
                    "bytes": meter.bytes,
                }),
                false,
            )
        }
    }
}

/// A metadata value as JSON; arrays longer than 16 are summarized (tokenizer vocabularies).
fn value_json(v: &crate::gguf::Value) -> serde_json::Value {
    use crate::gguf::Value as V;
    match v {
        V::U8(x) => (*x).into(),
        V::I8(x) => (*x).into(),
        V::U16(x) => (*x).into(),
        V::I16(x) => (*x).into(),
        V::U32(x) => (*x).into(),
        V::I32(x) => (*x).into(),
        V::U64(x) => (*x).into(),
        V::I64(x) => (*x).into(),
        V::F32(x) => (*x as f64).into(),
        V::F64(x) => (*x).into(),
        V::Bool(x) => (*x).into(),
        V::String(x) => x.clone().into(),
        V::Array(ty, items) if items.len() > 16 => format!("[{} values of type {ty:?}]", items.len()).into(),
        V::Array(_, items) => items.iter().map(value_json).collect::<Vec<_>>().into(),
    }
}

/// A directory removed on drop.
struct TempDir {
    path: std::path::PathBuf,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn tempdir() -> anyhow::Result<TempDir> {
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let path = std::env::temp_dir().join(format!("ao-model-demo-{}", hex::encode(nonce)));
    std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(TempDir { path })
}
