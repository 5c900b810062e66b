#!/usr/bin/env bash
# diskit vs qemu-img convert on a deterministic workload; prints a markdown table.
#
#   BENCH_SIZE=512M bash benches/run.sh        # a quick run (default size 4G)
#
# Environment (see benches/bench.py for all): BENCH_SIZE, BENCH_FRAG_SIZE, BENCH_RUNS (4),
# BENCH_FAST_RUNS (12, for scenarios under 30 s a round),
# BENCH_DIR (reuse inputs), BENCH_KEEP=1, BENCH_ONLY='raw->qcow2,qcow2->raw', BENCH_VERIFY=0.
# Needs qemu-img, qemu-io (qemu-utils), python3 and coreutils; nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in qemu-img qemu-io python3 cp; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "bench: $tool is required (qemu-img and qemu-io come with qemu-utils)" >&2
        exit 2
    fi
done

cargo build --release --bin diskit >&2
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export DISKIT_BIN="$target_dir/release/diskit"

exec python3 benches/bench.py "$@"
