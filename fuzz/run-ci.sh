#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 60, or $FUZZ_SECONDS) with
# AddressSanitizer, on the stable toolchain (RUSTC_BOOTSTRAP=1 lets cargo-fuzz use the
# nightly-only sanitizer flags). Fails on any crash, leak, timeout or out-of-memory; the
# reproducer is then in fuzz/artifacts/TARGET/.
#
#   fuzz/run-ci.sh [SECONDS]
#
# Installs cargo-fuzz from crates.io when it is missing. The corpus grows in fuzz/corpus/TARGET
# (not committed); fuzz/seeds/TARGET holds the seeds, regenerated here from valid streams.
set -euo pipefail
secs="${1:-${FUZZ_SECONDS:-60}}"
cd "$(dirname "$0")/.."

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
export RUSTFLAGS=

echo "==> building all fuzz targets"
cargo fuzz build
mapfile -t targets < <(cargo fuzz list)

echo "==> unit tests of the shared fuzz checks"
cargo test --quiet --manifest-path fuzz/Cargo.toml -p vfio-migration-fuzz-common

echo "==> seed corpus"
cargo run --quiet --manifest-path fuzz/Cargo.toml -p vfio-migration-fuzz-common --example write-seeds -- fuzz/seeds

failed=()
for t in "${targets[@]}"; do
    echo "==> fuzzing $t for ${secs}s"
    mkdir -p "fuzz/corpus/$t"
    dirs=("fuzz/corpus/$t")
    [ -d "fuzz/seeds/$t" ] && dirs+=("fuzz/seeds/$t")
    if ! cargo fuzz run "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 2>"fuzz/$t.log"; then
        echo "!!! $t FAILED; last lines of fuzz/$t.log:"
        tail -n 40 "fuzz/$t.log"
        failed+=("$t")
    else
        grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "fuzz/$t.log" || true
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz targets with findings: ${failed[*]} (reproducers in fuzz/artifacts/)"
    exit 1
fi
echo "all ${#targets[@]} fuzz targets ran ${secs}s each without findings: ${targets[*]}"
