"""Upgrade downtime of a rescale under the controller: one size of keyed state, one run.

Run by bench/upgrades.sh inside the test environment (its env.sh sourced), with the python of
the test virtualenv ($WEIR_PYTHON: boto3, pyyaml). What it does, for SIZE MiB:

1. Raw bandwidth of the S3 server (Garage of the test environment), in this run: one object of
   SIZE MiB (random bytes) written as a multipart upload of 8 MiB parts, 4 in flight, then read
   back with ranged GETs of 8 MiB, 4 in flight; the object is deleted after.
2. A StreamJob at parallelism 2 under `weir-controller --poll-interval 1s` (namespace of its
   own, release binaries), checkpoints every second on S3, two branches:
     fill (generator: text lines of 8 random words, keys in [0, 10^12))
       -> state (count keyed by the whole line: one new key of ~110 bytes per line)
       -> drop (blackhole)
     tick (generator, unbounded, --tick-rate records/s, 1000 keys)
       -> counts (count by key) -> out (file_sink on S3, parts committed on every checkpoint)
   `fill` runs at up to N / --build-seconds lines/s until `state` has read N lines (less one
   second's worth, the time the next step takes to stop it), N chosen so that the keyed
   state holds about SIZE MiB as a savepoint writes it (uncompressed entries; RocksDB's own
   estimate, `stateBytes`, LZ4-compressed, is printed beside it). `fill` cannot be bounded:
   once a source has ended, its job takes no checkpoint and no savepoint any more. So the job
   is then applied again with `fill` at --slow-fill-rate lines/s (default 100: a generator
   subtask sleeps until its next record is due and takes no barrier meanwhile, so a slower one
   would hold every checkpoint back), a savepoint upgrade at the same parallelism, not
   measured; it runs --steady-seconds after its first checkpoint.
3. `kubectl scale sj/NAME --replicas 3`, and while the upgrade runs a monitor follows the
   StreamJob through a watch (every status write: phase, upgrade step) and samples every 200
   to 300 ms the pods, every coordinator's API (/v1/job, /v1/savepoints, /v1/checkpoints) and
   the output prefix on S3.
4. Downtime = LastModified of the first part committed by the new job (`part-<new job id>-*`)
   - LastModified of the last part committed by the old one (`part-<old job id>-*`). Garage
   gives LastModified to the millisecond; the monitor's first sighting of each part (a list
   every 300 ms) is printed beside it as a check. The breakdown comes from the coordinators'
   APIs (savepoint request time, duration and bytes; the new run's start, Running, first
   checkpoint), the workers' logs (each restored subtask's "restored key groups" line), the
   controller's log (objects applied) and the status steps as the monitor saw them.
   Stall = the same first part - the stop-with-savepoint request (the sources stop at its
   barrier): unlike the downtime it holds the savepoint's upload, because the old job commits
   its last part once the savepoint completes.

Prints a table and one JSON line (prefix `RESULT `) on stdout; progress on stderr.
"""

import argparse
import concurrent.futures as futures
import datetime as dt
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import boto3
import yaml
from botocore.config import Config

MIB = 1 << 20
PART = 8 * MIB
# Bytes a `state` entry takes in a savepoint's keyed file (varint lengths, the key group, the
# ~110-byte line, the count); checked against the savepoint's size in every run.
ENTRY_BYTES = 123


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# Kubernetes, through the apiserver's REST API with the test environment's kubeconfig.


