#!/usr/bin/env bash
# Benchmark: `diskit commit` / `diskit rebase` vs qemu-img on a 3-deep qcow2 chain.
#   CHAIN_SIZE  virtual size of each image (default 1G; e.g. CHAIN_SIZE=128M for a quick run)
#   RUNS        timing runs per tool and scenario (median reported, default 3)
# Layers (scattered data, deterministic): base holds 2M of every 4M, mid 256k of every 1M,
# top 64k of every 512k, plus some zero clusters in the overlays. Every timed run works on
# fresh copies of the chain (copying is not timed).
set -euo pipefail
CHAIN_SIZE=${CHAIN_SIZE:-1G}
RUNS=${RUNS:-3}
cd "$(dirname "$0")/.."
cargo build --release -q
BIN=$PWD/target/release/diskit
WORK=$(mktemp -d "${TMPDIR:-/tmp}/diskit-bench-chain.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "building a 3-deep chain of $CHAIN_SIZE images in $WORK ..."
mkdir -p "$WORK/orig"
cd "$WORK/orig"
qemu-img create -q -f qcow2 base.qcow2 "$CHAIN_SIZE"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
python3 - "$CHAIN_SIZE" <<'PY'
import subprocess, sys
size = sys.argv[1]
mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
n = int(size[:-1]) * mult[size[-1]] if size[-1] in mult else int(size)

def fill(img, stride, length, shift, zero_every=0):
    cmds = []
    i = 0
    for off in range(shift, n - length + 1, stride):
        if zero_every and i % zero_every == zero_every - 1:
            cmds += ["-c", f"write -q -z {off} {length}"]
        else:
            cmds += ["-c", f"write -q -P {(i * 37 + stride // 65536) % 251 + 1} {off} {length}"]
        i += 1
        if len(cmds) >= 2000:
            subprocess.run(["qemu-io", "-f", "qcow2", *cmds, img], check=True, stdout=subprocess.DEVNULL)
            cmds = []
    if cmds:
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, img], check=True, stdout=subprocess.DEVNULL)

fill("base.qcow2", 4 << 20, 2 << 20, 0)
fill("mid.qcow2", 1 << 20, 256 << 10, 512 << 10, zero_every=5)
fill("top.qcow2", 512 << 10, 64 << 10, 128 << 10, zero_every=7)
PY
cd "$WORK"

python3 - "$BIN" "$RUNS" "$WORK" <<'PY'
import os, shutil, statistics, subprocess, sys, time
bin_, runs, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
orig = os.path.join(work, "orig")
run_dir = os.path.join(work, "run")

scenarios = [
    ("commit top->mid", ["commit", "top.qcow2"]),
    ("commit -b base", ["commit", "-b", "base.qcow2", "top.qcow2"]),
    ("rebase top->base", ["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]),
    ("rebase flatten", ["rebase", "-b", "", "top.qcow2"]),
]

def fresh():
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    for f in ("base.qcow2", "mid.qcow2", "top.qcow2"):
        subprocess.run(["cp", "--sparse=always", os.path.join(orig, f), run_dir], check=True)
    subprocess.run(["sync"], check=True)

def measure(prog, args):
    times = []
    for _ in range(runs):
        fresh()
        t = time.perf_counter()
        r = subprocess.run([prog, *args], cwd=run_dir, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
        times.append(time.perf_counter() - t)
        if r.returncode != 0:
            sys.exit(f"{prog} {args} exited {r.returncode}: {r.stderr.decode()}")
    return statistics.median(times)

print(f"{'scenario':<20}{'qemu-img s':>12}{'diskit s':>12}{'ratio':>8}")
for name, args in scenarios:
    q = measure("qemu-img", args)
    d = measure(bin_, args)
    print(f"{name:<20}{q:>12.3f}{d:>12.3f}{q / d:>7.2f}x")
PY
