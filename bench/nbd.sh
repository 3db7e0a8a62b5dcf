#!/usr/bin/env bash
# Serves the same image with `vdisk serve`, with `qemu-nbd` and, for raw,
# with nbdkit's file plugin (unix sockets, one server at a time) and runs
# fio's nbd engine against each, side by side: random 4 KiB reads and
# writes at queue depth 16, and sequential 1 MiB reads. Prints IOPS,
# bandwidth, the ratios vdisk/qemu-nbd and vdisk/nbdkit, and the CPU time
# (user+sys) each server process spent per request.
#
#   bench/nbd.sh [RUNTIME_SECONDS]     (default 10 per job and server)
#
# Environment:
#   SIZE=512M   image size (filled with random data, so reads hit data)
#   RUNS=1      repetitions of every job (the median is reported); the
#               servers alternate within every run
#   FORMATS="raw qcow2 vhdx"  formats to serve (qemu-img converts the random data
#               into each; later formats add themselves here)
#   NBDKIT=1    also run nbdkit's file plugin on raw (0: skip it)
#
# Goals (issue 10, issue 22): >= 1.2x qemu-nbd's IOPS on random 4 KiB,
# >= 1.0x on sequential reads; on raw >= 1.1x nbdkit's file plugin on
# random 4 KiB reads and writes and >= 1.0x on sequential reads. fio runs
# on the same machine, so on a small or busy machine the client's CPU use
# weighs on every server alike; the CPU columns (microseconds of server
# CPU per request, from /proc/PID/stat) do not depend on that. The fio
# columns are the client's CPU use (user+sys, % of one core, fio's own
# count) against vdisk and against nbdkit: fio runs one thread, so near
# 100% the client, not the server, sets the IOPS.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-10}
SIZE=${SIZE:-512M}
RUNS=${RUNS:-1}
FORMATS=${FORMATS:-raw qcow2 vhdx}
NBDKIT=${NBDKIT:-1}

command -v jq >/dev/null || apt-get install -y -qq jq >/dev/null
for t in qemu-nbd qemu-img fio nbdinfo jq; do
	command -v "$t" >/dev/null || { echo "bench/nbd.sh: $t missing (./test.sh installs the tools; jq: apt-get install jq)" >&2; exit 1; }
done
if [ "$NBDKIT" = 1 ] && ! nbdkit file --version >/dev/null 2>&1; then
	echo "bench/nbd.sh: nbdkit's file plugin is missing (apt-get install nbdkit; NBDKIT=0 skips it)" >&2
	exit 1
fi
fio --enghelp=nbd 2>/dev/null | grep -q uri || { echo "bench/nbd.sh: this fio has no nbd engine" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vdisk-nbdbench.XXXXXX")
server_pid=""
cleanup() {
	[ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT
# shellcheck source=bench/lib.sh
. bench/lib.sh
build_vdisk
"$VDISK" serve --help >/dev/null 2>&1 || { echo "bench/nbd.sh: this vdisk has no serve command (register newServeCmd in cmd/vdisk/root.go)" >&2; exit 1; }
TICK=$(getconf CLK_TCK)

# start SERVER IMAGE FORMAT: serve IMAGE on $work/sock, wait until ready.
start() {
	local server=$1 img=$2 fmt=$3
	rm -f "$work/sock"
	case $server in
	vdisk) "$VDISK" serve -t -k "$work/sock" -f "$fmt" "$img" 2>"$work/server.err" & ;;
	qemu) qemu-nbd -t -k "$work/sock" -f "$fmt" "$img" 2>"$work/server.err" & ;;
	# -f: foreground, so that $! is the server; the file plugin serves
	# raw files only.
	nbdkit) nbdkit -f -U "$work/sock" file file="$img" 2>"$work/server.err" & ;;
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

# cputicks: user+sys clock ticks the server has used so far.
cputicks() { awk '{print $14 + $15}' "/proc/$server_pid/stat"; }

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

# measure JOB -> "iops bw_KiB/s cpu_us_per_request fio_cpu_percent" of
# the server currently running
measure() {
	local t0 t1
	t0=$(cputicks)
	# shellcheck disable=SC2046
	fio --name="$1" --ioengine=nbd --uri="nbd+unix:///?socket=$work/sock" $(job "$1") \
		--size="$SIZE" --runtime="$RUNTIME" --time_based --output-format=json >"$work/fio.json" 2>"$work/fio.err" || {
		cat "$work/fio.err" >&2
		exit 1
	}
	t1=$(cputicks)
	local rw=read
	[ "$1" = randwrite ] && rw=write
	# fio prints "fio: connected to NBD server" before the JSON.
	sed -n '/^{/,$p' "$work/fio.json" | jq -r --argjson ticks $((t1 - t0)) --argjson hz "$TICK" \
		".jobs[0] | .$rw as \$r | \"\(\$r.iops) \(\$r.bw) \(if \$r.total_ios > 0 then \$ticks / \$hz * 1e6 / \$r.total_ios else 0 end) \(.usr_cpu + .sys_cpu)\""
}


echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); runtime ${RUNTIME}s per job, image $SIZE, $RUNS run(s)"
echo "IOPS and MiB/s: medians; cpu: server user+sys microseconds per request (median); v/q = vdisk/qemu-nbd, v/k = vdisk/nbdkit"
printf '%-6s %-9s %9s %9s %9s %8s %8s %8s %6s %6s %6s %6s %6s %5s %5s\n' \
	format job vdisk qemu nbdkit vMiB/s qMiB/s kMiB/s v/q v/k cpu_v cpu_q cpu_k fio_v fio_k