class Kube:
    def __init__(self, path):
        cfg = yaml.safe_load(open(path))
        cluster = cfg["clusters"][0]["cluster"]
        self.server = cluster["server"]
        self.token = cfg["users"][0]["user"]["token"]
        self.ctx = ssl.create_default_context(cafile=cluster["certificate-authority"])

    def get(self, path, timeout=5):
        req = urllib.request.Request(self.server + path,
                                     headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise


def kubectl(*args, stdin=None, check=True):
    r = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {r.stdout}{r.stderr}")
    return r.stdout


def http_json(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.load(r)
    except Exception:
        return None


# ------------------------------------------------------------------------------------------
# S3


def s3_client():
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                        config=Config(max_pool_connections=16, retries={"max_attempts": 3}))


def raw_rates(s3, bucket, key, mib, inflight=4):
    """(PUT MiB/s, GET MiB/s) of one object of `mib` MiB, in 8 MiB parts, `inflight` at once."""
    size = mib * MIB
    data = os.urandom(min(size, 64 * MIB))  # parts cycle over 64 MiB of random bytes
    parts = [(i, off, min(PART, size - off)) for i, off in enumerate(range(0, size, PART), 1)]

    def body(off, n):
        o = off % len(data)
        b = data[o:o + n]
        return b if len(b) == n else b + data[:n - len(b)]

    t = time.monotonic()
    up = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]

    def put(p):
        i, off, n = p
        r = s3.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=i, Body=body(off, n))
        return {"PartNumber": i, "ETag": r["ETag"]}

    with futures.ThreadPoolExecutor(inflight) as ex:
        done = list(ex.map(put, parts))
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up,
                                 MultipartUpload={"Parts": done})
    put_s = time.monotonic() - t

    def get(p):
        _, off, n = p
        r = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{off + n - 1}")
        got = 0
        for chunk in r["Body"].iter_chunks(1 << 20):
            got += len(chunk)
        return got

    t = time.monotonic()
    with futures.ThreadPoolExecutor(inflight) as ex:
        got = sum(ex.map(get, parts))
    get_s = time.monotonic() - t
    assert got == size, (got, size)
    s3.delete_object(Bucket=bucket, Key=key)
    return mib / put_s, mib / get_s


