//! The CUDA kernels' index arithmetic, checked without a GPU: tests/cuda_emulation/kernels.cpp
//! includes src/encoder/lite/kernels.cu, compiles it as plain C++ with the host compiler and
//! runs every kernel on small grids against references written another way.

use std::path::Path;
use std::process::Command;

#[test]
fn cuda_kernels_match_references_under_host_emulation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = dir.path().join("kernels");
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let built = Command::new(&compiler)
        .args(["-O1", "-std=c++17", "-o"])
        .arg(&exe)
        .arg(root.join("tests/cuda_emulation/kernels.cpp"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {compiler} (set CXX): {e}"));
    assert!(built.status.success(), "compiling failed:\n{}", String::from_utf8_lossy(&built.stderr));
    let run = Command::new(&exe).output().expect("run the emulated kernels");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success() && stdout.contains("fails 0"), "emulated kernels differ:\n{stdout}");
}
