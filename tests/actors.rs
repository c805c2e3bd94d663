//! The committed example actors (examples/actors/*.wasm, built from C) run through the real
//! runtime: the counter's actions and rollback, the ledger's mint, transfers, overdraft
//! refusal with rollback, and its outbox notices.

use ao_gpu_worker::protocol::Tag;
use ao_gpu_worker::protocol::ao::MODULE_FORMAT;
use ao_gpu_worker::runtime::{ActorModule, EvalInput, Runtime, RuntimeConfig};
use serde_json::{Value, json};

const OWNER: &str = "OWNERaddressOWNERaddressOWNERaddressOWNERad";
const ALICE: &str = "ALICEaddressALICEaddressALICEaddressALICEad";
const BOB: &str = "BOBaddressBOBaddressBOBaddressBOBaddressBOB";

struct Actor {
    runtime: Runtime,
    module: std::sync::Arc<ActorModule>,
    state: Option<Vec<u8>>,
    nonce: u64,
    env: String,
    _dir: tempfile::TempDir,
}

impl Actor {
    fn new(wasm: &str, process_tags: Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: dir.path().to_owned(),
            max_memory: 64 << 20,
            max_compute: 10_000_000_000,
            deadline: std::time::Duration::from_secs(30),
        })
        .unwrap();
        let bytes = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/actors").join(wasm)).unwrap();
        let module = runtime.load(&bytes, &[Tag::new("Module-Format", MODULE_FORMAT)]).unwrap();
        let env = json!({"Process": {"Id": "P".repeat(43), "Owner": OWNER, "Tags": process_tags}, "Module": {"Id": "M".repeat(43), "Owner": OWNER, "Tags": []}})
            .to_string();
        Self { runtime, module, state: None, nonce: 0, env, _dir: dir }
    }

    /// Sends one message; returns the response or the error text. State advances only on success.
    fn send(&mut self, from: &str, tags: &[(&str, &str)], data: &str) -> Result<Value, String> {
        let tags: Vec<Value> = tags.iter().map(|(n, v)| json!({"name": n, "value": v})).collect();
        let id = format!("{:0>43}", self.nonce);
        let msg = json!({"Id": id, "Owner": from, "From": from, "Tags": tags, "Data": data, "Nonce": self.nonce, "Timestamp": 1_700_000_000_000u64 + self.nonce, "Block-Height": 1, "Epoch": 0, "Cron": false, "Read-Only": false}).to_string();
        self.nonce += 1;
        let input = EvalInput {
            msg_json: &msg,
            env_json: &self.env,
            timestamp_ms: 1,
            message_id: &id,
            limits: self.runtime.limits(&[], &[]).unwrap(),
        };
        let ev = self.runtime.evaluate(&self.module, self.state.as_deref(), &input);
        match ev.outcome {
            Ok(resp) => {
                self.state = ev.memory;
                Ok(resp)
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

#[test]
fn counter_counts_echoes_and_rolls_back() {
    let mut c = Actor::new("counter.wasm", json!([]));
    assert_eq!(c.send(OWNER, &[("Type", "Process")], "").unwrap()["Output"], "ignored: Process");
    assert_eq!(c.send(ALICE, &[("Action", "Increment"), ("Amount", "40")], "").unwrap()["Output"], "count=40");
    assert!(c.send(ALICE, &[("Action", "Fail")], "").unwrap_err().contains("failed on purpose"));
    assert!(c.send(ALICE, &[("Action", "Increment"), ("Amount", "x")], "").unwrap_err().contains("invalid Amount"));
    assert_eq!(c.send(ALICE, &[("Action", "Increment")], "").unwrap()["Output"], "count=41");
    assert_eq!(c.send(ALICE, &[("Action", "Echo")], "héllo \"quoted\"\n").unwrap()["Output"], "héllo \"quoted\"\n");
    let ping = c.send(ALICE, &[("Action", "Ping")], "").unwrap();
    assert_eq!(ping["Messages"][0]["Target"], ALICE);
    assert_eq!(ping["Messages"][0]["Anchor"], format!("{:0>32}", 41));
    assert_eq!(c.send(ALICE, &[("Action", "Get")], "").unwrap()["Output"], "count=41");
}

#[test]
fn ledger_transfers_refuses_overdrafts_and_notifies() {
    let mut l = Actor::new("ledger.wasm", json!([{"name": "Initial-Supply", "value": "1000"}]));
    assert_eq!(l.send(OWNER, &[("Type", "Process")], "").unwrap()["Output"], format!("minted 1000 to {OWNER}"));
    let t = l.send(OWNER, &[("Action", "Transfer"), ("Recipient", ALICE), ("Quantity", "300")], "").unwrap();
    let notices: Vec<(&str, &str)> = t["Messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["Target"].as_str().unwrap(),
                m["Tags"].as_array().unwrap().iter().find(|t| t["name"] == "Action").unwrap()["value"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(notices, vec![(OWNER, "Debit-Notice"), (ALICE, "Credit-Notice")]);
    l.send(ALICE, &[("Action", "Transfer"), ("Recipient", BOB), ("Quantity", "100")], "").unwrap();
    let over = l.send(BOB, &[("Action", "Transfer"), ("Recipient", ALICE), ("Quantity", "101")], "").unwrap_err();
    assert!(over.contains("insufficient balance: has 100, needs 101"), "{over}");
    for (who, expected) in [(OWNER, "700"), (ALICE, "200"), (BOB, "100")] {
        assert_eq!(l.send(who, &[("Action", "Balance")], "").unwrap()["Output"], expected, "{who}");
    }
    let balances: Value = serde_json::from_str(l.send(OWNER, &[("Action", "Balances")], "").unwrap()["Output"].as_str().unwrap()).unwrap();
    assert_eq!(balances[BOB], "100");
}
