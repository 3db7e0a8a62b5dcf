package vdisk

import (
	"bytes"
	"errors"
)

func bytesEqual(a, b []byte) bool { return bytes.Equal(a, b) }

func errorsIsUnsupported(err error) bool { return errors.Is(err, ErrUnsupported) }
