#!/usr/bin/env bash
# Builds the test environment's Kubernetes from the Go module proxy: kube-apiserver,
# kube-controller-manager, kube-scheduler and kubectl at the patch that the wrapper module
# tests/env/k8s/v$K8S_VERSION pins (go.mod and go.sum committed, so the build is
# reproducible), and etcd from tests/env/etcd. Cached by version in $WEIR_CACHE/k8s-<patch>
# and $WEIR_CACHE/etcd-<version>; builds only what is missing. Prints each step's time.
# K8S_VERSION=1.34 selects another minor (its wrapper module must be in tests/env/k8s).
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)

# go_build MODULE_DIR OUT_DIR PKG... [-- LDFLAGS]: builds the packages of the wrapper module
# into OUT_DIR.tmp, then moves it into place (an interrupted build leaves no half cache).
go_build() {
  local mod=$1 out=$2; shift 2
  local pkgs=() ldflags=""
  while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then ldflags=$2; break; fi
    pkgs+=("$1"); shift
  done
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  (cd "$mod" && CGO_ENABLED=0 GOFLAGS=-mod=readonly GOTOOLCHAIN=${GOTOOLCHAIN:-local} \
     go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp/" "${pkgs[@]}") || return 1
  rm -rf "$out"; mv "$out.tmp" "$out"
}

command -v go >/dev/null || { log "go is not on PATH: install Go 1.26 (https://go.dev/dl) and run again"; exit 1; }

t0=$SECONDS
if [ -x "$ETCD_DIR/etcd" ]; then
  log "etcd $ETCD_VERSION: cached in $ETCD_DIR"
else
  log "building etcd $ETCD_VERSION from the Go module proxy (a minute or two)"
  go_build "$here/etcd" "$ETCD_DIR" . || { log "etcd build failed"; exit 1; }
  log "etcd $ETCD_VERSION built into $ETCD_DIR in $((SECONDS - t0)) s"
fi

t0=$SECONDS
bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
have=1
for b in "${bins[@]}"; do [ -x "$K8S_DIR/$b" ] || have=0; done
if [ $have -eq 1 ]; then
  log "kubernetes $K8S_PATCH: cached in $K8S_DIR"
  exit 0
fi
[ -f "$K8S_MODULE/go.mod" ] || { log "no wrapper module for Kubernetes $K8S_VERSION in $K8S_MODULE (tests/env/k8s/gen.sh writes one)"; exit 1; }
# What `kubectl version` and /version print: the build's own version, as Kubernetes' release
# scripts set it (hack/lib/version.sh).
minor=${K8S_PATCH#v1.}; minor=${minor%%.*}
ld=""
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  ld+=" -X $pkg.gitVersion=$K8S_PATCH -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
log "building ${bins[*]} $K8S_PATCH from the Go module proxy (the first time: about 15 minutes on 2 cores)"
go_build "$K8S_MODULE" "$K8S_DIR" "${bins[@]/#/k8s.io/kubernetes/cmd/}" -- "$ld" || { log "kubernetes build failed"; exit 1; }
log "kubernetes $K8S_PATCH built into $K8S_DIR in $((SECONDS - t0)) s"
