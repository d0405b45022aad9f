//! Canary rollouts of a new model version: the state machine ([`state`]) persisted in the
//! manifest, and the pure decisions the server acts on.

pub mod state;
