//! Writes the bundled golden set for canary gates: `cargo run --example make_golden` reads
//! `data/catalog.jsonl` and writes `data/golden/*.jpg` and `data/golden.jsonl`.
//!
//! Each golden query is a catalogue image seen differently: an off-centre crop of 60-75% of
//! the picture, scaled down, brightened or darkened, saved as a JPEG of quality 55 (every
//! third catalogue item, deterministic), plus the four real query photos of `data/queries/`.
//! `expected` lists the SKUs a good search finds in its top 10.

use std::io::{Cursor, Write};
use std::path::Path;

use vitrine::segment::synth::SplitMix64;

fn main() -> anyhow::Result<()> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let out_dir = data.join("golden");
    std::fs::create_dir_all(&out_dir)?;
    let mut lines = Vec::new();
    let catalog = std::fs::read_to_string(data.join("catalog.jsonl"))?;
    for (i, line) in catalog.lines().filter(|l| !l.trim().is_empty()).enumerate().filter(|(i, _)| i % 3 == 0)
    {
        let row: serde_json::Value = serde_json::from_str(line)?;
        let sku = row["sku"].as_str().unwrap_or_default().to_string();
        let img = image::open(data.join(row["image"].as_str().unwrap_or_default()))?;
        let rgb = vitrine::encoder::preprocess::flatten_on_white(img);
        let img = image::DynamicImage::ImageRgb8(rgb);
        let mut rng = SplitMix64::new(0x601D ^ i as u64);
        let share = 0.60 + 0.15 * rng.next_f64();
        let (w, h) = (img.width(), img.height());
        let (cw, ch) = (((w as f64) * share) as u32, ((h as f64) * share) as u32);
        let x = rng.below(u64::from(w - cw + 1)) as u32;
        let y = rng.below(u64::from(h - ch + 1)) as u32;
        let crop = img.crop_imm(x, y, cw.max(1), ch.max(1));
        let small = crop.resize((cw / 2).max(16), (ch / 2).max(16), image::imageops::FilterType::Triangle);
        let shifted = small.brighten(rng.below(61) as i32 - 30);
        let name = format!("golden/g{i:03}.jpg");
        let mut bytes = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut bytes), 55);
        shifted.write_with_encoder(enc)?;
        std::fs::write(data.join(&name), bytes)?;
        lines.push(serde_json::json!({"image": name, "expected": [sku]}));
    }
    let queries = std::fs::read_to_string(data.join("queries/expected.jsonl"))?;
    for line in queries.lines().filter(|l| !l.trim().is_empty()) {
        let q: serde_json::Value = serde_json::from_str(line)?;
        let mut expected = vec![q["best"].clone()];
        expected.extend(q["acceptable"].as_array().cloned().unwrap_or_default());
        lines.push(serde_json::json!({"image": format!("queries/{}", q["query"].as_str().unwrap_or_default()), "expected": expected}));
    }
    let mut f = std::fs::File::create(data.join("golden.jsonl"))?;
    for l in &lines {
        writeln!(f, "{l}")?;
    }
    println!("wrote {} golden queries to {}", lines.len(), data.join("golden.jsonl").display());
    Ok(())
}
