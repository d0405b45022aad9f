//! The write-ahead log's records: one catalogue change each, encoded with prost (protobuf
//! wire format, so fields can be added compatibly). The log itself (`wal.rs`) treats them as
//! opaque bytes.
//!
//! Applying a record is deterministic and field-wise "last writer wins" (an upsert sets the
//! fields it carries and keeps the others), so replaying a record whose effect is already in
//! the record store or in a deletion file gives the same state again.

use prost::Message;

use crate::ids::{IdError, ModelVersion, SkuId};
use crate::index::store::Attrs;

#[derive(Clone, PartialEq, prost::Message)]
pub struct WalVector {
    #[prost(string, tag = "1")]
    pub model_version: String,
    #[prost(float, repeated, tag = "2")]
    pub values: Vec<f32>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WalUpsert {
    #[prost(string, tag = "1")]
    pub sku: String,
    /// The new attributes as a JSON object; absent: keep the current ones.
    #[prost(string, optional, tag = "2")]
    pub attrs_json: Option<String>,
    /// sha256 of the new image (stored under blobs/ before the record was logged); absent:
    /// keep the current one.
    #[prost(string, optional, tag = "3")]
    pub image_sha256: Option<String>,
    /// New unit-length vectors, one per model version they replace.
    #[prost(message, repeated, tag = "4")]
    pub vectors: Vec<WalVector>,
    /// The vectors were embedded from the SKU's stored image (a backfill, or the same image
    /// sent again over a sent vector); with `image_sha256` set they always are.
    #[prost(bool, tag = "5")]
    pub from_image: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WalDelete {
    #[prost(string, tag = "1")]
    pub sku: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WalEntry {
    #[prost(oneof = "wal_entry::Op", tags = "1, 2")]
    pub op: Option<wal_entry::Op>,
}

pub mod wal_entry {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Op {
        #[prost(message, tag = "1")]
        Upsert(super::WalUpsert),
        #[prost(message, tag = "2")]
        Delete(super::WalDelete),
    }
}

/// A decoded, validated log record.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Upsert {
        sku: SkuId,
        attrs: Option<Attrs>,
        image_sha256: Option<String>,
        vectors: Vec<(ModelVersion, Vec<f32>)>,
        /// `vectors` come from the SKU's image (always so when `image_sha256` is set); else
        /// they were sent as vectors.
        from_image: bool,
    },
    Delete {
        sku: SkuId,
    },
}

/// Why a log record cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("not a log record")]
    Decode(#[from] prost::DecodeError),
    #[error("log record has no operation")]
    Empty,
    #[error("log record names an invalid id")]
    Id(#[from] IdError),
    #[error("log record's attributes are not a JSON object")]
    Attrs(#[from] serde_json::Error),
}

impl Change {
    pub fn sku(&self) -> &SkuId {
        match self {
            Change::Upsert { sku, .. } | Change::Delete { sku } => sku,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let op = match self {
            Change::Upsert { sku, attrs, image_sha256, vectors, from_image } => {
                wal_entry::Op::Upsert(WalUpsert {
                    sku: sku.to_string(),
                    attrs_json: attrs.as_ref().map(|a| serde_json::to_string(a).expect("attrs serialise")),
                    image_sha256: image_sha256.clone(),
                    vectors: vectors
                        .iter()
                        .map(|(v, values)| WalVector { model_version: v.to_string(), values: values.clone() })
                        .collect(),
                    from_image: *from_image && image_sha256.is_none(),
                })
            }
            Change::Delete { sku } => wal_entry::Op::Delete(WalDelete { sku: sku.to_string() }),
        };
        WalEntry { op: Some(op) }.encode_to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, EntryError> {
        match WalEntry::decode(bytes)?.op.ok_or(EntryError::Empty)? {
            wal_entry::Op::Upsert(u) => Ok(Change::Upsert {
                sku: SkuId::new(u.sku)?,
                attrs: u.attrs_json.map(|j| serde_json::from_str(&j)).transpose()?,
                vectors: u
                    .vectors
                    .into_iter()
                    .map(|v| Ok((ModelVersion::new(v.model_version)?, v.values)))
                    .collect::<Result<_, IdError>>()?,
                from_image: u.from_image || u.image_sha256.is_some(),
                image_sha256: u.image_sha256,
            }),
            wal_entry::Op::Delete(d) => Ok(Change::Delete { sku: SkuId::new(d.sku)? }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip() {
        let mut attrs = Attrs::new();
        attrs.insert("price".into(), serde_json::json!(9.5));
        let changes = [
            Change::Upsert {
                sku: SkuId::new("A-1").unwrap(),
                attrs: Some(attrs),
                image_sha256: Some("ab".into()),
                vectors: vec![(ModelVersion::new("m1").unwrap(), vec![0.6, 0.8])],
                from_image: true,
            },
            Change::Upsert {
                sku: SkuId::new("A-2").unwrap(),
                attrs: None,
                image_sha256: None,
                vectors: vec![(ModelVersion::new("m1").unwrap(), vec![0.8, 0.6])],
                from_image: true,
            },
            Change::Upsert {
                sku: SkuId::new("B").unwrap(),
                attrs: None,
                image_sha256: None,
                vectors: vec![],
                from_image: false,
            },
            Change::Delete { sku: SkuId::new("C").unwrap() },
        ];
        for c in changes {
            assert_eq!(Change::decode(&c.encode()).unwrap(), c);
        }
        assert!(Change::decode(b"\xff\xff").is_err());
        assert!(matches!(Change::decode(&[]), Err(EntryError::Empty)));
    }
}
