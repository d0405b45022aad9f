//! The write subcommands against a running server: `vitrine upsert`, `delete` and `get`.
//! Each exits 0 only once the server has answered (for writes: acknowledged them durably).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::proto;
use crate::server::attrs;
use anyhow::Context;
use clap::Args;

use super::connect::ConnectArgs;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("payload").args(["image", "vector_file"])))]
pub struct UpsertArgs {
    #[command(flatten)]
    pub server: ConnectArgs,
    #[arg(long)]
    pub sku: String,
    /// The item's image; the server embeds it with every model version it indexes.
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// A ready vector: a JSON array of numbers, or numbers separated by spaces, commas or
    /// newlines. Needs --model-version.
    #[arg(long, value_name = "FILE", requires = "model_version")]
    pub vector_file: Option<PathBuf>,
    /// The model version whose space --vector-file's vector lives in.
    #[arg(long, value_name = "VERSION")]
    pub model_version: Option<String>,
    /// The item's attributes as a JSON object (replaces the stored ones; left out: kept).
    #[arg(long, value_name = "JSON")]
    pub attrs: Option<String>,
}

#[derive(Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub server: ConnectArgs,
    /// SKUs to delete.
    #[arg(long, num_args = 1.., required = true)]
    pub sku: Vec<String>,
}

#[derive(Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub server: ConnectArgs,
    /// SKUs to show.
    #[arg(long, num_args = 1.., required = true)]
    pub sku: Vec<String>,
    /// Print one JSON object: {"records": [...], "missing": [...]}.
    #[arg(long)]
    pub json: bool,
}

/// Reads a vector file: a JSON array, or numbers separated by whitespace or commas.
pub fn read_vector_file(path: &Path) -> anyhow::Result<Vec<f32>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // A byte order mark, as some editors write, is not part of the numbers.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let v: Vec<f64> = serde_json::from_str(trimmed).map_err(|e| {
            anyhow::anyhow!("{}:{}: not a JSON array of numbers: {e}", path.display(), e.line())
        })?;
        return Ok(v.into_iter().map(|x| x as f32).collect());
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        for tok in line.split(|c: char| c.is_whitespace() || c == ',').filter(|t| !t.is_empty()) {
            let x: f32 = tok.parse().map_err(|_| {
                // A token can be a whole line (other separators): show its start only.
                let shown: String = tok.chars().take(40).collect();
                let more = if shown.len() < tok.len() { "..." } else { "" };
                anyhow::anyhow!(
                    "{}:{}: {shown:?}{more} is not a number (numbers are separated by whitespace or commas)",
                    path.display(),
                    i + 1
                )
            })?;
            out.push(x);
        }
    }
    if out.is_empty() {
        anyhow::bail!("{}: no numbers in the vector file", path.display());
    }
    Ok(out)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn outcome_name(o: i32) -> &'static str {
    match proto::UpsertOutcome::try_from(o) {
        Ok(proto::UpsertOutcome::Added) => "added",
        Ok(proto::UpsertOutcome::Updated) => "updated",
        Ok(proto::UpsertOutcome::Unchanged) => "unchanged",
        _ => "unknown",
    }
}

pub fn run_upsert(a: UpsertArgs) -> anyhow::Result<ExitCode> {
    let attrs = match &a.attrs {
        None => None,
        Some(text) => {
            let v: serde_json::Value = serde_json::from_str(text).context("--attrs is not valid JSON")?;
            Some(attrs::json_to_struct(&v).map_err(|e| anyhow::anyhow!("--attrs: {e}"))?)
        }
    };
    let payload = if let Some(p) = &a.image {
        Some(proto::upsert_request::Payload::Image(
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        ))
    } else if let Some(f) = &a.vector_file {
        Some(proto::upsert_request::Payload::Vector(proto::VectorPayload {
            model_version: a.model_version.clone().unwrap_or_default(),
            values: read_vector_file(f)?,
        }))
    } else {
        None
    };
    let req = proto::UpsertRequest { sku: a.sku.clone(), attrs, payload };
    let r = runtime()?.block_on(async {
        let conn = a.server.client.connect(&a.server.addr).await?;
        conn.call(conn.search().upsert(req)).await
    })?;
    println!("{}: {}", r.sku, outcome_name(r.outcome));
    Ok(ExitCode::SUCCESS)
}

