#!/usr/bin/env bash
# Drives the Kafka cluster that tests/env/kafka-up.sh started, with Kafka's own tools from its
# jars (java -cp "$WEIR_KAFKA_HOME/libs/*" org.apache.kafka.tools...).
#
# Usage: tests/env/kafka.sh COMMAND [ARG...]
#   create-topic NAME PARTITIONS [RF]   a topic (RF defaults to 3)
#   produce TOPIC                       each line of stdin is a record's value (acks=all, idempotent)
#   consume TOPIC COUNT                 prints COUNT values, read_committed, from the beginning
#                                       (fails if they do not come within $WEIR_KAFKA_CONSUME_TIMEOUT_MS,
#                                       default 60000)
#   stop-broker ID [--kill]             TERM (a controlled shutdown; KILL after 60 s), or KILL at once
#   start-broker ID                     starts it again with the same config and data, and waits
#                                       until it is back among the live brokers
#   brokers                             the live (registered, unfenced) broker ids, one a line
#   quorum                              the KRaft quorum's status (leader, voters, epochs)
#
# The cluster is the one in $WEIR_KAFKA_DIR with the brokers $WEIR_TEST_KAFKA, as kafka.env
# exports them: taken from the environment when set, or else sourced from $WEIR_KAFKA_ENV, or
# $WEIR_TESTENV_DIR/kafka.env, or target/testenv/kafka.env.
# Also: WEIR_KAFKA_JAVA_OPTS (more JVM options for the brokers; kafka-up.sh records them in
# kafka.env), WEIR_KAFKA_START_TIMEOUT (seconds a broker may take to start, default 120).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "kafka.sh: $*"; exit 1; }

if [ -z "${WEIR_TEST_KAFKA:-}" ] || [ -z "${WEIR_KAFKA_DIR:-}" ] || [ -z "${WEIR_KAFKA_HOME:-}" ]; then
  env_file=${WEIR_KAFKA_ENV:-${WEIR_TESTENV_DIR:-$root/target/testenv}/kafka.env}
  [ -f "$env_file" ] || die "no Kafka settings: WEIR_TEST_KAFKA, WEIR_KAFKA_DIR and WEIR_KAFKA_HOME are not all set and $env_file does not exist (run tests/env/kafka-up.sh DIR, then source DIR/kafka.env)"
  # shellcheck disable=SC1090
  source "$env_file"
fi
bootstrap=$WEIR_TEST_KAFKA
state=$WEIR_KAFKA_DIR/kafka
libs=$WEIR_KAFKA_HOME/libs
[ -d "$libs" ] || die "$libs does not exist (tests/env/install-kafka.sh installs it)"

# Every JVM here: the class-data-sharing archive install-kafka.sh made (when it could: the
# classes of Kafka and its tools, loaded and verified once) and the client compiler only (no
# C2 compiles competing for the 2 cores). With both a broker starts on about a third of the
# CPU time and in half the time, a tool in half; the brokers' steady speed is not what tests
# need. A broker's command line ends with $WEIR_KAFKA_JAVA_OPTS: -XX:TieredStopAtLevel=4
# there brings C2 back (for a benchmark), -Xmx1g gives a larger heap.
jvm=(-XX:TieredStopAtLevel=1 '-Xlog:cds*=off')
[ -f "$WEIR_KAFKA_HOME/kafka.jsa" ] && jvm+=(-XX:SharedArchiveFile="$WEIR_KAFKA_HOME/kafka.jsa")
# A tool is a short-lived JVM: a small serial heap; its log (warnings and errors) goes to stderr.
tool() {
  java "${jvm[@]}" -Xmx256m -XX:+UseSerialGC \
    -Dlog4j2.configurationFile="$state/tools-log4j2.properties" -cp "$libs/*" "$@"
}

