//! The work loop against a real devnet: workloads assigned and released through the
//! registry by an authority (and ignored from anyone else), every message evaluated once
//! and in nonce order across many schedule pages, results attested and posted.

use std::time::{Duration, Instant};

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::demo::{message, module_item};
use ao_gpu_worker::devnet::Devnet;
use ao_gpu_worker::net::scheduler::Range;
use ao_gpu_worker::net::{GatewayClient, MessengerClient, Policy, SchedulerClient};
use ao_gpu_worker::protocol::ao::{self, ItemType};
use ao_gpu_worker::protocol::{DataItem, DataItemBuilder, Tag};

use crate::support;

struct Setup {
    net: Devnet,
    worker: Worker,
    mu: MessengerClient,
    su: SchedulerClient,
    module: String,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (net, worker) = support::inproc::devnet_and_worker(dir.path(), "").await;
    let mu = MessengerClient::new(&net.urls.messenger, Policy::default());
    let su = SchedulerClient::new(&net.urls.scheduler, Policy::default());
    let module = module_item(&net.authority).unwrap();
    GatewayClient::new(&net.urls.gateway, Policy::default()).upload(&module).await.unwrap();
    Setup { net, worker, mu, su, module: module.id(), _dir: dir }
}

impl Setup {
    async fn spawn(&self, n: u64) -> String {
        let mut tags = ao::base_tags(ItemType::Process);
        tags.extend([Tag::new("Module", &self.module), Tag::new("Scheduler", &self.net.scheduler_address)]);
        let p = DataItemBuilder::new().anchor(ao::numeric_anchor(n)).tags(tags).data(b" ".to_vec()).sign(&self.net.authority).unwrap();
        self.mu.post_item(&p).await.unwrap();
        p.id()
    }

    async fn registry(&self, signer: &Keypair, action: &str, process: &str, n: u64) -> DataItem {
        let worker = self.worker.state.address.clone();
        let m = message(signer, &self.net.urls.registry, 1000 + n, &[("Action", action), ("Worker", &worker), ("Process", process)], "")
            .unwrap();
        self.mu.post_item(&m).await.unwrap();
        m
    }

    fn served(&self) -> Vec<String> {
        self.worker.state.jobs.journal.served().unwrap().into_iter().map(|s| s.process).collect()
    }

    /// Waits until the registry follower has read everything posted to the registry so far.
    async fn registry_read(&self) {
        let last = self.su.latest(&self.net.urls.registry).await.unwrap();
        let nonce: u64 = last.assignment.tag("Nonce").unwrap().parse().unwrap();
        wait(|| self.worker.state.jobs.journal.registry_cursor().unwrap() >= Some(nonce)).await;
    }
}

async fn wait(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "condition not met within 120 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_release_and_authority() {
    let s = setup().await;
    let (p1, p2) = (s.spawn(1).await, s.spawn(2).await);
    // A stranger's assignment is ignored; the authority's is obeyed.
    let stranger = Keypair::generate().unwrap();
    s.registry(&stranger, "Assign-Workload", &p1, 1).await;
    s.registry_read().await;
    assert!(s.served().is_empty(), "an assignment from a non-authority was obeyed");
    s.registry(&s.net.authority, "Assign-Workload", &p1, 2).await;
    s.registry(&s.net.authority, "Assign-Workload", &p2, 3).await;
    s.registry_read().await;
    let mut served = s.served();
    served.sort();
    let mut expected = vec![p1.clone(), p2.clone()];
    expected.sort();
    assert_eq!(served, expected);

    // Released: later messages to p2 are not evaluated.
    let user = Keypair::generate().unwrap();
    let before = message(&user, &p2, 1, &[("Action", "Increment")], "").unwrap();
    s.mu.post_item(&before).await.unwrap();
    let journal = s.worker.state.jobs.journal.clone();
    wait(|| journal.result_by_message(&before.id()).unwrap().is_some()).await;
    s.registry(&s.net.authority, "Release-Workload", &p2, 4).await;
    s.registry_read().await;
    assert_eq!(s.served(), vec![p1.clone()]);
    let after = message(&user, &p2, 2, &[("Action", "Increment")], "").unwrap();
    s.mu.post_item(&after).await.unwrap();
    // p1 keeps working meanwhile; by the time its message is done, p2's would have been too.
    let probe = message(&user, &p1, 3, &[("Action", "Get")], "").unwrap();
    s.mu.post_item(&probe).await.unwrap();
    wait(|| journal.result_by_message(&probe.id()).unwrap().is_some()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(journal.result_by_message(&after.id()).unwrap().is_none(), "a released process was evaluated");
    s.worker.shutdown().await;
    s.net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_once_in_order_across_pages() {
    let s = setup().await;
    let p = s.spawn(7).await;
    s.registry(&s.net.authority, "Assign-Workload", &p, 1).await;
    let user = Keypair::generate().unwrap();
    // 130 messages: more than one page (100) of the schedule.
    let mut ids = Vec::new();
    for i in 0..130u64 {
        let (action, amount) = if i % 13 == 12 { ("Fail", "0") } else { ("Increment", "1") };
        let m = message(&user, &p, i + 1, &[("Action", action), ("Amount", amount)], "").unwrap();
        s.mu.post_item(&m).await.unwrap();
        ids.push(m.id());
    }
    let get = message(&user, &p, 999, &[("Action", "Get")], "").unwrap();
    s.mu.post_item(&get).await.unwrap();
    let journal = s.worker.state.jobs.journal.clone();
    wait(|| journal.result_by_message(&get.id()).unwrap().is_some()).await;

    let results = journal.results(&p, None, None, usize::MAX, false).unwrap();
    let nonces: Vec<u64> = results.iter().map(|r| r.nonce).collect();
    assert_eq!(nonces, (0..=131).collect::<Vec<_>>(), "nonce 0 (the process) through the Get, each once, in order");
    let schedule = s.su.all(&p, Range::default()).await.unwrap();
    for (r, node) in results.iter().zip(&schedule) {
        assert_eq!(r.message, node.message.as_ref().unwrap().id, "result {} is for the scheduled message", r.nonce);
    }
    let failures = results.iter().filter(|r| r.response.get("Error").is_some()).count();
    assert_eq!(failures, 10);
    // 120 increments of 1; the 10 failures rolled back.
    assert_eq!(journal.result_by_message(&get.id()).unwrap().unwrap().response["Output"], "count=120");

    // Every result was attested, and every attestation reached the registry's schedule once.
    wait(|| journal.pending_count().unwrap() == 0).await;
    let registry = s.su.all(&s.net.urls.registry, Range::default()).await.unwrap();
    let attested: Vec<_> = registry
        .iter()
        .filter_map(|n| n.message.as_ref())
        .filter(|m| m.tag("Action") == Some("Compute-Attestation") && m.tag("Process") == Some(p.as_str()))
        .collect();
    assert_eq!(attested.len(), results.len());
    for (a, r) in attested.iter().zip(&results) {
        assert_eq!(a.tag("Message"), Some(r.message.as_str()));
        assert_eq!(a.tag("Result-SHA256"), Some(r.result_hash.as_str()));
        assert_eq!(a.owner.address, s.worker.state.address);
        a.to_item().unwrap().verify().unwrap();
    }
    let metrics = s.worker.state.metrics.render();
    for line in [
        "ao_worker_evaluations_total{result=\"ok\"} 122",
        "ao_worker_evaluations_total{result=\"error\"} 10",
        "ao_worker_posted_total{kind=\"attestation\"} 132",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    s.worker.shutdown().await;
    s.net.shutdown().await;
}
