//! A hostile scheduler and gateway: a proxy on loopback in front of the devnet's units that
//! forges, swaps, re-orders, replays and rewinds what they answer, for chosen processes only.
//! Each lie is refused: nothing of it is evaluated or signed, the process halts with a clear
//! reason (journal, `GET /result`, metrics), other processes go on, and `/healthz` stays fine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::config::{Config, Overrides};
use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::demo::{message, module_item, named_module_item};
use ao_gpu_worker::devnet::{Devnet, DevnetOptions};
use ao_gpu_worker::net::scheduler::Range;
use ao_gpu_worker::net::{GatewayClient, MessengerClient, Policy, SchedulerClient};
use ao_gpu_worker::protocol::ao::{self, ItemType};
use ao_gpu_worker::protocol::su::{ItemJson, MessageNode, Page, ProcessInfo};
use ao_gpu_worker::protocol::{DataItem, DataItemBuilder, Tag, b64};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

type Mutation = Box<dyn Fn(&mut Page) + Send + Sync>;

/// What the proxy lies about.
#[derive(Default)]
struct Rules {
    /// Schedule pages of a process, rewritten.
    pages: HashMap<String, Mutation>,
    /// `GET /processes/{id}` answered with this instead.
    processes: HashMap<String, ProcessInfo>,
    /// Gateway: asked for the key, answer the value's item.
    items: HashMap<String, String>,
    /// The registry whose schedule is served from two entries back (a rewind).
    rewind: Option<String>,
}

struct Proxy {
    upstream: String,
    rules: Arc<Mutex<Rules>>,
    http: reqwest::Client,
}

