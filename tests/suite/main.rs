//! vitrine's integration tests, linked into one binary: each file is a module. One binary
//! instead of twelve saves CI their separate compiles and links (the generated gRPC client
//! and server code was instantiated in each), and long tests overlap with short ones.
//!
//! Run one file's tests with its module name, e.g. `cargo test --test suite live::`.

mod common;

mod config_cli;
mod crash;
mod cuda_kernels;
mod e2e;
mod encoder;
mod hostile;
mod integrity;
mod live;
mod observability;
mod rollout;
mod security;
mod segment;
