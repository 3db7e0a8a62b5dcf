#!/usr/bin/env bash
# VirtualBox disk encryption: times `vdisk convert -O vdi -o vbox-encrypt=...`
# (raw -> encrypted VDI, AES-XTS-256, every sector written) against its
# nearest peer, `qemu-img convert -O luks` (raw -> LUKS, aes-256-xts), on
# the same fully written source; qemu has no VirtualBox encryption. Prints
# the median wall time, user+sys CPU seconds and the ratios vdisk/qemu.
#
#   bench/vboxcrypt.sh [RUNS] [SIZE_MIB]   (default 5 runs, 1024 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
SIZE=${2:-1024}
if [ ! -x /usr/bin/time ]; then
	apt-get install -y -qq time >/dev/null
fi
command -v qemu-img >/dev/null || { echo "qemu-img missing: run ./test.sh first" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vdisk-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
# shellcheck source=bench/lib.sh
. bench/lib.sh
build_vdisk
src=$work/src.raw
head -c $((SIZE << 20)) /dev/urandom >"$src"
sync

# run LABEL CMD...: prints "wall cpu" of one run.
run() {
	shift
	/usr/bin/time -f '%e %U %S' -o "$work/t" "$@" >/dev/null
	awk '{printf "%s %.2f\n", $1, $2 + $3}' "$work/t"
}

: >"$work/v"
: >"$work/q"
for ((i = 0; i < RUNS; i++)); do
	rm -f "$work/o.vdi" "$work/o.luks" "$work/p.xml"
	run vdisk "$VDISK" convert --object secret,id=s,data=bench -f raw -O vdi \
		-o vbox-encrypt=AES-XTS256-PLAIN64,key-secret=s,vbox-keystore-out="$work/p.xml" "$src" "$work/o.vdi" >>"$work/v"
	run qemu "qemu-img" convert --object secret,id=s,data=bench -f raw -O luks \
		-o key-secret=s,cipher-alg=aes-256,cipher-mode=xts,iter-time=10 "$src" "$work/o.luks" >>"$work/q"
done
vw=$(cut -d' ' -f1 "$work/v" | median)
vc=$(cut -d' ' -f2 "$work/v" | median)
qw=$(cut -d' ' -f1 "$work/q" | median)
qc=$(cut -d' ' -f2 "$work/q" | median)
printf '%-40s %8s %8s\n' "raw->encrypted (${SIZE} MiB)" "wall s" "cpu s"
printf '%-40s %8s %8s\n' "vdisk vdi vbox-encrypt AES-XTS256" "$vw" "$vc"
printf '%-40s %8s %8s\n' "qemu-img luks aes-256-xts" "$qw" "$qc"
awk -v vw="$vw" -v qw="$qw" -v vc="$vc" -v qc="$qc" 'BEGIN {printf "ratio vdisk/qemu: wall %.2f, cpu %.2f\n", vw / qw, vc / qc}'
