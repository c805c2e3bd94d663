//! The on-disk cache of compiled modules: `<dir>/<sha256 of the wasm>-<engine compatibility hash>.cwasm`,
//! so a restarted worker deserializes instead of recompiling.
//!
//! Only this worker writes the directory, every write is a temp file renamed into place, and a file
//! that does not deserialize is recompiled and overwritten: a bad cache costs time, never a load.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

use super::RuntimeError;

#[derive(Debug)]
pub(super) struct DiskCache {
    dir: PathBuf,
    /// Hex of the engine's precompile compatibility hash (wasmtime version, target, compiler flags,
    /// tunables, wasm features).
    compat: String,
}

impl DiskCache {
    pub(super) fn open(dir: &Path, engine: &Engine) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::Cache(format!("cannot create {}: {e}", dir.display())))?;
        let mut hasher = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compat = hex::encode(&hasher.0.finalize()[..8]);
        Ok(Self { dir: dir.to_path_buf(), compat })
    }

    pub(super) fn path(&self, sha256: &[u8; 32]) -> PathBuf {
        self.dir.join(format!("{}-{}.cwasm", hex::encode(sha256), self.compat))
    }

    /// The cached module, or `None` when there is none or it does not deserialize.
    ///
    /// The file is read into memory rather than mapped (`Module::deserialize_file`): a mapped file
    /// that something truncates while the module lives kills the process with SIGBUS, which the
    /// disk-cache test hit when it corrupted a file in place.
    pub(super) fn load(&self, engine: &Engine, sha256: &[u8; 32]) -> Option<Module> {
        let path = self.path(sha256);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the cached module; recompiling");
                return None;
            }
        };
        // SAFETY: `deserialize` trusts the bytes to be wasmtime's own output for this engine
        // configuration. They are: the directory is written only by this worker (through `store`,
        // atomically), the name carries the sha256 of the wasm it was compiled from and the engine's
        // compatibility hash, and wasmtime itself checks the version and configuration in the header.
        // Anything that fails to deserialize is recompiled and overwritten by the caller.
        match unsafe { Module::deserialize(engine, &bytes) } {
            Ok(module) => Some(module),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cached module does not deserialize; recompiling");
                None
            }
        }
    }

    /// Writes the module's compiled form; failures are logged, not returned, because the module is
    /// usable without its cache file.
    pub(super) fn store(&self, module: &Module, sha256: &[u8; 32]) {
        if let Err(e) = self.try_store(module, sha256) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write the compiled module to the cache");
        }
    }

    fn try_store(&self, module: &Module, sha256: &[u8; 32]) -> Result<(), String> {
        let bytes = module.serialize().map_err(|e| format!("serialize: {e}"))?;
        let path = self.path(sha256);
        let mut tmp = tempfile_in(&self.dir)?;
        tmp.1.write_all(&bytes).and_then(|()| tmp.1.sync_all()).map_err(|e| format!("write {}: {e}", tmp.0.display()))?;
        drop(tmp.1);
        std::fs::rename(&tmp.0, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp.0);
            format!("rename to {}: {e}", path.display())
        })
    }
}

/// A new file `.<random>.tmp` in `dir`, created exclusively.
fn tempfile_in(dir: &Path) -> Result<(PathBuf, std::fs::File), String> {
    for _ in 0..8 {
        let path = dir.join(format!(".{:016x}.tmp", fastrand::u64(..)));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("create {}: {e}", path.display())),
        }
    }
    Err(format!("cannot create a temporary file in {}", dir.display()))
}

/// Feeds `Hash` output into sha256, so the compatibility key is stable across Rust versions (unlike
/// `DefaultHasher`).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8]))
    }
}