async fn forward(State(p): State<Arc<Proxy>>, method: Method, uri: Uri, body: Bytes) -> Response {
    let mut path = uri.path().to_owned();
    let mut query = uri.query().unwrap_or_default().to_owned();
    let id = path.trim_start_matches('/').to_owned();
    {
        let rules = p.rules.lock().unwrap();
        if let Some(info) = path.strip_prefix("/processes/").and_then(|id| rules.processes.get(id)) {
            return axum::Json(info.clone()).into_response();
        }
        for (asked, served) in &rules.items {
            for prefix in ["/tx/", "/raw/"] {
                if path == format!("{prefix}{asked}") {
                    path = format!("{prefix}{served}");
                }
            }
        }
        if rules.rewind.as_deref() == Some(id.as_str()) {
            query = query
                .split('&')
                .map(|kv| match kv.strip_prefix("from-nonce=").and_then(|v| v.parse::<u64>().ok()) {
                    Some(n) => format!("from-nonce={}", n.saturating_sub(2)),
                    None => kv.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("&");
        }
    }
    let url = if query.is_empty() { format!("{}{path}", p.upstream) } else { format!("{}{path}?{query}", p.upstream) };
    let answer = match p.http.request(method.clone(), &url).body(body).send().await {
        Ok(a) => a,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap();
    let content_type = answer.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("application/octet-stream").to_owned();
    let bytes = answer.bytes().await.unwrap_or_default();
    if method == Method::GET && status.is_success() {
        let rules = p.rules.lock().unwrap();
        if let Some(mutate) = rules.pages.get(&id)
            && let Ok(mut page) = serde_json::from_slice::<Page>(&bytes)
        {
            mutate(&mut page);
            return axum::Json(page).into_response();
        }
    }
    (status, [("content-type", content_type)], bytes.to_vec()).into_response()
}

async fn start_proxy(upstream: &str, rules: Arc<Mutex<Rules>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let proxy = Arc::new(Proxy { upstream: upstream.trim_end_matches('/').to_owned(), rules, http: reqwest::Client::new() });
    let app = axum::Router::new().fallback(forward).with_state(proxy);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn nonce(n: &MessageNode) -> u64 {
    n.assignment.tag("Nonce").unwrap().parse().unwrap()
}

/// Applies `f` to the node at nonce 1 of every page.
fn at_nonce_1(f: impl Fn(&mut MessageNode) + Send + Sync + 'static) -> Mutation {
    Box::new(move |page: &mut Page| {
        for e in &mut page.edges {
            if nonce(&e.node) == 1 {
                f(&mut e.node);
            }
        }
    })
}

async fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 120 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Net {
    devnet: Devnet,
    worker: Worker,
    mu: MessengerClient,
    su: SchedulerClient,
    rules: Arc<Mutex<Rules>>,
    module: String,
    user: Keypair,
    config: String,
    _dir: tempfile::TempDir,
}

/// The worker's key: the same across a restart.
fn worker_key() -> Keypair {
    Keypair::from_secret(&[42; 32])
}

impl Net {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut devnet = Devnet::start(&DevnetOptions::new(dir.path().join("devnet"), 0)).await.unwrap();
        let rules = Arc::new(Mutex::new(Rules::default()));
        let su_proxy = start_proxy(&devnet.urls.scheduler, rules.clone()).await;
        let gw_proxy = start_proxy(&devnet.urls.gateway, rules.clone()).await;
        let text = format!(
            "[worker]\ndata_dir = {:?}\n[network]\nscheduler_url = {su_proxy:?}\nmessenger_url = {:?}\ngateway_url = {gw_proxy:?}\nmax_attempts = 3\n\
             [registry]\nprocess = {:?}\nauthorities = [{:?}]\npoll_interval = \"50ms\"\n[api]\nlisten = \"127.0.0.1:0\"\n[gpu]\nstartup_bench = \"off\"\n",
            dir.path().join("worker").display().to_string(),
            devnet.urls.messenger,
            devnet.urls.registry,
            devnet.authority.address(),
        );
        let config = Config::parse("test", &text, &Overrides::default()).unwrap();
        let worker = Worker::start(config, worker_key(), devnet.worker_listener.take()).await.unwrap();
        let mu = MessengerClient::new(&devnet.urls.messenger, Policy::default());
        let su = SchedulerClient::new(&devnet.urls.scheduler, Policy::default());
        let module = module_item(&devnet.authority).unwrap();
        GatewayClient::new(&devnet.urls.gateway, Policy::default()).upload(&module).await.unwrap();
        Net { devnet, worker, mu, su, rules, module: module.id(), user: Keypair::generate().unwrap(), config: text, _dir: dir }
    }

    async fn spawn(&self, n: u64, module: &str) -> String {
        let mut tags = ao::base_tags(ItemType::Process);
        tags.extend([Tag::new("Module", module), Tag::new("Scheduler", &self.devnet.scheduler_address)]);
        let p = DataItemBuilder::new().anchor(ao::numeric_anchor(n)).tags(tags).data(b" ".to_vec()).sign(&self.devnet.authority).unwrap();
        self.mu.post_item(&p).await.unwrap();
        p.id()
    }

    /// Posts two increments and a Get to `process`; returns their ids.
    async fn messages(&self, process: &str, n: u64) -> Vec<String> {
        let mut ids = Vec::new();
        for (i, action) in ["Increment", "Increment", "Get"].iter().enumerate() {
            let m = message(&self.user, process, n * 10 + i as u64, &[("Action", action)], "").unwrap();
            self.mu.post_item(&m).await.unwrap();
            ids.push(m.id());
        }
        ids
    }

    async fn assign(&self, process: &str, n: u64) {
        let worker = self.worker.state.address.clone();
        let m = message(
            &self.devnet.authority,
            &self.devnet.urls.registry,
            1000 + n,
            &[("Action", "Assign-Workload"), ("Worker", &worker), ("Process", process)],
            "",
        )
        .unwrap();
        self.mu.post_item(&m).await.unwrap();
    }

    fn evaluated(&self, process: &str) -> Vec<u64> {
        self.worker.state.jobs.journal.results(process, None, None, usize::MAX, false).unwrap().iter().map(|r| r.nonce).collect()
    }

    fn halted(&self) -> HashMap<String, String> {
        self.worker.state.jobs.halted()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_scheduler_and_gateway_are_refused() {
    let net = Net::start().await;
    let gateway = GatewayClient::new(&net.devnet.urls.gateway, Policy::default());
    // Two more modules: one a process names, one the hostile gateway serves in its place.
    let named = named_module_item(&net.devnet.authority, "named", ao_gpu_worker::demo::COUNTER_WASM).unwrap();
    let other = named_module_item(&net.devnet.authority, "other", ao_gpu_worker::demo::COUNTER_WASM).unwrap();
    gateway.upload(&named).await.unwrap();
    gateway.upload(&other).await.unwrap();

    let cases = ["honest", "unsigned", "forged", "swapped", "signer", "elsewhere", "reordered", "replayed", "module", "process"];
    let mut pids = HashMap::new();
    let mut msgs = HashMap::new();
    for (i, case) in cases.iter().enumerate() {
        let module = if *case == "module" { named.id() } else { net.module.clone() };
        let p = net.spawn(100 + i as u64, &module).await;
        msgs.insert(*case, net.messages(&p, i as u64 + 1).await);
        pids.insert(*case, p);
    }
    let honest = pids["honest"].clone();
    let honest_schedule = net.su.all(&honest, Range::default()).await.unwrap();
    let stranger = Keypair::generate().unwrap();
    let honest_info = net.su.process(&honest).await.unwrap();
    let unsigned_info = net.su.process(&pids["unsigned"]).await.unwrap();
    {
        let mut r = net.rules.lock().unwrap();
        // A forged message signature.
        r.pages.insert(
            pids["forged"].clone(),
            at_nonce_1(|n| {
                let m = n.message.as_mut().unwrap();
                let mut sig = b64::decode(&m.signature).unwrap();
                sig[10] ^= 0x40;
                m.signature = b64::encode(&sig);
            }),
        );
        // A message swapped for another validly signed one to the same process.
        let swap = ItemJson::from_item(&message(&net.user, &pids["swapped"], 77, &[("Action", "Increment")], "").unwrap());
        r.pages.insert(pids["swapped"].clone(), at_nonce_1(move |n| n.message = Some(swap.clone())));
        // The assignment re-signed by someone else than the scheduler.
        r.pages.insert(
            pids["signer"].clone(),
            at_nonce_1(move |n| {
                let a: DataItem = n.assignment.to_item().unwrap();
                let resigned =
                    DataItemBuilder::new().anchor(a.anchor.unwrap()).tags(a.tags.clone()).data(a.data.clone()).sign(&stranger).unwrap();
                n.assignment = ItemJson::from_item_showing_anchor(&resigned, true);
            }),
        );
        // The scheduler's own (validly signed) entry of another process.
        let foreign = honest_schedule.iter().find(|n| nonce(n) == 1).unwrap().clone();
        r.pages.insert(pids["elsewhere"].clone(), at_nonce_1(move |n| *n = foreign.clone()));
        // Nonces 1 and 2 swapped; nonce 1 served twice.
        r.pages.insert(
            pids["reordered"].clone(),
            Box::new(|p: &mut Page| {
                let at = |n: u64| p.edges.iter().position(|e| nonce(&e.node) == n);
                if let (Some(i), Some(j)) = (at(1), at(2)) {
                    p.edges.swap(i, j);
                }
            }),
        );
        r.pages.insert(
            pids["replayed"].clone(),
            Box::new(|p: &mut Page| {
                if let Some(i) = p.edges.iter().position(|e| nonce(&e.node) == 1) {
                    let again = p.edges[i].clone();
                    p.edges.insert(i + 1, again);
                }
            }),
        );
        // The gateway answers another (validly signed) module for the one the process names.
        r.items.insert(named.id(), other.id());
        // Another process's definition under the requested id.
        let mut lie = honest_info;
        lie.process_id = pids["process"].clone();
        r.processes.insert(pids["process"].clone(), lie);
        // An honest scheduler that keeps no signature for a process: the gateway's signed item
        // (by the requested id) stands in.
        let mut unsigned = unsigned_info;
        unsigned.signature = None;
        r.processes.insert(pids["unsigned"].clone(), unsigned);
    }
    for (i, case) in cases.iter().enumerate() {
        net.assign(&pids[case], i as u64).await;
    }

    let journal = net.worker.state.jobs.journal.clone();
    let last = msgs["honest"].last().unwrap().clone();
    wait("the honest process is evaluated", || journal.result_by_message(&last).unwrap().is_some()).await;
    let unsigned_last = msgs["unsigned"].last().unwrap().clone();
    wait("the unsigned process is evaluated", || journal.result_by_message(&unsigned_last).unwrap().is_some()).await;
    wait("every hostile process is halted", || net.halted().len() == cases.len() - 2).await;

    let halted = net.halted();
    let journaled = journal.halts().unwrap();
    let expect = [
        ("forged", "signature does not verify", vec![0]),
        ("swapped", "names message", vec![0]),
        ("signer", "not by the process's scheduler", vec![0]),
        ("elsewhere", "assigns to process", vec![0]),
        ("reordered", "nonce 2 where 1 was next", vec![0]),
        ("replayed", "nonce 1 where 2 was next", vec![0, 1]),
        ("module", "the gateway answered item", vec![]),
        ("process", "signed bytes have id", vec![]),
    ];
    for (case, reason, evaluated) in expect {
        let p = &pids[case];
        let why = halted.get(p).unwrap_or_else(|| panic!("{case}: not halted; halted: {halted:#?}"));
        assert!(why.contains(reason), "{case}: {why}");
        assert_eq!(journaled[p].reason, *why, "{case}: the halt is journaled");
        assert_eq!(net.evaluated(p), evaluated, "{case}: only what verified was evaluated");
        // Nothing was signed for the refused messages.
        for m in &msgs[case][evaluated.len().saturating_sub(1)..] {
            assert!(journal.result_by_message(m).unwrap().is_none(), "{case}: message {m} was evaluated");
        }
        // GET /result answers with the reason.
        let url = format!("{}/result/{}?process-id={p}", net.worker.api_url, msgs[case][2]);
        let answer = reqwest::get(&url).await.unwrap();
        assert_eq!(answer.status().as_u16(), 503, "{case}");
        assert!(answer.text().await.unwrap().contains(reason), "{case}");
        // GET /results says so beside what was evaluated.
        let page: serde_json::Value = reqwest::get(format!("{}/results/{p}", net.worker.api_url)).await.unwrap().json().await.unwrap();
        assert_eq!(page["halted"].as_str(), Some(why.as_str()), "{case}: {page}");
        assert_eq!(page["edges"].as_array().unwrap().len(), evaluated.len(), "{case}");
    }
    assert_eq!(net.evaluated(&honest), vec![0, 1, 2, 3]);
    assert_eq!(net.evaluated(&pids["unsigned"]), vec![0, 1, 2, 3]);
    let metrics = net.worker.state.metrics.render();
    for line in [
        "ao_worker_processes_halted 8",
        "ao_worker_refused_inputs_total{unit=\"scheduler\"} 5",
        "ao_worker_refused_inputs_total{unit=\"gateway\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    assert_eq!(reqwest::get(format!("{}/healthz", net.worker.api_url)).await.unwrap().text().await.unwrap(), "ok");

    // A rewound registry halts following with a clear reason; served processes go on.
    let registry_key = format!("registry:{}", net.devnet.urls.registry);
    net.rules.lock().unwrap().rewind = Some(net.devnet.urls.registry.clone());
    wait("the rewind is refused", || net.halted().contains_key(&registry_key)).await;
    assert!(net.halted()[&registry_key].contains("rewind"), "{}", net.halted()[&registry_key]);
    let more = message(&net.user, &honest, 999, &[("Action", "Get")], "").unwrap();
    net.mu.post_item(&more).await.unwrap();
    wait("the honest process goes on", || journal.result_by_message(&more.id()).unwrap().is_some()).await;
    assert_eq!(reqwest::get(format!("{}/healthz", net.worker.api_url)).await.unwrap().text().await.unwrap(), "ok");

    // The halts survive a restart: nothing refused is evaluated again.
    let Net { devnet, worker, config, _dir, .. } = net;
    let before = worker.state.jobs.halted();
    drop(journal);
    worker.shutdown().await;
    let config = Config::parse("test", &config, &Overrides::default()).unwrap();
    let worker = Worker::start(config, worker_key(), None).await.unwrap();
    assert_eq!(worker.state.jobs.halted(), before);
    assert!(worker.state.metrics.render().contains("ao_worker_processes_halted 9"));
    worker.shutdown().await;
    devnet.shutdown().await;
}
