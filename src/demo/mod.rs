//! The devnet demo, the README's main job: publish the counter actor, spawn two processes,
//! assign them to the worker through the registry, send messages, and report each result,
//! the outbox messages delivered and the attestations posted — all through the AO units'
//! HTTP APIs, as any client would. The SmolLM2 demo of `ao-gpu-worker model demo` is
//! [`smollm2`].
//!
//! Demos report what they find as JSON values to their caller (the command line prints them);
//! nothing here knows the command line.

pub mod aos;
pub mod smollm2;

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use crate::attest::Keypair;
use crate::clock::now_ms;
use crate::daemon::Worker;
use crate::devnet::Devnet;
use crate::journal::{OutKind, ResultRecord};
use crate::net::{GatewayClient, MessengerClient, Policy};
use crate::protocol::ao::{self, ItemType};
use crate::protocol::{DataItem, DataItemBuilder, Tag, b64};

/// The counter/echo actor (examples/actors/counter.c).
pub const COUNTER_WASM: &[u8] = include_bytes!("../../examples/actors/counter.wasm");
/// The MLP actor (examples/actors/mlp.c): one batched `ao_gpu` command list per inference.
pub const MLP_WASM: &[u8] = include_bytes!("../../examples/actors/mlp.wasm");
/// The input the demo sends to the MLP actor.
pub const MLP_INPUT: [f32; 16] = [0.5, -1.25, 2.0, 0.75, -0.5, 1.5, -2.0, 0.25, 1.0, -0.75, 0.125, 3.0, -1.5, 0.0, 2.5, -0.25];

/// examples/actors/mlp.c's parameters: element `i` of the block W1 [32x16], b1 [32], W2 [4x32], b2 [4].
fn mlp_weight(i: u32, scale: f32) -> f32 {
    ((i.wrapping_mul(2_654_435_761) % 2001) as i32 - 1000) as f32 / 1000.0 * scale
}

/// The MLP of examples/actors/mlp.c, computed here on the CPU backend in reproducible mode with
/// the same ops in the same order: the reference the demo checks the worker's answer against.
pub fn mlp_reference(x: &[f32; 16]) -> anyhow::Result<Vec<f32>> {
    use crate::gpu::{Backend, BackendKind, Determinism, HostTensor, TensorOps};
    let mut next = 0;
    let mut params = |n: u32, scale: f32| {
        let w: Vec<f32> = (next..next + n).map(|i| mlp_weight(i, scale)).collect();
        next += n;
        w
    };
    let (w1, b1, w2, b2) = (params(32 * 16, 0.25), params(32, 0.1), params(4 * 32, 0.5), params(4, 0.1));
    let mut cpu = Backend::new(BackendKind::Cpu, Determinism::Reproducible)?;
    let mut up = |shape: [usize; 2], data: Vec<f32>| cpu.upload(&HostTensor::new(shape.to_vec(), data)?);
    let (tx, tw1, tb1, tw2, tb2) = (up([1, 16], x.to_vec())?, up([32, 16], w1)?, up([1, 32], b1)?, up([4, 32], w2)?, up([1, 4], b2)?);
    let h = cpu.matmul(tx, tw1, false, true)?;
    let h = cpu.add(h, tb1)?;
    let h = cpu.gelu(h)?;
    let y = cpu.matmul(h, tw2, false, true)?;
    let y = cpu.add(y, tb2)?;
    let y = cpu.softmax_last(y)?;
    Ok(cpu.read(y)?.data)
}

/// One demo message: its action, extra tags and data.
type Step<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);

const WAIT: Duration = Duration::from_secs(120);

/// The counter module as a signed item, ready to publish.
pub fn module_item(key: &Keypair) -> anyhow::Result<DataItem> {
    named_module_item(key, "counter", COUNTER_WASM)
}

