//! Typed, validated identifiers: SKUs, model versions and segments.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a raw string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("SKU must not be empty")]
    EmptySku,
    #[error("SKU is {len} bytes long; the limit is {max}")]
    SkuTooLong { len: usize, max: usize },
    #[error("SKU {0:?} contains a control character")]
    SkuControlChar(String),
    #[error(
        "model version {0:?} is invalid: use 1-64 characters from a-z, A-Z, 0-9, '.', '_', '-', starting with a letter or digit"
    )]
    BadModelVersion(String),
}

/// `s` for a message: at most `max` characters, the start and the end kept and the length
/// said, so untrusted input is never echoed unbounded.
pub fn shorten(s: &str, max: usize) -> String {
    let count = s.chars().count();
    if count <= max {
        return s.to_string();
    }
    let head: String = s.chars().take(max * 2 / 3).collect();
    let tail: String = s.chars().skip(count - max / 3).collect();
    format!("{head}...({count} characters)...{tail}")
}

/// A catalogue item's identifier, as the merchant spells it.
///
/// ```
/// use vitrine::ids::{IdError, SkuId};
/// assert_eq!(SkuId::new("MUG-042").unwrap().as_str(), "MUG-042");
/// assert_eq!(SkuId::new(""), Err(IdError::EmptySku));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SkuId(String);

impl SkuId {
    pub const MAX_LEN: usize = 256;

    pub fn new(raw: impl Into<String>) -> Result<Self, IdError> {
        let raw = raw.into();
        if raw.is_empty() {
            return Err(IdError::EmptySku);
        }
        if raw.len() > Self::MAX_LEN {
            return Err(IdError::SkuTooLong { len: raw.len(), max: Self::MAX_LEN });
        }
        if raw.chars().any(char::is_control) {
            return Err(IdError::SkuControlChar(raw));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SkuId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl From<SkuId> for String {
    fn from(s: SkuId) -> String {
        s.0
    }
}

impl fmt::Display for SkuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The version of an embedding model; one index exists per version.
/// It is also the name of the model's folder under `models/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelVersion(String);

impl ModelVersion {
    pub fn new(raw: impl Into<String>) -> Result<Self, IdError> {
        let raw = raw.into();
        let ok = !raw.is_empty()
            && raw.len() <= 64
            && raw.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && raw.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok { Ok(Self(raw)) } else { Err(IdError::BadModelVersion(shorten(&raw, 80))) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ModelVersion {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl From<ModelVersion> for String {
    fn from(v: ModelVersion) -> String {
        v.0
    }
}

impl fmt::Display for ModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A segment's number, unique within a data directory and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SegmentId(pub u64);

impl SegmentId {
    /// The segment's file name, e.g. `seg-000000000042.vseg`.
    pub fn file_name(self) -> String {
        format!("seg-{:012}.vseg", self.0)
    }
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seg-{:012}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sku_validation() {
        assert!(SkuId::new("ABC-123").is_ok());
        assert_eq!(SkuId::new(""), Err(IdError::EmptySku));
        assert!(matches!(SkuId::new("a\nb"), Err(IdError::SkuControlChar(_))));
        assert!(matches!(SkuId::new("x".repeat(257)), Err(IdError::SkuTooLong { .. })));
    }

    #[test]
    fn model_version_validation() {
        assert!(ModelVersion::new("efficientnet-lite0").is_ok());
        assert!(ModelVersion::new("../etc").is_err());
        assert!(ModelVersion::new("a/b").is_err());
        assert!(ModelVersion::new("").is_err());
        assert!(ModelVersion::new(".hidden").is_err());
    }

    #[test]
    fn ids_round_trip_through_json() {
        let s: SkuId = serde_json::from_str("\"sku-1\"").unwrap();
        assert_eq!(s.as_str(), "sku-1");
        assert!(serde_json::from_str::<SkuId>("\"\"").is_err());
        assert!(serde_json::from_str::<ModelVersion>("\"../x\"").is_err());
    }
}
