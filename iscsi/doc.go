// Package iscsi is a pure-Go iSCSI initiator (RFC 7143): PDUs, login with
// CHAP, text keys, SendTargets discovery, a session that keeps many SCSI
// commands in flight, and the SCSI block commands a disk needs (SBC-3,
// SPC-4).
//
// Wire facts this package relies on (RFC 7143 §11):
//   - Every PDU starts with a 48-byte Basic Header Segment (BHS). Byte 0
//     holds the opcode (low 6 bits) and the Immediate bit (0x40); byte 4 is
//     TotalAHSLength in 4-byte words; bytes 5-7 are the 24-bit
//     DataSegmentLength; bytes 16-19 the Initiator Task Tag (ITT).
//   - The BHS is followed by the AHS, a 4-byte CRC-32C header digest when
//     negotiated, the data segment padded to a multiple of 4, and a 4-byte
//     data digest when negotiated and the segment is not empty.
//   - Login and Text data segments are "key=value" pairs, each ended by a
//     NUL; binary CHAP values are "0x" hex or "0b" base64.
//   - Non-immediate commands take consecutive CmdSNs and may be sent only
//     while CmdSN <= MaxCmdSN (serial number arithmetic, RFC 1982); the
//     target's ExpCmdSN and MaxCmdSN come back in every response.
//   - A login with the same ISID and TSIH 0 reinstates the session: the
//     target drops the old connection and its tasks, so an initiator can
//     retry what was in flight (ErrorRecoveryLevel 0).
//   - A login response with status class 1 (detail 1 temporary, 2
//     permanent) carries TargetAddress=host[:port][,tag]: the initiator
//     logs in there instead (§11.13.5, §13.9). Class 3 (target error,
//     service unavailable, out of resources) may succeed later; class 2
//     (initiator errors: credentials, unknown target) will not.
//
// A login that cannot connect (refused, reset, cut) is retried with
// backoff for up to Config.Retry; redirections are followed, at most 4
// per login and never back to an address already tried. "Target not
// found" (or removed) is retried too once the portal was down or busy
// earlier in the same round, or when reconnecting a session that had the
// target: a target service that restarts answers so until it has made
// its targets again.
//
// The data-in of a read arrives as Data-In PDUs at a Buffer Offset; the
// data-out of a write goes as immediate data (when ImmediateData=Yes), then
// unsolicited Data-Out up to FirstBurstLength (when InitialR2T=No), then as
// answers to R2T requests. Every offset and length the target sends is
// checked against the command's buffer before it is used.
package iscsi
