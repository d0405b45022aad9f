//! The image encoder: preprocessing and the Candle EfficientNet-Lite network, behind one
//! [`Encoder`] that turns image bytes into L2-normalised embeddings.
//!
//! A model lives in a folder named after its version (`models/<version>/`) holding
//! `manifest.json` ([`ModelManifest`]) and the safetensors weights the manifest names and
//! checksums. Loading refuses a weights file whose sha256 differs from the manifest's, and
//! weights whose layout is not the manifest's architecture.
//!
//! Embeddings ([`Encoder::embed`]) are the head's feature map pooled as the manifest's
//! [`Pooling`] says (average by default, or GeM), then L2-normalised. Classification
//! ([`Encoder::classify`]) always average-pools, as the classifier was trained.

mod arena;
mod fused;
mod lite;
pub mod manifest;
mod pointwise;
mod pool;
pub mod preprocess;
mod resize;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::ids::ModelVersion;
pub use lite::{Kernels, WeightsError};
pub use manifest::{Architecture, ManifestError, ManifestInvalid, ModelManifest, Normalisation, Pooling};
pub use preprocess::{PreparedImage, PreprocessError};

/// Images per forward pass on the CPU. The network runs its large early layers image by image
/// anyway (so their activations stay in cache), and batches the rest, where larger batches
/// reuse each weight panel over more rows: Lite0 on 2 threads measured 155, 160, 162 and 164
/// images/s at batches 4, 8, 16 and 32 (`encoder::lite::profile::network`). 16 keeps a
/// chunk's activations small (2 MB where the batched layers start).
pub const CPU_FORWARD_BATCH: usize = 16;
/// Images per forward pass on a GPU (bounds activation memory).
pub const GPU_FORWARD_BATCH: usize = 128;

/// Images per embedding call for bulk work (ingest, backfill) on `device`: enough to fill a
/// GPU's forward pass; on the CPU the network runs [`CPU_FORWARD_BATCH`] at a time anyway.
pub fn default_batch(device: &Device) -> usize {
    if device.is_cpu() { 32 } else { GPU_FORWARD_BATCH }
}

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "model folder {dir} does not match the manifest's version {version:?} (the folder must be named after the version)"
    )]
    FolderVersion { dir: PathBuf, version: ModelVersion },
    #[error("cannot read model weights {path}")]
    ReadWeights {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model weights {path} have sha256 {actual}, but the manifest says {expected}")]
    Checksum { path: PathBuf, expected: String, actual: String },
    #[error("model weights {path} are not a valid safetensors file")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("model weights {path} are not an EfficientNet-Lite network")]
    Weights {
        path: PathBuf,
        #[source]
        source: Box<WeightsError>,
    },
    #[error("model weights {path} give {field} = {from_weights}, but the manifest says {in_manifest}")]
    Disagrees { path: PathBuf, field: &'static str, in_manifest: usize, from_weights: usize },
    #[error(
        "image {index} of the batch is {actual}x{actual} pixels; model {version} takes {expected}x{expected}"
    )]
    InputSize { version: ModelVersion, index: usize, actual: u32, expected: u32 },
    #[error("image {index} of the batch gave an all-zero feature vector, which has no direction")]
    ZeroEmbedding { index: usize },
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error("inference with model {version} failed")]
    Inference {
        version: ModelVersion,
        #[source]
        source: candle_core::Error,
    },
}

/// Where the encoder runs, as `--device` chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceChoice {
    /// CUDA when this build has it and GPU 0 is usable, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// GPU 0; an error if this build lacks the `cuda` feature or the GPU is not usable.
    Cuda,
}

/// Why `--device cuda` cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "--device cuda: this vitrine was built without CUDA (build with `cargo build --release --features cuda`, see README \"GPU\")"
    )]
    NotBuilt,
    #[error("--device cuda: GPU 0 is not usable: {0}")]
    Unusable(String),
}

