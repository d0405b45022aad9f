//! The rollout state machine: which model version is champion and which is challenger, what
//! phase the rollout is in, and every transition's rules. Pure: the server persists a
//! [`Rollout`] in the manifest (as JSON, through the index writer) and acts on the transitions.
//!
//! ```text
//!   start ──► backfilling ──► gating ──┬─► canary ──► promoted ──► (gc: old champion dropped)
//!                 │              │     │     │  ▲         │
//!                 │              │     │  trip│  │set      └─ rollback ─► rolled_back ─► (gc: challenger dropped)
//!                 │              │     │     ▼  │
//!                 │              │     └─► refused (unless forced)   rolled_back (automatic, with the reason)
//!                 └──────────────┴─────── abort ─► aborted (challenger dropped)
//! ```

use serde::{Deserialize, Serialize};

use crate::ids::ModelVersion;

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Backfilling,
    Gating,
    Refused,
    Canary,
    Promoted,
    Aborted,
    RolledBack,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Backfilling => "backfilling",
            Phase::Gating => "gating",
            Phase::Refused => "refused",
            Phase::Canary => "canary",
            Phase::Promoted => "promoted",
            Phase::Aborted => "aborted",
            Phase::RolledBack => "rolled_back",
        }
    }

    /// Whether the rollout still occupies the directory (a new one cannot start).
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Backfilling | Phase::Gating | Phase::Refused | Phase::Canary)
    }
}

/// Why a transition is not allowed now.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransitionError {
    #[error("cannot {action} a rollout that is {phase}")]
    WrongPhase { action: &'static str, phase: &'static str },
    #[error("a rollout of {challenger} is still {phase}: promote, abort or roll it back first")]
    Busy { challenger: ModelVersion, phase: &'static str },
    #[error("{0} is already the serving model version")]
    SameVersion(ModelVersion),
    #[error("{what} must be in [0, 1], got {value}")]
    OutOfRange { what: &'static str, value: f64 },
    #[error(
        "the last rollout is {phase} and {keeps} still has its index, written on every upsert: run \
         `vitrine rollout gc` first"
    )]
    NotCollected { phase: &'static str, keeps: ModelVersion },
    #[error("a newer rollout has replaced this one")]
    Superseded,
}

fn share(what: &'static str, value: f64) -> Result<f64, TransitionError> {
    if (0.0..=1.0).contains(&value) { Ok(value) } else { Err(TransitionError::OutOfRange { what, value }) }
}

/// A rollout's settings, as `vitrine rollout start` gives them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Share of image and SKU queries the canary answers once it is gated.
    pub fraction: f64,
    /// Share of queries also run on the other arm, off the response path.
    pub shadow: f64,
    /// The gate refuses a challenger whose recall@10 is lower than the champion's by more.
    pub tolerance: f64,
    /// Skip the gate's verdict (it still runs and is recorded).
    pub force: bool,
    /// Pause between backfill batches, kept so that a restart resumes the backfill as slowly
    /// as it was asked to run (states written before it read as 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub backfill_throttle_ms: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Default for Settings {
    fn default() -> Self {
        Self { fraction: 0.05, shadow: 0.2, tolerance: 0.01, force: false, backfill_throttle_ms: 0 }
    }
}

impl Settings {
    pub fn validate(&self) -> Result<(), TransitionError> {
        share("fraction", self.fraction)?;
        share("shadow", self.shadow)?;
        share("tolerance", self.tolerance)?;
        Ok(())
    }
}

/// One arm's gate figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ArmFigures {
    pub queries: usize,
    pub recall_at_10: f64,
    pub mrr: f64,
}

/// The gate's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    pub champion: ArmFigures,
    pub challenger: ArmFigures,
    pub passed: bool,
    /// The challenger serves although it did not pass.
    pub forced: bool,
}

/// The last automatic rollback: which guardrail tripped, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Breaker {
    pub limit: String,
    pub reason: String,
    pub at_unix_ms: u64,
}

