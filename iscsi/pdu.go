package iscsi

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Opcodes (RFC 7143 §11.1.1).
const (
	OpNOPOut     = 0x00
	OpSCSICmd    = 0x01
	OpTaskMgmt   = 0x02
	OpLoginReq   = 0x03
	OpTextReq    = 0x04
	OpDataOut    = 0x05
	OpLogoutReq  = 0x06
	OpNOPIn      = 0x20
	OpSCSIResp   = 0x21
	OpTaskResp   = 0x22
	OpLoginResp  = 0x23
	OpTextResp   = 0x24
	OpDataIn     = 0x25
	OpLogoutResp = 0x26
	OpR2T        = 0x31
	OpAsync      = 0x32
	OpReject     = 0x3f
)

const (
	bhsLen = 48
	// maxAHS bounds TotalAHSLength (a byte of 4-byte words).
	maxAHS = 255 * 4
	// MaxDataSegment is the most any data segment may carry (the 24-bit
	// DataSegmentLength field); the receiver bounds it lower by what it
	// declared as MaxRecvDataSegmentLength.
	MaxDataSegment = 1<<24 - 1
	reservedTag    = 0xffffffff
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc32c(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// PDU is one protocol data unit: the BHS, its AHS and data segment.
type PDU struct {
	BHS  [bhsLen]byte
	AHS  []byte
	Data []byte
}

// Opcode returns the opcode without the Immediate bit.
func (p *PDU) Opcode() byte { return p.BHS[0] & 0x3f }

// Immediate reports the I bit.
func (p *PDU) Immediate() bool { return p.BHS[0]&0x40 != 0 }

// Final reports the F bit (byte 1, 0x80).
func (p *PDU) Final() bool { return p.BHS[1]&0x80 != 0 }

// ITT is the Initiator Task Tag.
func (p *PDU) ITT() uint32 { return p.u32(16) }

func (p *PDU) u32(off int) uint32 { return binary.BigEndian.Uint32(p.BHS[off:]) }

func (p *PDU) put32(off int, v uint32) { binary.BigEndian.PutUint32(p.BHS[off:], v) }

func (p *PDU) dataLen() int {
	return int(p.BHS[5])<<16 | int(p.BHS[6])<<8 | int(p.BHS[7])
}

func pad4(n int) int { return (n + 3) &^ 3 }

// Digests says which digests a connection carries.
type Digests struct {
	Header, Data bool
}

// Marshal encodes p with the given digests. The lengths in the BHS are
// set from AHS and Data.
func (p *PDU) Marshal(d Digests) ([]byte, error) {
	if len(p.AHS)%4 != 0 || len(p.AHS) > maxAHS {
		return nil, fmt.Errorf("iscsi: AHS of %d bytes", len(p.AHS))
	}
	if len(p.Data) > MaxDataSegment {
		return nil, fmt.Errorf("iscsi: data segment of %d bytes", len(p.Data))
	}
	p.BHS[4] = byte(len(p.AHS) / 4)
	n := len(p.Data)
	p.BHS[5], p.BHS[6], p.BHS[7] = byte(n>>16), byte(n>>8), byte(n)
	size := bhsLen + len(p.AHS) + pad4(n)
	if d.Header {
		size += 4
	}
	if d.Data && n > 0 {
		size += 4
	}
	out := make([]byte, 0, size)
	out = append(out, p.BHS[:]...)
	out = append(out, p.AHS...)
	if d.Header {
		out = binary.LittleEndian.AppendUint32(out, crc32c(out))
	}
	if n > 0 {
		out = append(out, p.Data...)
		out = append(out, make([]byte, pad4(n)-n)...)
		if d.Data {
			out = binary.LittleEndian.AppendUint32(out, crc32c(out[len(out)-pad4(n):]))
		}
	}
	return out, nil
}

// ErrDigest is a header or data digest mismatch.
var ErrDigest = errors.New("iscsi: digest mismatch")

// ErrProtocol marks a PDU that breaks the protocol.
var ErrProtocol = errors.New("iscsi: protocol error")

func protoErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrProtocol}, args...)...)
}

