//! The shorter-side resize and centre crop of preprocessing, computing only the pixels the crop
//! keeps: the same arithmetic, operation for operation, as the `image` crate's Triangle
//! `resize` followed by its `crop` (what `DynamicImage::resize_to_fill` does), so the network
//! sees bit-identical pixels and embeddings do not change, but without resampling the columns
//! or rows the crop then throws away, and with loops the compiler vectorises.
//!
//! `image` resamples in two passes: columns first (each output row a weighted sum of source
//! rows, kept as `f32`), then rows (each output pixel a weighted sum of the first pass's
//! pixels, clamped to `0..=255` and rounded half away from zero). Each weighted sum starts
//! from `0.0` and adds `value * weight` tap by tap in source order, without fused
//! multiply-adds; the weights are the triangle kernel at each tap, divided by their sum. This
//! module keeps every one of those steps; `tests` check it against `image` on many sizes.

use image::RgbImage;

/// The taps of one output position along one axis: the first source index and the weights.
struct Taps {
    first: usize,
    weights: Vec<f32>,
}

/// `image`'s weights for output position `out` of `new_len` resampled from `len` (its
/// `vertical_sample` and `horizontal_sample`, Triangle filter, support 1).
fn taps(out: u32, len: u32, new_len: u32) -> Taps {
    let ratio = len as f32 / new_len as f32;
    let sratio = if ratio < 1.0 { 1.0 } else { ratio };
    let support = sratio;
    let centre = (out as f32 + 0.5) * ratio;
    let left = ((centre - support).floor() as i64).clamp(0, i64::from(len) - 1);
    let right = ((centre + support).ceil() as i64).clamp(left + 1, i64::from(len));
    let centre = centre - 0.5;
    let mut weights: Vec<f32> = (left..right).map(|i| triangle((i as f32 - centre) / sratio)).collect();
    let mut sum = 0.0f32;
    for w in &weights {
        sum += w;
    }
    for w in &mut weights {
        *w /= sum;
    }
    Taps { first: left as usize, weights }
}

fn triangle(x: f32) -> f32 {
    if x.abs() < 1.0 { 1.0 - x.abs() } else { 0.0 }
}

/// `image`'s `resize_dimensions(width, height, size, size, fill = true)`.
fn fill_dimensions(width: u32, height: u32, size: u32) -> (u32, u32) {
    let ratio = f64::max(f64::from(size) / f64::from(width), f64::from(size) / f64::from(height));
    let nw = ((f64::from(width) * ratio).round() as u64).max(1);
    let nh = ((f64::from(height) * ratio).round() as u64).max(1);
    if nw > u64::from(u32::MAX) {
        let ratio = f64::from(u32::MAX) / f64::from(width);
        (u32::MAX, ((f64::from(height) * ratio).round() as u32).max(1))
    } else if nh > u64::from(u32::MAX) {
        let ratio = f64::from(u32::MAX) / f64::from(height);
        (((f64::from(width) * ratio).round() as u32).max(1), u32::MAX)
    } else {
        (nw as u32, nh as u32)
    }
}

