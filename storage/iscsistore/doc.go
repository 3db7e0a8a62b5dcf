// Package iscsistore is the storage of iscsi:// names: an iSCSI LUN, reached
// through the pure-Go initiator in package iscsi, as one driver.File that
// any format (raw, or qcow2 and friends on top) is opened on, the way qemu
// stacks its raw driver on its iscsi protocol driver.
//
// Names are qemu's: iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN
// (port 3260 and LUN 0 by default). Storage options (driver.SchemeEnv
// Options): password-secret=ID names the CHAP secret in env.Secrets instead
// of a password in the URL; target-user and target-password-secret=ID ask
// for mutual CHAP; initiator-name; header-digest=crc32c|none (also
// data-digest); timeout (seconds per command).
//
// The file reads and writes any byte range: partial blocks are
// read-modify-written under a range lock of the whole blocks, and long
// requests are split into MaxBurstLength commands kept in flight
// together. Holes come from GET LBA STATUS when the LUN is thin
// provisioned with LBPRZ (deallocated blocks read zeros); PunchHole uses
// UNMAP (or WRITE SAME with UNMAP) only when LBPRZ promises zeros, and
// WRITE SAME of a zero block otherwise.
package iscsistore
