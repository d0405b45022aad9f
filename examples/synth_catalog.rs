//! Writes a synthetic catalogue of N distinct images, for scale and crash tests of ingest:
//! `cargo run --release --example synth_catalog -- OUT_DIR N [SEED]` writes `OUT_DIR/catalog.jsonl`
//! and `OUT_DIR/img/*.png` (64x64 random colour blocks, one seed per row, so every image
//! differs) with a few attributes per row (`category` of 10, `price` 0..100, `colour`).

use std::io::Write;
use std::path::PathBuf;

use vitrine::segment::synth::SplitMix64;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out =
        PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!("usage: synth_catalog OUT_DIR N [SEED]"))?);
    let n: usize =
        args.next().ok_or_else(|| anyhow::anyhow!("usage: synth_catalog OUT_DIR N [SEED]"))?.parse()?;
    let seed: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    std::fs::create_dir_all(out.join("img"))?;
    let mut cat = std::io::BufWriter::new(std::fs::File::create(out.join("catalog.jsonl"))?);
    let colours = ["red", "green", "blue", "black", "white"];
    for i in 0..n {
        let mut rng = SplitMix64::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64);
        let mut img = image::RgbImage::new(64, 64);
        let blocks: Vec<[u8; 3]> =
            (0..16).map(|_| [rng.below(256) as u8, rng.below(256) as u8, rng.below(256) as u8]).collect();
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb(blocks[(y as usize / 16) * 4 + x as usize / 16]);
        }
        let name = format!("img/s{i:07}.png");
        img.save(out.join(&name))?;
        let row = serde_json::json!({
            "sku": format!("SYN-{i:07}"),
            "image": name,
            "attrs": {"category": format!("c{}", i % 10), "price": (i % 100) as f64, "colour": colours[i % 5]},
        });
        writeln!(cat, "{row}")?;
    }
    cat.flush()?;
    println!("wrote {n} rows to {}", out.join("catalog.jsonl").display());
    Ok(())
}
