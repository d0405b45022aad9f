#!/usr/bin/env bash
# tools/gpu_check.sh — the one script a GPU machine runs (issue 9), on stripped binaries built
# elsewhere with `--features cuda` (README "GPU"). It needs python3 (standard library; grpcio
# for step 6 only) and the CUDA 13 libraries; no Rust toolchain, no network. In order:
#   1. the GPU, the driver and the CUDA 13 libraries the binaries link (it adds the machine's
#      own CUDA 13 library folder to LD_LIBRARY_PATH when ldd finds one missing);
#   2. encoder correctness on the GPU, Lite0 and Lite2: average-pooled features of the
#      tests/fixtures images against tools/reference_features.py's (relative L2 error under
#      1e-3), the coffee image's top-1 ImageNet class (967, espresso), and the same features
#      from the plain-candle GPU path and from the CPU kernels of the same binary;
#   3. encoder throughput in images/s (network only, the images decoded beforehand) at batch
#      1, 32 and 128: vitrine's CUDA kernels, the plain-candle path (batch 128), the CPU;
#   4. `vitrine demo --exit --device cuda`: ingest of the bundled catalogue and its queries;
#   5. bulk ingest, end to end (catalogue read, decode, embed, store, index), of a catalogue
#      that repeats the bundled images under new SKUs: --device cuda, then --device cpu on a
#      smaller one;
#   6. `vitrine serve --device cuda` under 64 concurrent image queries (tools/image_load.py),
#      with query micro-batching (the GPU default) and without (--query-batch 1).
# Prints a summary table last; logs and JSON land in $OUT (default /tmp/vitrine-gpu-check).
#
#   tools/gpu_check.sh [BIN_DIR]   # BIN_DIR holds vitrine and encoder_bench (default .gpu)
#
# Build BIN_DIR here, on the CPU machine (it travels as a carried ignored path):
#   eval "$(tools/fetch_cuda.sh --env)"
#   cargo build --release --features cuda --target-dir target/cuda --bin vitrine --example encoder_bench
#   rm -rf .gpu && mkdir .gpu && cp target/cuda/release/vitrine target/cuda/release/examples/encoder_bench .gpu/
#   strip .gpu/* && xz -9e -T2 .gpu/*   # 57.6 + 46.6 MB; 8.6 + 5.6 MB as .xz
# Sizes: BULK_ROWS (default 40000) and CPU_BULK_ROWS (default 2000). GPU_DEVICE=cpu dry-runs
# every step on the CPU (the correctness step then fails: it wants features from a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-.gpu}
for f in "$BIN"/*.xz; do # unpack with python3's lzma: xz itself may not be installed there
  [[ -e $f ]] || continue
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$f" "${f%.xz}" && chmod +x "${f%.xz}" && rm -f "$f"
done
OUT=${OUT:-/tmp/vitrine-gpu-check}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/vitrine-gpu-work.XXXXXX)
BULK_ROWS=${BULK_ROWS:-40000}
CPU_BULK_ROWS=${CPU_BULK_ROWS:-2000}
DEV=${GPU_DEVICE:-cuda}
fail=0
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
step() { echo; echo "== $*"; }
say() { echo "$*" | tee -a "$SUMMARY"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

step "1. GPU, driver, libraries"
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader) || fail=1
say "gpu: $gpu; $(nproc) CPU cores"
if ldd "$BIN/vitrine" | grep -q 'not found'; then
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    "$(dirname "$(find /opt /usr/local /usr/lib -name 'libcublasLt.so.13' 2>/dev/null | head -1)" 2>/dev/null)"; do
    [[ -e $d/libcublasLt.so.13 ]] && export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} && break
  done
fi
if ldd "$BIN/vitrine" | grep -q 'not found'; then # cuRAND may sit in a folder of its own
  d=$(dirname "$(find /opt /usr/local /usr/lib -name 'libcurand.so.10' 2>/dev/null | head -1)" 2>/dev/null)
  [[ -n $d ]] && export LD_LIBRARY_PATH=$d:$LD_LIBRARY_PATH
fi
ldd "$BIN/vitrine" | grep -E 'cuda|cublas|nvrtc|curand|not found'
if ldd "$BIN/vitrine" | grep -q 'not found'; then echo "FAIL: libraries missing"; exit 1; fi
"$BIN/vitrine" --version || fail=1

step "2. encoder correctness"
# features MODEL DEVICE TAG [--generic]: pooled features and top-1 of two fixtures.
features() {
  local model=$1 device=$2 tag=$3 side
  shift 3
  side=224; [[ $model == efficientnet-lite2 ]] && side=260
  "$BIN/encoder_bench" --model "models/$model" --device "$device" "$@" --batches 1 --seconds 0 --top1 \
    --features-out "$OUT/$tag.f32" "tests/fixtures/chelsea_$side.png" "tests/fixtures/coffee_$side.png" \
    >"$OUT/$tag.json" 2>"$OUT/$tag.err" || { echo "FAIL: $tag did not run"; tail -5 "$OUT/$tag.err"; fail=1; }
}
for m in efficientnet-lite0 efficientnet-lite2; do
  features $m "$DEV" "$m.cuda"
  features $m "$DEV" "$m.cuda-generic" --generic
  features $m cpu "$m.cpu"
done
python3 - "$OUT" <<'EOF' | tee -a "$SUMMARY" || fail=1
import array, json, math, os, sys
out = sys.argv[1]
def load(p):
    a = array.array("f")
    a.frombytes(open(p, "rb").read())
    return a
def rel(a, b):
    if len(a) != len(b) or not all(math.isfinite(x) for x in a):
        return math.inf
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b))) / math.sqrt(sum(y * y for y in b))
ok = True
for model, side in (("efficientnet-lite0", 224), ("efficientnet-lite2", 260)):
    ref = load(f"tests/fixtures/chelsea_{side}.features.f32") + load(f"tests/fixtures/coffee_{side}.features.f32")
    runs = {}
    for kind in ("cuda", "cuda-generic", "cpu"):
        p = f"{out}/{model}.{kind}.f32"
        if os.path.exists(p) and os.path.getsize(p) == 4 * len(ref):
            runs[kind] = (load(p), json.load(open(f"{out}/{model}.{kind}.json")))
    if "cuda" not in runs:
        print(f"{model}: FAIL, no GPU features"); ok = False; continue
    feats, meta = runs["cuda"]
    err = rel(feats, ref)
    top1 = meta.get("top1")
    good = meta["device"] == "cuda" and err < 1e-3 and top1 == [285, 967]
    ok &= good
    line = f"{model}: GPU (vitrine kernels) vs reference rel L2 {err:.2e}, top-1 chelsea/coffee {top1} -> {'ok' if good else 'FAIL'}"
    for kind in ("cuda-generic", "cpu"):
        if kind in runs:
            line += f"; vs {kind} {rel(feats, runs[kind][0]):.2e}"
    print(line)
sys.exit(0 if ok else 1)
EOF

step "3. encoder throughput (images/s, network only)"
bench() { # tag, then encoder_bench arguments
  local tag=$1
  shift
  "$BIN/encoder_bench" "$@" data/images/* >"$OUT/$tag.json" 2>"$OUT/$tag.err" || { echo "FAIL: $tag"; tail -5 "$OUT/$tag.err"; fail=1; }
  say "$tag: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["images_per_sec"])' "$OUT/$tag.json" 2>/dev/null)"
}
bench lite0-gpu --model models/efficientnet-lite0 --device "$DEV" --batches 1,32,128 --seconds 5
bench lite0-gpu-generic --model models/efficientnet-lite0 --device "$DEV" --generic --batches 128 --seconds 3
bench lite2-gpu --model models/efficientnet-lite2 --device "$DEV" --batches 128 --seconds 3
bench lite0-cpu --model models/efficientnet-lite0 --device cpu --batches 1,32 --seconds 3

step "4. vitrine demo --exit --device $DEV (bundled catalogue)"
q=data/queries
start=$(now_ms)
"$BIN/vitrine" demo --exit --device "$DEV" --models models --catalog data/catalog.jsonl --data-dir "$WORK/demo" \
  --listen 127.0.0.1:50151 --query $q/coffee-crop-rotated.jpg --query $q/motorcycle-right.jpg \
  --query $q/openmoji-1F455-on-blue.jpg --query $q/openmoji-1F3B8-outline.png \
  >"$OUT/demo.log" 2>&1 || { echo "FAIL: demo"; fail=1; }
say "demo --exit --device $DEV: $(( $(now_ms) - start )) ms; $(grep -m1 '^ingested' "$OUT/demo.log")"
grep -E 'encoder device|^embedded|^  1\.' "$OUT/demo.log" | head -8

step "5. bulk ingest, end to end"
# catalogue ROWS FILE: the bundled rows again and again under new SKUs (images stay the files
# of data/images, so the catalogue lives in data/ beside them).
catalogue() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open("data/catalog.jsonl") if l.strip()]
with open(sys.argv[2], "w") as f:
    for i in range(int(sys.argv[1])):
        r = dict(rows[i % len(rows)])
        r["sku"] = f"BULK-{i:08d}"
        f.write(json.dumps(r) + "\n")
EOF
}
ingest() { # tag device rows
  local tag=$1 device=$2 rows=$3 start ms
  catalogue "$rows" "data/bulk-$tag.jsonl"
  start=$(now_ms)
  "$BIN/vitrine" ingest --device "$device" --quiet --data-dir "$WORK/bulk-$tag" --catalog "data/bulk-$tag.jsonl" \
    >"$OUT/ingest-$tag.log" 2>&1 || { echo "FAIL: ingest $tag"; tail -5 "$OUT/ingest-$tag.log"; fail=1; }
  ms=$(( $(now_ms) - start ))
  say "ingest --device $device, $rows rows: $ms ms, $(( rows * 1000 / (ms > 0 ? ms : 1) )) rows/s end to end; $(grep -m1 '^embedded' "$OUT/ingest-$tag.log")"
  rm -rf "$WORK/bulk-$tag" "data/bulk-$tag.jsonl"
}
ingest gpu "$DEV" "$BULK_ROWS"
ingest cpu cpu "$CPU_BULK_ROWS"

step "6. serve --device $DEV: 64 concurrent image queries, with and without micro-batching"
load() { # tag, then serve arguments
  local tag=$1 pid
  shift
  "$BIN/vitrine" serve --device "$DEV" --data-dir "$WORK/demo" --listen 127.0.0.1:50152 "$@" >"$OUT/serve-$tag.log" 2>&1 &
  pid=$!
  python3 tools/image_load.py --addr 127.0.0.1:50152 --concurrency 64 --seconds 5 data/images/*.jpg \
    >"$OUT/load-$tag.json" 2>"$OUT/load-$tag.err" || { echo "FAIL: load $tag"; tail -3 "$OUT/load-$tag.err"; fail=1; }
  kill -INT $pid; wait $pid
  say "serve $tag: $(cat "$OUT/load-$tag.json")"
}
if python3 -c 'import grpc' 2>/dev/null; then
  load batched
  load unbatched --query-batch 1
else
  say "serve: skipped (python3 has no grpcio)"
fi
rm -rf "$WORK"

echo; echo "== summary"; cat "$SUMMARY"
echo; [[ $fail == 0 ]] && echo "gpu_check: all passed" || echo "gpu_check: FAILED"
exit $fail
