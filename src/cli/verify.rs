//! `vitrine verify --data-dir DIR`: an offline check of a data directory. It reads everything
//! the manifest names (segments with their checksums and graphs, deletion files), every SKU
//! record and its image blob, and the write-ahead log, without changing anything.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::index::deletes::DeleteSet;
use crate::index::entry::Change;
use crate::index::manifest::Manifest;
use crate::index::records::RecordStore;
use crate::index::store::{DataDir, check_layout, sha256_hex};
use crate::index::wal::Wal;
use crate::report::Chain;
use crate::segment::Segment;
use anyhow::Context;
use clap::Args;

#[derive(Args)]
pub struct VerifyArgs {
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Also re-embed up to N stored images per model version with the encoder that version
    /// names now and compare with the stored vectors (training/serving skew check).
    #[arg(long, value_name = "N")]
    pub skew: Option<usize>,
    /// Largest cosine distance between a stored vector and a re-embedding that passes.
    #[arg(long, default_value_t = 1e-3)]
    pub skew_threshold: f64,
    #[command(flatten)]
    pub models: super::ModelArgs,
}

pub fn run(a: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let data = DataDir::open_reader(&a.data_dir)?;
    if let Some(holder) = DataDir::held_by(&a.data_dir) {
        // Its record store and log are open for writing there; what is on disk is in motion.
        anyhow::bail!(
            "data directory {} is held by {holder}: stop it to verify the directory (a running server \
             checks its segments on start and reports through `vitrine info`)",
            a.data_dir.display()
        );
    }
    if !Manifest::path(&a.data_dir).exists() {
        // Without a manifest nothing in the folder is live: say whether data was lost.
        match check_layout(&a.data_dir) {
            Err(e) => eprintln!("{}", Chain(&e)),
            Ok(()) => eprintln!("{}: no MANIFEST.json: not a vitrine data directory", a.data_dir.display()),
        }
        return Ok(ExitCode::FAILURE);
    }
    let manifest = Manifest::load(&a.data_dir)?;
    let mut problems = 0usize;
    let mut segments = 0usize;
    let mut report = |what: String| {
        eprintln!("{what}");
        problems += 1;
    };
    if let Err(e) = weights_match(a, &manifest) {
        report(format!("{e:#}"));
    }
    for (version, ix) in &manifest.indexes {
        for e in &ix.segments {
            segments += 1;
            let path = data.segment_path(version, e.id);
            let seg = match Segment::open(&path) {
                Ok(s) => s,
                Err(err) => {
                    report(format!("segment {} of {version}: {}", e.id, Chain(&err)));
                    continue;
                }
            };
            if let Err(err) = seg.verify() {
                report(format!("segment {} of {version}: {}", e.id, Chain(&err)));
            }
            if seg.len() as u64 != e.count || seg.dim() != ix.dim as usize || seg.file_len() != e.bytes {
                report(format!(
                    "segment {} of {version}: the manifest says {} items of dimension {} in {} bytes, the file holds {} of dimension {} in {} bytes",
                    e.id,
                    e.count,
                    ix.dim,
                    e.bytes,
                    seg.len(),
                    seg.dim(),
                    seg.file_len()
                ));
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
                    Err(err) => report(format!("segment {} of {version}: {}", e.id, Chain(&err))),
                }
            }
        }
    }
    // The record store is opened read-write by redb; it is not changed here.
    let records = RecordStore::open(&data.records_path())?;
    let mut count = 0u64;
    let mut blob_problems = Vec::new();
    let mut damaged = Vec::new();
    records.for_each_checked(
        |sku, rec| {
            count += 1;
            if let Some(sha) = &rec.image_sha256 {
                match data.read_blob(sha) {
                    Ok(bytes) if sha256_hex(&bytes) == *sha => {}
                    Ok(_) => {
                        blob_problems.push(format!("sku {sku}: image blob {sha} does not match its hash"))
                    }
                    Err(e) => blob_problems.push(format!("sku {sku}: {}", Chain(&e))),
                }
            }
        },
        |e| damaged.push(Chain(&e).to_string()),
    )?;
    blob_problems.extend(damaged);
    for p in blob_problems {
        report(p);
    }
    // The log as a start would replay it: a torn tail is what a crash leaves (a start drops
    // it), damage before valid frames stops a start.
    let log = match Wal::check(&data.wal_dir(), manifest.wal_checkpoint) {
        Ok(replayed) => {
            for (seq, bytes) in &replayed.records {
                if let Err(e) = Change::decode(bytes) {
                    report(format!("write-ahead log record {seq} cannot be replayed: {}", Chain(&e)));
                }
            }
            let torn = match replayed.dropped_tail_bytes {
                0 => String::new(),
                n => format!(" (and a torn write of {n} bytes at its end, which a start drops)"),
            };
            format!(
                "{} log records after checkpoint {}{torn}",
                replayed.records.len(),
                manifest.wal_checkpoint
            )
        }
        Err(e) => {
            report(format!("{}: a server would not start", Chain(&e)));
            format!("log after checkpoint {} unreadable", manifest.wal_checkpoint)
        }
    };
    if let Some(n) = a.skew {
        problems += skew(a, &data, &manifest, &records, n)?;
    }
    println!(
        "{}: manifest generation {}, {} segments, {} SKU records as of the checkpoint, {log}: {}",
        a.data_dir.display(),
        manifest.generation,
        segments,
        count,
        if problems == 0 { "ok".to_string() } else { format!("{problems} problems") }
    );
    Ok(if problems == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Checks that every model version's recorded weights hash and dimension are those of the
/// model a server would load for it (a mismatched version is not served).
fn weights_match(a: &VerifyArgs, manifest: &Manifest) -> anyhow::Result<()> {
    if manifest.indexes.is_empty() {
        return Ok(());
    }
    let registry = a.models.registry()?;
    let wrong: Vec<String> = manifest
        .indexes
        .iter()
        .filter_map(|(version, ix)| registry.index_mismatch(version, ix.dim as usize, &ix.weights_sha256))
        .map(|why| format!("{why}: it would not be served"))
        .collect();
    if wrong.is_empty() { Ok(()) } else { anyhow::bail!(wrong.join("\n")) }
}

/// Re-embeds up to `n` stored images per model version and reports the largest cosine
/// distance to the stored vectors; returns the number of versions beyond the threshold.
/// Only vectors in sealed segments are compared (a running server's log tail is not read).
fn skew(
    a: &VerifyArgs,
    data: &DataDir,
    manifest: &Manifest,
    records: &RecordStore,
    n: usize,
) -> anyhow::Result<usize> {
    let registry = a.models.registry()?;
    let mut sample = Vec::new();
    records.for_each(|sku, rec| {
        if let Some(sha) = &rec.image_sha256 {
            sample.push((sku.clone(), sha.clone()));
        }
    })?;
    let mut bad = 0;
    for (version, ix) in &manifest.indexes {
        let enc = registry.get(version).with_context(|| format!("cannot load model {version}"))?;
        let mut segments = Vec::new();
        for e in ix.segments.iter().rev() {
            let seg = Segment::open(&data.segment_path(version, e.id))?;
            let deleted = match e.deletes {
                Some(d) => DeleteSet::load(&data.deletes_path(version, e.id, d.generation), seg.len())?,
                None => DeleteSet::new(seg.len()),
            };
            segments.push((seg, deleted));
        }
        let (mut compared, mut worst, mut worst_sku) = (0usize, 0f64, String::new());
        for (sku, sha) in &sample {
            if compared >= n {
                break;
            }
            let stored = segments.iter().find_map(|(seg, del)| {
                seg.find_sku(sku.as_str()).filter(|&p| !del.contains(p)).map(|p| seg.vector(p).to_vec())
            });
            let Some(stored) = stored else { continue };
            let bytes = data.read_blob(sha)?;
            let prepared = enc.preprocess(&bytes)?;
            let v = enc.embed_one(&prepared)?;
            let distance = 1.0 - f64::from(crate::segment::dot(&stored, &v));
            compared += 1;
            if distance > worst {
                worst = distance;
                worst_sku = sku.to_string();
            }
        }
        let ok = worst <= a.skew_threshold;
        println!(
            "skew {version}: {compared} stored images re-embedded, largest cosine distance {worst:.2e}{} ({})",
            if worst_sku.is_empty() { String::new() } else { format!(" (sku {worst_sku})") },
            if ok {
                "ok"
            } else {
                "BEYOND the threshold: the index was built with other weights or preprocessing"
            }
        );
        if !ok {
            bad += 1;
        }
    }
    Ok(bad)
}
