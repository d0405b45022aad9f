//! Parsing a catalogue file (JSONL or CSV) into validated rows; bad lines become rejections
//! that name the file and line. Pure apart from reading the one file.
//!
//! JSONL: one object per line, `{"sku": "A-1", "image": "img/a1.jpg", "attrs": {"title": "Mug", "price": 9.5}}`;
//! `attrs` is optional and holds string or number values; blank lines and lines starting with
//! `#` are skipped. CSV: a header row with `sku` and `image` columns; every other column
//! becomes a string attribute (empty cells are left out). Image paths are relative to the
//! catalogue file's folder unless absolute. A CSV `attrs` column, if present, holds a JSON
//! object like JSONL's `attrs`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ids::{IdError, SkuId};
use crate::index::store::Attrs;

/// One valid catalogue row.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogRow {
    /// 1-based line number in the catalogue file.
    pub line: usize,
    pub sku: SkuId,
    /// The image path, resolved against the catalogue's folder.
    pub image: PathBuf,
    pub attrs: Attrs,
}

/// Why a row was not ingested.
#[derive(Debug, Clone, PartialEq)]
pub enum RejectReason {
    Malformed(String),
    BadSku(IdError),
    BadAttr { key: String, why: &'static str },
    DuplicateSku { first_line: usize },
    UnreadableImage { path: PathBuf, error: String },
    UndecodableImage { path: PathBuf, error: String },
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed row: {why}"),
            Self::BadSku(e) => write!(f, "invalid sku: {e}"),
            Self::BadAttr { key, why } => write!(f, "attribute {key:?}: {why}"),
            Self::DuplicateSku { first_line } => {
                write!(f, "duplicate sku (first seen on line {first_line}; that row is kept)")
            }
            Self::UnreadableImage { path, error } => {
                write!(f, "cannot read image {}: {error}", path.display())
            }
            Self::UndecodableImage { path, error } => {
                write!(f, "cannot decode image {}: {error}", path.display())
            }
        }
    }
}

/// A rejected row: where it is and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub file: PathBuf,
    pub line: usize,
    pub sku: Option<String>,
    pub reason: RejectReason,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if let Some(sku) = &self.sku {
            write!(f, "sku {sku:?}: ")?;
        }
        write!(f, "{}", self.reason)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CatalogFormat {
    Jsonl,
    Csv,
}

impl CatalogFormat {
    /// Guesses the format from the file extension.
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" | "json" => Some(Self::Jsonl),
            "csv" => Some(Self::Csv),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read catalogue {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("catalogue {0}: unknown format; name it .jsonl or .csv, or pass --format")]
    UnknownFormat(PathBuf),
    #[error("catalogue {path}: {why}")]
    BadHeader { path: PathBuf, why: String },
}

/// The parse result: valid rows (duplicates removed, first occurrence kept) and rejections.
#[derive(Debug, Default)]
pub struct ParsedCatalog {
    pub rows: Vec<CatalogRow>,
    pub rejected: Vec<Rejected>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRow {
    sku: serde_json::Value,
    image: String,
    #[serde(default)]
    attrs: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Reads and validates a catalogue file.
pub fn parse_catalog(path: &Path, format: Option<CatalogFormat>) -> Result<ParsedCatalog, CatalogError> {
    let format = format
        .or_else(|| CatalogFormat::from_path(path))
        .ok_or_else(|| CatalogError::UnknownFormat(path.to_path_buf()))?;
    let text = std::fs::read_to_string(path)
        .map_err(|source| CatalogError::Io { path: path.to_path_buf(), source })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let raw = match format {
        CatalogFormat::Jsonl => parse_jsonl(&text),
        CatalogFormat::Csv => {
            parse_csv(&text).map_err(|why| CatalogError::BadHeader { path: path.to_path_buf(), why })?
        }
    };
    Ok(finish(path, base, raw))
}

/// A row before its SKU and image path are checked: (line, sku, image, attrs) or a rejection.
type RawRow = Result<(usize, String, String, Attrs), (usize, Option<String>, RejectReason)>;

fn parse_jsonl(text: &str) -> Vec<RawRow> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let row: JsonRow = match serde_json::from_str(trimmed) {
            Ok(r) => r,
            Err(e) => {
                out.push(Err((line_no, None, RejectReason::Malformed(json_error(&e)))));
                continue;
            }
        };
        let sku = match row.sku {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            other => {
                out.push(Err((
                    line_no,
                    None,
                    RejectReason::Malformed(format!("sku must be a string, got {other}")),
                )));
                continue;
            }
        };
        match checked_attrs(row.attrs.unwrap_or_default()) {
            Ok(attrs) => out.push(Ok((line_no, sku, row.image, attrs))),
            Err(reason) => out.push(Err((line_no, Some(sku), reason))),
        }
    }
    out
}

