#!/usr/bin/env bash
# Times `vdisk convert` against `qemu-img convert` side by side, from and to
# network disks: an NBD export (qemu-nbd) and an iSCSI LUN (tgtd), both on
# loopback, and prints the median wall time, peak RSS and the ratio
# vdisk/qemu.
#
#   bench/network.sh [RUNS]       (default 5 runs of each, alternating)
#
# Source: 1 GiB sparse raw, even-numbered 1 MiB chunks filled with random
# data. ONLY=regex limits the run to the matching pairs.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
[ -x /usr/bin/time ] || apt-get install -y -qq time >/dev/null
for c in qemu-img qemu-nbd tgtd tgtadm; do
	command -v "$c" >/dev/null || { echo "$c missing: run ./test.sh first" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/vdisk-netbench.XXXXXX")
pids=()
# tgtd's control port number (its socket name); tgtd refuses large ones.
tgtctl=$((1000 + RANDOM % 19000))
cleanup() {
	# SIGKILL: tgtd ignores SIGTERM.
	for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
# shellcheck source=bench/lib.sh
. bench/lib.sh
build_vdisk


src=$work/src.raw
truncate -s 1G "$src"
head -c $((1 << 20)) /dev/urandom >"$work/chunk"
for ((i = 0; i < 1024; i += 2)); do
	dd if="$work/chunk" of="$src" bs=1M seek=$i conv=notrunc status=none
done
qemu-img convert -f raw -O qcow2 "$src" "$work/src.qcow2"
truncate -s 1G "$work/lun.raw" "$work/export.raw"

# NBD: a read-only export of the source and a writable one for -n targets.
nbd_src=$(freeport)
qemu-nbd -f raw -r -t -p "$nbd_src" -b 127.0.0.1 "$src" & pids+=($!)
nbd_dst=$(freeport)
qemu-nbd -f raw -t -p "$nbd_dst" -b 127.0.0.1 "$work/export.raw" & pids+=($!)
waitport "$nbd_src"; waitport "$nbd_dst"

# iSCSI: one target with LUN 1 on a copy of the source (thin) and LUN 2 as
# a -n target.
cp --sparse=always "$src" "$work/lunsrc.raw"
iport=$(freeport)
tgtd -f -C "$tgtctl" --iscsi portal=127.0.0.1:"$iport" >"$work/tgtd.log" 2>&1 & pids+=($!)
waitport "$iport"
iqn=iqn.2026-12.org.vdisk:bench
tgtadm -C "$tgtctl" --lld iscsi --op new --mode target --tid 1 -T "$iqn"
tgtadm -C "$tgtctl" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$work/lunsrc.raw"
tgtadm -C "$tgtctl" --lld iscsi --op update --mode logicalunit --tid 1 --lun 1 --params thin_provisioning=1 || true
tgtadm -C "$tgtctl" --lld iscsi --op new --mode logicalunit --tid 1 --lun 2 -b "$work/lun.raw"
tgtadm -C "$tgtctl" --lld iscsi --op bind --mode target --tid 1 -I ALL

# PAIRS: "name|src|srcfmt|dst|dstfmt|extra args"
PAIRS=(
	"nbd->qcow2|nbd://127.0.0.1:$nbd_src/|raw|OUT|qcow2|"
	"iscsi->qcow2|iscsi://127.0.0.1:$iport/$iqn/1|raw|OUT|qcow2|"
	"qcow2->nbd|$work/src.qcow2|qcow2|nbd://127.0.0.1:$nbd_dst/|raw|-n"
	"qcow2->iscsi|$work/src.qcow2|qcow2|iscsi://127.0.0.1:$iport/$iqn/2|raw|-n"
)

run() {
	/usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
	cat "$work/time"
}

printf '%-14s %10s %10s %10s %10s %8s\n' pair vdisk_s qemu_s vdisk_MiB qemu_MiB ratio
for pair in "${PAIRS[@]}"; do
	IFS='|' read -r name s sf d df extra <<<"$pair"
	if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then continue; fi
	: >"$work/v"; : >"$work/q"
	for ((r = 0; r < RUNS; r++)); do
		vd=$d qd=$d
		[ "$d" = OUT ] && vd=$work/out.v qd=$work/out.q && rm -f "$vd" "$qd"
		run "$VDISK" convert -f "$sf" -O "$df" $extra "$s" "$vd" >>"$work/v"
		if [ "$d" != OUT ]; then
			qemu-img compare -q -f "$sf" -F "$df" "$s" "$d" || { echo "$name: vdisk's target differs" >&2; exit 1; }
		fi
		run qemu-img convert -f "$sf" -O "$df" $extra "$s" "$qd" >>"$work/q"
	done
	if [ "$d" = OUT ]; then
		qemu-img compare -q -f "$df" -F "$df" "$work/out.v" "$work/out.q" || { echo "$name: outputs differ" >&2; exit 1; }
	fi
	vt=$(cut -d' ' -f1 "$work/v" | median); qt=$(cut -d' ' -f1 "$work/q" | median)
	vm=$(cut -d' ' -f2 "$work/v" | median); qm=$(cut -d' ' -f2 "$work/q" | median)
	awk -v n="$name" -v vt="$vt" -v qt="$qt" -v vm="$vm" -v qm="$qm" 'BEGIN {
		printf "%-14s %10.3f %10.3f %10.1f %10.1f %7.2fx\n", n, vt, qt, vm/1024, qm/1024, (qt > 0 ? vt/qt : 0) }'
done
