//! Parsing a catalogue file (JSONL or CSV) into validated rows; bad lines become rejections
//! that name the file and line. Pure apart from reading the one file.
//!
//! JSONL: one object per line, `{"sku": "A-1", "image": "img/a1.jpg", "attrs": {"title": "Mug", "price": 9.5}}`;
//! `attrs` is optional and holds strings, numbers, booleans, or arrays of those
//! (`"tags": ["eco", "sale"]`); blank lines and lines starting with `#` are skipped. CSV: a
//! header row with `sku` and `image` columns; every other column becomes an attribute (empty
//! cells are left out): a number when the cell is a JSON number that a number holds exactly
//! (`csv_cell`: `12`, `-3.5`, `2e3`; so that `price<20` filters work on a CSV catalogue), else
//! a string (`0042`, `+5`, ` 7`, `12 kg`, `NaN`, digits beyond 64 bits). A quoted cell may
//! span lines; a quote that is never closed (or that swallows what are rows of their own)
//! rejects its own line only, see
//! [`MAX_RECORD_LINES`]. Image paths are relative to the catalogue file's folder unless
//! absolute. A CSV `attrs` column, if present, holds a JSON object like JSONL's `attrs`.
//!
//! [`CatalogReader`] streams the rows, so a catalogue of millions of rows is read in bounded
//! memory: a 64 KiB read buffer, one row of at most [`MAX_ROW_BYTES`], and the duplicate-SKU
//! table (a few tens of bytes per row, see [`CatalogReader`]). [`parse_catalog`] collects it.

use std::collections::HashMap;
use std::fmt;
use std::hash::{DefaultHasher, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ids::{IdError, SkuId};
use crate::index::store::Attrs;

/// The longest row accepted, in bytes: a longer line is rejected (and skipped without being
/// buffered), and reading goes on; only a CSV header over it stops the reader
/// ([`CatalogError::RowTooLong`]).
pub const MAX_ROW_BYTES: usize = 1 << 20;

/// Read-buffer size of the reader.
const BUFFER_BYTES: usize = 64 * 1024;

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
    BadAttr { key: String, why: String },
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
                write!(f, "cannot read image {}: {error}", super::image_file::shorten(path))
            }
            Self::UndecodableImage { path, error } => {
                write!(f, "cannot decode image {}: {error}", super::image_file::shorten(path))
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
    /// The file cannot be opened, or its first bytes cannot be read.
    #[error("cannot read catalogue {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("catalogue {0}: unknown format; name it .jsonl or .csv, or pass --format")]
    UnknownFormat(PathBuf),
    #[error("catalogue {path}: {why}")]
    BadHeader { path: PathBuf, why: String },
    /// Reading failed part-way through the file; the rows after `line` were not seen.
    #[error("cannot read catalogue {path} at line {line}")]
    Read { path: PathBuf, line: usize, source: std::io::Error },
    /// The CSV header is longer than `limit` bytes.
    #[error(
        "catalogue {path}: the CSV record starting on line {line} is longer than {limit} bytes (an unclosed quote?)"
    )]
    RowTooLong { path: PathBuf, line: usize, limit: usize },
}

/// The parse result: valid rows (duplicates removed, first occurrence kept) and rejections.
#[derive(Debug, Default)]
pub struct ParsedCatalog {
    pub rows: Vec<CatalogRow>,
    pub rejected: Vec<Rejected>,
}

/// What [`CatalogReader`] yields in place of a row.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    /// This row is rejected; reading goes on with the next one.
    #[error("{0}")]
    Rejected(Rejected),
    /// Reading cannot go on (an I/O error part-way through the file, or a CSV header over
    /// [`MAX_ROW_BYTES`]). This is the reader's last item: the caller should stop with this
    /// error (it names the file), not treat the rows so far as the whole catalogue.
    #[error(transparent)]
    Fatal(CatalogError),
}

/// Reads and validates a whole catalogue file: [`CatalogReader`] collected into rows and
/// rejections, both in file order. A fatal error mid-file is returned as the error.
pub fn parse_catalog(path: &Path, format: Option<CatalogFormat>) -> Result<ParsedCatalog, CatalogError> {
    collect(CatalogReader::open(path, format)?)
}

fn collect(items: impl Iterator<Item = Result<CatalogRow, RowError>>) -> Result<ParsedCatalog, CatalogError> {
    let mut parsed = ParsedCatalog::default();
    for item in items {
        match item {
            Ok(row) => parsed.rows.push(row),
            Err(RowError::Rejected(r)) => parsed.rejected.push(r),
            Err(RowError::Fatal(e)) => return Err(e),
        }
    }
    Ok(parsed)
}

/// Streams a catalogue's rows in file order: each item is a valid row, a rejection naming
/// FILE:LINE ([`RowError::Rejected`]), or, as the last item, a fatal error
/// ([`RowError::Fatal`]: an I/O error mid-file must stop the caller, never pass for the end of
/// the file).
///
/// ```no_run
/// # use vitrine::ingest::catalog::{CatalogError, CatalogReader, RowError};
/// # fn f(path: &std::path::Path) -> Result<(), CatalogError> {
/// for item in CatalogReader::open(path, None)? {
///     match item {
///         Ok(row) => println!("{}: {}", row.line, row.sku),
///         Err(RowError::Rejected(r)) => eprintln!("{r}"),
///         Err(RowError::Fatal(e)) => return Err(e),
///     }
/// }
/// # Ok(()) }
/// ```
///
/// Duplicate SKUs: the first occurrence wins and later ones are rejected as
/// [`RejectReason::DuplicateSku`]. To keep memory small the reader does not keep the SKUs, only
/// a 64-bit hash of each with its first line number: 16 bytes per accepted row, 20 to 40 with
/// the hash table's spare capacity (0.2 to 0.4 GB for 10 million rows, half as much again for
/// a moment while the table grows). Two distinct SKUs whose hashes collide would have the later
/// one rejected as a duplicate of the earlier (its message then names a line with another SKU);
/// the chance of any collision among n rows is about n²/2^65 (under 3 in a million for 10
/// million rows), a risk taken to keep the memory independent of the SKUs' lengths.
pub struct CatalogReader {
    path: PathBuf,
    /// The folder image paths are resolved against.
    base: PathBuf,
    source: Source,
    /// SKU hash -> line of its first accepted row.
    first_seen: HashMap<u64, usize>,
    total_bytes: u64,
    /// A fatal error was yielded, or the end reached.
    done: bool,
}

enum Source {
    Jsonl(JsonlSource),
    Csv(Box<CsvSource>),
}

