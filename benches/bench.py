#!/usr/bin/env python3
"""diskit vs qemu-img convert, side by side (called by benches/run.sh; standard library only).

Environment:
  DISKIT_BIN       the diskit binary (run.sh sets it to target/release/diskit)
  BENCH_SIZE       guest size of the workload (default 4G; e.g. 256M for a quick run)
  BENCH_FRAG_SIZE  guest size of the fragmented qcow2 (default: BENCH_SIZE)
  BENCH_RUNS       timed runs per tool and scenario, in a balanced order (default 4)
  BENCH_FAST_RUNS  runs for a scenario whose first round took under 30 s (default 12): the
                   uncompressed copies vary 2-5x from run to run on a VM, cheap to repeat
  BENCH_DIR        work directory (default: a new one under $TMPDIR or /var/tmp, removed at
                   the end); inputs already there for the same sizes are reused
  BENCH_KEEP=1     keep the work directory
  BENCH_ONLY       comma-separated scenario names to run (a full name selects exactly that
                   scenario, anything else every scenario containing it)
  BENCH_VERIFY=0   skip the `qemu-img compare` of diskit's output against the source

Every run's wall time comes from time.monotonic(); peak RSS from os.wait4's rusage of that
child alone. Runs are warm-cache (the page cache is not dropped), interleaved tool by tool so
that drift hits all tools alike. Exit status 1 if a diskit output differs from its source.
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
GEN = os.path.join(HERE, "gen_workload.py")
MIB = 1 << 20
CLUSTER = 64 * 1024
INPUTS_VERSION = 1


def parse_size(s):
    s = s.strip()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1].upper() in units:
        return int(float(s[:-1]) * units[s[-1].upper()])
    return int(s)


def human(n):
    if n is None:
        return "-"
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div:
            return "%.1f%s" % (n / div, unit)
    return "%d" % n


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# Linux records the spawning process's RSS as the child's starting peak when it execs: with
# vfork/posix_spawn that is this process's *peak*, with fork its *current* RSS. So spawn with
# fork, and keep this process small (big buffers live in child processes).
if hasattr(subprocess, "_USE_VFORK"):
    subprocess._USE_VFORK = False
if hasattr(subprocess, "_USE_POSIX_SPAWN"):
    subprocess._USE_POSIX_SPAWN = False


def run_measured(argv, cwd):
    """Runs argv; returns (seconds, peak RSS bytes, exit code, stderr text)."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return dt, ru.ru_maxrss * 1024, p.returncode, err.decode(errors="replace")


def allocated(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_blocks * 512


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def gen(cwd, *args):
    out = subprocess.run(
        [sys.executable, GEN, *args], cwd=cwd, check=True, stdout=subprocess.PIPE
    )
    return json.loads(out.stdout)


def prepare_inputs(d, size, frag_size):
    """Builds (or reuses) the inputs in `d`; returns the manifest."""
    want = {"version": INPUTS_VERSION, "size": size, "frag_size": frag_size}
    mpath = os.path.join(d, "inputs.json")
    try:
        with open(mpath) as f:
            m = json.load(f)
        if all(m.get(k) == v for k, v in want.items()):
            log("bench: reusing inputs in %s" % d)
            return m
    except (FileNotFoundError, ValueError):
        pass
    m = dict(want)
    t = time.monotonic()
    log("bench: generating workload.raw (%s)" % human(size))
    m["raw"] = gen(d, "raw", "workload.raw", str(size))
    log("bench: src.qcow2 (qemu-img convert of workload.raw)")
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "workload.raw", "src.qcow2"],
        cwd=d,
        check=True,
    )
    log("bench: frag.qcow2 (%s in shuffled 4 KiB writes)" % human(frag_size))
    m["frag"] = gen(d, "frag", "frag.qcow2", str(frag_size))
    log("bench: sparse1t.qcow2 (1 TiB, a few MiB of data)")
    m["sparse"] = gen(d, "sparse", "sparse1t.qcow2")
    log("bench: overlay.qcow2 (on src.qcow2, ~5% rewritten)")
    m["overlay"] = gen(d, "overlay", "overlay.qcow2", "src.qcow2", str(size))
    m["data_clusters"] = count_data_clusters(os.path.join(d, "workload.raw"))
    log("bench: inputs ready in %.1f s" % (time.monotonic() - t))
    with open(mpath, "w") as f:
        json.dump(m, f)
    return m