/// A module item named `name` with the demo's limits (16 MiB memory, 10^9 compute).
pub fn named_module_item(key: &Keypair, name: &str, wasm: &[u8]) -> anyhow::Result<DataItem> {
    let tags = ao::module_tags(name, "16-mb", "1000000000");
    Ok(DataItemBuilder::new().anchor(ao::numeric_anchor(0)).tags(tags).data(wasm.to_vec()).sign(key)?)
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

/// What the worker posted for a result: the outbox items (messages, spawns) and the attestation.
pub(crate) fn posted(worker: &Worker, r: &ResultRecord) -> anyhow::Result<(Vec<String>, Option<String>)> {
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
    Ok((outbox, attestation))
}

/// Spawns process `p` through the messenger and assigns it to `worker` through the registry,
/// signed by the devnet's authority.
pub async fn spawn_and_assign(mu: &MessengerClient, net: &Devnet, worker: &Worker, p: &DataItem, anchor: u64) -> anyhow::Result<()> {
    let authority = &net.authority;
    mu.post_item(p).await.context("cannot spawn a demo process")?;
    let mut tags = ao::base_tags(ItemType::Message);
    tags.extend([Tag::new("Action", "Assign-Workload"), Tag::new("Worker", &worker.state.address), Tag::new("Process", p.id())]);
    let assign = DataItemBuilder::new()
        .target(b64::decode_id(&net.urls.registry)?)
        .anchor(ao::numeric_anchor(anchor))
        .tags(tags)
        .data(b" ".to_vec())
        .sign(authority)?;
    mu.post_item(&assign).await.context("cannot assign a demo process")?;
    Ok(())
}

pub(crate) async fn wait_result(worker: &Worker, id: &str) -> anyhow::Result<ResultRecord> {
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
    let user = Keypair::generate_type(net.client_key_type())?;

    let module = module_item(authority)?;
    gw.upload(&module).await.context("cannot publish the counter module")?;
    let mlp_module = named_module_item(authority, "mlp", MLP_WASM)?;
    gw.upload(&mlp_module).await.context("cannot publish the MLP module")?;
    let run_id = now_ms();
    let spawn = |module: &str, n: u64, name: &str| process_item(authority, module, &net.scheduler_address, run_id * 10 + n, name);
    let (a, b, c) = (spawn(&module.id(), 1, "counter-a")?, spawn(&module.id(), 2, "counter-b")?, spawn(&mlp_module.id(), 3, "mlp")?);
    for (n, p) in [&a, &b, &c].into_iter().enumerate() {
        spawn_and_assign(&mu, net, worker, p, run_id * 10 + 4 + n as u64).await?;
    }
    print(
        &json!({"module": module.id(), "mlp_module": mlp_module.id(), "processes": [a.id(), b.id(), c.id()], "assigned_to": worker.state.address}),
    );

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
    // The MLP actor: one inference on the worker's tensor backend, checked against the CPU backend.
    let input = serde_json::to_string(&MLP_INPUT.to_vec())?;
    let infer = message(&user, &c.id(), 1, &[("Action", "Infer")], &input)?;
    mu.post_item(&infer).await.context("cannot send Infer")?;
    let mut count_after_get = None;
    let mut pong = None;
    for (action, id) in &results {
        let r = wait_result(worker, id).await?;
        let (outbox, attestation) = posted(worker, &r)?;
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
    let r = wait_result(worker, &infer.id()).await?;
    let output = r.response["Output"].as_str().with_context(|| format!("Infer failed: {}", r.response))?;
    let probs: Vec<f32> = serde_json::from_str::<Vec<f64>>(output)?.into_iter().map(|p| p as f32).collect();
    let reference = mlp_reference(&MLP_INPUT)?;
    ensure!(probs.len() == reference.len(), "Infer returned {} values, expected {}", probs.len(), reference.len());
    let max_diff = probs.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let bitwise = probs.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits());
    let (_, attestation) = posted(worker, &r)?;
    // In reproducible mode (the default) every op here is bitwise across backends, gelu included;
    // in fast mode devices may differ in the last bits, so the check allows 1e-6.
    ensure!(max_diff <= 1e-6, "the worker's MLP output {probs:?} differs from the CPU backend's {reference:?}");
    print(&json!({
        "message": infer.id(), "action": "Infer", "process": c.id(), "backend": worker.state.jobs.runtime.tensor_backend().description, "output": probs,
        "cpu_reference": reference, "max_abs_diff": max_diff, "bitwise_equal": bitwise, "gas_used": r.gas_used,
        "attestation": attestation,
    }));
    print(
        &json!({"demo": "ok", "pong_delivered_to": b_id, "pong": pong, "pong_output": delivered.response["Output"], "count": count_after_get}),
    );
    Ok(())
}
