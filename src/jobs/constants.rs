//! The worker's [`ConstantSource`]: an item's data from the gateway, verified against its signed
//! fields (`GET /tx/{id}` + `GET /raw/{id}`, see [`GatewayClient::item`]), so a digest mismatch
//! the runtime reports to an actor is the actor's and never a lying gateway's.

use std::sync::mpsc;

use tokio::runtime::Handle;

use crate::net::{GatewayClient, NetError};
use crate::runtime::{ConstantSource, SourceError};

/// Fetches constants through the gateway client on a tokio runtime. `fetch` blocks its thread
/// (evaluations run on blocking threads) while the request runs on the runtime, with the
/// client's own timeouts and retries.
#[derive(Debug, Clone)]
pub struct GatewayConstants {
    gateway: GatewayClient,
    runtime: Handle,
}

impl GatewayConstants {
    pub fn new(gateway: GatewayClient, runtime: Handle) -> Self {
        Self { gateway, runtime }
    }
}

/// How a gateway failure reaches the actor: only a missing item is the actor's business.
pub fn source_error(e: NetError) -> SourceError {
    match e {
        NetError::NotFound { .. } => SourceError::NotFound,
        // Down, slow, 5xx, a refusal of a well-formed id, or data that does not verify.
        other => SourceError::Unavailable(other.to_string()),
    }
}

impl ConstantSource for GatewayConstants {
    fn fetch(&self, id: &str) -> Result<Vec<u8>, SourceError> {
        let (tx, rx) = mpsc::channel();
        let (gateway, id) = (self.gateway.clone(), id.to_owned());
        // Spawned rather than `block_on`, which panics when called on a runtime thread.
        self.runtime.spawn(async move {
            let _ = tx.send(gateway.item(&id).await);
        });
        match rx.recv() {
            Ok(Ok(item)) => Ok(item.data),
            Ok(Err(e)) => Err(source_error(e)),
            Err(_) => Err(SourceError::Unavailable("the gateway request was dropped (worker shutting down?)".to_owned())),
        }
    }
}
