//! Attribute filters for searches: the [`Filter`] type, its CLI syntax, per-item evaluation
//! ([`Filter::matches`]) and an inverted index ([`AttrIndex`]) that answers a filter with the exact
//! set of matching items as a bitmap of dense doc ids, so the planner can count matches and choose
//! between filtered HNSW and an exact scan.
//!
//! # Semantics
//!
//! A [`Filter`] is an AND of [`Condition`]s; the empty filter matches every item. A condition tests
//! one top-level attribute `K` of an item's [`Attrs`]:
//!
//! * [`Test::AnyOf`] holds when `K` is a string equal to one of the values (exact, case-sensitive,
//!   untrimmed); a number equal, as `f64`, to a value that parses as `f64` with Rust's parser
//!   (`price=20` matches `20` and `20.0`, as do `price=20.0`, `price=2e1` and `price=+20`; `0` and
//!   `-0` match both zeros); a bool whose text `true`/`false` is one of the values (case-sensitive);
//!   or an array any scalar element of which (string, number, bool) matches by these rules. A
//!   missing key, `null` or an object never matches, nor do arrays, objects or nulls nested inside
//!   an array. A string attribute is only compared as a string: `"20.0"` does not match `price=20`.
//! * [`Test::Range`] holds when `K` is a number, or an array with a number element, inside the range
//!   (`None` = unbounded on that side). Strings never match a range, even numeric-looking ones. A
//!   NaN bound matches nothing.
//! * `negate` inverts the condition for every item, including items that lack `K`: `colour!=red`
//!   matches items with no colour (like Qdrant's `must_not`).
//!
//! Numbers are compared as `f64` (serde_json's `as_f64`): integers beyond 2^53 compare at `f64`
//! precision.
//!
//! # CLI syntax (one condition per `--filter`)
//!
//! ```text
//! category=Food          brand=acme,globex      (equal to one of)
//! colour!=red            colour!=red,blue       (equal to none of; also true when colour is missing)
//! price<20  price<=20  price>5  price>=5        (one-sided range)
//! 5<=price<20  5<price<=20                      (two-sided range)
//! title="a, b"  note="say \"hi\""  code=""      (quoted values)
//! ```
//!
//! Operator characters are `= ! < >`; operators (`=`, `!=`, `<`, `<=`, `>`, `>=`) are found left to
//! right and the key is everything before the first operator character, so keys cannot contain
//! operator characters (nor `"`). Whitespace around key, operator and values is trimmed. A value may
//! be double-quoted to hold commas, operator characters or surrounding whitespace; inside quotes
//! `\"` and `\\` are the only escapes, and `""` is the empty string. Unquoted values may not hold
//! operator characters or quotes, nor be empty. Range bounds are numbers as Rust's `f64` parser
//! reads them (`inf` included, `NaN` refused). Parsed conditions are also [validated](Filter::validate).
//!
//! [`Condition`]'s `Display` writes this syntax (quoting values where needed), and parsing the output
//! gives the same condition. Conditions with no syntax print in a form the parser refuses or that
//! means the same: a negated range as `!(5<=price<20)`, a range with no bounds as `price>-inf`.
//!
//! # Limits
//!
//! At most [`MAX_CONDITIONS`] conditions, [`MAX_VALUES`] values per `AnyOf`, keys of at most
//! [`MAX_KEY_BYTES`] and values of at most [`MAX_VALUE_BYTES`] bytes; ranges must be non-empty and
//! NaN-free, keys non-empty, `AnyOf` lists non-empty. [`Filter::validate`] checks all this (the gRPC
//! layer maps its errors to `INVALID_ARGUMENT`); evaluation of an invalid filter is still defined.
//!
//! # Index
//!
//! [`AttrIndex`] keeps, per top-level key, string and bool (`"true"`/`"false"`) values in a hash
//! map and numbers in an ordered map (array elements each on their own), all to roaring bitmaps
//! of doc ids. `matching` starts from the live docs and intersects (or, for negated conditions,
//! subtracts) each condition's postings, so it returns exactly the live docs `Filter::matches`
//! accepts. A removed SKU matches nothing, keeps its id, and gets it back when upserted again.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Bound;
use std::str::FromStr;

use roaring::{MultiOps, RoaringBitmap};
use serde_json::Value;

use crate::index::sharded::ShardedMap;
use crate::index::store::Attrs;

/// Dense per-index item number.
pub type DocId = u32;

pub const MAX_CONDITIONS: usize = 64;
pub const MAX_VALUES: usize = 1024;
pub const MAX_KEY_BYTES: usize = 256;
/// Longest value a filter matches, and so the longest string value an attribute may hold
/// (`index::attrs`).
pub const MAX_VALUE_BYTES: usize = 4096;

/// A search filter: every condition must hold (AND). An empty filter matches everything.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filter {
    pub conditions: Vec<Condition>,
}

/// One test on one attribute, possibly negated.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub key: String,
    pub negate: bool,
    pub test: Test,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    /// The attribute equals one of these values (set membership; equality is a set of one).
    AnyOf(Vec<String>),
    /// A numeric range; None = unbounded on that side.
    Range { min: Option<f64>, min_inclusive: bool, max: Option<f64>, max_inclusive: bool },
}

