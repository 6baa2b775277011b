#!/usr/bin/env bash
# Stops the test environment started by up.sh and leaves no process behind.
# Usage: tests/env/down.sh [TESTENV_DIR]   (default: target/testenv)
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${1:-$root/target/testenv}
[ -d "$dir/pids" ] || exit 0
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
alive() { kill -0 "$1" 2>/dev/null; }
stop() { # stop NAME: TERM its session, KILL after 15 s
  local f=$dir/pids/$1.pid; [ -f "$f" ] || return 0
  local pid; pid=$(cat "$f")
  if alive "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 75); do alive "$pid" || break; sleep 0.2; done
    alive "$pid" && kill -KILL -- "-$pid" 2>/dev/null
  fi
  rm -f "$f"
}
# The node agent first: it stops its pods' processes and removes its hosts block.
stop weir-node
# Whatever a crashed agent left behind.
if [ -f "$dir/node/pids" ]; then
  while read -r pg; do [ -n "$pg" ] && kill -KILL -- "-$pg" 2>/dev/null; done < "$dir/node/pids"
fi
node_name=$(cat "$dir/node-name" 2>/dev/null || echo weir-node)
sed -i "/^# BEGIN weir-node $node_name\$/,/^# END weir-node $node_name\$/d" /etc/hosts 2>/dev/null || true
bash "$(dirname "$0")/kafka-down.sh" "$dir"
for c in kube-scheduler kube-controller-manager kube-apiserver kube-apiserver-norules garage etcd; do stop "$c"; done
rm -rf "$dir/pids" "$dir/env.sh"
log "test environment down"