for fmt in $FORMATS; do
	img=$work/img.$fmt
	head -c "$(numfmt --from=iec "$SIZE")" /dev/urandom >"$work/src.raw"
	if [ "$fmt" = raw ]; then
		mv "$work/src.raw" "$img"
	else
		qemu-img convert -f raw -O "$fmt" "$work/src.raw" "$img"
		rm -f "$work/src.raw"
	fi
	servers="vdisk qemu"
	[ "$fmt" = raw ] && [ "$NBDKIT" = 1 ] && servers="vdisk qemu nbdkit"
	for j in randread randwrite seqread; do
		for s in vdisk qemu nbdkit; do : >"$work/$s.iops"; : >"$work/$s.bw"; : >"$work/$s.cpu"; : >"$work/$s.fio"; done
		for ((r = 0; r < RUNS; r++)); do
			for server in $servers; do
				start "$server" "$img" "$fmt"
				measure "$j" >"$work/m"
				read -r iops bw cpu fiocpu <"$work/m"
				stop
				echo "$iops" >>"$work/$server.iops"
				echo "$bw" >>"$work/$server.bw"
				echo "$cpu" >>"$work/$server.cpu"
				echo "$fiocpu" >>"$work/$server.fio"
			done
		done
		row=()
		for kind in iops bw cpu fio; do
			for s in vdisk qemu nbdkit; do
				if [ -s "$work/$s.$kind" ]; then row+=("$(median <"$work/$s.$kind")"); else row+=(-); fi
			done
		done
		awk -v f="$fmt" -v j="$j" -v r="${row[*]}" 'BEGIN {
			split(r, a, " ")
			vi = a[1]; qi = a[2]; ki = a[3]
			num = "%9.0f"; bw = "%8.1f"; rat = "%5.2fx"; cpu = "%6.1f"
			printf "%-6s %-9s ", f, j
			printf num " ", vi; printf num " ", qi
			if (ki == "-") printf "%9s ", "-"; else printf num " ", ki
			printf bw " ", a[4] / 1024; printf bw " ", a[5] / 1024
			if (a[6] == "-") printf "%8s ", "-"; else printf bw " ", a[6] / 1024
			if (qi > 0) printf rat " ", vi / qi; else printf "%6s ", "-"
			if (ki != "-" && ki > 0) printf rat " ", vi / ki; else printf "%6s ", "-"
			printf cpu " " cpu " ", a[7], a[8]
			if (a[9] == "-") printf "%6s ", "-"; else printf cpu " ", a[9]
			printf "%4.0f%% ", a[10]
			if (a[12] == "-") printf "%5s\n", "-"; else printf "%4.0f%%\n", a[12]
		}'
	done
	rm -f "$img"
done
