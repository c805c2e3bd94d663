//! Sign once (src/journal.rs): RSA-PSS signatures are randomized, so an RSA worker that signed
//! an item again after a crash would post it under a second id. Here an RSA worker on a
//! `--legacy-strict` devnet evaluates messages and signs their outbox message, attestations
//! and its capacity advertisement while its messenger cannot be reached: everything it signed
//! is journaled and nothing is posted. It is then stopped, which leaves on disk exactly what a
//! crash between signing and posting leaves, and restarted with a reachable messenger. Every
//! id that reaches the network must be one signed before the restart, each exactly once. The
//! same with SIGKILLs at random moments is `crash::an_rsa_worker_killed_at_random_posts_each_signed_item_once`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use ao_gpu_worker::attest::{KeyType, Keypair};
use ao_gpu_worker::config::{Config, Overrides};
use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::demo::{COUNTER_WASM, message, process_item};
use ao_gpu_worker::devnet::{Devnet, DevnetOptions};
use ao_gpu_worker::journal::OutKind;
use ao_gpu_worker::net::scheduler::Range;
use ao_gpu_worker::net::{GatewayClient, MessengerClient, Policy, SchedulerClient};
use ao_gpu_worker::protocol::{DataItem, DataItemBuilder, SignatureType, ao};

const WAIT: Duration = Duration::from_secs(120);

fn worker_config(data_dir: &Path, key_file: &Path, net: &Devnet, messenger: &str) -> Config {
    let text = format!(
        "[worker]\ndata_dir = {data:?}\nkey_file = {key:?}\n[network]\nscheduler_url = {su:?}\nmessenger_url = {messenger:?}\n\
         gateway_url = {gw:?}\nmax_attempts = 1\n[registry]\nprocess = {reg:?}\nauthorities = [{auth:?}]\npoll_interval = \"50ms\"\n\
         advertise_interval = \"1h\"\n[api]\nlisten = \"127.0.0.1:0\"\n[gpu]\nstartup_bench = \"off\"\n",
        data = data_dir.display().to_string(),
        key = key_file.display().to_string(),
        su = net.urls.scheduler,
        gw = net.urls.gateway,
        reg = net.urls.registry,
        auth = net.authority.address(),
    );
    Config::parse("(sign-once test)", &text, &Overrides::default()).unwrap()
}

