//! Immutable, memory-mapped HNSW segment files: format, writer, reader and search.
