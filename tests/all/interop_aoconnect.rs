//! Interop with npm `@permaweb/aoconnect` 0.0.98, the client AO apps use: its `result()` and
//! `dryrun()` against the worker's compute-unit API must read what the journal has and the
//! process's current count, touching nothing but the worker (loopback only, see
//! tests/js/aoconnect.js).
//!
//! Needs `node` and `npm ci --ignore-scripts --prefix tests/js`. Without them the test prints a
//! "skipped" line and passes, unless `CI` is set or `REQUIRE_INTEROP=1`, where it fails.

use ao_gpu_worker::journal::ResultRecord;

use crate::support::counter::CounterNet;
use crate::support::{interop_dir, require_package, run_node};
use serde_json::{Value, json};

const AOCONNECT_VERSION: &str = "0.0.98";

/// Runs tests/js/aoconnect.js for one message and returns its JSON line.
async fn aoconnect(js: &std::path::Path, c: &CounterNet, message: &str) -> Value {
    let args = vec![c.net.urls.messenger.clone(), c.cu_url().to_owned(), c.net.urls.gateway.clone(), c.process.clone(), message.to_owned()];
    let js = js.to_owned();
    let stdout = tokio::task::spawn_blocking(move || run_node(&js, "aoconnect.js", &args)).await.unwrap();
    let line = stdout.lines().last().unwrap_or_else(|| panic!("aoconnect.js printed nothing"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("aoconnect.js line {line:?}: {e}"))
}

/// The journal's result as the compute unit serves it.
fn served(r: &ResultRecord) -> Value {
    let mut v = r.response.clone();
    v.as_object_mut().unwrap().remove("Log");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aoconnect_reads_results_and_dry_runs_from_the_worker() {
    let Some(js) = interop_dir("aoconnect_reads_results_and_dry_runs_from_the_worker") else { return };
    require_package(&js, "@permaweb/aoconnect", AOCONNECT_VERSION);
    let mut c = CounterNet::start().await;
    c.send_and_wait(&[("Action", "Increment"), ("Amount", "3")], "").await;
    c.send_and_wait(&[("Action", "Increment"), ("Amount", "4")], "").await;
    let (fail, fail_record) = c.send_and_wait(&[("Action", "Fail")], "").await;
    let (get, get_record) = c.send_and_wait(&[("Action", "Get")], "").await;
    let journal = &c.worker.state.jobs.journal;
    let progress_before = journal.progress(&c.process).unwrap();

    for (id, record) in [(&get, &get_record), (&fail, &fail_record)] {
        let out = aoconnect(&js, &c, id).await;
        let result = &out["result"];
        assert_eq!(result["Output"], record.response["Output"], "{out}");
        assert_eq!(result["GasUsed"], json!(record.gas_used), "{out}");
        assert!(record.gas_used > 0);
        assert_eq!(result.get("Error"), record.response.get("Error"), "{out}");
        assert_eq!(result, &served(record), "aoconnect returns the whole result object unchanged");

        let dryrun = &out["dryrun"];
        assert_eq!(dryrun["Output"], "count=7", "{out}");
        assert!(dryrun["GasUsed"].as_u64().is_some_and(|g| g > 0), "{out}");
        assert!(dryrun.get("Error").is_none(), "{out}");

        // Exactly the two compute-unit calls, to the worker and nowhere else.
        let cu = c.cu_url();
        let expected = json!([
            {"method": "GET", "url": format!("{cu}/result/{id}?process-id={}", c.process)},
            {"method": "POST", "url": format!("{cu}/dry-run?process-id={}", c.process)},
        ]);
        assert_eq!(out["requests"], expected, "{out}");
    }
    assert_eq!(fail_record.response["Error"], "failed on purpose");
    assert_eq!(get_record.response["Output"], "count=7");
    // The dry-runs left no trace.
    assert_eq!(journal.progress(&c.process).unwrap(), progress_before);
    assert_eq!(journal.results(&c.process, None, None, 100, false).unwrap().len() as u64, progress_before.unwrap().nonce + 1);
    c.shutdown().await;
}
