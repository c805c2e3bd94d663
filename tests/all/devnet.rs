//! The embedded devnet over real HTTP on loopback: scheduling through the messenger,
//! assignments and their hash chain, pagination, durability across restarts, and bad input
//! that gets a clear 4xx JSON error and changes nothing.

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::devnet::{Devnet, DevnetOptions};
use ao_gpu_worker::net::scheduler::Range;
use ao_gpu_worker::net::{GatewayClient, MessengerClient, NetError, Policy, SchedulerClient};
use ao_gpu_worker::protocol::ao::{self, ItemType};
use ao_gpu_worker::protocol::su::{MessageNode, next_hash_chain};
use ao_gpu_worker::protocol::{DataItem, DataItemBuilder, SignatureType, Tag, b64};

struct Net {
    devnet: Devnet,
    su: SchedulerClient,
    mu: MessengerClient,
    gw: GatewayClient,
    http: reqwest::Client,
    _dir: Option<tempfile::TempDir>,
}

fn quick() -> Policy {
    Policy {
        max_attempts: 2,
        backoff_min: std::time::Duration::from_millis(5),
        backoff_max: std::time::Duration::from_millis(20),
        ..Policy::default()
    }
}

async fn start_in(dir: &std::path::Path) -> Net {
    let devnet = Devnet::start(&DevnetOptions::new(dir, 0)).await.expect("devnet starts");
    let su = SchedulerClient::new(&devnet.urls.scheduler, quick());
    let mu = MessengerClient::new(&devnet.urls.messenger, quick());
    let gw = GatewayClient::new(&devnet.urls.gateway, quick());
    Net { devnet, su, mu, gw, http: reqwest::Client::new(), _dir: None }
}

async fn start() -> Net {
    let dir = tempfile::tempdir().unwrap();
    let mut net = start_in(dir.path()).await;
    net._dir = Some(dir);
    net
}

fn message(key: &Keypair, target: &str, n: u64, action: &str) -> DataItem {
    let mut tags = ao::base_tags(ItemType::Message);
    tags.push(Tag::new("Action", action));
    DataItemBuilder::new()
        .target(b64::decode_id(target).unwrap())
        .anchor(ao::numeric_anchor(n))
        .tags(tags)
        .data(format!("message {n}").into_bytes())
        .sign(key)
        .unwrap()
}