def data_ranges(fd, size):
    """(start, end) of the data extents of a file (SEEK_DATA/SEEK_HOLE)."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        off = end


def count_data_clusters(path):
    """64 KiB clusters of the raw workload that are neither holes nor all zero: what a
    compressing convert has to compress."""
    zero = bytes(CLUSTER)
    n = 0
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end in data_ranges(fd, size):
            off = start // CLUSTER * CLUSTER
            while off < end:
                c = os.pread(fd, CLUSTER, off)
                if c != zero[: len(c)]:
                    n += 1
                off += CLUSTER
    finally:
        os.close(fd)
    return n


def sample_clusters(path, limit_bytes=64 * MIB):
    """Up to `limit_bytes` of non-zero 64 KiB clusters of the workload."""
    zero = bytes(CLUSTER)
    out = []
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end in data_ranges(fd, size):
            off = start // CLUSTER * CLUSTER
            while off < end and len(out) * CLUSTER < limit_bytes:
                c = os.pread(fd, CLUSTER, off)
                if c != zero[: len(c)]:
                    out.append(c)
                off += CLUSTER
            if len(out) * CLUSTER >= limit_bytes:
                break
    finally:
        os.close(fd)
    return out


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def zlib_rate(clusters):
    """Single-core bytes/s of qcow2's deflate (level 6, raw deflate, 4 KiB window)."""
    if not clusters:
        return None
    t = time.monotonic()
    for c in clusters:
        z = zlib.compressobj(6, zlib.DEFLATED, -12)
        z.compress(c)
        z.flush()
    return len(clusters) * CLUSTER / (time.monotonic() - t)


def zstd_rate(clusters, d):
    """Single-core bytes/s of zstd level 3 on 64 KiB blocks: a Python module if present,
    else the zstd command's benchmark mode; None when neither is there."""
    if not clusters:
        return None
    mod = None
    for name in ("compression.zstd", "zstandard"):
        try:
            mod = __import__(name, fromlist=["x"])
            break
        except ImportError:
            pass
    if mod is not None:
        t = time.monotonic()
        for c in clusters:
            if hasattr(mod, "ZstdCompressor") and hasattr(mod.ZstdCompressor(), "compress"):
                mod.ZstdCompressor(level=3).compress(c)
            else:
                mod.compress(c, 3)
        return len(clusters) * CLUSTER / (time.monotonic() - t)
    if shutil.which("zstd") is None:
        return None
    sample = os.path.join(d, "zstd-sample.bin")
    with open(sample, "wb") as f:
        for c in clusters:
            f.write(c)
    try:
        out = subprocess.run(
            ["zstd", "-b3", "-B64K", "-i2", "-T1", sample],
            capture_output=True,
            text=True,
            timeout=120,
        )
        # progress lines end in \r; the last one with speeds is the result:
        # "3#zstd-sample.bin :  N ->  M (x1.23),  456.7 MB/s, 1234.5 MB/s"
        segs = [x for x in re.split(r"[\r\n]", out.stdout + out.stderr) if "MB/s" in x]
        speeds = re.findall(r"([\d.]+) MB/s", segs[-1]) if segs else []
        return float(speeds[0]) * 1e6 if speeds else None
    except (subprocess.SubprocessError, IndexError, ValueError):
        return None
    finally:
        remove(sample)


