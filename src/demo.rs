//! The devnet demo, the README's main job: publish the counter actor, spawn two processes,
//! assign them to the worker through the registry, send messages, and report each result,
//! the outbox messages delivered and the attestations posted — all through the AO units'
//! HTTP APIs, as any client would.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use crate::attest::Keypair;
use crate::daemon::{Worker, now_ms};
use crate::devnet::Devnet;
use crate::journal::{OutKind, ResultRecord};
use crate::net::{GatewayClient, MessengerClient, Policy};
use crate::protocol::ao::{self, ItemType};
use crate::protocol::{DataItem, DataItemBuilder, Tag, b64};

/// The counter/echo actor (examples/actors/counter.c).
pub const COUNTER_WASM: &[u8] = include_bytes!("../examples/actors/counter.wasm");

/// One demo message: its action, extra tags and data.
type Step<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);

const WAIT: Duration = Duration::from_secs(120);

/// The counter module as a signed item, ready to publish.
pub fn module_item(key: &Keypair) -> anyhow::Result<DataItem> {
    let tags = ao::module_tags("counter", "16-mb", "1000000000");
    Ok(DataItemBuilder::new().anchor(ao::numeric_anchor(0)).tags(tags).data(COUNTER_WASM.to_vec()).sign(key)?)
}

/// A signed Process item running `module` on `scheduler`, with a numeric anchor and a `Name`.
pub fn process_item(key: &Keypair, module: &str, scheduler: &str, anchor: u64, name: &str) -> anyhow::Result<DataItem> {
    let mut tags = ao::base_tags(ItemType::Process);
    tags.extend([Tag::new("Module", module), Tag::new("Scheduler", scheduler), Tag::new("Name", name)]);
    Ok(DataItemBuilder::new().anchor(ao::numeric_anchor(anchor)).tags(tags).data(b" ".to_vec()).sign(key)?)
}

/// A signed AO message to `target` with the given extra tags.
pub fn message(key: &Keypair, target: &str, anchor: u64, tags: &[(&str, &str)], data: &str) -> anyhow::Result<DataItem> {
    let mut all = ao::base_tags(ItemType::Message);
    all.extend(tags.iter().map(|(n, v)| Tag::new(*n, *v)));
    let data = if data.is_empty() { " " } else { data };
    Ok(DataItemBuilder::new()
        .target(b64::decode_id(target)?)
        .anchor(ao::numeric_anchor(anchor))
        .tags(all)
        .data(data.as_bytes().to_vec())
        .sign(key)?)
}

async fn wait_result(worker: &Worker, id: &str) -> anyhow::Result<ResultRecord> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(r) = worker.state.jobs.journal.result_by_message(id)? {
            return Ok(r);
        }
        if let Some((p, why)) = worker.state.jobs.halted().into_iter().next() {
            bail!("process {p} halted: {why}");
        }
        ensure!(Instant::now() < deadline, "no result for message {id} within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the demo and returns one JSON summary per step; fails if anything is off.
pub async fn run(net: &Devnet, worker: &Worker, print: &dyn Fn(&Value)) -> anyhow::Result<()> {
    let policy = Policy { max_attempts: 3, ..Policy::default() };
    let mu = MessengerClient::new(&net.urls.messenger, policy.clone());
    let gw = GatewayClient::new(&net.urls.gateway, policy);
    let authority = &net.authority;
    let user = Keypair::generate()?;

    let module = module_item(authority)?;
    gw.upload(&module).await.context("cannot publish the counter module")?;
    let run_id = now_ms();
    let spawn = |n: u64, name: &str| process_item(authority, &module.id(), &net.scheduler_address, run_id * 10 + n, name);
    let (a, b) = (spawn(1, "counter-a")?, spawn(2, "counter-b")?);
    for p in [&a, &b] {
        mu.post_item(p).await.context("cannot spawn a demo process")?;
        let assign = message(authority, &net.urls.registry, run_id * 10 + 3 + u64::from(p.id() == b.id()), &[], "")?;
        let mut tags = assign.tags.clone();
        tags.extend([Tag::new("Action", "Assign-Workload"), Tag::new("Worker", &worker.state.address), Tag::new("Process", p.id())]);
        let assign = DataItemBuilder::new()
            .target(assign.target.unwrap())
            .anchor(assign.anchor.unwrap())
            .tags(tags)
            .data(b" ".to_vec())
            .sign(authority)?;
        mu.post_item(&assign).await.context("cannot assign a demo process")?;
    }
    print(&json!({"module": module.id(), "processes": [a.id(), b.id()], "assigned_to": worker.state.address}));

    let b_id = b.id();
    let steps: Vec<Step> = vec![
        ("Increment", vec![("Amount", "5")], ""),
        ("Increment", vec![("Amount", "2")], ""),
        ("Fail", vec![], ""),
        ("Get", vec![], ""),
        ("Echo", vec![], "hello from the devnet"),
        ("Print", vec![], ""),
        ("Ping", vec![("Reply-To", &b_id)], ""),
    ];
    let mut results = Vec::new();
    for (i, (action, extra, data)) in steps.iter().enumerate() {
        let mut tags = vec![("Action", *action)];
        tags.extend(extra.iter().map(|(n, v)| (*n, *v)));
        let m = message(&user, &a.id(), i as u64 + 1, &tags, data)?;
        mu.post_item(&m).await.with_context(|| format!("cannot send {action}"))?;
        results.push((action.to_string(), m.id()));
    }
    let mut count_after_get = None;
    let mut pong = None;
    for (action, id) in &results {
        let r = wait_result(worker, id).await?;
        let journal = &worker.state.jobs.journal;
        let mut outbox = Vec::new();
        let mut attestation = None;
        for pid in &r.posted {
            match journal.outgoing(pid)?.map(|o| o.kind) {
                Some(OutKind::Attestation) => attestation = Some(pid.clone()),
                Some(_) => outbox.push(pid.clone()),
                None => {}
            }
        }
        if action == "Get" {
            count_after_get = r.response["Output"].as_str().map(str::to_owned);
        }
        if action == "Ping" {
            pong = outbox.first().cloned();
        }
        print(&json!({
            "message": id, "action": action, "nonce": r.nonce, "output": r.response["Output"], "error": r.response.get("Error"),
            "log": r.response.get("Log"), "gas_used": r.gas_used, "outbox": outbox, "attestation": attestation,
        }));
    }
    ensure!(
        count_after_get.as_deref() == Some("count=7"),
        "Get returned {count_after_get:?}, expected count=7 (5 + 2, the failed message rolled back)"
    );
    // The Pong travelled through the messenger to process B, which the worker also serves.
    let pong = pong.context("Ping produced no outbox message")?;
    let delivered = wait_result(worker, &pong).await?;
    ensure!(delivered.process == b_id, "the Pong was evaluated on {} instead of {b_id}", delivered.process);
    // Every item the worker signed has been accepted by the messenger.
    let deadline = Instant::now() + WAIT;
    while worker.state.jobs.journal.pending_count()? > 0 {
        ensure!(Instant::now() < deadline, "items still pending after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    print(
        &json!({"demo": "ok", "pong_delivered_to": b_id, "pong": pong, "pong_output": delivered.response["Output"], "count": count_after_get}),
    );
    Ok(())
}
