//! Crash safety (src/journal.rs): a real worker process is killed with SIGKILL at random
//! moments while a stream of messages arrives, several times, and restarted each time on the
//! same data dir. Afterwards every message must have been evaluated exactly once and in
//! order, every result and attestation posted exactly once (by id), nothing left pending,
//! and the final state identical to an uninterrupted run of the same schedule.
//!
//! The reference run evaluates the very schedule the crash run evaluated (same devnet, same
//! assignments) in a fresh data dir, in process, without kills and with a messenger that
//! cannot be reached, so it posts nothing. A second devnet would not do: the scheduler
//! stamps each message with its own timestamp and hash chain, the actor sees them in its
//! message JSON, and their bytes stay in the linear memory that is the state, so no two
//! schedules of the same messages give the same state hash.
//!
//! It runs twice: with an ed25519 worker, and with an Arweave RSA worker, whose randomized
//! signatures make any item signed twice visible as a second id on the network.
//!
//! The kill intervals and the gaps between messages come from a seed printed at the start;
//! `CRASH_SEED=<n>` replays them (the machine's own timing is not replayed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::config::{Config, Overrides};
use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::demo::COUNTER_WASM;
use ao_gpu_worker::journal::{Journal, OutKind, ResultRecord};
use ao_gpu_worker::net::scheduler::Range;
use ao_gpu_worker::net::{GatewayClient, MessengerClient, Policy, SchedulerClient};
use ao_gpu_worker::protocol::ao;
use ao_gpu_worker::protocol::su::MessageNode;
use ao_gpu_worker::protocol::{DataItem, DataItemBuilder};

use crate::support::binary::{Guard, command, start_devnet};

/// Everything must be done by then, on however loaded a machine.
const OVERALL: Duration = Duration::from_secs(180);
/// Messages in the stream, before the final `Get`.
const STREAM: usize = 60;

fn spawn_worker(config: &Path, log: &Path) -> Guard {
    let log = File::create(log).unwrap();
    Guard(command().args(["run", "--config"]).arg(config).stdout(Stdio::null()).stderr(log).spawn().expect("worker starts"))
}