/// The device for `choice`: [`default_device`] for `Auto`.
pub fn select_device(choice: DeviceChoice) -> Result<Device, DeviceError> {
    match choice {
        DeviceChoice::Auto => default_device().map_err(|e| DeviceError::Unusable(cause(e))),
        DeviceChoice::Cpu => {
            warm_cpu_pools();
            Ok(Device::Cpu)
        }
        DeviceChoice::Cuda if !cfg!(feature = "cuda") => Err(DeviceError::NotBuilt),
        DeviceChoice::Cuda => Device::new_cuda(0).map_err(|e| DeviceError::Unusable(cause(e))),
    }
}

/// How logs and status name `device`: `cpu (N threads)` or `cuda:ORDINAL`.
pub fn describe_device(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// A candle error's message without the backtrace candle adds under RUST_BACKTRACE.
fn cause(e: candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => inner.to_string(),
        e => e.to_string(),
    }
}

/// The best device available: CUDA when built with the `cuda` feature and a GPU is present,
/// otherwise the CPU. A `cuda` build on a machine without a usable GPU (no driver, no device,
/// or the stub libcuda of tools/fetch_cuda.sh) logs why and falls back to the CPU.
pub fn default_device() -> candle_core::Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        warm_cpu_pools();
        return Ok(Device::Cpu);
    }
    match Device::new_cuda(0) {
        Ok(device) => Ok(device),
        Err(e) => {
            let cause = cause(e);
            tracing::warn!("built with CUDA but GPU 0 is not usable ({cause}); encoding on the CPU");
            warm_cpu_pools();
            Ok(Device::Cpu)
        }
    }
}

/// Starts candle's CPU thread pools (its rayon pool and its barrier pool) from the calling
/// thread. Threads inherit their creator's scheduling class, and candle creates these pools
/// on first use: if that were a background thread (a canary backfill, in the idle class),
/// every later query's embedding would run on idle-class threads.
pub fn warm_cpu_pools() {
    candle_core::utils::with_threadpool(|| ());
    let _ = candle_core::utils::barrier_pool();
}

/// The head's final feature map of one image, before pooling.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMap {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    /// `height * width * channels` values, channels last (HWC).
    pub data: Vec<f32>,
}

/// A loaded model: preprocessing settings plus the network, ready to embed images.
/// `Send + Sync`; share one behind an `Arc`.
#[derive(Debug)]
pub struct Encoder {
    manifest: ModelManifest,
    net: lite::LiteNet,
    device: Device,
}

impl Encoder {
    /// Loads `model_dir/manifest.json` and the weights it names onto `device`, checking the
    /// weights' sha256 and that they agree with the manifest.
    pub fn load(model_dir: &Path, device: &Device) -> Result<Self, EncoderError> {
        let manifest = ModelManifest::load(&model_dir.join(ModelManifest::FILE_NAME))?;
        let folder = match model_dir.file_name() {
            Some(name) => Some(name.to_os_string()),
            None => {
                std::fs::canonicalize(model_dir).ok().and_then(|p| p.file_name().map(|n| n.to_os_string()))
            }
        };
        if folder.as_deref() != Some(manifest.version.as_str().as_ref()) {
            return Err(EncoderError::FolderVersion {
                dir: model_dir.to_path_buf(),
                version: manifest.version.clone(),
            });
        }

        let path = model_dir.join(&manifest.weights);
        let bytes = std::fs::read(&path)
            .map_err(|source| EncoderError::ReadWeights { path: path.clone(), source })?;
        let actual = hex(&Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(&manifest.sha256) {
            return Err(EncoderError::Checksum { path, expected: manifest.sha256.clone(), actual });
        }
        // The tensors are parsed from the very bytes that were hashed.
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|source| EncoderError::Safetensors { path: path.clone(), source })?;
        drop(bytes);
        let net = lite::LiteNet::from_tensors(tensors)
            .map_err(|source| EncoderError::Weights { path: path.clone(), source: Box::new(source) })?;
        let (blocks, last_channels) = manifest.architecture.expected_layout();
        for (field, in_manifest, from_weights) in [
            ("dim", manifest.dim, net.feature_dim()),
            ("num_classes", manifest.num_classes, net.num_classes()),
            ("blocks (from the architecture)", blocks, net.num_blocks()),
            ("last block channels (from the architecture)", last_channels, net.last_block_channels()),
        ] {
            if in_manifest != from_weights {
                return Err(EncoderError::Disagrees { path, field, in_manifest, from_weights });
            }
        }
        Ok(Self { manifest, net, device: device.clone() })
    }

