//! Model weights for actors: publishing a GGUF model's tensors to an Arweave-style gateway as
//! signed data items, and the model manifest an actor loads them by.
//!
//! Every tensor of the file becomes one or more ANS-104 items of at most `max_item_bytes` (whole
//! rows each: a large tensor is split along its first row-major axis), tagged
//!
//! | tag | value |
//! |---|---|
//! | `Content-Type` | `application/octet-stream` |
//! | `Type` | `Model-Tensor` |
//! | `Model` | the model's `general.name` |
//! | `Tensor` | the GGUF tensor name, e.g. `blk.0.attn_q.weight` |
//! | `Dtype` | `f32`, `f16`, `q8_0`, `q4_0` or `q4_1` |
//! | `Tensor-Shape` | the whole tensor's row-major shape, comma-separated |
//! | `Shape` | this item's shape (`rows` replacing the first axis) |
//! | `First-Row` | index of this item's first row in the tensor |
//! | `Sha256` | hex sha256 of the data |
//!
//! with the tensor's storage bytes (GGUF block layout, see `gpu::dtype`) as data. Items carry no
//! anchor, and ed25519 signatures are deterministic, so publishing the same file with the same
//! key gives the same item ids every time; items the gateway already holds are not uploaded
//! again. (With an Arweave RSA key each publish signs new ids: RSA-PSS is randomized.) Actors name each item by id and sha256 in `ao_gpu` constant loads, so the worker
//! fetches, verifies and caches them itself.
//!
//! The [`Manifest`] (JSON) lists the hyperparameters and, for each tensor, its chunks as
//! `{id, sha256, dtype, shape, row}`.
//!
//! Items default to at most 8 MiB ([`DEFAULT_MAX_ITEM_BYTES`], headers included): under the
//! ~10 MiB many bundlers accept (the embedded devnet's gateway takes up to 256 MiB).
//!
//! The library only: the command line (`ao-gpu-worker model`) lives in `cli::model`, and the demo
//! that runs a model in an actor in `demo::smollm2`. Nothing here knows the daemon, the devnet,
//! the demos or the command line.

use std::io::{Read, Seek};
use std::path::Path;

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::gguf::{Gguf, TensorInfo};
use crate::gpu::DType;
use crate::net::GatewayClient;
use crate::protocol::{DataItem, DataItemBuilder, Signer, Tag};

/// The manifest format this module writes.
pub const MANIFEST_FORMAT: &str = "ao-gpu-worker.model/1";
/// Default largest item (headers included): below the 10 MiB many bundlers take.
pub const DEFAULT_MAX_ITEM_BYTES: u64 = 8 << 20;
/// Room left in each item for its headers, tags and signature.
pub const ITEM_OVERHEAD: u64 = 4096;

/// The llama-architecture hyperparameters an actor needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    pub architecture: String,
    pub block_count: u64,
    pub embedding_length: u64,
    pub feed_forward_length: u64,
    pub head_count: u64,
    pub head_count_kv: u64,
    pub head_dim: u64,
    pub context_length: u64,
    pub vocab_size: u64,
    pub rope_freq_base: f64,
    /// `interleaved` (GGML "normal": GGUF's converter permutes q/k so pairs are adjacent) or `neox`.
    pub rope_mode: String,
    pub rms_eps: f64,
    pub bos_token_id: Option<u64>,
    pub eos_token_id: Option<u64>,
    /// Whether the output projection is the token embedding (no `output.weight` tensor).
    pub tied_output: bool,
}

