"""Keyed counting on Apache Flink 2.3 (PyFlink, local mini-cluster): the peer figure for Weir.

Runs the Flink SQL job

    datagen (BIGINT k uniform in [0, K), R rows) -> SELECT k, COUNT(*) ... GROUP BY k -> blackhole

in streaming mode with the RocksDB state backend (or with --state-backend hashmap, Flink's heap
backend), checkpointing off and mini-batch off, so the aggregation emits each key's new count
on every record (as Weir's count does).
With --checkpoint-interval, checkpoints (incremental with RocksDB, full with hashmap) go to
--checkpoint-storage: local
(STATE_DIR/checkpoints) or s3 (s3://$WEIR_TEST_BUCKET/flink-keyed-count-<pid>-<time>/ through
Flink's own S3 file system, the flink-s3-fs-hadoop plugin, on the S3 server of the AWS
environment: see bench/flink_s3.py; removed after the run). The time is the
wall-clock time from submitting the job to its completion (execute_insert(...).wait()),
including job start-up; nothing is subtracted.

Prints one line of JSON on stdout; everything else (Flink's own output too) goes to stderr.
Run it with the python of the virtualenv that tests/env/install-flink.sh prints.
"""

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import flink_s3

FLINK_VERSION = "2.3.0"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parallelism", type=int, default=1, help="job parallelism (default 1)")
    p.add_argument("--keys", type=int, default=1_000_000, help="distinct key values K (default 1000000)")
    p.add_argument("--records", type=int, default=10_000_000, help="rows R (default 10000000)")
    p.add_argument("--state-backend", choices=["rocksdb", "hashmap"], default="rocksdb",
                   help="Flink's state backend (default rocksdb; hashmap keeps state on the heap)")
    p.add_argument("--state-dir", help="RocksDB and temporary files (default: a new temp dir, removed after)")
    p.add_argument("--managed-memory", help="taskmanager.memory.managed.size, e.g. 512m "
                   "(default: Flink's local-execution default, 128m shared by the slots)")
    p.add_argument("--checkpoint-interval", help="take incremental RocksDB checkpoints this often "
                   "(e.g. 1s, 10s) (default: checkpointing off)")
    p.add_argument("--checkpoint-storage", choices=["local", "s3"], default="local",
                   help="where checkpoints go: STATE_DIR/checkpoints, or the S3 bucket of the "
                        "AWS environment through Flink's S3 plugin (default local)")
    p.add_argument("--verify", action="store_true",
                   help="also read the finished job's archive and check on stderr that the source "
                        "emitted, and the aggregation read, exactly R records (exit 1 otherwise)")
    p.add_argument("--source-only", action="store_true",
                   help="diagnostic: datagen -> blackhole without the GROUP BY, to see that the "
                        "source is not the limit")
    a = p.parse_args()
    if a.parallelism < 1 or a.keys < 1 or a.records < 1:
        p.error("--parallelism, --keys and --records must be positive")
    return a


def log(msg):
    print(f"[flink-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main():
    args = parse_args()

    # Keep stdout for the one JSON line: point fd 1 (inherited by the Java gateway process)
    # at stderr, and write the result to a saved copy of the original stdout.
    result_out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)

    own_dir = args.state_dir is None
    state_dir = os.path.abspath(args.state_dir or tempfile.mkdtemp(prefix="flink-bench-"))
    os.makedirs(state_dir, exist_ok=True)
    archive_dir = os.path.join(state_dir, "archive")
    s3 = None
    try:
        if args.checkpoint_interval and args.checkpoint_storage == "s3":
            try:
                s3 = flink_s3.S3(f"flink-keyed-count-{os.getpid()}-{int(time.time())}",
                                 os.path.join(state_dir, "s3-staging"))
            except flink_s3.S3ConfigError as e:
                log(f"FAILED: {e}")
                sys.exit(1)
            flink_s3.initialize_file_systems(s3.flink_conf())
            log(f"checkpoints under {s3.uri} on {s3.endpoint} (Flink's S3 plugin)")
        seconds, verified = run(args, state_dir, archive_dir, s3)
    finally:
        if s3:
            flink_s3.remove_run(s3.uri, log)
        if own_dir:
            shutil.rmtree(state_dir, ignore_errors=True)

    result = {
        "engine": "flink",
        "version": FLINK_VERSION,
        "parallelism": args.parallelism,
        "keys": args.keys,
        "records": args.records,
        "seconds": round(seconds, 3),
        "events_per_second": round(args.records / seconds, 1),
        "state_backend": args.state_backend,
        "checkpoint_interval": args.checkpoint_interval,
        "checkpoint_storage": (args.checkpoint_storage if args.checkpoint_interval else None),
    }
    if args.source_only:
        result["query"] = "source-only"
    result_out.write(json.dumps(result) + "\n")
    result_out.flush()
    if verified is False:
        sys.exit(1)


