#!/usr/bin/env bash
# Controller figures, against the local kube-apiserver of the test environment (started for
# this run): N suspended StreamJobs are created; the controller (release build) reconciles
# them all once; it is then killed and started again, and the time until the new process has
# reconciled every job (its reconciles_total metric reaches N) is measured, with its memory
# (resident set, and its peak) at that point. Targets (issue 6): 10 s or less, 50 MiB or less.
# Usage: bench/controller.sh [JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${1:-1000}
target=${CARGO_TARGET_DIR:-$PWD/target}
cargo build -q --release -p weir-controller
cargo build -q -p weir-e2e --bin weir-node # the test environment's node agent
tmp=$(mktemp -d)
bash tests/env/up.sh "$tmp/env" >"$tmp/env-up.log" 2>&1 || { cat "$tmp/env-up.log"; exit 1; }
ctl_pid=""
trap '[ -n "$ctl_pid" ] && kill "$ctl_pid" 2>/dev/null; bash tests/env/down.sh "$tmp/env" >/dev/null 2>&1; rm -rf "$tmp"' EXIT
# shellcheck disable=SC1091
source "$tmp/env/env.sh"
kubectl apply --server-side -f crds/weir-crds.yaml >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd/streamjobs.weir.dev >/dev/null
kubectl create namespace bench >/dev/null

python3 - "$jobs" > "$tmp/jobs.yaml" <<'PY'
import sys
for i in range(int(sys.argv[1])):
    print(f"""---
apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: job-{i:04d}, namespace: bench}}
spec:
  state: suspended
  parallelism: {1 + i % 4}
  checkpointing: {{storage: s3://bench/checkpoints}}
  pipeline:
    operators:
      - {{uid: src, type: generator, keys: 1000}}
      - {{uid: counts, type: count, inputs: [src], key: line}}
      - {{uid: out, type: blackhole, inputs: [counts]}}""")
PY
t0=$(date +%s.%N)
kubectl apply --server-side -f "$tmp/jobs.yaml" >/dev/null
echo "created $jobs suspended StreamJobs in $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start_controller() {
  WEIR_LOG=warn "$target/release/weir-controller" --namespace bench --metrics-addr "127.0.0.1:$port" \
    >"$tmp/controller.log" 2>&1 &
  ctl_pid=$!
}
reconciled() { # reconciles_total of the running controller (0 until it answers)
  curl -s "http://127.0.0.1:$port/metrics" 2>/dev/null | awk '/^weir_controller_reconciles_total /{print $2}' | grep . || echo 0
}
wait_reconciled() { # wait_reconciled N: seconds until reconciles_total >= N
  local t0; t0=$(date +%s.%N)
  while [ "$(reconciled)" -lt "$1" ]; do
    kill -0 "$ctl_pid" 2>/dev/null || { cat "$tmp/controller.log"; exit 1; }
    sleep 0.05
  done
  python3 -c "print(round($(date +%s.%N) - $t0, 2))"
}

start_controller
first=$(wait_reconciled "$jobs")
suspended=$(kubectl get sj -n bench -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c Suspended || true)
echo "first start: $jobs jobs reconciled in $first s; $suspended with phase Suspended"
kill "$ctl_pid"; wait "$ctl_pid" 2>/dev/null || true

start_controller
again=$(wait_reconciled "$jobs")
rss=$(awk '/^VmRSS/{print $2}' "/proc/$ctl_pid/status")
hwm=$(awk '/^VmHWM/{print $2}' "/proc/$ctl_pid/status")
echo "after a restart: $jobs jobs reconciled in $again s (target: 10 s or less)"
echo "controller memory: RSS $((rss / 1024)) MiB, peak $((hwm / 1024)) MiB (target: 50 MiB or less)"
