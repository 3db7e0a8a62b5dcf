package nbd

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/storage/memfs"
)

func metaData(export string, queries ...string) []byte {
	b := append(u32(uint32(len(export))), export...)
	b = append(b, u32(uint32(len(queries)))...)
	for _, q := range queries {
		b = append(append(b, u32(uint32(len(q)))...), q...)
	}
	return b
}

// FuzzHandshake feeds what a client would send (after the server's
// greeting) to the server side of a pipe: negotiation and then requests.
// The server must neither panic nor hang, whatever the bytes.
func FuzzHandshake(f *testing.F) {
	flags := u32(clientFixedNewstyle | clientNoZeroes)
	valid := bytes.Join([][]byte{
		flags,
		optBytes(optStructuredReply, nil),
		optBytes(optListMetaContext, metaData("", "base:", "qemu:")),
		optBytes(optSetMetaContext, metaData("", ContextBaseAllocation, ContextAllocationDepth)),
		optBytes(optGo, goData("", infoBlockSize, infoName, infoDescription)),
		reqBytes(cmdWrite, cmdFlagFUA, 1, 4096, 8), []byte("abcdefgh"),
		reqBytes(cmdRead, 0, 2, 0, 128<<10),
		reqBytes(cmdBlockStatus, 0, 3, 0, 1<<20),
		reqBytes(cmdBlockStatus, cmdFlagReqOne, 4, 0, 1<<20),
		reqBytes(cmdWriteZeroes, cmdFlagNoHole, 5, 0, 8192),
		reqBytes(cmdTrim, 0, 6, 65536, 65536),
		reqBytes(cmdCache, 0, 7, 0, 4096),
		reqBytes(cmdFlush, 0, 8, 0, 0),
		reqBytes(cmdDisc, 0, 9, 0, 0),
	}, nil)
	f.Add(valid)
	f.Add(bytes.Join([][]byte{
		u32(clientFixedNewstyle),
		optBytes(optExportName, nil),
		reqBytes(cmdRead, 0, 1, 100, 1000),
		reqBytes(cmdWrite, 0, 2, 1<<20-10, 20), make([]byte, 20),
		reqBytes(99, 0, 3, 0, 0),
	}, nil))
	f.Add(bytes.Join([][]byte{
		flags,
		optBytes(optList, nil),
		optBytes(optInfo, goData("")),
		optBytes(optInfo, goData("missing")),
		optBytes(optStartTLS, nil),
		optBytes(optSetMetaContext, metaData("", "base:allocation")),
		optBytes(77, []byte("junk")),
		optBytes(optAbort, nil),
	}, nil))
	f.Add([]byte{0, 0, 0, 3, 0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{})

	st := memfs.New()
	d, err := vdisk.Create(context.Background(), "/fuzz.raw", &vdisk.CreateOptions{Format: "raw", Size: 1 << 20, Storage: st})
	if err != nil {
		f.Fatal(err)
	}
	defer d.Close()
	s := &Server{
		Exports:          []*Export{{Disk: d, Description: "fuzz"}, {Name: "ro", Disk: d, ReadOnly: true}},
		HandshakeTimeout: 5 * time.Second,
		ShutdownGrace:    time.Second,
		Logger:           slog.New(slog.DiscardHandler),
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		cli, srv := net.Pipe()
		done := make(chan error, 1)
		go func() { done <- s.ServeConn(context.Background(), srv) }()
		drained := make(chan struct{})
		go func() {
			io.Copy(io.Discard, cli)
			close(drained)
		}()
		cli.SetWriteDeadline(time.Now().Add(10 * time.Second))
		cli.Write(in)
		cli.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("server did not end the connection")
		}
		<-drained
	})
}
