#!/usr/bin/env bash
# Builds the Go clients of the interop tests into tests/interop/bin/ (gitignored; override with
# MARBLEKEEP_INTEROP_BIN). See tests/interop/README.md.
#
#   premain                 our MarbleRun-style premain on google.golang.org/grpc (tests/interop/premain,
#                           go.sum pinned). Always built; the build fails if it does not build.
#   marblerun-premain-mock  MarbleRun v1.5.2's own premain.PreMainMock (tests/interop/premain_mock)   } genuine
#   marblerun               MarbleRun v1.5.2's CLI (github.com/edgelesssys/marblerun/cli)             } MarbleRun
#
# The genuine MarbleRun binaries need github.com/edgelesssys/marblerun v1.5.2 and its dependency
# github.com/edgelesssys/ego v1.5.4 (both MPL-2.0). The Go module proxy refuses both today (HTTP 403
# "This module version is not available"), so this script builds them only when
#   - the module proxy serves github.com/edgelesssys/marblerun@v1.5.2, or
#   - MARBLERUN_GIT and EGO_GIT name git repositories (clones or mirrors) of edgelesssys/marblerun and
#     edgelesssys/ego; the tags v1.5.2 and v1.5.4 are exported from them with `git archive`.
# Otherwise it says why and builds only `premain`. Only v1.5.2 is ever built: later MarbleRun releases
# are under the BUSL licence.
#
# The CLI is built with the build tag ego_mock_eclient: without it, EGo's eclient package needs Open
# Enclave's host-verify library through cgo (openenclave/attestation/verifier.h, -loehostverify), which
# no Debian/Ubuntu package provides. With the tag the CLI cannot verify a quote, which a simulation
# Coordinator does not have anyway: every command runs with --insecure. The genuine binaries need a C
# compiler (cgo, for EGo's enclave package); `premain` does not (CGO_ENABLED=0).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bin="${MARBLEKEEP_INTEROP_BIN:-$here/bin}"
marblerun_version=v1.5.2
ego_version=v1.5.4

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  for candidate in /usr/local/go/bin/go /usr/lib/go/bin/go; do
    if [ -x "$candidate" ]; then
      PATH="$(dirname "$candidate"):$PATH"
      break
    fi
  done
fi
if ! command -v go >/dev/null 2>&1; then
  echo "build.sh: Go is not installed (looked on PATH and in /usr/local/go/bin); install Go >= 1.22," >&2
  echo "or set MARBLEKEEP_SKIP_GO_INTEROP=1 to skip the interop tests (tests/interop/README.md)" >&2
  exit 1
fi
export GOTOOLCHAIN=local  # never download another Go toolchain
export GOFLAGS="-trimpath -buildvcs=false"
mkdir -p "$bin"
tmp="$(mktemp -d)"
trap 'chmod -R u+w "$tmp" 2>/dev/null || true; rm -rf "$tmp"' EXIT

echo "== build.sh: $(go version), into $bin"

echo "-- premain (our client on google.golang.org/grpc)"
(cd "$here/premain" && CGO_ENABLED=0 go build -mod=readonly -o "$bin/premain" .)

build_genuine() {  # $1: directory holding marblerun@v1.5.2 ("" = module proxy), $2: ego@v1.5.4
  local mr_src="$1" ego_src="$2" work="$tmp/premain_mock"
  cp -r "$here/premain_mock" "$work"
  if [ -n "$mr_src" ]; then
    (cd "$work" && go mod edit -replace "github.com/edgelesssys/marblerun=$mr_src" \
      -replace "github.com/edgelesssys/ego=$ego_src")
  fi
  echo "-- marblerun-premain-mock (MarbleRun $marblerun_version premain.PreMainMock)"
  (cd "$work" && go build -mod=mod -o "$bin/marblerun-premain-mock" .)
  echo "-- marblerun (MarbleRun $marblerun_version CLI, tag ego_mock_eclient)"
  if [ -n "$mr_src" ]; then
    cp "$mr_src/go.mod" "$mr_src/go.sum" "$tmp/"
    (cd "$tmp" && go mod edit -replace "github.com/edgelesssys/ego=$ego_src")
    (cd "$mr_src" && go build -modfile="$tmp/go.mod" -mod=mod -tags ego_mock_eclient -o "$bin/marblerun" ./cli)
  else
    GOBIN="$tmp/gobin" go install -tags ego_mock_eclient "github.com/edgelesssys/marblerun/cli@$marblerun_version"
    mv "$tmp/gobin/cli" "$bin/marblerun"
  fi
}

export_tag() {  # $1: git repository, $2: tag, $3: destination; checks the tag's licence is MPL-2.0
  mkdir -p "$3"
  git -C "$1" archive "$2" | tar -x -C "$3"
  if ! grep -q "Mozilla Public License Version 2.0" "$3/LICENSE"; then
    echo "build.sh: $1 at $2 is not MPL-2.0; refusing to build it" >&2
    exit 1
  fi
}

rm -f "$bin/marblerun-premain-mock" "$bin/marblerun"
if [ -n "${MARBLERUN_GIT:-}" ] || [ -n "${EGO_GIT:-}" ]; then
  if [ -z "${MARBLERUN_GIT:-}" ] || [ -z "${EGO_GIT:-}" ]; then
    echo "build.sh: set both MARBLERUN_GIT and EGO_GIT (git repositories of edgelesssys/marblerun and edgelesssys/ego)" >&2
    exit 1
  fi
  export_tag "$MARBLERUN_GIT" "$marblerun_version" "$tmp/marblerun"
  export_tag "$EGO_GIT" "$ego_version" "$tmp/ego"
  build_genuine "$tmp/marblerun" "$tmp/ego"
elif probe="$(cd "$tmp" && go mod download -json "github.com/edgelesssys/marblerun@$marblerun_version" 2>&1)"; then
  # served by the proxy (not the case today): a failure here must not stop the required build above
  set +e
  (set -e; build_genuine "" "")
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    rm -f "$bin/marblerun-premain-mock" "$bin/marblerun"
    echo "-- MarbleRun $marblerun_version is on the module proxy but did not build (see above; cgo needs a C compiler)."
  fi
else
  reason="$(printf '%s\n' "$probe" | sed -n 's/.*"Error": "\(.*\)".*/\1/p' | sed 's/\\n.*//')"
  echo "-- MarbleRun $marblerun_version not built: the module proxy does not serve it (${reason:-$probe})."
  echo "   The tests that need the genuine MarbleRun premain and CLI are skipped; to build them from"
  echo "   git repositories set MARBLERUN_GIT and EGO_GIT (tests/interop/README.md)."
fi
ls -l "$bin"
