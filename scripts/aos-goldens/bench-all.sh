#!/usr/bin/env bash
# Runs bench.js over the matrix reported in FIGURES.md and prints raw JSON lines (plus `uptime` before each
# process). Each configuration runs in 3 separate Node processes of 2 repetitions each: repetition 1 of a
# process is "cold" (V8 has just compiled the module with its baseline tier), repetition 2 is "warm" (same
# process, a new loader instance; V8 reuses the module's code, tiered up by then).
# Usage: scripts/aos-goldens/bench-all.sh [FIXTURES_DIR] > raw.jsonl; node bench-summary.js raw.jsonl
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
F="${1:-${AO_AOS_FIXTURES:-$HERE/../../../shared/reference/aos}}"
export TZ=UTC
run() { # wasm format mode messages
  for process in 1 2 3; do
    echo "{\"uptime\": \"$(uptime)\", \"config\": \"$1 $2 $3 $4\", \"process\": $process}"
    node --experimental-wasm-memory64 "$HERE/bench.js" --wasm "$F/$1" --format "$2" --mode "$3" --messages "$4" --reps 2
  done
}
run emscripten4.wasm wasm32-unknown-emscripten4 cu 100
run emscripten4.wasm wasm32-unknown-emscripten4 unsafe 200
run wasm64-emscripten.wasm wasm64-unknown-emscripten-draft_2024_02_15 cu 100
run wasm64-emscripten.wasm wasm64-unknown-emscripten-draft_2024_02_15 unsafe 200
run aos.wasm wasm32-unknown-emscripten2 cu 200
run aos.wasm wasm32-unknown-emscripten2 unsafe 200
run emscripten4.wasm wasm32-unknown-emscripten-metering unsafe 200
run wasm64-emscripten.wasm wasm64-unknown-emscripten-draft_2024_10_16-metering unsafe 200