/// Why a filter expression or filter is refused. `expr` is the expression as written (clipped when
/// very long), or for a filter built in code the condition in CLI syntax.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FilterError {
    #[error("filter `{expr}`: no operator (expected k=v, k!=v, k<n, k<=n, k>n, k>=n or n<=k<m)")]
    MissingOperator { expr: String },
    #[error("filter `{expr}`: unexpected operator `{op}` (quote values holding =!<>; ranges read n<=k<m)")]
    UnexpectedOperator { expr: String, op: String },
    #[error("filter `{expr}`: empty attribute name")]
    EmptyKey { expr: String },
    #[error("filter `{expr}`: attribute name `{key}` may not contain a double quote")]
    QuotedKey { expr: String, key: String },
    #[error("filter `{expr}`: empty value (write \"\" to match the empty string)")]
    EmptyValue { expr: String },
    #[error("filter `{expr}`: `{value}` is not a number")]
    NotANumber { expr: String, value: String },
    #[error("filter `{expr}`: a number is missing next to `{op}` (e.g. price<20)")]
    MissingNumber { expr: String, op: String },
    #[error("filter `{expr}`: the attribute goes first: write `{suggestion}` (ranges read n<=k<m)")]
    BoundFirst { expr: String, suggestion: String },
    #[error("filter `{expr}`: a range that starts with a bound needs an upper bound too, e.g. 5<=price<20")]
    IncompleteRange { expr: String },
    #[error("filter `{expr}`: unterminated double quote")]
    UnterminatedQuote { expr: String },
    #[error("filter `{expr}`: stray double quote (quote whole values, e.g. title=\"a, b\")")]
    StrayQuote { expr: String },
    #[error("filter `{expr}`: unknown escape `\\{escape}` (inside quotes only \\\" and \\\\ escape)")]
    InvalidEscape { expr: String, escape: char },
    #[error("filter `{expr}`: no values to match")]
    NoValues { expr: String },
    #[error("filter `{expr}`: the range is empty")]
    EmptyRange { expr: String },
    #[error("filter `{expr}`: a range bound is NaN")]
    NanBound { expr: String },
    #[error("filter `{expr}`: attribute name is {len} bytes (at most {max})")]
    KeyTooLong { expr: String, len: usize, max: usize },
    #[error("filter `{expr}`: a value is {len} bytes (at most {max})")]
    ValueTooLong { expr: String, len: usize, max: usize },
    #[error("filter `{expr}`: {count} values (at most {max})")]
    TooManyValues { expr: String, count: usize, max: usize },
    #[error("filter has {count} conditions (at most {max})")]
    TooManyConditions { count: usize, max: usize },
}

/// `expr` for error messages, clipped to a readable length.
fn clip(expr: &str) -> String {
    if expr.chars().nth(120).is_none() {
        expr.to_owned()
    } else {
        format!("{}…", &expr[..expr.floor_char_boundary(120)])
    }
}

impl Filter {
    pub fn new(conditions: Vec<Condition>) -> Self {
        Filter { conditions }
    }

    /// Parses one CLI expression per condition and validates the result.
    pub fn parse<S: AsRef<str>>(exprs: impl IntoIterator<Item = S>) -> Result<Self, FilterError> {
        let conditions = exprs.into_iter().map(|e| parse_condition(e.as_ref())).collect::<Result<_, _>>()?;
        let filter = Filter { conditions };
        filter.validate()?;
        Ok(filter)
    }

    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// Checks the limits, and that every condition is well formed (see the module docs).
    pub fn validate(&self) -> Result<(), FilterError> {
        let count = self.conditions.len();
        if count > MAX_CONDITIONS {
            return Err(FilterError::TooManyConditions { count, max: MAX_CONDITIONS });
        }
        self.conditions.iter().try_for_each(Condition::validate)
    }

    pub fn matches(&self, attrs: &Attrs) -> bool {
        self.conditions.iter().all(|c| c.matches(attrs))
    }
}

impl Condition {
    pub fn matches(&self, attrs: &Attrs) -> bool {
        attrs.get(&self.key).is_some_and(|v| self.test.matches(v)) != self.negate
    }

    /// Checks key and value lengths, the value count, and that a range is non-empty and NaN-free.
    pub fn validate(&self) -> Result<(), FilterError> {
        self.check(None)
    }

    /// [`Condition::validate`], naming `expr` (or else the condition itself) in errors.
    fn check(&self, expr: Option<&str>) -> Result<(), FilterError> {
        use FilterError as E;
        let expr = || expr.map_or_else(|| clip(&self.to_string()), clip);
        if self.key.is_empty() {
            return Err(E::EmptyKey { expr: expr() });
        }
        if self.key.len() > MAX_KEY_BYTES {
            return Err(E::KeyTooLong { expr: expr(), len: self.key.len(), max: MAX_KEY_BYTES });
        }
        match self.test {
            Test::AnyOf(ref values) => {
                if values.is_empty() {
                    return Err(E::NoValues { expr: expr() });
                }
                if values.len() > MAX_VALUES {
                    return Err(E::TooManyValues { expr: expr(), count: values.len(), max: MAX_VALUES });
                }
                if let Some(v) = values.iter().find(|v| v.len() > MAX_VALUE_BYTES) {
                    return Err(E::ValueTooLong { expr: expr(), len: v.len(), max: MAX_VALUE_BYTES });
                }
            }
            Test::Range { min, min_inclusive, max, max_inclusive } => {
                if min.is_some_and(f64::is_nan) || max.is_some_and(f64::is_nan) {
                    return Err(E::NanBound { expr: expr() });
                }
                if range_is_void(min, min_inclusive, max, max_inclusive) {
                    return Err(E::EmptyRange { expr: expr() });
                }
            }
        }
        Ok(())
    }
}

