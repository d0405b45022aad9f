//! The rollout's figures of merit, pure and IO-free: overlap of two top-k lists (Jaccard and
//! rank-biased overlap) for shadow comparison, nearest-rank latency percentiles, and the
//! pre-traffic gate (recall@10 and MRR of each arm over a golden query set).

use std::collections::HashSet;
use std::hash::Hash;

use serde::{Deserialize, Serialize};

/// Why a gate cannot be decided.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error("gate tolerance {0} is not a number in [0, 1]")]
    BadTolerance(f64),
    #[error("the {arm} ran no golden queries: the gate has nothing to compare")]
    NoGoldenQueries { arm: &'static str },
}

/// The persistence RBO uses unless told otherwise: the top 10 ranks carry about 86% of the
/// weight.
pub const DEFAULT_RBO_P: f64 = 0.9;

/// The depth the gate measures recall at.
pub const GATE_K: usize = 10;

/// The distinct items of a list in first-seen order: ranked lists hold each item once, and a
/// repeated id (which a top-k answer should never carry) counts at its best rank only.
fn distinct<T: Eq + Hash>(list: &[T]) -> Vec<&T> {
    let mut seen = HashSet::with_capacity(list.len());
    list.iter().filter(|item| seen.insert(*item)).collect()
}

/// Jaccard overlap of two top-k lists as sets: `|A ∩ B| / |A ∪ B|`, in `[0, 1]`. Order and
/// repeats are ignored; two empty lists agree completely (1.0).
///
/// ```
/// use vitrine::rollout::metrics::jaccard;
/// assert_eq!(jaccard(&["a", "b", "c"], &["c", "d", "a"]), 0.5);
/// ```
pub fn jaccard<T: Eq + Hash>(a: &[T], b: &[T]) -> f64 {
    let a: HashSet<&T> = a.iter().collect();
    let b: HashSet<&T> = b.iter().collect();
    let shared = a.intersection(&b).count();
    let union = a.len() + b.len() - shared;
    if union == 0 { 1.0 } else { shared as f64 / union as f64 }
}

/// Rank-biased overlap (Webber, Moffat & Zobel, "A similarity measure for indefinite rankings",
/// TOIS 2010), in its extrapolated form RBO_ext (their equation 32), which handles finite lists
/// of different lengths. In `[0, 1]`: identical lists give 1, disjoint lists 0, and agreement
/// near the top weighs more than agreement further down.
///
/// With `S` the shorter list (length `s`), `L` the longer (length `l`), `X_d` the number of
/// items the two depth-`d` prefixes share (for `d > s`, `S`'s prefix is all of `S`) and
/// persistence `p`:
///
/// ```text
/// RBO_ext = (1-p)/p · [ Σ_{d=1..l} X_d/d · p^d  +  Σ_{d=s+1..l} X_s·(d-s)/(s·d) · p^d ]
///           + [ (X_l - X_s)/l + X_s/s ] · p^l
/// ```
///
/// The extrapolation assumes the agreement seen at the end of each list continues below it, so
/// a list that is a prefix of the other also scores 1. Each list's items count once, at their
/// first rank; two empty lists score 1, one empty list against a non-empty one 0. A small `p`
/// looks at the very top only; `p = 0.9` ([`DEFAULT_RBO_P`]) suits top-10 lists.
///
/// # Panics
/// If `p` is not strictly between 0 and 1 (a programming error: `p` is a constant).
///
/// ```
/// use vitrine::rollout::metrics::rbo;
/// assert_eq!(rbo(&[1, 2, 3], &[1, 3, 2], 0.5), 0.875);
/// ```
pub fn rbo<T: Eq + Hash>(a: &[T], b: &[T], p: f64) -> f64 {
    assert!(p > 0.0 && p < 1.0, "RBO persistence must be in (0, 1), got {p}");
    let (a, b) = (distinct(a), distinct(b));
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    let (s, l) = (short.len(), long.len());
    if l == 0 {
        return 1.0;
    }
    if s == 0 {
        return 0.0;
    }
    let mut seen_short: HashSet<&T> = HashSet::with_capacity(s);
    let mut seen_long: HashSet<&T> = HashSet::with_capacity(l);
    let mut overlap = 0usize; // X_d
    let mut overlap_at_s = 0usize; // X_s
    let mut sum = 0.0;
    let mut weight = 1.0; // p^d
    for d in 1..=l {
        weight *= p;
        let from_long = long[d - 1];
        if d <= s {
            let from_short = short[d - 1];
            if from_short == from_long {
                overlap += 1;
            } else {
                overlap +=
                    usize::from(seen_long.contains(from_short)) + usize::from(seen_short.contains(from_long));
            }
            seen_short.insert(from_short);
        } else if seen_short.contains(from_long) {
            overlap += 1;
        }
        seen_long.insert(from_long);
        if d == s {
            overlap_at_s = overlap;
        }
        let (d_f, s_f) = (d as f64, s as f64);
        sum += overlap as f64 / d_f * weight;
        if d > s {
            sum += overlap_at_s as f64 * (d_f - s_f) / (s_f * d_f) * weight;
        }
    }
    // `weight` is now p^l and `overlap` X_l.
    let tail = ((overlap - overlap_at_s) as f64 / l as f64 + overlap_at_s as f64 / s as f64) * weight;
    ((1.0 - p) / p * sum + tail).clamp(0.0, 1.0)
}

