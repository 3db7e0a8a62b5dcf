// Package control is the control protocol of `vdisk serve --control`: live
// jobs (commit, stream, external snapshots) and queries on the disks a
// server exports, over a Unix socket. It is modelled on QEMU's QMP, as
// qemu-storage-daemon speaks it, simplified: no greeting, no capability
// negotiation, no events.
//
// # Framing
//
// Every request is one JSON object on one line (at most MaxLine bytes,
// 64 KiB by default):
//
//	{"execute": "<command>", "arguments": {...}, "id": <any JSON value>}
//
// "arguments" and "id" are optional; any other member is refused. Requests
// on one connection are answered in order, each with one line:
//
//	{"return": <value>, "id": <the request's id>}
//	{"error": {"class": "<class>", "desc": "<message>"}, "id": <id>}
//
// (the "id" member is left out when the request had none).
//
// # Commands
//
//	query-exports                                   -> [ExportInfo, ...]
//	query-jobs                                      -> [JobInfo, ...]
//	commit   {export, base (default 1), keep}       -> {"job-id": ID}
//	stream   {export, base (default 0)}             -> {"job-id": ID}
//	snapshot {export, file, format}                 -> {"file": NAME}
//	cancel   {job-id}                               -> {}
//	flush    {export}                               -> {}
//
// commit and stream start a job and answer at once; poll query-jobs for
// its progress and end. snapshot is synchronous: it puts a new, empty
// image named file on top of the export's chain (see vdisk.Disk.Snapshot).
// The name is a plain file name, created in the directory of the current
// top: absolute names, "..", directories and existing files are refused.
// flush without an export flushes every export.
//
// One job runs on a disk at a time. Ended jobs stay listed by query-jobs
// (with status "concluded", "failed" or "cancelled") until 64 newer jobs
// have ended; running jobs are always listed.
//
// # Errors
//
// Error classes are those of QMP:
//
//   - CommandNotFound: unknown command;
//   - InvalidParameter: a malformed request, an unknown or ill-typed
//     argument, an unknown export or job ID, a layer index out of range, a
//     file name that is not a plain name;
//   - GenericError: everything else, such as a busy or read-only export
//     or an error of the job itself (desc is its message).
//
// # Limits
//
// A server serves at most MaxConns connections at once (16 by default;
// further ones get one GenericError line and are closed), drops a
// connection idle for IdleTimeout (10 minutes by default), and closes a
// connection whose request line is too long (after an error reply).
package control
