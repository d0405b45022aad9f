//! The sticky traffic split between champion and canary: a query's arm is chosen by a salted,
//! platform-independent hash of its routing key (a shopper's session id), so a shopper stays on
//! one arm for the whole rollout; keyless queries are split by a caller-supplied random draw.
//! Pure: no clocks, no randomness of its own.
//!
//! A key's *bucket* is a fixed position in `[0, 1)`. It answers the canary iff its bucket is
//! below the rollout's fraction, so raising the fraction only moves shoppers from champion to
//! canary, never back, and lowering it only moves them back.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a value is not a valid traffic share.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum RouterError {
    #[error("traffic fraction {0} is not a number in [0, 1]")]
    FractionOutOfRange(f64),
}

/// Which model version answers a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arm {
    /// The model version serving today.
    Champion,
    /// The challenger under rollout.
    Canary,
}

impl Arm {
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Champion => "champion",
            Arm::Canary => "canary",
        }
    }

    /// The arm a shadowed query also runs on.
    pub fn other(self) -> Arm {
        match self {
            Arm::Champion => Arm::Canary,
            Arm::Canary => Arm::Champion,
        }
    }
}

impl fmt::Display for Arm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated traffic share in `[0, 1]`.
///
/// ```
/// use vitrine::rollout::router::Fraction;
/// assert_eq!(Fraction::new(0.25).unwrap().get(), 0.25);
/// assert!(Fraction::new(1.5).is_err());
/// assert!(Fraction::new(f64::NAN).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Fraction(f64);

impl Fraction {
    /// No traffic.
    pub const ZERO: Fraction = Fraction(0.0);
    /// All traffic.
    pub const ONE: Fraction = Fraction(1.0);

    /// Refuses NaN and values outside `[0, 1]`; `-0.0` becomes `0.0`.
    pub fn new(value: f64) -> Result<Self, RouterError> {
        if (0.0..=1.0).contains(&value) {
            // `+ 0.0` turns -0.0 into 0.0, so equal shares compare and print equal.
            Ok(Self(value + 0.0))
        } else {
            Err(RouterError::FractionOutOfRange(value))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }

    /// Whether a position in `[0, 1)` falls inside this share. `ZERO` contains nothing and
    /// `ONE` everything, whatever the position (NaN and out-of-range draws included); in
    /// between, a NaN position is outside.
    fn contains(self, position: f64) -> bool {
        if self.0 <= 0.0 {
            false
        } else if self.0 >= 1.0 {
            true
        } else {
            position < self.0
        }
    }
}

impl TryFrom<f64> for Fraction {
    type Error = RouterError;
    fn try_from(value: f64) -> Result<Self, RouterError> {
        Self::new(value)
    }
}

impl From<Fraction> for f64 {
    fn from(fraction: Fraction) -> f64 {
        fraction.0
    }
}

impl fmt::Display for Fraction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        state ^= u64::from(byte);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// The splitmix64 finaliser (Steele, Lea & Flood 2014): a bijection on `u64` with full
/// avalanche, which hides FNV's weak low bits and its short-input correlations.
fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Assigns routing keys to arms for one rollout.
///
/// The hash is part of the rollout's contract: changing it moves shoppers between arms in the
/// middle of a rollout. `tests::frozen_buckets` pins it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Router {
    salt: u64,
}

impl Router {
    /// A router for one rollout. Give each rollout its own salt (see [`Router::for_rollout`]) so
    /// that the same shoppers are not always the first to see a new model.
    pub fn new(salt: u64) -> Self {
        Self { salt }
    }

    /// A router whose salt is derived from the rollout's name (e.g. the challenger's model
    /// version), stable across processes and platforms.
    pub fn for_rollout(name: &str) -> Self {
        Self::new(splitmix64(fnv1a(FNV_OFFSET, name.as_bytes())))
    }

    pub fn salt(&self) -> u64 {
        self.salt
    }