/// A rollout, as persisted in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Salt of the sticky split: the same key stays on one arm for this rollout.
    pub id: u64,
    pub champion: ModelVersion,
    pub challenger: ModelVersion,
    pub phase: Phase,
    pub settings: Settings,
    #[serde(default)]
    pub gate: Option<Gate>,
    #[serde(default)]
    pub breaker: Option<Breaker>,
    /// After a promotion: the old champion, still written to (so a rollback finds it complete)
    /// until `gc` drops it.
    #[serde(default)]
    pub retired: Option<ModelVersion>,
    /// Set once `gc` has dropped the losing version's index.
    #[serde(default)]
    pub collected: bool,
}

/// What the server must do after a transition, beyond persisting the new state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    None,
    /// Make this version serve image and SKU queries.
    Serve(ModelVersion),
    /// Drop this version's index.
    Drop(ModelVersion),
}

impl Rollout {
    /// A new rollout of `challenger` against the serving `champion`; `current` is the
    /// directory's existing rollout, if any.
    pub fn start(
        current: Option<&Rollout>,
        id: u64,
        champion: ModelVersion,
        challenger: ModelVersion,
        settings: Settings,
    ) -> Result<Rollout, TransitionError> {
        if let Some(r) = current.filter(|r| r.phase.is_active()) {
            return Err(TransitionError::Busy { challenger: r.challenger.clone(), phase: r.phase.as_str() });
        }
        if let Some(r) =
            current.filter(|r| matches!(r.phase, Phase::Promoted | Phase::RolledBack) && !r.collected)
        {
            // The losing version's index: only `gc` drops it, and a new rollout would leave
            // it behind for good.
            let keeps = if r.phase == Phase::Promoted { &r.champion } else { &r.challenger };
            return Err(TransitionError::NotCollected { phase: r.phase.as_str(), keeps: keeps.clone() });
        }
        if champion == challenger {
            return Err(TransitionError::SameVersion(challenger));
        }
        settings.validate()?;
        Ok(Rollout {
            id,
            champion,
            challenger,
            phase: Phase::Backfilling,
            settings,
            gate: None,
            breaker: None,
            retired: None,
            collected: false,
        })
    }

    fn expect(&self, action: &'static str, ok: &[Phase]) -> Result<(), TransitionError> {
        if ok.contains(&self.phase) {
            Ok(())
        } else {
            Err(TransitionError::WrongPhase { action, phase: self.phase.as_str() })
        }
    }

    /// The backfill finished: evaluate the gate next.
    pub fn backfilled(&mut self) -> Result<(), TransitionError> {
        self.expect("finish the backfill of", &[Phase::Backfilling])?;
        self.phase = Phase::Gating;
        Ok(())
    }

    /// The gate's figures are in: canary if the challenger is within tolerance (or forced),
    /// refused otherwise.
    pub fn gated(&mut self, champion: ArmFigures, challenger: ArmFigures) -> Result<(), TransitionError> {
        self.expect("gate", &[Phase::Gating])?;
        // A golden set the champion finds nothing of (no queries, undecodable images, SKUs the
        // catalogue lacks) tests nothing: no pass, unless forced.
        let tested = champion.queries > 0 && champion.recall_at_10 > 0.0;
        let passed =
            tested && challenger.recall_at_10 >= champion.recall_at_10 - self.settings.tolerance - 1e-12;
        let forced = !passed && self.settings.force;
        self.gate = Some(Gate { champion, challenger, passed, forced });
        self.phase = if passed || forced { Phase::Canary } else { Phase::Refused };
        Ok(())
    }

    /// The share of traffic the canary answers now (0 unless in the canary phase).
    pub fn live_fraction(&self) -> f64 {
        if self.phase == Phase::Canary { self.settings.fraction } else { 0.0 }
    }

    /// Changes the split (and re-arms a canary that a guardrail took out of traffic).
    pub fn set_fraction(&mut self, fraction: f64) -> Result<(), TransitionError> {
        self.expect("change the traffic split of", &[Phase::Canary, Phase::RolledBack])?;
        if self.collected {
            return Err(TransitionError::WrongPhase { action: "re-arm", phase: "garbage-collected" });
        }
        if self.phase == Phase::RolledBack && (self.retired.is_some() || self.breaker.is_none()) {
            return Err(TransitionError::WrongPhase {
                action: "re-arm",
                phase: "rolled_back after a promotion",
            });
        }
        self.settings.fraction = share("fraction", fraction)?;
        self.phase = Phase::Canary;
        Ok(())
    }