impl Hyperparameters {
    /// Reads the hyperparameters of a llama-architecture GGUF file, checking the tensors an
    /// actor will look for exist with consistent shapes.
    pub fn from_gguf(g: &Gguf) -> anyhow::Result<Self> {
        let arch = g.get_str("general.architecture")?.to_owned();
        ensure!(arch == "llama", "architecture {arch:?} is not supported (llama is)");
        let key = |k: &str| format!("{arch}.{k}");
        let embedding_length = g.get_u64(&key("embedding_length"))?;
        let head_count = g.get_u64(&key("attention.head_count"))?;
        ensure!(
            head_count > 0 && embedding_length % head_count == 0,
            "embedding_length {embedding_length} is not a multiple of head_count {head_count}"
        );
        let head_count_kv = g.get_u64(&key("attention.head_count_kv")).unwrap_or(head_count);
        ensure!(
            head_count_kv > 0 && head_count % head_count_kv == 0,
            "head_count {head_count} is not a multiple of head_count_kv {head_count_kv}"
        );
        let head_dim = embedding_length / head_count;
        if let Ok(rope_dim) = g.get_u64(&key("rope.dimension_count")) {
            ensure!(
                rope_dim == head_dim,
                "rope.dimension_count {rope_dim} differs from the head dimension {head_dim} (partial rotary is not supported)"
            );
        }
        let vocab_size = match g.get_u64(&key("vocab_size")) {
            Ok(v) => v,
            Err(_) => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len() as u64)
                .context("no vocab_size and no tokenizer.ggml.tokens")?,
        };
        let block_count = g.get_u64(&key("block_count"))?;
        let tied_output = g.tensor("output.weight").is_none();
        let h = Self {
            architecture: arch.clone(),
            block_count,
            embedding_length,
            feed_forward_length: g.get_u64(&key("feed_forward_length"))?,
            head_count,
            head_count_kv,
            head_dim,
            context_length: g.get_u64(&key("context_length"))?,
            vocab_size,
            rope_freq_base: g.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_mode: "interleaved".into(),
            rms_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            bos_token_id: g.get_u64("tokenizer.ggml.bos_token_id").ok(),
            eos_token_id: g.get_u64("tokenizer.ggml.eos_token_id").ok(),
            tied_output,
        };
        h.check_tensors(g)?;
        Ok(h)
    }

    /// Every tensor a llama forward pass uses, with its row-major shape.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<u64>)> {
        let (d, f, v) = (self.embedding_length, self.feed_forward_length, self.vocab_size);
        let kv = self.head_count_kv * self.head_dim;
        let mut out = vec![("token_embd.weight".to_owned(), vec![v, d]), ("output_norm.weight".to_owned(), vec![d])];
        if !self.tied_output {
            out.push(("output.weight".to_owned(), vec![v, d]));
        }
        for i in 0..self.block_count {
            for (name, shape) in [
                ("attn_norm", vec![d]),
                ("attn_q", vec![d, d]),
                ("attn_k", vec![kv, d]),
                ("attn_v", vec![kv, d]),
                ("attn_output", vec![d, d]),
                ("ffn_norm", vec![d]),
                ("ffn_gate", vec![f, d]),
                ("ffn_up", vec![f, d]),
                ("ffn_down", vec![d, f]),
            ] {
                out.push((format!("blk.{i}.{name}.weight"), shape));
            }
        }
        out
    }

    fn check_tensors(&self, g: &Gguf) -> anyhow::Result<()> {
        for (name, shape) in self.expected_tensors() {
            let t = g.tensor(&name).with_context(|| format!("tensor {name} is missing"))?;
            let got: Vec<u64> = t.dims.iter().rev().copied().collect();
            ensure!(got == shape, "tensor {name} has shape {got:?}, expected {shape:?}");
            t.dtype()?;
        }
        Ok(())
    }
}

/// One published item of a tensor: rows `[row, row + shape[0])` (the whole tensor when 1-D).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub id: String,
    /// Hex sha256 of the item's data.
    pub sha256: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub row: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub chunks: Vec<Chunk>,
}

/// Where the weights came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub name: String,
    pub source: Source,
    /// Address of the key that signed every item.
    pub owner: String,
    pub hyperparameters: Hyperparameters,
    pub tensors: Vec<TensorEntry>,
}

impl Manifest {
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Every chunk of every tensor.
    pub fn chunks(&self) -> impl Iterator<Item = &Chunk> {
        self.tensors.iter().flat_map(|t| &t.chunks)
    }
}

