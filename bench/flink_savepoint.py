"""Stop-with-savepoint and rescaled restore on Apache Flink 2.3 (PyFlink, local mini-cluster):
the peer figure for Weir's savepoint/rescale benchmark.

The job, in Flink SQL, streaming mode, RocksDB state backend (checkpointing off, mini-batch off):

    fill: datagen, k BIGINT = sequence 0..N-1, v BYTES = V random bytes   (bounded: N rows)
    tick: datagen, k random in [0, N), v V random bytes, 10 rows/s        (unbounded)
    INSERT INTO blackhole SELECT k, LAST_VALUE(v) FROM (fill UNION ALL tick) GROUP BY k

so the GROUP BY keeps one V-byte value for each of N keys in RocksDB, N = ceil(S / V):
state_bytes = N * V, about S (default 1 GiB, V = 1000). Random bytes, so nothing compresses.
`fill` finishes once it has written its N rows; `tick` keeps the job RUNNING (it only overwrites
existing keys with values of the same size) so that it can be stopped with a savepoint.

For each rescale pair FROM:TO (default 4:3,4:2,2:4):

1. savepoint_seconds: the job runs at parallelism FROM with all N keys in its state (the
   aggregation has read every `fill` row, then --settle-seconds of quiet). The time is the
   wall-clock time from calling JobClient.stopWithSavepoint(drain=false, dir, CANONICAL) until
   its future completes with the savepoint's path. Flink completes that future only once the
   savepoint is complete AND the job has terminated (FINISHED), so this covers: barrier through
   the job, RocksDB snapshot, writing the savepoint files, and the job stopping.
   stopped_seconds is the same start until the client also holds the job's final result
   (FINISHED, checked). Savepoints are written in Flink's default CANONICAL format (the
   format Flink can rescale from any backend; a full copy of the state, no incremental reuse).
2. restore_seconds: the savepoint is restored in a new job at parallelism TO
   (execution.state-recovery.path, parallelism.default = TO). The time runs from the job's
   submission as the Flink cluster records it (the JobManager's INITIALIZING timestamp of the
   job, /jobs/:id) until the last of the job's subtasks switched to RUNNING (subtask timestamps,
   /jobs/:id/vertices/:v/subtasktimes). A Flink subtask is INITIALIZING while it restores its
   state (here: RocksDB rebuilt from the savepoint's key groups) and RUNNING after, so this
   is "submitted -> scheduled, deployed, state restored, running". The restore is checked:
   /jobs/:id/checkpoints must report the savepoint's path as restored.
   Also reported: restore_wall_seconds, from the Python call that submits the SQL job until the
   same last RUNNING timestamp, which adds SQL planning and the start of the per-job
   mini-cluster (a few seconds, which a Flink session cluster would not pay); and
   state_init_seconds, the longest INITIALIZING -> RUNNING time of one subtask (the state
   restore alone).

Savepoints are only taken where needed: the job built at the first pair's FROM is stopped with a
savepoint; a restored job is stopped with a savepoint (timed, reported) when a later pair starts
from its parallelism, otherwise cancelled; a FROM with no savepoint yet is reached by an untimed
restore of the first savepoint at FROM, then a timed stop-with-savepoint. So with 4:3,4:2,2:4
the 4-parallel savepoint serves 4:3 and 4:2 (same savepoint_seconds), and the 2-parallel one is
the savepoint of the job restored for 4:2. Every savepoint must hold at least 95 % of
state_bytes (checked: the state survived each rescale).

Where savepoints (and the checkpoint directory) go, --storage:
- s3 (the fair peer of Weir's figures, which are taken against S3): s3://BUCKET/PREFIX through
  Flink's own S3 file system, flink-s3-fs-hadoop (the plugin tests/env/install-flink.sh puts in
  the distribution's plugins/), on the S3 server of the standard AWS environment
  (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, and
  WEIR_TEST_BUCKET for the bucket, as tests/env/up.sh writes them; bench/flink_s3.py has the
  settings), path-style. PREFIX is flink-savepoint-bench-<pid>-<time>, removed after the run
  unless --keep. The plugin (Hadoop's S3A) buffers what Flink writes on local disk (under the
  state dir) and uploads it in parts as they fill and when Flink closes the file (multipart
  for large ones); reads are ranged GETs.
- local: the local file system (file:// under the state dir; Flink fsyncs each file).
Everything runs in one JVM with Flink's local-execution defaults (managed memory 128 MB shared
by the slots, which RocksDB uses), one new mini-cluster per job, on whatever cores there are.

Prints one line of JSON on stdout; everything else (Flink's own output too) goes to stderr.
Run it with the python of the virtualenv that tests/env/install-flink.sh prints.
"""

