//! The llama-architecture hyperparameters the engine needs, read from GGUF metadata. (The same
//! keys `model::Hyperparameters` reads for publishing; kept apart so that `llm`, which the
//! runtime uses, does not depend on the publishing side and its network client.)

use crate::gguf::Gguf;

/// A llama-family decoder's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaParams {
    pub block_count: u64,
    pub embedding_length: u64,
    pub head_count: u64,
    pub head_count_kv: u64,
    pub head_dim: u64,
    pub context_length: u64,
    pub vocab_size: u64,
    pub rope_freq_base: f64,
    pub rms_eps: f64,
    /// The output projection is the token embedding (no `output.weight`).
    pub tied_output: bool,
}

impl LlamaParams {
    pub fn from_gguf(g: &Gguf) -> Result<Self, String> {
        let arch = g.get_str("general.architecture").map_err(|e| e.to_string())?;
        if arch != "llama" {
            return Err(format!("architecture {arch:?} is not supported (llama is)"));
        }
        let int = |k: &str| g.get_u64(&format!("llama.{k}")).map_err(|e| e.to_string());
        let embedding_length = int("embedding_length")?;
        let head_count = int("attention.head_count")?;
        if head_count == 0 || embedding_length % head_count != 0 {
            return Err(format!("embedding_length {embedding_length} is not a multiple of head_count {head_count}"));
        }
        let head_count_kv = int("attention.head_count_kv").unwrap_or(head_count);
        if head_count_kv == 0 || head_count % head_count_kv != 0 {
            return Err(format!("head_count {head_count} is not a multiple of head_count_kv {head_count_kv}"));
        }
        let head_dim = embedding_length / head_count;
        if let Ok(rope_dim) = int("rope.dimension_count")
            && rope_dim != head_dim
        {
            return Err(format!(
                "rope.dimension_count {rope_dim} differs from the head dimension {head_dim} (partial rotary is not supported)"
            ));
        }
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len() as u64)
                .ok_or("no vocab_size and no tokenizer.ggml.tokens")?,
        };
        Ok(Self {
            block_count: int("block_count")?,
            embedding_length,
            head_count,
            head_count_kv,
            head_dim,
            context_length: int("context_length")?,
            vocab_size,
            rope_freq_base: g.get_f64("llama.rope.freq_base").unwrap_or(10_000.0),
            rms_eps: g.get_f64("llama.attention.layer_norm_rms_epsilon").map_err(|e| e.to_string())?,
            tied_output: g.tensor("output.weight").is_none(),
        })
    }
}
