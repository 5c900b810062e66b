#!/usr/bin/env bash
# diskit check vs qemu-img check on the benchmark images.
# TODO: once `diskit check` exists, time it against `qemu-img check` on src.qcow2, frag.qcow2,
# sparse1t.qcow2 and overlay.qcow2 from benches/bench.py (BENCH_DIR=... BENCH_KEEP=1 keeps them).
echo "benches/check.sh: not yet (diskit check is not implemented)"
