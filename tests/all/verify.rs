//! `verify` end to end on the in-process devnet: a worker evaluates and attests (attestation v2,
//! chained), the verifier re-executes on the CPU from the process start and agrees; with a fault
//! injected into the worker (test builds only: `runtime::fault`) it names exactly the message,
//! and within it the host call, that went wrong; with an input missing it says what is missing.
//! The binary's exit codes (0 agree, 1 disagree, 2 cannot verify, 64 usage) are checked too.

use std::time::{Duration, Instant};

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::attest::attestation::{self, Attestation};
use ao_gpu_worker::attest::trace::EMPTY_ROOT;
use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::demo::{MLP_INPUT, MLP_WASM, message, named_module_item, process_item};
use ao_gpu_worker::devnet::Devnet;
use ao_gpu_worker::gpu::BackendKind;
use ao_gpu_worker::journal::ResultRecord;
use ao_gpu_worker::net::{GatewayClient, MessengerClient, Policy};
use ao_gpu_worker::protocol::DataItem;
use ao_gpu_worker::runtime::fault::Fault;
use ao_gpu_worker::verifier::{self, Request, Target, Verdict};

const WAIT: Duration = Duration::from_secs(120);

struct Net {
    net: Devnet,
    worker: Worker,
    mu: MessengerClient,
    gw: GatewayClient,
    user: Keypair,
    process: String,
    anchor: u64,
    _dir: tempfile::TempDir,
}

impl Net {
    /// A devnet and a worker on the CPU backend serving one process of `wasm`.
    async fn start(name: &str, wasm: &[u8]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (net, worker) = crate::support::inproc::devnet_and_worker(dir.path(), "[gpu]\nbackends = [\"cpu\"]\n").await;
        let mu = MessengerClient::new(&net.urls.messenger, Policy::default());
        let gw = GatewayClient::new(&net.urls.gateway, Policy::default());
        let module = named_module_item(&net.authority, name, wasm).unwrap();
        gw.upload(&module).await.unwrap();
        let spawn = process_item(&net.authority, &module.id(), &net.scheduler_address, 1, name).unwrap();
        mu.post_item(&spawn).await.unwrap();
        let me = worker.state.address.clone();
        let assign =
            message(&net.authority, &net.urls.registry, 2, &[("Action", "Assign-Workload"), ("Worker", &me), ("Process", &spawn.id())], "")
                .unwrap();
        mu.post_item(&assign).await.unwrap();
        let this = Self { net, worker, mu, gw, user: Keypair::generate().unwrap(), process: spawn.id(), anchor: 10, _dir: dir };
        this.wait_result(&this.process).await;
        this
    }

    /// The next message from the user (not posted yet: its id is known before it is evaluated).
    fn next(&mut self, tags: &[(&str, &str)], data: &str) -> DataItem {
        self.anchor += 1;
        message(&self.user, &self.process, self.anchor, tags, data).unwrap()
    }

    async fn post_and_wait(&self, m: &DataItem) -> ResultRecord {
        self.mu.post_item(m).await.unwrap();
        self.wait_result(&m.id()).await
    }

