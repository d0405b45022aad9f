//! Command-line parsing and the subcommands; each returns an exit code or an error with context.

mod client;
mod demo;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use vitrine::ids::ModelVersion;
use vitrine::index::store::DataDir;
use vitrine::ingest::{self, IngestOptions, catalog::CatalogFormat};
use vitrine::models::{self, ModelRegistry};
use vitrine::segment::HnswParams;
use vitrine::server::{self, ServeConfig};

#[derive(Parser)]
#[command(name = "vitrine", version, about = "Search a retail catalogue by picture.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ingest a catalogue (JSONL or CSV) into a data directory.
    Ingest(IngestArgs),
    /// Serve a data directory over gRPC.
    Serve(ServeArgs),
    /// Query a running server.
    Search(client::SearchArgs),
    /// Show what a running server holds.
    Info(client::InfoArgs),
    /// Ingest the bundled sample catalogue, serve it and run a query against it.
    Demo(demo::DemoArgs),
    /// Check a data directory: manifest, every segment's checksums, catalogue and image blobs.
    Verify(VerifyArgs),
}

#[derive(Args)]
pub struct VerifyArgs {
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Folder holding model versions (models/<version>/manifest.json).
    #[arg(long, value_name = "DIR")]
    pub models: Option<PathBuf>,
}

impl ModelArgs {
    pub fn registry(&self) -> anyhow::Result<Arc<ModelRegistry>> {
        let root = self.models.clone().unwrap_or_else(models::default_models_root);
        if !root.is_dir() {
            anyhow::bail!("models folder {} does not exist (pass --models DIR)", root.display());
        }
        let device = vitrine::encoder::default_device().context("cannot pick a compute device")?;
        Ok(Arc::new(ModelRegistry::new(root, device)))
    }
}

#[derive(Args)]
pub struct IngestArgs {
    /// The data directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The catalogue file: JSONL (sku, image, attrs) or CSV (sku, image, other columns).
    #[arg(long, value_name = "FILE")]
    pub catalog: PathBuf,
    /// The catalogue's format; guessed from the extension when left out.
    #[arg(long, value_enum)]
    pub format: Option<CatalogFormat>,
    /// Model version used when the data directory has no index yet.
    #[arg(long, default_value = models::DEFAULT_MODEL)]
    pub model: String,
    #[command(flatten)]
    pub models: ModelArgs,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// HNSW graph degree (M).
    #[arg(long, default_value_t = HnswParams::default().m)]
    pub m: usize,
    /// HNSW build beam width.
    #[arg(long, default_value_t = HnswParams::default().ef_construction)]
    pub ef_construction: usize,
    /// Start a new segment after this many embedded items (bounds memory and build time).
    #[arg(long, default_value_t = ingest::DEFAULT_MAX_SEGMENT_ITEMS)]
    pub max_segment_items: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub models: ModelArgs,
    /// How often to look for a newer manifest (0 turns reloading off).
    #[arg(long, default_value_t = 2000)]
    pub reload_ms: u64,
    /// Image queries embedded at the same time.
    #[arg(long, default_value_t = 2)]
    pub max_concurrent_embeds: usize,
}

pub fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,hnsw_rs=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Ingest(a) => run_ingest(&a),
        Command::Serve(a) => run_serve(a),
        Command::Search(a) => client::run_search(a),
        Command::Info(a) => client::run_info(a),
        Command::Demo(a) => demo::run(a),
        Command::Verify(a) => run_verify(&a),
    }
}

fn run_verify(a: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let data = DataDir::open_reader(&a.data_dir)?;
    let manifest = data.load_manifest()?;
    let snapshot = vitrine::index::IndexSnapshot::open(&data, &manifest)?;
    let mut problems = 0usize;
    let mut segments = 0usize;
    for view in snapshot.models.values() {
        segments += view.segments.len();
    }
    for (version, id, e) in snapshot.verify_segments() {
        eprintln!("segment {id} of {version}: {e}");
        problems += 1;
    }
    let catalog = data.read_catalog(&manifest)?;
    for rec in catalog.values() {
        match data.read_blob(&rec.image_sha256) {
            Ok(bytes) if vitrine::index::store::sha256_hex(&bytes) == rec.image_sha256 => {}
            Ok(_) => {
                eprintln!("sku {}: image blob {} does not match its hash", rec.sku, rec.image_sha256);
                problems += 1;
            }
            Err(e) => {
                eprintln!("sku {}: {e}", rec.sku);
                problems += 1;
            }
        }
    }
    println!(
        "{}: manifest generation {}, {} segments, {} catalogue records: {}",
        a.data_dir.display(),
        manifest.generation,
        segments,
        catalog.len(),
        if problems == 0 { "ok".to_string() } else { format!("{problems} problems") }
    );
    Ok(if problems == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub fn run_ingest(a: &IngestArgs) -> anyhow::Result<ExitCode> {
    let params = HnswParams { m: a.m, ef_construction: a.ef_construction };
    let default_model = ModelVersion::new(a.model.clone()).context("--model")?;
    let registry = a.models.registry()?;
    let data = DataDir::open_writer(&a.data_dir)?;
    let opts = IngestOptions {
        format: a.format,
        batch_size: a.batch_size,
        hnsw: params,
        progress: !a.quiet,
        default_model,
        max_segment_items: a.max_segment_items,
    };
    let report = ingest::ingest(&data, &registry, &a.catalog, &opts)?;
    for r in &report.rejected {
        eprintln!("rejected {r}");
    }
    let summary: Vec<String> =
        ingest::reject_summary(&report.rejected).into_iter().map(|(k, n)| format!("{n} {k}")).collect();
    println!(
        "ingested {} of {} rows into {} in {:.1}s: {} added, {} updated, {} unchanged, {} rejected{} (manifest generation {})",
        report.accepted(),
        report.rows,
        std::fs::canonicalize(&a.data_dir).unwrap_or_else(|_| a.data_dir.clone()).display(),
        report.secs,
        report.added,
        report.updated,
        report.unchanged,
        report.rejected.len(),
        if summary.is_empty() { String::new() } else { format!(" ({})", summary.join(", ")) },
        report.generation,
    );
    if report.added + report.updated > 0 && report.embed_secs > 0.0 {
        println!(
            "embedded {} images at {:.1} images/s",
            report.added + report.updated,
            (report.added + report.updated) as f64 / report.embed_secs
        );
    }
    for (v, id, n) in &report.segments {
        println!("wrote segment {id} of {v} ({n} items)");
    }
    if report.accepted() == 0 {
        eprintln!("error: nothing could be ingested from {}", a.catalog.display());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn run_serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let registry = a.models.registry()?;
    let config = serve_config(&a.data_dir, a.reload_ms, a.max_concurrent_embeds);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("cannot listen on {}", a.listen))?;
        server::serve(config, registry, listener, shutdown_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn serve_config(data_dir: &Path, reload_ms: u64, embeds: usize) -> ServeConfig {
    ServeConfig {
        data_dir: data_dir.to_path_buf(),
        reload_interval: (reload_ms > 0).then(|| Duration::from_millis(reload_ms)),
        max_concurrent_embeds: embeds,
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
