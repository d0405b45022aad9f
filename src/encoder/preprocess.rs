//! Image preprocessing: the one function that turns encoded image bytes into the network's input,
//! used unchanged at ingest and at query time so both sides see identical tensors.
//!
//! Steps: sniff the format from the bytes (JPEG, PNG, WebP, GIF first frame), refuse oversized
//! images before decoding pixels, apply the EXIF orientation, composite transparency over white,
//! scale the shorter side to the input size and centre-crop, then normalise into CHW `f32`.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, RgbImage};

use super::manifest::Normalisation;

/// Identifies the steps below (decode, orientation, white background, resize filter, pre-shrink,
/// crop, layout) in [`ModelManifest::embedding_fingerprint`](super::ModelManifest::embedding_fingerprint).
/// Anything that changes the pixels a model sees changes its embeddings: change this string with
/// it, and ship such a change as a new model version.
pub const PIPELINE: &str =
    "exif-orient;alpha-over-white;shorter-side-triangle(area-preshrink-4x-to-2x);centre-crop;rgb-chw-f32";

/// Images with more pixels than this are refused before their pixels are decoded.
pub const MAX_PIXELS: u64 = 40_000_000;
/// Longest side accepted, whatever the pixel count.
pub const MAX_SIDE: u32 = 32_768;
/// Most bytes an image's decoded pixels may take (width x height x bytes per pixel of its own
/// colour type): a 40-megapixel 8-bit RGB photo fits, a 16-bit RGBA image of as many pixels
/// (323 KB as a PNG, 320 MB decoded) does not. Preprocessing holds at most about twice this
/// (the decoded image and its 8-bit conversion), so one decode's memory is bounded by
/// `2 * MAX_DECODED_BYTES`, and a server's by that times its concurrent embeddings.
pub const MAX_DECODED_BYTES: u64 = 128 << 20;
/// Most memory a decoder may allocate (the pixels plus the decoder's own buffers).
const MAX_DECODER_ALLOC: u64 = MAX_DECODED_BYTES + (32 << 20);
/// Images whose shorter side is at least this many times the input size are first shrunk with
/// a cheap area average to twice the input size, then resized properly.
const PRESHRINK_FACTOR: u32 = 4;
/// Longest side kept, in multiples of the shorter side, before resizing. The centre crop only
/// ever shows the middle square, but resizing a 1x32768 strip to fill 224x224 would first make
/// a 224x7340032 image (4.9 GB, minutes of CPU; a 664-byte 10508x8 JPEG took 7 s and 260 MB).
/// A longer image is cut to its middle part first: the intermediate then stays under
/// `MAX_ASPECT * size * size` pixels, and the pixels that reach the crop move by at most a
/// fraction of a source pixel (images this elongated are no product photos).
const MAX_ASPECT: u32 = 64;

/// A network input: normalised pixels, channel-major (`[3][size][size]`), RGB order.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedImage {
    data: Vec<f32>,
    size: u32,
}

impl PreparedImage {
    /// Side of the square image in pixels.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The `3 * size * size` values in CHW order.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }
}

