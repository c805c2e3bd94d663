//! Disk use of the journal under retention: one process evaluates many messages (each a new
//! 4 KiB state, a result and one posted, confirmed item), compaction runs every 1,000 messages
//! with `keep_results = 1000`, and the journal file's size is printed every tenth of the way.
//! Under retention it stays flat; without (`RETENTION_KEEP=0`) it grows with every message.
//!
//! `cargo bench --bench retention` runs `RETENTION_MESSAGES` (default 100,000) messages; under
//! `cargo test` (no `--bench` argument) a short run of 2,000 checks the same thing quickly.

use std::time::Instant;

use ao_gpu_worker::journal::{Commit, Journal, OutKind, Outgoing, Progress, ResultRecord, RetentionPolicy, sha256_hex};

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let messages = if full { env("RETENTION_MESSAGES", 100_000) } else { 2_000 };
    let keep = env("RETENTION_KEEP", 1_000);
    let policy = RetentionPolicy { keep_results: keep, max_age: None };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.redb");
    let j = Journal::open(&path).unwrap();
    let started = Instant::now();
    let mut sizes = Vec::new();
    for nonce in 0..messages {
        let mut image = vec![0u8; 4096];
        image[..8].copy_from_slice(&nonce.to_le_bytes());
        let hash = sha256_hex(&image);
        let id = format!("item-{nonce}");
        let progress = Progress {
            nonce,
            hash_chain: format!("hc{nonce}"),
            assignment: format!("a{nonce}"),
            state_hash: Some(hash.clone()),
            timestamp: nonce,
            checkpoint: None,
            attestation: None,
        };
        let result = ResultRecord {
            process: "bench-process".into(),
            message: format!("message-{nonce:040}"),
            nonce,
            timestamp: nonce,
            block_height: 1,
            response: serde_json::json!({"Output": format!("count={nonce}"), "Messages": [], "Spawns": [], "Assignments": [], "GasUsed": 1}),
            message_hash: hash.clone(),
            result_hash: hash.clone(),
            state_hash: Some(hash),
            gas_used: 1,
            posted: vec![id.clone()],
            replay: None,
            trace: None,
        };
        let item = Outgoing {
            id: id.clone(),
            kind: OutKind::Attestation,
            process: "bench-process".into(),
            nonce,
            bytes: vec![7u8; 1024],
            confirmed: false,
            refused: None,
        };
        j.commit(&Commit { progress: &progress, result: &result, state: Some(&image), outgoing: &[item] }).unwrap();
        j.confirm(&id).unwrap();
        if (nonce + 1) % 1_000 == 0 {
            j.compact(u64::MAX, &policy).unwrap();
        }
        if (nonce + 1) % (messages / 10).max(1) == 0 {
            sizes.push((nonce + 1, std::fs::metadata(&path).unwrap().len()));
        }
    }
    println!("journal size under retention (keep_results = {keep}), {messages} messages in {:.1?}:", started.elapsed());
    for (n, bytes) in &sizes {
        println!("  after {n:>7} messages: {:>8.2} MiB", *bytes as f64 / (1 << 20) as f64);
    }
    let kept = j.results("bench-process", None, None, usize::MAX, false).unwrap().len() as u64;
    println!("  results kept: {kept}");
    if keep > 0 {
        assert!(kept <= keep + 1_000, "compaction keeps at most keep_results plus one interval's messages");
    }
}