def list_parts(s3, bucket, prefix):
    """{name: LastModified (epoch seconds)} of the committed parts under prefix."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            name = o["Key"].rsplit("/", 1)[-1]
            if name.startswith("part-"):
                out[name] = o["LastModified"].timestamp()
    return out


def delete_prefix(s3, bucket, prefix):
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [{"Key": o["Key"]} for o in page.get("Contents", [])]
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[i:i + 1000], "Quiet": True})
    return len(keys)


def parts_of(parts, job_id):
    pat = re.compile(r"^part-" + re.escape(job_id) + r"-\d+-\d+$")
    return {k: v for k, v in parts.items() if pat.match(k)}


# ------------------------------------------------------------------------------------------
# The job


def manifest(ns, name, parallelism, fill_rate, tick_rate):
    bucket = os.environ["WEIR_TEST_BUCKET"]
    return {
        "apiVersion": "weir.dev/v1alpha1", "kind": "StreamJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "parallelism": parallelism,
            "maxParallelism": 128,
            "checkpointing": {"interval": "1s", "storage": f"s3://{bucket}/{ns}/checkpoints"},
            "s3": {"endpoint": os.environ["AWS_ENDPOINT_URL"], "region": os.environ["AWS_REGION"],
                   "credentialsSecret": {"name": "s3-credentials"}},
            "pipeline": {"operators": [
                {"uid": "fill", "type": "generator", "seed": 11, "format": "text",
                 "wordsPerLine": 8, "keys": 10**12,
                 **({"ratePerSecond": fill_rate} if fill_rate else {})},
                {"uid": "state", "type": "count", "inputs": ["fill"], "key": "line"},
                {"uid": "drop", "type": "blackhole", "inputs": ["state"]},
                {"uid": "tick", "type": "generator", "seed": 12, "ratePerSecond": tick_rate,
                 "format": "kv", "keys": 1000},
                {"uid": "counts", "type": "count", "inputs": ["tick"], "key": "key"},
                {"uid": "out", "type": "file_sink", "inputs": ["counts"],
                 "path": f"s3://{bucket}/{ns}/{name}/out"},
            ]},
        },
    }


def op(info, uid):
    return next((o for o in info.get("operators", []) if o["uid"] == uid), {})


class Monitor:
    """Samples the StreamJob, its pods, its coordinators and its output while it runs."""

    def __init__(self, kube, s3, ns, name):
        self.kube, self.s3, self.ns, self.name = kube, s3, ns, name
        self.bucket = os.environ["WEIR_TEST_BUCKET"]
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.status = None
        self.steps = []          # (t, phase, upgrade step, job id, parallelism), on change
        self.pods = {}           # name -> {"first": t, "ready": t, "deleting": t, "gone": t, "ip"}
        self.runs = {}           # coordinator run id -> latest /v1/job, savepoints, checkpoints
        self.run_seen = {}       # run id -> {state: first time seen in it}
        self.part_seen = {}      # part name -> first time listed
        self.threads = [threading.Thread(target=f, daemon=True)
                        for f in (self._watch_loop, self._kube_loop, self._coord_loop,
                                  self._s3_loop)]
        for t in self.threads:
            t.start()

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join()

    def _watch_loop(self):
        """Every write of the StreamJob, as a watch delivers it (no step is missed)."""
        path = f"/apis/weir.dev/v1alpha1/namespaces/{self.ns}/streamjobs"
        while not self.stop.is_set():
            try:
                rv = self.kube.get(path)["metadata"]["resourceVersion"]
                req = urllib.request.Request(
                    f"{self.kube.server}{path}?watch=1&resourceVersion={rv}"
                    f"&fieldSelector=metadata.name%3D{self.name}&timeoutSeconds=30",
                    headers={"Authorization": f"Bearer {self.kube.token}"})
                with urllib.request.urlopen(req, context=self.kube.ctx, timeout=40) as r:
                    for line in r:
                        ev = json.loads(line)
                        if ev.get("type") in ("ADDED", "MODIFIED"):
                            self._record_job(time.time(), ev["object"])
                        if self.stop.is_set():
                            return
            except Exception as e:  # the apiserver is busy, or the watch expired: again
                if not self.stop.is_set():
                    log(f"monitor: watch: {e}")
                time.sleep(0.2)

    def _record_job(self, t, j):
        s = j.get("status", {})
        key = (s.get("phase"), (s.get("upgrade") or {}).get("step"),
               (s.get("job") or {}).get("id"), (s.get("job") or {}).get("parallelism"))
        with self.lock:
            self.status = j
            if not self.steps or self.steps[-1][1:] != key:
                self.steps.append((t, *key))

    def _kube_loop(self):
        sel = f"app.kubernetes.io/instance={self.name}"
        while not self.stop.is_set():
            try:
                pods = self.kube.get(f"/api/v1/namespaces/{self.ns}/pods?labelSelector={sel}")
            except Exception as e:  # the apiserver is busy: try again
                log(f"monitor: {e}")
                time.sleep(0.2)
                continue
            t = time.time()
            with self.lock:
                names = set()
                for p in (pods or {}).get("items", []):
                    n = p["metadata"]["name"]
                    names.add(n)
                    rec = self.pods.setdefault(n, {"first": t, "component": p["metadata"].get(
                        "labels", {}).get("app.kubernetes.io/component")})
                    rec["ip"] = p.get("status", {}).get("podIP") or rec.get("ip")
                    ready = any(c["type"] == "Ready" and c["status"] == "True"
                                for c in p.get("status", {}).get("conditions", []))
                    if ready and "ready" not in rec:
                        rec["ready"] = t
                    if p["metadata"].get("deletionTimestamp") and "deleting" not in rec:
                        rec["deleting"] = t
                for n, rec in self.pods.items():
                    if n not in names and "gone" not in rec:
                        rec["gone"] = t
            time.sleep(0.2)

    def _coord_loop(self):
        while not self.stop.is_set():
            with self.lock:
                ips = {r["ip"] for r in self.pods.values()
                       if r.get("component") == "coordinator" and r.get("ip") and "gone" not in r}
            for ip in ips:
                base = f"http://{ip}:8081/v1"
                info = http_json(f"{base}/job")
                if not info:
                    continue
                t = time.time()
                sps = http_json(f"{base}/savepoints")
                cps = http_json(f"{base}/checkpoints")
                with self.lock:
                    r = self.runs.setdefault(info["runId"], {})
                    r["job"] = info
                    if sps:
                        r["savepoints"] = sps
                    if cps:
                        r["checkpoints"] = cps
                    self.run_seen.setdefault(info["runId"], {}).setdefault(info["state"], t)
            time.sleep(0.25)

    def _s3_loop(self):
        prefix = f"{self.ns}/{self.name}/out/"
        while not self.stop.is_set():
            try:
                names = list_parts(self.s3, self.bucket, prefix)
            except Exception as e:
                log(f"monitor: listing: {e}")
                names = {}
            t = time.time()
            with self.lock:
                for n in names:
                    self.part_seen.setdefault(n, t)
            time.sleep(0.3)

    def job(self):
        with self.lock:
            return self.status

    def coordinator(self, job_id):
        """The latest /v1/job, savepoints, checkpoints of the run with this job id."""
        with self.lock:
            for run in self.runs.values():
                if run["job"].get("jobId") == job_id:
                    return run
        return None


def wait(what, limit, f, every=0.5):
    t0 = time.monotonic()
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() - t0 > limit:
            raise SystemExit(f"timed out after {limit} s waiting for {what}")
        time.sleep(every)


def restore_lines(env_dir, ns):
    """The "restored key groups" lines of every worker's log, as (pod, seconds, line)."""
    out = []
    pods_dir = os.path.join(env_dir, "node", "pods", ns)
    for pod in sorted(os.listdir(pods_dir)) if os.path.isdir(pods_dir) else []:
        d = os.path.join(pods_dir, pod)
        for f in sorted(os.listdir(d)):
            if not f.endswith(".log"):
                continue
            for line in open(os.path.join(d, f), errors="replace"):
                m = re.search(r"restored key groups .* in ([0-9.]+) s", line)
                if m:
                    out.append((pod, float(m.group(1)), line.strip()))
    return out


