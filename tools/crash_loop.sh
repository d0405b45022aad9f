#!/usr/bin/env bash
# Runs the crash test (tests/suite/crash.rs) for many rounds in release: each round SIGKILLs a
# `vitrine serve` under concurrent writes, restarts it and checks every acknowledged write.
#
#   tools/crash_loop.sh 500          # 500 rounds, random seed (printed)
#   tools/crash_loop.sh 500 SEED     # replay a seed
#
# Prints the test's per-round lines, then its final "rounds N / acknowledged A / lost L" line;
# exits non-zero if any acknowledged write was lost or anything else went wrong.
set -euo pipefail

usage() { echo "usage: $0 ROUNDS [SEED]" >&2; exit 2; }
rounds="${1:-}"
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || usage
if [[ $# -ge 2 ]]; then
    [[ "$2" =~ ^[0-9]+$ ]] || usage
    export VITRINE_CRASH_SEED="$2"
fi
export VITRINE_CRASH_ROUNDS="$rounds"

cd "$(dirname "$0")/.."
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

status=0
cargo test --release --test suite crash:: -- --nocapture 2>&1 | tee "$log" || status=$?

echo
summary="$(grep -E '^rounds [0-9]+ / acknowledged [0-9]+ / lost [0-9]+' "$log" | tail -n 1 || true)"
if [[ -n "$summary" ]]; then
    echo "$summary"
else
    echo "no summary line: the test stopped before the end (see above)"
fi
exit "$status"
