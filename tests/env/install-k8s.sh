#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kube-scheduler v1.20.2 from Debian's
# `kubernetes` source package with Go 1.15 (bullseye), the Go that Kubernetes 1.20 was made
# for (bookworm's Go 1.19 builds an apiserver that crashes on custom-resource dry-runs).
# Cached in $WEIR_CACHE/k8s-<version>; does nothing when the binaries are there.
source "$(dirname "$0")/lib.sh"

bins=(kube-apiserver kube-controller-manager kube-scheduler)
have=1
for b in "${bins[@]}"; do [ -x "$K8S_DIR/$b" ] || have=0; done
apt_install etcd-server
[ $have -eq 1 ] && { log "kubernetes $K8S_VERSION: cached in $K8S_DIR"; exit 0; }

apt_install rsync jq dpkg-dev
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
uris=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
uris=${uris:-http://deb.debian.org/debian}
if [ ! -f /etc/apt/sources.list.d/weir-k8s-build.sources ]; then
  log "adding bullseye (Go 1.15) and bookworm deb-src to apt sources"
  $sudo tee /etc/apt/sources.list.d/weir-k8s-build.sources >/dev/null <<SRC
Types: deb
URIs: $uris
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: $uris
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  # bullseye must never win over bookworm for anything but the packages we ask for
  $sudo tee /etc/apt/preferences.d/weir-k8s-build >/dev/null <<PREF
Package: *
Pin: release n=bullseye
Pin-Priority: 100
PREF
  $sudo apt-get update -qq
fi
[ -x /usr/lib/go-1.15/bin/go ] || DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq golang-1.15-go >/dev/null

build=$WEIR_CACHE/k8s-build
rm -rf "$build"; mkdir -p "$build"; cd "$build"
log "downloading Debian's kubernetes source package"
apt-get source --download-only kubernetes >/dev/null
orig=$(ls kubernetes_*.orig.tar.* | head -n1)
mkdir src && tar -xf "$orig" -C src --strip-components=1
cd src
mkdir -p .go/src/k8s.io && ln -s ../../.. .go/src/k8s.io/kubernetes
log "building ${bins[*]} with Go 1.15 (several minutes)"
PATH=/usr/lib/go-1.15/bin:$PATH GOPATH=$PWD/.go CGO_ENABLED=0 \
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >"$build/make.log" 2>&1 || {
  tail -n 40 "$build/make.log" >&2; exit 1; }
mkdir -p "$K8S_DIR.tmp"
for b in "${bins[@]}"; do
  f=$(find _output -type f -name "$b" | head -n1)
  [ -s "$f" ] || { log "build produced no $b"; exit 1; }
  cp "$f" "$K8S_DIR.tmp/$b"
done
rm -rf "$K8S_DIR"; mv "$K8S_DIR.tmp" "$K8S_DIR"
cd /; rm -rf "$build"
log "kubernetes $K8S_VERSION built into $K8S_DIR"
