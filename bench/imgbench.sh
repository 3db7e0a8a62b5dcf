#!/usr/bin/env bash
# Times `vdisk bench` against `qemu-img bench` on the same qcow2 (and raw)
# images: 4 KiB writes scattered over a fresh 4 GiB image (each request
# 772 KiB after the previous one, wrapping around, so nearly every write
# allocates a cluster), then 4 KiB reads of what was written. Prints the
# median wall time of RUNS alternating runs and the ratio vdisk/qemu-img.
#
#   bench/imgbench.sh [RUNS]       (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
command -v qemu-img >/dev/null || { echo "qemu-img missing: run ./test.sh first" >&2; exit 1; }
[ -x /usr/bin/time ] || apt-get install -y -qq time >/dev/null

work=$(mktemp -d "${TMPDIR:-/tmp}/vdisk-imgbench.XXXXXX")
trap 'rm -rf "$work"' EXIT
# shellcheck source=bench/lib.sh
. bench/lib.sh
build_vdisk

COUNT=${COUNT:-40000}
ARGS=(-c "$COUNT" -d 16 -s 4k -S 772k -t writeback)


# timed FILE TOOL ARGS... -> appends seconds to $work/t
timed() {
	/usr/bin/time -a -o "$work/t" -f "%e" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
}

printf '%-22s %9s %9s %8s\n' test vdisk_s qemu_s ratio
for fmt in qcow2 raw; do
	for mode in write read; do
		: >"$work/v"; : >"$work/q"
		for ((r = 0; r < RUNS; r++)); do
			for tool in v q; do
				img=$work/img.$tool.$fmt
				if [ "$mode" = write ]; then
					rm -f "$img"
					qemu-img create -q -f "$fmt" "$img" 4G
				fi
				sync
				: >"$work/t"
				if [ "$tool" = v ]; then
					timed "$VDISK" bench -f "$fmt" $([ "$mode" = write ] && echo -w) "${ARGS[@]}" "$img"
				else
					timed qemu-img bench -f "$fmt" $([ "$mode" = write ] && echo -w) "${ARGS[@]}" "$img"
				fi
				cat "$work/t" >>"$work/$tool"
			done
		done
		if [ "$mode" = write ]; then
			qemu-img check -q -f "$fmt" "$work/img.v.$fmt" 2>/dev/null || [ "$fmt" = raw ] || { echo "qemu-img check failed on vdisk's $fmt image" >&2; exit 1; }
			qemu-img compare -q -f "$fmt" -F "$fmt" "$work/img.v.$fmt" "$work/img.q.$fmt" || { echo "$fmt: vdisk and qemu-img wrote different content" >&2; exit 1; }
		fi
		vt=$(median <"$work/v"); qt=$(median <"$work/q")
		awk -v n="$fmt 4k $mode QD16" -v vt="$vt" -v qt="$qt" 'BEGIN { printf "%-22s %9.3f %9.3f %7.2fx\n", n, vt, qt, (qt > 0 ? vt/qt : 0) }'
	done
done