    /// A guardrail tripped: the canary leaves traffic.
    pub fn trip(&mut self, limit: &str, reason: &str, at_unix_ms: u64) -> Result<(), TransitionError> {
        self.expect("trip the breaker of", &[Phase::Canary])?;
        self.breaker = Some(Breaker { limit: limit.into(), reason: reason.into(), at_unix_ms });
        self.phase = Phase::RolledBack;
        Ok(())
    }

    /// The challenger becomes the serving version; the champion keeps receiving writes.
    pub fn promote(&mut self) -> Result<Effect, TransitionError> {
        self.expect("promote", &[Phase::Canary])?;
        self.phase = Phase::Promoted;
        self.retired = Some(self.champion.clone());
        Ok(Effect::Serve(self.challenger.clone()))
    }

    /// After a promotion: the previous champion serves again.
    pub fn rollback(&mut self) -> Result<Effect, TransitionError> {
        self.expect("roll back", &[Phase::Promoted])?;
        if self.collected {
            return Err(TransitionError::WrongPhase { action: "roll back", phase: "garbage-collected" });
        }
        self.phase = Phase::RolledBack;
        Ok(Effect::Serve(self.champion.clone()))
    }

    /// Drops the challenger before promotion.
    pub fn abort(&mut self) -> Result<Effect, TransitionError> {
        self.expect(
            "abort",
            &[Phase::Backfilling, Phase::Gating, Phase::Refused, Phase::Canary, Phase::RolledBack],
        )?;
        if self.retired.is_some() {
            return Err(TransitionError::WrongPhase {
                action: "abort",
                phase: "rolled back after a promotion (use gc)",
            });
        }
        self.phase = Phase::Aborted;
        self.collected = true;
        Ok(Effect::Drop(self.challenger.clone()))
    }

    /// Drops whichever version lost: the old champion after a promotion, the challenger after
    /// a rollback.
    pub fn gc(&mut self) -> Result<Effect, TransitionError> {
        self.expect("garbage-collect", &[Phase::Promoted, Phase::RolledBack])?;
        if self.collected {
            return Ok(Effect::None);
        }
        self.collected = true;
        Ok(match self.phase {
            Phase::Promoted => Effect::Drop(self.champion.clone()),
            _ => Effect::Drop(self.challenger.clone()),
        })
    }

