//! Language models served to actors: the GGUF tokenizer ([`tokenizer`], [`pretokenize`]), chat
//! templates ([`chat`]) and the llama-family engine ([`engine`]) that `wasi_ephemeral_nn` and
//! `ao-gpu-worker model run` drive over the worker's tensor backends.
//!
//! Knows GGUF files and the tensor backends (`gpu`); knows no Wasm, actor or network.

pub mod chat;
pub mod engine;
pub mod generate;
pub mod params;
pub mod pretokenize;
pub mod tokenizer;

pub use tokenizer::{Detokenizer, TokenType, Tokenizer, TokenizerError};