def controller_applies(path, since):
    """(time, what) of the controller's "applied <kind> <name>" log lines after `since`."""
    out = []
    for line in open(path, errors="replace"):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        msg = e.get("fields", {}).get("message", "")
        if msg.startswith("applied "):
            t = dt.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
            if t >= since:
                out.append((t, msg[len("applied "):]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, required=True, help="keyed state, MiB (as a savepoint holds it)")
    p.add_argument("--controller", required=True, help="weir-controller binary")
    p.add_argument("--work", required=True, help="directory for logs")
    p.add_argument("--tick-rate", type=float, default=1000.0)
    # A generator subtask sleeps until its next record is due, and takes no barrier meanwhile:
    # a slower fill holds every checkpoint back by up to 1 / (its share of the rate).
    p.add_argument("--slow-fill-rate", type=float, default=100.0)
    p.add_argument("--steady-seconds", type=float, default=10.0)
    p.add_argument("--build-seconds", type=float, default=40.0,
                   help="fill's rate during the build: the lines over this time (an upper bound)")
    p.add_argument("--from-p", type=int, default=2)
    p.add_argument("--to-p", type=int, default=3)
    p.add_argument("--raw-mib", type=int, help="size of the raw PUT/GET object (default: --mib)")
    p.add_argument("--keep", action="store_true", help="leave the namespace and S3 objects")
    a = p.parse_args()
    # Killed: clean up as on an error (the controller, the namespace, the objects).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    env_dir = os.environ["WEIR_TESTENV_DIR"]
    bucket = os.environ["WEIR_TEST_BUCKET"]
    kube = Kube(os.environ["KUBECONFIG"])
    s3 = s3_client()
    ns, name = f"upgrade-{a.mib}m", "job"
    lines = a.mib * MIB // ENTRY_BYTES
    phases = {}
    result = {"mib": a.mib, "lines": lines, "from": a.from_p, "to": a.to_p}

    # 1. The server's raw bandwidth.
    raw_mib = a.raw_mib or a.mib
    t = time.monotonic()
    put_rate, get_rate = raw_rates(s3, bucket, f"{ns}-raw/object", raw_mib)
    phases["raw PUT and GET"] = time.monotonic() - t
    result.update(raw_mib=raw_mib, put_mib_s=put_rate, get_mib_s=get_rate)
    log(f"raw: PUT {put_rate:.0f} MiB/s, GET {get_rate:.0f} MiB/s ({raw_mib} MiB, 8 MiB parts, 4 in flight)")

    # 2. The controller and the job.
    kubectl("create", "namespace", ns)
    kubectl("-n", ns, "create", "secret", "generic", "s3-credentials",
            f"--from-literal=AWS_ACCESS_KEY_ID={os.environ['AWS_ACCESS_KEY_ID']}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={os.environ['AWS_SECRET_ACCESS_KEY']}")
    ctl_log = os.path.join(a.work, f"controller-{ns}.log")
    ctl = subprocess.Popen(
        [a.controller, "--namespace", ns, "--metrics-addr", "127.0.0.1:0", "--poll-interval", "1s"],
        stdout=open(ctl_log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "WEIR_LOG": "info,kube=warn", "NO_COLOR": "1"})
    mon = None
    try:
        mon = Monitor(kube, s3, ns, name)
        def running(not_id, parallelism):
            """The run of the StreamJob once it runs at `parallelism` under a job id other
            than `not_id`, with no upgrade under way."""
            j = mon.job()
            s = (j or {}).get("status", {})
            if s.get("phase") in ("Failed", "RollingBack") or ctl.poll() is not None:
                raise SystemExit(f"the job failed or the controller exited: {json.dumps(s)}")
            u = s.get("upgrade") or {}
            if u and str(u.get("mode")).lower() != "savepoint":
                raise SystemExit(f"the upgrade went in {u.get('mode')} mode, not Savepoint (the "
                                 f"controller did not reach the old coordinator?): {json.dumps(s)}")
            r = s.get("job") or {}
            if (s.get("phase") == "Running" and not s.get("upgrade")
                    and r.get("parallelism") == parallelism and r.get("id") != not_id):
                return mon.coordinator(r["id"])
            return None

        def apply(fill_rate):
            m = manifest(ns, name, a.from_p, fill_rate, a.tick_rate)
            kubectl("apply", "-f", "-", stdin=json.dumps(m))

        t = time.monotonic()
        fill_rate = lines / a.build_seconds
        apply(fill_rate)
        log(f"applied at parallelism {a.from_p}: `fill` at up to {fill_rate:,.0f} lines/s")
        first = wait("the job running", 300, lambda: running(None, a.from_p))
        first_id = first["job"]["jobId"]
        phases["deploy (apply -> Running)"] = time.monotonic() - t
        t = time.monotonic()
        last_print = [0.0]

        def built():
            run = running(None, a.from_p)
            info = run["job"] if run else {}
            n = op(info, "state").get("recordsIn", 0)
            if time.monotonic() - last_print[0] > 15:
                last_print[0] = time.monotonic()
                log(f"building: {n}/{lines} lines, stateBytes {info.get('stateBytes', 0) / MIB:.0f} MiB")
            # The savepoint's barrier leaves the sources about a second after the next apply.
            return n >= lines - fill_rate

        wait("the state built", 3600, built, every=0.25)
        phases["build the state"] = time.monotonic() - t
        # A source that ends stops every checkpoint of its job (and a savepoint then never
        # starts), so `fill` cannot be bounded: it is slowed down by an upgrade instead.
        t = time.monotonic()
        apply(a.slow_fill_rate)
        log(f"applied again with `fill` at {a.slow_fill_rate:g} lines/s (a savepoint upgrade at the same parallelism)")
        run = wait("the job slowed down", 1800, lambda: running(first_id, a.from_p), every=0.5)
        old_id = run["job"]["jobId"]
        phases["upgrade to the slow fill (savepoint, restore at the same parallelism)"] = time.monotonic() - t
        t = time.monotonic()
        wait("a checkpoint of the slow job", 600,
             lambda: (mon.coordinator(old_id) or {}).get("job", {}).get("lastCheckpoint"))
        phases["its first checkpoint"] = time.monotonic() - t
        t = time.monotonic()
        time.sleep(a.steady_seconds)
        phases["steady running"] = time.monotonic() - t
        info = mon.coordinator(old_id)["job"]
        ck = info.get("lastCheckpoint") or {}
        result.update(old_job=old_id, state_bytes=info["stateBytes"],
                      checkpoint_size_bytes=ck.get("sizeBytes"))
        log(f"built: stateBytes {info['stateBytes'] / MIB:.0f} MiB (RocksDB), last checkpoint "
            f"{ck.get('id')} of {ck.get('sizeBytes', 0) / MIB:.0f} MiB in {ck.get('durationMs')} ms")
        ncommitted = len(parts_of(list_parts(s3, bucket, f"{ns}/{name}/out/"), old_id))
        log(f"{ncommitted} parts committed by job {old_id} so far")

        # 3. The rescale.
        t_scale = time.time()
        t = time.monotonic()
        kubectl("-n", ns, "scale", f"sj/{name}", "--replicas", str(a.to_p))
        log(f"kubectl scale sj/{name} --replicas {a.to_p}")

        new_id = wait("the upgrade", 1800, lambda: running(old_id, a.to_p), every=0.2)["job"]["jobId"]
        phases["rescale (scale -> status Running, upgrade done)"] = time.monotonic() - t
        t_done = time.time()
        wait("a part committed by the new job", 300,
             lambda: any(parts_of(dict.fromkeys(mon.part_seen, 0), new_id)), every=0.2)
        time.sleep(3)  # the first parts of every new subtask, and the coordinators' latest
        mon.close()

        # 4. The figures.
        parts = list_parts(s3, bucket, f"{ns}/{name}/out/")
        olds, news = parts_of(parts, old_id), parts_of(parts, new_id)
        last_old = max(olds.values())
        first_new = min(news.values())
        seen_old = max(mon.part_seen[k] for k in olds)
        seen_new = min(mon.part_seen[k] for k in news if k in mon.part_seen)
        old = mon.coordinator(old_id)
        new = mon.coordinator(new_id)
        sp = next(s for s in old["savepoints"]["savepoints"] if s["stop"])
        sp_start = sp["requestedAt"] / 1000
        sp_end = sp_start + sp["durationMs"] / 1000
        new_started = new["job"]["startedAt"] / 1000
        new_running = mon.run_seen[new["job"]["runId"]].get("running")
        hist = sorted(new["checkpoints"]["history"], key=lambda c: c["id"])
        first_ck = next((c for c in hist if c["status"] == "completed"), None)
        restores = restore_lines(env_dir, ns)
        # Each worker's last restore is this one's (workers 0 and 1 restored before, at 2).
        restores = {r[0]: r for r in restores if re.search(r": state-\d+: ", r[2])}
        restores = list(restores.values())
        applies = controller_applies(ctl_log, t_scale)
        steps = [(t, ph, st) for (t, ph, st, _, _) in mon.steps if t >= t_scale - 1]
        step_at = {}
        for (ts, ph, st) in steps:
            step_at.setdefault(st or ph, ts)
        coord_pods = {n: r for n, r in mon.pods.items() if r.get("component") == "coordinator"}
        old_coord_gone = min((r["gone"] for r in coord_pods.values()
                              if r["first"] < t_scale and r.get("gone", t_scale) >= t_scale), default=None)
        new_coord = [r for r in coord_pods.values() if r["first"] >= t_scale]
        new_coord_first = min((r["first"] for r in new_coord), default=None)

        m = sp["path"].removeprefix(f"s3://{bucket}/") + "/_metadata"
        body = s3.get_object(Bucket=bucket, Key=m)["Body"].read()
        meta = json.loads(body[body.index(b"{"):])
        files = [o["keyedFile"] for o in meta["operators"] if o["uid"] == "state" and o.get("keyedFile")]
        entries = sum(f["entries"] for f in files)
        result.update(entries=entries, state_file_bytes=sum(f["offsets"][-1] for f in files))
        downtime = first_new - last_old
        stall = first_new - sp_start
        sp_bytes = sp["sizeBytes"]
        transfer = sp_bytes / MIB / put_rate + sp_bytes / MIB / get_rate
        events = []
        ev = kube.get(f"/apis/events.k8s.io/v1/namespaces/{ns}/events") or {}
        for e in ev.get("items", []):
            ts = e.get("eventTime") or e["metadata"].get("creationTimestamp")
            if (e.get("regarding") or {}).get("kind") == "StreamJob":
                events.append((ts, e.get("reason"), e.get("note")))
        events.sort()

        rel = lambda x: None if x is None else round(x - t_scale, 3)
        timeline = [
            ("kubectl scale", t_scale),
            ("status: upgrade SavepointRequested (seen)", step_at.get("SavepointRequested")),
            ("old coordinator: stop-with-savepoint requested", sp_start),
            ("old coordinator: savepoint completed", sp_end),
            ("last part committed by the old job (LastModified)", last_old),
            ("status: upgrade OldJobStopped (seen)", step_at.get("OldJobStopped")),
            ("status: upgrade NewSpecApplied (seen)", step_at.get("NewSpecApplied")),
            ("controller: first object applied", applies[0][0] if applies else None),
            ("old coordinator pod gone", old_coord_gone),
            ("new coordinator pod created (seen)", new_coord_first),
            ("new coordinator started (its startedAt)", new_started),
            ("status: upgrade Restoring (seen)", step_at.get("Restoring")),
            ("new job Running (coordinator API, seen)", new_running),
            ("new job: restores done (estimate: its start + the longest restore)",
             new_started + max((r[1] for r in restores), default=0)),
            ("new job: first checkpoint triggered", first_ck and first_ck["triggerTime"] / 1000),
            ("new job: first checkpoint completed",
             first_ck and (first_ck["triggerTime"] + first_ck["durationMs"]) / 1000),
            ("first part committed by the new job (LastModified)", first_new),
            ("status: Running at the new parallelism, upgrade done (seen)", t_done),
        ]
        result.update(
            new_job=new_id, downtime_s=downtime, downtime_seen_s=seen_new - seen_old,
            savepoint_bytes=sp_bytes, savepoint_s=sp["durationMs"] / 1000,
            transfer_s=transfer, beyond_transfer_s=downtime - transfer, stall_s=stall,
            restore_s={r[0]: r[1] for r in restores},
            first_checkpoint=first_ck, applies=[(rel(x), w) for x, w in applies],
            timeline={k: rel(v) for k, v in timeline}, phases=phases,
            steps=[(rel(t), ph, st, jid, par) for (t, ph, st, jid, par) in mon.steps],
        )

        # The table.
        print(f"\n=== rescale {a.from_p} -> {a.to_p} with {a.mib} MiB of keyed state "
              f"({entries:,} keys; savepoint {sp_bytes / MIB:.0f} MiB, "
              f"RocksDB estimate {result['state_bytes'] / MIB:.0f} MiB)")
        print("phases of the run:")
        for k, v in phases.items():
            print(f"  {k:<52} {v:8.1f} s")
        print(f"timeline of the rescale (seconds after kubectl scale; 'seen': as a watch (status) or a poll every 0.2-0.3 s (pods, coordinators) saw it):")
        for k, v in timeline:
            print(f"  {k:<62} {'' if v is None else f'{v - t_scale:8.2f}'}")
        print("restores (worker logs):")
        for pod, secs, line in restores:
            print(f"  {pod}: {line.split(': ', 1)[-1]}")
        print(f"savepoint: {sp_bytes / MIB:.0f} MiB in {sp['durationMs'] / 1000:.2f} s; `state`: "
              f"{entries:,} entries, {result['state_file_bytes'] / entries:.1f} bytes each in its files")
        if first_ck:
            print(f"new job's first checkpoint: {first_ck['durationMs'] / 1000:.2f} s, "
                  f"{first_ck['uploadedBytes'] / MIB:.0f} MiB uploaded of {first_ck['sizeBytes'] / MIB:.0f} MiB")
        print("the StreamJob's events:")
        for ts, reason, note in events:
            print(f"  {ts} {reason}: {note}")
        print(f"{'size':>6} {'savepoint':>10} {'raw PUT':>9} {'raw GET':>9} {'transfer':>9} "
              f"{'downtime':>9} {'(seen)':>8} {'beyond':>8} {'target':>7} {'stall':>8} {'beyond':>8}")
        print(f"{a.mib:>4}Mi {sp_bytes / MIB:>7.0f}MiB {put_rate:>5.0f}MB/s {get_rate:>5.0f}MB/s "
              f"{transfer:>8.2f}s {downtime:>8.2f}s {seen_new - seen_old:>7.2f}s "
              f"{downtime - transfer:>7.2f}s {'met' if downtime - transfer <= 10 else 'MISSED':>7} "
              f"{stall:>7.2f}s {stall - transfer:>7.2f}s")
        print("(MB/s: MiB/s. transfer: savepoint bytes / raw PUT rate + savepoint bytes / raw GET rate. "
              "downtime: last part committed by the old job to the first by the new, (seen): the same "
              "from the monitor's listings; target: downtime - transfer <= 10 s. stall: from the "
              "stop-with-savepoint request (the sources stop at its barrier) to the first part "
              "committed by the new job; it holds the savepoint's upload, which the downtime does not: "
              "the old job's last part is committed once the savepoint completes.)")
        print("RESULT " + json.dumps(result))
    finally:
        if mon:
            mon.close()
        ctl.terminate()
        ctl.wait()
        if not a.keep:
            # The finalizer would take a final savepoint: the controller is gone, drop it.
            kubectl("-n", ns, "patch", f"sj/{name}", "--type", "merge",
                    "-p", '{"metadata":{"finalizers":null}}', check=False)
            kubectl("delete", "namespace", ns, "--wait=false", check=False)
            n = delete_prefix(s3, bucket, f"{ns}/")
            log(f"cleaned up: namespace {ns} deleted, {n} S3 objects removed")


if __name__ == "__main__":
    main()
