"""Smoke test of Flink's Kafka connector in the peer's PyFlink (Flink 2.3 with
flink-connector-kafka from tests/env/flink/pom.xml, built for Flink 2.2): Flink SQL jobs on a
local mini-cluster that write and read a topic of a real Kafka cluster, and check what they read.

1. write (unless --existing): a topic of its own is created (--partitions, replication factor
   min(3, brokers)) with kafka-clients' Admin through the PyFlink JVM, then the job

       datagen (id BIGINT = sequence 0..N-1, payload STRING) -> kafka (format json)

   writes N rows ('sink.delivery-guarantee' at-least-once, kafka-clients' idempotent producer);
   the topic's end offsets must add up to N.
   With --existing N the topic is one that something else wrote: N JSON values with an "id"
   field 0..N-1 (bench/flink_kafka_check.sh writes one with tests/env/kafka.sh produce).
2. read, streaming: kafka (scan.startup.mode earliest-offset, scan.bounded.mode latest-offset,
   format json) -> blackhole, operator chaining off so that the source is a vertex of its own;
   the job must end by itself (the source is bounded) and, by the finished job's archive, the
   source must have emitted and the blackhole received exactly N records.
3. read, batch: SELECT COUNT(*), COUNT(DISTINCT id), MIN(id), MAX(id) on the same bounded
   source, collected: N, N, 0, N-1 (every record came, once).

Prints one line of JSON on stdout (ok, counts, and each job's seconds from the SQL call to its
end, planning and the job's own mini-cluster start included); exits 1 if a check fails.
Everything else (Flink's own output too) goes to stderr. Run it with the python of the
virtualenv that tests/env/install-flink.sh prints; the brokers are --bootstrap or
$WEIR_TEST_KAFKA (as tests/env/kafka-up.sh's kafka.env exports it).
"""

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

FLINK_VERSION = "2.3.0"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", default=os.environ.get("WEIR_TEST_KAFKA"),
                   help="bootstrap servers, host:port,... (default $WEIR_TEST_KAFKA)")
    p.add_argument("--topic", help="the topic (default: flink-kafka-check-<pid>-<time>, created)")
    p.add_argument("--records", type=int, default=100_000, help="N rows to write (default 100000)")
    p.add_argument("--existing", type=int, metavar="N",
                   help="read an existing --topic of N JSON records with ids 0..N-1 instead of writing one")
    p.add_argument("--partitions", type=int, default=3, help="partitions of a created topic (default 3)")
    p.add_argument("--parallelism", type=int, default=2, help="parallelism of the jobs (default 2)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up on a job after this long (default 300 s)")
    a = p.parse_args()
    if not a.bootstrap:
        p.error("no brokers: --bootstrap or WEIR_TEST_KAFKA")
    if a.existing is not None and not a.topic:
        p.error("--existing needs --topic")
    if a.existing is not None:
        a.records = a.existing
    if a.records < 1 or a.partitions < 1 or a.parallelism < 1:
        p.error("--records, --partitions and --parallelism must be positive")
    return a


