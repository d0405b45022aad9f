//! Canary guardrails: a sliding window of per-request and shadow observations, and the breaker
//! decision over it (canary error rate, canary/champion p99 latency ratio, shadow overlap).
//! Pure: the caller passes the time (milliseconds on any monotonic clock) into every call and
//! acts on a [`Trip`] by taking the canary out of traffic and recording the reason.
//!
//! An observation made at `t` is in the window at `now` iff `now - t < window_ms`. Memory is
//! bounded twice: every insert drops what has left the window, and each series keeps at most
//! [`Window::MAX_PER_SERIES`] observations (oldest dropped first), so under a flood the figures
//! cover the most recent observations only.

use std::collections::VecDeque;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::metrics::percentile_of_sorted;
use super::router::Arm;

/// Why a guardrail configuration is refused.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum GuardrailError {
    #[error("guardrail {field} is {value}; it must be {expected}")]
    BadCount { field: &'static str, value: u64, expected: &'static str },
    #[error("guardrail {field} is {value}; it must be {expected}")]
    BadLimit { field: &'static str, value: f64, expected: &'static str },
}

/// The guardrail limits, as the rollout's configuration gives them. Missing fields take their
/// defaults; unknown fields are refused.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardrailConfig {
    /// Length of the sliding window, in milliseconds.
    pub window_ms: u64,
    /// No limit is judged before the window holds this many canary requests; the p99 ratio also
    /// needs this many latency samples from each arm.
    pub min_requests: u64,
    /// Largest tolerated share of failed canary requests.
    pub max_canary_error_rate: f64,
    /// Largest tolerated canary p99 / champion p99 (at least 1).
    pub max_p99_ratio: f64,
    /// Smallest tolerated mean Jaccard overlap of shadowed answer pairs.
    pub min_shadow_overlap: f64,
    /// The overlap is judged only over at least this many shadowed queries.
    pub min_shadow: u64,
}

impl Default for GuardrailConfig {
    fn default() -> Self {
        Self {
            window_ms: 60_000,
            min_requests: 50,
            max_canary_error_rate: 0.05,
            max_p99_ratio: 2.0,
            min_shadow_overlap: 0.3,
            min_shadow: 20,
        }
    }
}

impl GuardrailConfig {
    /// Checks every field's range; the error names the field and its value.
    pub fn validate(&self) -> Result<(), GuardrailError> {
        let count = |field, value: u64| {
            if value >= 1 {
                Ok(())
            } else {
                Err(GuardrailError::BadCount { field, value, expected: "at least 1" })
            }
        };
        let share = |field, value: f64| {
            if (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(GuardrailError::BadLimit { field, value, expected: "a number in [0, 1]" })
            }
        };
        count("window_ms", self.window_ms)?;
        count("min_requests", self.min_requests)?;
        share("max_canary_error_rate", self.max_canary_error_rate)?;
        if !(self.max_p99_ratio >= 1.0 && self.max_p99_ratio.is_finite()) {
            return Err(GuardrailError::BadLimit {
                field: "max_p99_ratio",
                value: self.max_p99_ratio,
                expected: "a finite number of at least 1",
            });
        }
        share("min_shadow_overlap", self.min_shadow_overlap)?;
        count("min_shadow", self.min_shadow)?;
        Ok(())
    }
}

/// Which guardrail tripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// [`GuardrailConfig::max_canary_error_rate`].
    ErrorRate,
    /// [`GuardrailConfig::max_p99_ratio`].
    P99Ratio,
    /// [`GuardrailConfig::min_shadow_overlap`].
    ShadowOverlap,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::ErrorRate => "error_rate",
            Limit::P99Ratio => "p99_ratio",
            Limit::ShadowOverlap => "shadow_overlap",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A broken limit: take the canary out of traffic and record why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    pub limit: Limit,
    /// The measured value (error rate, p99 ratio or mean Jaccard overlap).
    pub value: f64,
    /// The configured limit it broke.
    pub threshold: f64,
    /// One sentence for operators: the limit, the measured value, the threshold and the counts.
    pub reason: String,
}

/// One arm's figures over the window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ArmStats {
    pub requests: u64,
    pub errors: u64,
    /// `errors / requests`; `None` without requests.
    pub error_rate: Option<f64>,
    /// How many successful requests carried a usable latency: the p50 and p99 are over these.
    pub latency_samples: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Shadow comparison figures over the window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ShadowStats {
    pub count: u64,
    /// `None` without shadowed queries.
    pub mean_jaccard: Option<f64>,
    pub mean_rbo: Option<f64>,
}