/// Checks attribute names and values (strings or numbers only).
fn checked_attrs(map: serde_json::Map<String, serde_json::Value>) -> Result<Attrs, RejectReason> {
    let mut attrs = Attrs::new();
    for (key, value) in map {
        if key.is_empty() {
            return Err(RejectReason::BadAttr { key, why: "empty attribute name" });
        }
        match value {
            serde_json::Value::String(_) | serde_json::Value::Number(_) => {
                attrs.insert(key, value);
            }
            _ => return Err(RejectReason::BadAttr { key, why: "values must be strings or numbers" }),
        }
    }
    Ok(attrs)
}

/// serde_json's message without its "at line 1" (the row is one line), with the column.
fn json_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
    format!("invalid JSON at column {}: {msg}", e.column())
}

fn parse_csv(text: &str) -> Result<Vec<RawRow>, String> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(text.as_bytes());
    let headers = reader.headers().map_err(|e| format!("cannot read the CSV header: {e}"))?.clone();
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    let sku_col = col("sku").ok_or("the CSV header has no `sku` column")?;
    let image_col = col("image").ok_or("the CSV header has no `image` column")?;
    let attrs_col = col("attrs");
    let mut out = Vec::new();
    for record in reader.records() {
        match record {
            Ok(rec) => {
                let line_no = rec.position().map_or(0, |p| p.line() as usize);
                // An `attrs` column holds a JSON object, as in JSONL; other columns are strings.
                let mut attrs = match attrs_col.map(|i| &rec[i]).filter(|v| !v.trim().is_empty()) {
                    None => Attrs::new(),
                    Some(cell) => {
                        let parsed = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(cell)
                            .map_err(|e| RejectReason::Malformed(format!("attrs column: {}", json_error(&e))))
                            .and_then(checked_attrs);
                        match parsed {
                            Ok(a) => a,
                            Err(reason) => {
                                out.push(Err((line_no, Some(rec[sku_col].trim().to_string()), reason)));
                                continue;
                            }
                        }
                    }
                };
                for (i, value) in rec.iter().enumerate() {
                    if i != sku_col && i != image_col && Some(i) != attrs_col && !value.is_empty() {
                        attrs.insert(
                            headers[i].trim().to_string(),
                            serde_json::Value::String(value.to_string()),
                        );
                    }
                }
                out.push(Ok((
                    line_no,
                    rec[sku_col].trim().to_string(),
                    rec[image_col].trim().to_string(),
                    attrs,
                )));
            }
            Err(e) => {
                let line_no = e.position().map_or(0, |p| p.line() as usize);
                out.push(Err((line_no, None, RejectReason::Malformed(e.to_string()))));
            }
        }
    }
    Ok(out)
}