import argparse
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request

import flink_s3

FLINK_VERSION = "2.3.0"


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64m, 1g, 1048576)")
    n = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")
    if n < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(n)


def parse_pairs(text):
    pairs = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise argparse.ArgumentTypeError(f"not a FROM:TO pair of positive parallelisms: {part!r}")
        pairs.append((int(m.group(1)), int(m.group(2))))
    return pairs


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-bytes", type=parse_size, default=parse_size("1g"),
                   help="keyed state S: N = ceil(S / V) keys of V bytes (default 1g; k/m/g are binary)")
    p.add_argument("--value-bytes", type=int, default=1000, help="V, bytes per key (default 1000)")
    p.add_argument("--pairs", type=parse_pairs, default=parse_pairs("4:3,4:2,2:4"),
                   help="rescale pairs FROM:TO, comma-separated (default 4:3,4:2,2:4)")
    p.add_argument("--storage", choices=["s3", "local"], default="s3",
                   help="where savepoints and checkpoints go (default s3: see above)")
    p.add_argument("--state-dir", help="RocksDB, savepoints and temporary files "
                   "(default: a new temp dir, removed after)")
    p.add_argument("--managed-memory", help="taskmanager.memory.managed.size, e.g. 512m "
                   "(default: Flink's local-execution default, 128m shared by the slots)")
    p.add_argument("--heap", default="2g", help="-Xmx of the JVM (mini-cluster and client), "
                   "unless JVM_ARGS already has one (default 2g)")
    p.add_argument("--keep", action="store_true",
                   help="--storage s3: leave the run's savepoints and checkpoints in the bucket "
                        "(default: removed at the end)")
    p.add_argument("--settle-seconds", type=float, default=5.0,
                   help="wait this long after the state is built before the first savepoint, "
                        "so RocksDB's flushes and compactions of the load settle (default 5)")
    p.add_argument("--timeout", type=float, default=1200.0,
                   help="give up if one phase (build, savepoint, restore) takes longer (default 1200 s)")
    a = p.parse_args()
    if a.value_bytes < 1:
        p.error("--value-bytes must be positive")
    return a


