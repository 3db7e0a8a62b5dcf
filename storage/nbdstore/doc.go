// Package nbdstore is a storage whose file is a disk exported by an NBD
// server (qemu-nbd, nbdkit, nbd-server, vdisk serve), so any format (raw,
// or qcow2 on a remote block device) is opened on top of it, as qemu
// stacks its raw driver on the nbd protocol driver.
//
// Importing the package registers the schemes of qemu's NBD URIs:
//
//	nbd://HOST[:PORT]/EXPORT           TCP, default port 10809
//	nbd+unix:///EXPORT?socket=PATH     Unix socket
//	nbds://..., nbds+unix://...        the same with TLS (NBD_OPT_STARTTLS)
//
// An empty EXPORT is the server's default export. The URL is the name the
// storage opens; it also accepts the bare export name.
//
// Protocol facts relied on (the NBD specification, doc/proto.md):
//   - READ, WRITE, TRIM and WRITE_ZEROES are idempotent, so a request in
//     flight on a connection that drops is sent again on a new one; FLUSH
//     too, after the reconnect (the new connection's flush covers what
//     the server completed).
//   - TRIM need not make a range read as zeros; WRITE_ZEROES (without
//     NBD_CMD_FLAG_NO_HOLE) must, and may deallocate: PunchHole uses it.
//   - base:allocation: NBD_STATE_ZERO means the range reads as zeros
//     (holes for SeekData/SeekHole); NBD_STATE_HOLE alone does not.
//   - A server that sets NBD_FLAG_CAN_MULTI_CONN keeps several connections
//     to one export consistent (a flush on one covers writes completed on
//     all), so requests are spread over a small pool of connections.
//   - Without NBD_INFO_BLOCK_SIZE the payload limit is 32 MiB and the
//     minimum block size 1; with it, requests are split at the maximum
//     and unaligned reads and writes are widened to the minimum
//     (read-modify-write).
//
// Extended headers (NBD_OPT_EXTENDED_HEADERS, an experimental extension)
// are asked for; servers without them (qemu-nbd 7.2, nbdkit 1.32) refuse
// and compact headers are used.
//
// qemu:allocation-depth (qemu's docs/interop/nbd.txt; qemu-nbd -A and
// vdisk serve offer it, nbdkit does not) is negotiated alongside
// base:allocation and asked for in the same BLOCK_STATUS request. Its
// extent value is the layer of the server's backing chain that holds the
// range (1 = the exported image itself), 0 when no layer does. The file
// reports (driver.AllocationReporter) a range as not held when its depth
// is 0 and base:allocation says it reads as zeros, and the raw format
// reports such a zero run as Unallocated instead of Zero: `vdisk map
// nbd://...` then says "present": false exactly where `qemu-img map` of
// the served chain does. A range base:allocation calls data stays data
// whatever its depth, reads are unchanged, and holes stay holes in every
// copy (convert skips zero and unallocated runs alike). The storage
// option allocation-depth=off keeps base:allocation alone (every range
// held, as before). The caching layer (storage/cache) does not pass the
// allocation through.
//
// Opening retries: a first connection that fails for a transient reason
// (refused, reset or cut during the handshake, a timeout, NBD_REP_ERR_
// SHUTDOWN: a server restarting) is dialled again with exponential
// backoff and jitter (internal/backoff) for up to open-retry seconds
// (default 10); a refusal of the server (unknown export, policy, TLS
// required), a TLS verification failure, a peer that is not an NBD server
// or an unknown host name is reported at once. A dropped connection is
// redialled the same way for up to reconnect-delay.
//
// TLS uses x509 credentials in qemu's tls-creds-x509 directory layout
// (storage option tls-creds=DIR: ca-cert.pem, client-cert.pem,
// client-key.pem) and the option tls-hostname. TLS-PSK cannot be done:
// Go's crypto/tls has no PSK cipher suites (golang/go#6379).
//
// The Storage keeps track of the files it opened: CloseStorage
// (driver.StorageCloser, called by vdisk when the last image it opened on
// a storage built for a URL closes) closes any still open, with their
// connections.
package nbdstore
