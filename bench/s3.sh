#!/usr/bin/env bash
# Images on S3 (issue 19), side by side in one run against a versitygw it
# starts on loopback (POSIX backend in a temp dir, its own port):
#
#  (a) `vdisk convert` of s3://bench/base.{raw,qcow2} to a local qcow2 vs
#      `qemu-img convert` reading the same object over HTTP with its curl
#      driver (a presigned GET URL behind bench/s3tool's loopback proxy,
#      which answers the curl driver's HEAD; the proxy's CPU is not counted
#      in qemu's figures, its hop is in qemu's wall time). qemu-img runs
#      with -m 1: qemu 7.2's curl driver stalls for good with parallel
#      requests here (-m 2, 4 and 8 all hang within seconds);
#  (b) the same vdisk convert with a cold and then a warm --block-cache
#      (bytes fetched from S3, by vdisk's cache counters and by the
#      server's access log: 0 when warm);
#  (c) `vdisk serve` of a local qcow2 overlay on the S3 qcow2 base, cold
#      and warm cache, read whole by nbdcopy (one connection, one request
#      at a time: qemu's curl driver stalls with more), vs qemu-nbd serving
#      the same overlay with its backing file read over HTTP;
#  (d) peak RSS of `vdisk convert` uploading a 4 GiB image to S3 (raw, and
#      qcow2 written in order): acceptance <= 128 MiB. qemu-img cannot write
#      to S3 or HTTP; its local convert of the same file is shown for scale.
#
#   bench/s3.sh [RUNS]       (default 3 runs of each, alternating; medians)
#
# Source: 2 GiB raw with 1 GiB of data (even-numbered 1 MiB chunks random),
# and its qcow2. Columns: wall seconds, CPU seconds (user+sys) and peak
# RSS of each side, and the ratios vdisk/qemu of wall and CPU time. The
# machine's noise shows in wall time first; compare CPU where it matters.
# ONLY=regex limits the run to the matching rows' groups (a, b, c, d).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
[ -x /usr/bin/time ] || apt-get install -y -qq time >/dev/null
for c in qemu-img qemu-nbd nbdcopy python3; do
	command -v "$c" >/dev/null || { echo "$c missing: run ./test.sh first" >&2; exit 1; }
done
VGW=$(command -v versitygw || echo "$(go env GOPATH)/bin/versitygw")
[ -x "$VGW" ] || { echo "versitygw missing: go install github.com/versity/versitygw/cmd/versitygw@v1.8.0 (./test.sh does)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vdisk-s3bench.XXXXXX")
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
# shellcheck source=bench/lib.sh
. bench/lib.sh
build_vdisk
go build -o "$work/s3tool" ./bench/s3tool
S3TOOL=$work/s3tool

waitsock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "socket $1 never appeared" >&2; exit 1; }
want() { [ -z "${ONLY:-}" ] || [[ $1 =~ $ONLY ]]; }

# The S3 server.
port=$(freeport)
mkdir -p "$work/s3"
# --keep-alive: connections are reused, as every S3 service does.
"$VGW" --access benchaccess --secret benchsecret1234567890 --port 127.0.0.1:"$port" --quiet --keep-alive \
	--access-log "$work/access.log" posix "$work/s3" >"$work/vgw.log" 2>&1 & pids+=($!)
waitport "$port"
export AWS_ACCESS_KEY_ID=benchaccess AWS_SECRET_ACCESS_KEY=benchsecret1234567890
export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_REGION=us-east-1
unset AWS_PROFILE AWS_SESSION_TOKEN
"$S3TOOL" mb bench
# GETs of object data the server answered so far.
gets() { grep -c ' s3_GetObject ' "$work/access.log" || true; }

# The source: 2 GiB raw with 1 GiB of data, its qcow2, both uploaded.
src=$work/src.raw
python3 - "$src" <<'EOF'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.truncate(2 << 30)
    for i in range(0, 2048, 2):
        f.seek(i << 20)
        f.write(os.urandom(1 << 20))
EOF
qemu-img convert -f raw -O qcow2 "$src" "$work/src.qcow2"
"$VDISK" convert -f raw -O raw "$src" s3://bench/base.raw
"$VDISK" convert -f qcow2 -O qcow2 "$work/src.qcow2" s3://bench/base.qcow2

# qemu reads the objects over HTTP: presigned URLs behind the HEAD proxy.
pport=$(freeport)
"$S3TOOL" headproxy 127.0.0.1:"$pport" & pids+=($!)
waitport "$pport"
httpspec() { # FORMAT KEY: a json: spec of the object over HTTP
	local u
	u=$("$S3TOOL" presign bench "$2")
	u=${u/127.0.0.1:$port/127.0.0.1:$pport}
	printf 'json:{"driver":"%s","file":{"driver":"http","url":"%s"}}' "$1" "$u"
}
http_raw=$(httpspec raw base.raw)
http_qcow2=$(httpspec qcow2 base.qcow2)

