//! ANS-104 throughput: sign, serialize, parse and verify data items of several sizes, and the
//! deep hash under them. Every item the worker posts or receives pays these costs.

use std::hint::black_box;

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::protocol::ao::{self, ItemType};
use ao_gpu_worker::protocol::deep_hash::deep_hash_blobs;
use ao_gpu_worker::protocol::{DataItem, DataItemBuilder, Tag};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const SIZES: [usize; 3] = [256, 64 * 1024, 1024 * 1024];

fn item(key: &Keypair, size: usize) -> DataItem {
    let mut tags = ao::base_tags(ItemType::Message);
    tags.push(Tag::new("Action", "Bench"));
    DataItemBuilder::new().target([7; 32]).anchor(ao::numeric_anchor(1)).tags(tags).data(vec![0xa5; size]).sign(key).unwrap()
}

fn bench(c: &mut Criterion) {
    let key = Keypair::from_secret(&[42; 32]);
    let mut g = c.benchmark_group("ans104");
    for size in SIZES {
        let it = item(&key, size);
        let bytes = it.to_bytes();
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_with_input(BenchmarkId::new("sign", size), &size, |b, &s| b.iter(|| black_box(item(&key, s))));
        g.bench_with_input(BenchmarkId::new("parse", size), &bytes, |b, raw| b.iter(|| black_box(DataItem::parse(raw).unwrap())));
        g.bench_with_input(BenchmarkId::new("parse_verify", size), &bytes, |b, raw| {
            b.iter(|| black_box(DataItem::parse_verified(raw).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("serialize", size), &it, |b, it| b.iter(|| black_box(it.to_bytes())));
        g.bench_with_input(BenchmarkId::new("deep_hash", size), &it.data, |b, data| {
            b.iter(|| black_box(deep_hash_blobs(&[b"dataitem", b"1", b"2", data])))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
