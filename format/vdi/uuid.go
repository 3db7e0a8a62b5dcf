package vdi

import (
	"github.com/google/uuid"
)

// UUID is a UUID in RFC 4122 byte order (VDI stores some fields in
// VirtualBox's mixed-endian layout; see header.go for the conversion).
type UUID = uuid.UUID

// nilUUID is the all-zero UUID, which VDI uses for "none".
var nilUUID UUID

// newUUID returns a random (version 4) UUID.
func newUUID() UUID { return uuid.New() }

// parseUUIDText parses the canonical form, optionally in braces (as
// VirtualBox prints UUIDs) or with a "urn:uuid:" prefix.
func parseUUIDText(s string) (UUID, error) { return uuid.Parse(s) }
