package iscsi

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// Disk is a direct-access LUN: the SBC-3 commands a virtual disk needs.
type Disk struct {
	S   *Session
	LUN uint64

	BlockSize int
	Blocks    uint64
	// LBPME: the LUN is thin provisioned (READ CAPACITY(16)); LBPRZ:
	// unmapped blocks read as zeros.
	LBPME, LBPRZ bool
	// From VPD B0/B2 when offered.
	MaxUnmapLBAs          uint32
	MaxUnmapDescriptors   uint32
	MaxWriteSameLBAs      uint64
	Unmap, WriteSameUnmap bool
	Inquiry               InquiryData
}

// InquiryData is what standard INQUIRY and VPD 0x80/0x83 report.
type InquiryData struct {
	DeviceType byte   `json:"device-type"`
	Vendor     string `json:"vendor"`
	Product    string `json:"product"`
	Revision   string `json:"revision"`
	Serial     string `json:"serial,omitempty"`
	// Designators are the VPD 0x83 identifiers, hex-encoded, NAA first.
	Designators []string `json:"designators,omitempty"`
	VPDPages    []byte   `json:"vpd-pages,omitempty"`
}

// OpenDisk inquires the LUN and reads its capacity and provisioning.
func OpenDisk(ctx context.Context, s *Session, lun uint64) (*Disk, error) {
	d := &Disk{S: s, LUN: lun}
	std := make([]byte, 96)
	n, err := d.inquiry(ctx, false, 0, std)
	if err != nil {
		return nil, fmt.Errorf("INQUIRY: %w", err)
	}
	if n < 36 {
		return nil, protoErrorf("standard INQUIRY data of %d bytes", n)
	}
	d.Inquiry.DeviceType = std[0] & 0x1f
	if q := std[0] >> 5; q != 0 {
		return nil, fmt.Errorf("iscsi: LUN %d is not connected (peripheral qualifier %d)", lun, q)
	}
	if d.Inquiry.DeviceType != 0 {
		return nil, fmt.Errorf("iscsi: LUN %d is not a disk (peripheral device type %#x)", lun, d.Inquiry.DeviceType)
	}
	d.Inquiry.Vendor = trimASCII(std[8:16])
	d.Inquiry.Product = trimASCII(std[16:32])
	d.Inquiry.Revision = trimASCII(std[32:36])
	if err := d.readCapacity(ctx); err != nil {
		return nil, err
	}
	// VPD pages are optional: a target without them keeps the defaults.
	page := make([]byte, 255+4)
	if n, err := d.inquiry(ctx, true, 0x00, page); err == nil && n >= 4 {
		l := min(int(binary.BigEndian.Uint16(page[2:])), n-4)
		d.Inquiry.VPDPages = append([]byte(nil), page[4:4+l]...)
	}
	has := func(p byte) bool {
		for _, x := range d.Inquiry.VPDPages {
			if x == p {
				return true
			}
		}
		return false
	}
	if has(0x80) {
		if n, err := d.inquiry(ctx, true, 0x80, page); err == nil && n >= 4 {
			l := min(int(binary.BigEndian.Uint16(page[2:])), n-4)
			d.Inquiry.Serial = strings.TrimSpace(trimASCII(page[4 : 4+l]))
		}
	}
	if has(0x83) {
		big := make([]byte, 1024)
		if n, err := d.inquiry(ctx, true, 0x83, big); err == nil && n >= 4 {
			l := min(int(binary.BigEndian.Uint16(big[2:])), n-4)
			ds := big[4 : 4+l]
			for len(ds) >= 4 && len(d.Inquiry.Designators) < 16 {
				dl := int(ds[3]) + 4
				if dl > len(ds) {
					break
				}
				d.Inquiry.Designators = append(d.Inquiry.Designators, fmt.Sprintf("%x", ds[4:dl]))
				ds = ds[dl:]
			}
		}
	}
	if has(0xb0) {
		if n, err := d.inquiry(ctx, true, 0xb0, page); err == nil && n >= 44 {
			d.MaxUnmapLBAs = binary.BigEndian.Uint32(page[20:])
			d.MaxUnmapDescriptors = binary.BigEndian.Uint32(page[24:])
			d.MaxWriteSameLBAs = binary.BigEndian.Uint64(page[36:])
		}
	}
	if has(0xb2) && d.LBPME {
		if n, err := d.inquiry(ctx, true, 0xb2, page); err == nil && n >= 6 {
			d.Unmap = page[5]&0x80 != 0
			d.WriteSameUnmap = page[5]&0x40 != 0
		}
	}
	return d, nil
}

