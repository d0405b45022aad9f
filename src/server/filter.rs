//! Search filters on the wire: `vitrine.v1.Filter` messages and CLI-syntax expressions, both
//! turned into one validated [`Filter`].

use crate::index::filter::{Condition, Filter, Test, parse_condition};
use crate::proto;

use super::ServiceError;

/// The filter a request's options carry (message conditions AND expressions); `None` if empty.
pub fn from_options(o: &proto::SearchOptions) -> Result<Option<Filter>, ServiceError> {
    // Counted before anything is parsed: a huge request costs no more than this check.
    let count = o.filter.as_ref().map_or(0, |f| f.must.len()) + o.filter_exprs.len();
    if count > crate::index::filter::MAX_CONDITIONS {
        return Err(crate::index::filter::FilterError::TooManyConditions {
            count,
            max: crate::index::filter::MAX_CONDITIONS,
        }
        .into());
    }
    let mut conditions = Vec::new();
    if let Some(f) = &o.filter {
        for (i, c) in f.must.iter().enumerate() {
            conditions.push(condition(i, c)?);
        }
    }
    for e in &o.filter_exprs {
        conditions.push(parse_condition(e)?);
    }
    if conditions.is_empty() {
        return Ok(None);
    }
    let filter = Filter::new(conditions);
    filter.validate()?;
    Ok(Some(filter))
}

fn condition(i: usize, c: &proto::Condition) -> Result<Condition, ServiceError> {
    use proto::condition::Test as P;
    let test = match &c.test {
        Some(P::AnyOf(set)) => Test::AnyOf(set.values.clone()),
        Some(P::Range(r)) => Test::Range {
            min: r.min,
            min_inclusive: r.min_inclusive,
            max: r.max,
            max_inclusive: r.max_inclusive,
        },
        None => {
            return Err(ServiceError::InvalidArgument(format!(
                "filter condition {i} (key {:?}) has no test: set any_of or range",
                crate::ids::shorten(&c.key, 64)
            )));
        }
    };
    Ok(Condition { key: c.key.clone(), negate: c.negate, test })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_expressions_are_anded_and_validated() {
        let o = proto::SearchOptions {
            filter: Some(proto::Filter {
                must: vec![proto::Condition {
                    key: "brand".into(),
                    negate: false,
                    test: Some(proto::condition::Test::AnyOf(proto::ValueSet {
                        values: vec!["acme".into()],
                    })),
                }],
            }),
            filter_exprs: vec!["price<20".into()],
            ..Default::default()
        };
        let f = from_options(&o).unwrap().unwrap();
        assert_eq!(f.conditions.len(), 2);
        assert!(from_options(&proto::SearchOptions::default()).unwrap().is_none());
        let bad = proto::SearchOptions { filter_exprs: vec!["price<".into()], ..Default::default() };
        assert!(matches!(from_options(&bad), Err(ServiceError::Filter(_))));
        let empty_range = proto::SearchOptions {
            filter: Some(proto::Filter {
                must: vec![proto::Condition {
                    key: "p".into(),
                    negate: false,
                    test: Some(proto::condition::Test::Range(proto::Range {
                        min: Some(5.0),
                        min_inclusive: true,
                        max: Some(1.0),
                        max_inclusive: false,
                    })),
                }],
            }),
            ..Default::default()
        };
        assert!(from_options(&empty_range).is_err());
        let no_test = proto::SearchOptions {
            filter: Some(proto::Filter {
                must: vec![proto::Condition { key: "p".into(), negate: false, test: None }],
            }),
            ..Default::default()
        };
        assert!(matches!(from_options(&no_test), Err(ServiceError::InvalidArgument(_))));
    }
}
