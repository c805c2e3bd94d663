//! The real `ao-gpu-worker` binary: exit codes, messages and files of each subcommand, run
//! with a controlled environment and a deadline so that nothing can hang the suite.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::protocol::b64;

const EXIT_CONFIG: i32 = 64;
/// Deadline of a command that does no I/O beyond local files.
const QUICK: Duration = Duration::from_secs(60);
/// Deadline of `run` invocations that must refuse to start: a daemon that started instead
/// would run until killed.
const REFUSAL: Duration = Duration::from_secs(20);
/// Capacity detection probes wgpu adapters, which can be slow on a loaded machine.
const CAPACITY: Duration = Duration::from_secs(180);

/// The binary with a deterministic environment: no configuration or overrides inherited.
fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ao-gpu-worker"));
    cmd.env("AO_WORKER_LOG", "warn")
        .env_remove("AO_WORKER_CONFIG")
        .env_remove("AO_WORKER_DATA_DIR")
        .env_remove("AO_WORKER_KEY_FILE")
        .env_remove("AO_WORKER_REGISTRY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

#[derive(Debug)]
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `cmd` to completion, killing it and failing the test if it outlives `deadline`.
/// Pipes are drained on threads so a chatty child cannot block on a full pipe.
fn run(cmd: &mut Command, deadline: Duration) -> Output {
    let mut child = cmd.spawn().expect("spawn ao-gpu-worker");
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ao-gpu-worker") {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not exit within {deadline:?}\nstdout:\n{}\nstderr:\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output { code: status.code(), stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

/// A loopback URL where nothing listens.
fn closed_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// A syntactically valid registry process id.
fn registry_id() -> String {
    b64::encode(&[0x5a; 32])
}

/// A configuration for `run` rooted at `data_dir`, with every unit on a closed loopback port
/// and short network timeouts, so that nothing real is contacted.
fn run_config(data_dir: &Path, registry: &str) -> String {
    format!(
        "[worker]\ndata_dir = {dir:?}\nkey_file = \"worker.key\"\n\
         [network]\nscheduler_url = {su:?}\nmessenger_url = {mu:?}\ngateway_url = {gw:?}\n\
         request_timeout = \"1s\"\nconnect_timeout = \"500ms\"\nmax_attempts = 1\nbackoff_min = \"10ms\"\nbackoff_max = \"20ms\"\n\
         [registry]\nprocess = {registry:?}\n\
         [api]\nlisten = \"127.0.0.1:0\"\n\
         [log]\nlevel = \"warn\"\n",
        dir = data_dir.display().to_string(),
        su = closed_url(),
        mu = closed_url(),
        gw = closed_url(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn check_config_accepts_the_embedded_default() {
    let out = run(bin().arg("check-config"), QUICK);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("ok"), "{out:?}");
    assert!(out.stdout.contains("embedded default"), "{out:?}");
}

#[test]
fn check_config_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "bad.toml",
        "[worker]\ncolour = \"blue\"\n\
         [network]\nmax_attempts = 0\nscheduler_url = \"ftp://example.com\"\n\
         [registry]\nprocess = \"short\"\n\
         [api]\nlisten = \"everywhere\"\n\
         [log]\nlevel = \"loud\"\n",
    );
    let out = run(bin().arg("check-config").arg(&file), QUICK);
    assert_eq!(out.code, Some(EXIT_CONFIG), "{out:?}");
    let expected = ["worker.colour", "network.max_attempts", "network.scheduler_url", "registry.process", "api.listen", "log.level"];
    for path in expected {
        assert!(out.stderr.contains(&format!("{path}: ")), "stderr must list {path} as `section.key: message`:\n{}", out.stderr);
    }
    let listed: std::collections::BTreeSet<&str> =
        out.stderr.lines().filter_map(|l| l.trim().split_once(": ")).map(|(path, _)| path).filter(|p| p.contains('.')).collect();
    assert!(listed.len() >= 4, "at least 4 distinct section.key paths: {listed:?}\n{}", out.stderr);
    assert!(out.stderr.contains(&format!("({} problems)", expected.len())), "{}", out.stderr);
    assert!(out.stderr.contains("worker.colour: unknown key"), "{}", out.stderr);
    assert!(out.stderr.contains("network.max_attempts: 0 is out of range 1..=20"), "{}", out.stderr);
    assert!(!out.stdout.contains("ok"), "{out:?}");
}

#[test]
fn check_config_names_the_line_of_a_syntax_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "broken.toml", "# a comment\n[worker]\ndata_dir = \"/srv/unterminated\n[log]\nlevel = \"warn\"\n");
    let out = run(bin().arg("check-config").arg(&file), QUICK);
    assert_eq!(out.code, Some(EXIT_CONFIG), "{out:?}");
    assert!(out.stderr.contains("not valid TOML"), "{}", out.stderr);
    assert!(out.stderr.contains("line 3"), "{}", out.stderr);
}

#[test]
fn check_config_of_a_missing_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(bin().arg("check-config").arg(dir.path().join("absent.toml")), QUICK);
    assert_eq!(out.code, Some(EXIT_CONFIG), "{out:?}");
    assert!(out.stderr.contains("cannot read"), "{}", out.stderr);
}