def scenarios():
    """(name, source, args before the file names, output name, source fmt, output fmt,
    compressor). Sources are built by prepare_inputs with qemu-img only."""
    return [
        ("raw->raw", "workload.raw", ["-f", "raw", "-O", "raw"], "out.raw", "raw", "raw", None),
        ("raw->qcow2", "workload.raw", ["-f", "raw", "-O", "qcow2"], "out.qcow2", "raw", "qcow2", None),
        ("qcow2->raw", "src.qcow2", ["-f", "qcow2", "-O", "raw"], "out.raw", "qcow2", "raw", None),
        ("raw->qcow2 -c", "workload.raw", ["-f", "raw", "-O", "qcow2", "-c"], "out.qcow2", "raw", "qcow2", "zlib"),
        (
            "raw->qcow2 -c zstd",
            "workload.raw",
            ["-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd"],
            "out.qcow2",
            "raw",
            "qcow2",
            "zstd",
        ),
        ("frag qcow2->qcow2", "frag.qcow2", ["-f", "qcow2", "-O", "qcow2"], "out.qcow2", "qcow2", "qcow2", None),
        ("1TiB sparse qcow2->qcow2", "sparse1t.qcow2", ["-f", "qcow2", "-O", "qcow2"], "out.qcow2", "qcow2", "qcow2", None),
        (
            "qcow2->qcow2 -B",
            "overlay.qcow2",
            ["-f", "qcow2", "-O", "qcow2", "-B", "src.qcow2", "-F", "qcow2"],
            "out.qcow2",
            "qcow2",
            "qcow2",
            None,
        ),
        ("qcow2->vmdk", "src.qcow2", ["-f", "qcow2", "-O", "vmdk"], "out.vmdk", "qcow2", "vmdk", None),
        ("raw->vdi", "workload.raw", ["-f", "raw", "-O", "vdi"], "out.vdi", "raw", "vdi", None),
        (
            "raw->vmdk stream",
            "workload.raw",
            ["-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"],
            "out.vmdk",
            "raw",
            "vmdk",
            "zlib",
        ),
    ]


def first_line(text):
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return "(no message)"


def warm(path):
    """Reads a file through the page cache (its data ranges only)."""
    # one small reused buffer: the children's peak RSS counts this process's resident pages
    buf = bytearray(MIB)
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        for start, end in data_ranges(fd, size):
            pos = start
            while pos < end:
                n = os.preadv(fd, [memoryview(buf)[: min(MIB, end - pos)]], pos)
                if n <= 0:
                    break
                pos += n


# Each tool follows each other tool exactly once over the four rows.
WILLIAMS = [[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1]]


