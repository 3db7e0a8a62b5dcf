package iscsi

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/vdisk/vdisk/internal/backoff"
)

// SCSI status codes (SAM-5).
const (
	StatusGood           = 0x00
	StatusCheckCondition = 0x02
	StatusBusy           = 0x08
	StatusReservation    = 0x18
	StatusTaskSetFull    = 0x28
	StatusTaskAborted    = 0x40
)

// Command is one SCSI command for a LUN.
type Command struct {
	LUN uint64
	CDB []byte // at most 16 bytes
	// DataIn receives the data of a read; its length is the expected
	// transfer length.
	DataIn []byte
	// DataOut is the data of a write.
	DataOut []byte
}

// Result is a finished command.
type Result struct {
	Status byte
	Sense  []byte
	// Residual is what the target did not transfer (underflow) or could
	// not (overflow, negative).
	Residual int
}

// StatusError is a command that ended with a status other than GOOD.
type StatusError struct {
	Status byte
	Sense  *Sense // nil without sense data
}

func (e *StatusError) Error() string {
	if e.Sense != nil {
		return "iscsi: " + e.Sense.String()
	}
	switch e.Status {
	case StatusBusy:
		return "iscsi: target busy"
	case StatusReservation:
		return "iscsi: reservation conflict"
	case StatusTaskSetFull:
		return "iscsi: task set full"
	case StatusTaskAborted:
		return "iscsi: task aborted"
	}
	return fmt.Sprintf("iscsi: SCSI status %#x", e.Status)
}

// Is lets errors.Is match the sense classes (ErrMediumError, ...).
func (e *StatusError) Is(target error) bool {
	return e.Sense != nil && e.Sense.Is(target)
}

// maxRetries bounds the retries of UNIT ATTENTION and BUSY answers.
const maxRetries = 5

// busyBackoff spaces the retries of BUSY and TASK SET FULL answers.
var busyBackoff = backoff.Policy{Initial: 50 * time.Millisecond, Max: time.Second}

// Execute runs cmd. A command whose connection is lost is retried once
// after a new login (which is itself retried with backoff for up to
// Config.Retry); UNIT ATTENTION (the target reset or changed), BUSY and
// TASK SET FULL are retried a few times. A status other than GOOD is a
// *StatusError.
func (s *Session) Execute(ctx context.Context, cmd *Command) (*Result, error) {
	if len(cmd.CDB) == 0 || len(cmd.CDB) > 16 {
		return nil, fmt.Errorf("iscsi: CDB of %d bytes", len(cmd.CDB))
	}
	lost, retries := 0, 0
	for {
		res, err := s.executeOnce(ctx, cmd)
		var gaveUp *backoff.Error
		if errors.Is(err, ErrConnLost) && !errors.As(err, &gaveUp) && lost == 0 && ctx.Err() == nil {
			lost++
			s.cfg.log().Info("iscsi: retrying after a lost connection", "portal", s.cfg.Portal, "err", err)
			continue
		}
		if err != nil {
			return nil, err
		}
		if res.Status == StatusGood {
			return res, nil
		}
		se := &StatusError{Status: res.Status}
		if sn, ok := ParseSense(res.Sense); ok {
			se.Sense = &sn
		}
		retry := res.Status == StatusBusy || res.Status == StatusTaskSetFull ||
			se.Sense != nil && se.Sense.Key == SenseUnitAttention
		if retry && retries < maxRetries {
			retries++
			if res.Status != StatusCheckCondition {
				select {
				case <-time.After(busyBackoff.Wait(retries)):
				case <-ctx.Done():
					return nil, ctx.Err()
				}
			}
			continue
		}
		return res, se
	}
}

func (s *Session) executeOnce(ctx context.Context, cmd *Command) (*Result, error) {
	c, err := s.current(ctx)
	if err != nil {
		return nil, err
	}
	prm := c.params
	t := &task{done: make(chan struct{}), lun: encodeLUN(cmd.LUN), dataIn: cmd.DataIn, dataOut: cmd.DataOut}
	p := &PDU{}
	p.BHS[0] = OpSCSICmd
	p.BHS[1] = 0x80 | 0x01 // F, task attribute SIMPLE
	edtl := 0
	if cmd.DataIn != nil {
		p.BHS[1] |= 0x40
		edtl = len(cmd.DataIn)
	}
	// Unsolicited data: immediate data in the command, then Data-Out up to
	// FirstBurstLength when InitialR2T=No; the rest waits for R2Ts.
	imm, unsol := 0, 0
	if len(cmd.DataOut) > 0 {
		p.BHS[1] |= 0x20
		edtl = len(cmd.DataOut)
		if !prm.InitialR2T || prm.ImmediateData {
			unsol = min(len(cmd.DataOut), prm.FirstBurstLength)
		}
		if prm.ImmediateData {
			imm = min(unsol, prm.MaxXmitDataSegmentLength)
			p.Data = cmd.DataOut[:imm]
		}
		if prm.InitialR2T {
			unsol = imm
		}
		if unsol > imm {
			p.BHS[1] &^= 0x80 // Data-Out PDUs follow
		}
	}
	copy(p.BHS[8:16], t.lun[:])
	p.put32(20, uint32(edtl))
	copy(p.BHS[32:48], cmd.CDB)
	if err := s.send(ctx, c, t, false, p); err != nil {
		return nil, err
	}
	if unsol > imm {
		s.sendData(c, t, reservedTag, imm, unsol-imm)
	}
	if err := s.wait(ctx, t); err != nil {
		return nil, err
	}
	r := t.resp
	res := &Result{}
	switch r.Opcode() {
	case OpSCSIResp:
		if r.BHS[2] != 0 {
			return nil, fmt.Errorf("iscsi: target failure (iSCSI response %#x)", r.BHS[2])
		}
		res.Status = r.BHS[3]
		res.Sense = append([]byte(nil), r.Sense()...)
	case OpDataIn:
		res.Status = r.BHS[3]
	}
	resid := int64(r.u32(44))
	switch {
	case r.BHS[1]&0x02 != 0: // U: underflow
		if resid > int64(edtl) {
			return nil, protoErrorf("residual %d of a %d-byte transfer", resid, edtl)
		}
		res.Residual = int(resid)
	case r.BHS[1]&0x04 != 0: // O: overflow
		res.Residual = -int(min(resid, 1<<30))
	}
	if cmd.DataIn != nil && res.Status == StatusGood && res.Residual >= 0 && t.got != len(cmd.DataIn)-res.Residual {
		return nil, protoErrorf("the target sent %d of %d bytes with a residual of %d", t.got, len(cmd.DataIn), res.Residual)
	}
	return res, nil
}

