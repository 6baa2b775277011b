#!/usr/bin/env bash
# Savepoint and rescale figures, against the real S3 server (Garage, started for this run):
#  1. Weir (runtime/examples/savepoint_bench.rs): SIZE MiB of keyed state at parallelism 4
#     saved to S3, restored at 3 and at 2, the state at 2 saved again and restored at 4; the
#     savepoint and restore times, the bytes the worst new subtask read against its share, and
#     the restore's read rate against the server's raw GET rate at as many readers;
#  2. Flink 2.3, the peer (bench/flink_savepoint.py): the same rescales with stop-with-savepoint
#     and a restore at the new parallelism, savepoints and checkpoints on the same S3 server
#     through Flink's own S3 file system (the flink-s3-fs-hadoop plugin that
#     tests/env/install-flink.sh installs); with FLINK_LOCAL=1 also on the local file system.
# Usage: bench/savepoints.sh [SIZE_MIB]
# WEIR=0 runs the Flink part alone (no cargo build; with WEIR_BENCH_BUCKET, nothing is built);
# FLINK_ARGS adds options of bench/flink_savepoint.py (e.g. "--pairs 4:2 --keep").
# With WEIR_BENCH_BUCKET set, both run against an S3 server of your own instead of the test
# environment's Garage: a bucket there, and AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY and AWS_REGION in the environment (Garage on the bench's own cores
# caps what any engine can show; see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-1024}
target=${CARGO_TARGET_DIR:-$PWD/target}
if [ -n "${WEIR_BENCH_BUCKET:-}" ]; then
  for v in AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION; do
    [ -n "${!v:-}" ] || { echo "WEIR_BENCH_BUCKET is set: $v must be set too" >&2; exit 2; }
  done
fi
weir=${WEIR:-1}
[ "$weir" = 0 ] || cargo build -q --release -p weir-runtime --example savepoint_bench
venv=$(bash tests/env/install-flink.sh)
tmp=$(mktemp -d)
if [ -n "${WEIR_BENCH_BUCKET:-}" ]; then
  export WEIR_TEST_BUCKET=$WEIR_BENCH_BUCKET
  trap 'rm -rf "$tmp"' EXIT
else
  # The test environment's node agent (WEIR_BIN_DIR: one built already, as up.sh takes).
  [ -x "${WEIR_BIN_DIR:-/nonexistent}/weir-node" ] || cargo build -q -p weir-e2e --bin weir-node
  bash tests/env/up.sh "$tmp/env" >"$tmp/env-up.log" 2>&1 || { cat "$tmp/env-up.log"; exit 1; }
  trap 'bash tests/env/down.sh "$tmp/env" >/dev/null 2>&1; rm -rf "$tmp"' EXIT
  # shellcheck disable=SC1091
  source "$tmp/env/env.sh"
fi

if [ "$weir" != 0 ]; then
  echo "== weir: savepoint and restore of $mib MiB of keyed state (S3: $AWS_ENDPOINT_URL)"
  "$target/release/examples/savepoint_bench" "s3://$WEIR_TEST_BUCKET/bench-$$" "$mib"
fi

# One line per rescale from the peer's JSON file $1 (its docstring says what each figure covers).
flink_table() {
  "$venv/bin/python" - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"savepoints on {r['savepoint_storage']}, {r['savepoint_bytes'] / 2**20:.0f} MiB")
print(f"{'rescale':<8} {'savepoint':>10} {'restore':>10} {'state init':>11} {'from SQL call':>14}")
for x in r["runs"]:
    print(f"{x['from']}->{x['to']:<5} {x['savepoint_seconds']:>9.2f}s {x['restore_seconds']:>9.2f}s "
          f"{x['state_init_seconds']:>10.2f}s {x['restore_wall_seconds']:>13.2f}s")
print(json.dumps(r))
PY
}
storages=s3
[ "${FLINK_LOCAL:-0}" = 1 ] && storages="s3 local"
for storage in $storages; do
  echo "== flink $mib MiB: stop-with-savepoint and restore at the new parallelism ($storage)"
  # shellcheck disable=SC2086 # FLINK_ARGS: more options of flink_savepoint.py, word-split
  "$venv/bin/python" bench/flink_savepoint.py --state-bytes "${mib}m" --storage "$storage" ${FLINK_ARGS:-} \
    2>"$tmp/flink-$storage.log" >"$tmp/flink-$storage.json" \
    || { tail -30 "$tmp/flink-$storage.log"; exit 1; }
  flink_table "$tmp/flink-$storage.json"
done
