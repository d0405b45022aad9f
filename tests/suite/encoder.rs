//! The encoder against the real EfficientNet-Lite0 and Lite2 weights: ImageNet classes of known
//! photos, pooled features against an independent numpy forward pass, GeM pooling (the
//! `efficientnet-lite0-gem` version), batching, and preprocessing of awkward inputs
//! (transparency, wrong sizes, corrupt bytes).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use vitrine::encoder::{Architecture, Encoder, EncoderError, Kernels, Pooling, PreprocessError};

const MODEL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/efficientnet-lite0");
const LITE2_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/efficientnet-lite2");
const GEM_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/efficientnet-lite0-gem");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn encoder() -> &'static Encoder {
    static ENCODER: OnceLock<Encoder> = OnceLock::new();
    ENCODER.get_or_init(|| Encoder::load(Path::new(MODEL_DIR), &Device::Cpu).expect("load model"))
}

fn lite2() -> &'static Encoder {
    static ENCODER: OnceLock<Encoder> = OnceLock::new();
    ENCODER.get_or_init(|| Encoder::load(Path::new(LITE2_DIR), &Device::Cpu).expect("load lite2"))
}

fn gem() -> &'static Encoder {
    static ENCODER: OnceLock<Encoder> = OnceLock::new();
    ENCODER.get_or_init(|| Encoder::load(Path::new(GEM_DIR), &Device::Cpu).expect("load lite0-gem"))
}

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(FIXTURES).join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn reference_features(name: &str) -> Vec<f32> {
    fixture(name).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).expect("non-empty")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn softmax_of(logits: &[f32], class: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    f64::from(logits[class] - max).exp() / sum
}

fn l2_normalised(v: &[f64]) -> Vec<f64> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

fn png(image: &DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut out), ImageFormat::Png).expect("encode png");
    out
}

#[test]
fn loads_the_shipped_model() {
    let enc = encoder();
    assert_eq!(enc.version().as_str(), "efficientnet-lite0");
    assert_eq!(enc.dim(), 1280);
    assert_eq!(enc.input_size(), 224);
}

#[test]
fn coffee_is_espresso_through_full_preprocessing() {
    let enc = encoder();
    let image = enc.preprocess(&fixture("coffee.png")).expect("preprocess coffee.png");
    let logits = enc.classify(&[image]).expect("classify");
    assert_eq!(logits[0].len(), 1000);
    assert_eq!(argmax(&logits[0]), 967, "espresso");
}

#[test]
fn chelsea_is_a_cat_through_full_preprocessing() {
    let enc = encoder();
    let image = enc.preprocess(&fixture("chelsea.png")).expect("preprocess chelsea.png");
    let logits = enc.classify(&[image]).expect("classify");
    let top = argmax(&logits[0]);
    assert!((281..=285).contains(&top), "top-1 {top} is not a cat class");
}

#[test]
fn pooled_features_match_the_numpy_reference() {
    let enc = encoder();
    for name in ["coffee_224", "chelsea_224"] {
        let image = enc.preprocess(&fixture(&format!("{name}.png"))).expect("preprocess");
        let ours = enc.pooled_features(&[image]).expect("features").remove(0);
        let want = reference_features(&format!("{name}.features.f32"));
        assert_eq!(want.len(), 1280);
        let diff = max_abs_diff(&ours, &want);
        println!("{name}: max abs diff vs numpy reference {diff:e}");
        assert!(diff <= 1e-4, "{name}: max abs diff {diff}");
    }
}

#[test]
fn generic_gpu_path_matches_the_cpu_kernels() {
    // The plain-candle path (what CUDA runs) on the CPU, against the reference too.
    let generic =
        Encoder::load(Path::new(MODEL_DIR), &Device::Cpu).expect("load model").with_kernels(Kernels::Generic);
    let image = generic.preprocess(&fixture("chelsea_224.png")).expect("preprocess");
    let ours = generic.pooled_features(std::slice::from_ref(&image)).expect("features").remove(0);
    let want = reference_features("chelsea_224.features.f32");
    assert!(max_abs_diff(&ours, &want) <= 1e-4);
    let fast = encoder().pooled_features(&[image]).expect("features").remove(0);
    assert!(max_abs_diff(&ours, &fast) <= 1e-4);
}

