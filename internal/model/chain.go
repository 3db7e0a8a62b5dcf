package model

import (
	"context"
	"fmt"
	"strings"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

// Chain grows a chain of diff images during a Harness run: its Reopen and
// Snapshot methods are the Harness's steps of the same names. Reopen
// closes the disk, opens the top again and checks that the whole chain
// came back; Snapshot closes the disk and creates a new diff image of
// Format on top of the current one, until the chain holds MaxDepth diff
// images above the base.
type Chain struct {
	Storage driver.Storage
	// Format and Options create the diff images, named /l<depth>.<Ext>.
	Format  string
	Ext     string
	Options []driver.KV
	// RecordFormat records the backing format in each new diff image.
	RecordFormat bool
	MaxDepth     int

	// Top is the current top image ("/l1.qcow2"), Depth the number of diff
	// images above the base (the first one is created by the test).
	Top   string
	Depth int
}

// Reopen closes d and opens the chain from its top again.
func (c *Chain) Reopen(d *vdisk.Disk) (*vdisk.Disk, error) {
	if err := d.Close(); err != nil {
		return nil, err
	}
	nd, err := vdisk.Open(context.Background(), c.Top, &vdisk.OpenOptions{Storage: c.Storage})
	if err == nil && len(nd.Layers()) != c.Depth+1 {
		nd.Close()
		return nil, fmt.Errorf("reopened chain has %d layers, want %d", len(nd.Layers()), c.Depth+1)
	}
	return nd, err
}

// Snapshot closes d and returns a new diff image on top of it (nil once
// the chain is MaxDepth deep).
func (c *Chain) Snapshot(d *vdisk.Disk) (*vdisk.Disk, error) {
	if c.Depth >= c.MaxDepth {
		return nil, nil
	}
	if err := d.Close(); err != nil {
		return nil, err
	}
	c.Depth++
	name := fmt.Sprintf("/l%d.%s", c.Depth, c.Ext)
	o := &vdisk.CreateOptions{Format: c.Format, Backing: strings.TrimPrefix(c.Top, "/"), Options: c.Options, Storage: c.Storage}
	if c.RecordFormat {
		o.BackingFormat = c.Format
	}
	nd, err := vdisk.Create(context.Background(), name, o)
	c.Top = name
	return nd, err
}