/// How a tensor splits into items: `(first_row, rows)` pieces of at most `max_item_bytes` each.
pub fn plan_chunks(t: &TensorInfo, max_item_bytes: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    let (rows, row_bytes) = t.rows()?;
    let room = max_item_bytes.saturating_sub(ITEM_OVERHEAD);
    ensure!(
        row_bytes > 0 && row_bytes <= room,
        "tensor {}: one row is {row_bytes} bytes, more than an item of {max_item_bytes} bytes holds",
        t.name
    );
    let per = room / row_bytes;
    let mut out = Vec::new();
    let mut row = 0;
    while row < rows {
        let n = per.min(rows - row);
        out.push((row, n));
        row += n;
    }
    Ok(out)
}

/// The row-major shape of `rows` rows of `t`.
fn chunk_shape(t: &TensorInfo, rows: u64) -> Vec<u64> {
    let mut shape: Vec<u64> = t.dims.iter().rev().copied().collect();
    if shape.len() > 1 {
        shape[0] = rows;
    }
    shape
}

fn join(shape: &[u64]) -> String {
    shape.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The signed item holding rows `[row, row + rows)` of tensor `t`.
pub fn chunk_item(
    signer: &dyn Signer,
    model: &str,
    t: &TensorInfo,
    row: u64,
    rows: u64,
    data: Vec<u8>,
) -> anyhow::Result<(DataItem, Chunk)> {
    let dtype = t.dtype()?;
    let shape = chunk_shape(t, rows);
    let sha = sha256_hex(&data);
    let tags = vec![
        Tag::new("Content-Type", "application/octet-stream"),
        Tag::new("Type", "Model-Tensor"),
        Tag::new("Model", model),
        Tag::new("Tensor", &t.name),
        Tag::new("Dtype", dtype.as_str()),
        Tag::new("Tensor-Shape", join(&t.dims.iter().rev().copied().collect::<Vec<_>>())),
        Tag::new("Shape", join(&shape)),
        Tag::new("First-Row", row.to_string()),
        Tag::new("Sha256", &sha),
    ];
    let item = DataItemBuilder::new().tags(tags).data(data).sign(signer)?;
    let chunk = Chunk { id: item.id(), sha256: sha, dtype: dtype.as_str().to_owned(), shape, row };
    Ok((item, chunk))
}

/// Options of [`publish`].
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub max_item_bytes: u64,
}

impl Default for PublishOptions {
    fn default() -> Self {
        Self { max_item_bytes: DEFAULT_MAX_ITEM_BYTES }
    }
}

/// What [`publish`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublishReport {
    pub items: u64,
    pub uploaded: u64,
    /// Items the gateway already held (same key and data: same id).
    pub already_present: u64,
    pub bytes: u64,
}

/// A GGUF file opened for publishing: its header, hyperparameters and source facts.
pub struct ModelFile {
    pub gguf: Gguf,
    pub hyperparameters: Hyperparameters,
    pub name: String,
    pub source: Source,
    file: std::fs::File,
}