impl fmt::Debug for CatalogReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CatalogReader")
            .field("path", &self.path)
            .field("format", &self.format())
            .field("bytes_read", &self.bytes_read())
            .field("total_bytes", &self.total_bytes)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl CatalogReader {
    /// Opens `path` (format from `format` or guessed from the extension). Header problems (a
    /// CSV without a sku or image column, an unknown format, an unreadable file) are errors
    /// here, not rejections.
    pub fn open(path: &Path, format: Option<CatalogFormat>) -> Result<Self, CatalogError> {
        Self::open_with_limit(path, format, MAX_ROW_BYTES)
    }

    fn open_with_limit(
        path: &Path,
        format: Option<CatalogFormat>,
        limit: usize,
    ) -> Result<Self, CatalogError> {
        let format = format
            .or_else(|| CatalogFormat::from_path(path))
            .ok_or_else(|| CatalogError::UnknownFormat(path.to_path_buf()))?;
        let io_err = |source| CatalogError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io_err)?;
        let total = file.metadata().map_err(io_err)?.len();
        Self::from_reader(path, format, Box::new(file), total, limit)
    }

    /// A reader over `inner`, which holds the catalogue named `path` (`total` bytes long).
    fn from_reader(
        path: &Path,
        format: CatalogFormat,
        inner: Box<dyn Read + Send>,
        total: u64,
        limit: usize,
    ) -> Result<Self, CatalogError> {
        let source = match format {
            CatalogFormat::Jsonl => Source::Jsonl(JsonlSource::new(path, inner, limit)?),
            CatalogFormat::Csv => Source::Csv(Box::new(CsvSource::new(path, inner, limit)?)),
        };
        Ok(Self {
            path: path.to_path_buf(),
            base: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            source,
            first_seen: HashMap::new(),
            total_bytes: total,
            done: false,
        })
    }

    /// The catalogue's format.
    pub fn format(&self) -> CatalogFormat {
        match self.source {
            Source::Jsonl(_) => CatalogFormat::Jsonl,
            Source::Csv(_) => CatalogFormat::Csv,
        }
    }

    /// Bytes consumed so far (for a progress bar / ETA); equals [`total_bytes`](Self::total_bytes)
    /// once the whole file has been read.
    pub fn bytes_read(&self) -> u64 {
        match &self.source {
            Source::Jsonl(s) => s.lines.bytes_read,
            Source::Csv(s) => s.lines.bytes_read,
        }
    }

    /// The file's size when it was opened (0 for a pipe or other file of unknown size).
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Checks the SKU, the image path and SKU uniqueness of a parsed row.
    fn check(&mut self, raw: RawRow) -> Result<CatalogRow, Rejected> {
        let reject = |line, sku, reason| Rejected { file: self.path.clone(), line, sku, reason };
        let (line, sku, image, attrs) = raw.map_err(|(line, sku, reason)| reject(line, sku, reason))?;
        let sku_id = match SkuId::new(sku.as_str()) {
            Ok(s) => s,
            Err(e) => return Err(reject(line, Some(sku), RejectReason::BadSku(e))),
        };
        if image.is_empty() {
            return Err(reject(line, Some(sku), RejectReason::Malformed("image path is empty".into())));
        }
        match self.first_seen.entry(sku_hash(&sku)) {
            std::collections::hash_map::Entry::Occupied(first) => {
                Err(reject(line, Some(sku), RejectReason::DuplicateSku { first_line: *first.get() }))
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(line);
                Ok(CatalogRow { line, sku: sku_id, image: self.base.join(image), attrs })
            }
        }
    }
}

impl Iterator for CatalogReader {
    type Item = Result<CatalogRow, RowError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = match &mut self.source {
            Source::Jsonl(s) => s.next_raw(&self.path),
            Source::Csv(s) => s.next_raw(&self.path),
        };
        match next {
            None => {
                self.done = true;
                None
            }
            Some(Err(e)) => {
                self.done = true;
                Some(Err(RowError::Fatal(e)))
            }
            Some(Ok(raw)) => Some(self.check(raw).map_err(RowError::Rejected)),
        }
    }
}

impl std::iter::FusedIterator for CatalogReader {}

/// A 64-bit hash of a SKU, the same in every run of one build (std's SipHash with fixed keys).
fn sku_hash(sku: &str) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(sku.as_bytes());
    h.finish()
}

/// A row before its SKU and image path are checked: (line, sku, image, attrs) or a rejection.
type RawRow = Result<(usize, String, String, Attrs), (usize, Option<String>, RejectReason)>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRow {
    sku: serde_json::Value,
    image: String,
    #[serde(default)]
    attrs: Option<serde_json::Map<String, serde_json::Value>>,
}

struct JsonlSource {
    lines: Lines,
}

impl JsonlSource {
    fn new(path: &Path, inner: Box<dyn Read + Send>, limit: usize) -> Result<Self, CatalogError> {
        Ok(Self { lines: Lines::new(path, inner, limit)? })
    }

    /// The next row that is not blank or a comment; `None` at the end of the file.
    fn next_raw(&mut self, path: &Path) -> Option<Result<RawRow, CatalogError>> {
        loop {
            let (line_no, bytes) = match self.lines.next(path) {
                Err(e) => return Some(Err(e)),
                Ok(Line::End) => return None,
                Ok(Line::TooLong(n)) => {
                    let why = format!("the line is longer than {} bytes", self.lines.limit);
                    return Some(Ok(Err((n, None, RejectReason::Malformed(why)))));
                }
                Ok(Line::Text(n, b)) => (n, b),
            };
            let text = match std::str::from_utf8(&bytes) {
                Ok(t) => t,
                Err(e) => {
                    let why = format!("the line is not valid UTF-8 (at byte {})", e.valid_up_to() + 1);
                    return Some(Ok(Err((line_no, None, RejectReason::Malformed(why)))));
                }
            };
            let trimmed = text.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            return Some(Ok(parse_json_line(line_no, trimmed)));
        }
    }
}

/// Consumes input up to and including the next newline (or to the end), without buffering it;
/// returns the bytes consumed.
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<u64> {
    let mut skipped = 0;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(skipped);
        }
        let (used, found) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        reader.consume(used);
        skipped += used as u64;
        if found {
            return Ok(skipped);
        }
    }
}