impl Test {
    /// Whether an attribute value passes the test (before any negation).
    pub fn matches(&self, value: &Value) -> bool {
        match *self {
            Test::AnyOf(ref values) => scalars(value).any(|s| values.iter().any(|v| s.equals(v))),
            Test::Range { min, min_inclusive, max, max_inclusive } => scalars(value).any(|s| {
                let Scalar::Num(x) = s else { return false };
                let above = min.is_none_or(|m| if min_inclusive { x >= m } else { x > m });
                let below = max.is_none_or(|m| if max_inclusive { x <= m } else { x < m });
                above && below
            }),
        }
    }
}

/// Whether no number can be in the range (a NaN bound, or the bounds cross).
fn range_is_void(min: Option<f64>, min_inclusive: bool, max: Option<f64>, max_inclusive: bool) -> bool {
    match (min, max) {
        (Some(lo), Some(hi)) => !(lo < hi || (lo == hi && min_inclusive && max_inclusive)),
        _ => min.is_some_and(f64::is_nan) || max.is_some_and(f64::is_nan),
    }
}

/// A scalar an attribute holds, directly or as an array element.
#[derive(Clone, Copy)]
enum Scalar<'a> {
    Str(&'a str),
    Num(f64),
    Bool(bool),
}

impl Scalar<'_> {
    fn equals(self, text: &str) -> bool {
        match self {
            Scalar::Str(s) => s == text,
            Scalar::Num(x) => text.parse::<f64>().is_ok_and(|v| v == x),
            Scalar::Bool(b) => text == bool_text(b),
        }
    }
}

fn bool_text(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

/// The value itself, or an array's elements; skipping nulls, objects and nested arrays.
fn scalars(value: &Value) -> impl Iterator<Item = Scalar<'_>> {
    let items = match value {
        Value::Array(items) => items.as_slice(),
        v => std::slice::from_ref(v),
    };
    items.iter().filter_map(|v| match v {
        Value::String(s) => Some(Scalar::Str(s)),
        Value::Number(n) => n.as_f64().map(Scalar::Num),
        Value::Bool(b) => Some(Scalar::Bool(*b)),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------------
// CLI syntax

/// Parses one condition in the CLI syntax (see the module docs) and validates it.
pub fn parse_condition(expr: &str) -> Result<Condition, FilterError> {
    let (texts, ops) = split_operators(expr)?;
    let cond = match ops[..] {
        [] => return Err(FilterError::MissingOperator { expr: clip(expr) }),
        [op @ ("=" | "!=")] => {
            let key = parse_key(expr, texts[0])?;
            Condition { key, negate: op == "!=", test: Test::AnyOf(parse_values(expr, texts[1])?) }
        }
        [op] => {
            let key = parse_key(expr, texts[0])?;
            let text = texts[1].trim();
            let looks_reversed =
                key.parse::<f64>().is_ok() && !text.is_empty() && text.parse::<f64>().is_err();
            if looks_reversed && op.starts_with('<') {
                return Err(FilterError::IncompleteRange { expr: clip(expr) });
            }
            if looks_reversed {
                let flipped = if op == ">" { "<" } else { "<=" };
                return Err(FilterError::BoundFirst {
                    expr: clip(expr),
                    suggestion: clip(&format!("{text}{flipped}{key}")),
                });
            }
            let bound = Some(parse_number(expr, text, op)?);
            let inclusive = op.ends_with('=');
            let test = if op.starts_with('<') {
                Test::Range { min: None, min_inclusive: false, max: bound, max_inclusive: inclusive }
            } else {
                Test::Range { min: bound, min_inclusive: inclusive, max: None, max_inclusive: false }
            };
            Condition { key, negate: false, test }
        }
        [lo @ ("<" | "<="), hi @ ("<" | "<=")] => {
            let min = Some(parse_number(expr, texts[0], lo)?);
            let key = parse_key(expr, texts[1])?;
            let max = Some(parse_number(expr, texts[2], hi)?);
            let test = Test::Range { min, min_inclusive: lo == "<=", max, max_inclusive: hi == "<=" };
            Condition { key, negate: false, test }
        }
        ["<" | "<=", "<" | "<=", op, ..] | [_, op, ..] => {
            return Err(FilterError::UnexpectedOperator { expr: clip(expr), op: op.to_owned() });
        }
    };
    cond.check(Some(expr))?;
    Ok(cond)
}

impl FromStr for Condition {
    type Err = FilterError;
    fn from_str(s: &str) -> Result<Self, FilterError> {
        parse_condition(s)
    }
}

/// Splits `expr` at operators outside double quotes: `texts.len() == ops.len() + 1`.
fn split_operators(expr: &str) -> Result<(Vec<&str>, Vec<&'static str>), FilterError> {
    let (mut texts, mut ops) = (Vec::new(), Vec::new());
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    let mut chars = expr.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if quoted {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => quoted = false,
                _ => {}
            }
            continue;
        }
        let then_eq = matches!(chars.peek(), Some((_, '=')));
        let op = match c {
            '"' => {
                quoted = true;
                continue;
            }
            '=' => "=",
            '!' if then_eq => "!=",
            '!' => return Err(FilterError::UnexpectedOperator { expr: clip(expr), op: "!".to_owned() }),
            '<' if then_eq => "<=",
            '<' => "<",
            '>' if then_eq => ">=",
            '>' => ">",
            _ => continue,
        };
        texts.push(&expr[start..i]);
        ops.push(op);
        start = i + op.len();
        if op.len() == 2 {
            chars.next();
        }
    }
    if quoted {
        return Err(FilterError::UnterminatedQuote { expr: clip(expr) });
    }
    texts.push(&expr[start..]);
    Ok((texts, ops))
}

fn parse_key(expr: &str, text: &str) -> Result<String, FilterError> {
    let key = text.trim();
    if key.is_empty() {
        return Err(FilterError::EmptyKey { expr: clip(expr) });
    }
    if key.contains('"') {
        return Err(FilterError::QuotedKey { expr: clip(expr), key: clip(key) });
    }
    Ok(key.to_owned())
}

/// The number beside range operator `op`.
fn parse_number(expr: &str, text: &str, op: &str) -> Result<f64, FilterError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(FilterError::MissingNumber { expr: clip(expr), op: op.to_owned() });
    }
    match text.parse::<f64>() {
        Ok(x) if !x.is_nan() => Ok(x),
        _ => Err(FilterError::NotANumber { expr: clip(expr), value: clip(text) }),
    }
}