    /// The versions that must keep receiving writes.
    pub fn written_versions(&self) -> Vec<ModelVersion> {
        if self.collected || self.phase == Phase::Aborted {
            return vec![];
        }
        vec![self.champion.clone(), self.challenger.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> ModelVersion {
        ModelVersion::new(s).unwrap()
    }

    fn figs(recall: f64) -> ArmFigures {
        ArmFigures { queries: 10, recall_at_10: recall, mrr: recall / 2.0 }
    }

    fn started() -> Rollout {
        Rollout::start(None, 7, v("a"), v("b"), Settings::default()).unwrap()
    }

    #[test]
    fn the_happy_path_and_its_effects() {
        let mut r = started();
        assert_eq!(r.live_fraction(), 0.0);
        r.backfilled().unwrap();
        r.gated(figs(0.9), figs(0.895)).unwrap();
        assert_eq!(r.phase, Phase::Canary);
        assert!(r.gate.as_ref().unwrap().passed);
        assert_eq!(r.live_fraction(), 0.05);
        r.set_fraction(0.5).unwrap();
        assert_eq!(r.promote().unwrap(), Effect::Serve(v("b")));
        assert_eq!(r.retired, Some(v("a")));
        assert_eq!(r.rollback().unwrap(), Effect::Serve(v("a")));
        assert_eq!(r.gc().unwrap(), Effect::Drop(v("b")));
        assert_eq!(r.gc().unwrap(), Effect::None);
        assert!(r.written_versions().is_empty());
    }

    #[test]
    fn the_gate_refuses_a_worse_challenger_unless_forced() {
        let mut r = started();
        r.backfilled().unwrap();
        r.gated(figs(0.9), figs(0.85)).unwrap();
        assert_eq!(r.phase, Phase::Refused);
        assert_eq!(r.live_fraction(), 0.0);
        assert!(r.promote().is_err());
        let mut forced =
            Rollout::start(None, 1, v("a"), v("b"), Settings { force: true, ..Settings::default() }).unwrap();
        forced.backfilled().unwrap();
        forced.gated(figs(0.9), figs(0.85)).unwrap();
        let g = forced.gate.as_ref().unwrap();
        assert_eq!((forced.phase, g.passed, g.forced), (Phase::Canary, false, true));

        // A golden set that tests nothing passes nothing.
        for champion in [ArmFigures { queries: 0, recall_at_10: 0.0, mrr: 0.0 }, figs(0.0)] {
            let mut r = started();
            r.backfilled().unwrap();
            r.gated(champion, figs(0.0)).unwrap();
            assert_eq!(r.phase, Phase::Refused, "{champion:?}");
        }
    }

    #[test]
    fn a_trip_takes_the_canary_out_and_records_why() {
        let mut r = started();
        r.backfilled().unwrap();
        r.gated(figs(0.9), figs(0.9)).unwrap();
        r.trip("error_rate", "canary error rate 0.2 exceeds 0.05", 42).unwrap();
        assert_eq!((r.phase, r.live_fraction()), (Phase::RolledBack, 0.0));
        assert_eq!(r.breaker.as_ref().unwrap().limit, "error_rate");
        assert!(r.promote().is_err(), "a tripped canary is not promoted");
        r.set_fraction(0.1).unwrap();
        assert_eq!(r.phase, Phase::Canary, "set re-arms it");
        assert_eq!(r.abort().unwrap(), Effect::Drop(v("b")));

        // Once `gc` has dropped the tripped challenger, nothing puts it back in traffic.
        let mut tripped = started();
        tripped.backfilled().unwrap();
        tripped.gated(figs(0.9), figs(0.9)).unwrap();
        tripped.trip("overlap", "too low", 1).unwrap();
        assert_eq!(tripped.gc().unwrap(), Effect::Drop(v("b")));
        assert!(tripped.set_fraction(0.5).is_err(), "a collected challenger is not re-armed");
        assert_eq!(tripped.phase, Phase::RolledBack);
    }

    #[test]
    fn illegal_transitions_and_values_are_refused() {
        let r = started();
        assert!(matches!(
            Rollout::start(Some(&r), 2, v("a"), v("c"), Settings::default()),
            Err(TransitionError::Busy { .. })
        ));
        assert!(Rollout::start(None, 2, v("a"), v("a"), Settings::default()).is_err());
        let bad = Settings { fraction: 1.5, ..Settings::default() };
        assert!(matches!(
            Rollout::start(None, 2, v("a"), v("c"), bad),
            Err(TransitionError::OutOfRange { .. })
        ));
        let mut r = started();
        assert!(r.gated(figs(1.0), figs(1.0)).is_err());
        assert!(r.set_fraction(0.2).is_err());
        assert!(r.rollback().is_err());
        assert!(r.gc().is_err());
        let mut done = started();
        done.backfilled().unwrap();
        done.gated(figs(0.5), figs(0.5)).unwrap();
        done.promote().unwrap();
        assert!(done.abort().is_err());
        assert!(
            matches!(
                Rollout::start(Some(&done), 3, v("b"), v("c"), Settings::default()),
                Err(TransitionError::NotCollected { .. })
            ),
            "a new rollout waits for the old champion's index to be dropped"
        );
        done.gc().unwrap();
        assert!(done.rollback().is_err(), "the old champion is gone");
        assert!(Rollout::start(Some(&done), 3, v("b"), v("c"), Settings::default()).is_ok());
    }

    #[test]
    fn it_round_trips_through_json() {
        let mut r = started();
        r.backfilled().unwrap();
        r.gated(figs(0.9), figs(0.9)).unwrap();
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["phase"], "canary");
        assert!(j["settings"].get("backfill_throttle_ms").is_none(), "0 is left out, as before it existed");
        assert_eq!(serde_json::from_value::<Rollout>(j).unwrap(), r);
        r.settings.backfill_throttle_ms = 1500;
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["settings"]["backfill_throttle_ms"], 1500);
        assert_eq!(serde_json::from_value::<Rollout>(j).unwrap(), r);
    }
}
