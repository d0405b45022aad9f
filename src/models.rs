//! Where model folders live (`models/<version>/`) and loading encoders by version, once each.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::encoder::{Encoder, EncoderError};
use crate::ids::ModelVersion;

/// The model version used when a data directory has none yet.
pub const DEFAULT_MODEL: &str = "efficientnet-lite0";

/// The default models folder: `./models` when it exists, else the one in vitrine's source tree.
pub fn default_models_root() -> PathBuf {
    let local = PathBuf::from("models");
    if local.join(DEFAULT_MODEL).is_dir() {
        local
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
    }
}

/// Loads and caches encoders from a models folder.
pub struct ModelRegistry {
    root: PathBuf,
    device: candle_core::Device,
    loaded: Mutex<HashMap<ModelVersion, Arc<Encoder>>>,
}

impl ModelRegistry {
    pub fn new(root: impl Into<PathBuf>, device: candle_core::Device) -> Self {
        Self { root: root.into(), device, loaded: Mutex::new(HashMap::new()) }
    }

    /// The device every model of this registry is loaded onto.
    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn model_dir(&self, version: &ModelVersion) -> PathBuf {
        self.root.join(version.as_str())
    }

    /// The encoder of `version`, loaded (and its weights' checksum verified) on first use.
    pub fn get(&self, version: &ModelVersion) -> Result<Arc<Encoder>, EncoderError> {
        if let Some(e) = self.loaded.lock().get(version) {
            return Ok(Arc::clone(e));
        }
        let enc = Arc::new(Encoder::load(&self.model_dir(version), &self.device)?);
        self.loaded.lock().insert(version.clone(), Arc::clone(&enc));
        Ok(enc)
    }

    /// Why an index of `version` built with vectors of `dim` dimensions and weights
    /// `weights_sha256` cannot be served with the model this registry loads for it (the model
    /// cannot be loaded, or its dimension or weights differ); `None` when it can.
    pub fn index_mismatch(&self, version: &ModelVersion, dim: usize, weights_sha256: &str) -> Option<String> {
        match self.get(version) {
            Err(e) => Some(format!("model {version} cannot be loaded: {}", crate::report::Chain(&e))),
            Ok(enc) if enc.dim() != dim || enc.manifest().sha256 != weights_sha256 => Some(format!(
                "model {version} in {} (dim {}, weights {}) is not the one its index was built with (dim {dim}, weights {weights_sha256})",
                self.root.display(),
                enc.dim(),
                enc.manifest().sha256,
            )),
            Ok(_) => None,
        }
    }
}
