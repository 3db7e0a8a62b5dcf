package iscsi_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/vdisk/vdisk/iscsi"
	"github.com/vdisk/vdisk/iscsi/iscsitest"
)

func TestSmoke(t *testing.T) {
	tg := iscsitest.Start(t, "iqn.2026-12.org.vdisk:smoke")
	tg.AddLUN(1, 16<<20, true)
	ctx := context.Background()
	s, err := iscsi.Dial(ctx, iscsi.Config{Portal: tg.Portal, Target: tg.IQN})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	t.Logf("params %+v", s.Params())
	d, err := iscsi.OpenDisk(ctx, s, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("disk %+v", d)
	buf := bytes.Repeat([]byte{0xab}, 3<<20)
	if err := d.Write(ctx, 10, buf); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(buf))
	if err := d.Read(ctx, 10, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, buf) {
		t.Fatal("mismatch")
	}
	st, err := d.GetLBAStatus(ctx, 0)
	t.Logf("status %+v %v", st, err)
	if err := d.Sync(ctx); err != nil {
		t.Fatal(err)
	}
}
