#!/usr/bin/env bash
# Installs Apache Kafka (the broker, its KRaft controller and its command-line tools) from
# Maven Central: the jars of tests/env/kafka/pom.xml, all in one folder,
# $WEIR_CACHE/kafka-<version>/libs, which `java -cp "$WEIR_CACHE/kafka-<version>/libs/*"` runs.
# The version is the pom's kafka.version. Maven's downloads are kept in $WEIR_CACHE/m2, apart
# from the user's ~/.m2.
#
# Then a class-data-sharing archive, kafka.jsa beside libs/: the classes that a broker and the
# tools tests/env/kafka.sh runs load, parsed and verified once, here. With it (and the client
# compiler only) a broker starts on about a third of the CPU time, a tool on half; every CI run
# starts three brokers and runs tens of tools. It is made by a throw-away single-node cluster
# that runs those tools once. Without it (if it cannot be made) everything still runs, slower.
#
# Cached: does nothing when the folder is complete for the pom and the java as they are (an
# edited pom or another JDK installs again). An interrupted install is never taken for a
# complete one. Prints the Kafka home on stdout (logs go to stderr), like install-python.sh.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
pom=$here/kafka/pom.xml
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom" | head -n 1)
[ -n "$version" ] || { log "no <kafka.version> in $pom"; exit 1; }
home=$WEIR_CACHE/kafka-$version
command -v java >/dev/null 2>&1 || apt_install openjdk-17-jre-headless
stamp=$( { cat "$pom"; java -version 2>&1; } | sha256sum | cut -c1-16)
cached() { [ -d "$home/libs" ] && [ "$(cat "$home/.complete" 2>/dev/null)" = "$stamp" ]; }
if cached; then log "kafka $version: cached in $home"; echo "$home"; exit 0; fi
# One install at a time (test environments started at the same time share the cache): the
# others wait here and then find it cached.
exec 9> "$WEIR_CACHE/kafka-$version.lock"
if ! flock -n 9; then
  log "kafka $version: another install is under way, waiting for it"
  flock 9
fi
if cached; then log "kafka $version: cached in $home"; echo "$home"; exit 0; fi
command -v mvn >/dev/null 2>&1 || apt_install maven
log "installing kafka $version from Maven Central into $home"
started=$SECONDS

# --- The jars: copied into a .tmp folder, moved into place once complete.
tmp=$home.tmp
rm -rf "$tmp"; mkdir -p "$tmp"
# -B: batch mode, no progress; -q keeps only errors.
if ! mvn -B -q -f "$pom" -Dmaven.repo.local="$WEIR_CACHE/m2" \
    dependency:copy-dependencies -DoutputDirectory="$tmp/libs" > "$tmp/mvn.log" 2>&1; then
  cat "$tmp/mvn.log" >&2; rm -rf "$tmp"; log "mvn dependency:copy-dependencies failed for $pom"; exit 1
fi
rm -f "$tmp/mvn.log"
[ -f "$tmp/libs/kafka_2.13-$version.jar" ] || { rm -rf "$tmp"; log "kafka_2.13-$version.jar is missing from $tmp/libs"; exit 1; }
echo "$version" > "$tmp/version"
rm -rf "$home"; mv "$tmp" "$home"
log "kafka $version: $(find "$home/libs" -name '*.jar' | wc -l) jars ($(du -sh "$home/libs" | cut -f1)) in $((SECONDS - started)) s"

