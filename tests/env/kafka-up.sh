#!/usr/bin/env bash
# Starts a three-broker Apache Kafka cluster on 127.0.0.1 with free ports: KRaft, each node
# both broker and controller (node ids 1, 2, 3; a static quorum of the three), replication
# factor 3 and min.insync.replicas 2 by default, transactions on, no automatic topic creation.
# Waits until the three brokers are up and registered and the quorum has a leader, then writes
# DIR/kafka.env. Installs (and caches) Kafka first (tests/env/install-kafka.sh).
# Layout: DIR/kafka/<id>/{server.properties,data}, DIR/logs/kafka-<id>.log,
# DIR/pids/kafka-<id>.pid. tests/env/kafka.sh drives the cluster; tests/env/kafka-down.sh
# stops it.
# Usage: tests/env/kafka-up.sh DIR
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
[ $# -eq 1 ] || { log "usage: tests/env/kafka-up.sh DIR"; exit 2; }
dir=$1
if [ -f "$dir/kafka.env" ]; then
  log "a Kafka cluster is already up in $dir: run tests/env/kafka-down.sh $dir first"; exit 1
fi
home=$(bash "$here/install-kafka.sh")
started=$SECONDS
# What a failed start left behind.
bash "$here/kafka-down.sh" "$dir"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
rm -rf "$dir/kafka"
mkdir -p "$dir/kafka" "$dir/pids" "$dir/logs"
ids=(1 2 3)

# Six free ports (a client and a controller port per node) and a cluster id, from one python
# (each start of it counts on a loaded machine). The ports are found as up.sh finds them
# (bind to port 0), all held until all are found, so none comes twice. The id is made as
# Kafka's Uuid.randomUuid makes one: 16 random bytes in base64url without padding, not
# starting with '-'.
read -r -a found < <(python3 -c '
import base64, socket, uuid
socks = [socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1", 0))
ports = [str(s.getsockname()[1]) for s in socks]
while True:
    cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    if not cid.startswith("-"): break
print(" ".join(ports + [cid]))')
[ ${#found[@]} -eq 7 ] || { log "could not find free ports"; exit 1; }
declare -A port ctl
for i in 0 1 2; do port[${ids[$i]}]=${found[$i]}; ctl[${ids[$i]}]=${found[$((i + 3))]}; done
cluster_id=${found[6]}
voters=$(for id in "${ids[@]}"; do printf '%s@127.0.0.1:%s,' "$id" "${ctl[$id]}"; done); voters=${voters%,}
bootstrap=$(for id in "${ids[@]}"; do printf '127.0.0.1:%s,' "${port[$id]}"; done); bootstrap=${bootstrap%,}

# Logging: the brokers' to their stdout (logs/kafka-<id>.log), the tools' warnings to stderr.
cat > "$dir/kafka/log4j2.properties" <<'L4J'
# Log4j's own shutdown hook would stop the logging while the broker is still shutting down.
shutdownHook = disable
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
# Per-partition state changes and request traces: too much for a test log.
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
L4J
cat > "$dir/kafka/tools-log4j2.properties" <<'L4J'
rootLogger.level = WARN
rootLogger.appenderRef.stderr.ref = STDERR
appender.stderr.type = Console
appender.stderr.name = STDERR
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n
L4J

for id in "${ids[@]}"; do
  mkdir -p "$dir/kafka/$id/data"
  cat > "$dir/kafka/$id/server.properties" <<PROPS
# Written by tests/env/kafka-up.sh: broker and controller $id of a test cluster.
node.id=$id
process.roles=broker,controller
listeners=PLAINTEXT://127.0.0.1:${port[$id]},CONTROLLER://127.0.0.1:${ctl[$id]}
advertised.listeners=PLAINTEXT://127.0.0.1:${port[$id]}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
# A static quorum: the three nodes are its voters.
controller.quorum.voters=$voters
log.dirs=$dir/kafka/$id/data

# Durability: every topic on all three brokers, a write needs two of them.
num.partitions=1
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
auto.create.topics.enable=false
unclean.leader.election.enable=false
# A broker that comes back (kafka.sh start-broker) gets its leaderships back within seconds,
# not the default 5 minutes: tests that stop brokers leave the cluster balanced.
leader.imbalance.check.interval.seconds=10

# Fast start-up, and a small footprint (2 cores shared with other work): the internal topics
# get 6 partitions, not 50, so the first consumer group and the first transactional
# producer do not wait for 150 replicas to be created.
offsets.topic.num.partitions=6
transaction.state.log.num.partitions=6
share.coordinator.state.topic.num.partitions=6
group.initial.rebalance.delay.ms=0
broker.heartbeat.interval.ms=500
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.cleaner.threads=1
PROPS
done

# Format each node's storage (Kafka's storage tool, a JVM each: in parallel), then start it.
export WEIR_TEST_KAFKA=$bootstrap WEIR_KAFKA_DIR=$dir WEIR_KAFKA_HOME=$home
up_ok=0
trap '[ $up_ok = 1 ] || { log "kafka-up failed: logs in $dir/logs"; bash "$here/kafka-down.sh" "$dir"; }' EXIT
fpids=()
for id in "${ids[@]}"; do
  logf=$dir/logs/kafka-$id.log
  echo "=== $(date '+%F %T') formatting $dir/kafka/$id/data (cluster $cluster_id)" > "$logf"
  ( bash "$here/kafka.sh" format "$id" "$cluster_id" >> "$logf" 2>&1 < /dev/null \
      || { log "formatting broker $id failed:"; tail -n 20 "$logf" >&2; exit 1; }
    bash "$here/kafka.sh" spawn "$id" ) &
  fpids+=($!)
done
for p in "${fpids[@]}"; do wait "$p" || exit 1; done
log "kafka: formatted, brokers starting ($((SECONDS - started)) s)"

# Up: each one logged that it started. One that exits fails the start at once, with its
# log's tail.
pending=("${ids[@]}")
deadline=$((SECONDS + ${WEIR_KAFKA_START_TIMEOUT:-120}))
while [ ${#pending[@]} -gt 0 ]; do
  left=()
  for id in "${pending[@]}"; do
    logf=$dir/logs/kafka-$id.log
    grep -q 'Kafka Server started' "$logf" && continue
    if ! kill -0 "$(cat "$dir/pids/kafka-$id.pid")" 2>/dev/null; then
      log "broker $id exited on start; the end of $logf:"; tail -n 40 "$logf" >&2; exit 1
    fi
    left+=("$id")
  done
  pending=("${left[@]}")
  [ ${#pending[@]} -eq 0 ] && break
  if [ $SECONDS -ge $deadline ]; then
    for id in "${pending[@]}"; do
      log "broker $id did not start within ${WEIR_KAFKA_START_TIMEOUT:-120} s; the end of $dir/logs/kafka-$id.log:"
      tail -n 40 "$dir/logs/kafka-$id.log" >&2
    done
    exit 1
  fi
  sleep 0.2
done
log "kafka: brokers started ($((SECONDS - started)) s)"
# In the cluster: three brokers registered and unfenced, and the quorum has a leader (the two
# tools run side by side).
want=$(printf '%s\n' "${ids[@]}")
deadline=$((SECONDS + 60))
while :; do
  bash "$here/kafka.sh" quorum > "$dir/kafka/quorum.txt" 2>&1 &
  qpid=$!
  live=$(bash "$here/kafka.sh" brokers 2>/dev/null || true)
  wait "$qpid" || true
  leader=$(awk -F': *' '$1 == "LeaderId" { print $2 }' "$dir/kafka/quorum.txt")
  [ "$live" = "$want" ] && [[ $leader =~ ^[0-9]+$ ]] && break
  if [ $SECONDS -ge $deadline ]; then
    log "after 60 s the cluster's live brokers are [${live//$'\n'/ }], not [${ids[*]}], or its quorum has no leader:"
    cat "$dir/kafka/quorum.txt" >&2; exit 1
  fi
  sleep 0.5
done
cat > "$dir/kafka.env" <<ENV
# Written by tests/env/kafka-up.sh: the test Kafka cluster (stop it with tests/env/kafka-down.sh).
export WEIR_TEST_KAFKA="$bootstrap"
export WEIR_TEST_KAFKA_BROKER_IDS=$(IFS=,; echo "${ids[*]}")
export WEIR_TEST_KAFKA_CLUSTER_ID=$cluster_id
# For tests/env/kafka.sh: the jars, and the cluster's configs, data, pids and logs.
export WEIR_KAFKA_HOME="$home"
export WEIR_KAFKA_DIR="$dir"
ENV
# Extra JVM options the brokers started with: kafka.sh start-broker starts them so again.
if [ -n "${WEIR_KAFKA_JAVA_OPTS:-}" ]; then
  printf 'export WEIR_KAFKA_JAVA_OPTS=%q\n' "$WEIR_KAFKA_JAVA_OPTS" >> "$dir/kafka.env"
fi
up_ok=1
log "kafka up in $((SECONDS - started)) s: brokers $bootstrap (controller $leader); source $dir/kafka.env"