/// Scales `image` so its shorter side is `size` (Triangle filter) and returns the centre
/// `size` x `size` square: `DynamicImage::ImageRgb8(image).resize_to_fill(size, size,
/// FilterType::Triangle)`, pixel for pixel.
pub fn resize_to_fill(image: &RgbImage, size: u32) -> RgbImage {
    let (width, height) = image.dimensions();
    if width == 0 || height == 0 || size == 0 {
        return RgbImage::new(size.min(width), size.min(height));
    }
    let (new_w, new_h) = fill_dimensions(width, height, size);
    // `resize_to_fill`'s crop of the resized image, clamped to it as `crop` does.
    let (x0, y0) = if u64::from(size) * u64::from(new_h) > u64::from(new_w) * u64::from(size) {
        (0, (new_h - size) / 2)
    } else {
        ((new_w - size) / 2, 0)
    };
    let (x0, y0) = (x0.min(new_w), y0.min(new_h));
    let (out_w, out_h) = (size.min(new_w - x0), size.min(new_h - y0));
    if (new_w, new_h) == (width, height) {
        return image::imageops::crop_imm(image, x0, y0, out_w, out_h).to_image();
    }
    let cols: Vec<Taps> = (x0..x0 + out_w).map(|x| taps(x, width, new_w)).collect();
    let rows: Vec<Taps> = (y0..y0 + out_h).map(|y| taps(y, height, new_h)).collect();
    // Source columns any kept output pixel reads.
    let first_col = cols.iter().map(|t| t.first).min().unwrap_or(0);
    let end_col = cols.iter().map(|t| t.first + t.weights.len()).max().unwrap_or(0);
    let span = (end_col - first_col) * 3;
    let src = image.as_raw();
    let stride = width as usize * 3;
    let h = out_h as usize;
    // First pass: the kept output rows over the needed source columns, stored transposed
    // (`by_column[j][row]` for value `j` of a row) so that the second pass, which weighs
    // neighbouring columns, runs along contiguous memory for all rows at once. Rows are made
    // in blocks that stay in cache while they are transposed.
    let mut by_column = vec![0f32; span * h];
    let mut block = vec![0f32; TRANSPOSE_ROWS * span];
    for first_row in (0..h).step_by(TRANSPOSE_ROWS) {
        let count = (h - first_row).min(TRANSPOSE_ROWS);
        for (row, taps) in block.chunks_exact_mut(span).zip(&rows[first_row..first_row + count]) {
            row.fill(0.0);
            for (i, &w) in taps.weights.iter().enumerate() {
                let at = (taps.first + i) * stride + first_col * 3;
                accumulate(row, &src[at..at + span], w);
            }
        }
        for (j, column) in by_column.chunks_exact_mut(h).enumerate() {
            for (q, v) in column[first_row..first_row + count].iter_mut().enumerate() {
                *v = block[q * span + j];
            }
        }
    }
    // Second pass: each kept output column from its source columns' three channel runs.
    let mut out = RgbImage::new(out_w, out_h);
    let out_stride = out_w as usize * 3;
    let mut sums = vec![0f32; 3 * h];
    let mut column = vec![0u8; 3 * h];
    for (k, taps) in cols.iter().enumerate() {
        sums.fill(0.0);
        for (i, &w) in taps.weights.iter().enumerate() {
            let at = (taps.first - first_col + i) * 3 * h;
            accumulate(&mut sums, &by_column[at..at + 3 * h], w);
        }
        to_bytes(&sums, &mut column);
        let dst = out.as_mut();
        for (c, channel) in column.chunks_exact(h).enumerate() {
            for (r, &v) in channel.iter().enumerate() {
                dst[r * out_stride + k * 3 + c] = v;
            }
        }
    }
    out
}

/// `image`'s conversion of a resampled value: clamped to `0..=255`, rounded half away from
/// zero.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn to_bytes(values: &[f32], out: &mut [u8]) {
    for (o, &v) in out.iter_mut().zip(values) {
        // `round` of a value in 0..=255, in a form that vectorises: the fraction `v - trunc(v)`
        // is exact, and a half rounds up (away from zero).
        let v = v.clamp(0.0, 255.0);
        let whole = v.trunc();
        *o = (whole + if v - whole >= 0.5 { 1.0 } else { 0.0 }) as u8;
    }
}

/// Rows of the first pass made together, then transposed.
const TRANSPOSE_ROWS: usize = 16;

/// `image::imageops::thumbnail(image, new_width, new_height)`, pixel for pixel: each output pixel
/// the rounded integer mean of its block of source pixels. Computed as sums of each block row's
/// columns, then of those column sums, instead of pixel by pixel through `get_pixel`. Sizes
/// where some output pixel's block holds no whole source pixel (`image` interpolates those;
/// preprocessing only shrinks by 2x or more) go to `image` itself.
pub fn thumbnail(image: &RgbImage, new_width: u32, new_height: u32) -> RgbImage {
    let (width, height) = image.dimensions();
    if width == 0 || height == 0 || new_width == 0 || new_height == 0 {
        return image::imageops::thumbnail(image, new_width, new_height);
    }
    let blocks = |len: u32, new_len: u32| -> Vec<(usize, usize)> {
        let ratio = len as f32 / new_len as f32;
        (0..new_len)
            .map(|out| {
                let startf = out as f32 * ratio;
                let endf = startf + ratio;
                let start = (startf.ceil() as u32).clamp(0, len - 1);
                let end = (endf.ceil() as u32).clamp(start, len);
                (start as usize, end as usize)
            })
            .collect()
    };
    let cols = blocks(width, new_width);
    let rows = blocks(height, new_height);
    if cols.iter().chain(&rows).any(|&(start, end)| start == end) {
        return image::imageops::thumbnail(image, new_width, new_height);
    }
    let src = image.as_raw();
    let stride = width as usize * 3;
    let mut out = RgbImage::new(new_width, new_height);
    let mut sums = vec![0u32; stride];
    for (dst, &(top, bottom)) in out.as_mut().chunks_exact_mut(new_width as usize * 3).zip(&rows) {
        sums.fill(0);
        for row in src[top * stride..bottom * stride].chunks_exact(stride) {
            add_row(&mut sums, row);
        }
        for (px, &(left, right)) in dst.chunks_exact_mut(3).zip(&cols) {
            let n = ((right - left) * (bottom - top)) as u32;
            let (mut r, mut g, mut b) = (0u32, 0u32, 0u32);
            for col in sums[left * 3..right * 3].chunks_exact(3) {
                r += col[0];
                g += col[1];
                b += col[2];
            }
            px[0] = ((r + n / 2) / n).min(255) as u8;
            px[1] = ((g + n / 2) / n).min(255) as u8;
            px[2] = ((b + n / 2) / n).min(255) as u8;
        }
    }
    out
}

