//! Generated gRPC code for `vitrine.v1` (see proto/vitrine/v1/vitrine.proto).
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("vitrine.v1");

/// Encoded file descriptor set, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("vitrine_descriptor");
