//! The rules every stored attribute follows, whichever way it arrives (a catalogue row, an
//! `Upsert`, the CLI's `--attrs`): so that what one path accepts the others accept too, every
//! client reads back the value that was written, and a filter can name and match anything
//! stored. Pure: no IO.

use serde_json::Value;

use super::filter::{MAX_KEY_BYTES, MAX_VALUE_BYTES, MAX_VALUES};
use super::store::Attrs;

/// Largest attribute object of one SKU, as compact JSON.
pub const MAX_ATTRS_BYTES: usize = 64 << 10;
/// Largest integer magnitude kept as a number: every client holds it exactly (protobuf and
/// JavaScript numbers are doubles).
pub const MAX_EXACT_INTEGER: u64 = 1 << 53;

/// Why attributes cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttrError {
    #[error("attribute {key:?}: {why}")]
    Bad { key: String, why: String },
    #[error("the attributes take {bytes} bytes as JSON; at most {MAX_ATTRS_BYTES}")]
    TooLarge { bytes: usize },
}

/// Checks `attrs` against the rules: names of 1 to [`MAX_KEY_BYTES`] bytes; values that are
/// strings of at most [`MAX_VALUE_BYTES`] bytes, finite numbers (integers within
/// ±[`MAX_EXACT_INTEGER`]), booleans, or arrays of at most [`MAX_VALUES`] of those; and at most
/// [`MAX_ATTRS_BYTES`] in all.
pub fn check(attrs: &Attrs) -> Result<(), AttrError> {
    let mut total = 2;
    for (key, value) in attrs {
        let fail = |why: String| Err(AttrError::Bad { key: key.clone(), why });
        if key.is_empty() {
            return fail("empty attribute name".into());
        }
        if key.len() > MAX_KEY_BYTES {
            return fail(format!("the name is {} bytes; at most {MAX_KEY_BYTES}", key.len()));
        }
        match value {
            Value::Array(items) => {
                if items.len() > MAX_VALUES {
                    return fail(format!("{} array items; at most {MAX_VALUES}", items.len()));
                }
                for item in items {
                    match item {
                        Value::Array(_) | Value::Object(_) | Value::Null => {
                            return fail(
                                "array elements must be strings, numbers or booleans (no null, object or nested array)"
                                    .into(),
                            );
                        }
                        scalar => scalar_rule(scalar).or_else(fail)?,
                    }
                }
            }
            Value::Null => return fail("null is not allowed (leave the attribute out instead)".into()),
            Value::Object(_) => {
                return fail(
                    "nested objects are not allowed; values must be strings, numbers, booleans or arrays of those"
                        .into(),
                );
            }
            scalar => scalar_rule(scalar).or_else(fail)?,
        }
        total += key.len() + 4 + serde_json::to_string(value).map_or(0, |s| s.len());
    }
    if total > MAX_ATTRS_BYTES {
        return Err(AttrError::TooLarge { bytes: total });
    }
    Ok(())
}

fn scalar_rule(v: &Value) -> Result<(), String> {
    match v {
        Value::String(s) if s.len() > MAX_VALUE_BYTES => {
            Err(format!("a string value is {} bytes; at most {MAX_VALUE_BYTES}", s.len()))
        }
        Value::Number(n) => {
            let big = n.as_u64().is_some_and(|u| u > MAX_EXACT_INTEGER)
                || n.as_i64().is_some_and(|i| i.unsigned_abs() > MAX_EXACT_INTEGER);
            if big {
                Err(format!(
                    "the integer {n} is beyond 2^53, where a 64-bit float (every client's number) loses \
                     digits: write it as a string"
                ))
            } else if n.as_f64().is_some_and(f64::is_finite) {
                Ok(())
            } else {
                Err(format!("the number {n} is not finite"))
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(key: &str, v: Value) -> Attrs {
        Attrs::from([(key.to_string(), v)])
    }

    #[test]
    fn what_every_path_accepts() {
        let ok = [
            json!("Mug"),
            json!(9.5),
            json!(-3),
            json!(9_007_199_254_740_992u64),
            json!(true),
            json!(["eco", 3, false]),
            json!("x".repeat(MAX_VALUE_BYTES)),
        ];
        for v in ok {
            assert_eq!(check(&one("k", v.clone())), Ok(()), "{v}");
        }
        assert_eq!(check(&one(&"k".repeat(MAX_KEY_BYTES), json!(1))), Ok(()));
        assert_eq!(check(&Attrs::new()), Ok(()));
    }

    #[test]
    fn what_no_path_accepts_names_the_attribute() {
        let bad = [
            ("k", json!(null), "null"),
            ("k", json!({"a": 1}), "nested"),
            ("k", json!([[1]]), "array elements"),
            ("k", json!([null]), "array elements"),
            ("k", json!(9_007_199_254_740_993u64), "2^53"),
            ("k", json!(-9_007_199_254_740_993i64), "2^53"),
            ("k", json!(u64::MAX), "2^53"),
            ("k", json!("x".repeat(MAX_VALUE_BYTES + 1)), "bytes; at most"),
            ("k", json!(["x".repeat(MAX_VALUE_BYTES + 1)]), "bytes; at most"),
            ("k", Value::Array(vec![json!(1); MAX_VALUES + 1]), "array items"),
            ("", json!(1), "empty attribute name"),
        ];
        for (key, v, want) in bad {
            let e = check(&one(key, v.clone())).unwrap_err();
            assert!(matches!(&e, AttrError::Bad { key: k, .. } if k == key), "{e}");
            assert!(e.to_string().contains(want), "{v}: {e}");
        }
        let e = check(&one(&"k".repeat(MAX_KEY_BYTES + 1), json!(1))).unwrap_err();
        assert!(e.to_string().contains("the name is"), "{e}");
        let many: Attrs = (0..40).map(|i| (format!("k{i}"), json!("v".repeat(2000)))).collect();
        let e = check(&many).unwrap_err();
        assert!(matches!(e, AttrError::TooLarge { bytes } if bytes > MAX_ATTRS_BYTES), "{e}");
    }
}