def run(args, state_dir, archive_dir, s3):
    from pyflink.common import Configuration
    from pyflink.table import EnvironmentSettings, TableEnvironment

    conf = Configuration()
    conf.set_string("state.backend.type", args.state_backend)
    conf.set_string("state.backend.rocksdb.localdir", os.path.join(state_dir, "rocksdb"))
    conf.set_string("io.tmp.dirs", os.path.join(state_dir, "tmp"))
    conf.set_string("parallelism.default", str(args.parallelism))
    # Checkpointing is off by default (no execution.checkpointing.interval); mini-batch is off
    # by default too, but say so: with it on, GROUP BY buffers and emits once per key per batch.
    conf.set_string("table.exec.mini-batch.enabled", "false")
    if args.checkpoint_interval:
        conf.set_string("execution.checkpointing.interval", args.checkpoint_interval)
        if s3:
            conf.set_string("execution.checkpointing.dir", s3.uri + "/checkpoints")
            flink_s3.apply(conf, s3.flink_conf())
        else:
            conf.set_string("execution.checkpointing.dir", "file://" + os.path.join(state_dir, "checkpoints"))
        if args.state_backend == "rocksdb":
            conf.set_string("execution.checkpointing.incremental", "true")
    if args.managed_memory:
        conf.set_string("taskmanager.memory.managed.size", args.managed_memory)
    if args.verify:
        os.makedirs(archive_dir, exist_ok=True)
        conf.set_string("jobmanager.archive.fs.dir", "file://" + archive_dir)

    settings = EnvironmentSettings.new_instance().in_streaming_mode().with_configuration(conf).build()
    t_env = TableEnvironment.create(settings)

    # datagen's rows-per-second defaults to 10,000: raise it far above what the job can do.
    # number-of-rows is the total over all source subtasks. 'random' with min/max draws each key
    # uniformly from [0, K); a 'sequence' field would instead materialize all its values in the
    # source's heap before the first row (SequenceGenerator), so it is not used.
    t_env.execute_sql(f"""
        CREATE TEMPORARY TABLE src (k BIGINT) WITH (
          'connector' = 'datagen',
          'number-of-rows' = '{args.records}',
          'rows-per-second' = '1000000000',
          'fields.k.kind' = 'random',
          'fields.k.min' = '0',
          'fields.k.max' = '{args.keys - 1}'
        )""")
    if args.source_only:
        t_env.execute_sql("CREATE TEMPORARY TABLE snk (k BIGINT) WITH ('connector' = 'blackhole')")
        query = "INSERT INTO snk SELECT k FROM src"
    else:
        t_env.execute_sql("CREATE TEMPORARY TABLE snk (k BIGINT, c BIGINT) WITH ('connector' = 'blackhole')")
        query = "INSERT INTO snk SELECT k, COUNT(*) AS c FROM src GROUP BY k"

    log(f"parallelism={args.parallelism} keys={args.keys} records={args.records} state_dir={state_dir}")
    log("plan:\n" + t_env.explain_sql(query))

    start = time.perf_counter()
    table_result = t_env.execute_sql(query)
    table_result.wait()
    seconds = time.perf_counter() - start
    log(f"job finished in {seconds:.3f} s")

    verified = None
    if args.verify:
        job_id = str(table_result.get_job_client().get_job_id())
        verified = verify(archive_dir, job_id, args.records, args.source_only)
    return seconds, verified


def verify(archive_dir, job_id, records, source_only):
    """Reads the job archive the JobManager writes when a job finishes (the REST answers for the
    job) and checks the per-vertex record counts."""
    # Flink 2.3 writes <archive>/<cluster id>/applications/<application id>/jobs/<job id>.
    archive = None
    for _ in range(100):  # the archive is written after the job ends: wait for a whole file
        paths = glob.glob(os.path.join(archive_dir, "**", "jobs", job_id), recursive=True)
        try:
            with open(paths[0]) as f:
                archive = json.load(f)
            break
        except (IndexError, OSError, ValueError):
            time.sleep(0.1)
    if archive is None:
        found = glob.glob(os.path.join(archive_dir, "**"), recursive=True)
        log(f"verify: no readable archive for job {job_id} under {archive_dir}: {found}")
        return False
    job = None
    for entry in archive["archive"]:
        if entry["path"] == f"/jobs/{job_id}":
            job = json.loads(entry["json"])
    if job is None:
        log("verify: the archive has no /jobs/<id> entry")
        return False
    log(f"verify: job state {job['state']}")
    ok = job["state"] == "FINISHED"
    vertices = job["vertices"]
    for v in vertices:
        m = v["metrics"]
        log(f"verify: vertex {v['name'][:90]!r} parallelism={v['parallelism']} "
            f"read-records={m['read-records']} write-records={m['write-records']}")
    if source_only:
        # datagen and blackhole are chained into one vertex: no records cross a network edge.
        log("verify: source-only job, nothing to count across an edge")
        return ok
    # The source vertex is first (no input); the aggregation reads over the keyed exchange.
    ok &= vertices[0]["metrics"]["write-records"] == records
    ok &= vertices[-1]["metrics"]["read-records"] == records
    log(f"verify: {'OK' if ok else 'MISMATCH'}: expected {records} records")
    return ok


if __name__ == "__main__":
    main()