func trimASCII(b []byte) string {
	out := make([]byte, 0, len(b))
	for _, c := range b {
		if c >= 0x20 && c < 0x7f {
			out = append(out, c)
		}
	}
	for len(out) > 0 && out[len(out)-1] == ' ' {
		out = out[:len(out)-1]
	}
	return string(out)
}

// inquiry returns how many bytes of buf the target filled.
func (d *Disk) inquiry(ctx context.Context, evpd bool, page byte, buf []byte) (int, error) {
	cdb := make([]byte, 6)
	cdb[0] = 0x12
	if evpd {
		cdb[1] = 1
		cdb[2] = page
	}
	binary.BigEndian.PutUint16(cdb[3:], uint16(len(buf)))
	res, err := d.S.Execute(ctx, &Command{LUN: d.LUN, CDB: cdb, DataIn: buf})
	if err != nil {
		return 0, err
	}
	return filled(res, len(buf)), nil
}

func filled(res *Result, n int) int {
	if res.Residual > 0 {
		return max(0, n-res.Residual)
	}
	return n
}

// maxBlockSize bounds what READ CAPACITY may claim.
const maxBlockSize = 1 << 20

func (d *Disk) readCapacity(ctx context.Context) error {
	cdb := make([]byte, 16)
	cdb[0] = 0x9e // SERVICE ACTION IN(16)
	cdb[1] = 0x10 // READ CAPACITY(16)
	buf := make([]byte, 32)
	binary.BigEndian.PutUint32(cdb[10:], uint32(len(buf)))
	res, err := d.S.Execute(ctx, &Command{LUN: d.LUN, CDB: cdb, DataIn: buf})
	if err != nil {
		return fmt.Errorf("READ CAPACITY(16): %w", err)
	}
	if filled(res, len(buf)) < 12 {
		return protoErrorf("READ CAPACITY(16) returned %d bytes", filled(res, len(buf)))
	}
	last := binary.BigEndian.Uint64(buf)
	bs := binary.BigEndian.Uint32(buf[8:])
	if bs < 512 || bs > maxBlockSize || bs&(bs-1) != 0 {
		return protoErrorf("READ CAPACITY(16): block size %d", bs)
	}
	if last >= 1<<63/uint64(bs) {
		return protoErrorf("READ CAPACITY(16): last LBA %d", last)
	}
	d.BlockSize = int(bs)
	d.Blocks = last + 1
	d.LBPME = buf[14]&0x80 != 0
	d.LBPRZ = buf[14]&0x40 != 0
	return nil
}

// Size is the capacity in bytes.
func (d *Disk) Size() int64 { return int64(d.Blocks) * int64(d.BlockSize) }

func (d *Disk) check(lba uint64, n uint64) error {
	if lba > d.Blocks || n > d.Blocks-lba {
		return fmt.Errorf("iscsi: blocks [%d, %d) beyond the %d of the LUN: %w", lba, lba+n, d.Blocks, ErrLBAOutOfRange)
	}
	return nil
}

func rw16(op byte, lba uint64, blocks uint32) []byte {
	cdb := make([]byte, 16)
	cdb[0] = op
	binary.BigEndian.PutUint64(cdb[2:], lba)
	binary.BigEndian.PutUint32(cdb[10:], blocks)
	return cdb
}

