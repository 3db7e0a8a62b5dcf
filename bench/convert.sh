#!/usr/bin/env bash
# Times `vdisk convert` against `qemu-img convert` side by side on the same
# inputs and prints the median wall time, peak RSS and CPU time (user+sys)
# and the ratios vdisk/qemu.
#
#   bench/convert.sh [RUNS]        (default 5 runs of each, alternating)
#
# Pairs: raw->raw (2 GiB sparse source, every other 1 MiB chunk filled).
# Later formats add their pairs to PAIRS below. Pairs named @xfs run on a
# loop-mounted XFS file system with reflinks (root only; XFS=0 skips them);
# in those named /-C qemu-img gets -C (its copy offload) and vdisk nothing. ONLY=regex limits the run
# to the matching pairs (ONLY=vmdk bench/convert.sh 3).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
if [ ! -x /usr/bin/time ]; then
	apt-get install -y -qq time >/dev/null
fi
command -v qemu-img >/dev/null || { echo "qemu-img missing: run ./test.sh first" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vdisk-bench.XXXXXX")
xfs=""
cleanup() {
	if [ -n "$xfs" ]; then umount "$xfs" || umount -l "$xfs"; fi
	rm -rf "$work"
}
trap cleanup EXIT
# shellcheck source=bench/lib.sh
. bench/lib.sh
build_vdisk

# Source: 2 GiB sparse raw, even-numbered 1 MiB chunks filled with random data.
src=$work/src.raw
truncate -s 2G "$src"
head -c $((1 << 20)) /dev/urandom >"$work/chunk"
for ((i = 0; i < 2048; i += 2)); do
	dd if="$work/chunk" of="$src" bs=1M seek=$i conv=notrunc status=none
done
sync

# VDI source: the same content, made by qemu-img.
src_vdi=$work/src.vdi
qemu-img convert -f raw -O vdi "$src" "$src_vdi"

# VHD (vpc) source: the same content, a dynamic image made by qemu-img.
src_vpc=$work/src.vhd
qemu-img convert -f raw -O vpc "$src" "$src_vpc"

# QCOW2 source: the same content, made by qemu-img.
src_qcow2=$work/src.qcow2
qemu-img convert -f raw -O qcow2 "$src" "$src_qcow2"

# VMDK source: the same content, a monolithicSparse image made by qemu-img.
src_vmdk=$work/src.vmdk
qemu-img convert -f raw -O vmdk "$src" "$src_vmdk"

# VHDX, QED and Parallels sources: the same content, made by qemu-img.
src_vhdx=$work/src.vhdx
qemu-img convert -f raw -O vhdx "$src" "$src_vhdx"
src_qed=$work/src.qed
qemu-img convert -f raw -O qed "$src" "$src_qed"
src_par=$work/src.parallels
qemu-img convert -f raw -O parallels "$src" "$src_par"

# Text-like source for stream-optimized output (compressible, unlike the
# random chunks): 256 MiB, every other 1 MiB chunk holding log-like lines.
src_txt=$work/src-txt.raw
truncate -s 256M "$src_txt"
seq -f "%09g some log line of a disk image, compressible text" 1 18000 >"$work/tchunk"
for ((i = 0; i < 256; i += 2)); do
	dd if="$work/tchunk" of="$src_txt" bs=1M seek=$i conv=notrunc status=none
done

# XFS pairs (XFS=0 skips them): the same conversions on an XFS file system
# with reflinks, loop-mounted from a sparse file in $work, where a data run
# that is block-aligned in its file goes to the raw target as a clone
# (FICLONERANGE: the files share the blocks) rather than as a copy. They
# need root and loop devices. The sources are copies of the ones above.
if [ "${XFS:-1}" = 1 ] && { [ -z "${ONLY:-}" ] || [[ $ONLY == *xfs* ]]; }; then
	if [ "$(id -u)" = 0 ] && [ -e /dev/loop-control ]; then
		command -v mkfs.xfs >/dev/null || apt-get install -y -qq xfsprogs >/dev/null
		truncate -s 16G "$work/xfs.img"
		mkfs.xfs -q -f -m reflink=1 "$work/xfs.img"
		mkdir "$work/xfs"
		if mount -o loop "$work/xfs.img" "$work/xfs"; then
			xfs=$work/xfs
			for f in "$src" "$src_vdi" "$src_vpc" "$src_qcow2" "$src_vmdk" "$src_vhdx" "$src_qed" "$src_par"; do
				cp --sparse=always "$f" "$xfs/"
			done
			sync
		else
			echo "bench/convert.sh: no XFS pairs (the loop mount failed)" >&2
		fi
	else
		echo "bench/convert.sh: no XFS pairs (they need root and loop devices)" >&2
	fi
fi

# Encrypted targets: the passphrase comes from a file; both tools spend the
# same iter-time (ms) on PBKDF2 so that key derivation does not dominate.
printf 'bench passphrase' >"$work/secret"
enc_obj="--object secret,id=sec0,file=$work/secret"
enc_iter=10

# PAIRS: "name|src|srcfmt|dstfmt|extra vdisk/qemu args[|qemu dstfmt|qemu args]"
# The last two fields give qemu-img a different target where it cannot
# write the format (DMG: the nearest compressed peer, qcow2 -c); vdisk's
# output is then compared with the source instead of qemu's output.
PAIRS=(
	"raw->raw|$src|raw|raw|"
	"raw->vdi|$src|raw|vdi|"
	"vdi->raw|$src_vdi|vdi|raw|"
	"raw->vpc|$src|raw|vpc|"
	"vpc->raw|$src_vpc|vpc|raw|"
	"raw->qcow2|$src|raw|qcow2|"
	"qcow2->raw|$src_qcow2|qcow2|raw|"
	"raw->qcow2-c|$src|raw|qcow2|-c"
	"raw->qcow2-zstd|$src|raw|qcow2|-c -o compression_type=zstd"
	"txt->qcow2-c|$src_txt|raw|qcow2|-c"
	"txt->qcow2-zstd|$src_txt|raw|qcow2|-c -o compression_type=zstd"
	"raw->vmdk|$src|raw|vmdk|"
	"vmdk->raw|$src_vmdk|vmdk|raw|"
	"raw->vmdk-stream|$src|raw|vmdk|-o subformat=streamOptimized"
	"txt->vmdk-stream|$src_txt|raw|vmdk|-o subformat=streamOptimized"
	"raw->vhdx|$src|raw|vhdx|"
	"vhdx->raw|$src_vhdx|vhdx|raw|"
	"raw->qed|$src|raw|qed|"
	"qed->raw|$src_qed|qed|raw|"
	"raw->parallels|$src|raw|parallels|"
	"parallels->raw|$src_par|parallels|raw|"
	"raw->qcow|$src|raw|qcow|"
	"raw->dmg|$src|raw|dmg||qcow2|-c"
	"txt->dmg|$src_txt|raw|dmg||qcow2|-c"
	"raw->luks|$src|raw|luks|$enc_obj -o key-secret=sec0,iter-time=$enc_iter"
	"raw->qcow2+luks|$src|raw|qcow2|$enc_obj -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=$enc_iter"
)
if [ -n "$xfs" ]; then
	PAIRS+=(
		"raw->raw@xfs|$xfs/src.raw|raw|raw|"
		"raw->raw@xfs/-C|$xfs/src.raw|raw|raw||raw|-C"
		"vdi->raw@xfs|$xfs/src.vdi|vdi|raw|"
		"vpc->raw@xfs|$xfs/src.vhd|vpc|raw|"
		"qcow2->raw@xfs|$xfs/src.qcow2|qcow2|raw|"
		"qcow2->raw@xfs/-C|$xfs/src.qcow2|qcow2|raw||raw|-C"
		"vmdk->raw@xfs|$xfs/src.vmdk|vmdk|raw|"
		"vhdx->raw@xfs|$xfs/src.vhdx|vhdx|raw|"
		"qed->raw@xfs|$xfs/src.qed|qed|raw|"
		"parallels->raw@xfs|$xfs/src.parallels|parallels|raw|"
		"raw->vpc@xfs|$xfs/src.raw|raw|vpc|"
		"raw->vhdx@xfs|$xfs/src.raw|raw|vhdx|"
		"raw->qed@xfs|$xfs/src.raw|raw|qed|"
		"raw->parallels@xfs|$xfs/src.raw|raw|parallels|"
	)
fi


# run OUT TOOL... -> prints "seconds maxrss_kib cpu_seconds" (cpu = user+sys).
# qemu-img's LUKS key-slot set-up now and then fails to time PBKDF2 on a
# busy machine ("Unable to get accurate CPU usage"): that run is repeated.
run() {
	local out=$1; shift
	local try
	for try in 1 2 3; do
		rm -f "$out"
		sync
		if /usr/bin/time -f "%e %M %U %S" -o "$work/time" "$@" >/dev/null 2>"$work/err"; then
			awk '{printf "%s %s %.2f\n", $1, $2, $3 + $4}' "$work/time"
			return
		fi
		grep -q 'accurate CPU usage' "$work/err" || break
	done
	cat "$work/err" >&2
	exit 1
}

# check TOOL (v or q): compares $out, the last output of TOOL in the
# current pair, with the source and records its allocated KiB in
# $work/du.TOOL. Encrypted outputs are opened with the secret.
check() {
	local f=$df
	if [ "$1" = q ]; then f=$qdf; fi
	if [[ $extra == *key-secret=sec0* ]]; then
		local key=key-secret
		if [ "$df" = qcow2 ]; then key=encrypt.key-secret; fi
		qemu-img compare -q $enc_obj --image-opts "driver=$f,file.filename=$out,$key=sec0" "driver=$sf,file.filename=$s" ||
			{ echo "$name: the $1 output differs from the source" >&2; exit 1; }
	else
		# (qemu's dmg driver notes its missing bz2/lzfse modules on stderr.)
		qemu-img compare -q -f "$f" -F "$sf" "$out" "$s" 2> >(grep -v 'module block-block-dmg' >&2) ||
			{ echo "$name: the $1 output differs from the source" >&2; exit 1; }
	fi
	du -k "$out" | cut -f1 >"$work/du.$1"
}

printf '%-18s %10s %10s %10s %10s %8s %8s %8s\n' pair vdisk_s qemu_s vdisk_MiB qemu_MiB ratio rss_ratio cpu_ratio
for pair in "${PAIRS[@]}"; do
	IFS='|' read -r name s sf df extra qdf qextra <<<"$pair"
	if [ -z "$qdf" ]; then qdf=$df qextra=$extra; fi
	# ONLY=regex runs the matching pairs only (e.g. ONLY=vmdk).
	if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then continue; fi
	: >"$work/v" ; : >"$work/q"
	# Both tools write the output next to the source: on XFS for the
	# @xfs pairs (a clone stays within one file system).
	out=$work/out
	if [[ $name == *@xfs* ]]; then out=$xfs/out; fi
	# The two tools alternate, and which goes first alternates too: the
	# page cache and writeback state left by one run weigh on the next.
	# Both write the same file, removed before every run, so that each
	# run's page cache comes from the pages the other tool's run has just
	# freed: in a virtual machine, how fast a guest page is to fill
	# depends on how the host backs it, and a tool that always recycles
	# its own output's pages keeps whatever backing it got first (one
	# tool was then 2-3x slower in every run of a pair, and which one
	# changed from one invocation of this script to the next). Only the
	# very first run of a pair gets pages that have been free for a while.
	for ((r = 0; r < RUNS; r++)); do
		if ((r % 2 == 0)); then order="v q"; else order="q v"; fi
		for t in $order; do
			if [ "$t" = v ]; then
				run "$out" "$VDISK" convert -f "$sf" -O "$df" $extra "$s" "$out" >>"$work/v"
			else
				run "$out" qemu-img convert -f "$sf" -O "$qdf" $qextra "$s" "$out" >>"$work/q"
			fi
			# The last output of each tool is checked against the
			# source (the timed runs are unaffected) and left for the
			# next run to remove.
			if ((r == RUNS - 1)); then check "$t"; fi
		done
		if [ -n "${VERBOSE:-}" ]; then echo "  run $r: vdisk $(tail -1 "$work/v"), qemu $(tail -1 "$work/q")"; fi
	done
	vt=$(cut -d' ' -f1 "$work/v" | median); qt=$(cut -d' ' -f1 "$work/q" | median)
	vm=$(cut -d' ' -f2 "$work/v" | median); qm=$(cut -d' ' -f2 "$work/q" | median)
	vc=$(cut -d' ' -f3 "$work/v" | median); qc=$(cut -d' ' -f3 "$work/q" | median)
	awk -v n="$name" -v vt="$vt" -v qt="$qt" -v vm="$vm" -v qm="$qm" -v vc="$vc" -v qc="$qc" 'BEGIN {
		printf "%-18s %10.3f %10.3f %10.1f %10.1f %7.2fx %7.2fx %7.2fx\n", n, vt, qt, vm/1024, qm/1024, (qt > 0 ? vt/qt : 0), (qm > 0 ? vm/qm : 0), (qc > 0 ? vc/qc : 0) }'
	printf '%-18s allocated: vdisk %s KiB, qemu %s KiB\n' "" "$(cat "$work/du.v")" "$(cat "$work/du.q")"
	# No output stays in the page cache for the next pair.
	rm -f "$out"
	sync
done
