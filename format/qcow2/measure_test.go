package qcow2

import (
	"encoding/json"
	"os/exec"
	"testing"

	"github.com/vdisk/vdisk/driver"
)

// TestMeasureMatchesQemu: by size alone, our figures equal qemu-img
// measure's for several sizes and cluster/refcount settings.
func TestMeasureMatchesQemu(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Fatal("qemu-img missing: run ./test.sh")
	}
	for _, c := range []struct{ size, opts string }{
		{"1G", "cluster_size=64k"}, {"64M", "cluster_size=4k"}, {"100G", "cluster_size=2M"},
		{"10G", "refcount_bits=64"}, {"1000000000", "cluster_size=512"}, {"7G", "extended_l2=on,cluster_size=128k"},
		{"3T", "refcount_bits=1"},
		// The LUKS header's clusters count too.
		{"1G", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100"},
		{"5G", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100,encrypt.cipher-alg=aes-128,cluster_size=4k"},
		{"2G", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100,encrypt.cipher-mode=cbc,cluster_size=2M"},
	} {
		var out []byte
		var err error
		// qemu calibrates PBKDF2 for an encrypted target and may refuse
		// a short iter-time on a busy machine ("accurate CPU usage").
		for try := 0; try < 5; try++ {
			out, err = exec.Command("qemu-img", "measure", "--object", "secret,id=sec0,data=x", "--output", "json", "-O", "qcow2", "-o", c.opts, "--size", c.size).Output()
			if err == nil {
				break
			}
		}
		if err != nil {
			t.Fatalf("%v: %v", c, err)
		}
		var want driver.MeasureResult
		if err := json.Unmarshal(out, &want); err != nil {
			t.Fatal(err)
		}
		kvs, _ := driver.SplitOptions(c.opts)
		vals, err := driver.ParseOptions("qcow2", Format.CreateOptions, kvs)
		if err != nil {
			t.Fatal(err)
		}
		size, _ := driver.ParseSize(c.size)
		got, err := measure(&driver.MeasureParams{Size: size, Options: vals})
		if err != nil || got != want {
			t.Errorf("%s %s: got %+v, qemu-img says %+v (%v)", c.size, c.opts, got, want, err)
		}
	}
}
