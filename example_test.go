package vdisk_test

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/vdisk/vdisk"
	_ "github.com/vdisk/vdisk/format/all" // register every format driver
)

// exampleDir makes a scratch directory for an example.
func exampleDir() string {
	dir, err := os.MkdirTemp("", "vdisk-example")
	if err != nil {
		log.Fatal(err)
	}
	return dir
}

// Open an image (and its backing chain) and read from it.
func ExampleOpen() {
	dir := exampleDir()
	defer os.RemoveAll(dir)
	name := filepath.Join(dir, "disk.qcow2")
	d, err := vdisk.Create(context.Background(), name, &vdisk.CreateOptions{Format: "qcow2", Size: 64 << 20})
	if err != nil {
		log.Fatal(err)
	}
	d.WriteAt([]byte("hello, disk"), 1<<20)
	d.Close()

	d, err = vdisk.Open(context.Background(), name, &vdisk.OpenOptions{ReadOnly: true})
	if err != nil {
		log.Fatal(err)
	}
	defer d.Close()
	p := make([]byte, 11)
	if _, err := d.ReadAt(p, 1<<20); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s, %d MiB, format %s\n", p, d.Size()>>20, d.Top().Format.Name)
	// Output: hello, disk, 64 MiB, format qcow2
}

// Create a differencing image on top of a base: reads fall through to
// the base, writes stay in the new image.
func ExampleCreate_backing() {
	dir := exampleDir()
	defer os.RemoveAll(dir)
	ctx := context.Background()
	base, err := vdisk.Create(ctx, filepath.Join(dir, "base.vdi"), &vdisk.CreateOptions{Format: "vdi", Size: 16 << 20})
	if err != nil {
		log.Fatal(err)
	}
	base.WriteAt(bytes.Repeat([]byte{'b'}, 4096), 0)
	base.Close()

	top, err := vdisk.Create(ctx, filepath.Join(dir, "top.vdi"), &vdisk.CreateOptions{Format: "vdi", Backing: "base.vdi"})
	if err != nil {
		log.Fatal(err)
	}
	defer top.Close()
	top.WriteAt([]byte("tt"), 1)
	p := make([]byte, 4)
	top.ReadAt(p, 0)
	fmt.Printf("%s, %d layers\n", p, len(top.Layers()))
	// Output: bttb, 2 layers
}

// Convert an image to another format, with progress.
func ExampleConvert() {
	dir := exampleDir()
	defer os.RemoveAll(dir)
	ctx := context.Background()
	src, err := vdisk.Create(ctx, filepath.Join(dir, "src.vmdk"), &vdisk.CreateOptions{Format: "vmdk", Size: 32 << 20})
	if err != nil {
		log.Fatal(err)
	}
	defer src.Close()
	src.WriteAt(bytes.Repeat([]byte{7}, 1<<20), 8<<20)

	dst, err := vdisk.Create(ctx, filepath.Join(dir, "dst.qcow2"), &vdisk.CreateOptions{Format: "qcow2", Size: src.Size()})
	if err != nil {
		log.Fatal(err)
	}
	var last int64
	err = vdisk.Convert(ctx, dst, src, &vdisk.ConvertOptions{Progress: func(done, total int64) { last = done * 100 / total }})
	if err != nil {
		log.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%d%% done\n", last)
	// Output: 100% done
}

// Map lists the runs of a disk: which hold data, which read as zeros, and
// at which depth of the chain.
func ExampleDisk_Map() {
	dir := exampleDir()
	defer os.RemoveAll(dir)
	ctx := context.Background()
	d, err := vdisk.Create(ctx, filepath.Join(dir, "disk.qcow2"), &vdisk.CreateOptions{Format: "qcow2", Size: 4 << 20})
	if err != nil {
		log.Fatal(err)
	}
	defer d.Close()
	d.WriteAt(bytes.Repeat([]byte{1}, 64<<10), 1<<20)
	d.Map(ctx, 0, d.Size(), func(e vdisk.Extent) error {
		fmt.Printf("%8d %8d data=%v\n", e.Start, e.Length, e.IsData())
		return nil
	})
	// Output:
	//        0  1048576 data=false
	//  1048576    65536 data=true
	//  1114112  3080192 data=false
}

// Commit a differencing image into its base while the disk stays open and
// in use: other goroutines may read and write it meanwhile.
func ExampleDisk_Commit() {
	dir := exampleDir()
	defer os.RemoveAll(dir)
	ctx := context.Background()
	base, err := vdisk.Create(ctx, filepath.Join(dir, "base.qcow2"), &vdisk.CreateOptions{Format: "qcow2", Size: 8 << 20})
	if err != nil {
		log.Fatal(err)
	}
	base.Close()
	d, err := vdisk.Create(ctx, filepath.Join(dir, "top.qcow2"), &vdisk.CreateOptions{Format: "qcow2", Backing: "base.qcow2"})
	if err != nil {
		log.Fatal(err)
	}
	defer d.Close()
	d.WriteAt([]byte("committed"), 0)

	done := make(chan error)
	go func() { done <- d.Commit(ctx, &vdisk.CommitOptions{Base: 1}) }()
	d.WriteAt([]byte("!"), 9) // runs while the commit does
	if err := <-done; err != nil {
		log.Fatal(err)
	}
	p := make([]byte, 10)
	d.ReadAt(p, 0)
	fmt.Printf("%s\n", p)
	// Output: committed!
}