# run OUTFILE CMD...: appends "wall cpu rssKiB" of CMD to OUTFILE.
run() {
	local out=$1
	shift
	/usr/bin/time -f "%e %U %S %M" -o "$work/time" "$@" >"$work/out" 2>"$work/err" || { echo "failed: $*" >&2; cat "$work/err" >&2; exit 1; }
	awk '{printf "%s %.2f %s\n", $1, $2 + $3, $4}' "$work/time" >>"$out"
}
col() { cut -d' ' -f"$2" "$1" | median; }
header() {
	printf '\n%s\n' "$1"
	printf '%-22s %8s %8s %8s %8s %9s %9s %7s %7s\n' case vdisk_s qemu_s vd_cpu q_cpu vd_MiB q_MiB wall× cpu×
}
row() { # NAME VFILE QFILE
	awk -v n="$1" -v vt="$(col "$2" 1)" -v vc="$(col "$2" 2)" -v vm="$(col "$2" 3)" \
		-v qt="$(col "$3" 1)" -v qc="$(col "$3" 2)" -v qm="$(col "$3" 3)" 'BEGIN {
		printf "%-22s %8.2f %8.2f %8.2f %8.2f %9.1f %9.1f %6.2fx %6.2fx\n", n, vt, qt, vc, qc, vm/1024, qm/1024,
			(qt > 0 ? vt/qt : 0), (qc > 0 ? vc/qc : 0) }'
}
# fetched: the block cache's bytes-fetched from vdisk --debug's last lines.
fetched() { grep -o 'bytes-fetched=[0-9]*' "$work/err" | tail -1 | cut -d= -f2; }

# (a) convert from S3 to a local qcow2.
if want a; then
	header "(a) convert S3 -> local qcow2 (vdisk s3:// vs qemu-img over HTTP)"
	for f in raw qcow2; do
		spec=$http_raw
		[ $f = qcow2 ] && spec=$http_qcow2
		: >"$work/v"; : >"$work/q"
		for ((r = 0; r < RUNS; r++)); do
			rm -f "$work/out.v" "$work/out.q"
			run "$work/v" "$VDISK" convert -f $f -O qcow2 s3://bench/base.$f "$work/out.v"
			run "$work/q" qemu-img convert -m 1 -O qcow2 "$spec" "$work/out.q"
		done
		qemu-img compare -q -f raw -F qcow2 "$src" "$work/out.v" || { echo "(a) $f: vdisk's output differs from the source" >&2; exit 1; }
		qemu-img compare -q -f raw -F qcow2 "$src" "$work/out.q" || { echo "(a) $f: qemu's output differs from the source" >&2; exit 1; }
		row "$f->qcow2" "$work/v" "$work/q"
	done
fi

# (b) the same vdisk convert through a cold, then a warm block cache; the
# peer is qemu-img over HTTP again (it has no persistent block cache).
if want b; then
	header "(b) convert S3 -> local qcow2 with --block-cache (qemu-img over HTTP as peer)"
	printf '%-22s %s\n' "" "fetched: bytes the cache read from S3 / GETs the server answered (median run)"
	for f in raw qcow2; do
		spec=$http_raw
		[ $f = qcow2 ] && spec=$http_qcow2
		: >"$work/q"; : >"$work/cold"; : >"$work/warm"; : >"$work/fc"; : >"$work/fw"
		for ((r = 0; r < RUNS; r++)); do
			rm -f "$work/cache.vci"
			for phase in cold warm; do
				rm -f "$work/out.v"
				g0=$(gets)
				run "$work/$phase" "$VDISK" --debug --block-cache "$work/cache.vci" --block-cache-size 3G convert -f $f -O qcow2 s3://bench/base.$f "$work/out.v"
				echo "$(fetched) $(($(gets) - g0))" >>"$work/f${phase:0:1}"
			done
			qemu-img compare -q -f raw -F qcow2 "$src" "$work/out.v" || { echo "(b) $f: vdisk's warm output differs" >&2; exit 1; }
			rm -f "$work/out.q"
			run "$work/q" qemu-img convert -m 1 -O qcow2 "$spec" "$work/out.q"
		done
		row "$f cold" "$work/cold" "$work/q"
		printf '%-22s fetched %s bytes / %s GETs\n' "" "$(col "$work/fc" 1)" "$(col "$work/fc" 2)"
		row "$f warm" "$work/warm" "$work/q"
		printf '%-22s fetched %s bytes / %s GETs\n' "" "$(col "$work/fw" 1)" "$(col "$work/fw" 2)"
	done
fi

