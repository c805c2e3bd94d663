//! Driving the real `ao-gpu-worker` binary from tests: a clean environment, a devnet in its
//! own process, and children that are killed when a test fails.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use ao_gpu_worker::devnet::DevnetUrls;

pub const BIN: &str = env!("CARGO_BIN_EXE_ao-gpu-worker");

/// Kills the child on drop, so a failing test leaves no process behind.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary with none of the worker's environment overrides inherited.
pub fn command() -> Command {
    let mut c = Command::new(BIN);
    for var in ["AO_WORKER_CONFIG", "AO_WORKER_DATA_DIR", "AO_WORKER_KEY_FILE", "AO_WORKER_REGISTRY"] {
        c.env_remove(var);
    }
    c.env("AO_WORKER_LOG", "info");
    c
}

/// `devnet --no-worker` on free ports, and the URLs it prints.
pub fn start_devnet(dir: &Path) -> (Guard, DevnetUrls) {
    let mut child = command()
        .args(["devnet", "--no-worker", "--port-base", "0", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("devnet starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("devnet prints its urls");
    let urls: DevnetUrls = serde_json::from_str(&line).unwrap_or_else(|e| panic!("devnet line {line:?}: {e}"));
    (Guard(child), urls)
}
