//! `ao-gpu-worker processes` and `ao-gpu-worker outbox`: the operator's view of a running
//! worker, through its API's operator routes (`api::admin`). They talk to the running worker
//! rather than to the journal: the worker holds the journal's file lock while it runs (redb
//! opens it exclusively), a retried dead letter is posted at once by the running poster, and
//! the live states (catching up, backing off) exist only in the worker.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::config::Config;

/// Where the running worker's API is.
#[derive(Debug, Args)]
pub struct ApiTarget {
    /// The worker's API base URL (default: http://<api.listen> of the configuration).
    #[arg(long, value_name = "URL", global = true)]
    pub api: Option<String>,
    /// Configuration file whose api.listen names the worker (default: $AO_WORKER_CONFIG, else the embedded one).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
}

impl ApiTarget {
    fn base(&self) -> anyhow::Result<String> {
        match &self.api {
            Some(url) => Ok(url.trim_end_matches('/').to_owned()),
            None => Ok(format!("http://{}", Config::load(self.config.as_deref())?.api.listen)),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Lists the dead letters: outbox items the messenger refused for good, with the reason (dropped ones marked).
    List,
    /// Puts a dead letter back on the outbox queue; the worker posts the same signed item again.
    Retry { id: String },
    /// Drops a dead letter: kept in the journal and listed as dropped, never posted.
    Drop { id: String },
}

async fn call(method: reqwest::Method, url: String) -> anyhow::Result<Value> {
    crate::net::install_crypto_provider();
    let r = reqwest::Client::new().request(method, &url).send().await.with_context(|| format!("cannot reach the worker at {url}"))?;
    let status = r.status();
    let body: Value = r.json().await.with_context(|| format!("{url} answered {status} without JSON"))?;
    if !status.is_success() {
        anyhow::bail!("{url}: {status}: {}", body["error"].as_str().unwrap_or("(no error message)"));
    }
    Ok(body)
}

/// `outbox list|retry|drop`: prints one JSON line per dead letter, or the outcome.
pub async fn outbox(target: &ApiTarget, command: &OutboxCommand) -> anyhow::Result<Vec<String>> {
    let base = target.base()?;
    Ok(match command {
        OutboxCommand::List => {
            let body = call(reqwest::Method::GET, format!("{base}/outbox/dead-letters")).await?;
            body["dead_letters"].as_array().into_iter().flatten().map(Value::to_string).collect()
        }
        OutboxCommand::Retry { id } => {
            vec![call(reqwest::Method::POST, format!("{base}/outbox/dead-letters/{id}/retry")).await?.to_string()]
        }
        OutboxCommand::Drop { id } => vec![call(reqwest::Method::POST, format!("{base}/outbox/dead-letters/{id}/drop")).await?.to_string()],
    })
}

/// `processes [--resume ID]`: one JSON line per served process with its state, or the outcome.
pub async fn processes(target: &ApiTarget, resume: Option<&str>) -> anyhow::Result<Vec<String>> {
    let base = target.base()?;
    if let Some(p) = resume {
        let body = call(reqwest::Method::POST, format!("{base}/processes/{p}/resume")).await?;
        return Ok(vec![body.to_string()]);
    }
    let body = call(reqwest::Method::GET, format!("{base}/processes")).await?;
    Ok(body["processes"].as_array().into_iter().flatten().map(Value::to_string).collect())
}
