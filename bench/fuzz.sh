#!/usr/bin/env bash
# Long fuzz campaign (docs/RELIABILITY.md, "Fuzzing"): every proptest harness of spark-proto,
# sparkd and the end-to-end JSON-RPC suite, one at a time, each repeating rounds with fresh
# random seeds for SECS seconds, then the cases each harness ran. A failure stops the run and
# prints the minimal failing input.
# Usage: bench/fuzz.sh [secs-per-harness]   (default 60; SPARK_FUZZ_PROFILE: release (default)
# or dev; SPARK_FUZZ_CASES: cases per round, default each harness's CI smoke count)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-60}
profile=${SPARK_FUZZ_PROFILE:-release}
cd "$root"
log=$(mktemp -t spark-fuzz.XXXXXX)
trap 'rm -f "$log"' EXIT
export SPARK_FUZZ_SECS=$secs
start=$(date +%s)
cargo test --profile "$profile" -p spark-proto --test fuzz -- fuzz_ --nocapture --test-threads 1 2>&1 | tee -a "$log"
cargo test --profile "$profile" -p sparkd --lib -- fuzz_tests::fuzz_ --nocapture --test-threads 1 2>&1 | tee -a "$log"
cargo test --profile "$profile" -p spark-tests --test e2e -- suite::fuzz::fuzzed_ --nocapture --test-threads 1 2>&1 | tee -a "$log"
echo
echo "== fuzz campaign: $secs s per harness, profile $profile, $(($(date +%s) - start)) s in all"
grep -oE 'fuzz [^:]+: [0-9]+ (cases passed|lines answered).*' "$log"
