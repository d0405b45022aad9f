//! `vitrine demo`: ingest the bundled sample catalogue, serve it on a real socket, query it
//! through a real gRPC client, then keep serving until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::{IngestArgs, ModelArgs, client};

#[derive(Args)]
pub struct DemoArgs {
    /// Where the demo's data directory goes.
    #[arg(long, default_value = "vitrine-data/demo")]
    pub data_dir: PathBuf,
    /// The catalogue to ingest.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/catalog.jsonl"))]
    pub catalog: PathBuf,
    /// Query images to run after start-up.
    #[arg(long, default_values = [
        concat!(env!("CARGO_MANIFEST_DIR"), "/data/queries/coffee-crop-rotated.jpg"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/data/queries/motorcycle-right.jpg"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/data/queries/openmoji-1F455-on-blue.jpg"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/data/queries/openmoji-1F3B8-outline.png"),
    ])]
    pub query: Vec<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub models: ModelArgs,
    /// Stop after the queries instead of serving on.
    #[arg(long)]
    pub exit: bool,
}

pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    println!("== ingesting {} into {}", a.catalog.display(), a.data_dir.display());
    let ingest = IngestArgs {
        data_dir: Some(a.data_dir.clone()),
        addr: None,
        client: super::connect::ClientArgs::default(),
        catalog: a.catalog.clone(),
        format: None,
        model: crate::models::DEFAULT_MODEL.to_string(),
        models: a.models.clone(),
        batch_size: None,
        m: crate::segment::HnswParams::default().m,
        ef_construction: crate::segment::HnswParams::default().ef_construction,
        max_segment_items: crate::ingest::DEFAULT_MAX_SEGMENT_ITEMS,
        quiet: false,
        allow_image_root: Vec::new(),
        max_image_bytes: crate::ingest::image_file::DEFAULT_MAX_IMAGE_BYTES,
        strict: false,
    };
    let code = super::run_ingest(&ingest)?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    let registry = a.models.registry()?;
    let config = crate::server::ServeConfig::new(&a.data_dir);
    let rt = crate::server::priority::runtime(crate::server::priority::DEFAULT_IO_NICE)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("cannot listen on {} (is another server running? pass --listen)", a.listen))?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::server::serve(config, registry, listener, async move {
            let _ = stop_rx.await;
        }));
        let url = format!("http://{addr}");
        for q in &a.query {
            let args = client::SearchArgs {
                server: super::connect::ConnectArgs { addr: url.clone(), client: super::connect::ClientArgs::default() },
                image: Some(q.clone()),
                sku: None,
                k: 5,
                ef: 0,
                json: false,
                attrs: false,
                filter: vec![],
                routing_key: String::new(),
            };
            println!("\n== vitrine search --addr {url} --image {} -k 5", q.display());
            match client::search(&args).await {
                Ok(resp) => client::print_hits(&resp, false),
                Err(e) => eprintln!("query failed: {}", super::error_report(&e)),
            }
        }
        if a.exit {
            let _ = stop_tx.send(());
        } else {
            println!("\n== serving on {url}; try `cargo run --release -- search --addr {url} --image PATH` (Ctrl-C stops)");
            super::shutdown_signal().await;
            let _ = stop_tx.send(());
        }
        server.await.context("server task")??;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
