package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk/driver"
)

func (a *app) newFormatsCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "formats [--output human|json]",
		Short: "List the supported image formats",
		Long: `List every registered image format with its aliases, file extensions,
capabilities and the options it accepts when creating (-o) and opening
images, as VirtualBox lists its disk backends.`,
		Args: exactArgs(0, "formats takes no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := outputFormat(output)
			if err != nil {
				return err
			}
			return a.formats(asJSON)
		},
	}
	cmd.Flags().StringVar(&output, "output", "human", "output format: human or json")
	return cmd
}

type optionJSON struct {
	Name     string   `json:"name"`
	Type     string   `json:"type"`
	Default  string   `json:"default,omitempty"`
	Min      *int64   `json:"min,omitempty"`
	Max      *int64   `json:"max,omitempty"`
	PowerOf2 bool     `json:"power-of-2,omitempty"`
	Values   []string `json:"values,omitempty"`
	Doc      string   `json:"doc"`
}

type formatJSON struct {
	Name          string       `json:"name"`
	Aliases       []string     `json:"aliases"`
	Extensions    []string     `json:"extensions"`
	Description   string       `json:"description"`
	Capabilities  []string     `json:"capabilities"`
	Probed        bool         `json:"probed"`
	Creatable     bool         `json:"creatable"`
	CreateOptions []optionJSON `json:"create-options"`
	OpenOptions   []optionJSON `json:"open-options"`
}

func optionsJSON(opts []driver.Option) []optionJSON {
	out := []optionJSON{}
	for _, o := range opts {
		j := optionJSON{Name: o.Name, Type: o.Type.String(), Default: o.Default, PowerOf2: o.PowerOf2, Values: o.Values, Doc: o.Doc}
		if o.Max > o.Min {
			lo, hi := o.Min, o.Max
			j.Min, j.Max = &lo, &hi
		}
		out = append(out, j)
	}
	return out
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func (a *app) formats(asJSON bool) error {
	var list []formatJSON
	for _, f := range driver.Formats() {
		list = append(list, formatJSON{
			Name:          f.Name,
			Aliases:       nonNil(f.Aliases),
			Extensions:    nonNil(f.Extensions),
			Description:   f.Description,
			Capabilities:  nonNil(f.Caps.Names()),
			Probed:        f.Probe != nil,
			Creatable:     f.Create != nil,
			CreateOptions: optionsJSON(f.CreateOptions),
			OpenOptions:   optionsJSON(f.OpenOptions),
		})
	}
	w := bufio.NewWriter(a.stdout)
	if asJSON {
		if list == nil {
			list = []formatJSON{}
		}
		data, err := json.MarshalIndent(list, "", "    ")
		if err != nil {
			return err
		}
		w.Write(data)
		w.WriteString("\n")
		return w.Flush()
	}
	join := func(s []string) string {
		if len(s) == 0 {
			return "(none)"
		}
		return strings.Join(s, ", ")
	}
	fmt.Fprintf(w, "Supported formats:\n")
	for _, f := range list {
		fmt.Fprintf(w, "\n%s: %s\n", f.Name, f.Description)
		fmt.Fprintf(w, "    Aliases:       %s\n", join(f.Aliases))
		fmt.Fprintf(w, "    Extensions:    %s\n", join(f.Extensions))
		fmt.Fprintf(w, "    Capabilities:  %s\n", join(f.Capabilities))
		fmt.Fprintf(w, "    Probed:        %s\n", yesNo(f.Probed))
		fmt.Fprintf(w, "    Creatable:     %s\n", yesNo(f.Creatable))
		for _, sec := range []struct {
			title string
			opts  []optionJSON
		}{{"Create options", f.CreateOptions}, {"Open options", f.OpenOptions}} {
			if len(sec.opts) == 0 {
				fmt.Fprintf(w, "    %-15s(none)\n", sec.title+":")
				continue
			}
			fmt.Fprintf(w, "    %s:\n", sec.title)
			for _, o := range sec.opts {
				var attrs []string
				if o.Default != "" {
					attrs = append(attrs, "default "+o.Default)
				}
				if len(o.Values) > 0 {
					attrs = append(attrs, "values "+strings.Join(o.Values, "|"))
				}
				if o.Min != nil {
					attrs = append(attrs, fmt.Sprintf("range %d..%d", *o.Min, *o.Max))
				}
				if o.PowerOf2 {
					attrs = append(attrs, "power of two")
				}
				line := fmt.Sprintf("        %s=<%s>", o.Name, o.Type)
				if len(attrs) > 0 {
					line += "  " + strings.Join(attrs, "; ")
				}
				fmt.Fprintln(w, line)
				if o.Doc != "" {
					fmt.Fprintf(w, "            %s\n", o.Doc)
				}
			}
		}
	}
	return w.Flush()
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
