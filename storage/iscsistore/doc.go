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
// data-digest); timeout (seconds per command); open-retry (seconds a
// login that cannot connect, e.g. to a target restarting, is retried with
// backoff, at open and at a reconnect: default 10, 0 for one attempt;
// refused credentials, unknown targets and protocol errors are not
// retried, except a target not found right after the portal was down or
// at a reconnect: a restarting target service answers so until its
// targets exist again).
//
// A login the target redirects (status class 1, TargetAddress) follows
// up to 4 redirections through the same dialer, never back to an address
// already tried; a temporary redirection holds for that login only (a
// reconnect goes back to the URL's portal), a permanent one for the rest
// of the session.
//
// The file reads and writes any byte range: partial blocks are
// read-modify-written under a range lock of the whole blocks, and long
// requests are split into MaxBurstLength commands kept in flight
// together. Holes come from GET LBA STATUS when the LUN is thin
// provisioned with LBPRZ (deallocated blocks read zeros); PunchHole uses
// UNMAP (or WRITE SAME with UNMAP) only when LBPRZ promises zeros, and
// WRITE SAME of a zero block otherwise.
//
// The Storage keeps track of the files it opened: CloseStorage
// (driver.StorageCloser, called by vdisk when the last image it opened on
// a storage built for a URL closes) closes any still open, logging out of
// their sessions.
package iscsistore
