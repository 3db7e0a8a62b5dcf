package s3

import "os"

func writeTextFile(name, s string) error { return os.WriteFile(name, []byte(s), 0o600) }
