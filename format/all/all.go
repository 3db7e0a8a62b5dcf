// Package all registers every vdisk format driver; import it for its side
// effect (and storage/all for the network storages):
//
//	import _ "github.com/vdisk/vdisk/format/all"
package all

import (
	_ "github.com/vdisk/vdisk/format/dmg"
	_ "github.com/vdisk/vdisk/format/luks"
	_ "github.com/vdisk/vdisk/format/parallels"
	_ "github.com/vdisk/vdisk/format/qcow"
	_ "github.com/vdisk/vdisk/format/qcow2"
	_ "github.com/vdisk/vdisk/format/qed"
	_ "github.com/vdisk/vdisk/format/raw"
	_ "github.com/vdisk/vdisk/format/vdi"
	_ "github.com/vdisk/vdisk/format/vhd"
	_ "github.com/vdisk/vdisk/format/vhdx"
	_ "github.com/vdisk/vdisk/format/vmdk"
)