// Read reads whole blocks at lba into buf (READ(16)).
func (d *Disk) Read(ctx context.Context, lba uint64, buf []byte) error {
	n := uint64(len(buf) / d.BlockSize)
	if len(buf)%d.BlockSize != 0 || n > 1<<32-1 {
		return fmt.Errorf("iscsi: read of %d bytes is not whole blocks", len(buf))
	}
	if err := d.check(lba, n); err != nil {
		return err
	}
	res, err := d.S.Execute(ctx, &Command{LUN: d.LUN, CDB: rw16(0x88, lba, uint32(n)), DataIn: buf})
	if err != nil {
		return err
	}
	if res.Residual != 0 {
		return protoErrorf("READ(16) of %d blocks at LBA %d left a residual of %d bytes", n, lba, res.Residual)
	}
	return nil
}

// Write writes whole blocks at lba (WRITE(16)).
func (d *Disk) Write(ctx context.Context, lba uint64, buf []byte) error {
	n := uint64(len(buf) / d.BlockSize)
	if len(buf)%d.BlockSize != 0 || n > 1<<32-1 {
		return fmt.Errorf("iscsi: write of %d bytes is not whole blocks", len(buf))
	}
	if err := d.check(lba, n); err != nil {
		return err
	}
	res, err := d.S.Execute(ctx, &Command{LUN: d.LUN, CDB: rw16(0x8a, lba, uint32(n)), DataOut: buf})
	if err != nil {
		return err
	}
	if res.Residual != 0 {
		return protoErrorf("WRITE(16) of %d blocks at LBA %d left a residual of %d bytes", n, lba, res.Residual)
	}
	return nil
}

// WriteSame writes block (one block) over n blocks at lba; unmap sets the
// UNMAP bit so a thin LUN may deallocate them (WRITE SAME(16)).
func (d *Disk) WriteSame(ctx context.Context, lba, n uint64, unmap bool, block []byte) error {
	if len(block) != d.BlockSize || n > 1<<32-1 || n == 0 {
		return fmt.Errorf("iscsi: WRITE SAME of %d blocks with a %d-byte block", n, len(block))
	}
	if err := d.check(lba, n); err != nil {
		return err
	}
	cdb := rw16(0x93, lba, uint32(n))
	if unmap {
		cdb[1] |= 0x08
	}
	_, err := d.S.Execute(ctx, &Command{LUN: d.LUN, CDB: cdb, DataOut: block})
	return err
}

// UnmapBlocks deallocates n blocks at lba (UNMAP with one descriptor).
func (d *Disk) UnmapBlocks(ctx context.Context, lba, n uint64) error {
	if n == 0 || n > 1<<32-1 {
		return fmt.Errorf("iscsi: UNMAP of %d blocks", n)
	}
	if err := d.check(lba, n); err != nil {
		return err
	}
	param := make([]byte, 24)
	binary.BigEndian.PutUint16(param[0:], 22)
	binary.BigEndian.PutUint16(param[2:], 16)
	binary.BigEndian.PutUint64(param[8:], lba)
	binary.BigEndian.PutUint32(param[16:], uint32(n))
	cdb := make([]byte, 10)
	cdb[0] = 0x42
	binary.BigEndian.PutUint16(cdb[7:], uint16(len(param)))
	_, err := d.S.Execute(ctx, &Command{LUN: d.LUN, CDB: cdb, DataOut: param})
	return err
}

// Sync flushes the target's cache (SYNCHRONIZE CACHE(16) over the LUN).
func (d *Disk) Sync(ctx context.Context) error {
	cdb := make([]byte, 16)
	cdb[0] = 0x91
	_, err := d.S.Execute(ctx, &Command{LUN: d.LUN, CDB: cdb})
	if errors.Is(err, ErrInvalidCommand) {
		// A target without a cache to flush.
		cdb10 := make([]byte, 10)
		cdb10[0] = 0x35
		_, err = d.S.Execute(ctx, &Command{LUN: d.LUN, CDB: cdb10})
	}
	return err
}

