#!/usr/bin/env bash
# Installs what the tests need (the real qemu tools are the oracles) and runs
# vet and the whole test suite under the race detector.
#
# Environment:
#   VDISK_FUZZTIME   run every fuzz target for this long (default 2s; 0 skips)
#   VDISK_LONG=1     longer model and soak runs
set -euo pipefail
cd "$(dirname "$0")"

need=()
for pair in qemu-img:qemu-utils qemu-io:qemu-utils nbdkit:nbdkit nbdinfo:libnbd-bin nbdcopy:libnbd-bin fio:fio bzip2:bzip2 tgtd:tgt tgtadm:tgt iscsi-ls:libiscsi-bin cryptsetup:cryptsetup-bin mkfs.xfs:xfsprogs; do
	cmd=${pair%%:*} pkg=${pair#*:}
	command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
# qemu-block-extra has no command of its own; check the package.
dpkg-query -W -f='${Status}' qemu-block-extra 2>/dev/null | grep -q "ok installed" || need+=(qemu-block-extra)
if ((${#need[@]})); then
	echo "test.sh: installing ${need[*]}" >&2
	SUDO=""
	[ "$(id -u)" = 0 ] || SUDO=sudo
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi

# The S3 tests run against a real S3 server on loopback: versitygw with its
# POSIX backend (Apache-2.0), built from the Go module proxy.
gobin=$(go env GOPATH)/bin
export PATH="$PATH:$gobin"
if ! command -v versitygw >/dev/null 2>&1; then
	echo "test.sh: installing versitygw" >&2
	GOFLAGS= go install github.com/versity/versitygw/cmd/versitygw@v1.8.0
fi

unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
	echo "test.sh: gofmt needed:" $unformatted >&2
	exit 1
fi
go vet ./...
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
go test -race -timeout 20m ./... 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -c '^ok ' "$log" || true)
failed=$(grep -c '^FAIL\b' "$log" || true)
if [ "$status" != 0 ]; then
	echo "packages: $passed passed, $failed failed"
	exit "$status"
fi

fuzztime=${VDISK_FUZZTIME:-2s}
if [ "$fuzztime" != 0 ]; then
	# Every fuzz target, briefly (longer with VDISK_FUZZTIME=5m).
	for pkg in $(go list ./...); do
		dir=$(go list -f '{{.Dir}}' "$pkg")
		for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //'); do
			echo "fuzz $pkg $target ($fuzztime)"
			# Minimising a new interesting input (qemu-made seeds are
			# large) may take 60 s by default, during which nothing new
			# is tried: a 150 s run of format/qed made 2594 executions
			# (71659 with 10 s).
			# 10 s keeps long runs (VDISK_FUZZTIME) fuzzing.
			fuzz() { go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -fuzzminimizetime 10s "$pkg" >"$log" 2>&1; }
			# Go's fuzzer can end a run with only "context deadline
			# exceeded" when the time runs out while it is minimising a
			# new interesting input: no failing input was found (none was
			# added under testdata/fuzz). Such a run is repeated once.
			if ! fuzz && ! { grep -q "context deadline exceeded" "$log" && [ -z "$(git status --porcelain -- "$dir/testdata/fuzz" 2>/dev/null)" ] && echo "fuzz $pkg $target: deadline while minimising, once more" && fuzz; }; then
				cat "$log"
				echo "packages: $passed passed, 1 failed (fuzz $pkg $target)"
				exit 1
			fi
		done
	done
fi

echo "packages: $passed passed, $failed failed"
exit "$status"
