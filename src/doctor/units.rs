//! Checks of the AO units the configuration names: each must answer as that unit does (the
//! scheduler's `/timestamp` and `/`, the messenger's `/`, the gateway's `/info`), the registry
//! process must exist on the scheduler, and this machine's clock must agree with the scheduler's.

use reqwest::Method;

use super::local::quick_policy;
use super::{Check, Options};
use crate::config::Config;
use crate::net::{HttpClient, SchedulerClient, Unit};

pub(super) async fn check(config: &Config, source: &str, opts: &Options) -> Vec<Check> {
    let n = &config.network;
    let su = SchedulerClient::new(&n.scheduler_url, quick_policy());
    let mut out = Vec::new();
    let url_fix = |key: &str, what: &str| format!("set [network] {key} = \"<base URL of {what}>\" in {source}");

    // Scheduler: its timestamp also sets the reference for the clock check.
    let mut su_time: Option<u64> = None;
    match (su.timestamp().await, su.info().await) {
        (Ok(t), Ok(info)) => {
            su_time = t.timestamp.parse().ok();
            out.push(Check::pass(
                "scheduler",
                format!("{} answers as an AO scheduler (address {}, block {})", n.scheduler_url, info.address, t.block_height),
            ));
        }
        (Err(e), _) | (_, Err(e)) => {
            out.push(Check::fail(
                "scheduler",
                e.to_string(),
                format!(
                    "curl {}/timestamp must answer {{\"timestamp\",\"block_height\"}}; start the unit or {}",
                    n.scheduler_url,
                    url_fix("scheduler_url", "an AO scheduler unit")
                ),
            ));
        }
    }
    out.push(clock(su_time, opts));

    // Messenger: `GET /` answers 2xx (the deployed unit says "ao messenger unit").
    let mu = HttpClient::new(Unit::Messenger, &n.messenger_url, quick_policy());
    out.push(match mu.expect_success(Method::GET, "/", None).await {
        Ok(a) => Check::pass("messenger", format!("{} answers ({})", n.messenger_url, preview(&a.body))),
        Err(e) => Check::fail(
            "messenger",
            e.to_string(),
            format!("start the messenger unit or {}", url_fix("messenger_url", "an AO messenger unit")),
        ),
    });

    // Gateway: `GET /info` is Arweave's node info, with a block height.
    let gw = HttpClient::new(Unit::Gateway, &n.gateway_url, quick_policy());
    out.push(match gw.json::<serde_json::Value>(Method::GET, "/info", None).await {
        Ok(v) if v.get("height").is_some_and(serde_json::Value::is_u64) => Check::pass(
            "gateway",
            format!("{} answers as an Arweave gateway (network {}, height {})", n.gateway_url, v["network"], v["height"]),
        ),
        Ok(v) => Check::fail(
            "gateway",
            format!("{}/info is not Arweave node info (no height): {}", n.gateway_url, preview(v.to_string().as_bytes())),
            url_fix("gateway_url", "an Arweave gateway"),
        ),
        Err(e) => Check::fail("gateway", e.to_string(), format!("start the gateway or {}", url_fix("gateway_url", "an Arweave gateway"))),
    });

    // The registry process must be known to the scheduler.
    if let Some(registry) = &config.registry.process {
        out.push(match su.process(registry).await {
            Ok(_) => Check::pass("registry", format!("process {registry} exists on the scheduler")),
            Err(e) => Check::fail(
                "registry",
                format!("the scheduler does not know process {registry}: {e}"),
                format!("set [registry] process = \"<the registry process id on {}>\" in {source}", n.scheduler_url),
            ),
        });
    }
    out
}

/// The local clock against the scheduler's (which stamps every assignment).
fn clock(scheduler_ms: Option<u64>, opts: &Options) -> Check {
    let local = (opts.now_ms)();
    let Some(reference) = scheduler_ms else {
        // Without a reference, only a clock before this version's release is detectably wrong.
        const RELEASED_MS: u64 = 1_767_225_600_000; // 2026-01-01
        return if local < RELEASED_MS {
            Check::fail("clock", format!("local clock reads {local} ms, before 2026"), "timedatectl set-ntp true")
        } else {
            Check::pass("clock", "not compared: the scheduler did not answer")
        };
    };
    let skew = local.abs_diff(reference);
    let limit = opts.max_clock_skew.as_millis() as u64;
    let ahead = if local > reference { "ahead of" } else { "behind" };
    if skew > limit {
        Check::fail(
            "clock",
            format!("{:.1} s {ahead} the scheduler (limit {:.1} s)", skew as f64 / 1e3, limit as f64 / 1e3),
            "timedatectl set-ntp true  (then check `timedatectl timesync-status`)",
        )
    } else {
        Check::pass("clock", format!("within {:.1} s of the scheduler", skew as f64 / 1e3))
    }
}

fn preview(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.chars().count() > 60 { format!("{}…", text.chars().take(60).collect::<String>()) } else { text.to_owned() }
}
