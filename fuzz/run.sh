#!/usr/bin/env bash
# `make fuzz`: every cargo-fuzz target for a bounded time (default 60 s each), starting from the
# committed seed corpus. Exits non-zero if a target crashes; the input is in fuzz/artifacts/.
set -euo pipefail
SECONDS_PER_TARGET="${1:-60}"
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$DIR"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/polysync/fuzz-target}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q nightly || { echo "fuzz: needs the nightly toolchain (rustup toolchain install nightly)" >&2; exit 1; }
failed=()
for t in pgoutput_decode ddb_record template config_load; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "fuzz: $t for ${SECONDS_PER_TARGET}s"
  if ! cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=10 \
      -artifact_prefix="artifacts/$t/" -print_final_stats=1 2>&1 | tail -n 25; then
    failed+=("$t")
  fi
  if ls "artifacts/$t"/crash-* "artifacts/$t"/timeout-* "artifacts/$t"/oom-* >/dev/null 2>&1; then
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in ${failed[*]} (inputs under fuzz/artifacts/); reproduce with: cargo +nightly fuzz run <target> <file>" >&2
  exit 1
fi
echo "fuzz: no crash"
