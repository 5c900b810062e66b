#!/usr/bin/env bash
# Seed corpora for the fuzz targets: small images made by qemu-img and qemu-io.
#
#   bash fuzz/seeds.sh            # fills fuzz/corpus/<target>/ (gitignored)
#
# Every image is small (1 MiB guests, small clusters) so the fuzzer mutates headers and
# tables rather than data. open_probe gets all of them.
set -euo pipefail
cd "$(dirname "$0")"
for t in qemu-img qemu-io; do
    command -v "$t" >/dev/null || { echo "seeds: $t is required (qemu-utils)" >&2; exit 2; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
corpus=$PWD/corpus
mkdir -p "$corpus"/{open_qcow2,open_vmdk,open_vdi,open_probe,options,check_qcow2,vmdk_stream,vmdk_descriptor}

q() { qemu-img "$@" >/dev/null; }
io() { # io FMT IMAGE CMD...
    local fmt=$1 img=$2; shift 2
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f "$fmt" "${args[@]}" "$img" >/dev/null
}
add() { # add TARGET FILE: copies FILE into TARGET's corpus and open_probe's
    cp "$work/$2" "$corpus/$1/$2"
    cp "$work/$2" "$corpus/open_probe/$1-$2"
}

cd "$work"
printf 'hello, raw world\n' > raw-small.bin
head -c 65536 /dev/zero | tr '\0' 'x' > raw-64k.bin
cp raw-small.bin raw-64k.bin "$corpus/open_probe/"

# ---- qcow2 -------------------------------------------------------------------------------
data=("write -P 0xaa 0 4k" "write -P 0x55 512k 8k" "write -z 64k 4k" "write -P 0x11 1020k 4k")
mk_qcow2() { # name opts
    q create -f qcow2 -o "$2" "$1" 1M
    io qcow2 "$1" "${data[@]}"
    add open_qcow2 "$1"
}
mk_qcow2 v3-512.qcow2 cluster_size=512
mk_qcow2 v3-4k.qcow2 cluster_size=4k
mk_qcow2 v2-4k.qcow2 cluster_size=4k,compat=0.10
mk_qcow2 lazy-rc1.qcow2 cluster_size=4k,lazy_refcounts=on,refcount_bits=1
mk_qcow2 rc64.qcow2 cluster_size=4k,refcount_bits=64
mk_qcow2 extl2.qcow2 cluster_size=16k,extended_l2=on
q create -f qcow2 -o cluster_size=4k empty.qcow2 1M && add open_qcow2 empty.qcow2
q create -f qcow2 big-empty.qcow2 1T && add open_qcow2 big-empty.qcow2
# compressed clusters (zlib and zstd), from a text-like raw image
head -c 262144 < <(yes 'diskit fuzz seed line 0123456789') > text.raw
q convert -c -O qcow2 -o cluster_size=4k text.raw zlib.qcow2 && add open_qcow2 zlib.qcow2
q convert -c -O qcow2 -o cluster_size=4k,compression_type=zstd text.raw zstd.qcow2 &&
    add open_qcow2 zstd.qcow2
# backing files: missing, itself (the fuzz harness names the image "img"), raw
q create -f qcow2 -u -b base.qcow2 -F qcow2 -o cluster_size=4k ov-missing.qcow2 1M
add open_qcow2 ov-missing.qcow2
q create -f qcow2 -u -b img -F qcow2 -o cluster_size=4k ov-self.qcow2 1M
add open_qcow2 ov-self.qcow2
# internal snapshot, bitmap, external data file, encryption
cp v3-4k.qcow2 snap.qcow2 && q snapshot -c first snap.qcow2 && io qcow2 snap.qcow2 "write -P 7 0 4k" &&
    add open_qcow2 snap.qcow2
cp v3-4k.qcow2 bitmap.qcow2 && q bitmap --add bitmap.qcow2 b0 && add open_qcow2 bitmap.qcow2
q create -f qcow2 -o cluster_size=4k,data_file=img.data datafile.qcow2 1M && add open_qcow2 datafile.qcow2
q create -f qcow2 --object secret,id=s0,data=fuzz -o cluster_size=4k,encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 \
    luks-full.qcow2 1M 2>/dev/null && head -c 65536 luks-full.qcow2 > luks.qcow2 && add open_qcow2 luks.qcow2 || true

# ---- vmdk --------------------------------------------------------------------------------
mk_vmdk() { # name opts
    q create -f vmdk -o "$2" "$1" 1M
    io vmdk "$1" "write -P 0xaa 0 4k" "write -P 0x55 512k 8k"
    add open_vmdk "$1"
}
mk_vmdk sparse.vmdk subformat=monolithicSparse
mk_vmdk zeroed.vmdk subformat=monolithicSparse,zeroed_grain=on
mk_vmdk v6.vmdk subformat=monolithicSparse,compat6=on
q convert -O vmdk -o subformat=streamOptimized text.raw stream.vmdk && add open_vmdk stream.vmdk
# stream images for vmdk_stream: text, sparse data with zero runs, empty, 2 MiB of mixed
for img in stream.vmdk; do cp "$img" "$corpus/vmdk_stream/"; done
q create -f vmdk -o subformat=streamOptimized stream-empty.vmdk 1M && cp stream-empty.vmdk "$corpus/vmdk_stream/"
q create -f raw mixed.raw 2M
io raw mixed.raw "write -P 0xaa 0 64k" "write -P 0x11 1M 4k" "write -P 0x5a 2040k 8k"
q convert -O vmdk -o subformat=streamOptimized mixed.raw stream-mixed.vmdk && cp stream-mixed.vmdk "$corpus/vmdk_stream/"
q convert -O vmdk -o subformat=streamOptimized,compat6=on mixed.raw stream-v6.vmdk && cp stream-v6.vmdk "$corpus/vmdk_stream/"
# descriptor files (their extents are missing in the fuzz directory; the parser still runs)
q create -f vmdk -o subformat=monolithicFlat flat.vmdk 1M && add open_vmdk flat.vmdk
q create -f vmdk -o subformat=twoGbMaxExtentSparse split.vmdk 1M && add open_vmdk split.vmdk
# a descriptor whose flat extent is the image itself
cat > self.vmdk <<'DESC'
# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=ffffffff
createType="monolithicFlat"

RW 2 FLAT "img" 0

ddb.virtualHWVersion = "4"
ddb.geometry.cylinders = "1"
ddb.geometry.heads = "16"
ddb.geometry.sectors = "63"
DESC
add open_vmdk self.vmdk

# descriptors for vmdk_descriptor: extents name the files the harness makes next to them
# (ext-sparse.vmdk and ext-flat.raw, 1 MiB each; ext-vdi.vdi is another format)
desc() { # desc NAME CREATETYPE EXTENT-LINES...
    local name=$1 ct=$2; shift 2
    {
        printf '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
        printf 'createType="%s"\n\n# Extent description\n' "$ct"
        printf '%s\n' "$@"
        printf '\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = "4"\n'
        printf 'ddb.geometry.cylinders = "4"\nddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\n'
        printf 'ddb.adapterType = "ide"\n'
    } > "$corpus/vmdk_descriptor/$name"
}
desc flat twoGbMaxExtentFlat 'RW 2048 FLAT "ext-flat.raw" 0'
desc flat-offset monolithicFlat 'RW 1024 FLAT "ext-flat.raw" 1024'
desc sparse twoGbMaxExtentSparse 'RW 2048 SPARSE "ext-sparse.vmdk"'
desc mixed twoGbMaxExtentSparse 'RW 2048 SPARSE "ext-sparse.vmdk"' 'RDONLY 2048 FLAT "ext-flat.raw" 0' 'RW 4096 ZERO'
desc vmfs vmfs 'RW 2048 VMFS "ext-flat.raw"'
desc foreign monolithicFlat 'RW 2048 FLAT "ext-vdi.vdi" 0'
desc child twoGbMaxExtentSparse 'RW 2048 SPARSE "ext-sparse.vmdk"'
sed -i 's/^parentCID=ffffffff$/parentCID=87654321\nparentFileNameHint="ext-sparse.vmdk"/' "$corpus/vmdk_descriptor/child"

# ---- vdi ---------------------------------------------------------------------------------
q create -f vdi empty.vdi 1M && add open_vdi empty.vdi
q create -f vdi dyn.vdi 2M && io vdi dyn.vdi "write -P 0xaa 0 4k" && add open_vdi dyn.vdi
q create -f vdi -o static=on static.vdi 1M && add open_vdi static.vdi

# ---- options -----------------------------------------------------------------------------
o=$corpus/options
printf '%s' 'cluster_size=64k,lazy_refcounts=on' > "$o/qcow2"
printf '%s' 'compat=0.10,refcount_bits=1,preallocation=metadata' > "$o/compat"
printf '%s' 'backing_file=a,,b.qcow2,backing_fmt=qcow2,size=1.5G' > "$o/commas"
printf '%s' 'subformat=streamOptimized,adapter_type=lsilogic,hwversion=6' > "$o/vmdk"
printf '%s' 'static=on,size=0x100000' > "$o/vdi"
printf '%s' 'help' > "$o/help"
printf '%s' '18446744073709551615' > "$o/max"
printf '%s' '16E' > "$o/16e"
printf '%s' '0.5k' > "$o/frac"

# check_qcow2 starts from every qcow2 seed
cp "$corpus"/open_qcow2/* "$corpus/check_qcow2/"

cd "$corpus"
for t in *; do printf '%-12s %3d seeds, %s\n' "$t" "$(ls "$t" | wc -l)" "$(du -sh "$t" | cut -f1)"; done
