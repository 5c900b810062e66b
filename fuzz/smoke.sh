#!/usr/bin/env bash
# Runs every fuzz target for a while: a smoke test that the targets build and that the
# drivers survive the seed corpus plus some mutation.
#
#   bash fuzz/smoke.sh [SECONDS] [TARGET...]     # default 30 s each, all targets
#
# Uses cargo-fuzz on the stable toolchain (RUSTC_BOOTSTRAP=1 unlocks the sanitizer flags);
# installs cargo-fuzz from crates.io when missing, and makes the seed corpora with qemu-img
# when fuzz/corpus is empty. Crashes land in fuzz/artifacts/<target>/; exit status 1 if any.
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-${FUZZ_SECONDS:-30}}
[ $# -gt 0 ] && shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(open_qcow2 open_vmdk vmdk_stream vmdk_descriptor open_vdi open_probe check_qcow2 options)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
if [ ! -d corpus/vmdk_descriptor ] || [ -z "$(ls -A corpus/vmdk_descriptor 2>/dev/null)" ]; then
    if command -v qemu-img >/dev/null 2>&1; then
        bash seeds.sh
    else
        echo "fuzz: no qemu-img, starting from empty corpora"
    fi
fi

export RUSTC_BOOTSTRAP=1
shm=/dev/shm
[ -d "$shm" ] && [ -w "$shm" ] || shm=${TMPDIR:-/tmp}
DISKIT_FUZZ_DIR=$(mktemp -d "$shm/diskit-fuzz.XXXXXX")
export DISKIT_FUZZ_DIR
trap 'rm -rf "$DISKIT_FUZZ_DIR"' EXIT

cargo fuzz build "${targets[@]:0:1}" >/dev/null 2>&1 || true   # warm the shared build
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "fuzz: $t for ${secs}s"
    log=$DISKIT_FUZZ_DIR/$t.log
    if cargo fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        </dev/null >"$log" 2>&1; then
        cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9a-zA-Z]+' "$log" | tail -1)
        runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$')
        rss=$(grep -oE 'stat::peak_rss_mb: *[0-9]+' "$log" | grep -oE '[0-9]+$')
        echo "fuzz: $t: $runs runs, $cov, peak RSS ${rss} MB"

    else
        failed+=("$t")
        tail -40 "$log"
        echo "fuzz: $t FAILED; the input is in fuzz/artifacts/$t/"
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: failures in: ${failed[*]}"
    exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${secs}s without a finding"