/// The nearest-rank `q`-quantile (`q` in `[0, 1]`, so 0.99 for p99) of unsorted samples, in the
/// samples' unit: the smallest sample with at least a share `q` of the samples at or below it
/// (`q = 0` gives the minimum). NaN samples are ignored. `None` for no samples or a `q` outside
/// `[0, 1]`.
///
/// ```
/// use vitrine::rollout::metrics::percentile;
/// assert_eq!(percentile(&[40.0, 10.0, 30.0, 20.0], 0.5), Some(20.0));
/// assert_eq!(percentile(&[40.0, 10.0, 30.0, 20.0], 0.99), Some(40.0));
/// assert_eq!(percentile(&[], 0.5), None);
/// ```
pub fn percentile(samples: &[f64], q: f64) -> Option<f64> {
    let mut samples: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
    let index = nearest_rank_index(samples.len(), q)?;
    let (_, value, _) = samples.select_nth_unstable_by(index, f64::total_cmp);
    Some(*value)
}

/// [`percentile`] of samples already sorted ascending without NaN (as `sort_by(f64::total_cmp)`
/// leaves them), without copying: for reading several quantiles off one sort.
pub fn percentile_of_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    debug_assert!(sorted.is_sorted_by(|a, b| a <= b), "percentile_of_sorted needs sorted samples");
    nearest_rank_index(sorted.len(), q).map(|index| sorted[index])
}

/// The 0-based index of the nearest-rank `q`-quantile among `n` sorted samples.
fn nearest_rank_index(n: usize, q: f64) -> Option<usize> {
    if n == 0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = (q * n as f64).ceil() as usize; // 1-based; 0 only for q = 0
    Some(rank.clamp(1, n) - 1)
}

/// One golden query as an arm answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoldenResult<'a> {
    /// The arm's answer, best first.
    pub hits: &'a [String],
    /// The ids a good answer contains (any one of them counts).
    pub expected: &'a [String],
}

impl GoldenResult<'_> {
    /// The 1-based rank of the first expected id in the answer.
    fn first_expected_rank(&self) -> Option<usize> {
        let expected: HashSet<&str> = self.expected.iter().map(String::as_str).collect();
        self.hits.iter().position(|hit| expected.contains(hit.as_str())).map(|index| index + 1)
    }
}

