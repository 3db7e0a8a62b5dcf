# Shared by the bench scripts (sourced, after `cd` to the repository and
# with $work set to the script's scratch directory).

# build_vdisk sets VDISK: the build in VDISK_BIN when given (e.g. the
# previous commit's, to compare two versions against the same peer), else
# this tree's, built into $work as quickstart.sh builds it (static).
build_vdisk() {
	if [ -n "${VDISK_BIN:-}" ]; then
		VDISK=$VDISK_BIN
	else
		CGO_ENABLED=0 go build -o "$work/vdisk" ./cmd/vdisk
		VDISK=$work/vdisk
	fi
}

# median: the median of the numbers on stdin, one per line.
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# freeport: a TCP port free on loopback now.
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# waitport PORT: waits (up to 20 s) until something listens on PORT.
waitport() {
	for _ in $(seq 200); do
		(exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
		sleep 0.1
	done
	echo "port $1 never opened" >&2
	exit 1
}
