//! Byte-level BPE tokenization and detokenization from a GGUF file's own vocabulary
//! (`tokenizer.ggml.model = "gpt2"`), byte-exact with llama.cpp for the pre-tokenizer types of
//! [`PreTokenizer`].
//!
//! Encoding: with `parse_special`, the text is first cut at every occurrence of a control or
//! user-defined token's text (longest texts first, as llama.cpp does), and those become their
//! ids; each remaining run is pre-tokenized into words, each word's UTF-8 bytes are mapped to
//! the GPT-2 byte alphabet (a printable code point per byte) and merged pairwise by
//! `tokenizer.ggml.merges` rank (lowest rank first, leftmost on ties) until no pair merges. A
//! final symbol missing from the vocabulary falls back to one token per byte.
//!
//! Decoding maps each token's text back to bytes; control tokens decode to nothing unless asked
//! for. [`Detokenizer`] streams: it holds back an incomplete UTF-8 tail between tokens.
//!
//! Nothing here panics on input: a malformed vocabulary is a [`TokenizerError`], and encoding
//! runs in O(n log n) per word (a heap of candidate merges), so a long run cannot stall it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::pretokenize::PreTokenizer;
use crate::gguf::Gguf;

/// A token's type (`tokenizer.ggml.token_type`, llama.cpp's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_code(code: u64) -> Self {
        match code {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenizerError {
    #[error("the GGUF has no tokenizer metadata {0} (convert the model with llama.cpp's convert_hf_to_gguf.py)")]
    Missing(&'static str),
    #[error("tokenizer.ggml.model {0:?} is not supported (gpt2, the byte-level BPE, is)")]
    UnsupportedModel(String),
    #[error("tokenizer.ggml.pre {0:?} is not supported (supported: {supported})", supported = PreTokenizer::SUPPORTED)]
    UnsupportedPre(String),
    #[error("invalid tokenizer metadata: {0}")]
    Invalid(String),
}

/// The byte-level alphabet: GPT-2's printable code point for each byte.
fn byte_alphabet() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let cp = if printable {
            u32::from(b)
        } else {
            let cp = next;
            next += 1;
            cp
        };
        map[usize::from(b)] = char::from_u32(cp).expect("below 0x200");
    }
    map
}

/// A GGUF vocabulary ready to encode and decode.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    texts: Vec<String>,
    types: Vec<TokenType>,
    /// Each token's decoded bytes (byte alphabet undone; control tokens: their text).
    bytes: Vec<Vec<u8>>,
    ids: HashMap<String, u32>,
    /// (left, right) -> (rank, merged token).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// The token of each byte's alphabet symbol.
    byte_tokens: [Option<u32>; 256],
    /// Control and user-defined tokens, longest text first.
    specials: Vec<(String, u32)>,
    pre: PreTokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    end_of_generation: Vec<u32>,
}

