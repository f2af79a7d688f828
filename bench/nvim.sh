#!/usr/bin/env bash
# Neovim plugin latencies (docs/BENCHMARKS.md, "Neovim plugin"): bench/nvim.lua in a headless
# Neovim against a real sparkd (started by the plugin through sparkctl) and the fake provider.
# Usage: bench/nvim.sh [iterations]   (SPARK_BIN_DIR: where sparkd, sparkctl and
# spark-fake-provider are, default target/release; SPARK_TEST_NVIM: the Neovim, default nvim)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${SPARK_BIN_DIR:-$root/target/release}
nvim=${SPARK_TEST_NVIM:-nvim}
n=${1:-100}
tmp=$(mktemp -d /tmp/spark-nvim-bench.XXXXXX)
fake_pid=
cleanup() {
  SPARK_HOME=$tmp/home "$bin/sparkctl" stop >/dev/null 2>&1 || true
  if [ -n "$fake_pid" ]; then kill "$fake_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
mkdir -p "$tmp/repo" "$tmp/home"
export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_SYSTEM=/dev/null
(
  cd "$tmp/repo"
  git init -q
  git config user.email bench@example.invalid
  git config user.name bench
  # 10,000 lines; every ask and edit inserts a line under `fn main() {`, so the patch
  # always applies.
  { echo "fn main() {"; seq 1 9998 | sed 's/.*/let x_& = &;/'; echo "}"; } > big.rs
  git add big.rs
  git commit -qm init
)
printf '*** Begin Patch\n*** Update File: big.rs\n@@ fn main() {\n+    // spark was here\n*** End Patch\n' > "$tmp/patch"
coproc FAKE { "$bin/spark-fake-provider" --patch "$tmp/patch"; }
fake_pid=$FAKE_PID
read -r hello <&"${FAKE[0]}"
ws=$(printf '%s' "$hello" | sed 's/.*"ws_url":"\([^"]*\)".*/\1/')
export SPARK_HOME=$tmp/home SPARK_PROVIDER_URL=$ws SPARK_API_KEY=sk-bench-not-a-real-key PATH=$bin:$PATH
# The plugin's own messages (stderr) are kept out of the report.
"$nvim" --headless --clean -l "$root/bench/nvim.lua" "$tmp/repo" "$root/editors/nvim" "$n" 2>"$tmp/messages" \
  || { cat "$tmp/messages" >&2; exit 1; }