// Sense keys (SPC-4 §4.5.6).
const (
	SenseNoSense        = 0x0
	SenseRecovered      = 0x1
	SenseNotReady       = 0x2
	SenseMediumError    = 0x3
	SenseHardwareError  = 0x4
	SenseIllegalRequest = 0x5
	SenseUnitAttention  = 0x6
	SenseDataProtect    = 0x7
	SenseAbortedCommand = 0xb
)

// Sense is decoded sense data.
type Sense struct {
	Key, ASC, ASCQ byte
	// Info is the INFORMATION field (the failing LBA) when valid.
	Info      uint64
	InfoValid bool
}

// Classes of sense that callers map to their own errors.
var (
	ErrMediumError    = errors.New("medium error")
	ErrWriteProtected = errors.New("write protected")
	ErrLBAOutOfRange  = errors.New("LBA out of range")
	ErrInvalidCommand = errors.New("invalid command")
	ErrUnitAttention  = errors.New("unit attention")
	ErrNotReady       = errors.New("not ready")
)

// Is matches the sense against the classes above.
func (s Sense) Is(target error) bool {
	switch target {
	case ErrMediumError:
		return s.Key == SenseMediumError
	case ErrWriteProtected:
		return s.Key == SenseDataProtect && s.ASC == 0x27
	case ErrLBAOutOfRange:
		return s.Key == SenseIllegalRequest && s.ASC == 0x21
	case ErrInvalidCommand:
		return s.Key == SenseIllegalRequest && (s.ASC == 0x20 || s.ASC == 0x24 || s.ASC == 0x26)
	case ErrUnitAttention:
		return s.Key == SenseUnitAttention
	case ErrNotReady:
		return s.Key == SenseNotReady
	}
	return false
}

var senseKeyNames = [...]string{"no sense", "recovered error", "not ready", "medium error",
	"hardware error", "illegal request", "unit attention", "data protect", "blank check",
	"vendor specific", "copy aborted", "aborted command", "reserved", "volume overflow",
	"miscompare", "completed"}

func (s Sense) String() string {
	what := senseKeyNames[s.Key&0xf]
	switch {
	case s.Is(ErrWriteProtected):
		what = "write protected"
	case s.Is(ErrLBAOutOfRange):
		what = "LBA out of range"
	case s.Key == SenseIllegalRequest && s.ASC == 0x20:
		what = "invalid command operation code"
	case s.Key == SenseIllegalRequest && s.ASC == 0x24:
		what = "invalid field in CDB"
	case s.Key == SenseMediumError && s.ASC == 0x11:
		what = "medium error: unrecovered read error"
	case s.Key == SenseMediumError && s.ASC == 0x0c:
		what = "medium error: write error"
	case s.Key == SenseUnitAttention && s.ASC == 0x29:
		what = "unit attention: power on or reset"
	case s.Key == SenseNotReady && s.ASC == 0x3a:
		what = "not ready: medium not present"
	}
	out := fmt.Sprintf("%s (sense key %#x, ASC/ASCQ %02x/%02x)", what, s.Key, s.ASC, s.ASCQ)
	if s.InfoValid {
		out += fmt.Sprintf(" at LBA %d", s.Info)
	}
	return out
}

// ParseSense decodes fixed (0x70/0x71) or descriptor (0x72/0x73) sense
// data (SPC-4 §4.5).
func ParseSense(b []byte) (Sense, bool) {
	if len(b) < 2 {
		return Sense{}, false
	}
	var s Sense
	switch b[0] & 0x7f {
	case 0x70, 0x71:
		if len(b) < 3 {
			return Sense{}, false
		}
		s.Key = b[2] & 0xf
		if len(b) >= 14 {
			s.ASC, s.ASCQ = b[12], b[13]
		}
		if b[0]&0x80 != 0 && len(b) >= 7 {
			s.Info, s.InfoValid = uint64(binary.BigEndian.Uint32(b[3:])), true
		}
	case 0x72, 0x73:
		if len(b) < 4 {
			return Sense{}, false
		}
		s.Key, s.ASC, s.ASCQ = b[1]&0xf, b[2], b[3]
		if len(b) >= 8 {
			// Descriptors follow the 8-byte header; type 0 is INFORMATION.
			d := b[8:min(len(b), 8+int(b[7]))]
			for len(d) >= 2 {
				l := int(d[1]) + 2
				if l > len(d) {
					break
				}
				if d[0] == 0 && l >= 12 {
					s.Info, s.InfoValid = binary.BigEndian.Uint64(d[4:]), d[2]&0x80 != 0
				}
				d = d[l:]
			}
		}
	default:
		return Sense{}, false
	}
	return s, true
}