def bench_scenario(sc, d, diskit, runs, fast_runs, verify, rates, manifest):
    name, src, args, out, sfmt, ofmt, comp = sc
    tools = [
        ("diskit", [diskit, "convert", *args, src, out]),
        ("qemu", ["qemu-img", "convert", *args, src, out]),
        ("qemuW", ["qemu-img", "convert", "-m", "16", "-W", *args, src, out]),
        ("cp", ["cp", "--sparse=always", src, out]),
    ]
    res = {t: {"times": [], "rss": 0, "size": None} for t, _ in tools}
    res["note"] = None
    res["mismatch"] = False
    # Warm the page cache with every input of the scenario first: the first tool of a
    # scenario otherwise pays for reading inputs back that the machine dropped from its cache
    # since they were last used (this VM reclaims cold page cache), and that was always diskit.
    inputs = [src] + [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-B"]
    for f in inputs:
        warm(os.path.join(d, f))
    # One untimed copy of the same size, removed: every timed run then starts right after an
    # output of that size was deleted. Without it the first run (always diskit's) came after
    # a pause, which this VM's free page reporting uses to hand all free memory back to the
    # host, so that run's page cache faulted in page by page (2-6x slower, every scenario).
    subprocess.run(["cp", "--sparse=always", src, out], cwd=d, check=False)
    remove(os.path.join(d, out))
    r = 0
    while r < runs:
        # A balanced (Williams) order: over four runs every tool goes first once and follows
        # every other tool once. The machine's state after a run (page cache, free memory
        # handed back to the host) differs with the tool that made it; a plain rotation had
        # diskit follow cp in three runs of four.
        order = [tools[i] for i in WILLIAMS[r % len(WILLIAMS)]]
        for tool, argv in order:
            remove(os.path.join(d, out))
            dt, rss, code, err = run_measured(argv, d)
            if code != 0:
                remove(os.path.join(d, out))
                if tool == "diskit":
                    why = first_line(err)
                    hint = " (driver not landed?)" if "not implemented" in why else ""
                    res["note"] = "diskit failed%s: %s" % (hint, why)
                else:
                    res["note"] = "%s failed: %s" % (tool, first_line(err))
                return res
            res[tool]["times"].append(dt)
            res[tool]["rss"] = max(res[tool]["rss"], rss)
            if r == 0:
                res[tool]["size"] = allocated(os.path.join(d, out))
            if tool == "diskit" and r == 0 and verify:
                cmp_ = subprocess.run(
                    ["qemu-img", "compare", "-f", sfmt, "-F", ofmt, src, out],
                    cwd=d,
                    capture_output=True,
                    text=True,
                )
                if cmp_.returncode != 0:
                    res["mismatch"] = True
                    res["note"] = "OUTPUT DIFFERS from source: " + first_line(
                        cmp_.stdout + cmp_.stderr
                    )
            remove(os.path.join(d, out))
        if r == 0 and fast_runs > runs and sum(res[t]["times"][0] for t, _ in tools) < 30:
            runs = -(-fast_runs // len(WILLIAMS)) * len(WILLIAMS)
        r += 1
    res["runs"] = runs
    cp_t = statistics.median(res["cp"]["times"])
    limit = cp_t
    if comp:
        rate = rates.get(comp)
        if rate:
            res["comp_limit"] = manifest["data_clusters"] * CLUSTER / (rate * cores())
            limit = max(cp_t, res["comp_limit"])
        else:
            res["note"] = "no %s compressor to measure: limit is cp only" % comp
    res["limit"] = limit
    return res


def main():
    diskit = os.environ.get("DISKIT_BIN")
    if not diskit or not os.access(diskit, os.X_OK):
        log("bench: set DISKIT_BIN to the diskit binary (benches/run.sh does)")
        return 2
    diskit = os.path.abspath(diskit)
    size = parse_size(os.environ.get("BENCH_SIZE", "4G"))
    size = max(size, 1 * MIB) // CLUSTER * CLUSTER
    frag_size = parse_size(os.environ.get("BENCH_FRAG_SIZE", str(size)))
    frag_size = max(frag_size, 1 * MIB) // CLUSTER * CLUSTER
    runs = max(1, int(os.environ.get("BENCH_RUNS", "4")))
    fast_runs = max(runs, int(os.environ.get("BENCH_FAST_RUNS", "12")))
    verify = os.environ.get("BENCH_VERIFY", "1") != "0"
    only = [s.strip() for s in os.environ.get("BENCH_ONLY", "").split(",") if s.strip()]
    keep = os.environ.get("BENCH_KEEP") == "1"

    d = os.environ.get("BENCH_DIR")
    made = False
    if d:
        os.makedirs(d, exist_ok=True)
    else:
        base = os.environ.get("TMPDIR", "/var/tmp")
        d = tempfile.mkdtemp(prefix="diskit-bench-", dir=base)
        made = True
    d = os.path.abspath(d)
    free = shutil.disk_usage(d).free
    need = 4 * size + frag_size
    if free < need:
        log("bench: warning: %s has %s free, about %s needed" % (d, human(free), human(need)))

    try:
        manifest = prepare_inputs(d, size, frag_size)
        rates = json.loads(
            subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--rates", d],
                check=True,
                stdout=subprocess.PIPE,
            ).stdout
        )
        floor = run_measured(["true"], d)[1]
        results = []
        failed = False
        names = [sc[0] for sc in scenarios()]
        for sc in scenarios():
            # a name selects its scenario exactly; anything else by substring
            if only and not any(
                o == sc[0] or (o not in names and o in sc[0]) for o in only
            ):
                continue
            log("bench: %s" % sc[0])
            r = bench_scenario(sc, d, diskit, runs, fast_runs, verify, rates, manifest)
            failed |= r["mismatch"]
            results.append((sc[0], r))
        print_report(results, manifest, runs, diskit, rates, floor)
        with open(os.path.join(d, "results.json"), "w") as f:
            json.dump({n: r for n, r in results}, f, indent=1, default=str)
        return 1 if failed else 0
    finally:
        if made and not keep:
            shutil.rmtree(d, ignore_errors=True)
        else:
            log("bench: work directory kept: %s" % d)


def med(xs):
    return statistics.median(xs) if xs else None


def fmt_s(x):
    return "-" if x is None else "%.2f" % x


def version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True)
        return first_line(out.stdout)
    except OSError:
        return "?"