def log(msg):
    print(f"[flink-kafka-check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class CheckError(Exception):
    pass


def main():
    args = parse_args()
    result_out = os.fdopen(os.dup(1), "w")  # stdout keeps the JSON line; Flink's output to stderr
    sys.stdout.flush()
    os.dup2(2, 1)
    work = tempfile.mkdtemp(prefix="flink-kafka-check-")
    result = {"engine": "flink", "version": FLINK_VERSION, "bootstrap": args.bootstrap,
              "records": args.records, "parallelism": args.parallelism}
    try:
        result.update(Check(args, work).run())
        result["ok"] = True
    except CheckError as e:
        log(f"FAILED: {e}")
        result["ok"] = False
        result["error"] = str(e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result_out.write(json.dumps(result) + "\n")
    result_out.flush()
    sys.exit(0 if result["ok"] else 1)


class Check:
    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.topic = args.topic or f"flink-kafka-check-{os.getpid()}-{int(time.time())}"
        self.n = args.records

    # ---- Kafka's own client, through the JVM PyFlink starts (kafka-clients is in its lib/) ----

    def admin(self):
        from pyflink.java_gateway import get_gateway

        jvm = get_gateway().jvm
        props = jvm.java.util.Properties()
        props.setProperty("bootstrap.servers", self.args.bootstrap)
        props.setProperty("request.timeout.ms", "30000")
        return jvm, jvm.org.apache.kafka.clients.admin.Admin.create(props)

    def create_topic(self):
        jvm, admin = self.admin()
        try:
            nodes = sorted(int(n.id()) for n in jiter(admin.describeCluster().nodes().get()))
            rf = min(3, len(nodes))
            # Replicas by hand (partition i on rf brokers from i on): the plain NewTopic
            # constructor takes a Java short, which py4j cannot pass.
            assignment = jvm.java.util.HashMap()
            for i in range(self.args.partitions):
                replicas = jvm.java.util.ArrayList()
                for j in range(rf):
                    replicas.add(nodes[(i + j) % len(nodes)])
                assignment.put(i, replicas)
            topic = jvm.org.apache.kafka.clients.admin.NewTopic(self.topic, assignment)
            topics = jvm.java.util.ArrayList()
            topics.add(topic)
            admin.createTopics(topics).all().get()
            log(f"topic {self.topic}: {self.args.partitions} partitions, replication factor {rf} "
                f"(brokers {nodes})")
        finally:
            admin.close()

    def end_offsets(self):
        """The sum of the topic's latest offsets: how many records it holds (no transactions)."""
        jvm, admin = self.admin()
        try:
            names = jvm.java.util.ArrayList()
            names.add(self.topic)
            desc = admin.describeTopics(names).allTopicNames().get().get(self.topic)
            spec = jvm.java.util.HashMap()
            latest = jvm.org.apache.kafka.clients.admin.OffsetSpec.latest()
            for p in jiter(desc.partitions()):
                spec.put(jvm.org.apache.kafka.common.TopicPartition(self.topic, p.partition()), latest)
            offsets = admin.listOffsets(spec).all().get()
            return sum(int(offsets.get(tp).offset()) for tp in jiter(offsets.keySet()))
        finally:
            admin.close()

    # ---- Flink ----

    def t_env(self, streaming, archive=None):
        from pyflink.common import Configuration
        from pyflink.table import EnvironmentSettings, TableEnvironment

        conf = Configuration()
        conf.set_string("parallelism.default", str(self.args.parallelism))
        conf.set_string("io.tmp.dirs", os.path.join(self.work, "tmp"))
        conf.set_string("rest.bind-address", "127.0.0.1")
        if archive:
            os.makedirs(archive, exist_ok=True)
            conf.set_string("jobmanager.archive.fs.dir", "file://" + archive)
            conf.set_string("pipeline.operator-chaining.enabled", "false")
        mode = EnvironmentSettings.new_instance()
        mode = mode.in_streaming_mode() if streaming else mode.in_batch_mode()
        return TableEnvironment.create(mode.with_configuration(conf).build())

    def kafka_table(self, t_env, name, source):
        opts = {
            "connector": "kafka",
            "topic": self.topic,
            "properties.bootstrap.servers": self.args.bootstrap,
            "format": "json",
        }
        if source:
            opts.update({
                "properties.group.id": f"flink-kafka-check-{os.getpid()}",
                "scan.startup.mode": "earliest-offset",
                "scan.bounded.mode": "latest-offset",
                "json.ignore-parse-errors": "false",
            })
        else:
            opts["sink.delivery-guarantee"] = "at-least-once"
        with_ = ",\n".join(f"'{k}' = '{v}'" for k, v in opts.items())
        t_env.execute_sql(f"CREATE TEMPORARY TABLE {name} (id BIGINT, payload STRING) WITH ({with_})")

    def wait(self, table_result, what, start):
        """Waits for the job to end; returns the seconds since START (before the SQL call:
        planning and the mini-cluster's start count too)."""
        from py4j.protocol import Py4JJavaError

        try:
            table_result.wait(int(self.args.timeout * 1000))
        except Py4JJavaError as e:
            raise CheckError(f"{what} failed: {e.java_exception}")
        seconds = time.perf_counter() - start
        log(f"{what}: ended in {seconds:.2f} s")
        return seconds

    def write(self):
        t_env = self.t_env(streaming=True)
        t_env.execute_sql(f"""
            CREATE TEMPORARY TABLE gen (id BIGINT, payload STRING) WITH (
              'connector' = 'datagen',
              'number-of-rows' = '{self.n}',
              'rows-per-second' = '1000000000',
              'fields.id.kind' = 'sequence', 'fields.id.start' = '0', 'fields.id.end' = '{self.n - 1}',
              'fields.payload.length' = '100'
            )""")
        self.kafka_table(t_env, "kafka_out", source=False)
        log(f"writing {self.n} rows into {self.topic}")
        start = time.perf_counter()
        seconds = self.wait(t_env.execute_sql("INSERT INTO kafka_out SELECT id, payload FROM gen"),
                            "write job", start)
        held = self.end_offsets()
        log(f"{self.topic} holds {held} records (end offsets)")
        if held != self.n:
            raise CheckError(f"the write job finished but {self.topic} holds {held} records, not {self.n}")
        return seconds

    def read_streaming(self):
        archive = os.path.join(self.work, "archive")
        t_env = self.t_env(streaming=True, archive=archive)
        self.kafka_table(t_env, "src", source=True)
        t_env.execute_sql("CREATE TEMPORARY TABLE snk (id BIGINT, payload STRING) WITH ('connector' = 'blackhole')")
        log(f"reading {self.topic} (earliest to latest offset) into a blackhole")
        start = time.perf_counter()
        result = t_env.execute_sql("INSERT INTO snk SELECT id, payload FROM src")
        job_id = str(result.get_job_client().get_job_id())
        seconds = self.wait(result, "streaming read job", start)
        job = read_archive(archive, job_id)
        if job["state"] != "FINISHED":
            raise CheckError(f"streaming read job {job_id} is {job['state']}, not FINISHED")
        vertices = job["vertices"]
        names = [v["name"] for v in vertices]
        source = [v for v in vertices if v["name"].startswith("Source:")]
        sink = [v for v in vertices if "snk" in v["name"] and not v["name"].startswith("Source:")]
        if len(source) != 1 or len(sink) != 1:
            raise CheckError(f"unexpected job graph (one source and one sink vertex expected): {names}")
        emitted = source[0]["metrics"]["write-records"]
        received = sink[0]["metrics"]["read-records"]
        log(f"streaming read: the source emitted {emitted}, the blackhole received {received}")
        if emitted != self.n or received != self.n:
            raise CheckError(f"streaming read: source emitted {emitted}, blackhole received "
                             f"{received}, expected {self.n}")
        return seconds, emitted

    def read_batch(self):
        t_env = self.t_env(streaming=False)
        self.kafka_table(t_env, "src", source=True)
        log(f"reading {self.topic} in batch mode: COUNT(*), COUNT(DISTINCT id), MIN(id), MAX(id)")
        start = time.perf_counter()
        from py4j.protocol import Py4JJavaError
        try:
            with t_env.execute_sql(
                    "SELECT COUNT(*), COUNT(DISTINCT id), MIN(id), MAX(id) FROM src").collect() as rows:
                got = [tuple(r) for r in rows]
        except Py4JJavaError as e:
            raise CheckError(f"batch read job failed: {e.java_exception}")
        seconds = time.perf_counter() - start
        want = [(self.n, self.n, 0, self.n - 1)]
        log(f"batch read: {got} in {seconds:.2f} s")
        if got != want:
            raise CheckError(f"batch read: (count, distinct ids, min id, max id) = {got}, expected {want}")
        return seconds

    def run(self):
        out = {"topic": self.topic}
        if self.args.existing is None:
            self.create_topic()
            out["write_seconds"] = round(self.write(), 3)
            out["written_by"] = "flink"
        else:
            held = self.end_offsets()
            log(f"{self.topic} holds {held} records (end offsets)")
            if held != self.n:
                raise CheckError(f"{self.topic} holds {held} records, not the {self.n} of --existing")
            out["written_by"] = "other"
        seconds, read = self.read_streaming()
        out["read_seconds"] = round(seconds, 3)
        out["read_records"] = read
        out["batch_read_seconds"] = round(self.read_batch(), 3)
        return out


def jiter(collection):
    """The elements of a Java collection that py4j hands over as a plain object."""
    it = collection.iterator()
    while it.hasNext():
        yield it.next()


def read_archive(archive_dir, job_id):
    """The finished job's /jobs/<id> answer, from the archive the JobManager writes when a job
    ends (Flink 2.3: <archive>/<cluster>/applications/<application>/jobs/<job id>)."""
    for _ in range(300):  # written just after the job ends: wait for a whole file
        for path in glob.glob(os.path.join(archive_dir, "**", job_id), recursive=True):
            try:
                with open(path) as f:
                    archive = json.load(f)
            except (OSError, ValueError):
                continue
            for entry in archive["archive"]:
                if entry["path"] == f"/jobs/{job_id}":
                    return json.loads(entry["json"])
        time.sleep(0.1)
    raise CheckError(f"no readable archive of job {job_id} under {archive_dir}")


if __name__ == "__main__":
    main()
