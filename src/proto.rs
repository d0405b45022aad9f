//! Generated gRPC code for `vitrine.v1`.
