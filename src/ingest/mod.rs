//! Bulk catalogue ingestion: parse a JSONL/CSV catalogue, embed images, write segments.