#[test]
fn cuda_path_layer_order_matches_the_reference_on_the_cpu() {
    // `Kernels::Cuda` routes the stem, depthwise and bias/residual epilogues through the custom
    // ops (whose CPU halves run here) and every block unfused, as on a GPU: the same features.
    let cuda_order =
        Encoder::load(Path::new(MODEL_DIR), &Device::Cpu).expect("load model").with_kernels(Kernels::Cuda);
    let image = cuda_order.preprocess(&fixture("chelsea_224.png")).expect("preprocess");
    let ours = cuda_order.pooled_features(std::slice::from_ref(&image)).expect("features").remove(0);
    let want = reference_features("chelsea_224.features.f32");
    let diff = max_abs_diff(&ours, &want);
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

#[test]
fn reference_top1_logit_agrees() {
    let enc = encoder();
    let image = enc.preprocess(&fixture("coffee_224.png")).expect("preprocess");
    let logits = enc.classify(&[image]).expect("classify").remove(0);
    let meta: serde_json::Value =
        serde_json::from_slice(&fixture("coffee_224.json")).expect("reference json");
    for entry in meta["top5"].as_array().expect("top5") {
        let class = entry[0].as_u64().expect("class") as usize;
        let logit = entry[1].as_f64().expect("logit") as f32;
        assert!((logits[class] - logit).abs() < 1e-3, "class {class}: {} vs {logit}", logits[class]);
    }
}

#[test]
fn embeddings_are_unit_norm_and_batches_equal_singles() {
    let enc = encoder();
    let images: Vec<_> = ["coffee_224.png", "chelsea.png", "coffee.png"]
        .iter()
        .map(|n| enc.preprocess(&fixture(n)).expect("preprocess"))
        .collect();
    let batch = enc.embed(&images).expect("embed batch");
    assert_eq!(batch.len(), 3);
    for (i, image) in images.iter().enumerate() {
        let norm = batch[i].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        let single = enc.embed(std::slice::from_ref(image)).expect("embed single").remove(0);
        let diff = max_abs_diff(&batch[i], &single);
        assert!(diff < 1e-5, "image {i}: batch vs single differ by {diff}");
    }
    // Different photos give different embeddings; two crops of one photo stay close.
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!(dot(&batch[0], &batch[2]) > dot(&batch[0], &batch[1]));
}

#[test]
fn embed_bytes_isolates_bad_images() {
    let enc = encoder();
    let coffee = fixture("coffee_224.png");
    let results = enc.embed_bytes(&[&coffee, b"not an image", &coffee]);
    assert_eq!(results.len(), 3);
    let first = results[0].as_ref().expect("coffee embeds");
    assert!(matches!(results[1], Err(EncoderError::Preprocess(PreprocessError::UnknownFormat))));
    let third = results[2].as_ref().expect("coffee embeds");
    assert_eq!(first.len(), 1280);
    assert!(max_abs_diff(first, third) < 1e-6);
}

#[test]
fn wrong_input_size_is_refused() {
    let enc = encoder();
    let norm = enc.manifest().normalisation;
    let small = vitrine::encoder::preprocess::preprocess(&fixture("coffee.png"), 64, &norm)
        .expect("preprocess at 64");
    let err = enc.embed(&[small]).unwrap_err();
    assert!(matches!(err, EncoderError::InputSize { actual: 64, expected: 224, index: 0, .. }), "{err}");
}

#[test]
fn an_input_of_exactly_the_input_size_passes_unchanged() {
    let enc = encoder();
    let bytes = fixture("coffee_224.png");
    let prepared = enc.preprocess(&bytes).expect("preprocess");
    let raw = image::load_from_memory(&bytes).expect("decode").into_rgb8();
    assert_eq!(prepared.size(), 224);
    let plane = 224 * 224;
    for (i, px) in raw.pixels().enumerate() {
        for c in 0..3 {
            let want = (f32::from(px.0[c]) - 127.0) / 128.0;
            assert_eq!(prepared.data()[c * plane + i], want);
        }
    }
}

#[test]
fn transparent_background_embeds_like_white() {
    let enc = encoder();
    // A dark square on a transparent background and the same square on white.
    let transparent = RgbaImage::from_fn(300, 300, |x, y| {
        if (100..200).contains(&x) && (100..200).contains(&y) {
            Rgba([20, 40, 60, 255])
        } else {
            Rgba([0, 0, 0, 0])
        }
    });
    let white = RgbImage::from_fn(300, 300, |x, y| {
        if (100..200).contains(&x) && (100..200).contains(&y) {
            Rgb([20, 40, 60])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let a = enc.preprocess(&png(&DynamicImage::ImageRgba8(transparent))).expect("rgba");
    let b = enc.preprocess(&png(&DynamicImage::ImageRgb8(white))).expect("rgb");
    assert_eq!(a, b);
    // Corner pixel: white, normalised.
    assert_eq!(a.data()[0], (255.0 - 127.0) / 128.0);
}

#[test]
fn corrupt_and_odd_inputs_give_errors() {
    let enc = encoder();
    let coffee = fixture("coffee.png");
    assert!(matches!(enc.preprocess(&coffee[..coffee.len() / 3]), Err(PreprocessError::Decode(_))));
    assert!(matches!(enc.preprocess(&[]), Err(PreprocessError::Empty)));
    // A PNG signature with nothing after it.
    assert!(matches!(enc.preprocess(b"\x89PNG\r\n\x1a\n"), Err(PreprocessError::Decode(_))));
    assert!(matches!(enc.preprocess(&[0x89, b'P', b'N', b'G']), Err(PreprocessError::UnknownFormat)));
    // A format the image crate knows but the service does not accept.
    assert!(matches!(enc.preprocess(b"BM\x00\x00\x00\x00"), Err(PreprocessError::UnsupportedFormat(_))));
    // JPEG and GIF decode too, including a 1-pixel-wide image.
    let tall = DynamicImage::ImageRgb8(RgbImage::from_pixel(1, 500, Rgb([200, 10, 10])));
    let mut jpeg = Vec::new();
    tall.write_to(&mut std::io::Cursor::new(&mut jpeg), ImageFormat::Jpeg).expect("jpeg");
    assert_eq!(enc.preprocess(&jpeg).expect("jpeg decodes").size(), 224);
    let mut gif = Vec::new();
    tall.write_to(&mut std::io::Cursor::new(&mut gif), ImageFormat::Gif).expect("gif");
    assert_eq!(enc.preprocess(&gif).expect("gif decodes").size(), 224);
}

fn copy_model(to: &Path) -> PathBuf {
    let dir = to.join("efficientnet-lite0");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for f in ["manifest.json", "model.safetensors"] {
        std::fs::copy(Path::new(MODEL_DIR).join(f), dir.join(f)).expect("copy");
    }
    dir
}

#[test]
fn a_tampered_weights_file_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = copy_model(tmp.path());
    let weights = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).expect("write");
    let err = Encoder::load(&dir, &Device::Cpu).unwrap_err();
    assert!(matches!(err, EncoderError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"));
}

#[test]
fn a_folder_named_differently_from_the_version_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = copy_model(tmp.path());
    let renamed = tmp.path().join("efficientnet-lite2");
    std::fs::rename(&dir, &renamed).expect("rename");
    let err = Encoder::load(&renamed, &Device::Cpu).unwrap_err();
    assert!(matches!(err, EncoderError::FolderVersion { .. }), "{err}");
}

// ---------------------------------------------------------------------------------- Lite2

#[test]
fn lite2_loads_with_its_own_input_size() {
    let enc = lite2();
    assert_eq!(enc.version().as_str(), "efficientnet-lite2");
    assert_eq!(enc.manifest().architecture, Architecture::EfficientNetLite2);
    assert_eq!((enc.dim(), enc.input_size(), enc.pooling()), (1280, 260, Pooling::Average));
    assert_eq!(enc.manifest().sha256, "dc80b90b2b4fad9b9836e0521efb3afcbde1c58bfd5f854e1017e9a2953aef83");
    // A Lite0-sized input is refused, not silently run.
    let small = encoder().preprocess(&fixture("coffee_224.png")).expect("preprocess");
    let err = enc.embed(&[small]).unwrap_err();
    assert!(matches!(err, EncoderError::InputSize { actual: 224, expected: 260, .. }), "{err}");
}

#[test]
fn lite2_classifies_coffee_and_chelsea_through_full_preprocessing() {
    let enc = lite2();
    let images: Vec<_> = ["coffee.png", "chelsea.png"]
        .iter()
        .map(|n| enc.preprocess(&fixture(n)).expect("preprocess"))
        .collect();
    assert_eq!(images[0].size(), 260);
    let logits = enc.classify(&images).expect("classify");
    let (coffee, chelsea) = (argmax(&logits[0]), argmax(&logits[1]));
    println!(
        "lite2: coffee top-1 {coffee} p {:.4}; chelsea top-1 {chelsea} p {:.4}",
        softmax_of(&logits[0], coffee),
        softmax_of(&logits[1], chelsea)
    );
    assert_eq!(coffee, 967, "espresso");
    assert!(softmax_of(&logits[0], coffee) > 0.5);
    assert!((281..=285).contains(&chelsea), "top-1 {chelsea} is not a cat class");
}

#[test]
fn lite2_features_match_the_numpy_reference() {
    let enc = lite2();
    for name in ["coffee_260", "chelsea_260"] {
        let image = enc.preprocess(&fixture(&format!("{name}.png"))).expect("preprocess");
        let ours = enc.pooled_features(std::slice::from_ref(&image)).expect("features").remove(0);
        let want = reference_features(&format!("{name}.features.f32"));
        assert_eq!(want.len(), 1280);
        let diff = max_abs_diff(&ours, &want);
        println!("lite2 {name}: max abs diff vs numpy reference {diff:e}");
        assert!(diff <= 1e-4, "{name}: max abs diff {diff}");
        let logits = enc.classify(&[image]).expect("classify").remove(0);
        let meta: serde_json::Value =
            serde_json::from_slice(&fixture(&format!("{name}.json"))).expect("reference json");
        for entry in meta["top5"].as_array().expect("top5") {
            let class = entry[0].as_u64().expect("class") as usize;
            let logit = entry[1].as_f64().expect("logit") as f32;
            assert!(
                (logits[class] - logit).abs() < 1e-3,
                "{name} class {class}: {} vs {logit}",
                logits[class]
            );
        }
    }
}

#[test]
fn lite2_generic_gpu_path_matches_the_reference() {
    let generic =
        Encoder::load(Path::new(LITE2_DIR), &Device::Cpu).expect("load lite2").with_kernels(Kernels::Generic);
    let image = generic.preprocess(&fixture("chelsea_260.png")).expect("preprocess");
    let ours = generic.pooled_features(&[image]).expect("features").remove(0);
    let diff = max_abs_diff(&ours, &reference_features("chelsea_260.features.f32"));
    println!("lite2 generic path: max abs diff vs numpy reference {diff:e}");
    assert!(diff <= 1e-4, "{diff}");
}

#[test]
fn a_manifest_naming_another_architecture_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = copy_model(tmp.path());
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).expect("read manifest");
    let text =
        text.replace(r#""architecture": "efficientnet-lite0""#, r#""architecture": "efficientnet-lite2""#);
    std::fs::write(&path, text).expect("write manifest");
    let err = Encoder::load(&dir, &Device::Cpu).unwrap_err();
    assert!(matches!(err, EncoderError::Disagrees { in_manifest: 21, from_weights: 16, .. }), "{err}");
}

// ------------------------------------------------------------------- GeM pooling (lite0-gem)

/// GeM (p = 3, eps = 1e-6), then square root, then L2 normalisation, in f64, straight from a
/// feature map.
fn gem_sqrt_l2(map: &vitrine::encoder::FeatureMap) -> Vec<f64> {
    let positions = map.height * map.width;
    let mut acc = vec![0f64; map.channels];
    for row in map.data.chunks_exact(map.channels) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += f64::from(v).max(1e-6).powi(3);
        }
    }
    let pooled: Vec<f64> = acc.iter().map(|a| (a / positions as f64).cbrt().sqrt()).collect();
    l2_normalised(&pooled)
}