#[test]
fn keygen_writes_a_private_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.json");
    let out = run(bin().arg("keygen").arg("--out").arg(&key), QUICK);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(mode(&key), 0o600);
    let printed: serde_json::Value =
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", out.stdout));
    let address = printed["address"].as_str().expect("address");
    assert_eq!(address.len(), 43, "{printed}");
    assert_eq!(address, Keypair::load(&key).unwrap().address(), "the printed address is the file's");

    let before = fs::read(&key).unwrap();
    let again = run(bin().arg("keygen").arg("--out").arg(&key), QUICK);
    assert_ne!(again.code, Some(0), "{again:?}");
    assert!(again.stderr.contains("refusing to overwrite"), "{}", again.stderr);
    assert_eq!(fs::read(&key).unwrap(), before, "the existing key is unchanged");
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn keygen_type_arweave_writes_an_rsa_4096_wallet_with_the_same_rules() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("wallet.json");
    let out = run(bin().args(["keygen", "--type", "arweave", "--out"]).arg(&key), QUICK);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(mode(&key), 0o600);
    let printed: serde_json::Value =
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", out.stdout));
    assert_eq!(printed["type"], "arweave", "{printed}");
    let jwk: serde_json::Value = serde_json::from_slice(&fs::read(&key).unwrap()).unwrap();
    assert_eq!(jwk["kty"], "RSA");
    for member in ["n", "e", "d", "p", "q", "dp", "dq", "qi"] {
        assert!(jwk[member].is_string(), "{member} missing from the wallet");
    }
    let n = b64::decode(jwk["n"].as_str().unwrap()).unwrap();
    assert_eq!(n.len(), 512, "RSA-4096");
    let loaded = Keypair::load(&key).unwrap();
    assert_eq!(loaded.address(), printed["address"].as_str().unwrap());
    use sha2::Digest as _;
    assert_eq!(loaded.address(), b64::encode(&sha2::Sha256::digest(&n)), "address = base64url(sha256(n))");
    let again = run(bin().args(["keygen", "--type", "arweave", "--out"]).arg(&key), QUICK);
    assert!(again.stderr.contains("refusing to overwrite"), "{}", again.stderr);
    let bad = run(bin().args(["keygen", "--type", "rsa2048", "--out"]).arg(dir.path().join("x")), QUICK);
    assert_ne!(bad.code, Some(0), "{bad:?}");
    assert!(bad.stderr.contains("arweave or ed25519"), "{}", bad.stderr);
}

#[test]
fn run_refuses_a_key_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("worker.key");
    for (i, pair) in [Keypair::generate().unwrap(), crate::support::arweave_test_key()].into_iter().enumerate() {
        let _ = fs::remove_file(&key);
        pair.write_new(&key).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let config = write(dir.path(), &format!("worker{i}.toml"), &run_config(dir.path(), &registry_id()));
        let out = run(bin().arg("run").arg("--config").arg(&config), REFUSAL);
        assert_eq!(out.code, Some(EXIT_CONFIG), "{:?} {out:?}", pair.key_type());
        assert!(out.stderr.contains("chmod 600"), "{}", out.stderr);
    }
}

#[test]
fn run_refuses_an_empty_registry_process() {
    let dir = tempfile::tempdir().unwrap();
    Keypair::generate().unwrap().write_new(&dir.path().join("worker.key")).unwrap();
    let config = write(dir.path(), "worker.toml", &run_config(dir.path(), ""));
    let out = run(bin().arg("run").arg("--config").arg(&config), REFUSAL);
    assert_eq!(out.code, Some(EXIT_CONFIG), "{out:?}");
    assert!(out.stderr.contains("registry.process"), "{}", out.stderr);
}

#[test]
fn run_without_a_key_file_points_at_keygen() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "worker.toml", &run_config(dir.path(), &registry_id()));
    let out = run(bin().arg("run").arg("--config").arg(&config), REFUSAL);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("keygen"), "{}", out.stderr);
    assert!(!dir.path().join("worker.key").exists(), "`run` does not create a key on its own");
}

#[test]
fn capacity_prints_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(bin().arg("capacity").arg("--data-dir").arg(dir.path()), CAPACITY);
    assert_eq!(out.code, Some(0), "{out:?}");
    let manifest: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", out.stdout));
    let cores =
        manifest.pointer("/host/cpu/logical_cores").and_then(|v| v.as_u64()).unwrap_or_else(|| panic!("no logical_cores: {manifest}"));
    assert!(cores >= 1, "{manifest}");
    assert!(manifest.pointer("/gpus/cuda/status").is_some_and(|s| !s.is_null()), "gpus.cuda.status: {manifest}");
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let out = run(bin().arg("frobnicate"), QUICK);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("Usage"), "{}", out.stderr);
    assert!(out.stderr.contains("frobnicate"), "{}", out.stderr);
}

#[test]
fn help_lists_every_subcommand() {
    let out = run(bin().arg("--help"), QUICK);
    assert_eq!(out.code, Some(0), "{out:?}");
    for sub in ["run", "devnet", "keygen", "check-config", "capacity", "outbox", "processes"] {
        assert!(out.stdout.lines().any(|l| l.trim_start().starts_with(sub)), "--help lists {sub}:\n{}", out.stdout);
    }
}
