#!/usr/bin/env bash
# Smoke test of the peer's Kafka connector (flink-connector-kafka in PyFlink 2.3, from
# tests/env/install-flink.sh) against a real Kafka cluster: bench/flink_kafka_check.py
#  1. Flink writes N records into a topic of its own and reads them back (streaming into a
#     blackhole, and a batch count);
#  2. Flink reads a topic that Kafka's console producer wrote (tests/env/kafka.sh produce):
#     N JSON records {"id": i, "payload": ...}.
# The cluster: the one of $WEIR_TEST_KAFKA if set (step 2 then also needs WEIR_KAFKA_HOME and
# WEIR_KAFKA_DIR, as kafka.env exports them, or it is skipped), else a three-broker cluster that
# tests/env/kafka-up.sh starts for the run (and kafka-down.sh stops).
# Usage: bench/flink_kafka_check.sh [N]   (default 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
venv=$(bash tests/env/install-flink.sh)
tmp=$(mktemp -d)
if [ -z "${WEIR_TEST_KAFKA:-}" ]; then
  trap 'bash tests/env/kafka-down.sh "$tmp/kafka" >/dev/null 2>&1; rm -rf "$tmp"' EXIT
  bash tests/env/kafka-up.sh "$tmp/kafka" >"$tmp/kafka-up.log" 2>&1 || { cat "$tmp/kafka-up.log"; exit 1; }
  # shellcheck disable=SC1091
  source "$tmp/kafka/kafka.env"
else
  trap 'rm -rf "$tmp"' EXIT
fi
echo "== flink: write $n records into a new topic and read them back (Kafka: $WEIR_TEST_KAFKA)"
"$venv/bin/python" bench/flink_kafka_check.py --records "$n" 2>"$tmp/write.log" \
  || { tail -40 "$tmp/write.log"; exit 1; }
grep '\[flink-kafka-check' "$tmp/write.log"

if [ -n "${WEIR_KAFKA_HOME:-}" ] && [ -n "${WEIR_KAFKA_DIR:-}" ]; then
  topic=flink-kafka-check-console-$$
  echo "== flink: read $n records that Kafka's console producer wrote into $topic"
  bash tests/env/kafka.sh create-topic "$topic" 3
  python3 -c 'import sys
for i in range(int(sys.argv[1])): print("{\"id\": %d, \"payload\": \"record %d\"}" % (i, i))' "$n" |
    bash tests/env/kafka.sh produce "$topic"
  "$venv/bin/python" bench/flink_kafka_check.py --topic "$topic" --existing "$n" 2>"$tmp/read.log" \
    || { tail -40 "$tmp/read.log"; exit 1; }
  grep '\[flink-kafka-check' "$tmp/read.log"
else
  echo "== skipped reading a console producer's topic: WEIR_KAFKA_HOME and WEIR_KAFKA_DIR are not set"
fi