    /// The key's position in `[0, 1)`: FNV-1a over the salt's eight little-endian bytes and
    /// then the key's bytes, finished with splitmix64; the top 53 bits become the fraction.
    /// Independent of std's randomised hasher, of the process and of the platform.
    pub fn bucket(&self, key: &str) -> f64 {
        // 53 bits fill an f64 mantissa exactly: the result is a multiple of 2^-53 below 1.
        (self.hash(key) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn hash(&self, key: &str) -> u64 {
        splitmix64(fnv1a(fnv1a(FNV_OFFSET, &self.salt.to_le_bytes()), key.as_bytes()))
    }

    /// Canary iff the key's bucket is below `fraction`. An empty key counts as no key; without
    /// a key, `random` (a uniform draw in `[0, 1)` from the caller) takes the bucket's place.
    /// Fraction 0 always answers champion and fraction 1 always canary, whatever the draw.
    ///
    /// ```
    /// use vitrine::rollout::router::{Arm, Fraction, Router};
    /// let router = Router::for_rollout("efficientnet-lite2");
    /// let half = Fraction::new(0.5).unwrap();
    /// let arm = router.route(Some("session-7f3a"), half, 0.0);
    /// // Sticky: the draw does not matter when there is a key.
    /// assert_eq!(router.route(Some("session-7f3a"), half, 0.999), arm);
    /// assert_eq!(router.route(None, half, 0.1), Arm::Canary);
    /// assert_eq!(router.route(Some(""), half, 0.9), Arm::Champion);
    /// ```
    pub fn route(&self, key: Option<&str>, fraction: Fraction, random: f64) -> Arm {
        let position = match key {
            Some(key) if !key.is_empty() => self.bucket(key),
            _ => random,
        };
        if fraction.contains(position) { Arm::Canary } else { Arm::Champion }
    }
}

/// Whether to also run a query on the other arm (shadow comparison): `random < shadow`, with
/// `random` a uniform draw in `[0, 1)` from the caller. Share 0 never samples, share 1 always.
pub fn sample(shadow: Fraction, random: f64) -> bool {
    shadow.contains(random)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde::Deserialize;
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error as ValueError, F64Deserializer};

    use super::*;

    fn frac(value: f64) -> Fraction {
        Fraction::new(value).unwrap()
    }

    fn keys(n: usize, seed: u64) -> Vec<String> {
        (0..n).map(|i| format!("session-{seed:x}-{i}")).collect()
    }

    #[test]
    fn fraction_refuses_nan_and_out_of_range_naming_the_value() {
        for bad in [f64::NAN, -0.01, 1.000_001, f64::INFINITY, f64::NEG_INFINITY] {
            let err = Fraction::new(bad).unwrap_err();
            assert_eq!(err.to_string(), format!("traffic fraction {bad} is not a number in [0, 1]"));
        }
        assert_eq!(Fraction::new(0.0).unwrap(), Fraction::ZERO);
        assert_eq!(Fraction::new(1.0).unwrap(), Fraction::ONE);
        assert!(Fraction::new(-0.0).unwrap().get().is_sign_positive());
        assert_eq!(Fraction::new(0.3).unwrap().to_string(), "0.3");
    }

    #[test]
    fn fraction_deserializes_through_validation() {
        let ok: Result<Fraction, ValueError> =
            Fraction::deserialize(IntoDeserializer::<ValueError>::into_deserializer(0.25));
        assert_eq!(ok.unwrap().get(), 0.25);
        let bad: F64Deserializer<ValueError> = 2.0.into_deserializer();
        let err = Fraction::deserialize(bad).unwrap_err();
        assert!(err.to_string().contains("traffic fraction 2 is not a number in [0, 1]"), "{err}");
    }

    #[test]
    fn arm_names() {
        assert_eq!(Arm::Champion.to_string(), "champion");
        assert_eq!(Arm::Canary.as_str(), "canary");
        assert_eq!(Arm::Canary.other(), Arm::Champion);
        assert_eq!(Arm::Champion.other(), Arm::Canary);
    }

    /// The hash is a compatibility contract: these values were computed once (and checked
    /// against an independent implementation of the documented construction) and must not move.
    #[test]
    fn frozen_buckets() {
        let router = Router::new(42);
        let frozen: [(&str, u64); 3] = [
            ("session-abc", 0x0996_1226_ee2a_f5ca),
            ("", 0xe15f_07fe_f55b_9454),
            ("ü-ß-日本", 0xe1de_f83a_a391_c7f2),
        ];
        for (key, hash) in frozen {
            assert_eq!(router.hash(key), hash, "hash of {key:?} moved");
            assert_eq!(router.bucket(key), (hash >> 11) as f64 / (1u64 << 53) as f64);
        }
        assert_eq!(Router::for_rollout("efficientnet-lite2").salt(), 0x757f_d69c_cf4f_801d);
    }

    #[test]
    fn empty_key_is_no_key() {
        let router = Router::new(7);
        let half = frac(0.5);
        assert_eq!(router.route(Some(""), half, 0.1), Arm::Canary);
        assert_eq!(router.route(Some(""), half, 0.9), Arm::Champion);
        assert_eq!(router.route(None, half, 0.1), Arm::Canary);
        assert_eq!(router.route(None, half, 0.5), Arm::Champion);
    }

    #[test]
    fn extreme_fractions_ignore_bad_draws() {
        let router = Router::new(7);
        for draw in [f64::NAN, -1.0, 1.0, 2.0] {
            assert_eq!(router.route(None, Fraction::ZERO, draw), Arm::Champion);
            assert_eq!(router.route(None, Fraction::ONE, draw), Arm::Canary);
            assert!(!sample(Fraction::ZERO, draw));
            assert!(sample(Fraction::ONE, draw));
        }
        assert_eq!(router.route(None, frac(0.5), f64::NAN), Arm::Champion);
    }

    #[test]
    fn sample_compares_the_draw() {
        assert!(sample(frac(0.2), 0.1999));
        assert!(!sample(frac(0.2), 0.2));
    }

    #[test]
    fn keyless_split_follows_the_draws() {
        let router = Router::new(1);
        let f = frac(0.3);
        let n = 10_000;
        let canary = (0..n).filter(|i| router.route(None, f, *i as f64 / n as f64) == Arm::Canary).count();
        assert_eq!(canary, 3_000);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// (1) Over many keys the canary share is close to the fraction.
        #[test]
        fn canary_share_matches_fraction(salt: u64, seed: u64, f in 0.0f64..=1.0) {
            let router = Router::new(salt);
            let n = 20_000;
            let canary = keys(n, seed).iter()
                .filter(|k| router.route(Some(k), frac(f), 0.0) == Arm::Canary)
                .count();
            let share = canary as f64 / n as f64;
            prop_assert!((share - f).abs() < 0.02, "share {share} for fraction {f}");
        }

        /// (5) Different salts reshuffle: at f = 0.5 two salts agree on about half the keys.
        #[test]
        fn salts_reshuffle(salt_a: u64, salt_b: u64, seed: u64) {
            prop_assume!(salt_a != salt_b);
            let (a, b) = (Router::new(salt_a), Router::new(salt_b));
            let half = frac(0.5);
            let keys = keys(1_000, seed);
            let agree = keys.iter()
                .filter(|k| a.route(Some(k), half, 0.0) == b.route(Some(k), half, 0.0))
                .count();
            prop_assert!((400..=600).contains(&agree), "{agree} of 1000 agree");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn bucket_is_in_unit_interval(salt: u64, key in ".*") {
            let b = Router::new(salt).bucket(&key);
            prop_assert!((0.0..1.0).contains(&b));
        }

        /// (2) A key's arm is stable for a fixed fraction, whatever the draw.
        #[test]
        fn arm_is_sticky(salt: u64, key in ".+", f in 0.0f64..=1.0, r1 in 0.0f64..1.0, r2 in 0.0f64..1.0) {
            let router = Router::new(salt);
            let again = Router::new(salt);
            prop_assert_eq!(router.route(Some(&key), frac(f), r1), again.route(Some(&key), frac(f), r2));
        }

        /// (3) Raising the fraction never moves a key from canary to champion.
        #[test]
        fn raising_fraction_is_monotone(salt: u64, key in ".*", r in 0.0f64..1.0, a in 0.0f64..=1.0, b in 0.0f64..=1.0) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let router = Router::new(salt);
            let key = Some(key.as_str());
            if router.route(key, frac(lo), r) == Arm::Canary {
                prop_assert_eq!(router.route(key, frac(hi), r), Arm::Canary);
            }
        }

        /// (4) Fraction 0 always answers champion, 1 always canary.
        #[test]
        fn extreme_fractions(salt: u64, key in proptest::option::of(".*"), r in 0.0f64..1.0) {
            let router = Router::new(salt);
            prop_assert_eq!(router.route(key.as_deref(), Fraction::ZERO, r), Arm::Champion);
            prop_assert_eq!(router.route(key.as_deref(), Fraction::ONE, r), Arm::Canary);
        }

        #[test]
        fn fraction_accepts_exactly_the_unit_interval(value: f64) {
            prop_assert_eq!(Fraction::new(value).is_ok(), (0.0..=1.0).contains(&value));
        }
    }
}