/// `sums[j] += row[j]` for every `j`.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn add_row(sums: &mut [u32], row: &[u8]) {
    for (s, &v) in sums.iter_mut().zip(row) {
        *s += u32::from(v);
    }
}

/// `acc[j] += f32::from(src[j]) * w` for every `j` (a multiply, then an add: no fused
/// multiply-add, as in `image`).
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn accumulate<T: Copy + Into<f32>>(acc: &mut [f32], src: &[T], w: f32) {
    for (a, &s) in acc.iter_mut().zip(src) {
        *a += s.into() * w;
    }
}
#[cfg(test)]
mod tests {
    use image::imageops::FilterType;
    use image::{DynamicImage, Rgb};

    use super::*;

    fn reference(image: &RgbImage, size: u32) -> RgbImage {
        DynamicImage::ImageRgb8(image.clone()).resize_to_fill(size, size, FilterType::Triangle).into_rgb8()
    }

    fn noise(width: u32, height: u32, seed: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            let h = (x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663) ^ seed.wrapping_mul(83_492_791))
                .wrapping_mul(2_654_435_761);
            Rgb([(h >> 24) as u8, (h >> 16) as u8, (h >> 8) as u8])
        })
    }

    /// Down- and up-scaling, both orientations, odd sizes, squares, sizes equal to the target on
    /// one side, and elongated images: every pixel equal to `image`'s.
    #[test]
    fn matches_image_resize_to_fill_bit_for_bit() {
        let sizes = [
            (451, 300),
            (300, 451),
            (512, 341),
            (256, 256),
            (224, 224),
            (224, 300),
            (300, 224),
            (225, 300),
            (1200, 900),
            (897, 1201),
            (100, 80),
            (37, 500),
            (1, 1),
            (3, 700),
            (640, 1),
            (223, 224),
            (997, 991),
        ];
        for (seed, &(w, h)) in sizes.iter().enumerate() {
            let image = noise(w, h, seed as u32);
            for size in [224, 7, 1] {
                let got = resize_to_fill(&image, size);
                let want = reference(&image, size);
                assert_eq!(got.dimensions(), want.dimensions(), "{w}x{h} to {size}");
                assert!(got == want, "{w}x{h} to {size}: pixels differ");
            }
        }
    }

    /// The pre-shrink: block means like `image`'s, including sizes it interpolates.
    #[test]
    fn thumbnail_matches_image_bit_for_bit() {
        for (seed, (w, h, nw, nh)) in [
            (1200, 900, 598, 448),
            (2000, 2000, 448, 448),
            (997, 3001, 448, 1349),
            (900, 900, 449, 449),
            (50, 40, 25, 20),
            (50, 40, 30, 30),
            (10, 10, 20, 5),
            (7, 3, 7, 3),
        ]
        .into_iter()
        .enumerate()
        {
            let image = noise(w, h, seed as u32);
            let got = thumbnail(&image, nw, nh);
            assert!(got == image::imageops::thumbnail(&image, nw, nh), "{w}x{h} to {nw}x{nh}");
        }
    }

    /// Smooth images too (noise hides nothing, but gradients make rounding ties likely).
    #[test]
    fn matches_on_gradients() {
        for (w, h) in [(640, 480), (333, 777), (250, 249)] {
            let image = RgbImage::from_fn(w, h, |x, y| {
                Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) / 4 % 256) as u8])
            });
            assert!(resize_to_fill(&image, 224) == reference(&image, 224), "{w}x{h}");
        }
    }
}
