//! Command-line parsing and the subcommands; each returns an exit code or an error with context.

mod client;
pub mod config;
mod connect;
mod demo;
mod logging;
mod remote_ingest;
mod rollout;
mod verify;
mod write_client;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::encoder::DeviceChoice;
use crate::ids::ModelVersion;
use crate::index::store::StoreError;
use crate::ingest::{self, IngestOptions, catalog::CatalogFormat};
use crate::models::{self, ModelRegistry};
use crate::rollout::guardrail::GuardrailConfig;
use crate::segment::HnswParams;
use crate::server::admission::AdmissionConfig;
use crate::server::{self, ServeConfig};
use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vitrine", version, about = "Search a retail catalogue by picture.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ingest a catalogue (JSONL or CSV): stream it to a running server (--addr) or write a
    /// data directory that no server holds (--data-dir).
    Ingest(IngestArgs),
    /// Serve a data directory over gRPC.
    #[command(after_help = SERVE_SETTINGS_HELP)]
    Serve(ServeArgs),
    /// Query a running server.
    Search(client::SearchArgs),
    /// Show what a running server holds.
    Info(client::InfoArgs),
    /// Ingest the bundled sample catalogue, serve it and run a query against it.
    Demo(demo::DemoArgs),
    /// Check a data directory: manifest, segments, deletion files, records, image blobs, log.
    Verify(verify::VerifyArgs),
    /// Add or replace one catalogue item on a running server.
    Upsert(write_client::UpsertArgs),
    /// Delete catalogue items from a running server.
    Delete(write_client::DeleteArgs),
    /// Show the stored records of catalogue items.
    Get(write_client::GetArgs),
    /// Canary rollout of a new model version: start, set, promote, rollback, abort, gc, status.
    Rollout(rollout::RolloutArgs),
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Folder holding model versions (models/<version>/manifest.json).
    #[arg(long, value_name = "DIR")]
    pub models: Option<PathBuf>,
    /// Where images are encoded: cuda (GPU 0; needs a `--features cuda` build), cpu, or auto
    /// (cuda when built with it and a GPU is usable, else cpu). Logged at start.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

impl ModelArgs {
    pub fn registry(&self) -> anyhow::Result<Arc<ModelRegistry>> {
        let root = self.models.clone().unwrap_or_else(models::default_models_root);
        if !root.is_dir() {
            anyhow::bail!("models folder {} does not exist (pass --models DIR)", root.display());
        }
        let device = crate::encoder::select_device(self.device)?;
        tracing::info!(
            device = %crate::encoder::describe_device(&device),
            asked = ?self.device,
            "encoder device"
        );
        Ok(Arc::new(ModelRegistry::new(root, device)))
    }
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["data_dir", "addr"])))]
pub struct IngestArgs {
    /// Write this data directory directly (created if missing); refused while a server holds it.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Stream the catalogue to the server at this address: HOST:PORT, http://HOST:PORT or
    /// https://HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub addr: Option<String>,
    #[command(flatten)]
    pub client: connect::ClientArgs,
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
    /// Images per forward pass (default: 32 on the CPU, 128 on a GPU).
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// HNSW graph degree (M).
    #[arg(long, default_value_t = HnswParams::default().m)]
    pub m: usize,
    /// HNSW build beam width.
    #[arg(long, default_value_t = HnswParams::default().ef_construction)]
    pub ef_construction: usize,
    /// Start a new segment after this many embedded items (bounds memory and build time).
    #[arg(long, default_value_t = ingest::DEFAULT_MAX_SEGMENT_ITEMS)]
    pub max_segment_items: usize,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
    /// Let image paths resolve into this directory too (repeatable). By default an image
    /// must be a regular file inside the catalogue's own folder, after following symlinks.
    #[arg(long, value_name = "DIR")]
    pub allow_image_root: Vec<PathBuf>,
    /// Reject image files larger than this many bytes (enforced while reading).
    #[arg(long, default_value_t = crate::ingest::image_file::DEFAULT_MAX_IMAGE_BYTES)]
    pub max_image_bytes: u64,
    /// Exit with status 1 if any row was rejected (for pipelines); by default ingest fails
    /// only when no row could be ingested.
    #[arg(long)]
    pub strict: bool,
}

