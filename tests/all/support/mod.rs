//! Helpers shared by the integration suites: locating the pinned Node interop setup in tests/js,
//! the real binary (`binary`), an in-process devnet with a worker (`inproc`, and in `counter` one
//! serving a counter process), and the f64 references and tolerances of the tensor suites
//! (`reference`).

pub mod aos;
pub mod binary;
pub mod counter;
pub mod inproc;
pub mod reference;

use std::path::{Path, PathBuf};
use std::process::Command;

use ao_gpu_worker::attest::Keypair;

const ARBUNDLES_VERSION: &str = "0.11.2";
const INSTALL_HINT: &str = "run `npm ci --ignore-scripts --prefix tests/js` from the crate root (needs Node 20+)";

/// True when a missing node setup must fail the test instead of skipping it.
pub fn interop_required() -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"));
    ci || std::env::var("REQUIRE_INTEROP").is_ok_and(|v| v == "1")
}

/// The `tests/js` directory when node and the pinned arbundles are installed. Otherwise panics
/// (in CI or with `REQUIRE_INTEROP=1`) or prints a loud skip line and returns `None`.
pub fn interop_dir(test: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("js");
    let problem = match Command::new("node").arg("--version").output() {
        Err(e) => Some(format!("`node` cannot be run ({e})")),
        Ok(out) if !out.status.success() => {
            Some(format!("`node --version` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)))
        }
        Ok(_) if !dir.join("node_modules").is_dir() => Some(format!("{} is missing", dir.join("node_modules").display())),
        Ok(_) => None,
    };
    if let Some(problem) = problem {
        if interop_required() {
            panic!("{test}: arbundles interop cannot run: {problem}; {INSTALL_HINT}");
        }
        eprintln!("\n*** {test} skipped: {problem}; {INSTALL_HINT} (set REQUIRE_INTEROP=1 to make this fail) ***\n");
        return None;
    }
    require_package(&dir, "arbundles", ARBUNDLES_VERSION);
    Some(dir)
}

/// Panics unless `dir/node_modules` holds npm package `name` at exactly `version`.
pub fn require_package(dir: &Path, name: &str, version: &str) {
    let manifest = dir.join("node_modules").join(name).join("package.json");
    let text = std::fs::read_to_string(&manifest).unwrap_or_else(|e| panic!("{}: {e}; {INSTALL_HINT}", manifest.display()));
    let package: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", manifest.display()));
    assert_eq!(
        package["version"].as_str(),
        Some(version),
        "{} is not {name} {version} (stale install?); {INSTALL_HINT}",
        manifest.display()
    );
}

/// Runs `node <script> <args>` in `dir` and returns its stdout; panics with stderr on failure.
pub fn run_node(dir: &Path, script: &str, args: &[String]) -> String {
    let out = Command::new("node")
        .arg(dir.join(script))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run node {script}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "node {script} failed ({}); stderr:\n{stderr}", out.status);
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("node {script} wrote non-UTF-8 output: {e}; stderr:\n{stderr}"))
}

/// The committed throwaway Arweave wallet (tests/keys/README.md): an RSA-4096 identity that
/// costs no key generation.
pub fn arweave_test_wallet_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys/arweave-test-wallet.json")
}

/// The test wallet as a key.
pub fn arweave_test_key() -> Keypair {
    let path = arweave_test_wallet_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Keypair::from_jwk(&path, &text).unwrap()
}

/// Writes the test wallet as a key file (mode 0600) at `path`.
pub fn write_arweave_test_key(path: &Path) {
    arweave_test_key().write_new(path).unwrap();
}
