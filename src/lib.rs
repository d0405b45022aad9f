//! vitrine: search a retail catalogue by picture.
//!
//! The data path: image bytes -> [`encoder`] (Candle EfficientNet-Lite) -> L2-normalised
//! embedding -> [`segment`] (immutable, memory-mapped HNSW file) -> [`index`] (the live
//! segments of each model version, named by one atomically replaced manifest) -> [`server`]
//! (gRPC). [`ingest`] turns a catalogue file into segments; [`cli`] is the `vitrine` command.
//! See ARCHITECTURE.md.
#![deny(unsafe_code)]

pub mod background;
pub mod cli;
pub mod encoder;
pub mod fsutil;
pub mod ids;
pub mod index;
pub mod ingest;
pub mod models;
pub mod proto;
pub mod report;
pub mod rollout;
pub mod segment;
pub mod server;