/// A comma-separated list of plain or double-quoted values.
fn parse_values(expr: &str, text: &str) -> Result<Vec<String>, FilterError> {
    let mut values = Vec::new();
    let mut rest = text;
    loop {
        let item = rest.trim_start();
        let next = if let Some(quoted) = item.strip_prefix('"') {
            let (value, after) = parse_quoted(expr, quoted)?;
            values.push(value);
            let after = after.trim_start();
            if after.is_empty() {
                None
            } else {
                Some(after.strip_prefix(',').ok_or_else(|| FilterError::StrayQuote { expr: clip(expr) })?)
            }
        } else {
            let (value, next) = match item.split_once(',') {
                Some((value, next)) => (value.trim(), Some(next)),
                None => (item.trim(), None),
            };
            if value.is_empty() {
                return Err(FilterError::EmptyValue { expr: clip(expr) });
            }
            if value.contains('"') {
                return Err(FilterError::StrayQuote { expr: clip(expr) });
            }
            values.push(value.to_owned());
            next
        };
        match next {
            Some(next) => rest = next,
            None => return Ok(values),
        }
    }
}

/// The text of a quoted value whose opening quote is gone, and what follows its closing quote.
fn parse_quoted<'a>(expr: &str, text: &'a str) -> Result<(String, &'a str), FilterError> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, e @ ('"' | '\\'))) => value.push(e),
                Some((_, escape)) => return Err(FilterError::InvalidEscape { expr: clip(expr), escape }),
                None => break,
            },
            c => value.push(c),
        }
    }
    Err(FilterError::UnterminatedQuote { expr: clip(expr) })
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = &self.key;
        match self.test {
            Test::AnyOf(ref values) => {
                f.write_str(key)?;
                f.write_str(if self.negate { "!=" } else { "=" })?;
                for (i, value) in values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write_value(f, value)?;
                }
                Ok(())
            }
            Test::Range { min, min_inclusive, max, max_inclusive } => {
                let lt = |inclusive| if inclusive { "<=" } else { "<" };
                let gt = if min_inclusive { ">=" } else { ">" };
                if self.negate {
                    f.write_str("!(")?;
                }
                match (min, max) {
                    (Some(lo), Some(hi)) => {
                        write!(f, "{lo}{}{key}{}{hi}", lt(min_inclusive), lt(max_inclusive))?
                    }
                    (Some(lo), None) => write!(f, "{key}{gt}{lo}")?,
                    (None, Some(hi)) => write!(f, "{key}{}{hi}", lt(max_inclusive))?,
                    (None, None) => write!(f, "{key}>-inf")?,
                }
                if self.negate {
                    f.write_str(")")?;
                }
                Ok(())
            }
        }
    }
}

