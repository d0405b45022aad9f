//! `vitrine rollout ...`: start, steer and finish a canary rollout on a running server.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::proto;
use anyhow::Context;
use clap::{Args, Subcommand};

use super::connect::ConnectArgs;

#[derive(Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub command: RolloutCommand,
}

/// The server a rollout command talks to.
pub type Addr = ConnectArgs;

#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Add a model version's index, backfill it from the stored images, then gate it.
    Start(StartArgs),
    /// Change the canary's share of image and SKU queries.
    Set {
        #[command(flatten)]
        addr: Addr,
        #[arg(long)]
        fraction: f64,
    },
    /// Make the challenger the serving version. Refused while the challenger lacks SKUs the
    /// champion serves (upserted as vectors only, or whose image could not be embedded).
    Promote(PromoteArgs),
    /// After a promotion, make the previous champion serve again.
    Rollback(Addr),
    /// Drop the challenger before promotion.
    Abort(Addr),
    /// Drop the version that lost (old champion after promote, challenger after rollback).
    Gc(Addr),
    /// Show the rollout's state.
    Status {
        #[command(flatten)]
        addr: Addr,
        /// One JSON object: state, champion, challenger, fraction, backfill, gate, shadow, guardrail.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct PromoteArgs {
    #[command(flatten)]
    pub addr: Addr,
    /// Promote even though the challenger lacks SKUs the champion serves: they leave search.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub addr: Addr,
    /// The model version to roll out (a folder under the server's models/).
    #[arg(long)]
    pub model: String,
    /// Share of image and SKU queries the canary answers once gated.
    #[arg(long, default_value_t = 0.05)]
    pub fraction: f64,
    /// Share of queries also run on the other arm for comparison.
    #[arg(long, default_value_t = 0.2)]
    pub shadow: f64,
    /// Golden set for the gate (required): JSONL of {"image": PATH (relative to the file),
    /// "expected": [SKU, ...]}.
    #[arg(long, value_name = "FILE", required = true)]
    pub golden: Option<PathBuf>,
    /// Largest drop in recall@10 on the golden set the gate accepts.
    #[arg(long, default_value_t = 0.01)]
    pub tolerance: f64,
    /// Serve the challenger even if the gate refuses it.
    #[arg(long)]
    pub force: bool,
    /// Pause between backfill batches, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub backfill_throttle_ms: u32,
}

/// Reads a golden set file; errors name the file and line.
pub fn read_golden(path: &Path) -> anyhow::Result<Vec<proto::GoldenQuery>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let at = || format!("{}:{line_no}", path.display());
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let image = v["image"].as_str().with_context(|| format!("{}: \"image\" must be a path", at()))?;
        let expected: Vec<String> = v["expected"]
            .as_array()
            .with_context(|| format!("{}: \"expected\" must be a list of SKUs", at()))?
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).with_context(|| format!("{}: SKUs must be strings", at()))
            })
            .collect::<anyhow::Result<_>>()?;
        if expected.is_empty() {
            anyhow::bail!("{}: \"expected\" is empty", at());
        }
        let image_path = base.join(image);
        let bytes = std::fs::read(&image_path)
            .with_context(|| format!("{}: cannot read {}", at(), image_path.display()))?;
        out.push(proto::GoldenQuery { image: bytes, expected, name: image.to_string() });
    }
    if out.is_empty() {
        anyhow::bail!("{}: no golden queries", path.display());
    }
    Ok(out)
}

pub fn status_json(s: &proto::RolloutStatus) -> serde_json::Value {
    let b = s.backfill.unwrap_or_default();
    let g = s.gate.unwrap_or_default();
    let arm_gate = |a: &Option<proto::ArmGate>| {
        a.as_ref()
            .map(|a| serde_json::json!({"queries": a.queries, "recall_at_10": a.recall_at_10, "mrr": a.mrr}))
    };
    let sh = s.shadow.unwrap_or_default();
    let arm_live = |a: &Option<proto::ArmLive>| {
        a.as_ref().map(|a| {
            serde_json::json!({"requests": a.requests, "errors": a.errors, "p50_ms": a.p50_ms, "p99_ms": a.p99_ms})
        })
    };
    let gr = s.guardrail.clone().unwrap_or_default();
    serde_json::json!({
        "state": s.state,
        "champion": s.champion,
        "challenger": s.challenger,
        "serving": s.serving,
        "fraction": s.fraction,
        "retired": s.retired,
        "collected": s.collected,
        "backfill": {"done": b.done, "total": b.total, "images_per_second": b.images_per_second,
            "eta_seconds": b.eta_seconds, "embedded": b.embedded, "without_image": b.without_image,
            "failed": b.failed},
        "gate": {"evaluated": g.evaluated, "passed": g.passed, "forced": g.forced,
            "champion": arm_gate(&g.champion), "challenger": arm_gate(&g.challenger)},
        "shadow": {"fraction": sh.shadow_fraction, "compared": sh.compared, "mean_jaccard": sh.mean_jaccard,
            "mean_rbo": sh.mean_rbo, "champion": arm_live(&sh.champion), "canary": arm_live(&sh.canary),
            "window_seconds": sh.window_seconds},
        "guardrail": {"tripped": gr.tripped, "limit": gr.limit, "reason": gr.reason, "at_unix_ms": gr.at_unix_ms,
            "max_canary_error_rate": gr.max_canary_error_rate, "max_p99_ratio": gr.max_p99_ratio,
            "min_shadow_overlap": gr.min_shadow_overlap},
    })
}

