#!/usr/bin/env bash
# Keyed count throughput: Weir and Flink 2.3 on the same workload, in one invocation.
# R records with K distinct keys drawn uniformly, counted by key (every update emits the new
# count), into a blackhole; at parallelism 1 and 2, with each engine's two state backends:
# Weir's rocksdb and heap (spec.stateBackend), Flink's rocksdb and hashmap. Prints events/s of
# each and the ratios of the like backends (heap against hashmap, RocksDB against RocksDB).
# Usage: bench/keyed_count.sh [RECORDS] [KEYS]
set -euo pipefail
cd "$(dirname "$0")/.."
records=${1:-10000000}
keys=${2:-1000000}
target=${CARGO_TARGET_DIR:-$PWD/target}
cargo build -q --release -p weir-runtime --bin weir
weir=$target/release/weir
venv=$(bash tests/env/install-flink.sh)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

now() { date +%s.%N; }
printf '%-6s %-8s %-11s %12s %10s %14s\n' engine backend parallelism records seconds events/s
for p in 1 2; do
  cat > "$tmp/job.yaml" <<YAML
apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {name: keyed-count-bench}
spec:
  parallelism: $p
  pipeline:
    operators:
      - {uid: events, type: generator, format: kv, seed: 1, count: $records, keys: $keys, splits: $p}
      - {uid: counts, type: count, inputs: [events], key: key}
      - {uid: out, type: blackhole, inputs: [counts]}
YAML
  for pair in rocksdb:rocksdb heap:hashmap; do
    backend=${pair%%:*}; flink_backend=${pair##*:}
    t0=$(now)
    "$weir" run "$tmp/job.yaml" --state-dir "$tmp/state" --state-backend "$backend" 2>"$tmp/weir.log" || { cat "$tmp/weir.log"; exit 1; }
    t1=$(now)
    rm -rf "$tmp/state"
    grep -q "counts $records in / $records out" "$tmp/weir.log" || { echo "weir did not count every record:"; cat "$tmp/weir.log"; exit 1; }
    weir_eps=$(python3 -c "print(round($records / ($t1 - $t0)))")
    printf '%-6s %-8s %-11s %12s %10.2f %14s\n' weir "$backend" "$p" "$records" "$(python3 -c "print($t1 - $t0)")" "$weir_eps"
    flink=$("$venv/bin/python" bench/flink_keyed_count.py --parallelism "$p" --keys "$keys" --records "$records" --state-backend "$flink_backend" 2>"$tmp/flink.log") \
      || { tail -20 "$tmp/flink.log"; exit 1; }
    flink_eps=$(python3 -c "import json,sys; print(round(json.loads(sys.argv[1])['events_per_second']))" "$flink")
    flink_s=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['seconds'])" "$flink")
    printf '%-6s %-8s %-11s %12s %10.2f %14s\n' flink "$flink_backend" "$p" "$records" "$flink_s" "$flink_eps"
    printf 'ratio at parallelism %s: weir %s / flink %s = %.1fx\n' "$p" "$backend" "$flink_backend" "$(python3 -c "print($weir_eps / $flink_eps)")"
  done
done