# (c) serve a local overlay on the S3 base; nbdcopy reads the whole disk
# through one connection. Times are nbdcopy's wall time and the server's
# CPU and RSS (servers exit when the client leaves).
if want c; then
	header "(c) serve local overlay on S3 qcow2 base, nbdcopy to null: (vdisk serve vs qemu-nbd over HTTP)"
	"$VDISK" create -q -f qcow2 -b s3://bench/base.qcow2 -F qcow2 "$work/vm1.qcow2"
	# A few local writes in the overlay.
	# (qemu has no s3 protocol: the writes cover whole clusters, so the
	# overlay is written without its backing file.)
	qemu-io -c 'write -P 7 0 4M' -c 'write -P 9 1G 4M' \
		"json:{\"driver\":\"qcow2\",\"backing\":null,\"file\":{\"driver\":\"file\",\"filename\":\"$work/vm1.qcow2\"}}" >/dev/null
	# qemu's copy of the overlay names the base by its HTTP URL.
	cp "$work/vm1.qcow2" "$work/vm1q.qcow2"
	qemu-img rebase -u -F qcow2 -b "$http_qcow2" "$work/vm1q.qcow2"
	serve_read() { # OUTFILE SERVER-CMD...: starts the server, reads it all, waits for it
		local out=$1
		shift
		rm -f "$work/sock"
		/usr/bin/time -f "%U %S %M" -o "$work/stime" "$@" >"$work/serr" 2>&1 &
		local sp=$!
		waitsock "$work/sock"
		/usr/bin/time -f "%e" -o "$work/ctime" nbdcopy -C 1 -R 1 "nbd+unix:///?socket=$work/sock" null: ||
			{ echo "nbdcopy failed: $*" >&2; cat "$work/serr" >&2; exit 1; }
		wait "$sp" || { echo "server failed: $*" >&2; cat "$work/serr" >&2; exit 1; }
		grep -o 'bytes-fetched=[0-9]*' "$work/serr" | tail -1 | cut -d= -f2 >"$work/sfetched" || true
		awk -v w="$(cat "$work/ctime")" '{printf "%s %.2f %s\n", w, $1 + $2, $3}' "$work/stime" >>"$out"
	}
	: >"$work/cold"; : >"$work/warm"; : >"$work/q"; : >"$work/fc"; : >"$work/fw"
	for ((r = 0; r < RUNS; r++)); do
		rm -f "$work/serve.vci"
		for phase in cold warm; do
			g0=$(gets)
			serve_read "$work/$phase" "$VDISK" --debug --allow-backing-scheme s3 --block-cache "$work/serve.vci" --block-cache-size 2G \
				serve -r -k "$work/sock" "$work/vm1.qcow2"
			echo "$(cat "$work/sfetched") $(($(gets) - g0))" >>"$work/f${phase:0:1}"
		done
		serve_read "$work/q" qemu-nbd -r -f qcow2 -k "$work/sock" "$work/vm1q.qcow2"
	done
	row "overlay cold" "$work/cold" "$work/q"
	printf '%-22s fetched %s bytes / %s GETs\n' "" "$(col "$work/fc" 1)" "$(col "$work/fc" 2)"
	row "overlay warm" "$work/warm" "$work/q"
	printf '%-22s fetched %s bytes / %s GETs\n' "" "$(col "$work/fw" 1)" "$(col "$work/fw" 2)"
fi

# (d) memory while uploading a 4 GiB image (2 GiB of data) to S3.
if want d; then
	header "(d) upload a 4 GiB image to S3: peak RSS (acceptance <= 128 MiB); qemu-img: local convert, for scale"
	big=$work/big.raw
	truncate -s 4G "$big"
	dd if="$src" of="$big" bs=4M conv=notrunc,sparse status=none
	dd if="$src" of="$big" bs=4M seek=512 conv=notrunc,sparse status=none
	for f in raw qcow2; do
		: >"$work/v"; : >"$work/q"
		for ((r = 0; r < RUNS; r++)); do
			# A new object each run (an S3 object is not rewritten in
			# place), and the server's disk freed of the last one.
			"$S3TOOL" rm bench big.$f
			run "$work/v" "$VDISK" convert -f raw -O $f "$big" s3://bench/big.$f
			rm -f "$work/big.out"
			run "$work/q" qemu-img convert -f raw -O $f "$big" "$work/big.out"
			rm -f "$work/big.out"
		done
		"$S3TOOL" rm bench big.$f
		row "4G raw->s3 $f" "$work/v" "$work/q"
		awk -v m="$(col "$work/v" 3)" 'BEGIN { if (m/1024 > 128) { printf "  vdisk peak RSS %.1f MiB exceeds 128 MiB\n", m/1024; exit 1 } }'
	done
	rm -f "$big"
fi