/// Why image bytes could not be turned into a network input. The messages are meant for the
/// client that sent the image.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("image is empty (0 bytes)")]
    Empty,
    #[error("image format not recognised: send JPEG, PNG, WebP or GIF")]
    UnknownFormat,
    #[error("image format {0:?} is not supported: send JPEG, PNG, WebP or GIF")]
    UnsupportedFormat(ImageFormat),
    #[error("image is {width}x{height} pixels; the limit is {max_pixels} pixels and {max_side} per side", max_pixels = MAX_PIXELS, max_side = MAX_SIDE)]
    TooLarge { width: u32, height: u32 },
    #[error("image has no pixels ({width}x{height})")]
    ZeroSize { width: u32, height: u32 },
    #[error(
        "image is {width}x{height} pixels of {bytes_per_pixel} bytes: {decoded} bytes decoded, over the {max}-byte decoding budget",
        decoded = u64::from(*width) * u64::from(*height) * u64::from(*bytes_per_pixel),
        max = MAX_DECODED_BYTES
    )]
    OverBudget { width: u32, height: u32, bytes_per_pixel: u8 },
    #[error("image is truncated: {0}")]
    Truncated(&'static str),
    #[error("image exceeds the decoder's memory limit")]
    DecoderLimit(#[source] ImageError),
    #[error("image is corrupt or truncated")]
    Decode(#[source] ImageError),
    #[error("input size {0} is outside 1..={max}", max = MAX_SIDE)]
    BadInputSize(u32),
}

/// Decodes `bytes` and prepares them as a `input_size` x `input_size` network input.
///
/// An image that is already exactly `input_size` square (after orientation) is not resampled.
pub fn preprocess(
    bytes: &[u8],
    input_size: u32,
    norm: &Normalisation,
) -> Result<PreparedImage, PreprocessError> {
    if input_size == 0 || input_size > MAX_SIDE {
        return Err(PreprocessError::BadInputSize(input_size));
    }
    let image = decode(bytes)?;
    let rgb = flatten_on_white(image);
    let rgb = resize_and_crop(rgb, input_size);
    Ok(normalise(&rgb, norm))
}

/// Decodes the first frame with its EXIF orientation applied, refusing decompression bombs.
pub fn decode(bytes: &[u8]) -> Result<DynamicImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Decode(ImageError::IoError(e)))?;
    let format = reader.format().ok_or(PreprocessError::UnknownFormat)?;
    if !matches!(format, ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP | ImageFormat::Gif) {
        return Err(PreprocessError::UnsupportedFormat(format));
    }
    // Width and height are checked below from the header, with a clearer message than the
    // decoder's; the allocation cap still guards what the decoder itself reserves.
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODER_ALLOC);
    reader.limits(limits);
    check_complete(format, bytes)?;
    let mut decoder = reader.into_decoder().map_err(classify_error)?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height)?;
    check_jpeg_data(format, bytes.len(), width, height)?;
    let bytes_per_pixel = decoder.color_type().bytes_per_pixel();
    if u64::from(width) * u64::from(height) * u64::from(bytes_per_pixel) > MAX_DECODED_BYTES {
        return Err(PreprocessError::OverBudget { width, height, bytes_per_pixel });
    }
    let orientation = decoder.orientation().map_err(classify_error)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(classify_error)?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Refuses files that end before their format says they do. Decoders differ: the PNG one
/// fails on a missing chunk, but the JPEG one fills a cut-off scan with grey and WebP may
/// decode a partial file, so those two are checked from their framing here.
fn check_complete(format: ImageFormat, bytes: &[u8]) -> Result<(), PreprocessError> {
    match format {
        ImageFormat::Jpeg => {
            // The end-of-image marker must follow the last start-of-scan (scan data never holds
            // FF D9 or FF DA: the encoder stuffs every FF byte with 00). Bytes after the EOI
            // (some cameras append data) are allowed.
            let last = |marker: u8| bytes.windows(2).rposition(|w| w == [0xFF, marker]);
            match (last(0xDA), last(0xD9)) {
                (Some(sos), Some(eoi)) if eoi > sos => Ok(()),
                (None, _) => {
                    Err(PreprocessError::Truncated("JPEG without image data (no start-of-scan marker)"))
                }
                _ => Err(PreprocessError::Truncated("JPEG ends before its end-of-image marker")),
            }
        }
        ImageFormat::WebP => {
            let declared =
                bytes.get(4..8).map(|b| u64::from(u32::from_le_bytes(b.try_into().expect("4 bytes"))));
            match declared {
                Some(size) if bytes.len() as u64 >= size + 8 => Ok(()),
                _ => Err(PreprocessError::Truncated("WebP file shorter than its RIFF header says")),
            }
        }
        _ => Ok(()),
    }
}

/// A JPEG's compressed data can never be smaller than this share of its pixels, in bytes:
/// every 8x8 luma block costs at least one bit (its DC code) over all the scans together, so
/// 1/512; half that, for a margin.
const JPEG_MIN_BYTES_PER_PIXEL: f64 = 1.0 / 1024.0;

/// Refuses a JPEG whose header claims far more pixels than its data could describe: a file of
/// a few hundred bytes claiming 6000x6000 has lost (or never had) its scan data, which the
/// decoder would pad with grey at the full decoded size (about 160 MB of work for nothing).
fn check_jpeg_data(format: ImageFormat, len: usize, width: u32, height: u32) -> Result<(), PreprocessError> {
    let pixels = f64::from(width) * f64::from(height);
    if format == ImageFormat::Jpeg && (len as f64) < pixels * JPEG_MIN_BYTES_PER_PIXEL {
        return Err(PreprocessError::Truncated(
            "JPEG holds too little data for the size its header claims (at least 1 byte per 1,024 pixels)",
        ));
    }
    Ok(())
}

