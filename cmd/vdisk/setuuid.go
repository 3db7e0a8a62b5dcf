package main

import (
	"crypto/rand"
	"fmt"
	"regexp"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

const nullUUID = "00000000-0000-0000-0000-000000000000"

var uuidRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

// newUUID returns a random (version 4) UUID.
func newUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on supported systems
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func (a *app) newSetUUIDCmd() *cobra.Command {
	var format string
	var quiet bool
	var vals [4]string
	cmd := &cobra.Command{
		Use:   "setuuid [-f FMT] [--uuid U] [--parent-uuid U] [--modification-uuid U] [--parent-modification-uuid U] [-q] FILE",
		Short: "Change the UUIDs an image records (vbox-img setuuid)",
		Long: `Set the UUIDs FILE records, as vbox-img setuuid does: its own UUID, the UUID
of its parent, and the modification UUIDs of both (formats that record
them). Without flags, FILE gets a new random UUID. The old and new values
are printed. A child records its parent's UUID: changing the UUID of an
image that is the parent of others makes them refuse it until their
--parent-uuid is set to match.`,
		Args: exactArgs(1, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			names := [4]string{"uuid", "parent-uuid", "modification-uuid", "parent-modification-uuid"}
			var set [4]bool
			given := false
			for i, n := range names {
				if cmd.Flags().Changed(n) {
					if !uuidRE.MatchString(vals[i]) {
						return usageErrorf("invalid UUID %q for --%s", vals[i], n)
					}
					set[i], given = true, true
				}
			}
			if !given {
				vals[0], set[0] = newUUID(), true
			}
			return a.setUUID(args[0], format, vals, set, quiet)
		},
	}
	addFormatFlag(cmd, &format, "image format (probed when not given)")
	cmd.Flags().StringVar(&vals[0], "uuid", "", "new UUID of the image")
	cmd.Flags().StringVar(&vals[1], "parent-uuid", "", "new UUID of the parent the image records")
	cmd.Flags().StringVar(&vals[2], "modification-uuid", "", "new modification UUID of the image")
	cmd.Flags().StringVar(&vals[3], "parent-modification-uuid", "", "new modification UUID of the parent the image records")
	addQuietFlag(cmd, &quiet)
	return cmd
}

func (a *app) setUUID(name, format string, vals [4]string, set [4]bool, quiet bool) error {
	if err := checkFormat(format); err != nil {
		return err
	}
	d, err := a.openRW(name, format, true)
	if err != nil {
		return err
	}
	defer d.Close()
	top := d.Top()
	id, ok := vdisk.As[driver.Identifier](top)
	if !ok {
		return driver.Unsupportedf(top.Name, "format %s does not record UUIDs", top.Format.Name)
	}
	show := func(u string) string {
		if u == "" {
			return nullUUID
		}
		return u
	}
	kinds := []struct {
		label string
		get   func() string
		kind  vdisk.UUIDKind
	}{
		{"image UUID:  ", id.UUID, vdisk.UUIDImage},
		{"parent UUID: ", id.ParentUUID, vdisk.UUIDParent},
		{"modification UUID: ", id.ModificationUUID, vdisk.UUIDModification},
		{"parent modification UUID: ", id.ParentModificationUUID, vdisk.UUIDParentModification},
	}
	// vbox-img prints the old image and parent UUIDs first.
	for i, k := range kinds {
		if i < 2 || set[i] {
			a.say(quiet, "Old %s%s\n", k.label, show(k.get()))
		}
	}
	for i, k := range kinds {
		if !set[i] {
			continue
		}
		u := strings.ToLower(vals[i])
		a.say(quiet, "New %s%s\n", k.label, u)
		if err := d.SetUUID(k.kind, u); err != nil {
			return err
		}
	}
	return d.Close()
}