pub fn run_delete(a: DeleteArgs) -> anyhow::Result<ExitCode> {
    let r = runtime()?.block_on(async {
        let conn = a.server.client.connect(&a.server.addr).await?;
        conn.call(conn.search().delete(proto::DeleteRequest { skus: a.sku.clone() })).await
    })?;
    if r.deleted.is_empty() {
        println!("deleted 0");
    } else {
        println!("deleted {}: {}", r.deleted.len(), r.deleted.join(" "));
    }
    if !r.missing.is_empty() {
        println!("missing {}: {}", r.missing.len(), r.missing.join(" "));
    }
    Ok(ExitCode::SUCCESS)
}

/// Exits 1 when any SKU is missing (the found ones are still printed).
pub fn run_get(a: GetArgs) -> anyhow::Result<ExitCode> {
    let r = runtime()?.block_on(async {
        let conn = a.server.client.connect(&a.server.addr).await?;
        conn.call(conn.search().get(proto::GetRequest { skus: a.sku.clone() })).await
    })?;
    if a.json {
        let records: Vec<_> = r
            .records
            .iter()
            .map(|rec| {
                serde_json::json!({"sku": rec.sku, "attrs": attrs::to_json(rec.attrs.as_ref()),
                    "image_sha256": rec.image_sha256, "model_versions": rec.model_versions})
            })
            .collect();
        println!("{}", serde_json::json!({"records": records, "missing": r.missing}));
    } else {
        for rec in &r.records {
            println!(
                "{}  image {}  versions [{}]  {}",
                rec.sku,
                if rec.image_sha256.is_empty() { "-" } else { &rec.image_sha256 },
                rec.model_versions.join(", "),
                attrs::to_json(rec.attrs.as_ref())
            );
        }
        for m in &r.missing {
            println!("{m}  missing");
        }
    }
    if r.missing.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    // The exit status's reason, on stderr as for every failure (README, Exit codes).
    let shown: Vec<&str> = r.missing.iter().take(10).map(String::as_str).collect();
    let more = r.missing.len() - shown.len();
    eprintln!(
        "error: {} of {} SKUs not found: {}{}",
        r.missing.len(),
        a.sku.len(),
        shown.join(" "),
        if more > 0 { format!(" and {more} more") } else { String::new() }
    );
    Ok(ExitCode::FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_files_in_json_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.json");
        std::fs::write(&p, "[0.5, -1, 2e-1]").unwrap();
        assert_eq!(read_vector_file(&p).unwrap(), vec![0.5, -1.0, 0.2]);
        std::fs::write(&p, "0.5 1\n2,3\n").unwrap();
        assert_eq!(read_vector_file(&p).unwrap(), vec![0.5, 1.0, 2.0, 3.0]);
        std::fs::write(&p, "0.5\n1 x\n").unwrap();
        let e = read_vector_file(&p).unwrap_err().to_string();
        assert!(e.contains("v.json:2") && e.contains("\"x\""), "{e}");
        std::fs::write(&p, "").unwrap();
        assert!(read_vector_file(&p).is_err());
        std::fs::write(&p, "\u{feff}[1, 2]").unwrap();
        assert_eq!(read_vector_file(&p).unwrap(), vec![1.0, 2.0]);
        std::fs::write(&p, vec!["0.5"; 1000].join(";")).unwrap();
        let e = read_vector_file(&p).unwrap_err().to_string();
        assert!(e.len() < 200 && e.contains("...") && e.contains("separated by"), "{e}");
    }
}