/// Checks a whole schedule: nonces 0.., strictly increasing timestamps, the hash chain,
/// and every assignment signed by the scheduler and naming its message.
fn check_schedule(process: &str, scheduler_address: &str, nodes: &[MessageNode]) {
    let pid = b64::decode_id(process).unwrap();
    let mut prev: Option<([u8; 32], [u8; 32])> = None;
    let mut last_ts = 0u64;
    for (i, node) in nodes.iter().enumerate() {
        let a = &node.assignment;
        assert_eq!(a.tag("Nonce"), Some(i.to_string().as_str()), "nonce order");
        assert_eq!(a.tag("Process"), Some(process));
        assert_eq!(a.tag("Type"), Some("Assignment"));
        assert_eq!(a.tag("Epoch"), Some("0"));
        assert_eq!(a.tag("Block-Height").map(str::len), Some(12), "12-digit block height");
        let ts: u64 = a.tag("Timestamp").unwrap().parse().unwrap();
        assert!(ts > last_ts, "timestamps strictly increase");
        last_ts = ts;
        let expected = next_hash_chain(&pid, prev.as_ref().map(|(x, y)| (x, y)));
        assert_eq!(a.tag("Hash-Chain"), Some(b64::encode(&expected).as_str()), "hash chain at nonce {i}");
        assert_eq!(a.owner.address, scheduler_address);
        let message = node.message.as_ref().expect("message present");
        if i == 0 {
            assert_eq!(message.id, process, "nonce 0 is the process itself");
            assert_eq!(a.tag("Message"), None, "boot assignment has no Message tag");
        } else {
            assert_eq!(a.tag("Message"), Some(message.id.as_str()));
        }
        prev = Some((b64::decode_id(&a.id).unwrap(), expected));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_through_messenger_is_assigned_and_hash_chained() {
    let net = start().await;
    let registry = net.devnet.urls.registry.clone();
    let info = net.su.info().await.unwrap();
    assert_eq!(info.address, net.devnet.scheduler_address);
    let ts = net.su.timestamp().await.unwrap();
    assert_eq!(ts.block_height.len(), 12);

    let key = Keypair::generate().unwrap();
    let item = message(&key, &registry, 1, "Ping");
    let accepted = net.mu.post_item(&item).await.unwrap();
    assert_eq!(accepted.id, item.id());
    assert_eq!(accepted.message, "Processing DataItem");

    let nodes = net.su.all(&registry, Range::default()).await.unwrap();
    assert_eq!(nodes.len(), 2, "process boot entry plus the message");
    check_schedule(&registry, &net.devnet.scheduler_address, &nodes);
    let listed = nodes[1].message.as_ref().unwrap();
    assert_eq!(listed.id, item.id());
    assert_eq!(listed.owner.address, key.address());
    assert_eq!(listed.target.as_deref(), Some(registry.as_str()));
    assert_eq!(listed.anchor.as_deref(), Some("00000000000000000000000000000001"));
    assert_eq!(listed.data.as_deref(), Some("message 1"));
    // The SU's JSON carries everything needed to re-verify the message and its assignment.
    listed.to_item().unwrap().verify().unwrap();
    // The assignment's random binary anchor comes back base64url (`show-anchor=1`): it verifies too.
    let assignment = nodes[1].assignment.to_item().unwrap();
    assignment.verify().unwrap();
    assert_eq!(assignment.id(), nodes[1].assignment.id);

    // One message by id, with and without process-id.
    let one = net.su.message(&item.id(), &registry).await.unwrap();
    assert_eq!(one, nodes[1]);
    let latest = net.su.latest(&registry).await.unwrap();
    assert_eq!(latest, nodes[1]);
    let process = net.su.process(&registry).await.unwrap();
    assert_eq!(process.process_id, registry);
    assert!(process.tags.iter().any(|t| t.name == "Scheduler" && t.value == net.devnet.scheduler_address));

    // The scheduler publishes what it schedules: the gateway serves the message's data.
    assert_eq!(net.gw.raw(&item.id()).await.unwrap(), b"message 1");
    net.devnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reposting_the_same_item_changes_nothing() {
    let net = start().await;
    let registry = net.devnet.urls.registry.clone();
    let key = Keypair::generate().unwrap();
    let item = message(&key, &registry, 7, "Once");
    let first = net.su.post_item(&item).await.unwrap();
    let again = net.su.post_item(&item).await.unwrap();
    net.mu.post_item(&item).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(net.su.all(&registry, Range::default()).await.unwrap().len(), 2);
    net.devnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_by_time_and_by_nonce() {
    let net = start().await;
    let registry = net.devnet.urls.registry.clone();
    let key = Keypair::generate().unwrap();
    let mut ids = vec![registry.clone()];
    for n in 0..9 {
        let item = message(&key, &registry, n, "Page");
        net.mu.post_item(&item).await.unwrap();
        ids.push(item.id());
    }
    // Pages of 4 by timestamp: 4 + 4 + 2, has_next_page true, true, false.
    let mut seen = Vec::new();
    let mut range = Range { limit: Some(4), ..Range::default() };
    let mut pages = Vec::new();
    loop {
        let page = net.su.page(&registry, &range).await.unwrap();
        pages.push((page.edges.len(), page.page_info.has_next_page));
        for e in &page.edges {
            assert_eq!(e.cursor, e.node.assignment.tag("Timestamp").unwrap(), "cursor is the timestamp");
            seen.push(e.node.message.as_ref().unwrap().id.clone());
        }
        if !page.page_info.has_next_page {
            break;
        }
        range.from = Some(page.edges.last().unwrap().cursor.parse().unwrap());
    }
    assert_eq!(pages, vec![(4, true), (4, true), (2, false)]);
    assert_eq!(seen, ids);
    let all = net.su.all(&registry, Range { limit: Some(3), ..Range::default() }).await.unwrap();
    check_schedule(&registry, &net.devnet.scheduler_address, &all);

    // `to` is inclusive, `from` exclusive.
    let t2: u64 = all[2].assignment.tag("Timestamp").unwrap().parse().unwrap();
    let t5: u64 = all[5].assignment.tag("Timestamp").unwrap().parse().unwrap();
    let window = net.su.page(&registry, &Range { from: Some(t2), to: Some(t5), ..Range::default() }).await.unwrap();
    let nonces: Vec<_> = window.edges.iter().map(|e| e.node.assignment.tag("Nonce").unwrap().to_owned()).collect();
    assert_eq!(nonces, ["3", "4", "5"]);

    // Nonce mode: cursors are nonces.
    let by_nonce = net.su.page(&registry, &Range { from: Some(6), by_nonce: true, ..Range::default() }).await.unwrap();
    let cursors: Vec<_> = by_nonce.edges.iter().map(|e| e.cursor.clone()).collect();
    assert_eq!(cursors, ["7", "8", "9"]);
    net.devnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_everything_written_before() {
    let dir = tempfile::tempdir().unwrap();
    let key = Keypair::generate().unwrap();
    let (registry, before) = {
        let net = start_in(dir.path()).await;
        let registry = net.devnet.urls.registry.clone();
        for n in 0..3 {
            net.mu.post_item(&message(&key, &registry, n, "Before")).await.unwrap();
        }
        let before = net.su.all(&registry, Range::default()).await.unwrap();
        net.devnet.shutdown().await;
        (registry, before)
    };
    let net = start_in(dir.path()).await;
    assert_eq!(net.devnet.urls.registry, registry, "the registry survives a restart");
    assert_eq!(net.su.all(&registry, Range::default()).await.unwrap(), before);
    // Scheduling continues the same nonce sequence and hash chain.
    net.mu.post_item(&message(&key, &registry, 3, "After")).await.unwrap();
    let after = net.su.all(&registry, Range::default()).await.unwrap();
    assert_eq!(after.len(), 5);
    check_schedule(&registry, &net.devnet.scheduler_address, &after);
    net.devnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawning_a_process_checks_module_and_scheduler() {
    let net = start().await;
    let key = Keypair::generate().unwrap();
    let module = DataItemBuilder::new()
        .tags(vec![Tag::new("Data-Protocol", "ao"), Tag::new("Type", "Module"), Tag::new("Module-Format", ao::MODULE_FORMAT)])
        .data(b"\0asm\x01\0\0\0".to_vec())
        .sign(&key)
        .unwrap();
    let spawn = |module: &str, scheduler: &str, n: u64| {
        let mut tags = ao::base_tags(ItemType::Process);
        tags.push(Tag::new("Module", module));
        tags.push(Tag::new("Scheduler", scheduler));
        DataItemBuilder::new().anchor(ao::numeric_anchor(n)).tags(tags).data(b"init".to_vec()).sign(&key).unwrap()
    };
    let su_addr = net.devnet.scheduler_address.clone();
    // Unknown module: refused with a clear error.
    let err = net.mu.post_item(&spawn(&module.id(), &su_addr, 1)).await.unwrap_err();
    assert!(matches!(&err, NetError::Rejected { status: 400, message, .. } if message.contains("not found on the gateway")), "{err}");
    net.gw.upload(&module).await.unwrap();
    // Wrong scheduler.
    let err = net.mu.post_item(&spawn(&module.id(), &"x".repeat(43), 2)).await.unwrap_err();
    assert!(err.to_string().contains("is not this scheduler"), "{err}");
    // Good spawn: the process is scheduled, with a boot assignment at nonce 0.
    let process = spawn(&module.id(), &su_addr, 3);
    net.mu.post_item(&process).await.unwrap();
    let nodes = net.su.all(&process.id(), Range::default()).await.unwrap();
    assert_eq!(nodes.len(), 1);
    check_schedule(&process.id(), &su_addr, &nodes);
    // And it can now receive messages.
    net.mu.post_item(&message(&key, &process.id(), 1, "Hello")).await.unwrap();
    assert_eq!(net.su.all(&process.id(), Range::default()).await.unwrap().len(), 2);
    net.devnet.shutdown().await;
}

async fn status_and_error(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let body: serde_json::Value = resp.json().await.unwrap_or_else(|e| panic!("status {status}: body is not JSON ({ct}): {e}"));
    let error = body.get("error").and_then(|e| e.as_str()).unwrap_or_else(|| panic!("no error field in {body}")).to_owned();
    assert!(!error.is_empty());
    (status, error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_json_error_and_changes_nothing() {
    let net = start().await;
    let registry = net.devnet.urls.registry.clone();
    let key = Keypair::generate().unwrap();
    let before = net.su.all(&registry, Range::default()).await.unwrap();
    let good = message(&key, &registry, 1, "Good").to_bytes();

    let mut flipped = good.clone();
    flipped[10] ^= 1;
    let no_protocol = DataItemBuilder::new()
        .target(b64::decode_id(&registry).unwrap())
        .tags(vec![Tag::new("Type", "Message")])
        .sign(&key)
        .unwrap()
        .to_bytes();
    let no_type = DataItemBuilder::new()
        .target(b64::decode_id(&registry).unwrap())
        .tags(vec![Tag::new("Data-Protocol", "ao")])
        .sign(&key)
        .unwrap()
        .to_bytes();
    let checkpoint = DataItemBuilder::new()
        .target(b64::decode_id(&registry).unwrap())
        .tags(vec![Tag::new("Data-Protocol", "ao"), Tag::new("Type", "Checkpoint")])
        .sign(&key)
        .unwrap()
        .to_bytes();
    let unknown_target = message(&key, &b64::encode(&[9; 32]), 1, "Lost").to_bytes();
    let no_target = DataItemBuilder::new().tags(ao::base_tags(ItemType::Message)).sign(&key).unwrap().to_bytes();
    let process_without_module = {
        let mut tags = ao::base_tags(ItemType::Process);
        tags.push(Tag::new("Scheduler", net.devnet.scheduler_address.clone()));
        DataItemBuilder::new().tags(tags).sign(&key).unwrap().to_bytes()
    };
    let process_without_scheduler = {
        let mut tags = ao::base_tags(ItemType::Process);
        tags.push(Tag::new("Module", b64::encode(&[1; 32])));
        DataItemBuilder::new().tags(tags).sign(&key).unwrap().to_bytes()
    };

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"not a data item".to_vec(), "invalid data item"),
        ("truncated", good[..100].to_vec(), "invalid data item"),
        ("flipped signature", flipped, "signature does not verify"),
        ("no Data-Protocol", no_protocol, "Data-Protocol"),
        ("no Type", no_type, "no Type tag"),
        ("Type Checkpoint", checkpoint, "\"Checkpoint\""),
        ("unknown target", unknown_target, "not a process this scheduler schedules"),
        ("no target", no_target, "no target"),
        ("process without Module", process_without_module, "no Module tag"),
        ("process without Scheduler", process_without_scheduler, "no Scheduler tag"),
    ];
    for unit in [&net.devnet.urls.scheduler, &net.devnet.urls.messenger] {
        for (name, body, expect) in &cases {
            let resp = net.http.post(format!("{unit}/")).body(body.clone()).send().await.unwrap();
            let (status, error) = status_and_error(resp).await;
            assert!((400..500).contains(&status), "{unit} {name}: status {status}");
            assert!(error.contains(expect), "{unit} {name}: error {error:?} lacks {expect:?}");
        }
    }
    // Gateway refuses what does not verify, too.
    let resp = net.http.post(format!("{}/tx", net.devnet.urls.gateway)).body(b"junk".to_vec()).send().await.unwrap();
    assert_eq!(status_and_error(resp).await.0, 400);

    // Oversized bodies: 413 with a JSON error.
    let huge = vec![0u8; 10 * 1024 * 1024 + 1];
    for unit in [&net.devnet.urls.scheduler, &net.devnet.urls.messenger] {
        let resp = net.http.post(format!("{unit}/")).body(huge.clone()).send().await.unwrap();
        let (status, error) = status_and_error(resp).await;
        assert_eq!(status, 413, "{error}");
    }

    // Unknown routes, wrong methods, bad ids and bad query parameters.
    let su = &net.devnet.urls.scheduler;
    let gets: Vec<(String, u16)> = vec![
        (format!("{su}/no/such/route"), 404),
        (format!("{su}/not-an-id"), 400),
        (format!("{su}/{}", b64::encode(&[5; 32])), 404),
        (format!("{su}/{registry}?limit=abc"), 400),
        (format!("{su}/{registry}?limit=0"), 400),
        (format!("{su}/{registry}?limit=100000"), 400),
        (format!("{su}/{registry}?from=-5"), 400),
        (format!("{su}/{registry}?from-nonce=x"), 400),
        (format!("{su}/{registry}?process-id=short"), 400),
        (format!("{su}/processes/{}", b64::encode(&[5; 32])), 404),
        (format!("{}/raw/{}", net.devnet.urls.gateway, b64::encode(&[5; 32])), 404),
        (format!("{}/raw/nope", net.devnet.urls.gateway), 400),
        (format!("{}/elsewhere", net.devnet.urls.messenger), 404),
    ];
    for (url, expected) in gets {
        let (status, _) = status_and_error(net.http.get(&url).send().await.unwrap()).await;
        assert_eq!(status, expected, "GET {url}");
    }
    let (status, _) = status_and_error(net.http.delete(format!("{su}/")).send().await.unwrap()).await;
    assert_eq!(status, 405);
    let (status, error) = status_and_error(net.http.post(format!("{su}/?process-id={registry}&assign=x")).send().await.unwrap()).await;
    assert_eq!(status, 400, "{error}");

    // Nothing changed.
    assert_eq!(net.su.all(&registry, Range::default()).await.unwrap(), before);
    // And the devnet still works.
    net.mu.post_item(&DataItem::parse(&good).unwrap()).await.unwrap();
    assert_eq!(net.su.all(&registry, Range::default()).await.unwrap().len(), before.len() + 1);
    net.devnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_stores_and_serves_items() {
    let net = start().await;
    let key = Keypair::generate().unwrap();
    let item = DataItemBuilder::new()
        .tags(vec![Tag::new("Content-Type", "application/json"), Tag::new("Kind", "blob")])
        .data(br#"{"hello":"gateway"}"#.to_vec())
        .sign(&key)
        .unwrap();
    let up = net.gw.upload(&item).await.unwrap();
    assert_eq!(up.id, item.id());
    assert_eq!(net.gw.upload(&item).await.unwrap(), up, "idempotent");
    assert!(net.gw.exists(&item.id()).await.unwrap());
    assert!(!net.gw.exists(&b64::encode(&[3; 32])).await.unwrap());
    let resp = net.http.get(format!("{}/raw/{}", net.devnet.urls.gateway, item.id())).send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), br#"{"hello":"gateway"}"#);
    let info: serde_json::Value = net.http.get(format!("{}/info", net.devnet.urls.gateway)).send().await.unwrap().json().await.unwrap();
    assert!(info["height"].as_u64().unwrap() >= 1_500_000);
    net.devnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_serves_verifiable_items() {
    let net = start().await;
    let key = Keypair::generate().unwrap();
    let item = DataItemBuilder::new()
        .anchor([0xfe; 32])
        .target([4; 32])
        .tags(vec![Tag::new("Type", "Module"), Tag::new("Module-Format", ao::MODULE_FORMAT)])
        .data(vec![0, 1, 2, 255])
        .sign(&key)
        .unwrap();
    net.gw.upload(&item).await.unwrap();
    let fetched = net.gw.item(&item.id()).await.unwrap();
    assert_eq!(fetched, item, "binary anchor and data survive");
    let meta = net.gw.meta(&item.id()).await.unwrap();
    assert!(meta.verified_item(vec![0, 1, 2, 254]).is_err(), "other data does not verify");
    assert!(matches!(net.gw.item(&b64::encode(&[1; 32])).await, Err(NetError::NotFound { .. })));
    net.devnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_by_nonce_from_the_start_reads_every_page() {
    let net = start().await;
    let registry = net.devnet.urls.registry.clone();
    let key = Keypair::generate().unwrap();
    for n in 0..7 {
        net.mu.post_item(&message(&key, &registry, n, "Many")).await.unwrap();
    }
    let all = net.su.all(&registry, Range { limit: Some(3), by_nonce: true, ..Range::default() }).await.unwrap();
    let nonces: Vec<_> = all.iter().map(|n| n.assignment.tag("Nonce").unwrap().to_owned()).collect();
    assert_eq!(nonces, ["0", "1", "2", "3", "4", "5", "6", "7"]);
    net.devnet.shutdown().await;
}

// ---- --legacy-strict: the deployed SU's RSA-only behaviour ---------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_strict_scheduler_signs_with_rsa_and_refuses_ed25519_items() {
    let dir = tempfile::tempdir().unwrap();
    let devnet = Devnet::start(&DevnetOptions::new(dir.path(), 0).legacy_strict(true)).await.expect("devnet starts");
    assert_eq!(devnet.client_key_type(), ao_gpu_worker::attest::KeyType::Arweave);
    assert_eq!(devnet.authority.key_type(), ao_gpu_worker::attest::KeyType::Arweave);
    let su = SchedulerClient::new(&devnet.urls.scheduler, quick());
    let mu = MessengerClient::new(&devnet.urls.messenger, quick());
    let registry = devnet.urls.registry.clone();

    // An ed25519 item, valid in every other respect: refused with 400, directly and through the MU.
    let ed = message(&Keypair::generate().unwrap(), &registry, 1, "Ping");
    ed.verify().unwrap();
    for (unit, result) in [("scheduler", su.post_item(&ed).await.map(|_| ())), ("messenger", mu.post_item(&ed).await.map(|_| ()))] {
        match result {
            Err(NetError::Rejected { status, message, .. }) => {
                assert_eq!(status, 400, "{unit}: {message}");
                assert!(message.contains("signature type 2") && message.contains("type 1"), "{unit}: {message}");
            }
            other => panic!("{unit} accepted an ed25519 item in legacy-strict mode: {other:?}"),
        }
    }

    // An RSA item is scheduled, and the scheduler's assignments are RSA-signed too.
    let wallet = crate::support::arweave_test_key();
    let rsa = message(&wallet, &registry, 2, "Ping");
    assert_eq!(mu.post_item(&rsa).await.unwrap().id, rsa.id());
    let nodes = su.all(&registry, Range::default()).await.unwrap();
    assert_eq!(nodes.len(), 2, "the registry's boot entry and the RSA message; the ed25519 one is absent");
    check_schedule(&registry, &devnet.scheduler_address, &nodes);
    // The SU's JSON drops the assignments' binary anchors; the gateway has the whole items.
    let gw = GatewayClient::new(&devnet.urls.gateway, quick());
    for node in &nodes {
        for id in [&node.assignment.id, &node.message.as_ref().unwrap().id] {
            let item = gw.item(id).await.unwrap();
            assert_eq!(item.signature_type, SignatureType::Arweave, "{id}");
            DataItem::parse_verified(&item.to_bytes()).unwrap();
        }
    }
    assert_eq!(nodes[1].message.as_ref().unwrap().owner.address, wallet.address());
    devnet.shutdown().await;

    // The registry was signed once: a restart keeps it, and ed25519 data dirs are refused in this mode.
    let again = Devnet::start(&DevnetOptions::new(dir.path(), 0).legacy_strict(true)).await.unwrap();
    assert_eq!(again.urls.registry, registry);
    again.shutdown().await;
    let plain = tempfile::tempdir().unwrap();
    Devnet::start(&DevnetOptions::new(plain.path(), 0)).await.unwrap().shutdown().await;
    let err = Devnet::start(&DevnetOptions::new(plain.path(), 0).legacy_strict(true)).await.err().expect("ed25519 data dir refused");
    assert!(err.to_string().contains("fresh --data-dir"), "{err}");
}
