#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (whatever fuzz/Cargo.toml lists) for SECONDS each, one at a
# time on one job, and prints the executions of each. Needs cargo-fuzz (`cargo install
# cargo-fuzz`); on a stable toolchain the nightly flags it uses are let through with
# RUSTC_BOOTSTRAP=1. Findings land in fuzz/artifacts/TARGET/; turn each into a test.
# Usage: tools/fuzz.sh [SECONDS] [TARGET...]     (default: 120 seconds, every target)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-120}
shift || true
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/fuzz/target}
command -v cargo-fuzz > /dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 1; }
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi
status=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t"
    log="fuzz/artifacts/$t.log"
    mkdir -p fuzz/artifacts
    echo "== $t: $SECS s" >&2
    # -O: optimised; -a: with debug assertions, so an integer overflow is a finding too. One
    # libFuzzer process (no -jobs/-fork), so the machine's other work keeps its cores.
    if cargo fuzz run -O -a "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        > "$log" 2>&1; then
        result=ok
    else
        result="FINDING (see $log and fuzz/artifacts/$t/)"
        status=1
    fi
    execs=$(grep -E '^stat::number_of_executed_units' "$log" | tail -1 | awk '{print $2}')
    summary+=("$(printf '%-20s %12s executions  %s' "$t" "${execs:-?}" "$result")")
done
printf '%s\n' "${summary[@]}"
exit $status