/// Refuses empty images and images over the pixel budget, from their header dimensions.
pub fn check_dimensions(width: u32, height: u32) -> Result<(), PreprocessError> {
    if width == 0 || height == 0 {
        return Err(PreprocessError::ZeroSize { width, height });
    }
    if u64::from(width) * u64::from(height) > MAX_PIXELS || width > MAX_SIDE || height > MAX_SIDE {
        return Err(PreprocessError::TooLarge { width, height });
    }
    Ok(())
}

fn classify_error(err: ImageError) -> PreprocessError {
    match err {
        ImageError::Limits(_) => PreprocessError::DecoderLimit(err),
        other => PreprocessError::Decode(other),
    }
}

/// Converts to 8-bit RGB, compositing any transparency over white (catalogue shots often have
/// transparent backgrounds, which must not turn black).
pub fn flatten_on_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (width, height) = rgba.dimensions();
    let mut out = RgbImage::new(width, height);
    for (src, dst) in rgba.pixels().zip(out.pixels_mut()) {
        let alpha = u32::from(src.0[3]);
        for c in 0..3 {
            let value = u32::from(src.0[c]) * alpha + 255 * (255 - alpha);
            // Rounded division by 255; the result is at most 255.
            dst.0[c] = ((value + 127) / 255) as u8;
        }
    }
    out
}

/// Scales the shorter side to `size` and crops the centre square. A `size` x `size` image is
/// returned untouched. Resampling is `super::resize`'s, which gives exactly the pixels of the
/// `image` crate's `thumbnail` and Triangle `resize_to_fill` this pipeline was defined with.
pub fn resize_and_crop(image: RgbImage, size: u32) -> RgbImage {
    let (width, height) = image.dimensions();
    if width == size && height == size {
        return image;
    }
    let mut image = cut_to_max_aspect(image);
    if let Some((new_w, new_h)) = preshrink_size(width, height, image.dimensions(), size) {
        image = super::resize::thumbnail(&image, new_w, new_h);
    }
    super::resize::resize_to_fill(&image, size)
}

/// The middle part of an image longer than [`MAX_ASPECT`] times its shorter side.
fn cut_to_max_aspect(image: RgbImage) -> RgbImage {
    let (width, height) = image.dimensions();
    let longest = width.min(height).saturating_mul(MAX_ASPECT);
    if width.max(height) <= longest {
        return image;
    }
    let (w, h) = (width.min(longest), height.min(longest));
    image::imageops::crop_imm(&image, (width - w) / 2, (height - h) / 2, w, h).to_image()
}

/// The size to area-average an original `width` x `height` image (now `cut` after
/// [`cut_to_max_aspect`]) down to before the filtered resize, when its shorter side is at least
/// [`PRESHRINK_FACTOR`] times `size`: about twice the target, since the filtered resize costs
/// time in proportion to the source size.
fn preshrink_size(width: u32, height: u32, cut: (u32, u32), size: u32) -> Option<(u32, u32)> {
    let shorter = width.min(height);
    if shorter < size.saturating_mul(PRESHRINK_FACTOR) {
        return None;
    }
    let target = u64::from(size) * 2;
    let new_w = (u64::from(cut.0) * target).div_ceil(u64::from(shorter));
    let new_h = (u64::from(cut.1) * target).div_ceil(u64::from(shorter));
    // Both fit in u32: they are at most the original sides.
    Some((u32::try_from(new_w).unwrap_or(cut.0).max(size), u32::try_from(new_h).unwrap_or(cut.1).max(size)))
}

/// [`resize_and_crop`] as the pipeline was defined, through the `image` crate's own
/// `thumbnail_exact` and Triangle `resize_to_fill` (4-6x slower): the reference the tests
/// hold `super::resize` to, pixel for pixel, and the baseline of `cargo bench --bench encoder
/// -- resize_to_224`.
pub fn resize_and_crop_with_image_crate(image: RgbImage, size: u32) -> RgbImage {
    let (width, height) = image.dimensions();
    let mut image = DynamicImage::ImageRgb8(cut_to_max_aspect(image));
    if let Some((new_w, new_h)) = preshrink_size(width, height, (image.width(), image.height()), size) {
        image = image.thumbnail_exact(new_w, new_h);
    }
    image.resize_to_fill(size, size, image::imageops::FilterType::Triangle).into_rgb8()
}

