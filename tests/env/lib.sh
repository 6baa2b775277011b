# Shared by the test-environment scripts: where the cache lives, pinned versions, and a
# helper that installs Debian packages only when they are missing.
# shellcheck shell=bash
set -euo pipefail

WEIR_CACHE=${WEIR_CACHE:-$HOME/.cache/weir}
K8S_VERSION=1.20.2
GARAGE_VERSION=2.5.0
HELM_SDK_VERSION=${HELM_SDK_VERSION:-}
K8S_DIR=$WEIR_CACHE/k8s-$K8S_VERSION
GARAGE_DIR=$WEIR_CACHE/garage-$GARAGE_VERSION
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
