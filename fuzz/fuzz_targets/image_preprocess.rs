//! Fuzz target: any bytes as an uploaded image, through `preprocess` (format sniffing, size
//! and decoding budgets, EXIF orientation, alpha over white, resize, crop, normalisation).
//! Run with `-rss_limit_mb=2048`: a decompression bomb or an oversized intermediate image
//! shows up as a memory-limit crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vitrine::encoder::Normalisation;
use vitrine::encoder::preprocess::preprocess;

const NORM: Normalisation = Normalisation { mean: [123.675, 116.28, 103.53], std: [58.395, 57.12, 57.375] };
const SIZE: u32 = 224;

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = preprocess(data, SIZE, &NORM) {
        assert_eq!(image.size(), SIZE);
        assert_eq!(image.data().len(), 3 * (SIZE * SIZE) as usize);
        assert!(image.data().iter().all(|x| x.is_finite()));
    }
});
