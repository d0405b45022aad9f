//! Compiles proto/vitrine/v1/vitrine.proto with a vendored protoc (nothing to install) and,
//! under the `cuda` feature, the encoder's CUDA kernels to PTX with nvcc.

use std::path::Path;
use std::process::Command;

/// `src/encoder/lite/kernels.cu` -> `$OUT_DIR/encoder_kernels.ptx`. The PTX targets
/// `compute_$CUDA_COMPUTE_CAP` (default 75, the oldest CUDA 13 supports): the driver compiles
/// it for the GPU it finds, so one build serves every GPU from Turing on.
fn compile_cuda_kernels(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let src = "src/encoder/lite/kernels.cu";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".to_string());
    let nvcc = match std::env::var_os("CUDA_HOME") {
        Some(home) if Path::new(&home).join("bin/nvcc").exists() => Path::new(&home).join("bin/nvcc"),
        _ => "nvcc".into(),
    };
    let ptx = out.join("encoder_kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["-ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&ptx)
        .arg(src)
        .status()
        .map_err(|e| format!("cannot run {} (see README, GPU: tools/fetch_cuda.sh): {e}", nvcc.display()))?;
    if !status.success() {
        return Err(format!("{} failed on {src} ({status})", nvcc.display()).into());
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The vendored protoc's include folder holds google/protobuf/struct.proto.
    let well_known = protoc_bin_vendored::include_path()?;
    let well_known = well_known.to_str().ok_or("protoc include path is not UTF-8")?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("vitrine_descriptor.bin"))
        .compile_with_config(config, &["proto/vitrine/v1/vitrine.proto"], &["proto", well_known])?;
    println!("cargo:rerun-if-changed=proto");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_cuda_kernels(&out)?;
    }
    Ok(())
}
