// Package nbd serves vdisk.Disk images over the Network Block Device
// protocol (the NBD specification, doc/proto.md of the NetworkBlockDevice
// project), and holds a client (Client: pipelined, structured replies,
// extended headers, TLS), used by storage/nbdstore and the tests.
//
// The server speaks fixed newstyle negotiation only (no oldstyle), with
// NBD_FLAG_NO_ZEROES, the options EXPORT_NAME, ABORT, LIST, STARTTLS, INFO,
// GO, STRUCTURED_REPLY, EXTENDED_HEADERS (the experimental extension:
// 32-byte headers, 64-bit effect lengths, BLOCK_STATUS_EXT with 64-bit
// extent lengths; effect lengths of 4 GiB and more are taken by
// BLOCK_STATUS only), LIST_META_CONTEXT and SET_META_CONTEXT, and the
// metadata contexts base:allocation and qemu:allocation-depth. In the
// transmission phase it handles READ (sparse structured replies when
// negotiated), WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS, CACHE and
// DISC, with requests of one connection running concurrently and replies
// sent as they complete. See Server for the limits and the life cycle.
package nbd

import "sync/atomic"

// Magic numbers.
const (
	nbdMagic          = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic          = 0x49484156454f5054 // "IHAVEOPT"
	repMagic          = 0x0003e889045565a9 // option reply
	requestMagic      = 0x25609513
	simpleReplyMagic  = 0x67446698
	structuredMagic   = 0x668e33ef
	requestHeaderSize = 28

	// Extended headers (NBD_OPT_EXTENDED_HEADERS, the EXTENDED_HEADERS
	// extension): 32-byte requests and reply chunks with 64-bit lengths.
	extendedRequestMagic = 0x21e41c71
	extendedReplyMagic   = 0x6e8a278c
	extendedHeaderSize   = 32
	simpleReplySize      = 16
	chunkHeaderSize      = 20
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	clientFixedNewstyle = 1 << 0
	clientNoZeroes      = 1 << 1
)

// Transmission flags.
const (
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagRotational      = 1 << 4
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagSendDF          = 1 << 7
	tflagCanMultiConn    = 1 << 8
	tflagSendResize      = 1 << 9
	tflagSendCache       = 1 << 10
	tflagSendFastZero    = 1 << 11
)

// Option types.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optPeekExport      = 4
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
	optExtendedHeaders = 11
)

// Option reply types.
const (
	repAck            = 1
	repServer         = 2
	repInfo           = 3
	repMetaContext    = 4
	repErrUnsup       = 1<<31 + 1
	repErrPolicy      = 1<<31 + 2
	repErrInvalid     = 1<<31 + 3
	repErrPlatform    = 1<<31 + 4
	repErrTLSReqd     = 1<<31 + 5
	repErrUnknown     = 1<<31 + 6
	repErrShutdown    = 1<<31 + 7
	repErrBlockSize   = 1<<31 + 8
	repErrTooBig      = 1<<31 + 9
	repErrExtHdrsReqd = 1<<31 + 10
)

// Info types of NBD_REP_INFO.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Commands.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7
)

// Command flags.
const (
	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4
	// cmdFlagPayloadLen marks a request whose extended-header length is
	// a payload length (WRITE must set it).
	cmdFlagPayloadLen = 1 << 5
)

// Structured reply flags and types.
const (
	replyFlagDone = 1 << 0

	replyTypeNone        = 0
	replyTypeOffsetData  = 1
	replyTypeOffsetHole  = 2
	replyTypeBlockStatus = 5
	// replyTypeBlockStatusExt has 64-bit descriptors (extended headers).
	replyTypeBlockStatusExt = 6
	replyTypeError          = 1<<15 + 1
	replyTypeErrorOffset    = 1<<15 + 2
)

// Error values sent in replies.
const (
	EPERM     = 1
	EIO       = 5
	ENOMEM    = 12
	EINVAL    = 22
	ENOSPC    = 28
	EOVERFLOW = 75
	ENOTSUP   = 95
	ESHUTDOWN = 108
)

// base:allocation flags.
const (
	StateHole = 1 << 0
	StateZero = 1 << 1
)

// Metadata context names. The IDs the server hands out are fixed.
const (
	ContextBaseAllocation  = "base:allocation"
	ContextAllocationDepth = "qemu:allocation-depth"

	ctxIDBaseAllocation  = 1
	ctxIDAllocationDepth = 2
)

// Size limits.
const (
	// MaxPayload is the largest READ or WRITE payload the server accepts
	// (and advertises as the maximum payload in NBD_INFO_BLOCK_SIZE).
	MaxPayload = 32 << 20
	// PreferredBlockSize is advertised as the preferred block size.
	PreferredBlockSize = 4096
	// maxStringLen bounds names, queries and messages (the spec's limit).
	maxStringLen = 4096
	// maxOptionLen bounds the data of one option; larger options end the
	// connection.
	maxOptionLen = 64 << 10
)

// maxExtents bounds the descriptors of one block status reply chunk (the
// client asks again from where the reply stops). Tests lower it.
var maxExtents atomic.Int64

func init() { maxExtents.Store(1 << 14) }

// ErrnoName names an NBD error value.
func ErrnoName(e uint32) string {
	switch e {
	case 0:
		return "success"
	case EPERM:
		return "EPERM"
	case EIO:
		return "EIO"
	case ENOMEM:
		return "ENOMEM"
	case EINVAL:
		return "EINVAL"
	case ENOSPC:
		return "ENOSPC"
	case EOVERFLOW:
		return "EOVERFLOW"
	case ENOTSUP:
		return "ENOTSUP"
	case ESHUTDOWN:
		return "ESHUTDOWN"
	}
	return "unknown error"
}

func cmdName(t uint16) string {
	switch t {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disc"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdCache:
		return "cache"
	case cmdWriteZeroes:
		return "write-zeroes"
	case cmdBlockStatus:
		return "block-status"
	}
	return "unknown"
}