    async fn wait_result(&self, message: &str) -> ResultRecord {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(r) = self.worker.state.jobs.journal.result_by_message(message).unwrap() {
                return r;
            }
            assert!(Instant::now() < deadline, "no result for {message}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The attestation of the latest message, once the gateway has it and every one before it.
    async fn latest_attestation(&self) -> (String, Attestation) {
        let progress = self.worker.state.jobs.journal.progress(&self.process).unwrap().unwrap();
        let id = progress.attestation.expect("v2 progress names its attestation");
        let deadline = Instant::now() + WAIT;
        let mut next = Some(id.clone());
        while let Some(at) = next {
            while !self.gw.exists(&at).await.unwrap() {
                assert!(Instant::now() < deadline, "attestation {at} never reached the gateway");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let item = self.gw.item(&at).await.unwrap();
            next = Attestation::from_item(&item).unwrap().v2.unwrap().previous_attestation;
        }
        let item = self.gw.item(&id).await.unwrap();
        item.verify().unwrap();
        (id, Attestation::from_item(&item).unwrap())
    }

    fn request(&self, target: Target, worker: bool) -> Request {
        Request {
            target,
            scheduler: self.net.urls.scheduler.clone(),
            gateway: self.net.urls.gateway.clone(),
            worker: worker.then(|| self.worker.api_url.clone()),
            backend: BackendKind::Cpu,
            policy: Policy { max_attempts: 2, ..Policy::default() },
            checkpoint_every: 32,
        }
    }

    fn inject(&self, spec: &str) {
        self.worker.state.jobs.runtime.inject_fault(Some(spec.parse::<Fault>().unwrap())).unwrap();
    }

    async fn shutdown(self) {
        self.worker.shutdown().await;
        self.net.shutdown().await;
    }
}

/// Fault injection exists only in test and debug builds (`runtime::fault`): under `--release` the
/// tests that need it say so and stop.
fn faults_available(test: &str) -> bool {
    if !cfg!(debug_assertions) {
        eprintln!("\n*** {test} skipped: fault injection is compiled out of release builds ***\n");
    }
    cfg!(debug_assertions)
}

fn mlp_data() -> String {
    serde_json::to_string(&MLP_INPUT.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_results_verify_and_a_wrong_state_is_pinpointed() {
    if !faults_available("counter_results_verify_and_a_wrong_state_is_pinpointed") {
        return;
    }
    let mut net = Net::start("counter", ao_gpu_worker::demo::COUNTER_WASM).await;
    for action in ["Increment", "Increment", "Get"] {
        let m = net.next(&[("Action", action)], "");
        net.post_and_wait(&m).await;
    }
    let (id, att) = net.latest_attestation().await;
    assert_eq!(att.version, attestation::VERSION);
    let v2 = att.v2.as_ref().unwrap();
    assert_eq!((v2.trace_root.as_str(), v2.trace_length), (EMPTY_ROOT, 0), "the counter makes no ao_gpu call");
    assert!(v2.previous_attestation.is_some(), "chained to the previous message's attestation");

    let report = verifier::verify(&net.request(Target::Attestation { id: id.clone(), from: None }, true)).await;
    assert_eq!(report.verdict, Verdict::Agree, "{}", report.human());
    assert_eq!((report.executed, report.compared, report.from, report.to), (4, 4, 0, 3), "{}", report.human());

    // A worker that flips a byte of the state after one message: that message, and its state.
    let bad = net.next(&[("Action", "Increment")], "");
    net.inject(&format!("message={},state", bad.id()));
    net.post_and_wait(&bad).await;
    let get = net.next(&[("Action", "Get")], "");
    net.post_and_wait(&get).await;
    let (id, att) = net.latest_attestation().await;
    assert_eq!(att.nonce, 5);
    let report = verifier::verify(&net.request(Target::Attestation { id, from: None }, true)).await;
    assert_eq!(report.verdict, Verdict::Disagree, "{}", report.human());
    let d = report.divergence.as_ref().unwrap();
    assert_eq!((d.nonce, d.message.as_str()), (4, bad.id().as_str()), "{}", report.human());
    assert_eq!(d.fields.iter().map(|f| f.field).collect::<Vec<_>>(), ["state-sha256"], "{}", report.human());
    assert!(d.call.is_none(), "the trace (empty) agrees");
    assert_eq!(report.verdict.exit_code(), 1);
    // The attestations before the fault still verify on their own.
    let report = verifier::verify(
        &net.request(Target::Range { process: net.process.clone(), from: 0, to: 3, attestations: net.net.urls.registry.clone() }, false),
    )
    .await;
    assert_eq!(report.verdict, Verdict::Agree, "{}", report.human());
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_mlp_read_back_is_pinpointed_to_its_message_and_host_call() {
    if !faults_available("a_wrong_mlp_read_back_is_pinpointed_to_its_message_and_host_call") {
        return;
    }
    let mut net = Net::start("mlp", MLP_WASM).await;
    let data = mlp_data();
    let good = net.next(&[("Action", "Infer")], &data);
    let r = net.post_and_wait(&good).await;
    let trace = r.trace.as_ref().expect("v2 records keep the trace");
    let calls: Vec<&str> = trace.leaves.iter().map(|l| l.call()).collect();
    assert!(calls.contains(&"tensor_f32") && calls.contains(&"run"), "{calls:?}");
    let read_at = calls.iter().position(|c| *c == "read_f32").expect("the mlp reads its output");
    assert!(trace.leaves[read_at].evidence.is_some(), "a small read-back is kept as evidence");

    let (id, att) = net.latest_attestation().await;
    assert_eq!(att.v2.as_ref().unwrap().trace_root, trace.root());
    let report = verifier::verify(&net.request(Target::Attestation { id: id.clone(), from: None }, true)).await;
    assert_eq!(report.verdict, Verdict::Agree, "{}", report.human());
    // Reproducible mode is bitwise across backends: the CPU worker's claims hold on wgpu.
    let on_wgpu = Request { backend: BackendKind::Wgpu, ..net.request(Target::Attestation { id, from: None }, true) };
    let report = verifier::verify(&on_wgpu).await;
    match report.verdict {
        Verdict::CannotVerify if !std::env::var("REQUIRE_WGPU").is_ok_and(|v| v == "1") => {
            eprintln!("!!!!! SKIPPING verify on wgpu: {:?} (set REQUIRE_WGPU=1 to make this fail) !!!!!", report.missing);
        }
        _ => assert_eq!((report.verdict, report.backend.as_str()), (Verdict::Agree, "wgpu"), "{}", report.human()),
    }

    // The read-back of one message is wrong: that message, that call, how far off.
    let bad = net.next(&[("Action", "Infer")], &data);
    net.inject(&format!("message={},op=read_f32,backend=cpu", bad.id()));
    let bad_result = net.post_and_wait(&bad).await;
    assert_ne!(bad_result.response["Output"], r.response["Output"], "the fault reached the result");
    let after = net.next(&[("Action", "Infer")], &data);
    net.post_and_wait(&after).await;
    let (id, _) = net.latest_attestation().await;
    let report = verifier::verify(&net.request(Target::Attestation { id: id.clone(), from: None }, true)).await;
    assert_eq!(report.verdict, Verdict::Disagree, "{}", report.human());
    let d = report.divergence.as_ref().unwrap();
    assert_eq!(d.message, bad.id(), "{}", report.human());
    let fields: Vec<&str> = d.fields.iter().map(|f| f.field).collect();
    assert!(fields.contains(&"trace-root") && fields.contains(&"result-sha256"), "{fields:?}");
    let call = d.call.as_ref().expect("the worker's trace names the call");
    assert_eq!((call.index, call.call.as_str()), (read_at, "read_f32"), "{}", report.human());
    assert!(call.max_abs_diff.unwrap() > 0.0 && call.max_ulp_diff.unwrap() > 0, "{}", report.human());
    let human = report.human();
    eprintln!("{human}");
    assert!(human.contains("DISAGREE") && human.contains(&format!("#{read_at} read_f32")), "{human}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["verdict"], "disagree");
    assert_eq!(json["divergence"]["call"]["index"], read_at);

    // Without the worker's API the message is still named; the call cannot be.
    let report = verifier::verify(&net.request(Target::Attestation { id, from: None }, false)).await;
    let d = report.divergence.as_ref().unwrap();
    assert_eq!(d.message, bad.id());
    assert!(d.call.as_ref().unwrap().note.as_ref().unwrap().contains("--worker"), "{}", report.human());

    // A wrong op output that stays on the device is witnessed at the read-back that depends on it.
    let bad_op = net.next(&[("Action", "Infer")], &data);
    net.inject(&format!("message={},op=matmul", bad_op.id()));
    net.post_and_wait(&bad_op).await;
    let (id, att) = net.latest_attestation().await;
    let report = verifier::verify(&net.request(Target::Attestation { id, from: Some(att.nonce) }, true)).await;
    assert_eq!(report.verdict, Verdict::Disagree, "{}", report.human());
    let d = report.divergence.as_ref().unwrap();
    assert_eq!((d.message.as_str(), d.call.as_ref().unwrap().index), (bad_op.id().as_str(), read_at), "{}", report.human());
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_missing_is_named_and_the_binary_exits_with_the_verdict() {
    let mut net = Net::start("counter", ao_gpu_worker::demo::COUNTER_WASM).await;
    let m = net.next(&[("Action", "Increment")], "");
    net.post_and_wait(&m).await;
    let (id, _) = net.latest_attestation().await;

    let unknown = ao_gpu_worker::protocol::b64::encode(&[7; 32]);
    let report = verifier::verify(&net.request(Target::Attestation { id: unknown.clone(), from: None }, false)).await;
    assert_eq!(report.verdict, Verdict::CannotVerify);
    assert!(report.missing.as_ref().unwrap().contains(&unknown), "{}", report.human());
    let report = verifier::verify(
        &net.request(Target::Range { process: net.process.clone(), from: 0, to: 9, attestations: net.net.urls.registry.clone() }, false),
    )
    .await;
    assert_eq!(report.verdict, Verdict::CannotVerify);
    assert!(report.missing.as_ref().unwrap().contains("nonce 9"), "{}", report.human());

    let (scheduler, gateway, worker) = (net.net.urls.scheduler.clone(), net.net.urls.gateway.clone(), net.worker.api_url.clone());
    let run = move |args: Vec<String>| {
        let out = crate::support::binary::command().arg("verify").args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let units = vec!["--scheduler".to_owned(), scheduler, "--gateway".into(), gateway, "--worker".into(), worker];
    let (agree, missing, usage) = tokio::task::spawn_blocking(move || {
        let agree = run([vec![id, "--json".into()], units.clone()].concat());
        let missing = run([vec![unknown], units.clone()].concat());
        let usage = run(vec!["--from".into(), "3".into()]);
        (agree, missing, usage)
    })
    .await
    .unwrap();
    assert_eq!(agree.0, Some(0), "{agree:?}");
    let json: serde_json::Value = serde_json::from_str(&agree.1).unwrap();
    assert_eq!((json["verdict"].as_str(), json["executed"].as_u64()), (Some("agree"), Some(2)), "{json}");
    assert_eq!(missing.0, Some(2), "{missing:?}");
    assert!(missing.1.contains("CANNOT VERIFY") && missing.1.contains("missing:"), "{missing:?}");
    assert_eq!(usage.0, Some(64), "{usage:?}");
    net.shutdown().await;
}

/// Writes tests/vectors/attestation-v2/ from a real run: the MLP actor's second message on the
/// devnet, its signed attestation item and the worker's trace. Run by hand
/// (`cargo test --test all -- verify::regenerate_attestation_vector --ignored`) after a format change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "regenerates the committed test vector"]
async fn regenerate_attestation_vector() {
    let mut net = Net::start("mlp", MLP_WASM).await;
    let data = mlp_data();
    let m = net.next(&[("Action", "Infer")], &data);
    let r = net.post_and_wait(&m).await;
    let (id, att) = net.latest_attestation().await;
    let item = net.gw.item(&id).await.unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/attestation-v2");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("item.b64"), ao_gpu_worker::protocol::b64::encode(&item.to_bytes())).unwrap();
    let trace = r.trace.unwrap();
    let expected = serde_json::json!({
        "id": id,
        "signer": item.owner_address(),
        "target": net.net.urls.registry,
        "data": serde_json::to_value(&att).unwrap(),
        "trace_root": trace.root(),
        "leaves": trace.leaves.iter().map(|l| serde_json::json!({"text": l.text, "hash": l.hash_hex()})).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("expected.json"), serde_json::to_string_pretty(&expected).unwrap() + "\n").unwrap();
    net.shutdown().await;
}
