//! The aos fixtures (AO's own process modules, BSL-1.1 data kept outside the repository in
//! `../shared/reference/aos/`, or `AO_AOS_FIXTURES`): located, checked against their pinned
//! sha256, and skipped loudly when absent — unless `REQUIRE_AOS=1`, where absence fails.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use ao_gpu_worker::runtime::aos::{AosEngine, AosFormat, AosModule};
use sha2::{Digest, Sha256};

/// The pinned fixtures: file name and sha256 (aos spec §10.1).
pub const FIXTURES: [(&str, &str); 6] = [
    ("aos.wasm", "142841b7b5c918f9d98bfd19aa1e60b429a1851fc102ae787f66a3a9f5e8f4e7"),
    ("emscripten4.wasm", "a745c4bfd3d175081c5b2bae7bea0445ae120bde5338b461d83ebef94a9c3514"),
    ("wasm64-emscripten.wasm", "e384efd41bdcc4e58eafc31c334c71470a6a40b363a972c90fe72600c0af8682"),
    ("emscripten2_sqlite.wasm", "07a7888cfec7ce60395742a853f4ecf5ecbb8d480a3ab1085c574426e24f2e7f"),
    ("emscripten.wasm", "edb7a3a65e21d734c53738f38bf09144421a6119ddecf81d36e8f3b21313c94b"),
    ("emscripten2.wasm", "a7b3540fc955531db1f40a904aaa11ee01a2ec2c6dc042d673f40c98fb97df39"),
];

/// True when missing fixtures must fail the test.
pub fn aos_required() -> bool {
    std::env::var("REQUIRE_AOS").is_ok_and(|v| v == "1")
}

pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("AO_AOS_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("shared").join("reference").join("aos"),
    }
}

/// The bytes of fixture `name` after checking its sha256, or `None` (with a loud skip line) when
/// it is absent; panics when it is absent under `REQUIRE_AOS=1` or when its hash is wrong.
pub fn fixture(test: &str, name: &str) -> Option<Vec<u8>> {
    let expected = FIXTURES.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("{name} is not a pinned aos fixture")).1;
    let path = fixtures_dir().join(name);
    match std::fs::read(&path) {
        Ok(bytes) => {
            assert_eq!(hex::encode(Sha256::digest(&bytes)), expected, "{}: not the pinned fixture", path.display());
            Some(bytes)
        }
        Err(e) => {
            let problem = format!("aos fixture {} cannot be read ({e})", path.display());
            if aos_required() {
                panic!("{test}: {problem}; REQUIRE_AOS=1 makes this fatal");
            }
            eprintln!(
                "\n*** {test} skipped: {problem}; put AO's loader/test fixtures there (see the aos spec §10.1) or set AO_AOS_FIXTURES (set REQUIRE_AOS=1 to make this fail) ***\n"
            );
            None
        }
    }
}

/// One engine for the whole test binary, with its disk cache in the target directory so reruns
/// skip the ~1 s compiles.
pub fn engine() -> &'static AosEngine {
    static ENGINE: OnceLock<AosEngine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("aos-module-cache");
        AosEngine::new(Some(dir)).expect("aos engine")
    })
}

/// The loaded fixture `name` as `format`, or `None` when skipped.
pub fn module(test: &str, name: &str, format: AosFormat) -> Option<Arc<AosModule>> {
    let bytes = fixture(test, name)?;
    Some(engine().load(&bytes, format).unwrap_or_else(|e| panic!("{name} as {format}: {e}")))
}