fn parse_json_line(line_no: usize, text: &str) -> RawRow {
    if !text.trim_start().starts_with('{') {
        let why = "a JSONL row must be a JSON object, like {\"sku\": \"A-1\", \"image\": \"a1.jpg\"}";
        return Err((line_no, None, RejectReason::Malformed(why.into())));
    }
    let row: JsonRow =
        serde_json::from_str(text).map_err(|e| (line_no, None, RejectReason::Malformed(json_error(&e))))?;
    let sku = match row.sku {
        serde_json::Value::String(s) => s,
        serde_json::Value::Number(n) => n.to_string(),
        other => {
            let why = format!("sku must be a string, got {other}");
            return Err((line_no, None, RejectReason::Malformed(why)));
        }
    };
    match checked_attrs(row.attrs.unwrap_or_default()) {
        Ok(attrs) => Ok((line_no, sku, row.image, attrs)),
        Err(reason) => Err((line_no, Some(sku), reason)),
    }
}

/// Checks attribute names and values under the rules every write path shares
/// ([`crate::index::attrs`]).
fn checked_attrs(map: serde_json::Map<String, serde_json::Value>) -> Result<Attrs, RejectReason> {
    let attrs: Attrs = map.into_iter().collect();
    attrs_ok(&attrs)?;
    Ok(attrs)
}

fn attrs_ok(attrs: &Attrs) -> Result<(), RejectReason> {
    use crate::index::attrs::{AttrError, check};
    check(attrs).map_err(|e| match e {
        AttrError::Bad { key, why } => RejectReason::BadAttr { key, why },
        too_large @ AttrError::TooLarge { .. } => RejectReason::Malformed(too_large.to_string()),
    })
}

/// serde_json's message without its "at line 1" (the row is one line), with the column.
fn json_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
    format!("invalid JSON at column {}: {msg}", e.column())
}

/// The CSV reader's input: fails once the record being read is over the limit, so that an
/// unclosed quote cannot make the CSV reader buffer the rest of the file.
/// Most physical lines one CSV record may span (a quoted cell with line breaks). A quote
/// still open after this many lines, or after [`MAX_ROW_BYTES`], or at the end of the file, is
/// taken as unterminated: its first line is rejected and reading resumes on the next line, so
/// a stray quote costs one row, not the rows after it.
pub const MAX_RECORD_LINES: usize = 64;

/// Physical lines of a file, each at most `limit` bytes (a longer one is skipped without being
/// buffered), with a queue of lines read ahead and handed back.
struct Lines {
    reader: BufReader<Box<dyn Read + Send>>,
    /// Lines read ahead of the record being assembled and handed back.
    queue: std::collections::VecDeque<Line>,
    /// Lines read from the file so far.
    line: usize,
    bytes_read: u64,
    limit: usize,
}

/// One physical line, or why there is none.
enum Line {
    Text(usize, Vec<u8>),
    TooLong(usize),
    End,
}

impl Lines {
    fn new(path: &Path, inner: Box<dyn Read + Send>, limit: usize) -> Result<Self, CatalogError> {
        let mut reader = BufReader::with_capacity(BUFFER_BYTES, inner);
        // An unreadable file (a folder, say) is an error of `open`, not of the first row.
        reader.fill_buf().map_err(|source| CatalogError::Io { path: path.to_path_buf(), source })?;
        Ok(Self { reader, queue: Default::default(), line: 0, bytes_read: 0, limit })
    }

    fn next(&mut self, path: &Path) -> Result<Line, CatalogError> {
        if let Some(line) = self.queue.pop_front() {
            return Ok(line);
        }
        let line_no = self.line + 1;
        let fatal = |source| CatalogError::Read { path: path.to_path_buf(), line: line_no, source };
        let mut buf = Vec::new();
        // At most limit + 1 bytes: a longer line is rejected without being buffered.
        let n = (&mut self.reader).take(self.limit as u64 + 1).read_until(b'\n', &mut buf).map_err(fatal)?;
        if n == 0 {
            return Ok(Line::End);
        }
        self.line = line_no;
        self.bytes_read += n as u64;
        if buf.last() == Some(&b'\n') {
            buf.pop();
        } else if buf.len() > self.limit {
            self.bytes_read += skip_line(&mut self.reader).map_err(fatal)?;
            return Ok(Line::TooLong(line_no));
        }
        if line_no == 1 && buf.starts_with(b"\xEF\xBB\xBF") {
            buf.drain(..3);
        }
        Ok(Line::Text(line_no, buf))
    }
}

/// Whether a CSV record is inside a quoted cell after `line`, given whether it was at its
/// start (RFC 4180 as the csv crate reads it: a quote opens a quoted cell only as a cell's
/// first byte, `""` inside one is a literal quote, any other quote is literal).
fn quote_open_after(line: &[u8], mut in_quotes: bool) -> bool {
    let mut cell_start = !in_quotes;
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if in_quotes {
            if b == b'"' {
                if line.get(i + 1) == Some(&b'"') {
                    i += 1;
                } else {
                    in_quotes = false;
                }
            }
        } else if b == b'"' && cell_start {
            in_quotes = true;
        }
        cell_start = !in_quotes && b == b',';
        i += 1;
    }
    in_quotes
}

/// One CSV record's physical lines joined, or why the lines at `first` make no record.
enum Assembled {
    /// `continued`: the lines after the first that the record took (empty for most records).
    Record {
        first: usize,
        bytes: Vec<u8>,
        continued: Vec<Line>,
    },
    Rejected(usize, String),
    End,
}

struct CsvSource {
    lines: Lines,
    headers: csv::StringRecord,
    sku_col: usize,
    image_col: usize,
    attrs_col: Option<usize>,
}

impl CsvSource {
    fn new(path: &Path, inner: Box<dyn Read + Send>, limit: usize) -> Result<Self, CatalogError> {
        let mut lines = Lines::new(path, inner, limit)?;
        let bad_header = |why: String| CatalogError::BadHeader { path: path.to_path_buf(), why };
        let headers = loop {
            match assemble(&mut lines, path)? {
                Assembled::End => {
                    return Err(bad_header("the CSV file is empty: it needs a header row".into()));
                }
                Assembled::Rejected(1, why) if why.contains("longer than") => {
                    return Err(CatalogError::RowTooLong { path: path.to_path_buf(), line: 1, limit });
                }
                Assembled::Rejected(_, why) => {
                    return Err(bad_header(format!("cannot read the CSV header: {why}")));
                }
                Assembled::Record { bytes, .. } if bytes.iter().all(u8::is_ascii_whitespace) => continue,
                Assembled::Record { bytes, .. } => {
                    break parse_record(&bytes)
                        .map_err(|why| bad_header(format!("cannot read the CSV header: {why}")))?;
                }
            }
        };
        let col = |name: &str| headers.iter().position(|h| h.trim() == name);
        let sku_col = col("sku").ok_or_else(|| bad_header("the CSV header has no `sku` column".into()))?;
        let image_col =
            col("image").ok_or_else(|| bad_header("the CSV header has no `image` column".into()))?;
        let attrs_col = col("attrs");
        // Two columns of one name would silently keep one value of the two.
        for (i, name) in headers.iter().enumerate() {
            let name = name.trim();
            if let Some(j) = headers.iter().take(i).position(|h| !name.is_empty() && h.trim() == name) {
                return Err(bad_header(format!(
                    "the CSV header names column {name:?} twice (columns {} and {})",
                    j + 1,
                    i + 1
                )));
            }
        }
        Ok(Self { lines, headers, sku_col, image_col, attrs_col })
    }

