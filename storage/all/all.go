// Package all registers every network storage, so image names
// nbd://, nbd+unix://, nbds://, iscsi:// and s3:// open anywhere a file
// name does; import it for its side effect:
//
//	import _ "github.com/vdisk/vdisk/storage/all"
package all

import (
	_ "github.com/vdisk/vdisk/storage/iscsistore"
	_ "github.com/vdisk/vdisk/storage/nbdstore"
	_ "github.com/vdisk/vdisk/storage/s3"
)
