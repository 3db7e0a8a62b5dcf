package parallels

import "github.com/vdisk/vdisk/driver"

func init() { Format.Measure = measure }

// measure is the file size an image of p's content takes: the header and
// BAT rounded up to a cluster, plus one cluster per cluster holding data.
func measure(p *driver.MeasureParams) (driver.MeasureResult, error) {
	cs := p.Options.Int("cluster_size")
	if cs == 0 {
		cs = defaultCSize
	}
	cs = (cs + sectorSize - 1) &^ (sectorSize - 1)
	size := (p.Size + sectorSize - 1) &^ (sectorSize - 1)
	nb := (size + cs - 1) / cs
	meta := (batEnd(nb) + cs - 1) / cs * cs
	data := int64(0)
	if p.Allocated != nil {
		var err error
		if data, err = p.Allocated(cs); err != nil {
			return driver.MeasureResult{}, err
		}
	}
	return driver.MeasureResult{Required: meta + data, FullyAllocated: meta + nb*cs}, nil
}