    fn next_raw(&mut self, path: &Path) -> Option<Result<RawRow, CatalogError>> {
        loop {
            return match assemble(&mut self.lines, path) {
                Err(e) => Some(Err(e)),
                Ok(Assembled::End) => None,
                Ok(Assembled::Rejected(line, why)) => {
                    Some(Ok(Err((line, None, RejectReason::Malformed(why)))))
                }
                Ok(Assembled::Record { bytes, .. }) if bytes.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(Assembled::Record { first, bytes, continued }) => {
                    let parsed = parse_record(&bytes);
                    // A record over several lines whose SKU or image has a line break, whose
                    // field count is wrong, or which took a line that is a row of its own, is a
                    // stray quote that swallowed the next rows: reject its first line alone and
                    // read the others as rows of their own.
                    let stray = !continued.is_empty()
                        && parsed.as_ref().is_ok_and(|rec| {
                            rec.len() != self.headers.len()
                                || [self.sku_col, self.image_col].iter().any(|&c| rec[c].contains('\n'))
                                || continued.iter().any(|l| self.looks_like_a_row(l))
                        });
                    if stray {
                        for line in continued.into_iter().rev() {
                            self.lines.queue.push_front(line);
                        }
                        return Some(Ok(Err((first, None, RejectReason::Malformed(UNTERMINATED.into())))));
                    }
                    Some(Ok(match parsed {
                        Err(why) => Err((first, None, RejectReason::Malformed(why))),
                        Ok(rec) if rec.len() != self.headers.len() => Err((
                            first,
                            None,
                            RejectReason::Malformed(format!(
                                "the record has {} fields; the header has {}",
                                rec.len(),
                                self.headers.len()
                            )),
                        )),
                        Ok(rec) => self.raw_row(first, &rec),
                    }))
                }
            };
        }
    }

    /// Whether `line`, read alone, is a complete row: the header's field count, with a SKU and
    /// an image. (A line of a real multi-line cell rarely is.)
    fn looks_like_a_row(&self, line: &Line) -> bool {
        let Line::Text(_, bytes) = line else { return false };
        parse_record(bytes).is_ok_and(|rec| {
            rec.len() == self.headers.len()
                && [self.sku_col, self.image_col].iter().all(|&c| {
                    let cell = rec[c].trim();
                    !cell.is_empty() && !cell.contains('"')
                })
        })
    }

    fn raw_row(&self, line_no: usize, rec: &csv::StringRecord) -> RawRow {
        // An `attrs` column holds a JSON object, as in JSONL; other columns are numbers or strings.
        let sku = || Some(rec[self.sku_col].trim().to_string());
        // Checked once, with the columns, below.
        let mut attrs: Attrs = match self.attrs_col.map(|i| &rec[i]).filter(|v| !v.trim().is_empty()) {
            None => Attrs::new(),
            Some(cell) => serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(cell)
                .map_err(|e| {
                    (line_no, sku(), RejectReason::Malformed(format!("attrs column: {}", json_error(&e))))
                })?
                .into_iter()
                .collect(),
        };
        for (i, value) in rec.iter().enumerate() {
            if i != self.sku_col && i != self.image_col && Some(i) != self.attrs_col && !value.is_empty() {
                let name = self.headers[i].trim();
                let why = if name.is_empty() {
                    format!("column {} has a value but no name in the header", i + 1)
                } else if attrs.contains_key(name) {
                    format!("attribute {name:?} is given both as a column and in the attrs column")
                } else {
                    attrs.insert(name.to_string(), csv_cell(value));
                    continue;
                };
                return Err((line_no, sku(), RejectReason::Malformed(why)));
            }
        }
        attrs_ok(&attrs).map_err(|reason| (line_no, sku(), reason))?;
        Ok((line_no, rec[self.sku_col].trim().to_string(), rec[self.image_col].trim().to_string(), attrs))
    }
}

/// The attribute value of a CSV cell: a number when the cell is, as written, a JSON number
/// that a 64-bit float holds exactly (its shortest printed form is the same decimal: `12`,
/// `-3.5`, `2e3`, `1e20`, `0.1`; integers written out up to 2^53, see
/// [`crate::index::attrs`]), else the cell as a string (`9007199254740993` or
/// `19.999999999999999999` would change value). Leading zeros, signs other than `-`,
/// whitespace and units keep a cell a string, so codes like `0042` stay as written.
fn csv_cell(cell: &str) -> serde_json::Value {
    use crate::index::attrs::MAX_EXACT_INTEGER;
    let plain = cell.starts_with(|c: char| c == '-' || c.is_ascii_digit())
        && cell.ends_with(|c: char| c.is_ascii_digit());
    if plain
        && let Ok(n) = serde_json::from_str::<serde_json::Number>(cell)
        && let Some(x) = n.as_f64().filter(|x| x.is_finite())
        && (cell.contains(['.', 'e', 'E']) || x.abs() <= MAX_EXACT_INTEGER as f64)
        && decimal(cell).is_some_and(|d| decimal(&x.to_string()) == Some(d))
    {
        return serde_json::Value::Number(n);
    }
    serde_json::Value::String(cell.to_string())
}

/// A decimal number's exact value as (negative, significant digits, power of ten): `-3.50`
/// and `-35e-1` give the same. `None` if `s` is not one.
fn decimal(s: &str) -> Option<(bool, String, i64)> {
    let (neg, s) = s.strip_prefix('-').map_or((false, s), |rest| (true, rest));
    let (mantissa, exp) = match s.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().ok()?),
        None => (s, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    let kept = digits.trim_end_matches('0');
    if kept.is_empty() {
        return Some((false, String::new(), 0));
    }
    let exp = exp.checked_sub(frac.len() as i64)?.checked_add((digits.len() - kept.len()) as i64)?;
    Some((neg, kept.to_string(), exp))
}

