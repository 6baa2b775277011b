# Shared by the test-environment scripts: where the cache lives, pinned versions, and a
# helper that installs Debian packages only when they are missing.
# shellcheck shell=bash
set -euo pipefail

WEIR_CACHE=${WEIR_CACHE:-$HOME/.cache/weir}
# The Kubernetes minor the environment runs (K8S_VERSION=1.34 make e2e runs another one); its
# patch is the one its wrapper module under tests/env/k8s pins.
K8S_VERSION=${K8S_VERSION:-1.37}
K8S_MODULE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/k8s/v$K8S_VERSION
# go_mod_version GO_MOD MODULE: the version of MODULE that GO_MOD requires.
go_mod_version() {
  awk -v m="$2" '{ for (i = 1; i < NF; i++) if ($i == m && $(i + 1) ~ /^v[0-9]/) { print $(i + 1); exit } }' "$1" 2>/dev/null
}
K8S_PATCH=$(go_mod_version "$K8S_MODULE/go.mod" k8s.io/kubernetes)
ETCD_VERSION=$(go_mod_version "$(dirname "${BASH_SOURCE[0]}")/etcd/go.mod" go.etcd.io/etcd/server/v3)
GARAGE_VERSION=2.5.0
HELM_SDK_VERSION=${HELM_SDK_VERSION:-}
K8S_DIR=$WEIR_CACHE/k8s-${K8S_PATCH:-$K8S_VERSION}
ETCD_DIR=$WEIR_CACHE/etcd-$ETCD_VERSION
GARAGE_FEATURES=bundled-libs,sqlite
GARAGE_DIR=$WEIR_CACHE/garage-$GARAGE_VERSION-${GARAGE_FEATURES//,/-}
mkdir -p "$WEIR_CACHE"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# apt_install PKG...: installs the packages that are not installed yet (runs apt-get update
# once per call when something is missing).
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}
