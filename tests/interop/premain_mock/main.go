// Command premain_mock is MarbleRun v1.5.2's own premain as a test Marble: it calls
// premain.PreMainMock() from github.com/edgelesssys/marblerun (MPL-2.0, imported as a Go module, not
// copied), then prints what the premain applied as one JSON object on stdout, in the same shape as
// ../premain prints: {"uuid", "marble_type", "argv", "env", "files"}.
//
// PreMainMock reads EDG_MARBLE_COORDINATOR_ADDR, EDG_MARBLE_TYPE, EDG_MARBLE_DNS_NAMES and
// EDG_MARBLE_UUID_FILE, sends an empty quote (its quote issuer always fails) and writes the Files on the
// host file system. It does not return the parameters, so the report is read back from what it applied:
// Env names come from MARBLEKEEP_INTEROP_ENV (comma-separated), files from MARBLEKEEP_INTEROP_FILES
// (comma-separated, reported when they exist). On failure it prints "premain: <error>" on stderr and
// exits 1.
//
// github.com/edgelesssys/marblerun is not served by the Go module proxy today (HTTP 403), so build.sh
// builds this program only from local source trees (MARBLERUN_SRC, EGO_SRC); see ../README.md.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/edgelesssys/marblerun/marble/premain"
)

func list(name string) []string {
	var out []string
	for _, item := range strings.Split(os.Getenv(name), ",") {
		if item != "" {
			out = append(out, item)
		}
	}
	return out
}

func main() {
	envNames := list("MARBLEKEEP_INTEROP_ENV")
	fileNames := list("MARBLEKEEP_INTEROP_FILES")
	for _, name := range envNames {
		os.Unsetenv(name) // only what the premain sets is reported
	}
	if err := premain.PreMainMock(); err != nil {
		fmt.Fprintf(os.Stderr, "premain: %v\n", err)
		os.Exit(1)
	}
	env := map[string]string{}
	for _, name := range envNames {
		if value, ok := os.LookupEnv(name); ok {
			env[name] = value
		}
	}
	files := []string{}
	for _, name := range fileNames {
		if _, err := os.Stat(name); err == nil {
			files = append(files, name)
		}
	}
	uuidText, _ := os.ReadFile(os.Getenv("EDG_MARBLE_UUID_FILE"))
	out := map[string]any{
		"uuid": strings.TrimSpace(string(uuidText)), "marble_type": os.Getenv("EDG_MARBLE_TYPE"),
		"argv": os.Args, "env": env, "files": files,
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintf(os.Stderr, "premain: writing the report: %v\n", err)
		os.Exit(1)
	}
}
