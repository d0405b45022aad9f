//! Catalogue attributes on the wire: JSON values (as stored in the catalogue) to and from
//! protobuf's `google.protobuf.Struct`, which gRPC clients and grpcurl render as JSON objects.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

use crate::index::store::Attrs;

/// `attrs` as a `Struct`; `None` when there are none (the field is then absent on the wire).
pub fn to_struct(attrs: &Attrs) -> Option<Struct> {
    if attrs.is_empty() {
        return None;
    }
    Some(Struct { fields: attrs.iter().map(|(k, v)| (k.clone(), to_value(v))).collect() })
}

fn to_value(v: &serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        // protobuf numbers are doubles; catalogue numbers beyond 2^53 lose precision here.
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => {
            Kind::ListValue(ListValue { values: a.iter().map(to_value).collect() })
        }
        serde_json::Value::Object(o) => {
            Kind::StructValue(Struct { fields: o.iter().map(|(k, v)| (k.clone(), to_value(v))).collect() })
        }
    };
    Value { kind: Some(kind) }
}

/// A request's attributes as stored: top-level values must be strings, finite numbers, bools,
/// or lists of those, within the limits of [`crate::index::attrs`]; the error names the
/// offending key.
pub fn from_struct(s: &Struct) -> Result<Attrs, String> {
    let mut out = Attrs::new();
    for (key, v) in &s.fields {
        if key.is_empty() {
            return Err("attribute names must not be empty".into());
        }
        let value = match &v.kind {
            Some(Kind::ListValue(l)) => {
                let items = l
                    .values
                    .iter()
                    .map(|x| {
                        scalar(x).ok_or_else(|| {
                            format!("attribute {key:?}: list items must be strings, numbers or bools")
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                serde_json::Value::Array(items)
            }
            _ => scalar(v).ok_or_else(|| {
                format!("attribute {key:?}: values must be strings, finite numbers, bools or lists of them")
            })?,
        };
        out.insert(key.clone(), value);
    }
    crate::index::attrs::check(&out).map_err(|e| e.to_string())?;
    Ok(out)
}

fn scalar(v: &Value) -> Option<serde_json::Value> {
    match &v.kind {
        Some(Kind::StringValue(s)) => Some(serde_json::Value::String(s.clone())),
        Some(Kind::BoolValue(b)) => Some(serde_json::Value::Bool(*b)),
        Some(Kind::NumberValue(n)) if n.is_finite() => Some(number(*n)),
        _ => None,
    }
}

/// A JSON object (from the CLI's `--attrs`) as a `Struct`, checked under the same rules as
/// [`from_struct`] ([`crate::index::attrs`]), as written: the wire's doubles would round an
/// integer beyond 2^53 silently.
pub fn json_to_struct(v: &serde_json::Value) -> Result<Struct, String> {
    let serde_json::Value::Object(o) = v else { return Err("attributes must be a JSON object".into()) };
    let as_written: Attrs = o.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    crate::index::attrs::check(&as_written).map_err(|e| e.to_string())?;
    Ok(Struct { fields: o.iter().map(|(k, v)| (k.clone(), to_value(v))).collect() })
}

/// A `Struct` back as a JSON object (for the CLI); an absent one is an empty object.
pub fn to_json(s: Option<&Struct>) -> serde_json::Value {
    serde_json::Value::Object(
        s.map(|s| s.fields.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect()).unwrap_or_default(),
    )
}

fn value_to_json(v: &Value) -> serde_json::Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number(*n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(l)) => serde_json::Value::Array(l.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => to_json(Some(s)),
    }
}

/// Whole numbers print as integers (`12`, not `12.0`), as they were written in the catalogue.
fn number(n: f64) -> serde_json::Value {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_attributes_are_checked() {
        let ok =
            json_to_struct(&serde_json::json!({"a": "x", "n": 20, "b": true, "tags": ["eco", 1]})).unwrap();
        let attrs = from_struct(&ok).unwrap();
        assert_eq!(attrs["n"], serde_json::json!(20));
        assert_eq!(attrs["tags"], serde_json::json!(["eco", 1]));
        for bad in [
            serde_json::json!({"a": null}),
            serde_json::json!({"a": {"b": 1}}),
            serde_json::json!({"a": [[1]]}),
            serde_json::json!({"": 1}),
            serde_json::json!([1]),
        ] {
            assert!(json_to_struct(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn attributes_round_trip_through_struct() {
        let attrs: Attrs = serde_json::from_str(
            r#"{"title": "Red mug", "price": 12.5, "stock": 40, "tags": ["a", 1], "dims": {"h": 9}, "x": null, "y": true}"#,
        )
        .unwrap();
        let s = to_struct(&attrs).unwrap();
        assert_eq!(s.fields.len(), 7);
        assert_eq!(to_json(Some(&s)), serde_json::to_value(&attrs).unwrap());
        assert!(to_struct(&Attrs::new()).is_none());
        assert_eq!(to_json(None), serde_json::json!({}));
    }
}
