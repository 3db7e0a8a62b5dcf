package control

import "encoding/json"

// Error classes.
const (
	ClassGeneric          = "GenericError"
	ClassCommandNotFound  = "CommandNotFound"
	ClassInvalidParameter = "InvalidParameter"
)

// Job types.
const (
	JobCommit   = "commit"
	JobStream   = "stream"
	JobSnapshot = "snapshot"
	// JobPrefetch is serve --prefetch pulling a network base into its
	// block cache; it only reads, so other jobs may run beside it.
	JobPrefetch = "prefetch"
)

// Job statuses.
const (
	StatusRunning   = "running"
	StatusConcluded = "concluded"
	StatusFailed    = "failed"
	StatusCancelled = "cancelled"
)

// Error is an error reply. The client returns it from Call.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return e.Desc }

// Request is one request line.
type Request struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments,omitempty"`
	ID        json.RawMessage `json:"id,omitempty"`
}

// Response is one reply line: Return or Error.
type Response struct {
	Return json.RawMessage `json:"return,omitempty"`
	Error  *Error          `json:"error,omitempty"`
	ID     json.RawMessage `json:"id,omitempty"`
}

// ExportInfo is one element of query-exports' reply.
type ExportInfo struct {
	Name string `json:"name"`
	// Top is the file name of the top image.
	Top    string      `json:"top"`
	Layers []LayerInfo `json:"layers"`
	Size   int64       `json:"size"`
	// Job is the type of the job running on the export's disk, "" when
	// none.
	Job string `json:"job"`
}

// LayerInfo is one image of an export's chain, top first.
type LayerInfo struct {
	Name     string `json:"name"`
	Format   string `json:"format"`
	ReadOnly bool   `json:"read-only"`
}

// JobInfo is one element of query-jobs' reply.
type JobInfo struct {
	ID     string `json:"id"`
	Type   string `json:"type"`
	Export string `json:"export"`
	Status string `json:"status"`
	// Done and Total are bytes, as the job's progress reports them
	// (Total grows while a commit copies data written meanwhile).
	Done  int64  `json:"done"`
	Total int64  `json:"total"`
	Error string `json:"error,omitempty"`
}

// CommitArgs are the arguments of commit.
type CommitArgs struct {
	Export string `json:"export"`
	// Base is the index of the layer committed into (1, the backing file
	// of the top, when nil).
	Base *int `json:"base,omitempty"`
	// Keep leaves the top's data and the chain as they are.
	Keep bool `json:"keep,omitempty"`
	// Speed limits the copy to this many bytes per second (QMP's
	// block-commit speed); 0: no limit.
	Speed int64 `json:"speed,omitempty"`
}

// StreamArgs are the arguments of stream.
type StreamArgs struct {
	Export string `json:"export"`
	// Base is the index of the layer that stays below the top; 0 pulls
	// the whole chain into the top.
	Base int `json:"base,omitempty"`
	// Speed limits the copy to this many bytes per second (QMP's
	// block-stream speed); 0: no limit.
	Speed int64 `json:"speed,omitempty"`
}

// SnapshotArgs are the arguments of snapshot.
type SnapshotArgs struct {
	Export string `json:"export"`
	// File is the new top's file name, in the current top's directory.
	File string `json:"file"`
	// Format of the new top ("" takes the current top's).
	Format string `json:"format,omitempty"`
}

// CancelArgs are the arguments of cancel.
type CancelArgs struct {
	JobID string `json:"job-id"`
}

// FlushArgs are the arguments of flush; a nil Export flushes every export.
type FlushArgs struct {
	Export *string `json:"export,omitempty"`
}

// JobStarted is the reply of commit and stream.
type JobStarted struct {
	JobID string `json:"job-id"`
}

// SnapshotResult is the reply of snapshot.
type SnapshotResult struct {
	// File is the new top's file name as the disk knows it.
	File string `json:"file"`
}
