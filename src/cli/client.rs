//! The gRPC client subcommands: `vitrine search` and `vitrine info`.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::proto::{self, SearchOptions};
use crate::server::attrs;
use anyhow::Context;
use clap::Args;

use super::connect::ConnectArgs;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("query").required(true).args(["image", "sku"])))]
pub struct SearchArgs {
    #[command(flatten)]
    pub server: ConnectArgs,
    /// Search with this image file.
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// "More like this": search with a catalogue item's stored embedding.
    #[arg(long)]
    pub sku: Option<String>,
    /// Number of hits, 1 to 1000 (the server's limit, `server::MAX_K`).
    #[arg(short, long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::server::MAX_K)))]
    pub k: u32,
    /// HNSW beam width (0: the server's default).
    #[arg(long, default_value_t = 0)]
    pub ef: u32,
    /// Print one JSON object: {"model_version": ..., "hits": [{"sku": ..., "score": ...}]}.
    #[arg(long)]
    pub json: bool,
    /// Also print each hit's catalogue attributes (an "attrs" object per hit with --json).
    #[arg(long)]
    pub attrs: bool,
    /// Only hits whose attributes pass this condition; repeat to AND several:
    /// `category=Food`, `brand=acme,globex`, `colour!=red`, `price<20`, `5<=price<20`.
    #[arg(long, value_name = "EXPR")]
    pub filter: Vec<String>,
    /// During a canary rollout, keeps this key (e.g. a shopper's session id) on one arm.
    #[arg(long, default_value = "")]
    pub routing_key: String,
}

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub server: ConnectArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs one search against the server `a.server` names and returns its answer.
pub async fn search(a: &SearchArgs) -> anyhow::Result<proto::SearchResponse> {
    for f in &a.filter {
        f.parse::<crate::index::filter::Condition>().map_err(|e| anyhow::anyhow!("--filter: {e}"))?;
    }
    let image = match &a.image {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?),
        None => None,
    };
    let conn = a.server.client.connect(&a.server.addr).await?;
    let mut client = conn.search();
    let options = Some(SearchOptions { k: a.k, ef: a.ef, filter: None, filter_exprs: a.filter.clone() });
    if let Some(image) = image {
        let req = proto::SearchByImageRequest { image, options, routing_key: a.routing_key.clone() };
        conn.call(client.search_by_image(req)).await
    } else {
        let sku = a.sku.clone().unwrap_or_default();
        let req = proto::SearchBySkuRequest { sku, options, routing_key: a.routing_key.clone() };
        conn.call(client.search_by_sku(req)).await
    }
}

pub fn to_json(resp: &proto::SearchResponse, with_attrs: bool) -> serde_json::Value {
    let hit = |h: &proto::Hit| {
        let mut o = serde_json::json!({"sku": h.sku, "score": h.score});
        if with_attrs {
            o["attrs"] = attrs::to_json(h.attrs.as_ref());
        }
        o
    };
    serde_json::json!({
        "model_version": resp.model_version,
        "hits": resp.hits.iter().map(hit).collect::<Vec<_>>(),
    })
}

pub fn print_hits(resp: &proto::SearchResponse, with_attrs: bool) {
    println!("model {}: {} hits", resp.model_version, resp.hits.len());
    println!("{:>4}  {:>7}  sku", "rank", "score");
    for (i, h) in resp.hits.iter().enumerate() {
        if with_attrs && h.attrs.is_some() {
            println!("{:>4}  {:>7.4}  {}  {}", i + 1, h.score, h.sku, attrs::to_json(h.attrs.as_ref()));
        } else {
            println!("{:>4}  {:>7.4}  {}", i + 1, h.score, h.sku);
        }
    }
}

pub fn run_search(a: SearchArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let resp = rt.block_on(search(&a))?;
    if a.json {
        println!("{}", to_json(&resp, a.attrs));
    } else {
        print_hits(&resp, a.attrs);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_info(a: InfoArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let info = rt.block_on(async {
        let conn = a.server.client.connect(&a.server.addr).await?;
        conn.call(conn.search().get_index_info(proto::GetIndexInfoRequest {})).await
    })?;
    if a.json {
        let models: Vec<_> = info
            .models
            .iter()
            .map(|m| {
                serde_json::json!({
                    "model_version": m.model_version, "architecture": m.architecture, "dim": m.dim,
                    "input_size": m.input_size, "weights_sha256": m.weights_sha256,
                    "live_items": m.live_items, "serving": m.serving,
                    "segments": m.segments.iter().map(|s| serde_json::json!({
                        "id": s.id, "count": s.count, "deleted": s.deleted, "bytes": s.bytes})).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"serving_model_version": info.serving_model_version,
                "manifest_generation": info.manifest_generation, "models": models,
                "degraded": info.degraded, "problems": info.problems})
        );
    } else {
        println!("manifest generation {}, serving {}", info.manifest_generation, info.serving_model_version);
        if info.degraded {
            println!("DEGRADED: damage found at start; writes are refused and what is damaged is left out:");
            for p in &info.problems {
                println!("  {p}");
            }
        }
        for m in &info.models {
            println!(
                "  {}{}: {} ({}-d, {} px), {} live items in {} segments, weights sha256 {}",
                m.model_version,
                if m.serving { " [serving]" } else { "" },
                m.architecture,
                m.dim,
                m.input_size,
                m.live_items,
                m.segments.len(),
                m.weights_sha256
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