impl ModelFile {
    /// Opens and checks a llama-architecture GGUF file (reads it once for its sha256).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let gguf = Gguf::open(path)?;
        let hyperparameters = Hyperparameters::from_gguf(&gguf)?;
        let name = gguf.get_str("general.name").unwrap_or("model").to_owned();
        let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let source = Source {
            file: path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            bytes: gguf.file_len,
            sha256: file_sha256(&mut file).with_context(|| format!("cannot read {}", path.display()))?,
        };
        Ok(Self { gguf, hyperparameters, name, source, file })
    }

    /// The signed items of tensor number `index` (in file order), with their manifest chunks.
    pub fn tensor_items(
        &mut self,
        index: usize,
        signer: &dyn Signer,
        opts: &PublishOptions,
    ) -> anyhow::Result<(TensorEntry, Vec<DataItem>)> {
        let t = self.gguf.tensors.get(index).with_context(|| format!("no tensor number {index}"))?.clone();
        let dtype = t.dtype()?;
        let mut chunks = Vec::new();
        let mut items = Vec::new();
        for (row, rows) in plan_chunks(&t, opts.max_item_bytes)? {
            let data = self.gguf.read_rows(&mut self.file, &t, row, rows)?;
            let (item, chunk) = chunk_item(signer, &self.name, &t, row, rows, data)?;
            chunks.push(chunk);
            items.push(item);
        }
        let entry =
            TensorEntry { name: t.name.clone(), dtype: dtype.as_str().to_owned(), shape: t.dims.iter().rev().copied().collect(), chunks };
        Ok((entry, items))
    }

    /// The manifest of the given tensor entries, signed by `owner`.
    pub fn manifest(&self, owner: &str, tensors: Vec<TensorEntry>) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            name: self.name.clone(),
            source: self.source.clone(),
            owner: owner.to_owned(),
            hyperparameters: self.hyperparameters.clone(),
            tensors,
        }
    }

    /// Every item of the model in memory, and the manifest (for tests and small models; `publish`
    /// holds one tensor's items at a time).
    pub fn all_items(&mut self, signer: &dyn Signer, owner: &str, opts: &PublishOptions) -> anyhow::Result<(Manifest, Vec<DataItem>)> {
        let mut tensors = Vec::new();
        let mut all = Vec::new();
        for i in 0..self.gguf.tensors.len() {
            let (entry, items) = self.tensor_items(i, signer, opts)?;
            tensors.push(entry);
            all.extend(items);
        }
        Ok((self.manifest(owner, tensors), all))
    }
}

/// Publishes every tensor of the GGUF file at `path` through `gateway`, signed by `signer` (whose
/// address is `owner`), and returns the manifest. `progress` is called after each item with its
/// chunk, whether the gateway already held it, and its data's length.
pub async fn publish(
    path: &Path,
    gateway: &GatewayClient,
    signer: &dyn Signer,
    owner: &str,
    opts: &PublishOptions,
    progress: &dyn Fn(&Chunk, bool, u64),
) -> anyhow::Result<(Manifest, PublishReport)> {
    let mut model = ModelFile::open(path)?;
    let mut report = PublishReport { items: 0, uploaded: 0, already_present: 0, bytes: 0 };
    let mut tensors = Vec::new();
    for i in 0..model.gguf.tensors.len() {
        let (entry, items) = model.tensor_items(i, signer, opts)?;
        for (item, chunk) in items.iter().zip(&entry.chunks) {
            let present = gateway.exists(&chunk.id).await.unwrap_or(false);
            if present {
                report.already_present += 1;
            } else {
                gateway.upload(item).await.with_context(|| format!("cannot upload rows {}.. of {}", chunk.row, entry.name))?;
                report.uploaded += 1;
            }
            report.items += 1;
            report.bytes += item.data.len() as u64;
            progress(chunk, present, item.data.len() as u64);
        }
        tensors.push(entry);
    }
    Ok((model.manifest(owner, tensors), report))
}