def print_report(results, m, runs, diskit, rates, floor):
    print()
    print("## diskit vs qemu-img convert")
    print()
    rb = m["raw"]["bytes"]
    print(
        "Workload %s (random %s, text %s, zero %s, holes %s; %d runs), fragmented qcow2 %s, "
        "1 TiB sparse qcow2. %s runs per tool, interleaved in a balanced order, warm cache, median shown. "
        "%d cores. %s; %s."
        % (
            human(m["size"]),
            human(rb["random"]),
            human(rb["text"]),
            human(rb["zero"]),
            human(rb["hole"]),
            m["raw"]["runs"],
            human(m["frag_size"]),
            "/".join(str(x) for x in sorted({r.get("runs", runs) for _, r in results})),
            cores(),
            version([diskit, "--version"]),
            version(["qemu-img", "--version"]),
        )
    )
    rz = rates.get("zlib")
    rs = rates.get("zstd")
    print(
        "Compressor single-core speed: zlib-6/4K-window %s, zstd-3 %s (64 KiB clusters); "
        "%s of non-zero clusters to compress."
        % (
            "%.0f MB/s" % (rz / 1e6) if rz else "n/a",
            "%.0f MB/s" % (rs / 1e6) if rs else "n/a",
            human(m["data_clusters"] * CLUSTER),
        )
    )
    print()
    print(
        "| scenario | diskit s | qemu-img s | qemu-img -m16 -W s | ratio (best qemu / diskit) "
        "| limit s | out sizes (diskit / qemu / qemu -W) | peak RSS (diskit / qemu / qemu -W) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---|")
    notes = []
    for name, r in results:
        if r["note"]:
            notes.append("- %s: %s" % (name, r["note"]))
        if not r["diskit"]["times"]:
            print("| %s | skipped | | | | | | |" % name)
            continue
        td = med(r["diskit"]["times"])
        tq = med(r["qemu"]["times"])
        tw = med(r["qemuW"]["times"])
        qs = [x for x in (tq, tw) if x is not None]
        best = min(qs) if qs else None
        ratio = "%.2fx" % (best / td) if best and td else "-"
        print(
            "| %s | %s | %s | %s | %s | %s | %s / %s / %s | %s / %s / %s |"
            % (
                name + (" (MISMATCH)" if r["mismatch"] else ""),
                fmt_s(td),
                fmt_s(tq),
                fmt_s(tw),
                ratio,
                fmt_s(r.get("limit")),
                human(r["diskit"]["size"]),
                human(r["qemu"]["size"]),
                human(r["qemuW"]["size"]),
                human(r["diskit"]["rss"]),
                human(r["qemu"]["rss"]),
                human(r["qemuW"]["rss"]),
            )
        )
    print()
    print(
        "ratio > 1: diskit is faster than the faster qemu-img setting. limit: `cp --sparse=always` "
        "of the source, or for -c the compressor's single-core speed times the cores if slower. "
        "Sizes are allocated bytes. Peak RSS is the child's own (os.wait4) and includes a "
        "floor of %s that Linux carries over from the spawning process (`true` measures it)."
        % human(floor)
    )
    print()
    print("Fastest run of each tool (noise on a shared machine only ever adds time):")
    print()
    print("| scenario | runs | diskit s | qemu-img s | qemu-img -m16 -W s | limit s | ratio | diskit vs limit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results:
        if not r["diskit"]["times"]:
            continue
        bd, bq, bw, bc = (min(r[t]["times"]) if r[t]["times"] else None for t in ("diskit", "qemu", "qemuW", "cp"))
        qs = [x for x in (bq, bw) if x is not None]
        ratio = "%.2fx" % (min(qs) / bd) if qs and bd else "-"
        if bc is not None:
            bc = max(bc, r.get("comp_limit") or 0)
        vs = "%+.0f%%" % ((bd / bc - 1) * 100) if bc and bd else "-"
        print(
            "| %s | %d | %s | %s | %s | %s | %s | %s |"
            % (name, len(r["diskit"]["times"]), fmt_s(bd), fmt_s(bq), fmt_s(bw), fmt_s(bc), ratio, vs)
        )
    if notes:
        print()
        print("Notes:")
        for n in notes:
            print(n)


def rates_main(d):
    """`bench.py --rates DIR`: compressor speeds as JSON (run in a child process)."""
    sample = sample_clusters(os.path.join(d, "workload.raw"))
    print(json.dumps({"zlib": zlib_rate(sample), "zstd": zstd_rate(sample, d)}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rates":
        sys.exit(rates_main(sys.argv[2]))
    sys.exit(main())
