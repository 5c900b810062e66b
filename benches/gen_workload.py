#!/usr/bin/env python3
"""Deterministic benchmark workloads for benches/run.sh (python3 standard library only).

    gen_workload.py raw   OUT.raw SIZE [SEED]   -> a raw image: a mix of incompressible random,
                                                  text-like, zero-filled and hole runs of
                                                  4 KiB .. 8 MiB; prints a JSON manifest
    gen_workload.py frag  OUT.qcow2 SIZE [SEED] -> a qcow2 image whose every 4 KiB block was
                                                  written by qemu-io in shuffled order
    gen_workload.py sparse OUT.qcow2 [SEED]     -> a 1 TiB qcow2 with a few MiB of data
    gen_workload.py overlay OUT.qcow2 BASE SIZE [SEED] -> a qcow2 overlay on BASE with ~5% of
                                                  the guest rewritten in 64 KiB pieces

Same arguments, same bytes: the seed drives everything (random.Random, Mersenne Twister,
whose output is stable across Python versions).
"""

import json
import os
import random
import subprocess
import sys

KIB = 1 << 10
MIB = 1 << 20
BLOCK = 4 * KIB

# Share of the guest per kind of run (the rest of a run's length is drawn log-uniformly).
MIX = [("random", 0.35), ("text", 0.25), ("zero", 0.15), ("hole", 0.25)]

WORDS = (
    "the of and to in is was for on that with as by at from kernel block device "
    "sector cluster image disk qemu guest host write read error warning info debug "
    "request mount systemd service started stopped user root session network eth0 "
    "connection timeout retry failed success GET POST HTTP/1.1 200 404 500 /var/log "
    "/usr/lib /home/user config value true false null id name time date size offset "
    "length buffer cache page memory allocation free used total status ok pending "
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"
).split()


def run_length(rng):
    """4 KiB .. 8 MiB, log-uniform, 4 KiB aligned."""
    shift = rng.uniform(12, 23)  # 2^12 = 4 KiB, 2^23 = 8 MiB
    n = int(2**shift) // BLOCK * BLOCK
    return max(BLOCK, min(n, 8 * MIB))


def text_pool(rng, size):
    """`size` bytes of log-like text with Zipf-ish word frequencies."""
    weights = [1.0 / (i + 1) for i in range(len(WORDS))]
    out = []
    total = 0
    line_no = 0
    while total < size:
        n = rng.randint(4, 16)
        words = rng.choices(WORDS, weights, k=n)
        line = "%08d %02d:%02d:%02d %s\n" % (
            line_no,
            rng.randint(0, 23),
            rng.randint(0, 59),
            rng.randint(0, 59),
            " ".join(words),
        )
        line_no += 1
        b = line.encode()
        out.append(b)
        total += len(b)
    return b"".join(out)[:size]


def gen_raw(path, size, seed):
    rng = random.Random(seed)
    pool = text_pool(random.Random(seed + 1), 8 * MIB)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    counts = {k: 0 for k in kinds}
    runs = 0
    zero_chunk = bytes(MIB)
    with open(path, "wb") as f:
        pos = 0
        while pos < size:
            kind = rng.choices(kinds, weights)[0]
            n = min(run_length(rng), size - pos)
            if kind == "hole":
                f.seek(pos + n)
            elif kind == "zero":
                left = n
                while left:
                    c = min(left, MIB)
                    f.write(zero_chunk[:c])
                    left -= c
            elif kind == "random":
                left = n
                while left:
                    c = min(left, 8 * MIB)
                    f.write(rng.randbytes(c))
                    left -= c
            else:
                left = n
                while left:
                    c = min(left, len(pool) // 2)
                    start = rng.randrange(0, len(pool) - c)
                    f.write(pool[start : start + c])
                    left -= c
            counts[kind] += n
            runs += 1
            pos += n
        f.truncate(size)
    return {"size": size, "seed": seed, "runs": runs, "bytes": counts}


def qemu_io_batches(image, fmt, cmds, batch=4096):
    """Runs qemu-io commands in batches of -c arguments (cache=unsafe: the page cache only)."""
    for i in range(0, len(cmds), batch):
        args = ["qemu-io", "-t", "unsafe", "-f", fmt]
        for c in cmds[i : i + batch]:
            args += ["-c", c]
        args.append(image)
        subprocess.run(args, stdout=subprocess.DEVNULL, check=True)


def qemu_img_create(image, size, extra=()):
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *extra, image, str(size)],
        check=True,
    )


def gen_frag(path, size, seed):
    """Every 4 KiB block written once, in shuffled order, with a non-zero -P pattern:
    64 KiB clusters get allocated in random host order and filled piecewise."""
    rng = random.Random(seed)
    qemu_img_create(path, size)
    blocks = list(range(size // BLOCK))
    rng.shuffle(blocks)
    cmds = ["write -P %d %d 4k" % (i % 255 + 1, b * BLOCK) for i, b in enumerate(blocks)]
    qemu_io_batches(path, "qcow2", cmds)
    return {"size": size, "seed": seed, "writes": len(cmds)}


def gen_sparse(path, seed):
    """1 TiB guest, 64 pieces of 64 KiB .. 1 MiB spread over it."""
    rng = random.Random(seed)
    vsize = 1 << 40
    qemu_img_create(path, vsize)
    cmds = []
    data = 0
    for i in range(64):
        n = rng.choice([64, 128, 256, 512, 1024]) * KIB
        off = rng.randrange(0, (vsize - n) // (64 * KIB)) * 64 * KIB
        cmds.append("write -P %d %d %d" % (i % 255 + 1, off, n))
        data += n
    qemu_io_batches(path, "qcow2", cmds)
    return {"size": vsize, "seed": seed, "data": data}


def gen_overlay(path, base, size, seed):
    """An overlay on `base` with ~5% of the guest rewritten in 64 KiB pieces."""
    rng = random.Random(seed)
    qemu_img_create(path, size, ["-b", base, "-F", "qcow2"])
    pieces = max(1, size // (64 * KIB) // 20)
    offs = sorted(rng.sample(range(size // (64 * KIB)), pieces))
    rng.shuffle(offs)
    cmds = ["write -P %d %d 64k" % (i % 255 + 1, o * 64 * KIB) for i, o in enumerate(offs)]
    qemu_io_batches(path, "qcow2", cmds)
    return {"size": size, "seed": seed, "writes": len(cmds)}


def parse_size(s):
    s = s.strip()
    units = {"K": KIB, "M": MIB, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1].upper() in units:
        return int(float(s[:-1]) * units[s[-1].upper()])
    return int(s)


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    what = argv[1]
    if what == "raw":
        size = parse_size(argv[3]) // BLOCK * BLOCK
        m = gen_raw(argv[2], size, int(argv[4]) if len(argv) > 4 else 1)
    elif what == "frag":
        size = parse_size(argv[3]) // (64 * KIB) * 64 * KIB
        m = gen_frag(argv[2], size, int(argv[4]) if len(argv) > 4 else 2)
    elif what == "sparse":
        m = gen_sparse(argv[2], int(argv[3]) if len(argv) > 3 else 3)
    elif what == "overlay":
        size = parse_size(argv[4])
        m = gen_overlay(argv[2], argv[3], size, int(argv[5]) if len(argv) > 5 else 4)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(m))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
