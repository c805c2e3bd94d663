//! The aos part of the devnet demo: AO's own Lua processes (an aos module such as aos 2.0, in one
//! of the compute unit's emscripten formats) served by the worker like any other process. Two aos
//! processes are spawned and assigned to the worker; the first `Eval`s a `Send` to the second,
//! the worker signs and posts that message, the second handles it, and an `Eval` on the second
//! reads it back from its `Inbox`.
//!
//! The module is the operator's file (the aos fixtures are BSL-1.1 data that the project does not
//! ship); `scripts/devnet` passes the fixture when it is there and says so when it is not.

use std::path::PathBuf;

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};

use super::{message, posted, spawn_and_assign, wait_result};
use crate::clock::now_ms;
use crate::daemon::Worker;
use crate::devnet::Devnet;
use crate::net::{GatewayClient, MessengerClient, Policy};
use crate::protocol::ao::{self, ItemType};
use crate::protocol::{DataItem, DataItemBuilder, Tag};

/// Which aos module the demo runs.
#[derive(Debug, Clone)]
pub struct AosDemo {
    pub module: PathBuf,
    /// Its `Module-Format`, e.g. `wasm32-unknown-emscripten4`.
    pub format: String,
}

/// The text an aos 2.0 `Eval` prints (`Output.data`), or the old aos's `Output.data.output`.
fn output_text(response: &Value) -> String {
    let data = &response["Output"]["data"];
    match data {
        Value::String(s) => s.clone(),
        Value::Object(o) => o.get("output").map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)).unwrap_or_default(),
        other => other.to_string(),
    }
}

fn aos_process(net: &Devnet, worker: &Worker, module: &str, anchor: u64, name: &str) -> anyhow::Result<DataItem> {
    let mut tags = ao::base_tags(ItemType::Process);
    // aos trusts messages its authorities forwarded: here the worker signs what processes send.
    tags.extend([
        Tag::new("Module", module),
        Tag::new("Scheduler", &net.scheduler_address),
        Tag::new("Name", name),
        Tag::new("Authority", &worker.state.address),
    ]);
    Ok(DataItemBuilder::new().anchor(ao::numeric_anchor(anchor)).tags(tags).data(b" ".to_vec()).sign(&net.authority)?)
}

/// Runs the aos demo; prints one JSON value per step; fails if anything is off.
pub async fn run(net: &Devnet, worker: &Worker, demo: &AosDemo, print: &dyn Fn(&Value)) -> anyhow::Result<()> {
    let policy = Policy { max_attempts: 3, ..Policy::default() };
    let mu = MessengerClient::new(&net.urls.messenger, policy.clone());
    let gw = GatewayClient::new(&net.urls.gateway, policy);
    let wasm = std::fs::read(&demo.module).with_context(|| format!("cannot read the aos module {}", demo.module.display()))?;
    let tags = ao::format_module_tags(&demo.format, "aos", "1-gb", "9000000000000");
    let module = DataItemBuilder::new().anchor(ao::numeric_anchor(0)).tags(tags).data(wasm).sign(&net.authority)?;
    gw.upload(&module).await.context("cannot publish the aos module")?;
    let run_id = now_ms();
    let (a, b) = (
        aos_process(net, worker, &module.id(), run_id * 10 + 1, "aos-a")?,
        aos_process(net, worker, &module.id(), run_id * 10 + 2, "aos-b")?,
    );
    spawn_and_assign(&mu, net, worker, &a, run_id * 10 + 3).await?;
    spawn_and_assign(&mu, net, worker, &b, run_id * 10 + 4).await?;
    print(&json!({"aos_module": module.id(), "format": demo.format, "aos_processes": [a.id(), b.id()]}));

    // aos accepts Eval only from its owner: the authority spawned both processes.
    let owner = &net.authority;
    let eval = |target: &str, anchor: u64, code: &str| message(owner, target, anchor, &[("Action", "Eval")], code);
    let steps = [
        (a.id(), "1 + 41"),
        (a.id(), "count = (count or 0) + 5\nreturn count"),
        (a.id(), "error('boom')"),
        (a.id(), "return count"),
        (a.id(), &format!("Send({{Target = '{}', Action = 'Ping', Data = 'hello from aos-a'}})\nreturn 'sent'", b.id())),
    ];
    let mut ping = None;
    let mut outputs = Vec::new();
    for (i, (target, code)) in steps.iter().enumerate() {
        let m = eval(target, run_id * 10 + 5 + i as u64, code)?;
        mu.post_item(&m).await.context("cannot send an Eval")?;
        let r = wait_result(worker, &m.id()).await?;
        let (outbox, attestation) = posted(worker, &r)?;
        if code.starts_with("Send(") {
            ping = outbox.first().cloned();
        }
        let output = output_text(&r.response);
        print(&json!({
            "aos_message": m.id(), "eval": code, "nonce": r.nonce, "output": output, "error": r.response.get("Error"),
            "gas_used": r.gas_used, "state": r.state_hash, "outbox": outbox, "attestation": attestation,
        }));
        outputs.push((output, r.response.get("Error").cloned()));
    }
    ensure!(outputs[0].0 == "42", "Eval 1 + 41 printed {:?}", outputs[0].0);
    ensure!(outputs[2].1.as_ref().and_then(Value::as_str).is_some_and(|e| e.contains("boom")), "error('boom') gave {:?}", outputs[2].1);
    ensure!(outputs[3].0 == "5", "count after the failed Eval is {:?}, expected 5 (the failed message rolled back)", outputs[3].0);
    // The Ping went out through the messenger, signed by the worker, and aos-b handled it.
    let ping = ping.context("Send produced no outbox message")?;
    let delivered = wait_result(worker, &ping).await?;
    ensure!(delivered.process == b.id(), "the Ping was evaluated on {} instead of {}", delivered.process, b.id());
    let read = eval(&b.id(), run_id * 10 + 20, "return Inbox[#Inbox].Data .. ' (' .. Inbox[#Inbox].Action .. ')'")?;
    mu.post_item(&read).await.context("cannot send an Eval")?;
    let r = wait_result(worker, &read.id()).await?;
    let inbox = output_text(&r.response);
    ensure!(inbox == "hello from aos-a (Ping)", "aos-b's inbox holds {inbox:?}, expected the Ping from aos-a");
    print(
        &json!({"aos_demo": "ok", "ping": ping, "ping_delivered_to": b.id(), "inbox": inbox, "live_processes": worker.state.jobs.runtime.live_processes()}),
    );
    Ok(())
}