/// Share of queries with at least one expected id among the first `k` hits (0 for no queries).
/// A query with no expected id can never hit and counts as a miss.
pub fn recall_at_k(results: &[GoldenResult<'_>], k: usize) -> f64 {
    if results.is_empty() {
        return 0.0;
    }
    let hits = results.iter().filter(|r| r.first_expected_rank().is_some_and(|rank| rank <= k)).count();
    hits as f64 / results.len() as f64
}

/// Mean over queries of `1 / rank` of the first expected id in the whole answer, 0 for a query
/// whose answer holds none (and 0 for no queries).
pub fn mean_reciprocal_rank(results: &[GoldenResult<'_>]) -> f64 {
    if results.is_empty() {
        return 0.0;
    }
    let sum: f64 =
        results.iter().filter_map(GoldenResult::first_expected_rank).map(|rank| 1.0 / rank as f64).sum();
    sum / results.len() as f64
}

/// One arm's figures over the golden set, as the gate compares them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateFigures {
    pub queries: usize,
    /// [`recall_at_k`] at [`GATE_K`].
    pub recall_at_10: f64,
    pub mrr: f64,
}

/// recall@10 and MRR of one arm's answers to the golden queries.
///
/// ```
/// use vitrine::rollout::metrics::{gate_figures, GoldenResult};
/// let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
/// let (hits, expected) = (s(&["B", "A"]), s(&["A"]));
/// let figures = gate_figures(&[GoldenResult { hits: &hits, expected: &expected }]);
/// assert_eq!((figures.queries, figures.recall_at_10, figures.mrr), (1, 1.0, 0.5));
/// ```
pub fn gate_figures(results: &[GoldenResult<'_>]) -> GateFigures {
    GateFigures {
        queries: results.len(),
        recall_at_10: recall_at_k(results, GATE_K),
        mrr: mean_reciprocal_rank(results),
    }
}

/// The gate's verdict: the challenger passes iff its recall@10 is at least the champion's minus
/// `tolerance` (in `[0, 1]`). Refuses to judge a bad tolerance or an arm that ran no queries.
pub fn gate_passes(
    champion: &GateFigures,
    challenger: &GateFigures,
    tolerance: f64,
) -> Result<bool, MetricsError> {
    if !(0.0..=1.0).contains(&tolerance) {
        return Err(MetricsError::BadTolerance(tolerance));
    }
    for (arm, figures) in [("champion", champion), ("challenger", challenger)] {
        if figures.queries == 0 {
            return Err(MetricsError::NoGoldenQueries { arm });
        }
    }
    Ok(challenger.recall_at_10 >= champion.recall_at_10 - tolerance)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const EPS: f64 = 1e-12;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < EPS
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// RBO_ext straight from the paper's formula, with `X_d` counted from fresh prefix sets.
    fn rbo_reference(a: &[u8], b: &[u8], p: f64) -> f64 {
        let (a, b): (Vec<u8>, Vec<u8>) =
            (distinct(a).into_iter().copied().collect(), distinct(b).into_iter().copied().collect());
        let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
        let (s, l) = (short.len(), long.len());
        if l == 0 {
            return 1.0;
        }
        if s == 0 {
            return 0.0;
        }
        let x = |d: usize| {
            let sp: HashSet<u8> = short[..d.min(s)].iter().copied().collect();
            long[..d].iter().filter(|i| sp.contains(i)).count() as f64
        };
        let (sf, lf) = (s as f64, l as f64);
        let first: f64 = (1..=l).map(|d| x(d) / d as f64 * p.powi(d as i32)).sum();
        let second: f64 =
            (s + 1..=l).map(|d| x(s) * (d as f64 - sf) / (sf * d as f64) * p.powi(d as i32)).sum();
        (1.0 - p) / p * (first + second) + ((x(l) - x(s)) / lf + x(s) / sf) * p.powi(l as i32)
    }

    #[test]
    fn jaccard_basics() {
        let empty: [&str; 0] = [];
        assert_eq!(jaccard(&empty, &empty), 1.0);
        assert_eq!(jaccard(&["a"], &empty), 0.0);
        assert_eq!(jaccard(&["a", "b"], &["b", "a"]), 1.0);
        assert_eq!(jaccard(&["a", "b"], &["c", "d"]), 0.0);
        assert_eq!(jaccard(&["a", "b", "c"], &["b", "c", "d"]), 0.5);
        assert_eq!(jaccard(&["a", "a", "b"], &["a"]), 0.5);
        assert_eq!(jaccard(&strings(&["x", "y"]), &strings(&["y"])), 0.5);
    }

    #[test]
    fn rbo_identical_and_disjoint() {
        let top10: Vec<u32> = (0..10).collect();
        let other: Vec<u32> = (10..20).collect();
        for p in [0.1, 0.5, DEFAULT_RBO_P, 0.99] {
            assert!(close(rbo(&top10, &top10, p), 1.0), "p = {p}");
            assert_eq!(rbo(&top10, &other, p), 0.0);
        }
        let empty: [u32; 0] = [];
        assert_eq!(rbo(&empty, &empty, 0.9), 1.0);
        assert_eq!(rbo(&top10, &empty, 0.9), 0.0);
        assert_eq!(rbo(&empty, &top10, 0.9), 0.0);
    }

    #[test]
    fn rbo_hand_computed() {
        // Equal lengths, [1,2,3] vs [1,3,2], p = 0.5: X = 1, 1, 3, so
        // (1-p)/p · (1·p + 1/2·p² + 1·p³) + 1·p³ = 0.5 + 0.125 + 0.125 + 0.125.
        assert_eq!(rbo(&[1, 2, 3], &[1, 3, 2], 0.5), 0.875);
        // Uneven: S = [4,1] (s = 2), L = [1,2,3] (l = 3), p = 0.5: X_1 = 0, X_2 = 1, X_3 = 1.
        // Σ X_d/d·p^d = 1/2·1/4 + 1/3·1/8 = 1/6; extrapolation X_s·(3-2)/(2·3)·p³ = 1/48;
        // tail ((1-1)/3 + 1/2)·p³ = 1/16. Total 1/6 + 1/48 + 1/16 = 1/4.
        assert!(close(rbo(&[4, 1], &[1, 2, 3], 0.5), 0.25));
        assert!(close(rbo(&[1, 2, 3], &[4, 1], 0.5), 0.25));
        // A prefix of the other list extrapolates to full agreement.
        assert!(close(rbo(&["a"], &["a", "b"], 0.9), 1.0));
        // Repeats count once, at their first rank.
        assert_eq!(rbo(&[1, 1, 2, 3], &[1, 3, 2], 0.5), 0.875);
    }

    #[test]
    fn rbo_weighs_the_top_more() {
        let a = ["a", "b", "c", "d"];
        let swap_top = ["b", "a", "c", "d"];
        let swap_bottom = ["a", "b", "d", "c"];
        assert!(rbo(&a, &swap_top, 0.9) < rbo(&a, &swap_bottom, 0.9));
        // Jaccard cannot tell them apart.
        assert_eq!(jaccard(&a, &swap_top), jaccard(&a, &swap_bottom));
    }

    #[test]
    fn rbo_grows_with_shared_prefix() {
        let a: Vec<u32> = (0..10).collect();
        let mut last = -1.0;
        for shared in 0..=10 {
            let b: Vec<u32> = (0..10).map(|i| if i < shared { i } else { 100 + i }).collect();
            let value = rbo(&a, &b, DEFAULT_RBO_P);
            assert!(value > last, "{shared} shared: {value} after {last}");
            last = value;
        }
        assert!(close(last, 1.0));
    }

    #[test]
    #[should_panic(expected = "RBO persistence must be in (0, 1), got 1")]
    fn rbo_refuses_bad_persistence() {
        rbo(&[1], &[1], 1.0);
    }

    #[test]
    fn percentile_edges() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[f64::NAN], 0.5), None);
        assert_eq!(percentile(&[3.0], 0.0), Some(3.0));
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[3.0], 1.0), Some(3.0));
        assert_eq!(percentile(&[1.0, 2.0], -0.1), None);
        assert_eq!(percentile(&[1.0, 2.0], 1.1), None);
        assert_eq!(percentile(&[1.0, 2.0], f64::NAN), None);
        let samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&samples, 0.0), Some(1.0));
        assert_eq!(percentile(&samples, 0.5), Some(50.0));
        assert_eq!(percentile(&samples, 0.99), Some(99.0));
        assert_eq!(percentile(&samples, 0.995), Some(100.0));
        assert_eq!(percentile(&samples, 1.0), Some(100.0));
        assert_eq!(percentile(&[5.0, f64::NAN, 1.0], 1.0), Some(5.0));
        assert_eq!(percentile_of_sorted(&[1.0, 2.0, 3.0], 0.5), Some(2.0));
        assert_eq!(percentile_of_sorted(&[], 0.5), None);
    }

    #[test]
    fn gate_figures_on_a_hand_made_set() {
        let hits: Vec<Vec<String>> = vec![
            strings(&["A", "B", "C"]), // first expected at 1
            strings(&["X", "Y", "B"]), // at 3
            strings(&["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "Z"]), // at 11: not in top 10
            strings(&["Q"]),           // none
        ];
        let expected = [strings(&["A"]), strings(&["B", "Y"]), strings(&["Z"]), strings(&["R"])];
        let results: Vec<GoldenResult<'_>> =
            hits.iter().zip(&expected).map(|(h, e)| GoldenResult { hits: h, expected: e }).collect();
        let figures = gate_figures(&results);
        assert_eq!(figures.queries, 4);
        assert_eq!(figures.recall_at_10, 0.5);
        // Second query's first expected id is Y at rank 2.
        assert!(close(figures.mrr, (1.0 + 0.5 + 1.0 / 11.0 + 0.0) / 4.0));
        assert_eq!(recall_at_k(&results, 1), 0.25);
        assert_eq!(recall_at_k(&results, 11), 0.75);
        assert_eq!(recall_at_k(&[], 10), 0.0);
        let empty = gate_figures(&[]);
        assert_eq!((empty.queries, empty.recall_at_10, empty.mrr), (0, 0.0, 0.0));
    }

    #[test]
    fn gate_verdict() {
        let champion = GateFigures { queries: 100, recall_at_10: 0.80, mrr: 0.6 };
        let at = |recall| GateFigures { queries: 100, recall_at_10: recall, mrr: 0.5 };
        assert_eq!(gate_passes(&champion, &at(0.80), 0.0), Ok(true));
        assert_eq!(gate_passes(&champion, &at(0.79), 0.0), Ok(false));
        assert_eq!(gate_passes(&champion, &at(0.75), 0.05), Ok(true));
        assert_eq!(gate_passes(&champion, &at(0.74), 0.05), Ok(false));
        assert_eq!(gate_passes(&champion, &at(0.95), 0.0), Ok(true));
        assert_eq!(gate_passes(&champion, &at(0.9), -0.01), Err(MetricsError::BadTolerance(-0.01)));
        assert!(gate_passes(&champion, &at(0.9), f64::NAN).is_err());
        let none = GateFigures { queries: 0, recall_at_10: 0.0, mrr: 0.0 };
        let err = gate_passes(&champion, &none, 0.01).unwrap_err();
        assert_eq!(err.to_string(), "the challenger ran no golden queries: the gate has nothing to compare");
        assert_eq!(
            MetricsError::BadTolerance(1.5).to_string(),
            "gate tolerance 1.5 is not a number in [0, 1]"
        );
    }

    fn list() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(0u8..24, 0..14)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn rbo_matches_the_paper_formula(a in list(), b in list(), p in 0.05f64..0.99) {
            let fast = rbo(&a, &b, p);
            let slow = rbo_reference(&a, &b, p);
            prop_assert!((fast - slow).abs() < 1e-9, "{fast} vs {slow}");
        }

        #[test]
        fn rbo_is_bounded_symmetric_and_reflexive(a in list(), b in list(), p in 0.05f64..0.99) {
            let ab = rbo(&a, &b, p);
            prop_assert!((0.0..=1.0).contains(&ab));
            prop_assert!((ab - rbo(&b, &a, p)).abs() < EPS);
            prop_assert!((rbo(&a, &a, p) - 1.0).abs() < 1e-9);
        }

        #[test]
        fn jaccard_is_bounded_and_symmetric(a in list(), b in list()) {
            let ab = jaccard(&a, &b);
            prop_assert!((0.0..=1.0).contains(&ab));
            prop_assert_eq!(ab, jaccard(&b, &a));
            prop_assert_eq!(jaccard(&a, &a), 1.0);
            let share_something = a.iter().any(|x| b.contains(x));
            let both_empty = a.is_empty() && b.is_empty();
            prop_assert_eq!(ab == 0.0, !share_something && !both_empty);
        }

        #[test]
        fn percentile_is_a_sample_with_its_share_below(
            samples in proptest::collection::vec(-1e6f64..1e6, 1..60),
            q in 0.0f64..=1.0,
        ) {
            let value = percentile(&samples, q).unwrap();
            prop_assert!(samples.contains(&value));
            let at_or_below = samples.iter().filter(|x| **x <= value).count() as f64;
            let below = samples.iter().filter(|x| **x < value).count() as f64;
            let n = samples.len() as f64;
            prop_assert!(at_or_below >= q * n);
            prop_assert!(below < (q * n).max(1.0));
            let mut sorted = samples.clone();
            sorted.sort_by(f64::total_cmp);
            prop_assert_eq!(percentile_of_sorted(&sorted, q), Some(value));
        }
    }
}