async fn until<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rsa_worker_restarted_between_signing_and_posting_posts_only_what_it_first_signed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut net = Devnet::start(&DevnetOptions::new(tmp.path().join("devnet"), 0).legacy_strict(true)).await.unwrap();
    let policy = Policy { max_attempts: 3, ..Policy::default() };
    let mu = MessengerClient::new(&net.urls.messenger, policy.clone());
    let su = SchedulerClient::new(&net.urls.scheduler, policy.clone());
    let authority = &net.authority;

    // The counter module and two processes: A gets the messages, B receives A's Pong.
    let module = DataItemBuilder::new()
        .anchor(ao::numeric_anchor(0))
        .tags(ao::module_tags("counter", "16-mb", "1000000000"))
        .data(COUNTER_WASM.to_vec())
        .sign(authority)
        .unwrap();
    GatewayClient::new(&net.urls.gateway, policy).upload(&module).await.unwrap();
    let a = process_item(authority, &module.id(), &net.scheduler_address, 1, "sign-once-a").unwrap();
    let b = process_item(authority, &module.id(), &net.scheduler_address, 2, "sign-once-b").unwrap();
    let (a_id, b_id) = (a.id(), b.id());
    for p in [&a, &b] {
        mu.post_item(p).await.unwrap();
    }

    // The worker: an Arweave wallet, a messenger that refuses connections.
    let key_file = tmp.path().join("worker.key");
    crate::support::write_arweave_test_key(&key_file);
    let wallet = Keypair::load(&key_file).unwrap();
    assert_eq!(wallet.key_type(), KeyType::Arweave);
    let address = wallet.address();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let data_dir = tmp.path().join("worker");
    let listener = net.worker_listener.take();
    let worker = Worker::start(worker_config(&data_dir, &key_file, &net, &dead_url), wallet, listener).await.unwrap();
    for (i, p) in [&a_id, &b_id].into_iter().enumerate() {
        let assign = message(
            authority,
            &net.urls.registry,
            10 + i as u64,
            &[("Action", "Assign-Workload"), ("Worker", &address), ("Process", p)],
            "",
        )
        .unwrap();
        mu.post_item(&assign).await.unwrap();
    }
    let user = Keypair::generate_arweave().unwrap();
    let sent: Vec<DataItem> = [vec![("Action", "Increment"), ("Amount", "3")], vec![("Action", "Ping"), ("Reply-To", b_id.as_str())]]
        .iter()
        .enumerate()
        .map(|(i, tags)| message(&user, &a_id, 100 + i as u64, tags, "").unwrap())
        .collect();
    for m in &sent {
        mu.post_item(m).await.unwrap();
    }

    // Everything evaluated and signed; nothing posted.
    let journal = worker.state.jobs.journal.clone();
    let ping = until("A's messages evaluated", async || journal.result_by_message(&sent[1].id()).unwrap()).await;
    until("the advertisement signed and journaled", async || journal.pending_advertisement().unwrap()).await;
    until("the spawns of A and B evaluated", async || journal.progress(&b_id).unwrap()).await;
    worker.shutdown().await;
    let signed: BTreeMap<String, (OutKind, String, u64, Vec<u8>)> =
        journal.pending(1000).unwrap().into_iter().map(|o| (o.id, (o.kind, o.process, o.nonce, o.bytes))).collect();
    let advert = DataItem::parse(&journal.pending_advertisement().unwrap().unwrap()).unwrap();
    drop(journal);
    assert!(signed.values().all(|(.., bytes)| DataItem::parse_verified(bytes).unwrap().signature_type == SignatureType::Arweave));
    let attested: Vec<_> = signed.values().filter(|(kind, ..)| *kind == OutKind::Attestation).collect();
    assert_eq!(attested.len(), 4, "one attestation for each of A's spawn and 2 messages and B's spawn: {signed:?}");
    let pongs: Vec<&String> = signed.iter().filter(|(_, (kind, ..))| *kind == OutKind::Message).map(|(id, _)| id).collect();
    assert_eq!(pongs.len(), 1, "the Ping's Pong");
    assert!(ping.posted.contains(pongs[0]));

    // What a re-sign would do: the same content under another id.
    let pong = DataItem::parse(&signed[pongs[0]].3).unwrap();
    let resigned = DataItemBuilder::new()
        .target(pong.target.unwrap())
        .anchor(pong.anchor.unwrap())
        .tags(pong.tags.clone())
        .data(pong.data.clone())
        .sign(&crate::support::arweave_test_key())
        .unwrap();
    assert_eq!(resigned.signature_data(), pong.signature_data());
    assert_ne!(resigned.id(), pong.id(), "signing again gives a second id");

    // The restart, with a messenger that works: the journaled bytes go out.
    let worker = Worker::start(worker_config(&data_dir, &key_file, &net, &net.urls.messenger), Keypair::load(&key_file).unwrap(), None)
        .await
        .unwrap();
    let journal = worker.state.jobs.journal.clone();
    // B's evaluation of the Pong comes after the Pong is posted: wait for it, and for its
    // attestation to be posted too, before looking at the network.
    until("B's Pong evaluated", async || journal.progress(&b_id).unwrap().filter(|p| p.nonce >= 1)).await;
    until("everything posted", async || {
        (journal.pending_count().unwrap() == 0 && journal.pending_advertisement().unwrap().is_none()).then_some(())
    })
    .await;
    for (id, (kind, ..)) in &signed {
        let out = journal.outgoing(id).unwrap().unwrap();
        assert!(out.confirmed && out.refused.is_none(), "{kind:?} {id}: {out:?}");
    }
    // The advertisement journaled before the restart goes out first, then a current one.
    until("a fresh advertisement after the journaled one", async || {
        worker.state.status().last_advertisement.as_ref().is_some_and(|a| a.id != advert.id()).then_some(())
    })
    .await;
    worker.shutdown().await;

    // On the network: each slot attested once, by the id signed before the restart; the Pong
    // scheduled on B once, by that id; the advertisement signed before the restart is there.
    let registry = su.all(&net.urls.registry, Range::default()).await.unwrap();
    let mut by_slot: HashMap<(String, String), Vec<String>> = HashMap::new();
    for n in registry.iter().filter_map(|n| n.message.as_ref()).filter(|m| m.owner.address == address) {
        if n.tag("Action") == Some("Compute-Attestation") {
            let slot = (n.tag("Process").unwrap().to_owned(), n.tag("Nonce").unwrap().to_owned());
            by_slot.entry(slot).or_default().push(n.id.clone());
        }
    }
    let before: HashMap<(String, String), &String> = signed
        .iter()
        .filter(|(_, (kind, ..))| *kind == OutKind::Attestation)
        .map(|(id, (_, process, nonce, _))| ((process.clone(), nonce.to_string()), id))
        .collect();
    for (slot, ids) in &by_slot {
        assert_eq!(ids.len(), 1, "slot {slot:?} attested under several ids: {ids:?}");
        match before.get(slot) {
            Some(id) => assert_eq!(&ids[0], *id, "slot {slot:?} attested under another id than the one signed before the restart"),
            // Only the Pong's evaluation on B comes after the restart.
            None => assert_eq!(slot, &(b_id.clone(), "1".to_owned()), "attestation {} was signed after the restart", ids[0]),
        }
    }
    assert_eq!(by_slot.len(), before.len() + 1, "{by_slot:?}");
    let adverts: Vec<&str> = registry
        .iter()
        .filter_map(|n| n.message.as_ref())
        .filter(|m| m.owner.address == address && m.tag("Action") == Some("Advertise-Capacity"))
        .map(|m| m.id.as_str())
        .collect();
    assert_eq!(adverts.len(), 2, "the journaled advertisement and one fresh one: {adverts:?}");
    assert_eq!(adverts[0], advert.id(), "the first advertisement is the one signed before the restart");
    let b_sched = su.all(&b_id, Range::default()).await.unwrap();
    let on_b: Vec<String> = b_sched.iter().skip(1).filter_map(|n| n.message.as_ref().map(|m| m.id.clone())).collect();
    assert_eq!(on_b, vec![pong.id()], "B got the Pong once, under the id signed before the restart");
    net.shutdown().await;
}