/// The last lines of every worker log, for failure messages.
fn logs_tail(logs: &[PathBuf]) -> String {
    let mut out = String::new();
    for path in logs {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!("\n--- {} (last 15 of {} lines)\n", path.display(), lines.len()));
        for l in &lines[lines.len().saturating_sub(15)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// A halt is final: report it at once rather than at the deadline.
fn halted_in(logs: &[PathBuf]) -> Option<String> {
    logs.iter()
        .flat_map(|p| std::fs::read_to_string(p).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>())
        .find(|l| l.contains("process halted"))
}

/// Waits until the worker has started: its capacity advertisement is logged once
/// `Worker::start` has returned, so its SIGTERM handler is in place.
async fn wait_started(worker: &mut Guard, logs: &[PathBuf], deadline: Instant) {
    let log = logs.last().unwrap();
    while !std::fs::read_to_string(log).unwrap_or_default().contains("capacity advertised") {
        if let Some(status) = worker.0.try_wait().unwrap() {
            panic!("worker exited by itself ({status}){}", logs_tail(logs));
        }
        assert!(Instant::now() < deadline, "worker not started within {OVERALL:?}{}", logs_tail(logs));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops the worker with SIGTERM. It must exit 0, or die of the SIGTERM itself if that came
/// before its handler was in place (no different from a kill, which the journal survives).
async fn stop(worker: &mut Guard, logs: &[PathBuf]) {
    use std::os::unix::process::ExitStatusExt as _;
    let pid = worker.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let stop_by = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = worker.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < stop_by, "worker did not stop within 30 s of SIGTERM{}", logs_tail(logs));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success() || status.signal() == Some(15), "exit status after SIGTERM: {status}{}", logs_tail(logs));
}

fn module_item(key: &Keypair) -> DataItem {
    let tags = ao::module_tags("counter", "16-mb", "1000000000");
    DataItemBuilder::new().anchor(ao::numeric_anchor(0)).tags(tags).data(COUNTER_WASM.to_vec()).sign(key).unwrap()
}

fn process_item(key: &Keypair, module: &str, scheduler: &str, n: u64, name: &str) -> DataItem {
    ao_gpu_worker::demo::process_item(key, module, scheduler, n, name).unwrap()
}

fn message(key: &Keypair, target: &str, anchor: u64, tags: &[(&str, &str)]) -> DataItem {
    ao_gpu_worker::demo::message(key, target, anchor, tags, "").unwrap()
}

/// One message of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Increment(u64),
    Fail,
    Ping,
    Get,
}

/// The stream: mostly increments by varied amounts, a failure and a ping every ten, a final
/// `Get`. Fixed, so a failure replays with the same messages.
fn plan() -> Vec<Step> {
    let mut steps: Vec<Step> = (0..STREAM as u64)
        .map(|i| match i % 10 {
            3 => Step::Fail,
            7 => Step::Ping,
            _ => Step::Increment(1 + (i * 7919) % 97),
        })
        .collect();
    steps.push(Step::Get);
    steps
}

fn nonce_of(node: &MessageNode) -> u64 {
    node.assignment.tag("Nonce").and_then(|n| n.parse().ok()).expect("assignment has a Nonce")
}

fn message_id(node: &MessageNode) -> String {
    node.message.as_ref().map(|m| m.id.clone()).unwrap_or_default()
}

async fn schedule(su: &SchedulerClient, process: &str) -> Vec<MessageNode> {
    su.all(process, Range::default()).await.expect("schedule readable")
}

/// Attestations this worker posted to the registry: (Process, Nonce) → (attestation id, Message).
fn attestations(registry: &[MessageNode], worker: &str) -> Vec<((String, u64), (String, String))> {
    registry
        .iter()
        .filter_map(|n| n.message.as_ref())
        .filter(|m| m.owner.address == worker && m.tag("Action") == Some("Compute-Attestation"))
        .map(|m| {
            let process = m.tag("Process").expect("attestation names its process").to_owned();
            let nonce = m.tag("Nonce").and_then(|n| n.parse().ok()).expect("attestation has a numeric Nonce");
            ((process, nonce), (m.id.clone(), m.tag("Message").expect("attestation names its message").to_owned()))
        })
        .collect()
}

/// A result without its attestation ids (they name the worker's latest capacity
/// advertisement, which differs between runs), plus those ids.
fn split_attestations(j: &Journal, r: &ResultRecord) -> (ResultRecord, Vec<String>) {
    let mut r = r.clone();
    let (att, rest): (Vec<String>, Vec<String>) =
        r.posted.iter().cloned().partition(|id| j.outgoing(id).unwrap().is_some_and(|o| o.kind == OutKind::Attestation));
    r.posted = rest;
    (r, att)
}

/// Which identity the killed worker signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Identity {
    /// Deterministic signatures: the crash run and the reference post the very same ids.
    Ed25519,
    /// An Arweave RSA wallet: RSA-PSS signatures are randomized, so an item signed again after a
    /// kill would reach the network under a second id. Every id on the network must be the one
    /// journaled before the kill, once (src/journal.rs, sign once).
    Arweave,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_at_random_loses_and_duplicates_nothing() {
    killed_at_random(Identity::Ed25519).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rsa_worker_killed_at_random_posts_each_signed_item_once() {
    killed_at_random(Identity::Arweave).await;
}

async fn killed_at_random(identity: Identity) {
    let started = Instant::now();
    let deadline = started + OVERALL;
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    eprintln!("crash test: seed {seed} (replay with CRASH_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);

    let tmp = tempfile::tempdir().unwrap();
    let devnet_dir = tmp.path().join("devnet");
    let (_devnet, urls) = start_devnet(&devnet_dir);
    let authority = Keypair::load(&devnet_dir.join("authority.key")).unwrap();
    let policy = Policy { max_attempts: 8, ..Policy::default() };
    let mu = MessengerClient::new(&urls.messenger, policy.clone());
    let su = SchedulerClient::new(&urls.scheduler, policy.clone());
    let gw = GatewayClient::new(&urls.gateway, policy);

    // The counter module and two processes, A (the stream) and B (receives A's Pongs).
    let publisher = Keypair::from_secret(&[0x51; 32]);
    let user = Keypair::from_secret(&[0x52; 32]);
    let module = module_item(&publisher);
    gw.upload(&module).await.unwrap();
    let scheduler = su.info().await.unwrap().address;
    let a = process_item(&publisher, &module.id(), &scheduler, 1, "crash-a");
    let b = process_item(&publisher, &module.id(), &scheduler, 2, "crash-b");
    let (a_id, b_id) = (a.id(), b.id());
    for p in [&a, &b] {
        mu.post_item(p).await.unwrap();
    }

    // The worker: its own key and data dir, following the devnet's registry.
    let worker_dir = tmp.path().join("worker");
    let key_file = tmp.path().join("worker.key");
    let address = match identity {
        Identity::Ed25519 => {
            let out = command().args(["keygen", "--out"]).arg(&key_file).output().unwrap();
            assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["address"].as_str().unwrap().to_owned()
        }
        Identity::Arweave => {
            crate::support::write_arweave_test_key(&key_file);
            crate::support::arweave_test_key().address()
        }
    };
    eprintln!("crash test: the worker signs as {identity:?} ({address})");
    let worker_config = |data_dir: &Path, messenger: &str, max_attempts: u32| {
        format!(
            "[worker]\ndata_dir = {data:?}\nkey_file = {key:?}\n[network]\nscheduler_url = {su:?}\nmessenger_url = {messenger:?}\n\
             gateway_url = {gw:?}\nmax_attempts = {max_attempts}\n[registry]\nprocess = {reg:?}\nauthorities = [{auth:?}]\n\
             poll_interval = \"100ms\"\n[api]\nlisten = \"127.0.0.1:0\"\n",
            data = data_dir.display().to_string(),
            key = key_file.display().to_string(),
            su = urls.scheduler,
            gw = urls.gateway,
            reg = urls.registry,
            auth = authority.address(),
        )
    };
    let config = tmp.path().join("worker.toml");
    std::fs::write(&config, worker_config(&worker_dir, &urls.messenger, 5)).unwrap();

    // Both processes assigned to it through the registry, signed by the devnet's authority.
    for (i, p) in [&a_id, &b_id].into_iter().enumerate() {
        let assign = message(
            &authority,
            &urls.registry,
            900 + i as u64,
            &[("Action", "Assign-Workload"), ("Worker", &address), ("Process", p.as_str())],
        );
        mu.post_item(&assign).await.unwrap();
    }

    // The stream, signed in advance: deterministic anchors, so deterministic ids.
    let steps = plan();
    let messages: Vec<DataItem> = steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let anchor = 1000 + i as u64;
            match step {
                Step::Increment(n) => message(&user, &a_id, anchor, &[("Action", "Increment"), ("Amount", &n.to_string())]),
                Step::Fail => message(&user, &a_id, anchor, &[("Action", "Fail")]),
                Step::Ping => message(&user, &a_id, anchor, &[("Action", "Ping"), ("Reply-To", &b_id)]),
                Step::Get => message(&user, &a_id, anchor, &[("Action", "Get")]),
            }
        })
        .collect();
    let pings = steps.iter().filter(|s| **s == Step::Ping).count();
    let expected_count: u64 = steps.iter().map(|s| if let Step::Increment(n) = s { *n } else { 0 }).sum();
    let gaps: Vec<u64> = (0..messages.len()).map(|_| rng.u64(10..=70)).collect();
    let kills = rng.usize(4..=6);
    let intervals: Vec<u64> = (0..kills).map(|_| rng.u64(0..=400)).collect();
    eprintln!("crash test: {} messages, {kills} kills after {intervals:?} ms", messages.len());

    let mut logs = vec![tmp.path().join("worker-0.log")];
    let mut worker = spawn_worker(&config, &logs[0]);

    let posted = Arc::new(AtomicUsize::new(0));
    let feeder = {
        let (mu, messages, posted) = (mu.clone(), messages.clone(), posted.clone());
        tokio::spawn(async move {
            for (m, gap) in messages.iter().zip(gaps) {
                mu.post_item(m).await.expect("the messenger accepts the stream");
                posted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(gap)).await;
            }
        })
    };

    // Each kill comes at a random moment once the worker (re)started has put at least one more
    // attestation on the registry (or after 10 s without), so kills land while it evaluates,
    // signs and posts, whatever its start-up time (an RSA worker starts slower).
    let mut attested = 0;
    for (k, wait) in intervals.iter().enumerate() {
        let gate = Instant::now() + Duration::from_secs(10);
        while Instant::now() < gate && attestations(&schedule(&su, &urls.registry).await, &address).len() <= attested {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(*wait)).await;
        if let Some(status) = worker.0.try_wait().unwrap() {
            panic!("worker exited by itself ({status}) before kill {}{}", k + 1, logs_tail(&logs));
        }
        worker.0.kill().unwrap(); // SIGKILL
        worker.0.wait().unwrap();
        attested = attestations(&schedule(&su, &urls.registry).await, &address).len();
        eprintln!(
            "crash test: kill {}/{kills} at {:?} ({} of {} messages posted, {attested} attestations on the registry)",
            k + 1,
            started.elapsed(),
            posted.load(Ordering::SeqCst),
            messages.len()
        );
        logs.push(tmp.path().join(format!("worker-{}.log", k + 1)));
        worker = spawn_worker(&config, logs.last().unwrap());
    }
    tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), feeder)
        .await
        .expect("the stream is posted before the deadline")
        .unwrap();
    eprintln!("crash test: stream posted at {:?}", started.elapsed());

    // The last worker runs until every message of A and B is attested on the registry and
    // B has received every Pong.
    let wanted: HashSet<(String, u64)> =
        (0..=messages.len() as u64).map(|n| (a_id.clone(), n)).chain((0..=pings as u64).map(|n| (b_id.clone(), n))).collect();
    loop {
        if let Some(line) = halted_in(&logs) {
            panic!("a process halted: {line}{}", logs_tail(&logs));
        }
        if let Some(status) = worker.0.try_wait().unwrap() {
            panic!("worker exited by itself ({status}){}", logs_tail(&logs));
        }
        let registry = schedule(&su, &urls.registry).await;
        let attested: HashSet<(String, u64)> = attestations(&registry, &address).into_iter().map(|(k, _)| k).collect();
        let b_len = schedule(&su, &b_id).await.len();
        if b_len == 1 + pings && wanted.is_subset(&attested) {
            break;
        }
        if Instant::now() >= deadline {
            let mut missing: Vec<_> = wanted.difference(&attested).collect();
            missing.sort();
            panic!(
                "not done within {OVERALL:?}: {} of {} messages attested (missing {:?}), B has {b_len} of {} entries{}",
                wanted.len() - missing.len(),
                wanted.len(),
                &missing[..missing.len().min(8)],
                1 + pings,
                logs_tail(&logs)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("crash test: all attested at {:?}", started.elapsed());

    // Stop it, so its journal can be opened here. Everything is on the network, but if the
    // last kill came between a post and its confirmation, the worker running now has yet to
    // re-post that item (the network keeps one copy) and confirm it: stopping it before then
    // leaves the item pending, so it runs again until its journal has nothing left to post.
    let journal = loop {
        wait_started(&mut worker, &logs, deadline).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop(&mut worker, &logs).await;
        let journal = Journal::open(&worker_dir.join("journal.redb")).unwrap();
        let pending = journal.pending_count().unwrap();
        if pending == 0 {
            break journal;
        }
        let items: Vec<_> = journal.pending(10).unwrap().into_iter().map(|o| (o.id, o.kind, o.process, o.nonce)).collect();
        assert!(Instant::now() < deadline, "items still pending after {OVERALL:?}: {items:?}{}", logs_tail(&logs));
        eprintln!("crash test: {pending} item(s) pending at stop, the worker runs again: {items:?}");
        drop(journal);
        logs.push(tmp.path().join(format!("worker-{}.log", logs.len())));
        worker = spawn_worker(&config, logs.last().unwrap());
    };

    // The schedules: A holds the stream in the order it was sent, B one Pong per Ping.
    let a_sched = schedule(&su, &a_id).await;
    let b_sched = schedule(&su, &b_id).await;
    let registry = schedule(&su, &urls.registry).await;
    let expected_a: Vec<String> = std::iter::once(a_id.clone()).chain(messages.iter().map(DataItem::id)).collect();
    assert_eq!(a_sched.iter().map(message_id).collect::<Vec<_>>(), expected_a, "A's schedule is the stream, in order");
    assert_eq!(b_sched.len(), 1 + pings, "B's schedule: its process message and one Pong per Ping");
    assert_eq!(message_id(&b_sched[0]), b_id);

    // Every scheduled message evaluated exactly once, in nonce order.
    let mut results: HashMap<String, Vec<ResultRecord>> = HashMap::new();
    for (p, sched) in [(&a_id, &a_sched), (&b_id, &b_sched)] {
        let rs = journal.results(p, None, None, usize::MAX, false).unwrap();
        let nonces: Vec<u64> = rs.iter().map(|r| r.nonce).collect();
        assert_eq!(nonces, (0..sched.len() as u64).collect::<Vec<_>>(), "results of {p}: nonces 0..=n, each once");
        for (r, node) in rs.iter().zip(sched.iter()) {
            assert_eq!((r.nonce, r.message.as_str()), (nonce_of(node), message_id(node).as_str()), "result {} of {p}", r.nonce);
        }
        let progress = journal.progress(p).unwrap().unwrap();
        assert_eq!(progress.nonce, sched.len() as u64 - 1, "progress of {p}");
        assert_eq!(progress.state_hash, rs.iter().rev().find_map(|r| r.state_hash.clone()), "progress state of {p}");
        results.insert(p.clone(), rs);
    }

    // What each evaluation posted: all confirmed, one attestation each, A's Pongs are B's
    // schedule and nothing else is.
    let b_pongs: Vec<String> = b_sched[1..].iter().map(message_id).collect();
    let mut pongs_posted = Vec::new();
    let mut attestations_posted: BTreeMap<(String, u64), String> = BTreeMap::new();
    for rs in results.values() {
        for r in rs {
            let mut atts = 0;
            for id in &r.posted {
                let item = journal.outgoing(id).unwrap().unwrap_or_else(|| panic!("posted item {id} missing from the journal"));
                assert!(item.confirmed && item.refused.is_none(), "item {id} not confirmed: {:?}", item.refused);
                assert_eq!((item.process.as_str(), item.nonce), (r.process.as_str(), r.nonce));
                match item.kind {
                    OutKind::Attestation => {
                        atts += 1;
                        assert!(attestations_posted.insert((r.process.clone(), r.nonce), id.clone()).is_none());
                    }
                    OutKind::Message => pongs_posted.push(id.clone()),
                    OutKind::Spawn => panic!("the counter spawns nothing"),
                }
            }
            assert_eq!(atts, 1, "result {} of {}: one attestation", r.nonce, r.process);
        }
    }
    pongs_posted.sort();
    let mut pongs_scheduled = b_pongs.clone();
    pongs_scheduled.sort();
    assert_eq!(pongs_posted, pongs_scheduled, "each Pong posted once and scheduled on B once");
    for node in &b_sched[1..] {
        let m = node.message.as_ref().unwrap();
        assert_eq!((m.tag("Action"), m.tag("From-Process")), (Some("Pong"), Some(a_id.as_str())));
    }

    // The registry: exactly one attestation per evaluated message, each the one journaled.
    let on_registry = attestations(&registry, &address);
    let mut by_slot: BTreeMap<(String, u64), Vec<(String, String)>> = BTreeMap::new();
    for (slot, v) in on_registry {
        by_slot.entry(slot).or_default().push(v);
    }
    let dupes: Vec<_> = by_slot.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(dupes.is_empty(), "several attestations for one (Process, Nonce): {dupes:?}");
    assert_eq!(by_slot.len(), attestations_posted.len(), "attestations on the registry vs in the journal");
    for (slot, v) in &by_slot {
        let (id, msg) = &v[0];
        assert_eq!(attestations_posted.get(slot), Some(id), "attestation for {slot:?}");
        let r = &results[&slot.0][slot.1 as usize];
        assert_eq!(msg, &r.message, "attestation {id} names the evaluated message");
    }

    // What the actor computed.
    let a_results = &results[&a_id];
    for (step, r) in steps.iter().zip(&a_results[1..]) {
        match step {
            Step::Fail => assert_eq!(r.response["Error"], "failed on purpose"),
            Step::Ping => assert_eq!(r.response["Output"], "pong"),
            Step::Increment(_) | Step::Get => assert!(r.response.get("Error").is_none(), "{}", r.response),
        }
    }
    let final_output = a_results.last().unwrap().response["Output"].clone();
    assert_eq!(final_output, format!("count={expected_count}"), "every increment applied once, every failure rolled back");
    // Attestations name the capacity advertisement of their run, so their ids (and the chain
    // kept in the progress) differ between the two runs: compared apart, like the results'.
    let without_attestation = |mut p: ao_gpu_worker::journal::Progress| {
        assert!(p.attestation.is_some(), "the progress keeps the last attestation (the chain)");
        p.attestation = None;
        p
    };
    let crash_progress: Vec<_> = [&a_id, &b_id].iter().map(|p| without_attestation(journal.progress(p).unwrap().unwrap())).collect();
    let crash_results: Vec<(ResultRecord, Vec<String>)> =
        [&a_id, &b_id].iter().flat_map(|p| results[*p].iter().map(|r| split_attestations(&journal, r))).collect();
    drop(journal);
    eprintln!("crash test: crash run checked at {:?}", started.elapsed());

    // The reference: the same schedule, evaluated without interruption by the same worker
    // identity in a fresh data dir, posting nothing (its messenger refuses connections).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let text = worker_config(&tmp.path().join("reference"), &dead_url, 1);
    let reference =
        Worker::start(Config::parse("(reference)", &text, &Overrides::default()).unwrap(), Keypair::load(&key_file).unwrap(), None)
            .await
            .unwrap();
    let rj = reference.state.jobs.journal.clone();
    loop {
        if let Some((p, why)) = reference.state.jobs.halted().into_iter().next() {
            panic!("reference run: process {p} halted: {why}");
        }
        let done = |p: &str, last: usize| rj.progress(p).unwrap().is_some_and(|g| g.nonce == last as u64);
        if done(&a_id, messages.len()) && done(&b_id, pings) {
            break;
        }
        assert!(Instant::now() < deadline, "reference run not done within {OVERALL:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ref_progress: Vec<_> = [&a_id, &b_id].iter().map(|p| without_attestation(rj.progress(p).unwrap().unwrap())).collect();
    let ref_results: Vec<(ResultRecord, Vec<String>)> = [&a_id, &b_id]
        .iter()
        .flat_map(|p| {
            rj.results(p, None, None, usize::MAX, false).unwrap().into_iter().map(|r| split_attestations(&rj, &r)).collect::<Vec<_>>()
        })
        .collect();
    reference.shutdown().await;

    assert_eq!(crash_progress, ref_progress, "final progress (nonce, hash chain, state hash) of the crash run and the reference");
    assert_eq!(crash_results.len(), ref_results.len());
    for ((c, c_att), (r, r_att)) in crash_results.iter().zip(&ref_results) {
        match identity {
            Identity::Ed25519 => assert_eq!(c, r, "result {} of {}: crash run vs reference (outbox ids included)", c.nonce, c.process),
            // Randomized signatures: the reference signed its own outbox items under other ids
            // (the checks above tie every id the crash run posted to its journal, once).
            Identity::Arweave => {
                assert_eq!(c.posted.len(), r.posted.len(), "result {} of {}: outbox items", c.nonce, c.process);
                let strip = |x: &ResultRecord| ResultRecord { posted: Vec::new(), ..x.clone() };
                assert_eq!(strip(c), strip(r), "result {} of {}: crash run vs reference (outbox ids aside)", c.nonce, c.process);
            }
        }
        assert_eq!((c_att.len(), r_att.len()), (1, 1));
    }
    eprintln!(
        "crash test ({identity:?}): seed {seed}, {kills} kills, {} results identical to the reference, final {final_output}, {:?} in all",
        crash_results.len(),
        started.elapsed()
    );
}
