//! Canary rollouts of a new model version: the state machine ([`state`]) persisted in the
//! manifest, and the pure decisions the server acts on: the sticky traffic split
//! ([`router`]), list overlap and gate figures ([`metrics`]) and the guardrail window that
//! trips the breaker ([`guardrail`]).

pub mod guardrail;
pub mod metrics;
pub mod router;
pub mod state;
