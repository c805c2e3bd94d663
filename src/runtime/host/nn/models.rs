//! The models `wasi_ephemeral_nn` serves by name: the operator's registry (config `[models]`:
//! name -> GGUF file and its sha256) and, per tensor device, the models loaded there, kept
//! (pinned) across evaluations and processes once loaded.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::gpu::pool::{SharedDevice, lock};
use crate::llm::generate::LoadedModel;

/// One registered model: a GGUF file and the sha256 it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    pub path: PathBuf,
    /// Hex sha256 of the file; a file that does not match is refused.
    pub sha256: String,
    /// The processes that may load it (`None`: every process).
    pub processes: Option<Vec<String>>,
}

/// Models by name (config `[models]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelRegistry {
    pub models: HashMap<String, ModelEntry>,
}

/// Why a registered model cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("no model named {0:?} is registered with this worker (config [models])")]
    NotFound(String),
    #[error("process {process:?} may not use model {name:?} (config [models] {name}.processes)")]
    NotAllowed { name: String, process: String },
    #[error("model {name:?}: cannot read {path}: {message}")]
    Read { name: String, path: String, message: String },
    #[error("model {name:?}: {path} has sha256 {got}, the registry expects {want}")]
    Digest { name: String, path: String, got: String, want: String },
    #[error("model {name:?}: {message}")]
    Load { name: String, message: String },
}

/// The runtime's side: the registry and the models loaded on each device.
#[derive(Debug, Default)]
pub(crate) struct NnEnv {
    pub registry: ModelRegistry,
    /// (device index, sha256) -> the model, loaded on that device.
    loaded: Mutex<HashMap<(usize, String), Arc<LoadedModel>>>,
}

impl NnEnv {
    pub fn new(registry: ModelRegistry) -> Self {
        Self { registry, loaded: Mutex::new(HashMap::new()) }
    }

    /// The model registered as `name`, loaded on `device` (read, checked and uploaded the first
    /// time; the same `Arc` afterwards).
    pub fn by_name(
        &self,
        name: &str,
        process: Option<&str>,
        device: usize,
        backend: &SharedDevice,
    ) -> Result<Arc<LoadedModel>, ModelError> {
        let entry = self.registry.models.get(name).ok_or_else(|| ModelError::NotFound(name.to_owned()))?;
        if let Some(allowed) = &entry.processes
            && !process.is_some_and(|p| allowed.iter().any(|a| a == p))
        {
            return Err(ModelError::NotAllowed { name: name.to_owned(), process: process.unwrap_or("(unknown)").to_owned() });
        }
        let key = (device, entry.sha256.clone());
        // One load at a time: two evaluations asking for the same model load it once.
        let mut loaded = crate::sync::lock(&self.loaded);
        if let Some(m) = loaded.get(&key) {
            return Ok(m.clone());
        }
        let path = entry.path.display().to_string();
        let bytes = std::fs::read(&entry.path).map_err(|e| ModelError::Read {
            name: name.to_owned(),
            path: path.clone(),
            message: e.to_string(),
        })?;
        let got = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        if got != entry.sha256 {
            return Err(ModelError::Digest { name: name.to_owned(), path, got, want: entry.sha256.clone() });
        }
        let model = LoadedModel::load(&mut lock(backend), &bytes)
            .map_err(|e| ModelError::Load { name: name.to_owned(), message: e.to_string() })?;
        tracing::info!(model = name, sha256 = %got, device, weight_bytes = model.llama.weight_bytes(), "wasi-nn model loaded");
        let model = Arc::new(model);
        loaded.insert(key, model.clone());
        Ok(model)
    }
}
