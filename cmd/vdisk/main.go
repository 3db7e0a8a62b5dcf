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
//
// Exit codes follow qemu-img: 0 on success, 1 on errors; compare exits 1
// when the images differ and 2 on errors.
package main

import (
	"os"

	_ "github.com/vdisk/vdisk/format/all"
)

func main() { os.Exit(Main(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) }