// LBAStatus is one GET LBA STATUS descriptor.
type LBAStatus struct {
	LBA    uint64
	Blocks uint32
	// Provisioning: 0 mapped, 1 deallocated, 2 anchored.
	Provisioning byte
}

// GetLBAStatus reports the provisioning of the blocks from lba on (GET
// LBA STATUS, SBC-3 §5.6). The first descriptor starts at lba.
func (d *Disk) GetLBAStatus(ctx context.Context, lba uint64) ([]LBAStatus, error) {
	if err := d.check(lba, 1); err != nil {
		return nil, err
	}
	buf := make([]byte, 8+16*64)
	cdb := make([]byte, 16)
	cdb[0] = 0x9e
	cdb[1] = 0x12
	binary.BigEndian.PutUint64(cdb[2:], lba)
	binary.BigEndian.PutUint32(cdb[10:], uint32(len(buf)))
	res, err := d.S.Execute(ctx, &Command{LUN: d.LUN, CDB: cdb, DataIn: buf})
	if err != nil {
		return nil, err
	}
	n := filled(res, len(buf))
	if n < 8 {
		return nil, protoErrorf("GET LBA STATUS returned %d bytes", n)
	}
	l := int(binary.BigEndian.Uint32(buf)) + 4
	l = min(l, n)
	var out []LBAStatus
	next := lba
	for off := 8; off+16 <= l; off += 16 {
		s := LBAStatus{
			LBA:          binary.BigEndian.Uint64(buf[off:]),
			Blocks:       binary.BigEndian.Uint32(buf[off+8:]),
			Provisioning: buf[off+12] & 0x0f,
		}
		// Descriptors must tile the LUN from lba on without gaps.
		if s.LBA != next || s.Blocks == 0 || d.check(s.LBA, uint64(s.Blocks)) != nil {
			break
		}
		out = append(out, s)
		next = s.LBA + uint64(s.Blocks)
	}
	if len(out) == 0 {
		return nil, protoErrorf("GET LBA STATUS at LBA %d returned no usable descriptor", lba)
	}
	return out, nil
}

// maxLUNs bounds what REPORT LUNS may list.
const maxLUNs = 4096

// ReportLUNs lists the LUNs of the session's target (REPORT LUNS, SPC-4
// §6.33), decoding peripheral and flat space addressing.
func (s *Session) ReportLUNs(ctx context.Context) ([]uint64, error) {
	buf := make([]byte, 8+8*256)
	for attempt := 0; attempt < 2; attempt++ {
		cdb := make([]byte, 12)
		cdb[0] = 0xa0
		binary.BigEndian.PutUint32(cdb[6:], uint32(len(buf)))
		res, err := s.Execute(ctx, &Command{CDB: cdb, DataIn: buf})
		if err != nil {
			return nil, fmt.Errorf("REPORT LUNS: %w", err)
		}
		n := filled(res, len(buf))
		if n < 8 {
			return nil, protoErrorf("REPORT LUNS returned %d bytes", n)
		}
		l := int64(binary.BigEndian.Uint32(buf))
		if l > maxLUNs*8 {
			return nil, protoErrorf("REPORT LUNS claims %d bytes of LUNs", l)
		}
		if 8+l > int64(len(buf)) && attempt == 0 {
			buf = make([]byte, 8+l)
			continue
		}
		var out []uint64
		for off := 8; off+8 <= min(n, 8+int(l)); off += 8 {
			e := buf[off : off+8]
			switch e[0] >> 6 {
			case 0:
				if e[0]&0x3f == 0 {
					out = append(out, uint64(e[1]))
				}
			case 1:
				out = append(out, uint64(e[0]&0x3f)<<8|uint64(e[1]))
			}
		}
		return out, nil
	}
	return nil, protoErrorf("REPORT LUNS list keeps growing")
}