/// `(pixel - mean) / std` per channel, into CHW order.
pub fn normalise(image: &RgbImage, norm: &Normalisation) -> PreparedImage {
    let (width, height) = image.dimensions();
    debug_assert_eq!(width, height, "normalise expects a square image");
    let plane = width as usize * height as usize;
    let mut data = vec![0f32; 3 * plane];
    let (r, rest) = data.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in image.pixels().enumerate() {
        r[i] = (f32::from(px.0[0]) - norm.mean[0]) / norm.std[0];
        g[i] = (f32::from(px.0[1]) - norm.mean[1]) / norm.std[1];
        b[i] = (f32::from(px.0[2]) - norm.mean[2]) / norm.std[2];
    }
    PreparedImage { data, size: width }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, Rgb, Rgba, RgbaImage};

    const NORM: Normalisation = Normalisation { mean: [127.0; 3], std: [128.0; 3] };

    fn png_bytes(image: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        image.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn truncated_jpeg_and_webp_are_refused() {
        let jpeg = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/data/bad/ok-2.jpg")).unwrap();
        assert!(preprocess(&jpeg, 224, &NORM).is_ok());
        let mut trailing = jpeg.clone();
        trailing.extend_from_slice(b"camera trailer");
        assert!(preprocess(&trailing, 224, &NORM).is_ok(), "bytes after the end marker are allowed");
        for cut in [jpeg.len() / 3, jpeg.len() / 2, jpeg.len() * 9 / 10, jpeg.len() - 2, jpeg.len() - 1] {
            let err = preprocess(&jpeg[..cut], 224, &NORM).unwrap_err();
            assert!(matches!(err, PreprocessError::Truncated(_)), "cut at {cut}: {err:?}");
            assert!(err.to_string().contains("truncated"), "{err}");
        }
        let mut webp = Vec::new();
        DynamicImage::ImageRgb8(RgbImage::new(32, 32))
            .write_to(&mut Cursor::new(&mut webp), ImageFormat::WebP)
            .unwrap();
        assert!(preprocess(&webp, 224, &NORM).is_ok());
        let err = preprocess(&webp[..webp.len() - 3], 224, &NORM).unwrap_err();
        assert!(matches!(err, PreprocessError::Truncated(_)), "{err:?}");
    }

    /// A real JPEG whose frame header is patched to claim 6000 x 6000: complete framing (scan
    /// and end markers), but far too little data for that size.
    #[test]
    fn a_jpeg_claiming_more_pixels_than_its_data_holds_is_refused() {
        let mut jpeg = Vec::new();
        DynamicImage::ImageRgb8(RgbImage::from_pixel(16, 16, image::Rgb([200, 30, 30])))
            .write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)
            .unwrap();
        assert!(preprocess(&jpeg, 224, &NORM).is_ok());
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).expect("a baseline frame header");
        // FF C0, length (2), precision (1), height (2), width (2).
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0x17, 0x70, 0x17, 0x70]);
        let err = preprocess(&jpeg, 224, &NORM).unwrap_err();
        assert!(matches!(err, PreprocessError::Truncated(_)), "{err:?}");
        assert!(err.to_string().contains("too little data"), "{err}");
    }

    #[test]
    fn decoded_size_is_budgeted_before_decoding() {
        // A 16-bit RGBA PNG claiming 6324 x 6324 pixels: under the pixel limit, but 320 MB
        // decoded. Refused from its header, before any pixel is allocated.
        let small = DynamicImage::ImageRgba16(image::ImageBuffer::new(8, 8));
        let bomb = png_with_claimed_size(&png_bytes(&small), 6324, 6324);
        let err = preprocess(&bomb, 224, &NORM).unwrap_err();
        assert!(matches!(err, PreprocessError::OverBudget { bytes_per_pixel: 8, .. }), "{err:?}");
        assert!(err.to_string().contains("decoding budget"), "{err}");
        // The same pixel count at 8 bits per RGB channel fits the budget (refused here only
        // because the claimed pixels are missing).
        let rgb =
            png_with_claimed_size(&png_bytes(&DynamicImage::ImageRgb8(RgbImage::new(8, 8))), 6324, 6324);
        assert!(!matches!(preprocess(&rgb, 224, &NORM), Err(PreprocessError::OverBudget { .. })));
    }

    /// Every bundled catalogue image, as it is and enlarged past the pre-shrink threshold,
    /// resizes to exactly the pixels `image`'s resize gave.
    #[test]
    fn resizing_matches_image_on_the_bundled_images() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/data/images");
        let mut paths: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        paths.sort();
        assert!(paths.len() > 100);
        for (i, path) in paths.iter().enumerate() {
            let rgb = flatten_on_white(decode(&std::fs::read(path).unwrap()).unwrap());
            assert!(
                resize_and_crop(rgb.clone(), 224) == resize_and_crop_with_image_crate(rgb.clone(), 224),
                "{path:?}"
            );
            if i % 16 == 0 {
                let (w, h) = rgb.dimensions();
                let big =
                    image::imageops::resize(&rgb, w * 4 + 3, h * 4 + 1, image::imageops::FilterType::Nearest);
                assert!(
                    resize_and_crop(big.clone(), 224) == resize_and_crop_with_image_crate(big, 224),
                    "{path:?} x4"
                );
            }
        }
    }

    /// Found by the `image_preprocess` fuzz target (fuzz/regressions/image_preprocess/): a
    /// 10508x8 JPEG of 664 bytes took 7 s and 260 MB to resize; a 1x32768 strip would need
    /// 4.9 GB. Such strips are cut to their middle part before resizing.
    #[test]
    fn extreme_aspect_ratios_are_cut_before_resizing() {
        let jpeg = include_bytes!("../../fuzz/regressions/image_preprocess/wide-10508x8.jpg");
        let decoded = decode(jpeg).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (10508, 8));
        assert_eq!(preprocess(jpeg, 224, &NORM).unwrap().size(), 224);
        let stripes = |_x: u32, y: u32| Rgb([(y % 7 * 40) as u8, (y % 3 * 100) as u8, 50]);
        let strip = RgbImage::from_fn(1, 32_768, stripes);
        let middle = image::imageops::crop_imm(&strip, 0, (32_768 - 64) / 2, 1, 64).to_image();
        let out = resize_and_crop(strip, 224);
        assert_eq!(out.dimensions(), (224, 224));
        assert_eq!(out, resize_and_crop(middle, 224));
        // Up to MAX_ASPECT nothing is cut: the result differs from the middle square's.
        let long = RgbImage::from_fn(2, 128, stripes);
        let square = image::imageops::crop_imm(&long, 0, 63, 2, 2).to_image();
        assert_ne!(resize_and_crop(long, 224), resize_and_crop(square, 224));
    }

    #[test]
    fn dimension_checks() {
        assert!(check_dimensions(224, 224).is_ok());
        assert!(matches!(check_dimensions(0, 10), Err(PreprocessError::ZeroSize { .. })));
        assert!(matches!(check_dimensions(10_000, 5_000), Err(PreprocessError::TooLarge { .. })));
        assert!(matches!(check_dimensions(40_000, 2), Err(PreprocessError::TooLarge { .. })));
    }

    #[test]
    fn square_input_of_the_right_size_is_untouched() {
        let img = RgbImage::from_fn(8, 8, |x, y| Rgb([x as u8 * 30, y as u8 * 30, 7]));
        assert_eq!(resize_and_crop(img.clone(), 8), img);
    }

    #[test]
    fn crop_keeps_the_centre() {
        // 12x4: a red centre 4x4 square between blue borders.
        let img =
            RgbImage::from_fn(
                12,
                4,
                |x, _| {
                    if (4..8).contains(&x) { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) }
                },
            );
        let out = resize_and_crop(img, 4);
        assert_eq!(out.dimensions(), (4, 4));
        assert!(out.pixels().all(|p| p.0 == [255, 0, 0]));
    }

    #[test]
    fn large_images_are_preshrunk_to_the_same_picture() {
        // A horizontal gradient: the result must stay a gradient across the crop.
        let img = RgbImage::from_fn(1600, 1200, |x, _| Rgb([(x * 255 / 1599) as u8, 0, 0]));
        let out = resize_and_crop(img, 32);
        assert_eq!(out.dimensions(), (32, 32));
        let left = out.get_pixel(0, 16).0[0];
        let right = out.get_pixel(31, 16).0[0];
        assert!(left < 50 && right > 205, "left {left} right {right}");
    }

    #[test]
    fn transparency_becomes_white() {
        let img =
            RgbaImage::from_fn(2, 1, |x, _| if x == 0 { Rgba([0, 0, 0, 0]) } else { Rgba([0, 0, 0, 255]) });
        let out = flatten_on_white(DynamicImage::ImageRgba8(img));
        assert_eq!(out.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(1, 0).0, [0, 0, 0]);
        let half =
            flatten_on_white(DynamicImage::ImageRgba8(RgbaImage::from_pixel(1, 1, Rgba([0, 100, 255, 128]))));
        assert_eq!(half.get_pixel(0, 0).0, [127, 177, 255]);
    }

    #[test]
    fn normalise_is_channel_major() {
        let img = RgbImage::from_fn(2, 2, |x, y| Rgb([(x + 2 * y) as u8, 127, 255]));
        let p = normalise(&img, &NORM);
        assert_eq!(p.size(), 2);
        assert_eq!(p.data().len(), 12);
        assert_eq!(&p.data()[..4], &[-127.0 / 128.0, -126.0 / 128.0, -125.0 / 128.0, -124.0 / 128.0]);
        assert!(p.data()[4..8].iter().all(|&v| v == 0.0));
        assert!(p.data()[8..].iter().all(|&v| v == 1.0));
    }

    #[test]
    fn exif_orientation_is_applied() {
        // 4 wide x 2 high, left half red, right half blue; EXIF orientation 6 (rotate 90 CW)
        // turns it into 2 wide x 4 high with red on top.
        let img = RgbImage::from_fn(4, 2, |x, _| if x < 2 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) });
        let mut bytes = Vec::new();
        let mut enc = image::codecs::png::PngEncoder::new(&mut bytes);
        enc.set_exif_metadata(exif_orientation(6)).unwrap();
        enc.write_image(img.as_raw(), 4, 2, image::ExtendedColorType::Rgb8).unwrap();
        let decoded = decode(&bytes).unwrap().into_rgb8();
        assert_eq!(decoded.dimensions(), (2, 4));
        assert_eq!(decoded.get_pixel(0, 0).0, [255, 0, 0]);
        assert_eq!(decoded.get_pixel(1, 3).0, [0, 0, 255]);
    }

    /// A big-endian TIFF/EXIF block holding one Orientation (0x0112) entry.
    fn exif_orientation(value: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"MM\0\x2a");
        b.extend_from_slice(&8u32.to_be_bytes()); // IFD0 offset
        b.extend_from_slice(&1u16.to_be_bytes()); // one entry
        b.extend_from_slice(&0x0112u16.to_be_bytes());
        b.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        b.extend_from_slice(&1u32.to_be_bytes()); // count
        b.extend_from_slice(&value.to_be_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
        b
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        assert!(matches!(preprocess(&[], 224, &NORM), Err(PreprocessError::Empty)));
        assert!(matches!(
            preprocess(b"definitely not an image", 224, &NORM),
            Err(PreprocessError::UnknownFormat)
        ));
        let png = png_bytes(&DynamicImage::ImageRgb8(RgbImage::new(64, 64)));
        let truncated = &png[..png.len() / 2];
        assert!(matches!(preprocess(truncated, 224, &NORM), Err(PreprocessError::Decode(_))));
        // PNG headers that claim too many pixels are refused before any pixel is decoded.
        for (w, h) in [(100_000, 100_000), (7_000, 7_000), (40_000, 1)] {
            let bomb = png_with_claimed_size(&png, w, h);
            let err = preprocess(&bomb, 224, &NORM).unwrap_err();
            assert!(
                matches!(err, PreprocessError::TooLarge { width, height } if width == w && height == h),
                "{err:?}"
            );
        }
        let err = preprocess(&png_with_claimed_size(&png, 0, 5), 224, &NORM).unwrap_err();
        assert!(matches!(err, PreprocessError::ZeroSize { .. } | PreprocessError::Decode(_)), "{err:?}");
    }

    /// Rewrites the IHDR width and height of a PNG (and its CRC, so the header stays valid).
    fn png_with_claimed_size(png: &[u8], width: u32, height: u32) -> Vec<u8> {
        let mut out = png.to_vec();
        assert_eq!(&out[12..16], b"IHDR");
        out[16..20].copy_from_slice(&width.to_be_bytes());
        out[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32fast::hash(&out[12..29]);
        out[29..33].copy_from_slice(&crc.to_be_bytes());
        out
    }
}
