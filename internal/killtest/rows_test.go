package killtest

// judge says who can check a format's metadata.
type judge int

const (
	qemuAndVdisk judge = iota // qemu-img check and vdisk's Check, which must agree
	vdiskOnly                 // qemu-img cannot check the format (vpc): vdisk's Check alone
	noJudge                   // nothing to check (raw, qcow v1): the content alone
)

// row is one writable format under test. The load uses the operations the
// format's capabilities allow (zeroes, discards, resizes).
type row struct {
	name   string // subtest name
	format string // vdisk's and qemu-img's format name
	opts   string // create options (-o syntax)
	judge  judge
	// dirty: a kill may leave the format's own dirty/need-check flag set
	// (qcow2 lazy refcounts, QED need-check, Parallels inuse); the image
	// must then be clean after an open read-write repairs it.
	dirty bool
	// leaks: a kill may leave leaked clusters (qemu-img check exit 3, or
	// unreferenced blocks vdisk's Check reports): the metadata order that
	// makes crashes safe leaves them, as it does in qemu. Never corruption.
	leaks bool
}

// rows are the writable formats. VMDK streamOptimized is left out: it is
// written once, front to back, and takes no random writes.
var rows = []row{
	{name: "vdi", format: "vdi", judge: qemuAndVdisk, leaks: true},
	{name: "qcow2", format: "qcow2", judge: qemuAndVdisk, leaks: true},
	{name: "qcow2-lazy", format: "qcow2", opts: "lazy_refcounts=on", judge: qemuAndVdisk, dirty: true, leaks: true},
	{name: "vmdk", format: "vmdk", opts: "subformat=monolithicSparse", judge: qemuAndVdisk},
	{name: "vpc", format: "vpc", opts: "subformat=dynamic", judge: vdiskOnly, leaks: true},
	{name: "raw", format: "raw", judge: noJudge},
	{name: "vhdx", format: "vhdx", opts: "subformat=dynamic", judge: qemuAndVdisk, dirty: true},
	{name: "qed", format: "qed", judge: qemuAndVdisk, dirty: true},
	{name: "parallels", format: "parallels", judge: qemuAndVdisk, dirty: true, leaks: true},
	{name: "qcow", format: "qcow", judge: noJudge}, // neither qemu nor vdisk checks QCOW v1: the content alone
}