/// Everything the window holds at one moment, for `vitrine rollout status` and the breaker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowStats {
    pub window_ms: u64,
    pub champion: ArmStats,
    pub canary: ArmStats,
    pub shadow: ShadowStats,
}

impl WindowStats {
    pub fn arm(&self, arm: Arm) -> &ArmStats {
        match arm {
            Arm::Champion => &self.champion,
            Arm::Canary => &self.canary,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct RequestObs {
    at_ms: u64,
    /// Only successful requests with a finite latency contribute to the percentiles.
    latency_ms: Option<f64>,
    ok: bool,
}

#[derive(Debug, Clone, Copy)]
struct ShadowObs {
    at_ms: u64,
    jaccard: f64,
    rbo: f64,
}

/// p99s below this are compared as this, so that scheduling noise on fast queries (a SKU
/// query answers in well under a millisecond; a busy 2-core host adds a few) cannot trip the
/// ratio: the canary must be slower by a margin a shopper would notice.
const P99_FLOOR_MS: f64 = 5.0;

/// The sliding window of one canary rollout's observations.
#[derive(Debug, Clone)]
pub struct Window {
    cfg: GuardrailConfig,
    cap: usize,
    champion: VecDeque<RequestObs>,
    canary: VecDeque<RequestObs>,
    shadow: VecDeque<ShadowObs>,
}

impl Window {
    /// The most observations kept per series (each arm's requests, shadowed queries).
    pub const MAX_PER_SERIES: usize = 100_000;

    /// An empty window; refuses an invalid configuration.
    pub fn new(cfg: GuardrailConfig) -> Result<Self, GuardrailError> {
        Self::with_cap(cfg, Self::MAX_PER_SERIES)
    }

    fn with_cap(cfg: GuardrailConfig, cap: usize) -> Result<Self, GuardrailError> {
        cfg.validate()?;
        Ok(Self { cfg, cap, champion: VecDeque::new(), canary: VecDeque::new(), shadow: VecDeque::new() })
    }

    pub fn config(&self) -> &GuardrailConfig {
        &self.cfg
    }

    /// How many observations are held in all (for memory accounting).
    pub fn retained(&self) -> usize {
        self.champion.len() + self.canary.len() + self.shadow.len()
    }

    /// Whether an observation made at `at_ms` is still in the window at `now_ms`. Observations
    /// stamped after `now_ms` (a clock read just before another thread's) count as in it.
    fn in_window(&self, at_ms: u64, now_ms: u64) -> bool {
        at_ms.saturating_add(self.cfg.window_ms) > now_ms
    }

    fn evict(&mut self, now_ms: u64) {
        let window_ms = self.cfg.window_ms;
        let fresh = |at_ms: u64| at_ms.saturating_add(window_ms) > now_ms;
        while self.champion.front().is_some_and(|o| !fresh(o.at_ms)) {
            self.champion.pop_front();
        }
        while self.canary.front().is_some_and(|o| !fresh(o.at_ms)) {
            self.canary.pop_front();
        }
        while self.shadow.front().is_some_and(|o| !fresh(o.at_ms)) {
            self.shadow.pop_front();
        }
    }

    fn push_capped<T>(series: &mut VecDeque<T>, cap: usize, item: T) {
        while series.len() >= cap.max(1) {
            series.pop_front();
        }
        series.push_back(item);
    }

    /// Records one answered query. A failed request counts towards the error rate only; a
    /// negative latency counts as 0 and a non-finite one is left out of the percentiles.
    pub fn record_request(&mut self, now_ms: u64, arm: Arm, latency_ms: f64, ok: bool) {
        self.evict(now_ms);
        let latency_ms = (ok && latency_ms.is_finite()).then_some(latency_ms.max(0.0));
        let series = match arm {
            Arm::Champion => &mut self.champion,
            Arm::Canary => &mut self.canary,
        };
        Self::push_capped(series, self.cap, RequestObs { at_ms: now_ms, latency_ms, ok });
    }

    /// Records one shadow comparison: the overlaps of the two arms' answers to one query.
    /// Values are clamped to `[0, 1]`; a comparison with a NaN overlap is not recorded.
    pub fn record_shadow(&mut self, now_ms: u64, jaccard: f64, rbo: f64) {
        self.evict(now_ms);
        if jaccard.is_nan() || rbo.is_nan() {
            return;
        }
        let obs = ShadowObs { at_ms: now_ms, jaccard: jaccard.clamp(0.0, 1.0), rbo: rbo.clamp(0.0, 1.0) };
        Self::push_capped(&mut self.shadow, self.cap, obs);
    }

    fn arm_stats(&self, series: &VecDeque<RequestObs>, now_ms: u64) -> ArmStats {
        let (mut requests, mut errors) = (0u64, 0u64);
        let mut latencies = Vec::new();
        for obs in series.iter().filter(|o| self.in_window(o.at_ms, now_ms)) {
            requests += 1;
            errors += u64::from(!obs.ok);
            latencies.extend(obs.latency_ms);
        }
        latencies.sort_unstable_by(f64::total_cmp);
        ArmStats {
            requests,
            errors,
            error_rate: (requests > 0).then(|| errors as f64 / requests as f64),
            latency_samples: latencies.len() as u64,
            p50_ms: percentile_of_sorted(&latencies, 0.50),
            p99_ms: percentile_of_sorted(&latencies, 0.99),
        }
    }

    /// The window's figures at `now_ms`.
    pub fn snapshot(&self, now_ms: u64) -> WindowStats {
        let (mut count, mut jaccard_sum, mut rbo_sum) = (0u64, 0.0, 0.0);
        for obs in self.shadow.iter().filter(|o| self.in_window(o.at_ms, now_ms)) {
            count += 1;
            jaccard_sum += obs.jaccard;
            rbo_sum += obs.rbo;
        }
        let mean = |sum: f64| (count > 0).then(|| (sum / count as f64).clamp(0.0, 1.0));
        WindowStats {
            window_ms: self.cfg.window_ms,
            champion: self.arm_stats(&self.champion, now_ms),
            canary: self.arm_stats(&self.canary, now_ms),
            shadow: ShadowStats { count, mean_jaccard: mean(jaccard_sum), mean_rbo: mean(rbo_sum) },
        }
    }

    /// The first limit broken at `now_ms`, if any, checked in the order error rate, p99 ratio,
    /// shadow overlap. Nothing is judged while the window holds fewer than `min_requests` canary
    /// requests. A value exactly at its limit does not trip.
    pub fn check(&self, now_ms: u64) -> Option<Trip> {
        judge(&self.cfg, &self.snapshot(now_ms))
    }
}

/// `60 s` for whole seconds, `1500 ms` otherwise.
fn window_text(window_ms: u64) -> String {
    if window_ms.is_multiple_of(1000) { format!("{} s", window_ms / 1000) } else { format!("{window_ms} ms") }
}

/// The breaker decision over a snapshot (see [`Window::check`]).
pub fn judge(cfg: &GuardrailConfig, stats: &WindowStats) -> Option<Trip> {
    let (champion, canary, shadow) = (&stats.champion, &stats.canary, &stats.shadow);
    if canary.requests < cfg.min_requests {
        return None;
    }
    let window = window_text(stats.window_ms);

    if let Some(rate) = canary.error_rate
        && rate > cfg.max_canary_error_rate
    {
        return Some(Trip {
            limit: Limit::ErrorRate,
            value: rate,
            threshold: cfg.max_canary_error_rate,
            reason: format!(
                "canary error rate {rate:.3} over the last {window} exceeds {:.3} ({} of {} requests)",
                cfg.max_canary_error_rate, canary.errors, canary.requests
            ),
        });
    }

    if canary.latency_samples >= cfg.min_requests
        && champion.latency_samples >= cfg.min_requests
        && let (Some(canary_p99), Some(champion_p99)) = (canary.p99_ms, champion.p99_ms)
    {
        let ratio = canary_p99.max(P99_FLOOR_MS) / champion_p99.max(P99_FLOOR_MS);
        if ratio > cfg.max_p99_ratio {
            return Some(Trip {
                limit: Limit::P99Ratio,
                value: ratio,
                threshold: cfg.max_p99_ratio,
                reason: format!(
                    "canary p99 latency {canary_p99:.1} ms is {ratio:.2} times the champion's \
                     {champion_p99:.1} ms over the last {window}, above the limit {:.2} \
                     ({} canary and {} champion samples)",
                    cfg.max_p99_ratio, canary.latency_samples, champion.latency_samples
                ),
            });
        }
    }

    if shadow.count >= cfg.min_shadow
        && let Some(overlap) = shadow.mean_jaccard
        && overlap < cfg.min_shadow_overlap
    {
        let rbo = shadow.mean_rbo.map_or_else(|| "n/a".to_owned(), |r| format!("{r:.3}"));
        return Some(Trip {
            limit: Limit::ShadowOverlap,
            value: overlap,
            threshold: cfg.min_shadow_overlap,
            reason: format!(
                "mean shadow overlap (Jaccard) {overlap:.3} over the last {window} is below {:.3} \
                 ({} shadowed queries, mean RBO {rbo})",
                cfg.min_shadow_overlap, shadow.count
            ),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde::Deserialize;
    use serde::de::value::{Error as ValueError, MapDeserializer};

    use super::*;

    fn cfg() -> GuardrailConfig {
        GuardrailConfig {
            window_ms: 60_000,
            min_requests: 10,
            max_canary_error_rate: 0.1,
            max_p99_ratio: 2.0,
            min_shadow_overlap: 0.5,
            min_shadow: 5,
        }
    }

    fn window() -> Window {
        Window::new(cfg()).unwrap()
    }

    /// `n` requests on `arm` at `now`, the first `errors` of them failed.
    fn requests(w: &mut Window, now: u64, arm: Arm, n: u64, errors: u64, latency: f64) {
        for i in 0..n {
            w.record_request(now, arm, latency, i >= errors);
        }
    }

    fn parse(pairs: &[(&str, f64)]) -> Result<GuardrailConfig, ValueError> {
        let map = MapDeserializer::new(pairs.iter().map(|(k, v)| (*k, *v)));
        GuardrailConfig::deserialize(map)
    }

    #[test]
    fn defaults_are_valid_and_documented() {
        let d = GuardrailConfig::default();
        assert_eq!(
            d,
            GuardrailConfig {
                window_ms: 60_000,
                min_requests: 50,
                max_canary_error_rate: 0.05,
                max_p99_ratio: 2.0,
                min_shadow_overlap: 0.3,
                min_shadow: 20,
            }
        );
        d.validate().unwrap();
    }

    #[test]
    fn config_deserializes_with_defaults_and_refuses_unknown_fields() {
        let parsed = parse(&[("max_p99_ratio", 3.0)]).unwrap();
        assert_eq!(parsed, GuardrailConfig { max_p99_ratio: 3.0, ..GuardrailConfig::default() });
        let err = parse(&[("max_p99", 3.0)]).unwrap_err();
        assert!(err.to_string().contains("unknown field `max_p99`"), "{err}");
    }

    #[test]
    fn validation_names_field_and_value() {
        let bad = [
            (GuardrailConfig { window_ms: 0, ..cfg() }, "guardrail window_ms is 0; it must be at least 1"),
            (
                GuardrailConfig { min_requests: 0, ..cfg() },
                "guardrail min_requests is 0; it must be at least 1",
            ),
            (
                GuardrailConfig { max_canary_error_rate: 1.5, ..cfg() },
                "guardrail max_canary_error_rate is 1.5; it must be a number in [0, 1]",
            ),
            (
                GuardrailConfig { max_p99_ratio: 0.5, ..cfg() },
                "guardrail max_p99_ratio is 0.5; it must be a finite number of at least 1",
            ),
            (
                GuardrailConfig { max_p99_ratio: f64::INFINITY, ..cfg() },
                "guardrail max_p99_ratio is inf; it must be a finite number of at least 1",
            ),
            (
                GuardrailConfig { min_shadow_overlap: f64::NAN, ..cfg() },
                "guardrail min_shadow_overlap is NaN; it must be a number in [0, 1]",
            ),
            (GuardrailConfig { min_shadow: 0, ..cfg() }, "guardrail min_shadow is 0; it must be at least 1"),
        ];
        for (config, message) in bad {
            assert_eq!(config.validate().unwrap_err().to_string(), message);
            assert!(Window::new(config).is_err());
        }
    }

    #[test]
    fn limit_names() {
        assert_eq!(Limit::ErrorRate.as_str(), "error_rate");
        assert_eq!(Limit::P99Ratio.to_string(), "p99_ratio");
        assert_eq!(Limit::ShadowOverlap.as_str(), "shadow_overlap");
    }

    #[test]
    fn error_rate_trips_above_the_limit_only() {
        // 10% of 20 is exactly at the limit: no trip.
        let mut w = window();
        requests(&mut w, 1_000, Arm::Canary, 20, 2, 10.0);
        assert_eq!(w.check(1_000), None);
        // One more failure: 3 of 21.
        w.record_request(1_000, Arm::Canary, 10.0, false);
        let trip = w.check(1_000).unwrap();
        assert_eq!(trip.limit, Limit::ErrorRate);
        assert_eq!(trip.value, 3.0 / 21.0);
        assert_eq!(trip.threshold, 0.1);
        assert_eq!(
            trip.reason,
            "canary error rate 0.143 over the last 60 s exceeds 0.100 (3 of 21 requests)"
        );
    }

    #[test]
    fn no_judgement_below_min_requests() {
        let mut w = window();
        // 9 canary requests, all failed, shadow overlap 0, canary 100x slower.
        requests(&mut w, 0, Arm::Canary, 9, 9, 1_000.0);
        requests(&mut w, 0, Arm::Champion, 100, 0, 10.0);
        for _ in 0..10 {
            w.record_shadow(0, 0.0, 0.0);
        }
        assert_eq!(w.check(0), None);
        w.record_request(0, Arm::Canary, 1_000.0, false);
        assert_eq!(w.check(0).unwrap().limit, Limit::ErrorRate);
    }

    #[test]
    fn p99_ratio_trips_above_the_limit_only() {
        let mut w = window();
        requests(&mut w, 0, Arm::Champion, 100, 0, 50.0);
        requests(&mut w, 0, Arm::Canary, 100, 0, 100.0);
        assert_eq!(w.check(0), None, "exactly 2x");
        let mut w = window();
        requests(&mut w, 0, Arm::Champion, 100, 0, 50.0);
        requests(&mut w, 0, Arm::Canary, 100, 0, 100.5);
        let trip = w.check(0).unwrap();
        assert_eq!((trip.limit, trip.value, trip.threshold), (Limit::P99Ratio, 2.01, 2.0));
        assert_eq!(
            trip.reason,
            "canary p99 latency 100.5 ms is 2.01 times the champion's 50.0 ms over the last 60 s, \
             above the limit 2.00 (100 canary and 100 champion samples)"
        );
    }

    #[test]
    fn p99_ratio_needs_samples_from_both_arms() {
        let mut w = window();
        requests(&mut w, 0, Arm::Champion, 9, 0, 10.0);
        requests(&mut w, 0, Arm::Canary, 100, 0, 1_000.0);
        assert_eq!(w.check(0), None);
        w.record_request(0, Arm::Champion, 10.0, true);
        assert_eq!(w.check(0).unwrap().limit, Limit::P99Ratio);
    }

    #[test]
    fn p99_ratio_ignores_noise_below_the_floor() {
        let mut w = window();
        requests(&mut w, 0, Arm::Champion, 20, 0, 0.1);
        requests(&mut w, 0, Arm::Canary, 20, 0, 4.5);
        assert_eq!(w.check(0), None);
        requests(&mut w, 0, Arm::Canary, 20, 0, 12.5);
        assert_eq!(w.check(0).unwrap().value, 2.5);
    }

    #[test]
    fn p99_uses_successful_requests_only() {
        let mut w = window();
        requests(&mut w, 0, Arm::Champion, 20, 0, 10.0);
        // Failures are fast here; their latency must not pull the p99 down or up.
        requests(&mut w, 0, Arm::Canary, 20, 1, 10.0);
        w.record_request(0, Arm::Canary, 5_000.0, false);
        w.record_request(0, Arm::Canary, f64::NAN, true);
        let stats = w.snapshot(0);
        assert_eq!(stats.canary.requests, 22);
        assert_eq!(stats.canary.errors, 2);
        assert_eq!(stats.canary.latency_samples, 19);
        assert_eq!(stats.canary.p99_ms, Some(10.0));
    }

    #[test]
    fn shadow_overlap_trips_below_the_limit_only() {
        let mut w = window();
        requests(&mut w, 0, Arm::Canary, 10, 0, 10.0);
        requests(&mut w, 0, Arm::Champion, 10, 0, 10.0);
        for jaccard in [0.25, 0.75, 0.5, 0.5] {
            w.record_shadow(0, jaccard, 0.6);
        }
        assert_eq!(w.check(0), None, "4 shadowed queries are below min_shadow");
        w.record_shadow(0, 0.5, 0.6);
        assert_eq!(w.snapshot(0).shadow.mean_jaccard, Some(0.5));
        assert_eq!(w.check(0), None, "mean exactly at the limit");
        w.record_shadow(0, 0.0, 0.0);
        let trip = w.check(0).unwrap();
        assert_eq!(trip.limit, Limit::ShadowOverlap);
        assert_eq!(trip.value, 2.5 / 6.0);
        assert_eq!(
            trip.reason,
            "mean shadow overlap (Jaccard) 0.417 over the last 60 s is below 0.500 (6 shadowed queries, mean RBO 0.500)"
        );
    }

    #[test]
    fn error_rate_is_reported_before_latency_and_overlap() {
        let mut w = window();
        requests(&mut w, 0, Arm::Champion, 50, 0, 10.0);
        requests(&mut w, 0, Arm::Canary, 50, 25, 100.0);
        for _ in 0..10 {
            w.record_shadow(0, 0.0, 0.0);
        }
        assert_eq!(w.check(0).unwrap().limit, Limit::ErrorRate);
    }

    #[test]
    fn old_observations_expire() {
        let mut w = window();
        requests(&mut w, 0, Arm::Canary, 20, 20, 10.0);
        w.record_shadow(0, 0.0, 0.0);
        assert_eq!(w.check(59_999).unwrap().limit, Limit::ErrorRate);
        // At 60 s the failures have left the window, whether or not anything was inserted.
        assert_eq!(w.check(60_000), None);
        let stats = w.snapshot(60_000);
        assert_eq!((stats.canary.requests, stats.canary.error_rate, stats.shadow.count), (0, None, 0));
        assert_eq!(stats.shadow.mean_jaccard, None);
        // Healthy traffic later: the old failures are dropped from memory too.
        requests(&mut w, 60_000, Arm::Canary, 20, 0, 10.0);
        assert_eq!(w.retained(), 20);
        assert_eq!(w.check(60_000), None);
        assert_eq!(w.snapshot(60_000).canary.error_rate, Some(0.0));
    }

    #[test]
    fn window_slides_over_a_mix_of_ages() {
        let mut w = window();
        requests(&mut w, 10_000, Arm::Canary, 10, 10, 10.0); // leave the window at 70 s
        requests(&mut w, 40_000, Arm::Canary, 89, 0, 10.0); // leave it at 100 s
        assert_eq!(w.check(69_999).map(|t| t.limit), Some(Limit::ErrorRate), "10 of 99");
        let mut one_more = w.clone();
        one_more.record_request(69_999, Arm::Canary, 10.0, true);
        assert_eq!(one_more.check(69_999), None, "10 of 100 is at the limit");
        assert_eq!(w.check(70_000), None);
        assert_eq!(w.snapshot(70_000).canary.requests, 89);
    }

    #[test]
    fn observations_from_the_near_future_count() {
        let mut w = window();
        requests(&mut w, 5_000, Arm::Canary, 20, 20, 10.0);
        assert_eq!(w.snapshot(4_000).canary.requests, 20);
        w.record_request(4_000, Arm::Canary, 10.0, true);
        assert_eq!(w.retained(), 21);
    }

    #[test]
    fn memory_stays_capped_under_a_flood() {
        let mut w = Window::new(cfg()).unwrap();
        let n = Window::MAX_PER_SERIES as u64 + 50_000;
        for i in 0..n {
            // All within one window; the last MAX_PER_SERIES canary requests are healthy.
            w.record_request(i / 100, Arm::Canary, 10.0, i >= 50_000);
            w.record_request(i / 100, Arm::Champion, 10.0, true);
            w.record_shadow(i / 100, 1.0, 1.0);
        }
        assert_eq!(w.canary.len(), Window::MAX_PER_SERIES);
        assert_eq!(w.champion.len(), Window::MAX_PER_SERIES);
        assert_eq!(w.shadow.len(), Window::MAX_PER_SERIES);
        assert!(w.canary.capacity() < 2 * Window::MAX_PER_SERIES);
        let stats = w.snapshot(n / 100);
        assert_eq!(stats.canary.requests, Window::MAX_PER_SERIES as u64);
        assert_eq!(stats.canary.errors, 0, "the oldest observations went first");
        assert_eq!(w.check(n / 100), None);
    }

    #[test]
    fn small_cap_drops_oldest() {
        let mut w = Window::with_cap(cfg(), 3).unwrap();
        for i in 0..10 {
            w.record_request(i, Arm::Canary, i as f64, true);
        }
        assert_eq!(w.canary.iter().map(|o| o.at_ms).collect::<Vec<_>>(), [7, 8, 9]);
    }

    #[test]
    fn shadow_values_are_sanitised() {
        let mut w = window();
        w.record_shadow(0, f64::NAN, 0.5);
        w.record_shadow(0, 0.5, f64::NAN);
        w.record_shadow(0, 1.5, -0.5);
        let shadow = w.snapshot(0).shadow;
        assert_eq!((shadow.count, shadow.mean_jaccard, shadow.mean_rbo), (1, Some(1.0), Some(0.0)));
    }

    #[test]
    fn snapshot_figures() {
        let mut w = window();
        for latency in 1..=100 {
            w.record_request(0, Arm::Champion, f64::from(latency), true);
        }
        w.record_request(0, Arm::Champion, -3.0, true);
        let stats = w.snapshot(0);
        assert_eq!(stats.window_ms, 60_000);
        let champion = stats.arm(Arm::Champion);
        assert_eq!((champion.requests, champion.errors, champion.error_rate), (101, 0, Some(0.0)));
        assert_eq!((champion.p50_ms, champion.p99_ms), (Some(50.0), Some(99.0)));
        let canary = stats.arm(Arm::Canary);
        assert_eq!((canary.requests, canary.p50_ms, canary.p99_ms, canary.error_rate), (0, None, None, None));
    }

    #[test]
    fn window_text_forms() {
        assert_eq!(window_text(60_000), "60 s");
        assert_eq!(window_text(1_500), "1500 ms");
    }

    fn valid_config() -> impl Strategy<Value = GuardrailConfig> {
        (1u64..200_000, 1u64..80, 0.0f64..=1.0, 1.0f64..10.0, 0.0f64..=1.0, 1u64..40).prop_map(
            |(
                window_ms,
                min_requests,
                max_canary_error_rate,
                max_p99_ratio,
                min_shadow_overlap,
                min_shadow,
            )| {
                GuardrailConfig {
                    window_ms,
                    min_requests,
                    max_canary_error_rate,
                    max_p99_ratio,
                    min_shadow_overlap,
                    min_shadow,
                }
            },
        )
    }

    #[derive(Debug, Clone)]
    enum Event {
        Request(Arm),
        Shadow,
    }

    fn events() -> impl Strategy<Value = Vec<(u64, Event)>> {
        let event = prop_oneof![
            Just(Event::Request(Arm::Canary)),
            Just(Event::Request(Arm::Champion)),
            Just(Event::Shadow)
        ];
        proptest::collection::vec((0u64..2_000, event), 0..400)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Healthy traffic never trips: no errors, one latency for both arms, full overlap.
        #[test]
        fn healthy_traffic_never_trips(cfg in valid_config(), latency in 0.0f64..5_000.0, events in events()) {
            let mut w = Window::new(cfg).unwrap();
            let mut now = 0u64;
            for (step, event) in events {
                now += step;
                match event {
                    Event::Request(arm) => w.record_request(now, arm, latency, true),
                    Event::Shadow => w.record_shadow(now, 1.0, 1.0),
                }
                prop_assert_eq!(w.check(now), None);
            }
        }

        /// The window never holds anything older than it covers once something is inserted.
        #[test]
        fn evicted_series_hold_only_fresh_observations(cfg in valid_config(), events in events()) {
            let mut w = Window::new(cfg).unwrap();
            let mut now = 0u64;
            for (step, event) in events {
                now += step;
                match event {
                    Event::Request(arm) => w.record_request(now, arm, 10.0, false),
                    Event::Shadow => w.record_shadow(now, 0.0, 0.0),
                }
                let fresh = |at: u64| at + cfg.window_ms > now;
                prop_assert!(w.canary.iter().chain(&w.champion).all(|o| fresh(o.at_ms)));
                prop_assert!(w.shadow.iter().all(|o| fresh(o.at_ms)));
                let stats = w.snapshot(now);
                prop_assert_eq!(stats.canary.requests + stats.champion.requests + stats.shadow.count,
                    w.retained() as u64);
            }
        }
    }
}
