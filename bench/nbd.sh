#!/usr/bin/env bash
# Serves the same image with `vdisk serve` and with `qemu-nbd` (unix
# sockets, one at a time) and runs fio's nbd engine against each, side by
# side: random 4 KiB reads and writes at queue depth 16, and sequential
# 1 MiB reads. Prints IOPS, bandwidth and the ratio vdisk/qemu-nbd.
#
#   bench/nbd.sh [RUNTIME_SECONDS]     (default 10 per job and server)
#
# Environment:
#   SIZE=512M   image size (filled with random data, so reads hit data)
#   RUNS=1      repetitions of every job (the median is reported); the two
#               servers alternate within every run
#   FORMATS="raw qcow2 vhdx"  formats to serve (qemu-img converts the random data
#               into each; later formats add themselves here)
#
# Goals (issue 10): >= 1.2x qemu-nbd's IOPS on random 4 KiB, >= 1.0x on
# sequential reads. fio runs on the same machine, so on a small or busy
# machine the client's CPU use weighs on both sides alike.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-10}
SIZE=${SIZE:-512M}
RUNS=${RUNS:-1}
FORMATS=${FORMATS:-raw qcow2 vhdx}

command -v jq >/dev/null || apt-get install -y -qq jq >/dev/null
for t in qemu-nbd qemu-img fio nbdinfo jq; do
	command -v "$t" >/dev/null || { echo "bench/nbd.sh: $t missing (./test.sh installs the tools; jq: apt-get install jq)" >&2; exit 1; }
done
fio --enghelp=nbd 2>/dev/null | grep -q uri || { echo "bench/nbd.sh: this fio has no nbd engine" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vdisk-nbdbench.XXXXXX")
server_pid=""
cleanup() {
	[ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT
# VDISK_BIN runs another build instead (e.g. the previous commit's, to
# compare two versions against the same peer).
if [ -n "${VDISK_BIN:-}" ]; then
	VDISK=$VDISK_BIN
else
	go build -o "$work/vdisk" ./cmd/vdisk
	VDISK=$work/vdisk
fi
"$VDISK" serve --help >/dev/null 2>&1 || { echo "bench/nbd.sh: this vdisk has no serve command (register newServeCmd in cmd/vdisk/root.go)" >&2; exit 1; }

# start SERVER IMAGE FORMAT: serve IMAGE on $work/sock, wait until ready.
start() {
	local server=$1 img=$2 fmt=$3
	rm -f "$work/sock"
	case $server in
	vdisk) "$VDISK" serve -t -k "$work/sock" -f "$fmt" "$img" 2>"$work/server.err" & ;;
	qemu) qemu-nbd -t -k "$work/sock" -f "$fmt" "$img" 2>"$work/server.err" & ;;
	esac
	server_pid=$!
	for ((i = 0; i < 500; i++)); do
		[ -S "$work/sock" ] && nbdinfo --size "nbd+unix:///?socket=$work/sock" >/dev/null 2>&1 && return 0
		sleep 0.02
	done
	echo "bench/nbd.sh: $server did not start:" >&2
	cat "$work/server.err" >&2
	exit 1
}

stop() {
	kill -TERM "$server_pid"
	wait "$server_pid" || true
	server_pid=""
}

# job NAME -> fio arguments
job() {
	case $1 in
	randread) echo "--rw=randread --bs=4k --iodepth=16" ;;
	randwrite) echo "--rw=randwrite --bs=4k --iodepth=16" ;;
	seqread) echo "--rw=read --bs=1M --iodepth=16" ;;
	esac
}

# measure JOB -> "iops bw_KiB/s" of the server currently running
measure() {
	# shellcheck disable=SC2046
	fio --name="$1" --ioengine=nbd --uri="nbd+unix:///?socket=$work/sock" $(job "$1") \
		--size="$SIZE" --runtime="$RUNTIME" --time_based --output-format=json >"$work/fio.json" 2>"$work/fio.err" || {
		cat "$work/fio.err" >&2
		exit 1
	}
	local rw=read
	[ "$1" = randwrite ] && rw=write
	# fio prints "fio: connected to NBD server" before the JSON.
	sed -n '/^{/,$p' "$work/fio.json" | jq -r ".jobs[0].$rw | \"\(.iops) \(.bw)\""
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); runtime ${RUNTIME}s per job, image $SIZE, $RUNS run(s)"
printf '%-8s %-10s %12s %12s %11s %11s %8s\n' format job vdisk_IOPS qemu_IOPS vdisk_MiB/s qemu_MiB/s ratio
for fmt in $FORMATS; do
	img=$work/img.$fmt
	head -c "$(numfmt --from=iec "$SIZE")" /dev/urandom >"$work/src.raw"
	if [ "$fmt" = raw ]; then
		mv "$work/src.raw" "$img"
	else
		qemu-img convert -f raw -O "$fmt" "$work/src.raw" "$img"
		rm -f "$work/src.raw"
	fi
	for j in randread randwrite seqread; do
		: >"$work/v.iops"; : >"$work/q.iops"; : >"$work/v.bw"; : >"$work/q.bw"
		for ((r = 0; r < RUNS; r++)); do
			for server in vdisk qemu; do
				start "$server" "$img" "$fmt"
				measure "$j" >"$work/m"
				read -r iops bw <"$work/m"
				stop
				echo "$iops" >>"$work/${server:0:1}.iops"
				echo "$bw" >>"$work/${server:0:1}.bw"
			done
		done
		vi=$(median <"$work/v.iops"); qi=$(median <"$work/q.iops")
		vb=$(median <"$work/v.bw"); qb=$(median <"$work/q.bw")
		awk -v f="$fmt" -v j="$j" -v vi="$vi" -v qi="$qi" -v vb="$vb" -v qb="$qb" 'BEGIN {
			printf "%-8s %-10s %12.0f %12.0f %11.1f %11.1f %7.2fx\n", f, j, vi, qi, vb/1024, qb/1024, (qi > 0 ? vi/qi : 0) }'
	done
	rm -f "$img"
done