    /// Runs with `kernels` instead of the fastest for the device: [`Kernels::Generic`] on the
    /// CPU exercises the plain-candle path that GPUs take (tests compare the two).
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.net = self.net.with_kernels(kernels);
        self
    }

    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    pub fn version(&self) -> &ModelVersion {
        &self.manifest.version
    }

    /// Length of an embedding.
    pub fn dim(&self) -> usize {
        self.manifest.dim
    }

    /// Side of the square network input, in pixels.
    pub fn input_size(&self) -> u32 {
        self.manifest.input_size
    }

    /// How embeddings are pooled (the manifest's `pooling`).
    pub fn pooling(&self) -> Pooling {
        self.manifest.pooling
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Decodes and prepares one image with this model's input size and normalisation.
    pub fn preprocess(&self, bytes: &[u8]) -> Result<PreparedImage, PreprocessError> {
        preprocess::preprocess(bytes, self.manifest.input_size, &self.manifest.normalisation)
    }

    /// L2-normalised embeddings, one per image, in order: [`embedding_features`](Self::embedding_features)
    /// divided by their L2 norm.
    pub fn embed(&self, batch: &[PreparedImage]) -> Result<Vec<Vec<f32>>, EncoderError> {
        let mut out = self.embedding_features(batch)?;
        for (index, v) in out.iter_mut().enumerate() {
            let norm = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
            if !(norm.is_finite() && norm > 0.0) {
                return Err(EncoderError::ZeroEmbedding { index });
            }
            let inv = (1.0 / norm) as f32;
            v.iter_mut().for_each(|x| *x *= inv);
        }
        Ok(out)
    }

    /// Decodes, prepares and embeds each image; a bad image fails alone, not the batch.
    pub fn embed_bytes(&self, images: &[&[u8]]) -> Vec<Result<Vec<f32>, EncoderError>> {
        let prepared: Vec<Result<PreparedImage, PreprocessError>> = images
            .par_iter()
            .map(|bytes| {
                crate::background::yield_point();
                self.preprocess(bytes)
            })
            .collect();
        let mut slots = Vec::with_capacity(prepared.len());
        let mut good = Vec::with_capacity(prepared.len());
        for p in prepared {
            match p {
                Ok(image) => {
                    good.push(image);
                    slots.push(None);
                }
                Err(e) => slots.push(Some(EncoderError::Preprocess(e))),
            }
        }
        let mut embedded = self.embed_each(&good).into_iter();
        slots
            .into_iter()
            .map(|slot| match slot {
                Some(err) => Err(err),
                None => embedded.next().unwrap_or_else(|| unreachable!("one result per good image")),
            })
            .collect()
    }

    /// [`embed`](Self::embed) with one result per image: when the batch fails, the images run
    /// one by one so the failure lands on the image(s) that caused it, not the whole batch.
    pub fn embed_each(&self, batch: &[PreparedImage]) -> Vec<Result<Vec<f32>, EncoderError>> {
        match self.embed(batch) {
            Ok(vectors) => vectors.into_iter().map(Ok).collect(),
            Err(_) => batch.iter().map(|p| self.embed_one(p)).collect(),
        }
    }

    /// The L2-normalised embedding of one prepared image.
    pub fn embed_one(&self, image: &PreparedImage) -> Result<Vec<f32>, EncoderError> {
        let mut v = self.embed(std::slice::from_ref(image))?;
        Ok(v.pop().unwrap_or_default())
    }

    /// Globally average-pooled features (`dim` values per image), whatever the manifest's
    /// pooling: the network's own features, the classifier's input.
    pub fn pooled_features(&self, batch: &[PreparedImage]) -> Result<Vec<Vec<f32>>, EncoderError> {
        self.run_pooled(batch, Pooling::Average)
    }

    /// Features pooled as the manifest says, before L2 normalisation (`dim` values per image):
    /// what [`embed`](Self::embed) normalises. Equal to [`pooled_features`](Self::pooled_features)
    /// under average pooling.
    pub fn embedding_features(&self, batch: &[PreparedImage]) -> Result<Vec<Vec<f32>>, EncoderError> {
        self.run_pooled(batch, self.manifest.pooling)
    }

    /// The head's feature maps before pooling, one per image (for tests and analysis; large:
    /// `side * side * dim` values each).
    pub fn feature_maps(&self, batch: &[PreparedImage]) -> Result<Vec<FeatureMap>, EncoderError> {
        let side = self.net.feature_map_side(self.manifest.input_size as usize);
        let channels = self.net.feature_dim();
        let rows = self.run(batch, |net, x| {
            let map = net.feature_map(x)?;
            let n = map.dim(0)?;
            map.reshape((n, side * side * channels))
        })?;
        Ok(rows.into_iter().map(|data| FeatureMap { height: side, width: side, channels, data }).collect())
    }

    /// ImageNet logits (`num_classes` values per image), from average-pooled features whatever
    /// the manifest's pooling (the classifier was trained on average pooling).
    pub fn classify(&self, batch: &[PreparedImage]) -> Result<Vec<Vec<f32>>, EncoderError> {
        self.run(batch, |net, x| net.logits(&net.pooled_features(x)?))
    }

    /// Features pooled with `pooling`, per image: on the CPU with the own kernels, pooled
    /// straight from the forward pass's buffers, each image's data read where it is
    /// ([`lite::LiteNet::pools_on_buffers`]: no batch tensor assembled, no feature map copied
    /// out; 2.4% more Lite0 images/s at batch 1); elsewhere through candle tensors. The same
    /// values either way.
    fn run_pooled(&self, batch: &[PreparedImage], pooling: Pooling) -> Result<Vec<Vec<f32>>, EncoderError> {
        let s = self.manifest.input_size as usize;
        let dim = self.net.feature_dim();
        if !(self.device.is_cpu() && self.net.pools_on_buffers()) {
            return self.run(batch, |net, x| net.pool(&net.feature_map(x)?, pooling));
        }
        self.run_chunks(batch, |chunk| {
            let images: Vec<&[f32]> = chunk.iter().map(PreparedImage::data).collect();
            let pooled = self.net.pooled_cpu(&images, (3, s, s), pooling)?;
            Ok(pooled.chunks_exact(dim).map(<[f32]>::to_vec).collect())
        })
    }

    /// Runs `f` on a batch tensor of each chunk of the batch ([`run_chunks`](Self::run_chunks)).
    fn run<F>(&self, batch: &[PreparedImage], f: F) -> Result<Vec<Vec<f32>>, EncoderError>
    where
        F: Fn(&lite::LiteNet, &Tensor) -> candle_core::Result<Tensor> + Sync,
    {
        let s = self.manifest.input_size as usize;
        self.run_chunks(batch, |chunk| {
            let x = if self.device.is_cpu() {
                let mut data = Vec::with_capacity(chunk.len() * 3 * s * s);
                for image in chunk {
                    data.extend_from_slice(image.data());
                }
                Tensor::from_vec(data, (chunk.len(), 3, s, s), &self.device)?
            } else {
                // Each image straight to the device, joined there: no host-side copy of
                // the whole batch (77 MB at 128 Lite0 images) before the transfer.
                let parts = chunk
                    .iter()
                    .map(|image| Tensor::from_slice(image.data(), (1, 3, s, s), &self.device))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?
            };
            f(&self.net, &x)?.to_vec2::<f32>()
        })
    }

    /// Checks input sizes, then runs `forward` on chunks of at most [`CPU_FORWARD_BATCH`] (or
    /// [`GPU_FORWARD_BATCH`]) images, one row of output per image.
    fn run_chunks<F>(&self, batch: &[PreparedImage], forward: F) -> Result<Vec<Vec<f32>>, EncoderError>
    where
        F: Fn(&[PreparedImage]) -> candle_core::Result<Vec<Vec<f32>>> + Sync,
    {
        let size = self.manifest.input_size;
        let plane = 3 * size as usize * size as usize;
        for (index, image) in batch.iter().enumerate() {
            if image.size() != size || image.data().len() != plane {
                return Err(EncoderError::InputSize {
                    version: self.manifest.version.clone(),
                    index,
                    actual: image.size(),
                    expected: size,
                });
            }
        }
        let mut out = Vec::with_capacity(batch.len());
        let chunk_size = if self.device.is_cpu() { CPU_FORWARD_BATCH } else { GPU_FORWARD_BATCH };
        // Called from inside a rayon pool (the idle-class backfill pool of
        // `crate::background`), the network runs on that pool, so a background embedding
        // keeps its thread count and priority. Otherwise it runs on candle's own CPU pool
        // (`Device::with_context`), whose threads stay warm across the forward pass's many
        // short parallel sections.
        let in_caller_pool = rayon::current_thread_index().is_some();
        for chunk in batch.chunks(chunk_size) {
            let rows =
                if in_caller_pool { forward(chunk) } else { self.device.with_context(|| forward(chunk)) }
                    .map_err(|source| EncoderError::Inference {
                        version: self.manifest.version.clone(),
                        source,
                    })?;
            out.extend(rows);
        }
        Ok(out)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `len` zeros, written by every thread of the pool when there are many (a 1.6 MB output
/// zeroed on one thread is a third of Lite0's stem on two threads).
pub(in crate::encoder) fn zeroed(len: usize) -> Vec<f32> {
    if len < 1 << 16 || rayon::current_num_threads() < 2 {
        return vec![0f32; len];
    }
    let mut out = Vec::new();
    rayon::iter::repeat_n(0f32, len).collect_into_vec(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Encoder>();
    }

    #[test]
    fn cpu_is_always_available_and_cuda_only_in_cuda_builds() {
        assert!(select_device(DeviceChoice::Cpu).unwrap().is_cpu());
        if !cfg!(feature = "cuda") {
            let err = select_device(DeviceChoice::Cuda).unwrap_err();
            assert!(matches!(err, DeviceError::NotBuilt));
            assert!(err.to_string().contains("--features cuda"), "{err}");
            assert!(select_device(DeviceChoice::Auto).unwrap().is_cpu());
        }
    }

    #[test]
    fn hex_is_lower_case() {
        assert_eq!(hex(&[0x00, 0xab, 0x0f]), "00ab0f");
    }

    /// The SIMD targets of every `#[multiversion]` kernel of the encoder. The attribute takes only
    /// literal strings, so each kernel spells the list out; this test keeps them all equal.
    /// AVX-512 is not in it: measured on an AVX-512 Xeon (2 vCPUs), its builds ran the encoder
    /// at 15 images/s against 166 (the 8-row pointwise tile compiled to gathers and scatters;
    /// the AVX2 tile itself at 0.85x), and searches and graph builds no faster (ann_bench,
    /// 100k x 1280: QPS within 5% either way, 20k build 7.0-7.9 s vs 7.7-8.4 s). The 1x1
    /// kernel's AVX-512 tiles are explicit pulp vectors (`pointwise::avx512`) instead.
    const SIMD_TARGETS: &str = r#""x86_64+avx2+fma", "aarch64+neon""#;

    #[test]
    fn every_simd_kernel_has_the_one_target_list() {
        // The whole crate (encoder kernels, segment search and build): one list, so no kernel
        // silently runs a narrower vector width than the others on the same CPU.
        // Built from two pieces so that this test's own source does not count as an attribute.
        let marker = concat!("#[multi", "version(targets(");
        let mut paths = vec![PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
        let mut kernels = 0;
        while let Some(path) = paths.pop() {
            if path.is_dir() {
                paths.extend(std::fs::read_dir(&path).unwrap().map(|entry| entry.unwrap().path()));
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            for (at, _) in source.match_indices(marker) {
                let rest = &source[at + marker.len()..];
                let list = &rest[..rest.find("))]").expect("the attribute closes")];
                let list = list.split_whitespace().collect::<Vec<_>>().join(" ");
                // A kernel built on one instruction the common list lacks (a popcount) may put
                // one target with it first; the rest is the common list.
                let common = list.strip_prefix(concat!(r#""x86_64+avx512f+avx512vl+avx512vpopcntdq""#, ", "));
                assert_eq!(common.unwrap_or(&list), SIMD_TARGETS, "SIMD targets in {}", path.display());
                kernels += 1;
            }
        }
        assert!(kernels >= 9, "found only {kernels} multiversion kernels under src");
    }
}
