#!/usr/bin/env bash
# Savepoint and rescale figures, against the real S3 server (Garage, started for this run):
#  1. Weir (runtime/examples/savepoint_bench.rs): SIZE MiB of keyed state at parallelism 4
#     saved to S3, restored at 3 and at 2, the state at 2 saved again and restored at 4; the
#     savepoint and restore times, the bytes the worst new subtask read against its share, and
#     the restore's read rate against the server's raw GET rate at as many readers;
#  2. Flink 2.3, the peer (bench/flink_savepoint.py): the same rescales with stop-with-savepoint
#     and a restore at the new parallelism, savepoints on the local file system.
# Usage: bench/savepoints.sh [SIZE_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-1024}
target=${CARGO_TARGET_DIR:-$PWD/target}
cargo build -q --release -p weir-runtime --example savepoint_bench
cargo build -q -p weir-e2e --bin weir-node # the test environment's node agent
venv=$(bash tests/env/install-flink.sh)
tmp=$(mktemp -d)
bash tests/env/up.sh "$tmp/env" >"$tmp/env-up.log" 2>&1 || { cat "$tmp/env-up.log"; exit 1; }
trap 'bash tests/env/down.sh "$tmp/env" >/dev/null 2>&1; rm -rf "$tmp"' EXIT
# shellcheck disable=SC1091
source "$tmp/env/env.sh"

echo "== weir: savepoint and restore of $mib MiB of keyed state (S3: $AWS_ENDPOINT_URL)"
"$target/release/examples/savepoint_bench" "s3://$WEIR_TEST_BUCKET/bench-$$" "$mib"

echo "== flink $mib MiB: stop-with-savepoint and restore at the new parallelism (local disk)"
if [ -f bench/flink_savepoint.py ]; then
  "$venv/bin/python" bench/flink_savepoint.py --state-bytes "${mib}m" 2>"$tmp/flink.log" \
    || { tail -30 "$tmp/flink.log"; exit 1; }
fi
