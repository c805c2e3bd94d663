//! The SmolLM2 demo (`ao-gpu-worker model demo`): a GGUF model published to an embedded devnet,
//! run inside an AO actor (examples/actors/smollm2.c) by a worker, with the speed measured.
//!
//! It reports its findings as JSON values to the caller, which prints them: nothing here knows
//! the command line.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use serde_json::Value;

use crate::devnet::{Devnet, DevnetOptions};
use crate::gguf::Gguf;
use crate::model::{Detokenizer, PublishOptions, publish};
use crate::net::GatewayClient;
use crate::protocol::ao::{self, ItemType};
use crate::protocol::{DataItemBuilder, Tag};

/// "The permanent storage network Arweave" in SmolLM2's vocabulary.
pub const DEMO_PROMPT: &str = "504,7193,4759,3082,1166,677,1134";

/// The model actor (examples/actors/smollm2.c).
pub const ACTOR_WASM: &[u8] = include_bytes!("../../examples/actors/smollm2.wasm");

/// Publishes the model to an embedded devnet, spawns the actor and generates for each prompt:
/// once cold (the worker fetches every weight item), then warm with one new token and with
/// `max_new` tokens, whose difference gives the decode speed. Each finding (the publication, the
/// spawned process, each prompt's tokens, text and timings) goes to `report` as one JSON value.
pub async fn run(
    file: &Path,
    prompts: &[Vec<u32>],
    max_new: u32,
    kind: crate::gpu::BackendKind,
    determinism: crate::gpu::Determinism,
    dir: &Path,
    report: &dyn Fn(&Value) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let detok = Detokenizer::from_gguf(&Gguf::open(file)?);
    let mut net = Devnet::start(&DevnetOptions::new(dir.join("devnet"), 0)).await?;
    let text = format!(
        "[worker]\ndata_dir = {:?}\n[network]\nscheduler_url = {:?}\nmessenger_url = {:?}\ngateway_url = {:?}\n\
         [registry]\nprocess = {:?}\nauthorities = [{:?}]\npoll_interval = \"20ms\"\n[api]\nlisten = \"127.0.0.1:0\"\n\
         [limits]\ndeadline = \"600s\"\n[gpu]\nbackends = [{:?}]\ndeterminism = {:?}\n",
        dir.join("worker").display().to_string(),
        net.urls.scheduler,
        net.urls.messenger,
        net.urls.gateway,
        net.urls.registry,
        net.authority.address(),
        kind.as_str(),
        determinism.as_str(),
    );
    let config = crate::config::Config::parse("(model demo worker)", &text, &crate::config::Overrides::default())?;
    let worker = crate::daemon::Worker::start(config, crate::attest::Keypair::generate()?, net.worker_listener.take()).await?;
    let result = async {
        let key = crate::attest::Keypair::generate()?;
        let gw = GatewayClient::new(&net.urls.gateway, crate::net::Policy::default());
        let mu = crate::net::MessengerClient::new(&net.urls.messenger, crate::net::Policy::default());
        let started = Instant::now();
        let (manifest, published) = publish(file, &gw, &key, &key.address(), &PublishOptions::default(), &|_, _, _| {}).await?;
        report(&serde_json::json!({"published": manifest.name, "items": published.items, "bytes": published.bytes, "seconds": started.elapsed().as_secs_f64()}))?;
        let module = DataItemBuilder::new().tags(ao::module_tags("smollm2", "64-mb", "1000000000000")).data(ACTOR_WASM.to_vec()).sign(&key)?;
        gw.upload(&module).await?;
        let mut tags = ao::base_tags(ItemType::Process);
        tags.extend([Tag::new("Module", module.id()), Tag::new("Scheduler", &net.scheduler_address), Tag::new("Name", "smollm2")]);
        let spawn = DataItemBuilder::new().anchor(ao::numeric_anchor(1)).tags(tags).data(serde_json::to_vec(&manifest)?).sign(&key)?;
        mu.post_item(&spawn).await?;
        let process = spawn.id();
        let assign = super::message(
            &net.authority,
            &net.urls.registry,
            crate::clock::now_ms(),
            &[("Action", "Assign-Workload"), ("Worker", &worker.state.address), ("Process", &process)],
            "",
        )?;
        mu.post_item(&assign).await?;
        let wait = async |id: &str| -> anyhow::Result<serde_json::Value> {
            let deadline = Instant::now() + Duration::from_secs(1200);
            loop {
                if let Some(r) = worker.state.jobs.journal.result_by_message(id)? {
                    if let Some(e) = r.response.get("Error") {
                        bail!("message {id} failed: {e}");
                    }
                    let mut response = r.response;
                    response["GasUsed"] = r.gas_used.into();
                    return Ok(response);
                }
                if let Some((p, why)) = worker.state.jobs.halted().into_iter().next() {
                    bail!("process {p} halted: {why}");
                }
                ensure!(Instant::now() < deadline, "no result for {id} within 20 minutes");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let loaded = wait(&process).await?;
        report(&serde_json::json!({"process": process, "backend": worker_backend(&worker), "determinism": determinism.as_str(), "output": loaded["Output"]}))?;
        let mut anchor = 10;
        let mut generate = async |prompt: &[u32], n: u32| -> anyhow::Result<(serde_json::Value, f64)> {
            anchor += 1;
            let data = serde_json::json!({"prompt_tokens": prompt, "max_new_tokens": n}).to_string();
            let m = super::message(&key, &process, anchor, &[("Action", "Generate")], &data)?;
            let t = Instant::now();
            mu.post_item(&m).await?;
            let r = wait(&m.id()).await?;
            Ok((r, t.elapsed().as_secs_f64()))
        };
        for (i, prompt) in prompts.iter().enumerate() {
            let cold = if i == 0 { Some(generate(prompt, 1).await?.1) } else { None };
            let (_, one) = generate(prompt, 1).await?;
            let (r, all) = generate(prompt, max_new.max(1)).await?;
            let tokens: Vec<u32> =
                r["Output"]["tokens"].as_array().map(|a| a.iter().filter_map(|t| t.as_u64()).map(|t| t as u32).collect()).unwrap_or_default();
            let decode = if tokens.len() > 1 && all > one { Some((tokens.len() - 1) as f64 / (all - one)) } else { None };
            report(&serde_json::json!({
                    "prompt_tokens": prompt.len(),
                    "prompt": detok.as_ref().map(|d| d.decode(prompt)),
                    "tokens": tokens,
                    "text": detok.as_ref().map(|d| d.decode(&tokens)),
                    "stop": r["Output"]["stop"],
                    "top5": r["Output"]["top5"],
                    "gas_used": r["GasUsed"],
                    "first_message_seconds_cold": cold,
                    "prompt_and_one_token_seconds": one,
                    "all_tokens_seconds": all,
                    "decode_tokens_per_second": decode,
                "prompt_tokens_per_second_at_least": prompt.len() as f64 / one,
            }))?;
        }
        anyhow::Ok(())
    }
    .await;
    worker.shutdown().await;
    net.shutdown().await;
    result
}

fn worker_backend(worker: &crate::daemon::Worker) -> String {
    // The tensor backend as the worker's metrics describe it: `..._info{kind=..,description="..",..}`.
    let text = worker.state.metrics.render();
    let line = text.lines().find(|l| l.starts_with("ao_worker_tensor_backend_info")).unwrap_or_default();
    line.split("description=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("unknown").to_owned()
}
