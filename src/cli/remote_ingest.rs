//! `vitrine ingest --addr URL`: streams a catalogue to a running server, one `UpsertStream`
//! call per chunk of rows, and maps each item's status back to its catalogue line. Rows the
//! server already holds with the same image and attributes come back `unchanged` without being
//! embedded again, so re-running after an interruption resumes.

use std::process::ExitCode;
use std::time::Instant;

use crate::ingest::catalog::{CatalogReader, CatalogRow, RejectReason, Rejected};
use crate::ingest::for_each_chunk;
use crate::ingest::image_file::{ImageFileError, ImagePolicy};
use crate::ingest::progress::Progress;
use crate::proto;
use crate::server::attrs;
use anyhow::Context;
use rayon::prelude::*;

use super::IngestArgs;
use super::connect::Conn;

/// Rows per `UpsertStream` call.
const ROWS_PER_CALL: usize = 128;

#[derive(Default)]
struct Counts {
    rows: usize,
    added: u64,
    updated: u64,
    unchanged: u64,
    rejected: Vec<Rejected>,
}

pub fn run(addr: &str, a: &IngestArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut reader = CatalogReader::open(&a.catalog, a.format)?;
    let images = ImagePolicy::for_catalog(&a.catalog, &a.allow_image_root, a.max_image_bytes)
        .with_context(|| format!("image roots of {}", a.catalog.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let conn = rt.block_on(a.client.connect(addr))?;
    let mut progress = Progress::new(reader.total_bytes(), !a.quiet);
    let mut counts = Counts::default();
    let mut rejected = Vec::new();
    let mut done = 0u64;
    counts.rows = for_each_chunk(&mut reader, ROWS_PER_CALL, &mut rejected, |rows, bytes_read| {
        done += rows.len() as u64;
        send_chunk(&rt, &conn, rows, a, &images, &mut counts)?;
        progress.update(done, bytes_read);
        anyhow::Ok(())
    })?;
    counts.rejected.extend(rejected);
    progress.finish();
    counts.rejected.sort_by_key(|r| r.line);
    for r in &counts.rejected {
        eprintln!("rejected {r}");
    }
    let accepted = counts.added + counts.updated + counts.unchanged;
    println!(
        "ingested {accepted} of {} rows via {} in {:.1}s: {} added, {} updated, {} unchanged (already committed, not embedded again), {} rejected",
        counts.rows,
        conn.addr(),
        started.elapsed().as_secs_f64(),
        counts.added,
        counts.updated,
        counts.unchanged,
        counts.rejected.len()
    );
    Ok(super::ingest_exit(accepted, counts.rejected.len(), a))
}

fn send_chunk(
    rt: &tokio::runtime::Runtime,
    conn: &Conn,
    rows: Vec<CatalogRow>,
    a: &IngestArgs,
    images: &ImagePolicy,
    counts: &mut Counts,
) -> anyhow::Result<()> {
    let reject = |row: &CatalogRow, reason| Rejected {
        file: a.catalog.clone(),
        line: row.line,
        sku: Some(row.sku.to_string()),
        reason,
    };
    let read: Vec<(CatalogRow, Result<Vec<u8>, ImageFileError>)> = rows
        .into_par_iter()
        .map(|row| {
            let bytes = images.read(&row.image);
            (row, bytes)
        })
        .collect();
    let mut sent: Vec<CatalogRow> = Vec::with_capacity(read.len());
    let mut requests = Vec::with_capacity(read.len());
    for (row, bytes) in read {
        match bytes {
            Ok(bytes) => {
                let attrs_json = serde_json::to_value(&row.attrs).context("attributes serialise")?;
                let attrs = match attrs::json_to_struct(&attrs_json) {
                    Ok(attrs) => attrs,
                    Err(why) => {
                        counts.rejected.push(reject(&row, RejectReason::Malformed(why)));
                        continue;
                    }
                };
                requests.push(proto::UpsertRequest {
                    sku: row.sku.to_string(),
                    attrs: Some(attrs),
                    payload: Some(proto::upsert_request::Payload::Image(bytes)),
                });
                sent.push(row);
            }
            Err(e) => counts.rejected.push(reject(
                &row,
                RejectReason::UnreadableImage { path: row.image.clone(), error: crate::report::chain(&e) },
            )),
        }
    }
    if requests.is_empty() {
        return Ok(());
    }
    let mut client = conn.search();
    let committed = counts.added + counts.updated + counts.unchanged;
    let resp = rt
        .block_on(conn.call_streaming(requests, |stream| client.upsert_stream(stream)))
        .with_context(|| {
            format!(
                "streaming rows from line {} of {} ({committed} rows before them are committed: run the same \
             command again to resume)",
                sent[0].line,
                a.catalog.display()
            )
        })?;
    counts.added += resp.added;
    counts.updated += resp.updated;
    counts.unchanged += resp.unchanged;
    for item in resp.items {
        if item.code != 0 {
            let Some(row) = sent.get(item.index as usize) else { continue };
            counts.rejected.push(reject(
                row,
                RejectReason::UndecodableImage { path: row.image.clone(), error: item.message },
            ));
        }
    }
    Ok(())
}
