#!/usr/bin/env bash
# The README's "main job": convert the shipped qcow2 sample to raw and check its content.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
cargo run --release -q -- convert -p -O raw fixtures/sample.qcow2 "$out/sample.raw"
got=$(sha256sum "$out/sample.raw" | cut -d' ' -f1)
want=$(cat fixtures/sample.raw.sha256)
rm -rf "$out"
if [ "$got" != "$want" ]; then
    echo "sample conversion: content mismatch ($got != $want)" >&2
    exit 1
fi
echo "sample conversion: OK ($got)"