# --- The class-data-sharing archive. It names the jars by their paths, so it is made where
# they stay; .complete is written only after it (or after it failed: then without it).
make_archive() {
  local work=$home/cds-work libs=$home/libs
  rm -rf "$work"; mkdir -p "$work/lists" "$work/data"
  local port ctl
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  ctl=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat > "$work/server.properties" <<PROPS
node.id=1
process.roles=broker,controller
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctl
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
controller.quorum.voters=1@127.0.0.1:$ctl
log.dirs=$work/data
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
group.initial.rebalance.delay.ms=0
PROPS
  printf '%s\n' 'rootLogger.level = INFO' 'rootLogger.appenderRef.out.ref = OUT' \
    'appender.out.type = Console' 'appender.out.name = OUT' \
    'appender.out.layout.type = PatternLayout' 'appender.out.layout.pattern = [%d] %p %m (%c)%n' \
    > "$work/log4j2.properties"
  local b=127.0.0.1:$port n=0
  # run NAME CLASS ARG...: a JVM that writes the classes it loads to lists/NAME.
  run() {
    local name=$1; shift
    java -XX:TieredStopAtLevel=1 -XX:DumpLoadedClassList="$work/lists/$name" \
      -Dlog4j2.configurationFile="$work/log4j2.properties" -cp "$libs/*" "$@"
  }
  run storage kafka.tools.StorageTool format --cluster-id "$(python3 -c 'import base64,os; print(base64.urlsafe_b64encode(b"\x01" + os.urandom(15)).rstrip(b"=").decode())')" \
    --config "$work/server.properties" > "$work/format.log" 2>&1 || { tail -n 20 "$work/format.log" >&2; return 1; }
  java -XX:TieredStopAtLevel=1 -XX:DumpLoadedClassList="$work/lists/broker" \
    -Dlog4j2.configurationFile="$work/log4j2.properties" -cp "$libs/*" \
    kafka.Kafka "$work/server.properties" > "$work/broker.log" 2>&1 < /dev/null &
  local pid=$!
  until grep -q 'Kafka Server started' "$work/broker.log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null || [ $n -ge 600 ]; then
      log "the archive's broker did not start:"; tail -n 20 "$work/broker.log" >&2
      kill -KILL "$pid" 2>/dev/null; return 1
    fi
    n=$((n + 1)); sleep 0.2
  done
  local ok=0
  {
    run topics org.apache.kafka.tools.TopicCommand --bootstrap-server "$b" --create --topic cds --partitions 2 --replication-factor 1 &&
    seq 1 100 | run producer org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$b" --topic cds \
      --request-required-acks all --command-property enable.idempotence=true &&
    run consumer org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$b" --topic cds \
      --from-beginning --max-messages 100 --isolation-level read_committed --timeout-ms 60000 &&
    run cluster org.apache.kafka.tools.ClusterTool list-endpoints --bootstrap-server "$b" --include-fenced-brokers &&
    run quorum org.apache.kafka.tools.MetadataQuorumCommand --bootstrap-server "$b" describe --status
  } > "$work/tools.log" 2>&1 && ok=1
  kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  [ $ok = 1 ] || { log "the archive's tools failed:"; tail -n 20 "$work/tools.log" >&2; return 1; }
  # One list, each class once, in the order first loaded.
  cat "$work/lists"/* | grep -v '^#' | awk '!seen[$0]++' > "$work/classes.lst"
  java -Xshare:dump -XX:SharedClassListFile="$work/classes.lst" -XX:SharedArchiveFile="$home/kafka.jsa.tmp" \
    -cp "$libs/*" > "$work/dump.log" 2>&1 || { tail -n 20 "$work/dump.log" >&2; return 1; }
  # -Xshare:on fails unless the archive maps and matches the jars.
  java -Xshare:on -XX:SharedArchiveFile="$home/kafka.jsa.tmp" -cp "$libs/*" org.apache.kafka.tools.TopicCommand --version \
    > "$work/check.log" 2>&1 || { cat "$work/check.log" >&2; return 1; }
  mv "$home/kafka.jsa.tmp" "$home/kafka.jsa"
  rm -rf "$work"
}
archive_started=$SECONDS
if make_archive; then
  log "kafka $version: class-data-sharing archive made in $((SECONDS - archive_started)) s"
else
  rm -f "$home/kafka.jsa" "$home/kafka.jsa.tmp"
  log "WARNING: no class-data-sharing archive for kafka $version (see above; $home/cds-work): brokers and tools start slower"
fi
echo "$stamp" > "$home/.complete"
log "kafka $version installed in $home in $((SECONDS - started)) s"
echo "$home"