#[test]
fn gem_version_shares_the_weights_but_not_the_embeddings() {
    let (avg, gem) = (encoder(), gem());
    assert_eq!(gem.version().as_str(), "efficientnet-lite0-gem");
    assert_eq!(gem.pooling(), Pooling::Gem { p: 3.0, sqrt: true });
    assert_eq!(gem.manifest().sha256, avg.manifest().sha256);
    assert_ne!(gem.manifest().embedding_fingerprint(), avg.manifest().embedding_fingerprint());
    let image = avg.preprocess(&fixture("coffee_224.png")).expect("preprocess");
    assert_eq!(gem.preprocess(&fixture("coffee_224.png")).expect("preprocess"), image);
    let batch = std::slice::from_ref(&image);
    // Same network: identical average-pooled features and logits.
    assert_eq!(gem.pooled_features(batch).unwrap(), avg.pooled_features(batch).unwrap());
    assert_eq!(gem.classify(batch).unwrap(), avg.classify(batch).unwrap());
    // Different pooling: different unit vectors.
    let a = avg.embed(batch).unwrap().remove(0);
    let g = gem.embed(batch).unwrap().remove(0);
    let norm = g.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    let cosine: f32 = a.iter().zip(&g).map(|(x, y)| x * y).sum();
    let diff = max_abs_diff(&a, &g);
    println!("lite0 average vs GeM embeddings of coffee_224: cosine {cosine:.4}, max abs diff {diff:.4}");
    assert!(diff > 1e-3 && cosine < 0.999, "cosine {cosine}, max abs diff {diff}");
}

