//! Fuzz target: any bytes as a JSONL and as a CSV catalogue, read to the end with
//! `CatalogReader` (rows, rejections, or a fatal error as the last item). Items come in file
//! order, and a catalogue read to its end has had every byte read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vitrine::ingest::catalog::{CatalogReader, RowError};

fuzz_target!(|data: &[u8]| {
    for name in ["catalog.jsonl", "catalog.csv"] {
        let (_dir, path) = vitrine_fuzz::temp_file(name, data);
        let Ok(mut reader) = CatalogReader::open(&path, None) else { continue };
        let mut last_line = 0;
        let mut fatal = false;
        for item in reader.by_ref() {
            let line = match item {
                Ok(row) => row.line,
                Err(RowError::Rejected(r)) => r.line,
                Err(RowError::Fatal(_)) => {
                    fatal = true;
                    continue;
                }
            };
            assert!(line >= 1 && line >= last_line, "{name}: line {line} after line {last_line}");
            last_line = line;
        }
        if !fatal {
            assert_eq!(reader.bytes_read(), reader.total_bytes(), "{name}: not read to the end");
        }
    }
});