/// Joins the physical lines of the next record: one line, or more while a quoted cell is
/// open. An unterminated quote rejects its first line alone and hands the others back.
fn assemble(lines: &mut Lines, path: &Path) -> Result<Assembled, CatalogError> {
    let limit = lines.limit;
    let (first, mut bytes) = match lines.next(path)? {
        Line::End => return Ok(Assembled::End),
        Line::TooLong(n) => {
            return Ok(Assembled::Rejected(n, format!("the line is longer than {limit} bytes")));
        }
        Line::Text(n, b) => (n, b),
    };
    let mut open = quote_open_after(&bytes, false);
    let mut taken: Vec<Line> = Vec::new();
    while open {
        let next = if taken.len() + 1 >= MAX_RECORD_LINES || bytes.len() > limit {
            Line::End
        } else {
            lines.next(path)?
        };
        let Line::Text(n, b) = next else {
            // Unterminated: the later lines (and a line too long to be part of any record)
            // are rows of their own.
            if let Line::TooLong(_) = next {
                lines.queue.push_front(next);
            }
            for line in taken.into_iter().rev() {
                lines.queue.push_front(line);
            }
            return Ok(Assembled::Rejected(first, UNTERMINATED.into()));
        };
        open = quote_open_after(&b, true);
        bytes.push(b'\n');
        bytes.extend_from_slice(&b);
        taken.push(Line::Text(n, b));
    }
    Ok(Assembled::Record { first, bytes, continued: taken })
}

/// The rejection of a quote that was opened on line `first` and never meant to be closed.
const UNTERMINATED: &str = "a quoted cell that starts on this line is never closed (unterminated quote)";

