#!/usr/bin/env bash
# Upgrade downtime of a rescale driven by the controller, against the test environment
# (real kube-apiserver, controller-manager and scheduler, the weir-node agent running pods as
# processes, Garage as S3; started for this run), with release builds of `weir` (the pods'
# image) and `weir-controller`. For each SIZE (MiB of keyed state, default 100 and 1024):
# a StreamJob at parallelism 2 builds the state and writes to S3 through the files sink,
# committing on every checkpoint (1 s); `kubectl scale --replicas 3` rescales it with a
# savepoint; the downtime is the time from the last part committed by the old job to the first
# committed by the new one, printed with its breakdown and against the time to move the
# savepoint at the S3 server's raw PUT and GET rates measured in the same run
# (bench/upgrade_downtime.py says exactly what is measured). Target: no more than 10 s beyond
# that transfer time.
# Then Flink 2.3's stop-with-savepoint and restore at 2 -> 3 of the same size, on the same S3
# server (bench/flink_savepoint.py), unless FLINK=0.
# Usage: bench/upgrades.sh [SIZE_MIB...]
# TMPDIR decides where the environment (Garage's data too) lives, WEIR_NODE_ROOT where the
# pods' volumes (RocksDB) go (default /var/tmp, see tests/env/up.sh). With little disk, both on
# a tmpfs: TMPDIR=/dev/shm/bench WEIR_NODE_ROOT=/dev/shm/bench (about 6 times SIZE of memory).
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(100 1024)
target=${CARGO_TARGET_DIR:-$PWD/target}
cargo build -q --release -p weir-runtime --bin weir
cargo build -q --release -p weir-controller
# The node agent: one built already (WEIR_BIN_DIR, as tests/env/up.sh takes it), else a debug build.
node_bin=${WEIR_BIN_DIR:-$target/debug}/weir-node
[ -x "$node_bin" ] || { cargo build -q -p weir-e2e --bin weir-node; node_bin=$target/debug/weir-node; }
tmp=$(mktemp -d)
# The node agent maps an image to the binary of its name in WEIR_BIN_DIR: the release builds.
mkdir "$tmp/bin"
ln -s "$target/release/weir" "$target/release/weir-controller" "$node_bin" "$tmp/bin/"
# A node name of its own: it tags the node agent's block of /etc/hosts, which another test
# environment running at the same time would otherwise overwrite (and remove when it stops).
WEIR_NODE_NAME=weir-node-upgrades-$$ WEIR_BIN_DIR=$tmp/bin bash tests/env/up.sh "$tmp/env" >"$tmp/env-up.log" 2>&1 || { cat "$tmp/env-up.log"; exit 1; }
# Down, and the node's directory (the pods' volumes: GBs of RocksDB, in memory on a tmpfs) too.
trap 'node=$(readlink "$tmp/env/node"); bash tests/env/down.sh "$tmp/env" >/dev/null 2>&1; rm -rf "$tmp" "$node"' EXIT
# shellcheck disable=SC1091
source "$tmp/env/env.sh"
kubectl apply --server-side -f crds/weir-crds.yaml >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd/streamjobs.weir.dev crd/streamsnapshots.weir.dev >/dev/null

results=()
for mib in "${sizes[@]}"; do
  echo "== weir: rescale 2 -> 3 under the controller, $mib MiB of keyed state (S3: $AWS_ENDPOINT_URL)"
  "$WEIR_PYTHON" bench/upgrade_downtime.py --mib "$mib" --controller "$tmp/bin/weir-controller" \
    --work "$tmp" | tee "$tmp/weir-$mib.out"
  results+=("$(grep '^RESULT ' "$tmp/weir-$mib.out" | cut -c8-)")
done

if [ "${FLINK:-1}" != 0 ]; then
  venv=$(bash tests/env/install-flink.sh)
  for mib in "${sizes[@]}"; do
    echo "== flink $mib MiB: stop-with-savepoint at 2, restore at 3 (S3, through Flink's S3 plugin)"
    "$venv/bin/python" bench/flink_savepoint.py --state-bytes "${mib}m" --pairs 2:3 --storage s3 \
      2>"$tmp/flink-$mib.log" >"$tmp/flink-$mib.json" || { tail -30 "$tmp/flink-$mib.log"; exit 1; }
    "$venv/bin/python" - "$tmp/flink-$mib.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
x = r["runs"][0]
print(f"flink {x['from']}->{x['to']}, savepoint {r['savepoint_bytes'] / 2**20:.0f} MiB: "
      f"stop-with-savepoint {x['savepoint_seconds']:.2f} s, restore {x['restore_seconds']:.2f} s "
      f"(state init {x['state_init_seconds']:.2f} s, from the SQL call {x['restore_wall_seconds']:.2f} s); "
      f"sum {x['savepoint_seconds'] + x['restore_seconds']:.2f} s")
print(json.dumps(r))
PY
  done
fi

echo "== summary: upgrade downtime of a rescale 2 -> 3 (target: downtime - transfer <= 10 s)"
printf '%s\n' "${results[@]}" > "$tmp/results.jsonl"
"$WEIR_PYTHON" - "$tmp/results.jsonl" <<'PY'
import json, sys
print(f"{'state':>8} {'savepoint':>10} {'sp time':>10} {'restore':>8} {'1st ckpt':>9} "
      f"{'transfer':>9} {'downtime':>9} {'beyond':>8} {'target':>7} {'stall':>8} {'beyond':>8}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    rs = max(r["restore_s"].values(), default=float("nan"))
    ck = (r["first_checkpoint"] or {}).get("durationMs", float("nan")) / 1000
    print(f"{r['mib']:>5}MiB {r['savepoint_bytes'] / 2**20:>7.0f}MiB {r['savepoint_s']:>9.2f}s "
          f"{rs:>7.2f}s {ck:>8.2f}s {r['transfer_s']:>8.2f}s {r['downtime_s']:>8.2f}s "
          f"{r['beyond_transfer_s']:>7.2f}s {'met' if r['beyond_transfer_s'] <= 10 else 'missed':>7} "
          f"{r['stall_s']:>7.2f}s {r['stall_s'] - r['transfer_s']:>7.2f}s")
print("(downtime: last part committed by the old job to the first by the new; stall: from the "
      "stop-with-savepoint request to the first part committed by the new job)")
PY
