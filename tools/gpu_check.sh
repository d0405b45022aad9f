#!/usr/bin/env bash
# tools/gpu_check.sh — DRAFT, UNTESTED on a GPU (dry-run here on the CPU fallback only): the
# one script a GPU session runs (issue 9) against binaries built elsewhere with
# `--features cuda` (README "GPU"). Checks, in order:
#   1. the binaries find the driver and the CUDA 13 libraries (adds the machine's own
#      CUDA 13 library folder to LD_LIBRARY_PATH when ldd finds one missing);
#   2. encoder correctness on the GPU: average-pooled features (encoder_bench --features-out)
#      of the tests/fixtures images against tools/reference_features.py's, Lite0 and Lite2
#      (relative L2 error under 1e-3; on the CPU here both come out near 1e-6);
#   3. ingest of the bundled catalogue and its queries (`vitrine demo --exit`), timed;
#   4. encoder throughput at batch 1, 32 and 128 on the GPU, then on the CPU of the same
#      binary (CUDA_VISIBLE_DEVICES= makes default_device fall back).
# Needs python3 (standard library only); no Rust toolchain, no network.
#
#   tools/gpu_check.sh [BIN_DIR]   # BIN_DIR holds stripped vitrine and encoder_bench (default .gpu)
#
# Build BIN_DIR here, on the CPU machine (it travels as a carried ignored path):
#   eval "$(tools/fetch_cuda.sh --env)"
#   cargo build --release --features cuda --bin vitrine --example encoder_bench
#   mkdir -p .gpu && cp target/release/vitrine target/release/examples/encoder_bench .gpu/
#   strip .gpu/* && xz -T1 .gpu/*   # vitrine 57 MB, encoder_bench 46 MB; 8.9 + 5.9 MB as .xz
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-.gpu}
for f in "$BIN"/*.xz; do # unpack with python3's lzma: xz itself may not be installed there
  [[ -e $f ]] || continue
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$f" "${f%.xz}" && chmod +x "${f%.xz}" && rm -f "$f"
done
OUT=${OUT:-/tmp/vitrine-gpu-check}
rm -rf "$OUT" && mkdir -p "$OUT"
fail=0
step() { echo; echo "== $*"; }

step "GPU and driver"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || fail=1

step "libraries"
if ldd "$BIN/vitrine" | grep -q 'not found'; then
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    "$(dirname "$(find /opt /usr/local -name 'libcublasLt.so.13' 2>/dev/null | head -1)" 2>/dev/null)"; do
    [[ -e $d/libcublasLt.so.13 ]] && export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} && break
  done
fi
ldd "$BIN/vitrine" | grep -E 'cuda|cublas|nvrtc|curand|stdc\+\+|not found'
if ldd "$BIN/vitrine" | grep -q 'not found'; then echo "FAIL: libraries missing"; exit 1; fi
"$BIN/vitrine" --version || fail=1

step "encoder correctness (GPU vs tools/reference_features.py)"
check() { # model image reference
  "$BIN/encoder_bench" --model "models/$1" --batches 1 --seconds 0 \
    --features-out "$OUT/$1.f32" "tests/fixtures/$2" >"$OUT/$1.json" || { echo "FAIL: $1 did not run"; fail=1; return; }
  python3 - "$OUT/$1.f32" "tests/fixtures/$3" "$1" "$OUT/$1.json" <<'EOF' || fail=1
import array, json, math, sys
def load(p):
    a = array.array("f")
    a.frombytes(open(p, "rb").read())  # little-endian f32 on x86-64
    return a
got, ref = load(sys.argv[1]), load(sys.argv[2])
dev = json.load(open(sys.argv[4]))["device"]
same = len(got) == len(ref) and all(math.isfinite(g) for g in got)
norm = lambda v: math.sqrt(sum(x * x for x in v))
rel = norm([g - r for g, r in zip(got, ref)]) / norm(ref) if same else math.inf
cos = sum(g * r for g, r in zip(got, ref)) / (norm(got) * norm(ref)) if same else math.nan
ok = dev == "cuda" and same and rel < 1e-3
print(f"{sys.argv[3]}: device {dev}, {len(got)} values, rel L2 {rel:.2e}, cosine {cos:.8f} -> {'ok' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
EOF
}
check efficientnet-lite0 chelsea_224.png chelsea_224.features.f32
check efficientnet-lite2 chelsea_260.png chelsea_260.features.f32

step "ingest of the bundled catalogue and its queries"
start=$(date +%s%N)
q=data/queries
"$BIN/vitrine" demo --exit --models models --catalog data/catalog.jsonl --data-dir "$OUT/demo" \
  --listen 127.0.0.1:50151 --query $q/coffee-crop-rotated.jpg --query $q/motorcycle-right.jpg \
  --query $q/openmoji-1F455-on-blue.jpg --query $q/openmoji-1F3B8-outline.png \
  >"$OUT/demo.log" 2>&1 || fail=1
echo "demo --exit: $(( ($(date +%s%N) - start) / 1000000 )) ms (log: $OUT/demo.log)"
tail -20 "$OUT/demo.log"

step "throughput, images/s (GPU, then the same binary on the CPU)"
"$BIN/encoder_bench" --model models/efficientnet-lite0 --batches 1,32,128 --seconds 10 data/images/* || fail=1
CUDA_VISIBLE_DEVICES= "$BIN/encoder_bench" --model models/efficientnet-lite0 --batches 1,32,128 \
  --seconds 10 data/images/* || fail=1

echo; [[ $fail == 0 ]] && echo "gpu_check: all passed" || echo "gpu_check: FAILED"
exit $fail
