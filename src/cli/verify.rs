//! `vitrine verify --data-dir DIR`: an offline check of a data directory. It reads everything
//! the manifest names (segments with their checksums and graphs, deletion files), every SKU
//! record and its image blob, and the write-ahead log, without changing anything.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use vitrine::index::deletes::DeleteSet;
use vitrine::index::manifest::Manifest;
use vitrine::index::records::RecordStore;
use vitrine::index::store::{DataDir, sha256_hex};
use vitrine::segment::Segment;

#[derive(Args)]
pub struct VerifyArgs {
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
}

pub fn run(a: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let data = DataDir::open_reader(&a.data_dir)?;
    let manifest = Manifest::load(&a.data_dir)?;
    let mut problems = 0usize;
    let mut segments = 0usize;
    let mut report = |what: String| {
        eprintln!("{what}");
        problems += 1;
    };
    for (version, ix) in &manifest.indexes {
        for e in &ix.segments {
            segments += 1;
            let path = data.segment_path(version, e.id);
            let seg = match Segment::open(&path) {
                Ok(s) => s,
                Err(err) => {
                    report(format!("segment {} of {version}: {err}", e.id));
                    continue;
                }
            };
            if let Err(err) = seg.verify() {
                report(format!("segment {} of {version}: {err}", e.id));
            }
            if seg.len() as u64 != e.count || seg.dim() != ix.dim as usize {
                report(format!("segment {} of {version}: shape differs from the manifest", e.id));
            }
            if let Some(d) = e.deletes {
                match DeleteSet::load(&data.deletes_path(version, e.id, d.generation), seg.len()) {
                    Ok(set) if set.count() == d.count => {}
                    Ok(set) => report(format!(
                        "segment {} of {version}: deletion file holds {} bits, manifest says {}",
                        e.id,
                        set.count(),
                        d.count
                    )),
                    Err(err) => report(format!("segment {} of {version}: {err}", e.id)),
                }
            }
        }
    }
    // The record store is opened read-write by redb; it is not changed here.
    let records = RecordStore::open(&data.records_path())?;
    let mut count = 0u64;
    let mut blob_problems = Vec::new();
    records.for_each(|sku, rec| {
        count += 1;
        if let Some(sha) = &rec.image_sha256 {
            match data.read_blob(sha) {
                Ok(bytes) if sha256_hex(&bytes) == *sha => {}
                Ok(_) => blob_problems.push(format!("sku {sku}: image blob {sha} does not match its hash")),
                Err(e) => blob_problems.push(format!("sku {sku}: {e}")),
            }
        }
    })?;
    for p in blob_problems {
        report(p);
    }
    let wal_bytes: u64 = std::fs::read_dir(data.wal_dir())
        .map(|rd| rd.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0);
    println!(
        "{}: manifest generation {}, {} segments, {} records, {} bytes of log after checkpoint {}: {}",
        a.data_dir.display(),
        manifest.generation,
        segments,
        count,
        wal_bytes,
        manifest.wal_checkpoint,
        if problems == 0 { "ok".to_string() } else { format!("{problems} problems") }
    );
    Ok(if problems == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