fn file_sha256(file: &mut (impl Read + Seek)) -> std::io::Result<String> {
    file.seek(std::io::SeekFrom::Start(0))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Checks a manifest read back from JSON before an actor is given it.
pub fn check_manifest(m: &Manifest) -> anyhow::Result<()> {
    if m.format != MANIFEST_FORMAT {
        bail!("manifest format {:?} is not {MANIFEST_FORMAT}", m.format);
    }
    for (name, shape) in m.hyperparameters.expected_tensors() {
        let t = m.tensor(&name).with_context(|| format!("manifest lacks tensor {name}"))?;
        ensure!(t.shape == shape, "manifest tensor {name} has shape {:?}, expected {shape:?}", t.shape);
        let rows = if shape.len() > 1 { shape[0] } else { 1 };
        let mut next = 0;
        for c in &t.chunks {
            ensure!(c.row == next, "tensor {name}: chunk at row {} where row {next} was expected", c.row);
            ensure!(DType::parse(&c.dtype).is_some(), "tensor {name}: unknown dtype {}", c.dtype);
            next += if shape.len() > 1 { c.shape.first().copied().unwrap_or(0) } else { 1 };
        }
        ensure!(next == rows, "tensor {name}: chunks cover {next} of {rows} rows");
    }
    Ok(())
}

/// Turns GGUF token ids back into text (GPT-2 byte-level BPE vocabularies, as SmolLM2's).
pub struct Detokenizer {
    tokens: Vec<String>,
}

impl Detokenizer {
    /// The vocabulary of a GGUF file (`tokenizer.ggml.tokens`), if it has one.
    pub fn from_gguf(g: &Gguf) -> Option<Self> {
        let tokens = g.get("tokenizer.ggml.tokens")?.as_array()?.iter().map(|v| v.as_str().unwrap_or("").to_owned()).collect();
        Some(Self { tokens })
    }

    /// The byte a GPT-2 byte-level character stands for: printable Latin-1 characters are
    /// themselves; the other 68 bytes are mapped, in order, to U+0100 and up.
    fn byte_of(c: char) -> Option<u8> {
        let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = c as u32;
        if printable(c) {
            return Some(c as u8);
        }
        let n = c.checked_sub(256)?;
        (0u32..=255).filter(|b| !printable(*b)).nth(n as usize).map(|b| b as u8)
    }

    /// The text of `ids` (bytes that are not UTF-8 are replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(tok) = self.tokens.get(id as usize) else { continue };
            let mapped: Option<Vec<u8>> = tok.chars().map(Self::byte_of).collect();
            match mapped {
                Some(b) => bytes.extend(b),
                None => bytes.extend(tok.as_bytes()), // special tokens such as <|im_start|>
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::Keypair;
    use crate::gguf::tests::Builder;

    /// A llama file with 1 block, d = 64, 2 heads of 32, 1 kv head, ffn 96, vocab 8.
    fn tiny() -> Vec<u8> {
        let (d, f, v, kv) = (64u64, 96u64, 8u64, 32u64);
        let q8 = |rows: u64, cols: u64| vec![0u8; (rows * cols / 32 * 34) as usize];
        let q41 = |rows: u64, cols: u64| vec![0u8; (rows * cols / 32 * 20) as usize];
        let norm = vec![0u8; d as usize * 4];
        Builder::new()
            .kv_str("general.architecture", "llama")
            .kv_str("general.name", "tiny")
            .kv_u32("llama.block_count", 1)
            .kv_u32("llama.context_length", 128)
            .kv_u32("llama.embedding_length", d as u32)
            .kv_u32("llama.feed_forward_length", f as u32)
            .kv_u32("llama.attention.head_count", 2)
            .kv_u32("llama.attention.head_count_kv", 1)
            .kv_f32("llama.rope.freq_base", 100000.0)
            .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
            .kv_u32("llama.vocab_size", v as u32)
            .kv_u32("tokenizer.ggml.eos_token_id", 2)
            .tensor("token_embd.weight", &[d, v], 8, &q8(v, d))
            .tensor("output_norm.weight", &[d], 0, &norm)
            .tensor("blk.0.attn_norm.weight", &[d], 0, &norm)
            .tensor("blk.0.attn_q.weight", &[d, d], 3, &q41(d, d))
            .tensor("blk.0.attn_k.weight", &[d, kv], 3, &q41(kv, d))
            .tensor("blk.0.attn_v.weight", &[d, kv], 3, &q41(kv, d))
            .tensor("blk.0.attn_output.weight", &[d, d], 3, &q41(d, d))
            .tensor("blk.0.ffn_norm.weight", &[d], 0, &norm)
            .tensor("blk.0.ffn_gate.weight", &[d, f], 3, &q41(f, d))
            .tensor("blk.0.ffn_up.weight", &[d, f], 3, &q41(f, d))
            .tensor("blk.0.ffn_down.weight", &[f, d], 3, &q41(d, f))
            .build()
    }

    #[test]
    fn hyperparameters_of_a_llama_file() {
        let g = Gguf::parse(&tiny()).unwrap();
        let h = Hyperparameters::from_gguf(&g).unwrap();
        assert_eq!((h.block_count, h.embedding_length, h.head_count, h.head_count_kv, h.head_dim), (1, 64, 2, 1, 32));
        assert_eq!((h.vocab_size, h.feed_forward_length, h.eos_token_id, h.bos_token_id), (8, 96, Some(2), None));
        assert!(h.tied_output);
        assert_eq!(h.rope_freq_base, 100000.0);
        assert_eq!(h.expected_tensors().len(), 2 + 9);
    }

    #[test]
    fn chunks_split_by_rows_and_ids_are_deterministic() {
        let bytes = tiny();
        let g = Gguf::parse(&bytes).unwrap();
        let emb = g.tensor("token_embd.weight").unwrap();
        // 8 rows of 2 * 34 = 68 bytes; 3 rows per item.
        let plan = plan_chunks(emb, ITEM_OVERHEAD + 3 * 68 + 10).unwrap();
        assert_eq!(plan, vec![(0, 3), (3, 3), (6, 2)]);
        assert!(plan_chunks(emb, ITEM_OVERHEAD + 67).is_err());
        assert_eq!(plan_chunks(g.tensor("output_norm.weight").unwrap(), DEFAULT_MAX_ITEM_BYTES).unwrap(), vec![(0, 1)]);

        let key = Keypair::from_secret(&[7; 32]);
        let mut cur = std::io::Cursor::new(bytes.clone());
        let data = g.read_rows(&mut cur, emb, 3, 3).unwrap();
        let (item, chunk) = chunk_item(&key, "tiny", emb, 3, 3, data.clone()).unwrap();
        let (again, _) = chunk_item(&key, "tiny", emb, 3, 3, data.clone()).unwrap();
        assert_eq!(item.id(), again.id());
        item.verify().unwrap();
        assert_eq!(chunk.shape, vec![3, 64]);
        assert_eq!(chunk.row, 3);
        assert_eq!(chunk.dtype, "q8_0");
        assert_eq!(chunk.sha256, sha256_hex(&data));
        for (name, value) in [
            ("Content-Type", "application/octet-stream"),
            ("Tensor", "token_embd.weight"),
            ("Dtype", "q8_0"),
            ("Tensor-Shape", "8,64"),
            ("Shape", "3,64"),
            ("First-Row", "3"),
        ] {
            assert_eq!(item.tag(name), Some(value), "{name}");
        }
        let norm = g.tensor("output_norm.weight").unwrap();
        let (_, c) = chunk_item(&key, "tiny", norm, 0, 1, vec![0; 256]).unwrap();
        assert_eq!(c.shape, vec![64]);
    }

    #[test]
    fn refuses_other_architectures_and_missing_tensors() {
        let b = Builder::new().kv_str("general.architecture", "bert").build();
        assert!(Hyperparameters::from_gguf(&Gguf::parse(&b).unwrap()).unwrap_err().to_string().contains("bert"));
        let mut bytes = tiny();
        // Rename a tensor: "blk.0.ffn_up" -> "blk.0.ffn_uq".
        let at = bytes.windows(12).position(|w| w == b"blk.0.ffn_up").unwrap();
        bytes[at + 11] = b'q';
        let e = Hyperparameters::from_gguf(&Gguf::parse(&bytes).unwrap()).unwrap_err();
        assert_eq!(e.to_string(), "tensor blk.0.ffn_up.weight is missing");
    }

    #[test]
    fn detokenizer_maps_gpt2_bytes() {
        let d = Detokenizer {
            tokens: vec!["Hello".into(), "\u{120}world".into(), "\u{10a}".into(), "<|im_end|>".into(), "\u{e2}\u{124}\u{ac}".into()],
        };
        assert_eq!(d.decode(&[0, 1, 2, 3, 99]), "Hello world\n<|im_end|>");
        assert_eq!(d.decode(&[4]), "\u{20ac}");
        assert_eq!(Detokenizer::byte_of('\u{100}'), Some(0));
        assert_eq!(Detokenizer::byte_of('\u{143}'), Some(173));
        assert_eq!(Detokenizer::byte_of('\u{144}'), None);
    }
}