#[test]
fn gem_embeddings_equal_gem_of_the_feature_map_and_the_numpy_reference() {
    let enc = gem();
    let names = ["coffee_224", "chelsea_224"];
    let images: Vec<_> =
        names.iter().map(|n| enc.preprocess(&fixture(&format!("{n}.png"))).expect("preprocess")).collect();
    let maps = enc.feature_maps(&images).expect("feature maps");
    let embeddings = enc.embed(&images).expect("embed");
    let features = enc.embedding_features(&images).expect("embedding features");
    let averaged = enc.pooled_features(&images).expect("pooled features");
    for (i, name) in names.iter().enumerate() {
        let map = &maps[i];
        assert_eq!((map.height, map.width, map.channels, map.data.len()), (7, 7, 1280, 7 * 7 * 1280));
        // The map is what both poolings start from.
        let mean: Vec<f32> = (0..1280)
            .map(|c| map.data.iter().skip(c).step_by(1280).map(|&v| f64::from(v)).sum::<f64>() as f32 / 49.0)
            .collect();
        assert!(max_abs_diff(&mean, &averaged[i]) < 1e-5);
        let direct: Vec<f32> = gem_sqrt_l2(map).into_iter().map(|v| v as f32).collect();
        let diff = max_abs_diff(&embeddings[i], &direct);
        println!("gem {name}: embedding vs GeM+sqrt+L2 of the feature map: max abs diff {diff:e}");
        assert!(diff <= 1e-5, "{name}: {diff}");
        // Against the independent numpy forward pass and pooling. GeM itself is 1-Lipschitz in
        // the largest element error (a power mean), so compare the squares (= GeM before the
        // square root) at the tolerance of the average-pooled features; the square root then
        // magnifies errors of near-zero channels by 1 / (2 sqrt(GeM)) (a channel with one small
        // activation of 5e-4 among 49 zeros is magnified about 12x), so the unit vectors get a
        // looser bound than the same-network comparison above.
        let want = reference_features(&format!("{name}.efficientnet-lite0-gem.f32"));
        let squares = |v: &[f32]| v.iter().map(|x| x * x).collect::<Vec<f32>>();
        let diff = max_abs_diff(&squares(&features[i]), &squares(&want));
        println!("gem {name}: GeM (squared features) vs numpy reference: max abs diff {diff:e}");
        assert!(diff <= 1e-4, "{name}: {diff}");
        let want: Vec<f64> = want.iter().map(|&v| f64::from(v)).collect();
        let want: Vec<f32> = l2_normalised(&want).into_iter().map(|v| v as f32).collect();
        let diff = max_abs_diff(&embeddings[i], &want);
        println!("gem {name}: embedding vs numpy reference: max abs diff {diff:e}");
        assert!(diff <= 5e-5, "{name}: {diff}");
    }
    // Batches equal singles.
    let single = enc.embed(&images[1..]).expect("embed single").remove(0);
    assert!(max_abs_diff(&single, &embeddings[1]) < 1e-5);
}

#[test]
fn gem_generic_gpu_path_matches_the_cpu_kernels() {
    let generic = Encoder::load(Path::new(GEM_DIR), &Device::Cpu)
        .expect("load lite0-gem")
        .with_kernels(Kernels::Generic);
    let image = generic.preprocess(&fixture("chelsea_224.png")).expect("preprocess");
    let ours = generic.embed(std::slice::from_ref(&image)).expect("embed").remove(0);
    let fast = gem().embed(&[image]).expect("embed").remove(0);
    let diff = max_abs_diff(&ours, &fast);
    println!("gem: generic vs CPU kernels: max abs diff {diff:e}");
    assert!(diff <= 1e-5, "{diff}");
}
