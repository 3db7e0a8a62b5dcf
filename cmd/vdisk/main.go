// Command vdisk is a virtual-disk toolkit compatible with qemu-img: it
// inspects, creates, converts, maps and compares disk images of every
// format registered with package driver.
//
// Usage:
//
//	vdisk info [-f FMT] [--output human|json] [--backing-chain] [-U] FILE
//	vdisk create [-f FMT] [-o OPTIONS] [-b BACKING [-F BFMT]] [-u] [-q] FILE [SIZE]
//	vdisk convert [-f FMT] [-O FMT] [-o OPTIONS] [-B BACKING [-F BFMT]] [-p] [-q] [-m N] [-W] [-S SIZE] [-n] [-c] [-l SNAPSHOT] [-U] SRC DST
//	vdisk map [-f FMT] [--output human|json] [--start-offset N] [--max-length N] [-U] FILE
//	vdisk compare [-f FMT] [-F FMT] [-s] [-p] [-q] [-U] A B
//	vdisk formats [--output human|json]
//	vdisk commit [-f FMT] [-b BASE] [-d] [-p] [-q] FILE
//	vdisk commit --server SOCKET [-b BASE] [-d] [-p] [--detach] [EXPORT]
//	vdisk stream [-f FMT] [--base N] [-p] FILE
//	vdisk stream --server SOCKET [--base N] [-p] [--detach] [EXPORT]
//	vdisk jobs --server SOCKET [--output human|json] [--cancel ID]
//	vdisk merge [-f FMT] --from I --to J [-p] [-q] FILE
//	vdisk rebase [-f FMT] [-u] [-p] [-q] -b BACKING [-F BFMT] FILE
//	vdisk resize [-f FMT] [--shrink] [--preallocation=MODE] [-q] FILE [+|-]SIZE
//	vdisk check [-f FMT] [-r leaks|all] [--output human|json] [-q] FILE
//	vdisk repair [-f FMT] [--dry-run] [--output human|json] [-q] FILE
//	vdisk measure [-O FMT] [-o OPTIONS] [--output human|json] (--size SIZE | [-f FMT] FILE)
//	vdisk compact [-f FMT] [-p] FILE
//	vdisk snapshot [-l | -c NAME | -a NAME | -d NAME] [-f FMT] FILE
//	vdisk snapshot --server SOCKET -c FILE [-F FMT] [EXPORT]
//	vdisk serve [-f FMT] [-r] [-s] [-t] [-e N] [-k SOCKET | -b ADDR -p PORT] [--control SOCKET] [IMAGE]
//	vdisk setuuid [--uuid U] [--parent-uuid U] [--modification-uuid U] [--parent-modification-uuid U] FILE
//	vdisk geometry [--pchs C/H/S] [--lchs C/H/S] FILE
//	vdisk comment [--set TEXT] FILE
//	vdisk amend [-f FMT] -o OPTIONS FILE
//	vdisk dd [-f FMT] [-O FMT] [bs=N] [count=N] [skip=N] if=SRC of=DST
//	vdisk bench [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [-w] [-t CACHE] FILE
//
// Exit codes follow qemu-img: 0 on success, 1 on errors; compare exits 1
// when the images differ and 2 on errors; check exits 2 for corruptions, 3
// for leaks only and 63 for a format without checks.
package main

import (
	"os"

	_ "github.com/vdisk/vdisk/format/all"
	_ "github.com/vdisk/vdisk/storage/all"
)

func main() { os.Exit(Main(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) }