fn finish(path: &Path, base: &Path, raw: Vec<RawRow>) -> ParsedCatalog {
    let mut parsed = ParsedCatalog::default();
    let mut first_seen: HashMap<SkuId, usize> = HashMap::new();
    let reject = |line, sku, reason| Rejected { file: path.to_path_buf(), line, sku, reason };
    for r in raw {
        let (line, sku, image, attrs) = match r {
            Ok(row) => row,
            Err((line, sku, reason)) => {
                parsed.rejected.push(reject(line, sku, reason));
                continue;
            }
        };
        let sku_id = match SkuId::new(sku.clone()) {
            Ok(s) => s,
            Err(e) => {
                parsed.rejected.push(reject(line, Some(sku), RejectReason::BadSku(e)));
                continue;
            }
        };
        if image.is_empty() {
            parsed.rejected.push(reject(
                line,
                Some(sku),
                RejectReason::Malformed("image path is empty".into()),
            ));
            continue;
        }
        if let Some(&first_line) = first_seen.get(&sku_id) {
            parsed.rejected.push(reject(line, Some(sku), RejectReason::DuplicateSku { first_line }));
            continue;
        }
        first_seen.insert(sku_id.clone(), line);
        parsed.rows.push(CatalogRow { line, sku: sku_id, image: base.join(image), attrs });
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(name: &str, text: &str) -> ParsedCatalog {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        parse_catalog(&p, None).unwrap()
    }

    #[test]
    fn jsonl_rows_and_rejections_name_their_lines() {
        let text = concat!(
            "{\"sku\": \"A\", \"image\": \"a.jpg\", \"attrs\": {\"title\": \"Mug\", \"price\": 9.5}}\n",
            "\n",
            "# a comment\n",
            "{\"sku\": \"B\", \"image\": \"b.jpg\"\n",
            "{\"sku\": \"\", \"image\": \"c.jpg\"}\n",
            "{\"sku\": \"A\", \"image\": \"d.jpg\"}\n",
            "{\"sku\": \"E\", \"image\": \"e.jpg\", \"attrs\": {\"tags\": [1]}}\n",
            "{\"sku\": \"F\", \"image\": \"f.jpg\", \"colour\": \"red\"}\n",
            "{\"sku\": 42, \"image\": \"g.jpg\"}\n",
        );
        let p = parse_text("cat.jsonl", text);
        let skus: Vec<_> = p.rows.iter().map(|r| (r.line, r.sku.as_str().to_string())).collect();
        assert_eq!(skus, vec![(1, "A".into()), (9, "42".into())]);
        assert_eq!(p.rows[0].attrs["price"], serde_json::json!(9.5));
        assert!(p.rows[0].image.ends_with("a.jpg"));
        let lines: Vec<_> = p.rejected.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![4, 5, 6, 7, 8]);
        assert!(matches!(p.rejected[1].reason, RejectReason::BadSku(IdError::EmptySku)));
        assert_eq!(p.rejected[2].reason, RejectReason::DuplicateSku { first_line: 1 });
        assert!(p.rejected[4].to_string().contains("colour"), "{}", p.rejected[4]);
        assert!(p.rejected[0].to_string().contains("cat.jsonl:4:"), "{}", p.rejected[0]);
    }

    #[test]
    fn csv_columns_become_attrs() {
        let p = parse_text(
            "cat.csv",
            "sku,image,title,colour\nA,a.png,Mug,\nB,b.png,\"Tea, green\",green\nC,c.png\n",
        );
        assert_eq!(p.rows.len(), 2);
        assert_eq!(p.rows[0].attrs.len(), 1);
        assert_eq!(p.rows[1].attrs["title"], serde_json::json!("Tea, green"));
        assert_eq!(p.rows[1].line, 3);
        assert_eq!(p.rejected.len(), 1);
        assert_eq!(p.rejected[0].line, 4);
    }

    #[test]
    fn csv_attrs_column_is_json() {
        let p = parse_text(
            "cat.csv",
            "sku,image,attrs,brand\nA,a.png,\"{\"\"price\"\": 9.5, \"\"title\"\": \"\"Mug\"\"}\",acme\nB,b.png,{not json},x\nC,c.png,,\n",
        );
        assert_eq!(p.rows.len(), 2, "{:?}", p.rejected);
        assert_eq!(p.rows[0].attrs["price"], serde_json::json!(9.5));
        assert_eq!(p.rows[0].attrs["brand"], serde_json::json!("acme"));
        assert!(p.rows[1].attrs.is_empty());
        assert_eq!(p.rejected.len(), 1);
        assert_eq!(p.rejected[0].line, 3);
        assert!(p.rejected[0].to_string().contains("attrs column"), "{}", p.rejected[0]);
    }

    #[test]
    fn csv_without_sku_column_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.csv");
        std::fs::write(&p, "id,image\n1,a.png\n").unwrap();
        assert!(matches!(parse_catalog(&p, None), Err(CatalogError::BadHeader { .. })));
        let q = dir.path().join("c.txt");
        std::fs::write(&q, "").unwrap();
        assert!(matches!(parse_catalog(&q, None), Err(CatalogError::UnknownFormat(_))));
    }
}