fn write_value(f: &mut fmt::Formatter<'_>, value: &str) -> fmt::Result {
    let plain =
        !value.is_empty() && value.trim() == value && !value.contains(['"', '\\', ',', '=', '!', '<', '>']);
    if plain {
        return f.write_str(value);
    }
    f.write_str("\"")?;
    for c in value.chars() {
        if matches!(c, '"' | '\\') {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

// ---------------------------------------------------------------------------------------------
// Inverted index

/// An `f64` (not NaN; -0.0 taken as 0.0) as an integer with the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct NumKey(i64);

impl NumKey {
    fn new(x: f64) -> Option<Self> {
        if x.is_nan() {
            return None;
        }
        let bits = if x == 0.0 { 0 } else { x.to_bits() as i64 };
        // Negative floats order backwards as integers: flip all but the sign bit.
        Some(NumKey(bits ^ ((((bits >> 63) as u64) >> 1) as i64)))
    }

    fn bound(x: Option<f64>, inclusive: bool) -> Bound<Self> {
        match x.and_then(Self::new) {
            None => Bound::Unbounded,
            Some(k) if inclusive => Bound::Included(k),
            Some(k) => Bound::Excluded(k),
        }
    }
}

/// What one doc contributes under one key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Posting {
    /// A string, or a bool as `true`/`false`.
    Term(String),
    Num(NumKey),
}

#[derive(Debug, Default)]
struct KeyPostings {
    terms: HashMap<String, RoaringBitmap>,
    nums: BTreeMap<NumKey, RoaringBitmap>,
}

/// Inverted index over the top-level attributes of a catalogue's items, answering [`Filter`]s
/// with exactly the live docs that [`Filter::matches`].
#[derive(Debug, Default)]
pub struct AttrIndex {
    /// Sharded: one growth never pauses the writer (and filtered searches) for all of it.
    ids: ShardedMap<String, DocId>,
    /// Per doc id, its postings (key, entry), sorted; empty once removed.
    docs: Vec<Vec<(String, Posting)>>,
    live: RoaringBitmap,
    keys: HashMap<String, KeyPostings>,
}

impl AttrIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `sku`'s attributes (replacing any previous ones), assigning it a dense doc id on first
    /// sight; the id is stable for the lifetime of the index, also across remove + upsert of the
    /// same SKU. Panics past `u32::MAX - 1` distinct SKUs.
    pub fn upsert(&mut self, sku: &str, attrs: &Attrs) -> DocId {
        let id = match self.ids.get(sku) {
            Some(&id) => {
                self.unindex(id);
                id
            }
            None => {
                let id = DocId::try_from(self.docs.len()).ok().filter(|&id| id < DocId::MAX);
                let id = id.expect("AttrIndex: doc ids exhausted");
                self.ids.insert(sku.to_owned(), id);
                self.docs.push(Vec::new());
                id
            }
        };
        let mut postings = Vec::new();
        for (key, value) in attrs {
            for scalar in scalars(value) {
                let posting = match scalar {
                    Scalar::Str(s) => Posting::Term(s.to_owned()),
                    Scalar::Bool(b) => Posting::Term(bool_text(b).to_owned()),
                    Scalar::Num(x) => match NumKey::new(x) {
                        Some(k) => Posting::Num(k),
                        None => continue,
                    },
                };
                postings.push((key.clone(), posting));
            }
        }
        postings.sort_unstable();
        postings.dedup();
        postings.shrink_to_fit();
        for group in postings.chunk_by(|a, b| a.0 == b.0) {
            let entry = self.keys.entry(group[0].0.clone()).or_default();
            for (_, posting) in group {
                match posting {
                    Posting::Term(t) => entry.terms.entry(t.clone()).or_default().insert(id),
                    Posting::Num(k) => entry.nums.entry(*k).or_default().insert(id),
                };
            }
        }
        self.docs[id as usize] = postings;
        self.live.insert(id);
        id
    }

    /// The item is gone: it matches nothing any more (not even negated conditions). Its id stays
    /// reserved for it.
    pub fn remove(&mut self, sku: &str) {
        if let Some(&id) = self.ids.get(sku) {
            self.unindex(id);
        }
    }

    /// Takes `id` out of every posting and of `live`, dropping postings that become empty.
    fn unindex(&mut self, id: DocId) {
        let old = std::mem::take(&mut self.docs[id as usize]);
        for group in old.chunk_by(|a, b| a.0 == b.0) {
            let key = &group[0].0;
            let Some(entry) = self.keys.get_mut(key) else { continue };
            for (_, posting) in group {
                match posting {
                    Posting::Term(t) => {
                        if entry.terms.get_mut(t).is_some_and(|b| b.remove(id) && b.is_empty()) {
                            entry.terms.remove(t);
                        }
                    }
                    Posting::Num(k) => {
                        if entry.nums.get_mut(k).is_some_and(|b| b.remove(id) && b.is_empty()) {
                            entry.nums.remove(k);
                        }
                    }
                }
            }
            if entry.terms.is_empty() && entry.nums.is_empty() {
                self.keys.remove(key);
            }
        }
        self.live.remove(id);
    }

    pub fn doc(&self, sku: &str) -> Option<DocId> {
        self.ids.get(sku).copied()
    }

    /// Live items.
    pub fn len(&self) -> u64 {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The live docs.
    pub fn live(&self) -> &RoaringBitmap {
        &self.live
    }

    /// Upper bound on how many doc ids have been handed out (for sizing per-position maps).
    pub fn doc_capacity(&self) -> u32 {
        self.docs.len() as u32
    }

    /// Exactly the live docs for which `filter.matches(attrs)` is true.
    pub fn matching(&self, filter: &Filter) -> RoaringBitmap {
        let mut acc = self.live.clone();
        for cond in &filter.conditions {
            if acc.is_empty() {
                break;
            }
            let docs = self.passing(&cond.key, &cond.test);
            if cond.negate {
                acc -= docs;
            } else {
                acc &= docs;
            }
        }
        acc
    }

    /// The live docs whose attribute `key` passes `test` (before negation).
    fn passing(&self, key: &str, test: &Test) -> RoaringBitmap {
        let Some(entry) = self.keys.get(key) else { return RoaringBitmap::new() };
        match *test {
            Test::AnyOf(ref values) => values
                .iter()
                .flat_map(|v| {
                    let num = v.parse::<f64>().ok().and_then(NumKey::new).and_then(|k| entry.nums.get(&k));
                    entry.terms.get(v.as_str()).into_iter().chain(num)
                })
                .union(),
            Test::Range { min, min_inclusive, max, max_inclusive } => {
                // Also keeps BTreeMap::range from panicking on crossed bounds.
                if range_is_void(min, min_inclusive, max, max_inclusive) {
                    return RoaringBitmap::new();
                }
                let (lo, hi) = (NumKey::bound(min, min_inclusive), NumKey::bound(max, max_inclusive));
                entry.nums.range((lo, hi)).map(|(_, docs)| docs).union()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::select;
    use serde_json::json;

    fn any_of(key: &str, negate: bool, values: &[&str]) -> Condition {
        let test = Test::AnyOf(values.iter().map(|v| v.to_string()).collect());
        Condition { key: key.into(), negate, test }
    }

    type Bounds = (Option<f64>, bool, Option<f64>, bool);

    fn range_test((min, min_inclusive, max, max_inclusive): Bounds) -> Test {
        Test::Range { min, min_inclusive, max, max_inclusive }
    }

    fn range(key: &str, min: Option<f64>, min_inc: bool, max: Option<f64>, max_inc: bool) -> Condition {
        Condition { key: key.into(), negate: false, test: range_test((min, min_inc, max, max_inc)) }
    }

    fn attrs(v: Value) -> Attrs {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn parses_the_cli_examples() {
        let cases = [
            ("category=Food", any_of("category", false, &["Food"])),
            ("brand=acme,globex", any_of("brand", false, &["acme", "globex"])),
            ("colour!=red", any_of("colour", true, &["red"])),
            ("colour!=red,blue", any_of("colour", true, &["red", "blue"])),
            ("price<20", range("price", None, false, Some(20.0), false)),
            ("price<=20", range("price", None, false, Some(20.0), true)),
            ("price>5", range("price", Some(5.0), false, None, false)),
            ("price>=5", range("price", Some(5.0), true, None, false)),
            ("5<=price<20", range("price", Some(5.0), true, Some(20.0), false)),
            ("5<price<=20", range("price", Some(5.0), false, Some(20.0), true)),
            ("-5.5 <= price < 1e3", range("price", Some(-5.5), true, Some(1000.0), false)),
            ("  brand  !=  acme ,  globex ", any_of("brand", true, &["acme", "globex"])),
            ("shoe size = 42", any_of("shoe size", false, &["42"])),
            (r#"title="a, b""#, any_of("title", false, &["a, b"])),
            (r#"t = " x<=y " , z"#, any_of("t", false, &[" x<=y ", "z"])),
            (r#"t="say \"hi\" \\o/""#, any_of("t", false, &[r#"say "hi" \o/"#])),
            (r#"t="""#, any_of("t", false, &[""])),
        ];
        for (expr, want) in cases {
            assert_eq!(parse_condition(expr), Ok(want.clone()), "{expr}");
            assert_eq!(expr.parse::<Condition>(), Ok(want), "{expr}");
        }
    }

    #[test]
    fn rejects_bad_expressions() {
        let long = format!("k={}", "v".repeat(MAX_VALUE_BYTES + 1));
        let many = format!("k={}", vec!["v"; MAX_VALUES + 1].join(","));
        let long_key = format!("{}=v", "k".repeat(MAX_KEY_BYTES + 1));
        let cases = r#"=x => EmptyKey | price< => MissingNumber { expr: "price<", op: "<" | 5<price< => MissingNumber
            | <price<5 => MissingNumber | 10>price => BoundFirst { expr: "10>price", suggestion: "price<10"
            | 10>=price => BoundFirst { expr: "10>=price", suggestion: "price<=10" | price<abc => NotANumber { expr: "price<abc", value: "abc"
            | price<NaN => NotANumber | foo => MissingOperator | a= => EmptyValue | a=x,,y => EmptyValue
            | a==b => UnexpectedOperator { expr: "a==b", op: "=" | a=b<c => UnexpectedOperator { expr: "a=b<c", op: "<"
            | a!b => UnexpectedOperator { expr: "a!b", op: "!" | 1<a<2<3 => UnexpectedOperator { expr: "1<a<2<3", op: "<"
            | 5<price>3 => UnexpectedOperator { expr: "5<price>3", op: ">" | 5<=price => IncompleteRange
            | 10<=price<5 => EmptyRange | 5<price<5 => EmptyRange | t="abc => UnterminatedQuote | t="a" b => StrayQuote
            | t=a"b" => StrayQuote | t="a\nb" => InvalidEscape { expr: "t=\"a\\nb\"", escape: 'n' }
            | "k"=v => QuotedKey"#;
        let long_cases = [(long, "ValueTooLong"), (many, "TooManyValues"), (long_key, "KeyTooLong")];
        let cases =
            cases.split('|').map(|c| c.split_once(" => ").unwrap()).map(|(e, v)| (e.trim().to_owned(), v));
        for (expr, want) in cases.chain(long_cases) {
            let err = format!("{:?}", parse_condition(&expr).expect_err(&expr));
            assert!(err.starts_with(want.trim()), "{expr}: {err} is not {want}");
        }
        let msg = parse_condition("price<abc").unwrap_err().to_string();
        assert!(msg.contains("`price<abc`") && msg.contains("`abc`"), "{msg}");
        assert!(parse_condition("5<=price<=5").is_ok());
    }

    #[test]
    fn validates_filters_built_in_code() {
        let ok = Filter::parse(["a=1", "2<b<3"]).unwrap();
        assert_eq!(ok.validate(), Ok(()));
        let too_many = Filter::new(vec![any_of("a", false, &["x"]); MAX_CONDITIONS + 1]);
        assert!(matches!(too_many.validate(), Err(FilterError::TooManyConditions { count: 65, .. })));
        let nan = Filter::new(vec![range("p", Some(f64::NAN), true, None, false)]);
        assert!(matches!(nan.validate(), Err(FilterError::NanBound { .. })));
        let empty = Filter::new(vec![any_of("a", false, &[])]);
        assert!(matches!(empty.validate(), Err(FilterError::NoValues { expr }) if expr == "a="));
        assert!(Filter::parse(["a=1", "b"]).is_err());
    }

    #[test]
    fn semantics_table() {
        let item = attrs(json!({
            "s": "Food", "n": 20, "f": 20.0, "neg0": -0.0, "t": true, "numstr": "20",
            "arr": ["red", 5, false, [7], {"x": 1}], "nul": null, "obj": {"a": 1}, "empty": "",
        }));
        let yes = "s=Food; s=x,Food; n=20; n=20.0; n=2e1; f=20; neg0=0; numstr=20; t=true; arr=red; arr=5; \
            arr=5.0; arr=false; empty=\"\"; n<=20; f>19.5; 19<n<21; arr>4; arr<=5; missing!=x; nul!=x; obj!=x; \
            s!=food; numstr!=20.0";
        let no = "s=food; s=\"Food \"; n=20.5; numstr=20.0; t=True; t=1; arr=7; arr=x; nul=null; obj=1; \
            missing=x; n<20; numstr<100; numstr>1; s>0; t>0; arr>5; missing>0; nul<1; s!=Food; arr!=red; empty=x";
        for (exprs, want) in [(yes, true), (no, false)] {
            for expr in exprs.split(';') {
                assert_eq!(parse_condition(expr).unwrap().matches(&item), want, "{expr}");
            }
        }
        assert!(Filter::default().matches(&item));
        assert!(Filter::parse(["s=Food", "n>10", "colour!=red"]).unwrap().matches(&item));
        assert!(!Filter::parse(["s=Food", "n>30"]).unwrap().matches(&item));
        assert!(!range("n", Some(f64::NAN), true, None, false).matches(&item));
        assert!(range("n", None, false, None, false).matches(&item));
    }

    #[test]
    fn index_answers_and_forgets() {
        let mut index = AttrIndex::new();
        let a = index.upsert("a", &attrs(json!({"colour": "red", "price": 5, "tags": ["x", 1.5]})));
        let b = index.upsert("b", &attrs(json!({"colour": "blue", "price": 20.0})));
        let c = index.upsert("c", &attrs(json!({"price": -0.0})));
        assert_eq!((a, b, c, index.len(), index.doc_capacity()), (0, 1, 2, 3, 3));
        let q = |index: &AttrIndex, exprs: &[&str]| -> Vec<u32> {
            index.matching(&Filter::parse(exprs).unwrap()).iter().collect()
        };
        assert_eq!(q(&index, &["colour!=red"]), [b, c]);
        assert_eq!(q(&index, &["price=20", "colour=blue,red"]), [b]);
        assert_eq!(q(&index, &["price=0"]), [c]);
        assert_eq!(q(&index, &["-1<=price<=5"]), [a, c]);
        assert_eq!(q(&index, &["tags=1.5"]), [a]);
        assert_eq!(q(&index, &[]), [a, b, c]);
        index.remove("a");
        assert_eq!((index.len(), index.doc("a")), (2, Some(a)));
        assert_eq!(q(&index, &["colour!=red"]), [b, c]);
        assert_eq!(q(&index, &["tags!=y"]), [b, c]);
        assert_eq!(index.upsert("a", &attrs(json!({"colour": "green"}))), a);
        assert_eq!(q(&index, &["colour!=red,blue"]), [a, c]);
        for sku in ["a", "b", "c"] {
            index.remove(sku);
        }
        assert!(index.is_empty() && index.keys.is_empty() && index.docs.iter().all(Vec::is_empty));
        assert_eq!(index.doc_capacity(), 3);
    }

    const KEYS: [&str; 3] = ["a", "b", "c"];

    fn arb_scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            select(vec!["x", "y", "20", "true", ""]).prop_map(Value::from),
            (-2i64..=2).prop_map(Value::from),
            select(vec![0.5, 2.0, -0.0, 20.0, -1.5]).prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
        ]
    }

    fn arb_attrs() -> impl Strategy<Value = Attrs> {
        let value = prop_oneof![
            6 => arb_scalar(),
            2 => prop::collection::vec(arb_scalar(), 0..3).prop_map(Value::Array),
            1 => Just(Value::Null),
            1 => Just(json!({"x": 1})),
        ];
        prop::collection::btree_map(select(KEYS.to_vec()).prop_map(String::from), value, 0..3)
    }

    fn arb_filter() -> impl Strategy<Value = Filter> {
        let texts = vec!["x", "y", "20", "20.0", "2", "-2", "true", "false", "0", "-0", "0.5", "", "inf"];
        let values = prop::collection::vec(select(texts).prop_map(String::from), 0..3);
        let bound = prop::option::of(select(vec![-2.0, -0.0, 0.0, 0.5, 2.0, 20.0, f64::INFINITY, f64::NAN]));
        let test = prop_oneof![
            values.prop_map(Test::AnyOf),
            (bound.clone(), any::<bool>(), bound, any::<bool>()).prop_map(range_test),
        ];
        let key = select(vec!["a", "b", "c", "d"]).prop_map(String::from);
        let cond = (key, any::<bool>(), test).prop_map(|(key, negate, test)| Condition { key, negate, test });
        prop::collection::vec(cond, 0..3).prop_map(Filter::new)
    }

    /// Upsert SKU `n` with these attrs, or remove it.
    fn arb_step() -> impl Strategy<Value = (u8, Option<Attrs>)> {
        (0u8..6, prop::option::weighted(0.75, arb_attrs()))
    }

    /// A key without operator characters, quotes or surrounding whitespace.
    fn arb_key() -> impl Strategy<Value = String> {
        "[^=!<>\"]{1,8}".prop_filter("trimmed", |k| k.trim() == k && !k.is_empty())
    }

    fn arb_representable() -> impl Strategy<Value = Condition> {
        let text = prop_oneof!["[a-z0-9 ,=!<>\"\\\\._-]{0,6}", ".{0,6}"];
        let any_of = (arb_key(), any::<bool>(), prop::collection::vec(text, 1..4))
            .prop_map(|(key, negate, values)| Condition { key, negate, test: Test::AnyOf(values) });
        let num = any::<f64>().prop_filter("not NaN", |x| !x.is_nan());
        let bounds = (prop::option::of(num.clone()), any::<bool>(), prop::option::of(num), any::<bool>())
            .prop_filter("bounded", |(min, _, max, _)| min.is_some() || max.is_some());
        let range = (arb_key(), bounds).prop_map(|(key, (mut min, mut min_inc, mut max, mut max_inc))| {
            if let (Some(lo), Some(hi)) = (min, max) {
                (min, max) = (Some(lo.min(hi)), Some(lo.max(hi)));
                if lo == hi {
                    (min_inc, max_inc) = (true, true);
                }
            }
            min_inc &= min.is_some();
            max_inc &= max.is_some();
            Condition { key, negate: false, test: range_test((min, min_inc, max, max_inc)) }
        });
        prop_oneof![any_of, range]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn display_parse_round_trip(cond in arb_representable()) {
            let text = cond.to_string();
            prop_assert_eq!(parse_condition(&text), Ok(cond), "{}", text);
        }

        #[test]
        fn index_matches_predicate(steps in prop::collection::vec(arb_step(), 1..20),
                                   filters in prop::collection::vec(arb_filter(), 1..5)) {
            let mut index = AttrIndex::new();
            let mut model = BTreeMap::new();
            let mut ids = HashMap::new();
            for (n, attrs) in steps {
                let sku = format!("sku{n}");
                if let Some(attrs) = attrs {
                    let id = index.upsert(&sku, &attrs);
                    prop_assert_eq!(*ids.entry(sku.clone()).or_insert(id), id);
                    model.insert(sku, attrs);
                } else {
                    index.remove(&sku);
                    model.remove(&sku);
                    prop_assert_eq!(index.doc(&sku), ids.get(&sku).copied());
                }
                prop_assert_eq!(index.len(), model.len() as u64);
                prop_assert_eq!(index.doc_capacity() as usize, ids.len());
                for f in &filters {
                    let want: RoaringBitmap =
                        model.iter().filter(|(_, a)| f.matches(a)).map(|(sku, _)| ids[sku]).collect();
                    prop_assert_eq!(index.matching(f), want, "{:?}", f);
                }
                for entry in index.keys.values() {
                    prop_assert!(!entry.terms.is_empty() || !entry.nums.is_empty());
                    for docs in entry.terms.values().chain(entry.nums.values()) {
                        prop_assert!(!docs.is_empty() && docs.is_subset(&index.live));
                    }
                }
            }
        }
    }
}
