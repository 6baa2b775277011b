#!/usr/bin/env bash
# Checkpoint figures, against the real S3 server (Garage, started for this run):
#  1. the server's raw PUT bandwidth, and the duration of full and incremental (5% of the keys
#     changed) checkpoints of 100 MiB and 1 GiB of keyed state (runtime/examples/checkpoint_bench.rs);
#  2. keyed-count throughput (R records, K keys, parallelism 2, into a blackhole) with
#     checkpoints every 10 s and every 1 s, against none, for each state backend (Weir's rocksdb
#     and heap, Flink's rocksdb and hashmap): Weir checkpointing to S3, Flink 2.3 (the peer)
#     checkpointing (incrementally with RocksDB, in full with hashmap) to the same S3 server
#     through its own S3
#     file system (the flink-s3-fs-hadoop plugin of tests/env/install-flink.sh), in the same
#     run. FLINK_CHECKPOINTS=local puts Flink's checkpoints on the local file system instead.
# Usage: bench/checkpoints.sh [RECORDS] [KEYS]
set -euo pipefail
cd "$(dirname "$0")/.."
records=${1:-10000000}
keys=${2:-1000000}
target=${CARGO_TARGET_DIR:-$PWD/target}
cargo build -q --release -p weir-runtime --bin weir --example checkpoint_bench
cargo build -q -p weir-e2e --bin weir-node # the test environment's node agent
venv=$(bash tests/env/install-flink.sh)
tmp=$(mktemp -d)
bash tests/env/up.sh "$tmp/env" >"$tmp/env-up.log" 2>&1 || { cat "$tmp/env-up.log"; exit 1; }
trap 'bash tests/env/down.sh "$tmp/env" >/dev/null 2>&1; rm -rf "$tmp"' EXIT
# shellcheck disable=SC1091
source "$tmp/env/env.sh"

echo "== checkpoint duration (S3: $AWS_ENDPOINT_URL)"
"$target/release/examples/checkpoint_bench" "s3://$WEIR_TEST_BUCKET/bench-$$" 100 1024

echo "== keyed count with checkpoints ($records records, $keys keys, parallelism 2)"
now() { date +%s.%N; }
printf '%-6s %-8s %-10s %10s %14s %12s\n' engine backend interval seconds events/s checkpoints
for pair in rocksdb:rocksdb heap:hashmap; do
backend=${pair%%:*}; flink_backend=${pair##*:}
base_weir=""; base_flink=""
for interval in 0s 10s 1s; do
  cat > "$tmp/job.yaml" <<YAML
apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {name: checkpoint-bench}
spec:
  parallelism: 2
  checkpointing: {interval: $interval, storage: s3://$WEIR_TEST_BUCKET/bench-$$-chk}
  pipeline:
    operators:
      - {uid: events, type: generator, format: kv, seed: 1, count: $records, keys: $keys, splits: 2}
      - {uid: counts, type: count, inputs: [events], key: key}
      - {uid: out, type: blackhole, inputs: [counts]}
YAML
  t0=$(now)
  "$target/release/weir" run "$tmp/job.yaml" --state-dir "$tmp/state" --state-backend "$backend" --api-addr 127.0.0.1:0 2>"$tmp/weir.log" &
  pid=$!
  # The number of completed checkpoints, read from the API just before the job ends.
  api=""; done_ck=0
  while kill -0 $pid 2>/dev/null; do
    [ -n "$api" ] || api=$(sed -n 's/.*HTTP API on \(http:[^ ]*\).*/\1/p' "$tmp/weir.log" | head -1)
    if [ -n "$api" ]; then
      c=$(curl -s "$api/v1/checkpoints" | python3 -c 'import json,sys; print(json.load(sys.stdin)["completed"])' 2>/dev/null || true)
      [ -n "$c" ] && done_ck=$c
    fi
    sleep 0.2
  done
  wait $pid || { cat "$tmp/weir.log"; exit 1; }
  t1=$(now)
  grep -q "counts $records in / $records out" "$tmp/weir.log" || { echo "weir did not count every record:"; cat "$tmp/weir.log"; exit 1; }
  eps=$(python3 -c "print(round($records / ($t1 - $t0)))")
  [ -n "$base_weir" ] || base_weir=$eps
  printf '%-6s %-8s %-10s %10.2f %14s %12s  (%.0f%% of none)\n' weir "$backend" "$interval" "$(python3 -c "print($t1 - $t0)")" "$eps" "$done_ck" "$(python3 -c "print(100 * $eps / $base_weir)")"
  rm -rf "$tmp/state"
  flink_args=(--parallelism 2 --keys "$keys" --records "$records" --state-backend "$flink_backend")
  [ "$interval" = 0s ] || flink_args+=(--checkpoint-interval "$interval" --checkpoint-storage "${FLINK_CHECKPOINTS:-s3}")
  flink=$("$venv/bin/python" bench/flink_keyed_count.py "${flink_args[@]}" 2>"$tmp/flink.log") || { tail -20 "$tmp/flink.log"; exit 1; }
  feps=$(python3 -c "import json,sys; print(round(json.loads(sys.argv[1])['events_per_second']))" "$flink")
  fs=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['seconds'])" "$flink")
  [ -n "$base_flink" ] || base_flink=$feps
  printf '%-6s %-8s %-10s %10.2f %14s %12s  (%.0f%% of none)\n' flink "$flink_backend" "$interval" "$fs" "$feps" "-" "$(python3 -c "print(100 * $feps / $base_flink)")"
done
done