def log(msg):
    print(f"[flink-savepoint {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def main():
    args = parse_args()

    # Keep stdout for the one JSON line: point fd 1 (inherited by the Java gateway process)
    # at stderr, and write the result to a saved copy of the original stdout.
    result_out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)

    jvm_args = os.environ.get("JVM_ARGS", "")
    if "-Xmx" not in jvm_args:
        os.environ["JVM_ARGS"] = (jvm_args + f" -Xmx{args.heap}").strip()

    own_dir = args.state_dir is None
    state_dir = os.path.abspath(args.state_dir or tempfile.mkdtemp(prefix="flink-savepoint-"))
    os.makedirs(state_dir, exist_ok=True)
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    s3 = None
    try:
        if args.storage == "s3":
            try:
                s3 = flink_s3.S3(f"flink-savepoint-bench-{os.getpid()}-{int(time.time())}",
                                 os.path.join(state_dir, "s3-staging"))
            except flink_s3.S3ConfigError as e:
                raise BenchError(str(e))
            flink_s3.initialize_file_systems(s3.flink_conf())
            durable, storage = s3.uri, f"S3 {s3.describe} (Flink's flink-s3-fs-hadoop plugin)"
            log(f"savepoints and checkpoints under {s3.uri} on {s3.endpoint}")
        else:
            durable, storage = "file://" + state_dir, "local file system"
        result = Bench(args, state_dir, durable, s3).run()
        result["savepoint_storage"] = storage
    except BenchError as e:
        log(f"FAILED: {e}")
        sys.exit(1)
    finally:
        if s3 and args.keep:
            log(f"--keep: the run's objects stay under {s3.uri}")
        elif s3:
            flink_s3.remove_run(s3.uri, log)
        if own_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    result["loadavg_1m"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    log(f"done in {result['total_seconds']} s")
    result_out.write(json.dumps(result) + "\n")
    result_out.flush()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def same_path(a, b):
    """Whether two savepoint paths Flink printed name the same place ("file:/x" and
    "file:///x/" do; "s3://b/p/" and "s3://b/p" do)."""
    def norm(uri):
        uri = re.sub(r"^file:(//)?", "file://", uri)
        return uri.rstrip("/")
    return norm(a) == norm(b)


class Job:
    """One submitted SQL job on its own per-job mini-cluster, with that cluster's REST API."""

    def __init__(self, table_result, port, parallelism, submitted_wall):
        self.j_client = table_result.get_job_client()._j_job_client
        self.job_id = str(self.j_client.getJobID().toString())
        self.port = port
        self.parallelism = parallelism
        self.submitted_wall = submitted_wall  # time.time() just before execute_sql

    def rest(self, path, deadline):
        url = f"http://127.0.0.1:{self.port}{path}"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    return json.load(r)
            except (urllib.error.URLError, OSError, ValueError) as e:
                if time.monotonic() > deadline:
                    raise BenchError(f"REST {url}: {e}")
                time.sleep(0.1)

    def vertices(self, deadline):
        """Returns (job json, {'fill': v, 'tick': v, 'agg': v})."""
        job = self.rest(f"/jobs/{self.job_id}", deadline)
        if job["state"] in ("FAILED", "CANCELED", "FINISHED"):
            raise BenchError(f"job {self.job_id} is {job['state']} (see Flink's log above)")
        by_role = {}
        for v in job["vertices"]:
            name = v["name"]
            role = "fill" if name.startswith("Source: fill") else "tick" if name.startswith("Source: tick") else "agg"
            if role in by_role:
                raise BenchError(f"unexpected job graph: {[x['name'] for x in job['vertices']]}")
            by_role[role] = v
        if set(by_role) != {"fill", "tick", "agg"}:
            raise BenchError(f"unexpected job graph: {[x['name'] for x in job['vertices']]}")
        return job, by_role


class Bench:
    def __init__(self, args, state_dir, durable, s3):
        self.args = args
        self.state_dir = state_dir
        self.durable = durable  # savepoints and checkpoints: a file:// or s3:// URI
        self.s3 = s3  # flink_s3.S3 for --storage s3
        self.keys = math.ceil(args.state_bytes / args.value_bytes)
        self.state_bytes = self.keys * args.value_bytes
        self.savepoint_dir = durable + "/savepoints"

    # ---- jobs ----

    def submit(self, parallelism, restore_path=None):
        from pyflink.common import Configuration
        from pyflink.table import EnvironmentSettings, TableEnvironment

        port = free_port()
        conf = Configuration()
        conf.set_string("state.backend.type", "rocksdb")
        conf.set_string("state.backend.rocksdb.localdir", os.path.join(self.state_dir, "rocksdb"))
        conf.set_string("io.tmp.dirs", os.path.join(self.state_dir, "tmp"))
        # Savepoints above a few MB need a file-system checkpoint storage (the default
        # JobManager storage caps state at 5 MB). Periodic checkpoints stay off.
        conf.set_string("execution.checkpointing.storage", "filesystem")
        conf.set_string("execution.checkpointing.dir", self.durable + "/checkpoints")
        if self.s3:
            flink_s3.apply(conf, self.s3.flink_conf())
        conf.set_string("parallelism.default", str(parallelism))
        conf.set_string("table.exec.mini-batch.enabled", "false")
        conf.set_string("rest.port", str(port))
        conf.set_string("rest.bind-port", str(port))
        conf.set_string("rest.address", "127.0.0.1")
        conf.set_string("rest.bind-address", "127.0.0.1")
        # Fresher REST answers (execution graph cache, metrics) for the polling below.
        conf.set_string("web.refresh-interval", "200")
        conf.set_string("metrics.fetcher.update-interval", "500")
        if self.args.managed_memory:
            conf.set_string("taskmanager.memory.managed.size", self.args.managed_memory)
        if restore_path:
            conf.set_string("execution.state-recovery.path", restore_path)

        settings = EnvironmentSettings.new_instance().in_streaming_mode().with_configuration(conf).build()
        t_env = TableEnvironment.create(settings)
        n, v = self.keys, self.args.value_bytes
        # 'fill' writes every key once (the sequence is split among the source subtasks);
        # rows-per-second defaults to 10,000, so raise it. 'tick' keeps the job running.
        t_env.execute_sql(f"""
            CREATE TEMPORARY TABLE fill (k BIGINT, v BYTES) WITH (
              'connector' = 'datagen',
              'rows-per-second' = '1000000000',
              'fields.k.kind' = 'sequence', 'fields.k.start' = '0', 'fields.k.end' = '{n - 1}',
              'fields.v.kind' = 'random', 'fields.v.length' = '{v}'
            )""")
        t_env.execute_sql(f"""
            CREATE TEMPORARY TABLE tick (k BIGINT, v BYTES) WITH (
              'connector' = 'datagen',
              'rows-per-second' = '10',
              'fields.k.kind' = 'random', 'fields.k.min' = '0', 'fields.k.max' = '{n - 1}',
              'fields.v.kind' = 'random', 'fields.v.length' = '{v}'
            )""")
        t_env.execute_sql("CREATE TEMPORARY TABLE snk (k BIGINT, v BYTES) WITH ('connector' = 'blackhole')")
        query = ("INSERT INTO snk SELECT k, LAST_VALUE(v) AS v "
                 "FROM (SELECT k, v FROM fill UNION ALL SELECT k, v FROM tick) GROUP BY k")
        if not hasattr(self, "_plan_logged"):
            self._plan_logged = True
            log("plan:\n" + t_env.explain_sql(query))
        what = f"restoring {restore_path}" if restore_path else "building the state"
        log(f"submitting at parallelism {parallelism}, {what} (REST port {port})")
        submitted = time.time()
        job = Job(t_env.execute_sql(query), port, parallelism, submitted)
        log(f"job {job.job_id} submitted")
        return job

    def wait_built(self, job):
        """Waits until fill has finished and the aggregation has read all its rows."""
        deadline = time.monotonic() + self.args.timeout
        start = time.perf_counter()
        last_log = 0.0
        while True:
            _, vs = job.vertices(deadline)
            fill, tick, agg = vs["fill"], vs["tick"], vs["agg"]
            written = fill["metrics"]["write-records"]
            read = agg["metrics"]["read-records"]
            done = (fill["status"] == "FINISHED" and written == self.keys
                    and read >= written + tick["metrics"]["write-records"])
            now = time.perf_counter()
            if done or now - last_log >= 10:
                last_log = now
                log(f"building: fill {fill['status']} wrote {written}/{self.keys}, "
                    f"aggregation read {read} ({now - start:.0f} s)")
            if done:
                return now - start
            if time.monotonic() > deadline:
                raise BenchError(f"state not built after {self.args.timeout} s")
            time.sleep(0.5)

    def wait_restored(self, job, restore_path):
        """Waits until every subtask of the restored job is RUNNING (or, for the finished
        'fill' source, FINISHED); returns the timings from the cluster's own timestamps."""
        deadline = time.monotonic() + self.args.timeout
        while True:
            info, vs = job.vertices(deadline)
            pending = {name: {s: c for s, c in v["tasks"].items() if c and s not in ("RUNNING", "FINISHED")}
                       for name, v in vs.items()}
            if (not any(pending.values()) and vs["agg"]["tasks"]["RUNNING"] == job.parallelism
                    and vs["tick"]["tasks"]["RUNNING"] == job.parallelism):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"job not running after {self.args.timeout} s: {pending}")
            time.sleep(0.1)
        # The cluster's timestamps (ms since the epoch, same clock as time.time()).
        submitted_ms = info.get("timestamps", {}).get("INITIALIZING") or info["start-time"]
        last_running_ms = 0
        state_init_ms = 0
        for role, v in vs.items():
            times = job.rest(f"/jobs/{job.job_id}/vertices/{v['id']}/subtasktimes", deadline)
            for st in times["subtasks"]:
                ts = st["timestamps"]
                if not ts.get("RUNNING"):
                    raise BenchError(f"subtask {st['subtask']} of {v['name']} has no RUNNING time: {ts}")
                last_running_ms = max(last_running_ms, ts["RUNNING"])
                if role == "agg":
                    state_init_ms = max(state_init_ms, ts["RUNNING"] - ts["INITIALIZING"])
        cps = job.rest(f"/jobs/{job.job_id}/checkpoints", deadline)
        restored = (cps.get("latest") or {}).get("restored") or {}
        if not restored.get("is_savepoint") or not same_path(restored.get("external_path", ""), restore_path):
            raise BenchError(f"job {job.job_id} did not report restoring {restore_path}: {restored}")
        return {
            "restore_seconds": round((last_running_ms - submitted_ms) / 1000, 3),
            "restore_wall_seconds": round(last_running_ms / 1000 - job.submitted_wall, 3),
            "state_init_seconds": round(state_init_ms / 1000, 3),
        }

    def stop_with_savepoint(self, job):
        from py4j.protocol import Py4JJavaError
        from pyflink.java_gateway import get_gateway

        # PyFlink's JobClient.stop_with_savepoint calls a Java signature Flink 2.x no longer
        # has (it lacks the SavepointFormatType): call the Java JobClient directly.
        canonical = get_gateway().jvm.org.apache.flink.core.execution.SavepointFormatType.CANONICAL
        target = self.savepoint_dir
        log(f"stop-with-savepoint of job {job.job_id} at parallelism {job.parallelism}")
        start = time.perf_counter()
        try:
            path = str(job.j_client.stopWithSavepoint(False, target, canonical).get())
            seconds = time.perf_counter() - start
            job.j_client.getJobExecutionResult().get()  # raises unless the job FINISHED
            stopped = time.perf_counter() - start
        except Py4JJavaError as e:
            raise BenchError(f"stop-with-savepoint of job {job.job_id} failed: {e.java_exception}")
        files, size = flink_s3.du(path)
        log(f"savepoint {path}: {files} files, {size} bytes in {seconds:.3f} s "
            f"(job finished after {stopped:.3f} s)")
        if size < 0.95 * self.state_bytes:
            raise BenchError(f"savepoint {path} holds {size} bytes, less than 95 % of the "
                             f"{self.state_bytes} bytes of state: state was lost")
        return {"parallelism": job.parallelism, "path": path, "seconds": round(seconds, 3),
                "stopped_seconds": round(stopped, 3), "bytes": size}

    def cancel(self, job):
        from py4j.protocol import Py4JJavaError

        log(f"cancelling job {job.job_id}")
        try:
            job.j_client.cancel().get()
        except Py4JJavaError as e:
            raise BenchError(f"cancelling job {job.job_id} failed: {e.java_exception}")
        try:
            job.j_client.getJobExecutionResult().get()
        except Py4JJavaError:
            pass  # a cancelled job's result is an exception: expected

    # ---- the benchmark ----

    def run(self):
        a = self.args
        pairs = a.pairs
        log(f"state {self.state_bytes} bytes = {self.keys} keys x {a.value_bytes} bytes; pairs "
            f"{','.join(f'{x}:{y}' for x, y in pairs)}; state dir {self.state_dir}")
        savepoints = {}  # parallelism -> savepoint dict

        first = pairs[0][0]
        job = self.submit(first)
        fill_seconds = self.wait_built(job)
        log(f"state built in {fill_seconds:.1f} s; settling {a.settle_seconds} s")
        time.sleep(a.settle_seconds)
        savepoints[first] = self.stop_with_savepoint(job)

        runs = []
        for i, (p_from, p_to) in enumerate(pairs):
            if p_from not in savepoints:
                # No job has run at p_from yet: restore the first savepoint there (untimed),
                # then take the timed stop-with-savepoint at p_from.
                job = self.submit(p_from, savepoints[first]["path"])
                self.wait_restored(job, savepoints[first]["path"])
                savepoints[p_from] = self.stop_with_savepoint(job)
            sp = savepoints[p_from]
            job = self.submit(p_to, sp["path"])
            timing = self.wait_restored(job, sp["path"])
            log(f"{p_from}:{p_to}: restored in {timing['restore_seconds']} s from submission "
                f"({timing['restore_wall_seconds']} s from the SQL call, state init "
                f"{timing['state_init_seconds']} s)")
            runs.append({"from": p_from, "to": p_to, "savepoint_seconds": sp["seconds"],
                         "stopped_seconds": sp["stopped_seconds"], "savepoint_bytes": sp["bytes"],
                         **timing})
            if p_to not in savepoints and any(x == p_to for x, _ in pairs[i + 1:]):
                savepoints[p_to] = self.stop_with_savepoint(job)
            else:
                self.cancel(job)

        return {
            "engine": "flink",
            "version": FLINK_VERSION,
            "state_bytes": self.state_bytes,
            "keys": self.keys,
            "value_bytes": a.value_bytes,
            "savepoint_bytes": savepoints[first]["bytes"],
            "savepoint_format": "canonical",
            "fill_seconds": round(fill_seconds, 1),
            "runs": runs,
            "savepoints": [{k: v for k, v in sp.items() if k != "path"} for sp in savepoints.values()],
            "managed_memory": a.managed_memory or "default (128m)",
            "measures": {
                "savepoint_seconds": "stopWithSavepoint(drain=false, CANONICAL) call until its "
                                     "future returns the path (savepoint complete and job FINISHED)",
                "stopped_seconds": "same start until the client holds the FINISHED job result",
                "restore_seconds": "job INITIALIZING at the JobManager (submission) until the "
                                   "last subtask RUNNING (state restored)",
                "restore_wall_seconds": "SQL execute call (planning, mini-cluster start) until "
                                        "the last subtask RUNNING",
                "state_init_seconds": "longest INITIALIZING->RUNNING of one aggregation subtask",
            },
        }


if __name__ == "__main__":
    main()