/// Ingest's exit status: failure when nothing was ingested, or with `--strict` when any row
/// was rejected.
pub(crate) fn ingest_exit(accepted: u64, rejected: usize, a: &IngestArgs) -> ExitCode {
    if accepted == 0 {
        eprintln!("error: nothing could be ingested from {}", a.catalog.display());
        return ExitCode::FAILURE;
    }
    if a.strict && rejected > 0 {
        eprintln!("error: {rejected} rows of {} were rejected (--strict)", a.catalog.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// How `serve` takes its settings (see src/cli/config.rs).
const SERVE_SETTINGS_HELP: &str = "Every option can also be set in a TOML config file (--config FILE; keys are the \
option names, e.g. data_dir = \"/srv/vitrine\") or with an environment variable VITRINE_<OPTION> (e.g. \
VITRINE_DATA_DIR). Flags beat environment variables, which beat the file, which beats the defaults. \
--print-config shows the effective settings.";

#[derive(Args)]
pub struct ServeArgs {
    /// Read settings from this TOML file (keys are the option names; flags and VITRINE_*
    /// environment variables override it). Also VITRINE_CONFIG.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective settings (as TOML, with where each comes from) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// The data directory served (created if missing); required.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Address to listen on: HOST:PORT, where HOST is an IP address or a name (localhost).
    #[arg(long, default_value = "127.0.0.1:50051", value_name = "HOST:PORT")]
    pub listen: String,
    /// Serve TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Bearer tokens file: one `ROLE NAME TOKEN` a line, ROLE read or write (README, Security).
    #[arg(long, value_name = "FILE", env = "VITRINE_TOKENS_FILE")]
    pub tokens: Option<PathBuf>,
    /// With --tokens, let calls without a token search and read (writes still need one).
    #[arg(long)]
    pub allow_anonymous_read: bool,
    /// Serve a non-loopback address without tokens: anyone who reaches it may write.
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub models: ModelArgs,
    /// Model version indexed when the data directory has none yet.
    #[arg(long, default_value = models::DEFAULT_MODEL)]
    pub model: String,
    /// Image queries (and upsert batches) embedded at the same time (default: 1 on the CPU,
    /// where one embedding uses every core; 64 on a GPU, which batches them).
    #[arg(long, value_name = "N")]
    pub max_concurrent_embeds: Option<usize>,
    /// Most image queries embedded in one forward pass (default: 32 on a GPU; 1, no batching,
    /// on the CPU).
    #[arg(long, value_name = "N")]
    pub query_batch: Option<usize>,
    /// Longest the first image query of a batch waits for others, in microseconds.
    #[arg(long, value_name = "US", default_value_t = 2000)]
    pub query_batch_wait_us: u64,
    /// Vector and SKU searches run at the same time (default: one per core).
    #[arg(long, default_value_t = AdmissionConfig::default().search.running)]
    pub max_concurrent_searches: usize,
    /// Write requests (upserts, upsert streams, deletes) handled at the same time.
    #[arg(long, default_value_t = AdmissionConfig::default().write.running)]
    pub max_concurrent_writes: usize,
    /// Longest a request waits for a slot of its kind before it is shed with
    /// RESOURCE_EXHAUSTED (queues are bounded too: as many embeds as run at once, 64
    /// searches, 1024 writes; and a query is shed at once when it would wait longer than
    /// about one mean service time of its kind, or 1 ms if that is longer).
    #[arg(long, default_value_t = AdmissionConfig::default().max_wait.as_millis() as u64)]
    pub admission_wait_ms: u64,
    /// Steps of `nice` the threads that move requests and writes run below the searches
    /// (Linux; 0 turns it off): competing for a core, a search gets about three times their
    /// share at 5.
    #[arg(long, value_name = "STEPS", default_value_t = server::priority::DEFAULT_IO_NICE,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    pub io_nice: i32,
    /// Seal the in-memory segment into an HNSW segment once it holds this many items.
    #[arg(long, default_value_t = crate::index::writer::DEFAULT_SEAL_ITEMS)]
    pub seal_items: usize,
    /// Merge a model version's segments when it has more than this many.
    #[arg(long, default_value_t = crate::index::merge_policy::MergePolicy::default().max_segments)]
    pub max_segments: usize,
    /// Full in-memory segments waiting to be sealed before writes slow down (each group of
    /// writes waits 1 ms, doubling per further segment); at or above --max-pending-seals off.
    #[arg(long, default_value_t = crate::index::WriterConfig::default().slowdown_pending_seals)]
    pub slowdown_pending_seals: usize,
    /// Full in-memory segments waiting to be sealed before writes wait for the sealer.
    #[arg(long, default_value_t = crate::index::WriterConfig::default().max_pending_seals)]
    pub max_pending_seals: usize,
    /// Canary guardrail: take the canary out of traffic when more than this share of its
    /// requests fail over the window.
    #[arg(long, value_name = "SHARE", default_value_t = GuardrailConfig::default().max_canary_error_rate)]
    pub guardrail_max_error_rate: f64,
    /// Canary guardrail: ...or when its p99 latency exceeds this multiple of the champion's.
    #[arg(long, value_name = "RATIO", default_value_t = GuardrailConfig::default().max_p99_ratio)]
    pub guardrail_max_p99_ratio: f64,
    /// Canary guardrail: ...or when the mean top-k Jaccard overlap of shadowed queries falls
    /// below this (0 turns it off; a different model legitimately ranks differently, so set it
    /// from a shadow run's `mean_jaccard`).
    #[arg(long, value_name = "SHARE", default_value_t = GuardrailConfig::default().min_shadow_overlap)]
    pub guardrail_min_shadow_overlap: f64,
    /// Canary guardrail: the sliding window the limits are judged over, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = GuardrailConfig::default().window_ms / 1000)]
    pub guardrail_window_secs: u64,
    /// Canary guardrail: fewest canary requests in the window before the error rate and p99
    /// limits are judged (the overlap needs 20 shadowed queries).
    #[arg(long, value_name = "N", default_value_t = GuardrailConfig::default().min_requests)]
    pub guardrail_min_requests: u64,
    /// Most connections open at once; more are closed as soon as they are accepted.
    #[arg(long, default_value_t = server::conn::ConnLimits::default().max_connections)]
    pub max_connections: usize,
    /// Close a connection that sends nothing for this many seconds (clients reconnect).
    #[arg(long, default_value_t = server::conn::ConnLimits::default().idle_timeout.as_secs())]
    pub idle_timeout_secs: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (off when not given).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Log line format on stderr (one JSON object per line with `json`).
    #[arg(long, value_enum, default_value_t = logging::LogFormat::Text)]
    pub log_format: logging::LogFormat,
}

/// The `serve` subcommand's own command (its arguments without the binary and subcommand).
pub fn serve_command() -> clap::Command {
    ServeArgs::augment_args(clap::Command::new("vitrine serve").no_binary_name(true))
}

/// `vitrine serve`: settings from `argv` (the arguments after `serve`), the environment and
/// the config file; then --print-config or the server.
fn serve_main(argv: Vec<std::ffi::OsString>) -> anyhow::Result<ExitCode> {
    let cmd = serve_command();
    // --print-config shows what is missing instead of failing on it.
    let print =
        config::lenient(cmd.clone()).try_get_matches_from(&argv).is_ok_and(|m| m.get_flag("print_config"));
    let checked = if print { config::lenient(cmd.clone()) } else { cmd.clone() };
    let read = |p: &std::path::Path| std::fs::read_to_string(p);
    let resolved = match config::resolve(&checked, &argv, &|k| std::env::var_os(k), &read) {
        Err(config::ConfigError::Cli(e)) => e.exit(),
        r => r?,
    };
    let origin = |id: &str| match resolved.sources.get(id) {
        Some(config::Source::File) => format!(
            "key `{id}` in config file {}",
            resolved.config_file.as_deref().unwrap_or(std::path::Path::new("?")).display()
        ),
        Some(config::Source::Env(var)) => var.clone(),
        Some(config::Source::Flag) => format!("--{}", id.replace('_', "-")),
        _ => "the default".to_string(),
    };
    if print {
        print!("{}", config::render(&cmd, &resolved));
        // The same checks `serve` makes before it opens anything: settings it would refuse
        // are not reported as fine.
        let refused = match ServeArgs::from_arg_matches(&resolved.matches) {
            Err(e) => Some(e.to_string().trim().trim_start_matches("error: ").to_string()),
            Ok(args) => serve_config(
                &args,
                false,
                crate::server::batcher::BatchPolicy::for_device(&candle_core::Device::Cpu),
                &origin,
            )
            .err()
            .map(|e| format!("{e:#}")),
        };
        if let Some(why) = refused {
            eprintln!("error: `vitrine serve` would refuse these settings: {why}");
            return Ok(ExitCode::FAILURE);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let args = ServeArgs::from_arg_matches(&resolved.matches).unwrap_or_else(|e| e.exit());
    logging::init(args.log_format);
    if let Some(p) = &resolved.config_file {
        tracing::info!(config = %p.display(), "settings read");
    }
    run_serve(args, &origin)
}

pub fn run() -> anyhow::Result<ExitCode> {
    // `serve` may take its required settings from a file or the environment: its arguments
    // are only checked here, and resolved by `serve_main`.
    let matches = Cli::command().mut_subcommand("serve", config::lenient).get_matches();
    if let Some(("serve", _)) = matches.subcommand() {
        // `vitrine serve ARGS...`: the top-level command has no options of its own.
        return serve_main(std::env::args_os().skip(2).collect());
    }
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    logging::init(logging::LogFormat::Text);
    match cli.command {
        Command::Ingest(a) => run_ingest(&a),
        Command::Serve(_) => unreachable!("serve is dispatched before the other commands"),
        Command::Search(a) => client::run_search(a),
        Command::Info(a) => client::run_info(a),
        Command::Demo(a) => demo::run(a),
        Command::Verify(a) => verify::run(&a),
        Command::Upsert(a) => write_client::run_upsert(a),
        Command::Delete(a) => write_client::run_delete(a),
        Command::Get(a) => write_client::run_get(a),
        Command::Rollout(a) => rollout::run(a),
    }
}

pub fn run_ingest(a: &IngestArgs) -> anyhow::Result<ExitCode> {
    if let Some(addr) = &a.addr {
        return remote_ingest::run(addr, a);
    }
    let data_dir = a.data_dir.clone().context("--data-dir or --addr is required")?;
    let params = HnswParams { m: a.m, ef_construction: a.ef_construction };
    let default_model = ModelVersion::new(a.model.clone()).context("--model")?;
    let registry = a.models.registry()?;
    let opts = IngestOptions {
        format: a.format,
        batch_size: a.batch_size.unwrap_or_else(|| crate::encoder::default_batch(registry.device())),
        hnsw: params,
        progress: !a.quiet,
        default_model,
        max_segment_items: a.max_segment_items,
        image_roots: a.allow_image_root.clone(),
        max_image_bytes: a.max_image_bytes,
    };
    let report = match ingest::ingest(&data_dir, &registry, &a.catalog, &opts) {
        Err(ingest::IngestError::Writer(crate::index::WriterError::Store(StoreError::Locked {
            path,
            holder,
        }))) => {
            anyhow::bail!(
                "data directory {} is held by {holder}; {}",
                path.display(),
                locked_hint(&holder, &a.catalog)
            )
        }
        r => r?,
    };
    for r in &report.rejected {
        eprintln!("rejected {r}");
    }
    let summary: Vec<String> =
        ingest::reject_summary(&report.rejected).into_iter().map(|(k, n)| format!("{n} {k}")).collect();
    println!(
        "ingested {} of {} rows into {} in {:.1}s: {} added, {} updated, {} unchanged (already committed, not embedded again), {} rejected{} (manifest generation {})",
        report.accepted(),
        report.rows,
        std::fs::canonicalize(&data_dir).unwrap_or_else(|_| data_dir.clone()).display(),
        report.secs,
        report.added,
        report.updated,
        report.unchanged,
        report.rejected.len(),
        if summary.is_empty() { String::new() } else { format!(" ({})", summary.join(", ")) },
        report.generation,
    );
    if report.embedded > 0 && report.embed_secs > 0.0 {
        println!(
            "embedded {} images at {:.1} images/s",
            report.embedded,
            report.embedded as f64 / report.embed_secs
        );
    }
    if report.replayed > 0 {
        println!("recovered {} logged writes of an interrupted run", report.replayed);
    }
    Ok(ingest_exit(report.accepted() as u64, report.rejected.len(), a))
}

fn run_serve(a: ServeArgs, origin: &dyn Fn(&str) -> String) -> anyhow::Result<ExitCode> {
    let registry = a.models.registry()?;
    let gpu = !registry.device().is_cpu();
    let batch = crate::server::batcher::BatchPolicy::for_device(registry.device());
    let config = serve_config(&a, gpu, batch, origin)?;
    let rt = server::priority::runtime(a.io_nice)?;
    rt.block_on(async move {
        let listener =
            bind(&a.listen).await.with_context(|| format!("listen address ({})", origin("listen")))?;
        let metrics = match a.metrics_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {addr} (--metrics-listen)"))?,
            ),
            None => None,
        };
        server::serve_with_metrics(config, registry, listener, metrics, shutdown_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Every check `serve` makes of its settings before it opens anything (so `--print-config`
/// makes them too), and the server configuration they give. `gpu` and `batch` are the
/// device's defaults; `origin` names where a setting came from, for errors.
fn serve_config(
    a: &ServeArgs,
    gpu: bool,
    mut batch: crate::server::batcher::BatchPolicy,
    origin: &dyn Fn(&str) -> String,
) -> anyhow::Result<ServeConfig> {
    check_listen(&a.listen).with_context(|| format!("listen address ({})", origin("listen")))?;
    let mut config = ServeConfig::new(&a.data_dir);
    config.default_model = ModelVersion::new(a.model.clone()).context("--model")?;
    let embeds =
        a.max_concurrent_embeds.unwrap_or(if gpu { 64 } else { AdmissionConfig::default().embed.running });
    // The embed queue is as deep as the slots (see AdmissionConfig::default).
    config.admission.embed = crate::server::admission::Limit { running: embeds, queued: embeds };
    if let Some(n) = a.query_batch {
        if n == 0 {
            anyhow::bail!("--query-batch must be at least 1 (1 turns batching off)");
        }
        batch.max_batch = n;
    }
    batch.max_wait = std::time::Duration::from_micros(a.query_batch_wait_us);
    config.query_batch = Some(batch);
    config.admission.search.running = a.max_concurrent_searches;
    config.admission.write.running = a.max_concurrent_writes;
    config.admission.max_wait = std::time::Duration::from_millis(a.admission_wait_ms);
    config
        .admission
        .validate()
        .map_err(|e| anyhow::anyhow!("admission limits (--max-concurrent-embeds/-searches/-writes): {e}"))?;
    if a.seal_items == 0 || a.max_segments == 0 || a.max_pending_seals == 0 {
        anyhow::bail!("--seal-items, --max-segments and --max-pending-seals must be at least 1");
    }
    config.writer.seal_items = a.seal_items;
    config.writer.merge.max_segments = a.max_segments;
    config.writer.slowdown_pending_seals = a.slowdown_pending_seals;
    config.writer.max_pending_seals = a.max_pending_seals;
    config.guardrail = GuardrailConfig {
        window_ms: a.guardrail_window_secs.saturating_mul(1000),
        min_requests: a.guardrail_min_requests,
        max_canary_error_rate: a.guardrail_max_error_rate,
        max_p99_ratio: a.guardrail_max_p99_ratio,
        min_shadow_overlap: a.guardrail_min_shadow_overlap,
        ..GuardrailConfig::default()
    };
    config.guardrail.validate().context("canary guardrail settings (--guardrail-*)")?;
    // Checked here, not by clap, so that either may come from the config file or environment.
    config.tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some(server::TlsFiles { cert: cert.clone(), key: key.clone() }),
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key (tls_cert, tls_key) must be given together"),
    };
    if a.allow_anonymous_read && a.tokens.is_none() {
        anyhow::bail!("--allow-anonymous-read needs --tokens (without tokens every call is allowed already)");
    }
    let tokens = match &a.tokens {
        Some(path) => server::auth::Tokens::load(path)?,
        None => server::auth::Tokens::default(),
    };
    config.auth = Arc::new(server::auth::AuthPolicy { tokens, allow_anonymous_read: a.allow_anonymous_read });
    config.insecure = a.insecure;
    config.connections.max_connections = a.max_connections;
    config.connections.idle_timeout = std::time::Duration::from_secs(a.idle_timeout_secs);
    config
        .connections
        .validate()
        .map_err(|e| anyhow::anyhow!("--max-connections / --idle-timeout-secs: {e}"))?;
    Ok(config)
}

/// Checks that `listen` has the form HOST:PORT (a bracketed IPv6 address, an IP address or a
/// name), without resolving the name.
fn check_listen(listen: &str) -> anyhow::Result<()> {
    let shown: String = listen.chars().take(200).collect();
    let Some((host, port)) = listen.rsplit_once(':') else {
        anyhow::bail!("{shown:?} is not HOST:PORT (for example 127.0.0.1:50051 or [::1]:50051)");
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        anyhow::bail!("{shown:?} is not HOST:PORT with a port from 0 to 65535");
    }
    Ok(())
}

/// Listens on `HOST:PORT`, resolving a host name (the first of its addresses that binds).
pub async fn bind(listen: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let shown: String = listen.chars().take(200).collect();
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(listen)
        .await
        .with_context(|| format!("--listen {shown:?} is not HOST:PORT or does not resolve"))?
        .collect();
    let mut last = None;
    for addr in &addrs {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(anyhow::Error::new(e).context(format!("cannot listen on {addr}"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("--listen {shown:?} resolves to no address")))
}

/// An error and its causes on one line, each cause once (see [`crate::report::Chain`]).
pub fn error_report(e: &anyhow::Error) -> String {
    crate::report::chain(e.as_ref())
}

/// Resolves on Ctrl-C or SIGTERM. SIGHUP (a closed terminal, or an operator expecting a
/// reload) is logged and ignored: settings are read at start, and it used to kill the server
/// at once, with no drain.
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
    #[cfg(unix)]
    let hup = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut s) => {
                while s.recv().await.is_some() {
                    tracing::warn!(
                        "SIGHUP ignored: settings are read at start (restart to change them); SIGTERM or Ctrl-C stops"
                    );
                }
                std::future::pending::<()>().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let hup = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
        _ = hup => {},
    }
}

/// What to do about a data directory another process holds: stream to the server that holds
/// it (its address is in the lock file), or wait for the other writer.
fn locked_hint(holder: &str, catalog: &std::path::Path) -> String {
    let addr = holder.split_once("listening on ").map(|(_, rest)| rest.trim_end_matches(')').trim());
    match addr {
        Some(addr) => format!(
            "stream the catalogue to that server with `vitrine ingest --addr {addr} --catalog {}`",
            catalog.display()
        ),
        None => "let it finish (or stop it) and run this again".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hint_names_the_holding_server_or_says_to_wait() {
        let cat = std::path::Path::new("cat.csv");
        let h = locked_hint("vitrine serve (pid 7, listening on 127.0.0.1:50051)", cat);
        assert_eq!(
            h,
            "stream the catalogue to that server with `vitrine ingest --addr 127.0.0.1:50051 --catalog cat.csv`"
        );
        assert_eq!(
            locked_hint("vitrine ingest (pid 9)", cat),
            "let it finish (or stop it) and run this again"
        );
    }

    #[test]
    fn error_report_prints_each_cause_once() {
        let io = std::io::Error::other("connection refused");
        let e =
            anyhow::Error::new(io).context("tcp connect error: connection refused").context("cannot connect");
        assert_eq!(error_report(&e), "cannot connect: tcp connect error: connection refused");
        let e = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(error_report(&e), "outer: middle: inner");
    }

    #[tokio::test]
    async fn listen_takes_host_names() {
        let l = bind("localhost:0").await.unwrap();
        assert!(l.local_addr().unwrap().ip().is_loopback());
        assert!(bind("no-port").await.is_err());
    }
}