fn print_status(s: &proto::RolloutStatus) {
    println!("rollout: {}  (serving {})", s.state, s.serving);
    if s.state == "none" {
        return;
    }
    println!("  champion {}  challenger {}  canary fraction {}", s.champion, s.challenger, s.fraction);
    if let Some(b) = &s.backfill {
        println!(
            "  backfill {}/{} ({:.1} images/s, ETA {:.0} s, {} embedded by this server)",
            b.done, b.total, b.images_per_second, b.eta_seconds, b.embedded
        );
        if b.without_image > 0 || b.failed > 0 {
            println!(
                "  the challenger lacks {} SKU(s) without a stored image (vectors only) and {} whose image \
                 could not be embedded: a promotion refuses without --force",
                b.without_image, b.failed
            );
        }
    }
    if let Some(g) = s.gate.as_ref().filter(|g| g.evaluated) {
        let f = |a: &Option<proto::ArmGate>| {
            a.as_ref().map_or("-".to_string(), |a| {
                format!("recall@10 {:.3}, MRR {:.3} ({} queries)", a.recall_at_10, a.mrr, a.queries)
            })
        };
        println!(
            "  gate: {}{}",
            if g.passed { "passed" } else { "refused" },
            if g.forced { " (forced)" } else { "" }
        );
        println!("    champion   {}", f(&g.champion));
        println!("    challenger {}", f(&g.challenger));
    }
    if let Some(sh) = &s.shadow {
        println!(
            "  shadow {} of queries: {} compared, Jaccard {:.3}, RBO {:.3}",
            sh.shadow_fraction, sh.compared, sh.mean_jaccard, sh.mean_rbo
        );
        for (name, a) in [("champion", &sh.champion), ("canary", &sh.canary)] {
            if let Some(a) = a {
                println!(
                    "    {name:<9} {} requests, {} errors, p50 {:.2} ms, p99 {:.2} ms",
                    a.requests, a.errors, a.p50_ms, a.p99_ms
                );
            }
        }
    }
    if let Some(g) = s.guardrail.as_ref().filter(|g| g.tripped) {
        println!("  guardrail tripped ({}): {}", g.limit, g.reason);
    }
    if !s.retired.is_empty() {
        println!(
            "  retired champion {} (still written to until gc){}",
            s.retired,
            if s.collected { ", collected" } else { "" }
        );
    }
}

pub fn run(a: RolloutArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (server, json) = match &a.command {
        RolloutCommand::Start(s) => (s.addr.clone(), false),
        RolloutCommand::Promote(p) => (p.addr.clone(), false),
        RolloutCommand::Set { addr, .. }
        | RolloutCommand::Rollback(addr)
        | RolloutCommand::Abort(addr)
        | RolloutCommand::Gc(addr) => (addr.clone(), false),
        RolloutCommand::Status { addr, json } => (addr.clone(), *json),
    };
    let golden = match &a.command {
        RolloutCommand::Start(StartArgs { golden: Some(p), .. }) => read_golden(p)?,
        _ => vec![],
    };
    let status = rt.block_on(async {
        let conn = server.client.connect(&server.addr).await?;
        let mut c = conn.rollouts().max_encoding_message_size(crate::server::MAX_GOLDEN_BYTES);
        let action = proto::RolloutActionRequest::default();
        match a.command {
            RolloutCommand::Start(s) => {
                conn.call(c.start(proto::RolloutStartRequest {
                    model_version: s.model,
                    fraction: Some(s.fraction),
                    shadow: Some(s.shadow),
                    tolerance: Some(s.tolerance),
                    force: s.force,
                    golden,
                    backfill_throttle_ms: s.backfill_throttle_ms,
                }))
                .await
            }
            RolloutCommand::Set { fraction, .. } => {
                conn.call(c.set(proto::RolloutSetRequest { fraction })).await
            }
            RolloutCommand::Promote(p) => {
                conn.call(c.promote(proto::RolloutActionRequest { force: p.force })).await
            }
            RolloutCommand::Rollback(_) => conn.call(c.rollback(action)).await,
            RolloutCommand::Abort(_) => conn.call(c.abort(action)).await,
            RolloutCommand::Gc(_) => conn.call(c.gc(action)).await,
            RolloutCommand::Status { .. } => conn.call(c.status(action)).await,
        }
    })?;
    if json {
        println!("{}", status_json(&status));
    } else {
        print_status(&status);
    }
    Ok(ExitCode::SUCCESS)
}
