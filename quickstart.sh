#!/usr/bin/env bash
# Quick start: builds vdisk, inspects the sample image in testdata/, converts
# it to every format vdisk can create (with a progress bar), and checks each
# copy with vdisk compare (and qemu-img check/compare when qemu-img exists).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p bin out
echo "== building vdisk"
go build -o bin/vdisk ./cmd/vdisk
V=bin/vdisk
echo "== vdisk info testdata/sample.raw"
$V info -f raw testdata/sample.raw
for fmt in raw qcow2 vdi vpc vmdk vhdx qed parallels; do
	$V formats 2>/dev/null | grep -qE "^$fmt\b" || continue
	$V formats 2>/dev/null | grep -E "^$fmt\b" | grep -q create || continue
	out=out/sample.$fmt
	echo "== vdisk convert -p -f raw -O $fmt testdata/sample.raw $out"
	$V convert -p -f raw -O "$fmt" testdata/sample.raw "$out"
	$V info "$out"
	$V compare -f raw -F "$fmt" testdata/sample.raw "$out"
	if command -v qemu-img >/dev/null; then
		[ "$fmt" = raw ] || qemu-img check -q -f "$fmt" "$out" && echo "qemu-img check: clean"
		qemu-img compare -q -f raw -F "$fmt" testdata/sample.raw "$out" && echo "qemu-img compare: identical"
	fi
done
echo "== vdisk map out/sample.raw"
$V map out/sample.raw
echo "quick start done: the converted images are in out/"