// ReadPDU reads one PDU from r. maxData bounds the data segment (the
// MaxRecvDataSegmentLength this side declared); a longer one is a protocol
// error and nothing is allocated for it.
func ReadPDU(r io.Reader, d Digests, maxData int) (*PDU, error) {
	p := &PDU{}
	if _, err := io.ReadFull(r, p.BHS[:]); err != nil {
		return nil, err
	}
	ahs := int(p.BHS[4]) * 4
	n := p.dataLen()
	if n > maxData {
		return nil, protoErrorf("opcode %#x: data segment of %d bytes exceeds the %d negotiated", p.Opcode(), n, maxData)
	}
	if ahs > 0 {
		p.AHS = make([]byte, ahs)
		if _, err := io.ReadFull(r, p.AHS); err != nil {
			return nil, unexpected(err)
		}
	}
	if d.Header {
		var dig [4]byte
		if _, err := io.ReadFull(r, dig[:]); err != nil {
			return nil, unexpected(err)
		}
		c := crc32.Update(crc32c(p.BHS[:]), castagnoli, p.AHS)
		if c != binary.LittleEndian.Uint32(dig[:]) {
			return nil, fmt.Errorf("%w in the header of a PDU with opcode %#x", ErrDigest, p.Opcode())
		}
	}
	if n > 0 {
		buf := make([]byte, pad4(n))
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, unexpected(err)
		}
		if d.Data {
			var dig [4]byte
			if _, err := io.ReadFull(r, dig[:]); err != nil {
				return nil, unexpected(err)
			}
			if crc32c(buf) != binary.LittleEndian.Uint32(dig[:]) {
				return nil, fmt.Errorf("%w in the data of a PDU with opcode %#x", ErrDigest, p.Opcode())
			}
		}
		p.Data = buf[:n]
	}
	return p, p.validate()
}

func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// ParsePDU decodes one PDU from the start of b and returns it and the
// bytes it used.
func ParsePDU(b []byte, d Digests, maxData int) (*PDU, int, error) {
	r := &countReader{b: b}
	p, err := ReadPDU(r, d, maxData)
	return p, r.n, err
}

type countReader struct {
	b []byte
	n int
}

func (c *countReader) Read(p []byte) (int, error) {
	if c.n >= len(c.b) {
		return 0, io.EOF
	}
	k := copy(p, c.b[c.n:])
	c.n += k
	return k, nil
}

// validate checks what a target-to-initiator PDU must hold.
func (p *PDU) validate() error {
	switch p.Opcode() {
	case OpNOPIn, OpSCSIResp, OpTaskResp, OpLoginResp, OpTextResp, OpDataIn,
		OpLogoutResp, OpR2T, OpAsync, OpReject:
	case OpNOPOut, OpSCSICmd, OpTaskMgmt, OpLoginReq, OpTextReq, OpDataOut, OpLogoutReq:
		// Initiator opcodes parse too (tests and fuzzing build them).
	default:
		return protoErrorf("unknown opcode %#x", p.Opcode())
	}
	if p.Opcode() == OpSCSIResp && len(p.Data) > 0 {
		if len(p.Data) < 2 {
			return protoErrorf("SCSI response with a %d-byte data segment", len(p.Data))
		}
		if sl := int(binary.BigEndian.Uint16(p.Data)); sl > len(p.Data)-2 {
			return protoErrorf("SCSI response sense length %d exceeds its %d-byte segment", sl, len(p.Data)-2)
		}
	}
	return nil
}

// Sense returns the sense data of a SCSI Response (validated by ReadPDU).
func (p *PDU) Sense() []byte {
	if len(p.Data) < 2 {
		return nil
	}
	sl := int(binary.BigEndian.Uint16(p.Data))
	if sl > len(p.Data)-2 {
		return nil
	}
	return p.Data[2 : 2+sl]
}

// encodeLUN writes a LUN in SAM's single-level format: peripheral for LUNs
// below 256, flat space up to 16383.
func encodeLUN(lun uint64) [8]byte {
	var b [8]byte
	if lun < 256 {
		b[1] = byte(lun)
	} else {
		b[0] = 0x40 | byte(lun>>8&0x3f)
		b[1] = byte(lun)
	}
	return b
}

// serialLess is RFC 1982 a < b for 32-bit serial numbers.
func serialLess(a, b uint32) bool {
	return a != b && int32(a-b) < 0
}
