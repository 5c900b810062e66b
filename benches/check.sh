#!/usr/bin/env bash
# Benchmark: `diskit check` vs `qemu-img check` on qcow2 images.
#   SPARSE_CLUSTERS  allocated 64k clusters scattered over a 1 TiB virtual disk (default 2000;
#                    the issue's figure is ~100000)
#   FRAG_SIZE        size of the fragmented image, written in reverse 4k-stride order
#                    (default 256M; the issue's figure is 4G)
#   RUNS             timing runs per tool (median reported, default 3)
set -euo pipefail
SPARSE_CLUSTERS=${SPARSE_CLUSTERS:-2000}
FRAG_SIZE=${FRAG_SIZE:-256M}
RUNS=${RUNS:-3}
cd "$(dirname "$0")/.."
cargo build --release -q
BIN=$PWD/target/release/diskit
WORK=$(mktemp -d "${TMPDIR:-/tmp}/diskit-bench-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "building images in $WORK ..."
# 1 TiB virtual, scattered clusters: one qemu-io invocation with many -c commands per batch
qemu-img create -q -f qcow2 "$WORK/sparse.qcow2" 1T
python3 - "$WORK/sparse.qcow2" "$SPARSE_CLUSTERS" <<'PY'
import subprocess, sys
path, n = sys.argv[1], int(sys.argv[2])
total = (1 << 40) // 65536
step = max(1, total // n)
cmds = []
for i in range(n):
    c = (i * step + (i * 7919) % step) % total
    cmds += ["-c", f"write -q -P {i % 251} {c * 65536} 64k"]
    if len(cmds) >= 2000:
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], check=True, stdout=subprocess.DEVNULL)
        cmds = []
if cmds:
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], check=True, stdout=subprocess.DEVNULL)
PY
# fragmented: clusters written backwards, so that guest order and host order differ
qemu-img create -q -f qcow2 "$WORK/frag.qcow2" "$FRAG_SIZE"
python3 - "$WORK/frag.qcow2" "$FRAG_SIZE" <<'PY'
import subprocess, sys
path, size = sys.argv[1], sys.argv[2]
mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
n = int(size[:-1]) * mult[size[-1]] if size[-1] in mult else int(size)
clusters = n // 65536
cmds = []
for c in range(clusters - 1, -1, -2):
    cmds += ["-c", f"write -q -P {c % 251} {c * 65536} 64k"]
    if len(cmds) >= 2000:
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], check=True, stdout=subprocess.DEVNULL)
        cmds = []
if cmds:
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], check=True, stdout=subprocess.DEVNULL)
PY

python3 - "$BIN" "$RUNS" "$WORK/sparse.qcow2" "$WORK/frag.qcow2" <<'PY'
import resource, statistics, subprocess, sys, time
bin_, runs, images = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def measure(cmd):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
        if r.returncode not in (0, 3):
            sys.exit(f"{cmd} exited {r.returncode}")
    return statistics.median(times)

def peak_rss(cmd):
    # ru_maxrss of children is the maximum over all waited-for children so far,
    # so measure each tool in a fresh python process.
    code = ("import resource,subprocess,sys;"
            "subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL);"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    return int(out.stdout.strip())

print(f"{'image':<14}{'qemu-img s':>12}{'diskit s':>12}{'ratio':>8}{'qemu RSS KiB':>14}{'diskit RSS KiB':>16}")
for img in images:
    q = ["qemu-img", "check", img]
    d = [bin_, "check", img]
    tq, td = measure(q), measure(d)
    rq, rd = peak_rss(q), peak_rss(d)
    name = img.rsplit("/", 1)[-1]
    print(f"{name:<14}{tq:>12.3f}{td:>12.3f}{tq / td:>8.2f}{rq:>14}{rd:>16}")
PY
