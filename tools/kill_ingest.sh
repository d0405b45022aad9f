#!/usr/bin/env bash
# Kill -9 of `vitrine ingest --data-dir` in the middle of a synthetic catalogue, then the same
# command again: the re-run must skip every row committed before the kill (its summary counts
# them as unchanged) and the index must end with every row exactly once.
#
#   tools/kill_ingest.sh [ROWS=5000] [KILL_AFTER_SECONDS=20]
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-5000}
after=${2:-20}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release --quiet --bin vitrine --example synth_catalog
target/release/examples/synth_catalog "$work/cat" "$rows"
cat_file="$work/cat/catalog.jsonl"
echo "== vitrine ingest, killed with SIGKILL after ${after}s"
target/release/vitrine ingest --data-dir "$work/data" --catalog "$cat_file" &
pid=$!
sleep "$after"
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
echo
echo "== the same command again"
target/release/vitrine ingest --data-dir "$work/data" --catalog "$cat_file"
echo
echo "== the result"
target/release/vitrine verify --data-dir "$work/data"
python3 - "$work/data/MANIFEST.json" "$rows" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
live = sum(s["count"] - s.get("deletes", {}).get("count", 0) for ix in m["indexes"].values() for s in ix["segments"])
print(f"live items in the index: {live} (catalogue rows: {sys.argv[2]})")
sys.exit(0 if live == int(sys.argv[2]) else 1)
PY