/// One CSV record from its bytes (a trailing `\r` is a line ending, not data).
fn parse_record(bytes: &[u8]) -> Result<csv::StringRecord, String> {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(bytes);
    let mut rec = csv::StringRecord::new();
    match reader.read_record(&mut rec) {
        Ok(_) => Ok(rec),
        Err(e) => Err(match e.kind() {
            csv::ErrorKind::Utf8 { .. } => "the record is not valid UTF-8".to_string(),
            _ => e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_text(name: &str, text: &str) -> ParsedCatalog {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        parse_catalog(&p, None).unwrap()
    }

    /// In-memory input handed out `chunk` bytes at a time, failing once `fail_at` bytes are out.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
        fail_at: Option<usize>,
    }

    impl Read for Chunked {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.fail_at.is_some_and(|at| self.pos >= at) {
                return Err(std::io::Error::other("disk on fire"));
            }
            let end = (self.pos + self.chunk.min(buf.len())).min(self.data.len());
            let end = self.fail_at.map_or(end, |at| end.min(at));
            let n = end - self.pos;
            buf[..n].copy_from_slice(&self.data[self.pos..end]);
            self.pos = end;
            Ok(n)
        }
    }

    fn reader_over(
        name: &str,
        format: CatalogFormat,
        data: &[u8],
        chunk: usize,
        fail_at: Option<usize>,
        limit: usize,
    ) -> Result<CatalogReader, CatalogError> {
        let inner = Chunked { data: data.to_vec(), pos: 0, chunk, fail_at };
        CatalogReader::from_reader(Path::new(name), format, Box::new(inner), data.len() as u64, limit)
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
            "{\"sku\": \"E\", \"image\": \"e.jpg\", \"attrs\": {\"dims\": {\"h\": 9}}}\n",
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
        assert!(matches!(&p.rejected[3].reason, RejectReason::BadAttr { key, .. } if key == "dims"));
        assert!(p.rejected[4].to_string().contains("colour"), "{}", p.rejected[4]);
        assert!(p.rejected[0].to_string().contains("cat.jsonl:4:"), "{}", p.rejected[0]);
    }

    #[test]
    fn attrs_take_booleans_and_arrays_of_scalars() {
        let text = concat!(
            "{\"sku\": \"A\", \"image\": \"a.jpg\", \"attrs\": {\"tags\": [\"eco\", \"sale\"], \"new\": true, \"sizes\": [1, 2.5, false], \"none\": []}}\n",
            "{\"sku\": \"B\", \"image\": \"b.jpg\", \"attrs\": {\"x\": null}}\n",
            "{\"sku\": \"C\", \"image\": \"c.jpg\", \"attrs\": {\"tags\": [[\"a\"]]}}\n",
            "{\"sku\": \"D\", \"image\": \"d.jpg\", \"attrs\": {\"tags\": [{\"a\": 1}]}}\n",
            "{\"sku\": \"E\", \"image\": \"e.jpg\", \"attrs\": {\"tags\": [\"a\", null]}}\n",
            "{\"sku\": \"F\", \"image\": \"f.jpg\", \"attrs\": {\"dims\": {\"h\": 9}}}\n",
        );
        let p = parse_text("cat.jsonl", text);
        assert_eq!(p.rows.len(), 1, "{:?}", p.rejected);
        let attrs = &p.rows[0].attrs;
        assert_eq!(attrs["tags"], serde_json::json!(["eco", "sale"]));
        assert_eq!(attrs["new"], serde_json::json!(true));
        assert_eq!(attrs["sizes"], serde_json::json!([1, 2.5, false]));
        assert_eq!(attrs["none"], serde_json::json!([]));
        let whys: Vec<_> = p
            .rejected
            .iter()
            .map(|r| match &r.reason {
                RejectReason::BadAttr { why, .. } => why.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(whys[0].contains("null"), "{}", whys[0]);
        assert!(whys[1..4].iter().all(|w| w.contains("array elements")), "{whys:?}");
        assert!(whys[4].contains("nested objects"), "{}", whys[4]);
        assert_eq!(p.rejected.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 3, 4, 5, 6]);
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
    fn csv_columns_without_a_name_or_twice_named_are_refused() {
        // A nameless column is harmless while empty (a spreadsheet's trailing commas); a value
        // in it rejects its row, naming the column.
        let p = parse_text("cat.csv", "sku,image,,title\nA,a.png,,Mug\nB,b.png,x,Tea\n");
        assert_eq!(p.rows.len(), 1);
        assert_eq!((p.rejected[0].line, p.rejected[0].sku.as_deref()), (3, Some("B")));
        assert!(
            p.rejected[0].reason.to_string().contains("column 3 has a value but no name"),
            "{:?}",
            p.rejected
        );
        let p = parse_text("cat.csv", "sku,image,price,attrs\nA,a.png,5,\"{\"\"price\"\": 9}\"\n");
        assert!(
            p.rejected[0].reason.to_string().contains("both as a column and in the attrs"),
            "{:?}",
            p.rejected
        );
        for header in ["sku,image,title,title", "sku,image,sku", "sku,image, title ,title"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("cat.csv");
            std::fs::write(&path, format!("{header}\nA,a.png,x,y\n")).unwrap();
            let e = parse_catalog(&path, None).unwrap_err().to_string();
            assert!(e.contains("twice (columns"), "{header}: {e}");
        }
    }

    #[test]
    fn a_jsonl_row_must_be_an_object() {
        let p = parse_text("cat.jsonl", "[\"A\", \"a.png\"]\n{\"sku\": \"B\", \"image\": \"b.png\"}\n");
        assert_eq!(p.rows.len(), 1);
        assert!(p.rejected[0].reason.to_string().contains("must be a JSON object"), "{:?}", p.rejected);
    }

    #[test]
    fn csv_numbers_become_numbers_and_codes_stay_strings() {
        use serde_json::json;
        for (cell, want) in [
            ("12", json!(12)),
            ("-3.5", json!(-3.5)),
            ("3.50", json!(3.5)),
            ("2e3", json!(2000.0)),
            ("0", json!(0)),
            ("9007199254740992", json!(9007199254740992u64)),
            ("-9007199254740992", json!(-9007199254740992i64)),
            ("0.1", json!(0.1)),
            ("1e-7", json!(1e-7)),
            ("1e20", json!(1e20)),
            ("-2.5e30", json!(-2.5e30)),
        ] {
            assert_eq!(csv_cell(cell), want, "{cell}");
        }
        for cell in [
            "0042",
            "+5",
            " 7",
            "7 ",
            "12 kg",
            "NaN",
            "inf",
            "1e999",
            "-",
            "1.",
            ".5",
            "0x10",
            "1_000",
            "18446744073709551616",
            "99999999999999999999999",
            // Numbers a 64-bit float would change: kept as written.
            "18446744073709551615",
            "-9223372036854775808",
            "9007199254740993",
            "19.999999999999999999",
            "0.30000000000000000001",
        ] {
            assert_eq!(csv_cell(cell), json!(cell), "{cell}");
        }
        let p = parse_text("cat.csv", "sku,image,price,ean\nA,a.png,9.99,0042\nB,b.png,25,4006381333931\n");
        assert_eq!(p.rows[0].attrs["price"], json!(9.99));
        assert_eq!(p.rows[0].attrs["ean"], json!("0042"));
        assert_eq!(p.rows[1].attrs["price"], json!(25));
        let cheap = crate::index::filter::Filter::parse(["price<20"]).unwrap();
        assert!(cheap.matches(&p.rows[0].attrs) && !cheap.matches(&p.rows[1].attrs));
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
        assert!(matches!(CatalogReader::open(&p, None), Err(CatalogError::BadHeader { .. })));
        let q = dir.path().join("c.txt");
        std::fs::write(&q, "").unwrap();
        assert!(matches!(parse_catalog(&q, None), Err(CatalogError::UnknownFormat(_))));
    }

    #[test]
    fn unreadable_files_fail_to_open() {
        let dir = tempfile::tempdir().unwrap();
        for format in [CatalogFormat::Jsonl, CatalogFormat::Csv] {
            let missing = CatalogReader::open(&dir.path().join("missing.jsonl"), Some(format));
            assert!(matches!(missing, Err(CatalogError::Io { .. })), "{missing:?}");
            // A folder opens on Linux but cannot be read.
            let folder = CatalogReader::open(dir.path(), Some(format));
            assert!(matches!(folder, Err(CatalogError::Io { .. })), "{folder:?}");
        }
    }

    #[test]
    fn a_long_jsonl_file_streams_every_row_in_order() {
        const ROWS: usize = 50_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.jsonl");
        // Line 1 is a comment; row k (0-based) is on line k + 2 with SKU "S{k}", except that
        // two rows far apart repeat earlier SKUs.
        let dup = |k: usize| match k {
            40_000 => Some(1),
            49_999 => Some(25_000),
            _ => None,
        };
        let mut text = String::from("# generated\n");
        for k in 0..ROWS {
            let sku = dup(k).unwrap_or(k);
            text.push_str(&format!(
                "{{\"sku\": \"S{sku}\", \"image\": \"img/{k}.jpg\", \"attrs\": {{\"n\": {k}, \"tags\": [\"t{}\"]}}}}\n",
                k % 7
            ));
        }
        std::fs::write(&path, &text).unwrap();

        let mut reader = CatalogReader::open(&path, None).unwrap();
        assert_eq!(reader.total_bytes(), text.len() as u64);
        assert_eq!(reader.format(), CatalogFormat::Jsonl);
        let (mut rows, mut rejected, mut last_bytes) = (Vec::new(), Vec::new(), 0);
        while let Some(item) = reader.next() {
            match item {
                Ok(row) => rows.push(row),
                Err(RowError::Rejected(r)) => rejected.push(r),
                Err(RowError::Fatal(e)) => panic!("{e}"),
            }
            assert!(reader.bytes_read() >= last_bytes);
            last_bytes = reader.bytes_read();
            if rows.len() == ROWS / 2 {
                assert!(last_bytes < reader.total_bytes());
            }
        }
        assert_eq!(reader.bytes_read(), reader.total_bytes());
        assert!(reader.next().is_none());

        assert_eq!(rows.len(), ROWS - 2);
        let expected = (0..ROWS).filter(|&k| dup(k).is_none());
        for (row, k) in rows.iter().zip(expected) {
            assert_eq!((row.line, row.sku.as_str()), (k + 2, format!("S{k}").as_str()));
            assert_eq!(row.attrs["n"], serde_json::json!(k));
            assert!(row.image.ends_with(format!("img/{k}.jpg")));
        }
        let dups: Vec<_> = rejected.iter().map(|r| (r.line, r.reason.clone())).collect();
        assert_eq!(
            dups,
            vec![
                (40_002, RejectReason::DuplicateSku { first_line: 3 }),
                (50_001, RejectReason::DuplicateSku { first_line: 25_002 }),
            ]
        );
        assert!(rejected[0].to_string().starts_with(&format!("{}:40002: sku \"S1\"", path.display())));
    }

    #[test]
    fn an_over_long_line_is_rejected_and_reading_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cat.jsonl");
        let pad = "x".repeat(MAX_ROW_BYTES);
        let text = format!(
            "{{\"sku\": \"A\", \"image\": \"a.jpg\"}}\n{{\"sku\": \"L\", \"image\": \"l.jpg\", \"attrs\": {{\"pad\": \"{pad}\"}}}}\n{{\"sku\": \"C\", \"image\": \"c.jpg\"}}"
        );
        std::fs::write(&path, &text).unwrap();
        let mut reader = CatalogReader::open(&path, None).unwrap();
        let parsed = collect(reader.by_ref()).unwrap();
        assert_eq!(parsed.rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(parsed.rejected.len(), 1);
        let r = &parsed.rejected[0];
        assert_eq!(r.line, 2);
        assert!(
            matches!(&r.reason, RejectReason::Malformed(why) if why.contains("longer than 1048576 bytes"))
        );
        assert_eq!(reader.bytes_read(), text.len() as u64);
        assert_eq!(reader.bytes_read(), reader.total_bytes());
    }

    #[test]
    fn the_line_limit_is_exact() {
        let row =
            |id: usize, pad: usize| format!("{{\"sku\": \"S{id}\", \"image\": \"{}.jpg\"}}", "p".repeat(pad));
        let limit = row(1, 10).len();
        // Limit-long lines pass (with LF or at the end of the file); one byte more is rejected
        // (a CR counts), also as the last line; the rows between are unaffected.
        let text =
            [row(1, 10), row(2, 11), row(3, 9) + "\r", row(4, 10) + "\r", row(5, 9), row(6, 11)].join("\n");
        for chunk in [1, 3, 64, 4096] {
            let reader =
                reader_over("cat.jsonl", CatalogFormat::Jsonl, text.as_bytes(), chunk, None, limit).unwrap();
            let parsed = collect(reader).unwrap();
            assert_eq!(parsed.rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 3, 5]);
            assert_eq!(parsed.rejected.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 4, 6]);
            let why = format!("malformed row: the line is longer than {limit} bytes");
            assert!(parsed.rejected.iter().all(|r| r.to_string() == format!("cat.jsonl:{}: {why}", r.line)));
        }
    }

    #[test]
    fn invalid_utf8_is_rejected_naming_its_line() {
        let mut data = b"\xEF\xBB\xBF{\"sku\": \"A\", \"image\": \"a.jpg\"}\n".to_vec();
        data.extend_from_slice(b"{\"sku\": \"B\xFF\", \"image\": \"b.jpg\"}\n");
        data.extend_from_slice(b"{\"sku\": \"C\", \"image\": \"c.jpg\"}\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cat.jsonl");
        std::fs::write(&path, &data).unwrap();
        let p = parse_catalog(&path, None).unwrap();
        // The byte-order mark of line 1 is skipped.
        assert_eq!(p.rows.iter().map(|r| r.sku.as_str()).collect::<Vec<_>>(), vec!["A", "C"]);
        assert_eq!(p.rejected.len(), 1);
        let msg = p.rejected[0].to_string();
        assert!(
            msg.contains("cat.jsonl:2: malformed row: the line is not valid UTF-8 (at byte 11)"),
            "{msg}"
        );
    }

    #[test]
    fn an_io_error_mid_file_is_fatal_and_names_the_file() {
        let jsonl = "{\"sku\": \"A\", \"image\": \"a.jpg\"}\n{\"sku\": \"B\", \"image\": \"b.jpg\"}\n";
        let csv = "sku,image\nA,a.jpg\nB,b.jpg\nC,c.jpg\n";
        // Each fails in its second row: JSONL line 2, CSV line 3.
        for (format, text, fail_at, line) in
            [(CatalogFormat::Jsonl, jsonl, 40, 2), (CatalogFormat::Csv, csv, 20, 3)]
        {
            let mut reader = reader_over("cat", format, text.as_bytes(), 8, Some(fail_at), 1000).unwrap();
            assert!(reader.next().unwrap().is_ok());
            match reader.next() {
                Some(Err(RowError::Fatal(e @ CatalogError::Read { .. }))) => {
                    assert!(
                        e.to_string().starts_with(&format!("cannot read catalogue cat at line {line}")),
                        "{e}"
                    );
                    let full = crate::report::chain(&e);
                    assert!(full.ends_with("disk on fire"), "the cause follows once: {full}");
                    assert_eq!(full.matches("disk on fire").count(), 1, "{full}");
                }
                other => panic!("{other:?}"),
            }
            assert!(reader.next().is_none(), "a fatal error is the last item");
            let reader = reader_over("cat", format, text.as_bytes(), 8, Some(fail_at), 1000).unwrap();
            assert!(matches!(collect(reader), Err(CatalogError::Read { line: l, .. }) if l == line));
        }
    }

    #[test]
    fn an_unclosed_csv_quote_costs_its_own_row_only() {
        let mut text = String::from("sku,image\nA,a.jpg\nB,\"b.jpg\n");
        for k in 0..200 {
            text.push_str(&format!("S{k},{k}.jpg\n"));
        }
        // Also a stray quote that a later quote would close.
        text.push_str("C,\"c.jpg\nD,d.jpg\nE,\"e.jpg\"\n");
        for chunk in [1, 16, 4096] {
            let reader =
                reader_over("cat.csv", CatalogFormat::Csv, text.as_bytes(), chunk, None, 500).unwrap();
            let parsed = collect(reader).unwrap();
            assert_eq!(parsed.rows.len(), 203, "A, 200 rows, D and E");
            assert_eq!(parsed.rows.last().unwrap().sku.as_str(), "E");
            assert_eq!(parsed.rows.last().unwrap().line, 206);
            let lines: Vec<usize> = parsed.rejected.iter().map(|r| r.line).collect();
            assert_eq!(lines, vec![3, 204], "{:?}", parsed.rejected);
            assert!(parsed.rejected[0].to_string().contains("cat.csv:3") || parsed.rejected[0].line == 3);
            assert!(format!("{}", parsed.rejected[0].reason).contains("unterminated quote"));
        }
        // A header over the limit is an error of `open`.
        let long_header = format!("sku,image,{}\n", "c".repeat(600));
        let err =
            reader_over("cat.csv", CatalogFormat::Csv, long_header.as_bytes(), 16, None, 500).unwrap_err();
        assert!(matches!(err, CatalogError::RowTooLong { line: 1, .. }), "{err:?}");
    }

    #[test]
    fn a_csv_stream_reads_quotes_line_breaks_and_rejections() {
        let text = "\u{feff}sku, image ,attrs,colour\nA,a.png,\"{\"\"tags\"\": [\"\"x\"\"]}\",red\nB,b.png,,\"multi\nline\"\nA,dup.png,,\n,e.png,,\nC,,,\nD,d.png\nE,e.png,{bad},\n\nF,f.png,,blue";
        let dir = tempfile::tempdir().unwrap();
        for text in [text.to_string(), text.replace('\n', "\r\n")] {
            let path = dir.path().join("cat.csv");
            std::fs::write(&path, &text).unwrap();
            let mut reader = CatalogReader::open(&path, None).unwrap();
            let new = collect(reader.by_ref()).unwrap();
            assert_eq!(reader.bytes_read(), reader.total_bytes());
            assert_eq!(new.rows.iter().map(|r| r.sku.as_str()).collect::<Vec<_>>(), vec!["A", "B", "F"]);
            assert_eq!(new.rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 3, 11]);
            assert_eq!(new.rows[0].attrs["tags"], serde_json::json!(["x"]));
            let colour = new.rows[1].attrs["colour"].as_str().unwrap().replace('\r', "");
            assert_eq!(colour, "multi\nline");
            assert_eq!(new.rejected.iter().map(|r| r.line).collect::<Vec<_>>(), vec![5, 6, 7, 8, 9]);
        }
    }

    #[test]
    fn the_reader_can_move_between_threads() {
        fn is_send<T: Send>() {}
        is_send::<CatalogReader>();
    }

    /// Today's (whole-file) parser, as the reference the streaming one must match.
    mod old {
        use super::super::*;

        pub fn parse(path: &Path, format: CatalogFormat, text: &str) -> Result<ParsedCatalog, String> {
            let base = path.parent().unwrap_or(Path::new("."));
            let raw = match format {
                CatalogFormat::Jsonl => parse_jsonl(text),
                CatalogFormat::Csv => return Err("CSV has no reference parser here".into()),
            };
            Ok(finish(path, base, raw))
        }

        fn parse_jsonl(text: &str) -> Vec<RawRow> {
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let trimmed = line.trim();
                if !trimmed.is_empty() && !trimmed.starts_with('#') {
                    out.push(parse_json_line(i + 1, trimmed));
                }
            }
            out
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
                    let reason = RejectReason::Malformed("image path is empty".into());
                    parsed.rejected.push(reject(line, Some(sku), reason));
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
    }

    /// Streams `text` in `chunk`-byte reads and parses it the old way; both must agree.
    fn assert_same_as_old(name: &str, format: CatalogFormat, text: &str, chunk: usize) {
        let path = Path::new(name);
        let reader = reader_over(name, format, text.as_bytes(), chunk, None, MAX_ROW_BYTES);
        match (reader.and_then(collect), old::parse(path, format, text)) {
            (Ok(new), Ok(old)) => {
                assert_eq!(new.rows, old.rows);
                assert_eq!(new.rejected, old.rejected);
            }
            (Err(CatalogError::BadHeader { why, .. }), Err(old)) => assert_eq!(why, old),
            (new, old) => panic!("new {new:?}, old {old:?}"),
        }
    }

    const JSONL_LINES: &[&str] = &[
        "{\"sku\": \"S#\", \"image\": \"#.jpg\"}",
        "  {\"sku\": \"S#\", \"image\": \"x.jpg\", \"attrs\": {\"tags\": [\"a\", 1, true], \"n\": #}}\t",
        "{\"sku\": \"S#\", \"image\": \"x.jpg\", \"attrs\": {\"x\": null}}",
        "{\"sku\": \"S#\", \"image\": \"x.jpg\", \"attrs\": {\"d\": {\"h\": 1}}}",
        "{\"sku\": \"S#\", \"image\": \"\"}",
        "{\"sku\": \"\", \"image\": \"a.jpg\"}",
        "{\"sku\": #, \"image\": \"n.jpg\"}",
        "{\"sku\": [#], \"image\": \"n.jpg\"}",
        "{\"sku\": \"S#\", \"image\": \"c.jpg\", \"extra\": 1}",
        "{\"sku\": \"S#\"",
        "not json",
        "",
        "   ",
        "# comment #",
        " #x",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn jsonl_streaming_matches_the_old_parser(
            lines in prop::collection::vec((0..JSONL_LINES.len(), 0..6usize, any::<bool>()), 0..30),
            final_newline in any::<bool>(),
            chunk in 1..40usize,
        ) {
            let mut text = String::new();
            for (i, (template, sku, crlf)) in lines.iter().enumerate() {
                if i > 0 {
                    text.push_str(if *crlf { "\r\n" } else { "\n" });
                }
                text.push_str(&JSONL_LINES[*template].replace('#', &sku.to_string()));
            }
            if final_newline && !text.is_empty() {
                text.push('\n');
            }
            assert_same_as_old("dir/cat.jsonl", CatalogFormat::Jsonl, &text, chunk);
        }

        /// Clean rows, rows with a multi-line note, and lines with a stray quote (in the SKU,
        /// the image or the note) in any order and any read size: every clean row is read, with
        /// its line, and every stray quote costs its own line only.
        #[test]
        fn stray_quotes_cost_only_their_own_line(
            kinds in prop::collection::vec(0..5usize, 0..40),
            crlf in any::<bool>(),
            chunk in 1..40usize,
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut text = format!("sku,image,note{eol}");
            let (mut line, mut want_rows, mut want_rejected) = (2usize, Vec::new(), Vec::new());
            for (i, kind) in kinds.iter().enumerate() {
                let (row, lines, good) = match kind {
                    0 => (format!("S{i},{i}.jpg,n"), 1, true),
                    1 => (format!("M{i},{i}.jpg,\"two{eol}lines, here\""), 2, true),
                    2 => (format!("P{i},\"p.jpg,n"), 1, false),
                    3 => (format!("\"P{i},p.jpg,n"), 1, false),
                    _ => (format!("P{i},p.jpg,\"n"), 1, false),
                };
                if good { want_rows.push((format!("{}{i}", &row[..1]), line)) } else { want_rejected.push(line) }
                text.push_str(&row);
                text.push_str(eol);
                line += lines;
            }
            let reader = reader_over("dir/cat.csv", CatalogFormat::Csv, text.as_bytes(), chunk, None, MAX_ROW_BYTES)
                .unwrap();
            let parsed = collect(reader).unwrap();
            let rows: Vec<(String, usize)> = parsed.rows.iter().map(|r| (r.sku.to_string(), r.line)).collect();
            prop_assert_eq!(rows, want_rows);
            let rejected: Vec<usize> = parsed.rejected.iter().map(|r| r.line).collect();
            prop_assert_eq!(rejected, want_rejected);
        }
    }
}