impl Tokenizer {
    /// Reads the tokenizer of a GGUF file.
    pub fn from_gguf(g: &Gguf) -> Result<Self, TokenizerError> {
        let model = g.get("tokenizer.ggml.model").and_then(|v| v.as_str()).ok_or(TokenizerError::Missing("tokenizer.ggml.model"))?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_owned()));
        }
        let pre_name = g.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
        let pre = PreTokenizer::from_name(pre_name).ok_or_else(|| TokenizerError::UnsupportedPre(pre_name.to_owned()))?;
        let strings = |key: &'static str| -> Result<Vec<String>, TokenizerError> {
            let arr = g.get(key).and_then(|v| v.as_array()).ok_or(TokenizerError::Missing(key))?;
            arr.iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| TokenizerError::Invalid(format!("{key} holds a non-string"))))
                .collect()
        };
        let texts = strings("tokenizer.ggml.tokens")?;
        let merge_lines = strings("tokenizer.ggml.merges")?;
        let types: Vec<TokenType> = match g.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
            Some(a) if a.len() == texts.len() => a.iter().map(|v| TokenType::from_code(v.as_u64().unwrap_or(1))).collect(),
            Some(a) => return Err(TokenizerError::Invalid(format!("{} token types for {} tokens", a.len(), texts.len()))),
            None => vec![TokenType::Normal; texts.len()],
        };
        let n = u32::try_from(texts.len()).map_err(|_| TokenizerError::Invalid("more than 2^32 tokens".into()))?;
        let mut ids = HashMap::with_capacity(texts.len());
        for (id, t) in (0..n).zip(&texts) {
            ids.entry(t.clone()).or_insert(id);
        }
        let alphabet = byte_alphabet();
        let mut unbyte: HashMap<char, u8> = HashMap::with_capacity(256);
        for (b, c) in (0..=255u8).zip(alphabet) {
            unbyte.insert(c, b);
        }
        let mut byte_tokens = [None; 256];
        for (slot, c) in byte_tokens.iter_mut().zip(alphabet) {
            *slot = ids.get(c.encode_utf8(&mut [0; 4]) as &str).copied();
        }
        let bytes = texts
            .iter()
            .zip(&types)
            .map(|(t, ty)| match ty {
                TokenType::Normal | TokenType::Byte | TokenType::Unknown | TokenType::Unused => {
                    let mut out = Vec::with_capacity(t.len());
                    for c in t.chars() {
                        match unbyte.get(&c) {
                            Some(&b) => out.push(b),
                            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                        }
                    }
                    out
                }
                TokenType::Control | TokenType::UserDefined => t.as_bytes().to_vec(),
            })
            .collect();
        let mut merges = HashMap::with_capacity(merge_lines.len());
        for (rank, line) in (0u32..).zip(&merge_lines) {
            let (a, b) = line.split_once(' ').ok_or_else(|| TokenizerError::Invalid(format!("merge {rank} {line:?} has no space")))?;
            let (Some(&ia), Some(&ib), Some(&im)) = (ids.get(a), ids.get(b), ids.get(&format!("{a}{b}"))) else {
                continue; // a merge whose parts or result are not tokens never applies
            };
            merges.entry((ia, ib)).or_insert((rank, im));
        }
        let mut specials: Vec<(String, u32)> = (0..n)
            .zip(&texts)
            .zip(&types)
            .filter(|&(_, ty)| matches!(ty, TokenType::Control | TokenType::UserDefined | TokenType::Unknown))
            .filter(|((_, t), _)| !t.is_empty())
            .map(|((id, t), _)| (t.clone(), id))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let id_of = |key: &str| g.get(key).and_then(|v| v.as_u64()).and_then(|v| u32::try_from(v).ok()).filter(|&v| v < n);
        let bos = id_of("tokenizer.ggml.bos_token_id");
        let eos = id_of("tokenizer.ggml.eos_token_id");
        let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
        // End of generation: eos, eot, and the control tokens llama.cpp also stops at by text.
        let mut end_of_generation: Vec<u32> = [eos, id_of("tokenizer.ggml.eot_token_id")].into_iter().flatten().collect();
        for (id, (t, ty)) in (0..n).zip(texts.iter().zip(&types)) {
            let stop =
                matches!(t.as_str(), "<|endoftext|>" | "<|im_end|>" | "<|eot_id|>" | "<|end|>" | "<end_of_turn>" | "<|end_of_text|>");
            if stop && *ty == TokenType::Control && !end_of_generation.contains(&id) {
                end_of_generation.push(id);
            }
        }
        Ok(Self { texts, types, bytes, ids, merges, byte_tokens, specials, pre, bos, eos, add_bos, end_of_generation })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the GGUF asks for a BOS token before a prompt (`tokenizer.ggml.add_bos_token`).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether generation stops at `id` (end of sequence or of turn).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    /// The vocabulary's text of a token (byte alphabet, as stored).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// The id of an exact token text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// Token ids of `text`. With `parse_special`, control tokens' texts (`<|im_start|>`, ...)
    /// become those tokens; without, they are tokenized as plain text. No BOS is added (see
    /// [`Self::adds_bos`]).
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut fragments: Vec<Result<&str, u32>> = vec![Ok(text)];
        if parse_special {
            for (special, id) in &self.specials {
                let mut next = Vec::with_capacity(fragments.len());
                for f in fragments {
                    match f {
                        Ok(mut raw) => {
                            while let Some(at) = raw.find(special.as_str()) {
                                if at > 0 {
                                    next.push(Ok(&raw[..at]));
                                }
                                next.push(Err(*id));
                                raw = &raw[at + special.len()..];
                            }
                            if !raw.is_empty() {
                                next.push(Ok(raw));
                            }
                        }
                        special => next.push(special),
                    }
                }
                fragments = next;
            }
        }
        let mut words = Vec::new();
        for f in fragments {
            match f {
                Err(id) => out.push(id),
                Ok(raw) => {
                    words.clear();
                    self.pre.split(raw, &mut words);
                    for w in &words {
                        self.encode_word(w, &mut out);
                    }
                }
            }
        }
        out
    }

    /// BPE over one word: symbols start as the tokens of its bytes; the lowest-ranked adjacent
    /// pair (leftmost on ties) merges until none does.
    fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        let bytes = word.as_bytes();
        // Symbols: token id (None: a byte without a token), alive, prev, next.
        let mut sym: Vec<Option<u32>> = bytes.iter().map(|&b| self.byte_tokens[usize::from(b)]).collect();
        let n = sym.len();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let pair = |sym: &[Option<u32>], l: usize, r: usize| -> Option<(u32, u32)> { self.merges.get(&(sym[l]?, sym[r]?)).copied() };
        for i in 0..n.saturating_sub(1) {
            if let Some((rank, merged)) = pair(&sym, i, i + 1) {
                heap.push(Reverse((rank, i, i + 1, merged)));
            }
        }
        while let Some(Reverse((rank, l, r, merged))) = heap.pop() {
            // Stale: one side merged since this candidate was pushed.
            if !alive[l] || !alive[r] || next[l] != r || pair(&sym, l, r) != Some((rank, merged)) {
                continue;
            }
            sym[l] = Some(merged);
            alive[r] = false;
            next[l] = next[r];
            if next[l] < n {
                prev[next[l]] = l;
            }
            if prev[l] < n {
                let p = prev[l];
                if let Some((rk, m)) = pair(&sym, p, l) {
                    heap.push(Reverse((rk, p, l, m)));
                }
            }
            if next[l] < n {
                let q = next[l];
                if let Some((rk, m)) = pair(&sym, l, q) {
                    heap.push(Reverse((rk, l, q, m)));
                }
            }
        }
        let mut i = 0;
        while i < n {
            if let Some(id) = sym[i] {
                out.push(id);
            } else if let Some(unk) = self.ids.get("<unk>") {
                out.push(*unk); // a byte with no token: only in broken vocabularies
            }
            i = next[i];
        }
    }

    /// The bytes a token stands for; control tokens give nothing unless `special`.
    pub fn token_bytes(&self, id: u32, special: bool) -> &[u8] {
        match self.types.get(id as usize) {
            None => &[],
            Some(TokenType::Control) if !special => &[],
            Some(_) => &self.bytes[id as usize],
        }
    }

    /// The text of `ids` (invalid UTF-8 replaced by U+FFFD); control tokens are left out
    /// unless `special`.
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| self.token_bytes(id, special).iter().copied()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Streaming detokenization: whole UTF-8 characters out as tokens come in.
#[derive(Debug, Default, Clone)]
pub struct Detokenizer {
    pending: Vec<u8>,
}

impl Detokenizer {
    /// The text that `id` completes (possibly empty while a character is split across tokens).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.pending.extend_from_slice(tok.token_bytes(id, false));
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => {
                // Invalid, not merely incomplete: give it out replaced.
                let text = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                return text;
            }
        };
        let rest = self.pending.split_off(valid);
        String::from_utf8(std::mem::replace(&mut self.pending, rest)).unwrap_or_default()
    }

    /// What is left at the end (an incomplete character, replaced).
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}