pid_file() { echo "$WEIR_KAFKA_DIR/pids/kafka-$1.pid"; }
log_file() { echo "$WEIR_KAFKA_DIR/logs/kafka-$1.log"; }
alive() { kill -0 "$1" 2>/dev/null; }
check_id() {
  [[ $1 =~ ^[0-9]+$ ]] && [ -f "$state/$1/server.properties" ] && return 0
  local known=() f
  for f in "$state"/*/server.properties; do [ -f "$f" ] && known+=("$(basename "$(dirname "$f")")"); done
  die "no broker $1 in $state (brokers: ${known[*]:-none})"
}
running_pid() { # running_pid ID: the broker's pid if it runs
  local f; f=$(pid_file "$1")
  [ -f "$f" ] && alive "$(cat "$f")" && cat "$f"
}

# spawn ID: starts broker ID in its own session (pid in pids/kafka-ID.pid, output appended to
# logs/kafka-ID.log), without waiting.
spawn() {
  local id=$1 logf; logf=$(log_file "$id")
  if running_pid "$id" >/dev/null; then die "broker $id already runs (pid $(running_pid "$id"))"; fi
  mkdir -p "$WEIR_KAFKA_DIR/pids" "$WEIR_KAFKA_DIR/logs"
  echo "=== $(date '+%F %T') starting broker $id" >> "$logf"
  # The broker's settings are Kafka's own (kafka-server-start.sh's) but a small heap (machines
  # are shared and three of them run) and the JIT above.
  # shellcheck disable=SC2086
  setsid java "${jvm[@]}" -Xms128m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$state/log4j2.properties" -Dkafka.logs.dir="$WEIR_KAFKA_DIR/logs" \
    ${WEIR_KAFKA_JAVA_OPTS:-} -cp "$libs/*" kafka.Kafka "$state/$id/server.properties" >> "$logf" 2>&1 < /dev/null &
  echo $! > "$(pid_file "$id")"
}

# wait_started ID SECONDS SKIP: waits for "Kafka Server started" in the log past line SKIP;
# fails with the log's tail if the broker exits or the time runs out.
wait_started() {
  local id=$1 secs=$2 skip=$3 pid logf; logf=$(log_file "$id")
  pid=$(cat "$(pid_file "$id")")
  local deadline=$((SECONDS + secs))
  while :; do
    if tail -n "+$((skip + 1))" "$logf" | grep -q 'Kafka Server started'; then return 0; fi
    if ! alive "$pid"; then
      log "broker $id exited on start; the end of $logf:"; tail -n 40 "$logf" >&2; return 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      log "broker $id did not start within $secs s; the end of $logf:"; tail -n 40 "$logf" >&2; return 1
    fi
    sleep 0.2
  done
}

# The live brokers: Kafka's cluster tool lists the brokers the cluster's metadata has, with
# their state (fenced ones only when asked); a broker that shut down or lost its session is
# fenced.
brokers() {
  local out
  out=$(tool org.apache.kafka.tools.ClusterTool list-endpoints --bootstrap-server "$bootstrap")
  # ID HOST PORT RACK STATE ENDPOINT_TYPE: the ids of the unfenced brokers.
  printf '%s\n' "$out" | awk '
    $1 == "ID" { for (i = 1; i <= NF; i++) { if ($i == "STATE") st = i; if ($i == "ENDPOINT_TYPE") ty = i }; next }
    st && $1 ~ /^[0-9]+$/ && $st == "unfenced" && (!ty || $ty == "broker") { print $1 }' | sort -n
}

# wait_live ID SECONDS: waits until ID is among the live brokers.
wait_live() {
  local id=$1 deadline=$((SECONDS + $2))
  while :; do
    brokers 2>/dev/null | grep -qx "$id" && return 0
    [ $SECONDS -lt $deadline ] || { log "broker $id is not among the live brokers after $2 s"; return 1; }
    sleep 0.5
  done
}

cmd=${1:-}
[ -n "$cmd" ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }
shift
case "$cmd" in
  create-topic)
    [ $# -ge 2 ] || die "usage: create-topic NAME PARTITIONS [RF]"
    tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$bootstrap" --create --topic "$1" \
      --partitions "$2" --replication-factor "${3:-3}" >/dev/null
    log "topic $1: $2 partitions, replication factor ${3:-3}"
    ;;
  produce)
    [ $# -eq 1 ] || die "usage: produce TOPIC < lines"
    tool org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$bootstrap" --topic "$1" \
      --request-required-acks all --command-property enable.idempotence=true \
      --command-property linger.ms=5 >/dev/null
    ;;
  consume)
    [ $# -eq 2 ] || die "usage: consume TOPIC COUNT"
    [[ $2 =~ ^[0-9]+$ ]] || die "consume: COUNT must be a number, not $2"
    # The console consumer exits 0 when its time runs out: the count it reports on stderr
    # tells whether all came.
    errs=$(mktemp); trap 'rm -f "$errs"' EXIT
    tool org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$bootstrap" --topic "$1" \
      --from-beginning --max-messages "$2" --isolation-level read_committed \
      --timeout-ms "${WEIR_KAFKA_CONSUME_TIMEOUT_MS:-60000}" \
      --command-property group.id="kafka-sh-$$-$RANDOM" --command-property enable.auto.commit=false \
      2> "$errs" || { cat "$errs" >&2; die "consume $1 failed"; }
    if ! grep -q "^Processed a total of $2 messages" "$errs"; then
      grep -v 'KIP-848' "$errs" >&2
      die "consume $1: $(grep -o 'Processed a total of [0-9]* messages' "$errs" || echo 'no messages'), not $2, within ${WEIR_KAFKA_CONSUME_TIMEOUT_MS:-60000} ms"
    fi
    ;;
  stop-broker)
    [ $# -ge 1 ] || die "usage: stop-broker ID [--kill]"
    check_id "$1"
    pid=$(running_pid "$1") || { log "broker $1 is not running"; rm -f "$(pid_file "$1")"; exit 0; }
    if [ "${2:-}" = --kill ]; then
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    else
      # TERM: the broker shuts down in a controlled way (hands its leaderships over).
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 300); do alive "$pid" || break; sleep 0.2; done
      if alive "$pid"; then
        log "broker $1 did not stop within 60 s: KILL"; kill -KILL -- "-$pid" 2>/dev/null || true
      fi
    fi
    for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    rm -f "$(pid_file "$1")"
    log "broker $1 stopped"
    ;;
  start-broker)
    [ $# -eq 1 ] || die "usage: start-broker ID"
    check_id "$1"
    started=$SECONDS
    skip=$(wc -l < "$(log_file "$1")" 2>/dev/null || echo 0)
    spawn "$1"
    wait_started "$1" "${WEIR_KAFKA_START_TIMEOUT:-120}" "$skip"
    wait_live "$1" 60
    log "broker $1 is back ($((SECONDS - started)) s)"
    ;;
  format) # for kafka-up.sh: format ID CLUSTER_ID, the broker's storage (once, before its first start)
    [ $# -eq 2 ] || die "usage: format ID CLUSTER_ID"
    check_id "$1"
    tool kafka.tools.StorageTool format --cluster-id "$2" --config "$state/$1/server.properties"
    ;;
  spawn) # for kafka-up.sh: start-broker without waiting
    [ $# -eq 1 ] || die "usage: spawn ID"
    check_id "$1"; spawn "$1"
    ;;
  brokers)
    brokers
    ;;
  quorum)
    tool org.apache.kafka.tools.MetadataQuorumCommand --bootstrap-server "$bootstrap" describe --status
    ;;
  *)
    die "unknown command $cmd (create-topic, produce, consume, stop-broker, start-broker, brokers, quorum)"
    ;;
esac
