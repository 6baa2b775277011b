#!/usr/bin/env bash
# Stops the Kafka brokers that tests/env/kafka-up.sh started in DIR (TERM, then KILL after a
# grace period) and removes their pid files and DIR/kafka.env; leaves no broker behind.
# Nothing to stop is fine. The data and logs stay (kafka-up.sh starts afresh).
# Usage: tests/env/kafka-down.sh DIR
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: tests/env/kafka-down.sh DIR" >&2; exit 2; }
dir=$1
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
alive() { kill -0 "$1" 2>/dev/null; }
rm -f "$dir/kafka.env"
shopt -s nullglob
pids=()
# TERM them all at once (each one's session), then wait for all: a controlled shutdown of
# the last brokers of a cluster gives up after a few seconds when no controller answers.
for f in "$dir"/pids/kafka-*.pid; do
  pid=$(cat "$f" 2>/dev/null) || continue
  [[ $pid =~ ^[0-9]+$ ]] || { rm -f "$f"; continue; }
  if alive "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    pids+=("$pid")
  fi
done
grace=${WEIR_KAFKA_STOP_GRACE:-30}
for _ in $(seq 1 $((grace * 5))); do
  left=0
  for pid in "${pids[@]}"; do alive "$pid" && left=1; done
  [ $left = 0 ] && break
  sleep 0.2
done
for pid in "${pids[@]}"; do
  if alive "$pid"; then
    log "kafka: pid $pid did not stop within $grace s: KILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
  fi
done
for pid in "${pids[@]}"; do
  for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
done
rm -f "$dir"/pids/kafka-*.pid
[ ${#pids[@]} -eq 0 ] || log "kafka: ${#pids[@]} broker(s) stopped"
exit 0
