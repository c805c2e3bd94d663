//! Devnet scheduling throughput over real loopback HTTP: messages posted through the
//! messenger and assigned by the scheduler (verify, nonce, hash chain, signed assignment, one
//! durable redb commit, upload to the gateway), and paginated reads of a schedule.

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::devnet::{Devnet, DevnetOptions};
use ao_gpu_worker::net::scheduler::Range;
use ao_gpu_worker::net::{MessengerClient, Policy, SchedulerClient};
use ao_gpu_worker::protocol::ao::{self, ItemType};
use ao_gpu_worker::protocol::{DataItemBuilder, Tag, b64};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let net = rt.block_on(Devnet::start(&DevnetOptions::new(dir.path(), 0))).unwrap();
    let registry = net.urls.registry.clone();
    let mu = MessengerClient::new(&net.urls.messenger, Policy::default());
    let su = SchedulerClient::new(&net.urls.scheduler, Policy::default());
    let key = Keypair::from_secret(&[9; 32]);
    let target = b64::decode_id(&registry).unwrap();
    let mut n = 0u64;
    let mut g = c.benchmark_group("devnet");
    g.throughput(Throughput::Elements(1));
    g.bench_function("post_message_via_messenger", |b| {
        b.iter(|| {
            n += 1;
            let mut tags = ao::base_tags(ItemType::Message);
            tags.push(Tag::new("Action", "Bench"));
            let item =
                DataItemBuilder::new().target(target).anchor(ao::numeric_anchor(n)).tags(tags).data(b"x".to_vec()).sign(&key).unwrap();
            rt.block_on(mu.post_item(&item)).unwrap();
        })
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("read_page_of_100", |b| {
        b.iter(|| rt.block_on(su.page(&registry, &Range { limit: Some(100), ..Range::default() })).unwrap())
    });
    g.finish();
    rt.block_on(net.shutdown());
}

criterion_group!(benches, bench);
criterion_main!(benches);
