//! Savepoints as a user takes them: `weir savepoint --api … --stop` against a running
//! `weir run`, then `weir run --from-savepoint` at another parallelism, with another version of
//! the pipeline, from a copy of the savepoint, and on the real S3 server. The committed output
//! must hold every count of every word exactly once, as an uninterrupted run's does.

mod common;
mod process;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use process::{Proc, WEIR};

const TOKEN: &str = "savepoint-test-token";

/// Where a test keeps its checkpoints and savepoints, and the S3 settings when on S3.
struct Storage {
    checkpoints: String,
    savepoints: String,
    s3: String,
}

impl Storage {
    fn local(dir: &Path) -> Self {
        Self {
            checkpoints: dir.join("checkpoints").display().to_string(),
            savepoints: dir.join("savepoints").display().to_string(),
            s3: String::new(),
        }
    }
}

/// A word count read at `rate` lines per second per subtask. `extra` operators go at the end.
fn manifest(
    dir: &Path,
    name: &str,
    st: &Storage,
    rate: u32,
    extra: &str,
    restore: &str,
) -> PathBuf {
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: wc-savepoints}}
spec:
  parallelism: 2
  maxParallelism: 128
  checkpointing: {{interval: 1s, storage: '{chk}'}}
  savepoints: {{directory: '{sp}'}}
  restartStrategy: {{type: fixed-delay, delay: 200ms, attempts: 100}}
{restore}{s3}  pipeline:
    operators:
      - {{uid: lines,  type: file_source, path: {input}, ratePerSecond: {rate}}}
      - {{uid: words,  type: split, inputs: [lines]}}
      - {{uid: counts, type: count, inputs: [words], key: word}}
      - {{uid: out,    type: file_sink, inputs: [counts], path: {out}}}
{extra}",
            chk = st.checkpoints,
            sp = st.savepoints,
            s3 = st.s3,
            input = dir.join("in").display(),
            out = dir.join("out").display(),
        ),
    )
    .unwrap();
    file
}

/// `weir run FILE` in the background with its API on a free port and the API token set.
fn run(file: &Path, dir: &Path, args: &[&str]) -> Proc {
    let state = dir.join("state");
    let mut all = vec!["run", file.to_str().unwrap(), "--api-addr", "127.0.0.1:0"];
    all.extend(["--state-dir", state.to_str().unwrap()]);
    all.extend(args);
    process::start_with_env(&all, &[("WEIR_API_TOKEN", TOKEN)])
}

fn job_state(api: &str) -> Option<String> {
    let (code, body) = process::request(api, "GET", "/v1/job", None)?;
    let v: serde_json::Value = serde_json::from_str(&body).ok().filter(|_| code == 200)?;
    v["state"].as_str().map(str::to_string)
}

fn wait_running(job: &mut Proc) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        assert!(job.child.try_wait().unwrap().is_none(), "the job ended before it ran");
        if job_state(&job.addr("api")).as_deref() == Some("running") {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the job did not start running");
}

/// `weir savepoint --api ADDR ARGS…`: exit code, stdout, stderr.
fn savepoint_cli(api: &str, args: &[&str], token: Option<&str>) -> (Option<i32>, String, String) {
    let mut c = Command::new(WEIR);
    c.args(["savepoint", "--api", api]).args(args).env_remove("WEIR_API_TOKEN");
    if let Some(t) = token {
        c.env("WEIR_API_TOKEN", t);
    }
    let out = c.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Stops the job with a savepoint (`weir savepoint --stop`); returns the savepoint's path
/// and the job's stderr. The job must end by itself, successfully.
fn stop_with_savepoint(job: Proc) -> (String, String) {
    let api = job.addr("api");
    let (code, path, err) = savepoint_cli(&api, &["--stop"], Some(TOKEN));
    assert_eq!(code, Some(0), "weir savepoint --stop: {err}");
    assert!(err.contains("completed") && err.contains("the job stopped"), "{err}");
    let (code, job_err) = job.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "the job after its stopping savepoint: {job_err}");
    assert!(job_err.contains("then the job stops"), "{job_err}");
    assert!(!job_err.contains("final checkpoint"), "a stopped job drains nothing: {job_err}");
    (path, job_err)
}

/// The committed counts so far: each word's counts must be 1..=k, each exactly once (what an
/// uninterrupted run has committed at some moment). Returns k per word.
fn committed_prefix(out: &Path) -> BTreeMap<String, u64> {
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for text in common::committed_texts(out) {
        for line in text.lines() {
            let (w, c) = line.rsplit_once(',').unwrap();
            seen.entry(w.to_string()).or_default().push(c.parse().unwrap());
        }
    }
    seen.into_iter()
        .map(|(w, mut counts)| {
            counts.sort_unstable();
            let k = counts.len() as u64;
            assert_eq!(counts, (1..=k).collect::<Vec<_>>(), "counts of {w:?}");
            (w, k)
        })
        .collect()
}

/// Reads a savepoint's metadata (local ones).
fn metadata(dir: &Path) -> weir_runtime::checkpoint::Metadata {
    let bytes = std::fs::read(dir.join("_metadata")).unwrap();
    weir_runtime::checkpoint::Metadata::parse(&bytes, "test", None).unwrap()
}

/// Parallelism 2, stopped into a savepoint part-way; restored at 3, stopped again; restored
/// at 1 and run to the end. `copy`: each savepoint is moved to another directory first.
/// Runs at parallelism 2, 3 and 1 with the state backends `backends`, each run stopped into a
/// savepoint that the next restores.
fn rescale_chain(tmp: &Path, st: &Storage, seed: u64, copy: bool, backends: [&str; 3]) {
    let expected = common::write_input(&tmp.join("in"), 8, 1500, seed);
    let file = manifest(tmp, "job", st, 1000, "", "");
    let mut from: Option<String> = None;
    let mut committed = 0;
    for (k, p) in [2u32, 3, 1].into_iter().enumerate() {
        let ps = p.to_string();
        let mut args = vec!["--parallelism", ps.as_str(), "--state-backend", backends[k]];
        if let Some(f) = &from {
            args.extend(["--from-savepoint", f.as_str()]);
        }
        let mut job = run(&file, tmp, &args);
        wait_running(&mut job);
        if k == 2 {
            let (code, err) = job.finish(Duration::from_secs(300));
            assert_eq!(code, Some(0), "the last run: {err}");
            assert!(
                err.contains("savepoint (checkpoint") && err.contains("parallelism 3"),
                "{err}"
            );
            assert!(err.contains("restored key groups 0..=127"), "{err}");
            break;
        }
        std::thread::sleep(Duration::from_millis(1500));
        let (path, err) = stop_with_savepoint(job);
        if k == 1 {
            assert!(err.contains("restored key groups"), "{err}");
            assert!(
                err.contains("state taken at parallelism 2 at parallelism 3"),
                "restored at another parallelism: {err}"
            );
        }
        // Everything before the savepoint is committed, nothing twice, and more than before.
        let now: u64 = committed_prefix(&tmp.join("out")).values().sum();
        assert!(now > committed, "run {k} committed nothing");
        committed = now;
        let expected_total: u64 = expected.values().sum();
        assert!(now < expected_total, "run {k} read everything before it was stopped");
        from = Some(if copy {
            let sp = PathBuf::from(&path);
            let meta = metadata(&sp);
            assert!(meta.savepoint && meta.parallelism == p);
            assert_eq!(meta.state_backend.as_str(), backends[k]);
            // Self-contained: keyed state as files sorted by key group, below its directory.
            let files: Vec<_> =
                meta.operators.iter().filter_map(|o| o.keyed_file.as_ref()).collect();
            assert_eq!(files.len(), p as usize, "{meta:?}");
            assert!(meta.operators.iter().all(|o| o.keyed.is_none()));
            let moved = tmp.join(format!("elsewhere/sp-copy-{k}"));
            common::copy_dir(&sp, &moved);
            std::fs::remove_dir_all(&sp).unwrap();
            moved.display().to_string()
        } else {
            path
        });
    }
    common::check_counts(
        common::committed_texts(&tmp.join("out")).iter().map(String::as_str),
        &expected,
    );
}

#[test]
fn a_word_count_stopped_into_savepoints_and_restored_at_2_3_1_counts_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    rescale_chain(tmp.path(), &Storage::local(tmp.path()), 41, false, ["rocksdb"; 3]);
}

/// `spec.stateBackend` changes across savepoints: heap state restores into RocksDB and
/// RocksDB state into the heap, each at another parallelism, and the counts stay exact.
#[test]
fn the_rescale_chain_changes_the_state_backend_across_savepoints() {
    let tmp = tempfile::tempdir().unwrap();
    rescale_chain(tmp.path(), &Storage::local(tmp.path()), 43, true, ["heap", "rocksdb", "heap"]);
}

/// A checkpoint is in its backend's own form: restoring it into the other backend is refused
/// before anything starts, naming the field and the way that works (a savepoint).
#[test]
fn a_checkpoint_into_the_other_backend_is_refused_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let st = Storage::local(tmp.path());
    common::write_input(&tmp.path().join("in"), 2, 300, 44);
    let file = manifest(tmp.path(), "job", &st, 1_000_000, "", "");
    for (took, other) in [("rocksdb", "heap"), ("heap", "rocksdb")] {
        // A run to its end leaves its final checkpoint.
        let job = run(&file, tmp.path(), &["--state-backend", took]);
        let (code, err) = job.finish(Duration::from_secs(120));
        assert_eq!(code, Some(0), "{err}");
        let chk = std::fs::read_dir(tmp.path().join("checkpoints"))
            .unwrap()
            .flat_map(|d| walk(&d.unwrap().path()))
            .filter(|p| p.ends_with("_metadata") && !p.to_string_lossy().contains("/savepoints/"))
            .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
            .expect("a checkpoint");
        let meta = metadata(chk.parent().unwrap());
        assert!(!meta.savepoint);
        assert_eq!(meta.state_backend.as_str(), took);
        let from = chk.parent().unwrap().to_str().unwrap().to_string();
        let job = run(&file, tmp.path(), &["--state-backend", other, "--from-savepoint", &from]);
        let (code, err) = job.finish(Duration::from_secs(60));
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains(&format!("taken with spec.stateBackend {took}, but the job has {other}"))
                && err.contains("savepoint"),
            "{err}"
        );
        // Into its own backend, it restores.
        let job = run(&file, tmp.path(), &["--state-backend", took, "--from-savepoint", &from]);
        let (code, err) = job.finish(Duration::from_secs(120));
        assert_eq!(code, Some(0), "{err}");
    }
    // A backend the runtime does not have is refused by the flag.
    let job = run(&file, tmp.path(), &["--state-backend", "memory"]);
    let (code, err) = job.finish(Duration::from_secs(30));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("\"memory\" is no state backend: give rocksdb or heap"), "{err}");
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    } else {
        out.push(dir.to_path_buf());
    }
    out
}

#[test]
fn savepoints_copied_elsewhere_restore_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    rescale_chain(tmp.path(), &Storage::local(tmp.path()), 42, true, ["rocksdb"; 3]);
}

#[test]
#[ignore = "needs S3: run by make e2e"]
fn the_rescale_chain_with_checkpoints_and_savepoints_on_s3() {
    let tmp = tempfile::tempdir().unwrap();
    let env =
        |n: &str| std::env::var(n).unwrap_or_else(|_| panic!("{n} is not set: make e2e sets it"));
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let base = format!("s3://{}/weir-tests/savepoints-{nanos}", env("WEIR_TEST_BUCKET"));
    let st = Storage {
        checkpoints: format!("{base}/checkpoints"),
        savepoints: format!("{base}/savepoints"),
        s3: format!(
            "  s3: {{endpoint: '{}', region: {}, forcePathStyle: true}}\n",
            env("AWS_ENDPOINT_URL"),
            env("AWS_REGION")
        ),
    };
    rescale_chain(tmp.path(), &st, 43, false, ["rocksdb", "heap", "rocksdb"]);
}

#[test]
fn a_new_version_of_the_pipeline_restores_with_allow_non_restored_state_and_refuses_without() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let st = Storage::local(tmp);
    let expected = common::write_input(&tmp.join("in"), 6, 1500, 44);
    // Version 1 also counts into a blackhole (operator `totals`).
    let v1 = manifest(
        tmp,
        "v1",
        &st,
        1000,
        "      - {uid: totals, type: count, inputs: [words], key: word}\n      - {uid: discard, type: blackhole, inputs: [totals]}\n",
        "",
    );
    let mut job = run(&v1, tmp, &[]);
    wait_running(&mut job);
    std::thread::sleep(Duration::from_millis(1500));
    let (path, _) = stop_with_savepoint(job);
    let at_savepoint = committed_prefix(&tmp.join("out"));
    // Version 2 drops `totals` and `discard`, and counts again from the savepoint on in a new
    // operator `recount`, which starts empty.
    let v2_ops = format!(
        "      - {{uid: recount, type: count, inputs: [words], key: word}}\n      - {{uid: out2, type: file_sink, inputs: [recount], path: {}}}\n",
        tmp.join("out2").display()
    );
    let refused = manifest(tmp, "v2-strict", &st, 1000, &v2_ops, "");
    let res = Command::new(WEIR)
        .args(["run", refused.to_str().unwrap(), "--from-savepoint", &path])
        .args(["--state-dir", tmp.join("state").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{err}");
    assert!(err.contains("\"totals\"") && err.contains("allowNonRestoredState"), "{err}");
    assert!(!tmp.join("out2").exists(), "refused, yet something started");
    // Other refusals before anything starts: another maxParallelism, a parallelism above it,
    // and a savepoint of a format version this Weir does not know.
    let newer = tmp.join("elsewhere/newer");
    common::copy_dir(Path::new(&path), &newer);
    // Sealed as a newer Weir would seal it: only its version tells it apart.
    let mut m = serde_json::to_value(metadata(&newer)).unwrap();
    m["version"] = 7.into();
    let sealed = weir_runtime::checkpoint::seal(&serde_json::to_vec(&m).unwrap(), None);
    std::fs::write(newer.join("_metadata"), sealed).unwrap();
    let newer = newer.display().to_string();
    for (args, needles) in [
        (
            vec!["--from-savepoint", &path, "--max-parallelism", "64"],
            vec!["maxParallelism 128", "64"],
        ),
        (vec!["--from-savepoint", &path, "--parallelism", "129"], vec!["129", "128"]),
        (vec!["--from-savepoint", &newer], vec!["version 7", "version 1"]),
    ] {
        let res = Command::new(WEIR)
            .args(["run", v1.to_str().unwrap()])
            .args(&args)
            .args(["--state-dir", tmp.join("state").to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(2), "{args:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: {n:?} not in {err}");
        }
    }
    let v2 = manifest(tmp, "v2", &st, 1000, &v2_ops, "  restore: {allowNonRestoredState: true}\n");
    let job = run(&v2, tmp, &["--from-savepoint", &path]);
    let (code, err) = job.finish(Duration::from_secs(300));
    assert_eq!(code, Some(0), "{err}");
    common::check_counts(
        common::committed_texts(&tmp.join("out")).iter().map(String::as_str),
        &expected,
    );
    // `recount` counted only what came after the savepoint.
    let after = committed_prefix(&tmp.join("out2"));
    for (w, n) in &expected {
        let before = at_savepoint.get(w).copied().unwrap_or(0);
        assert_eq!(after.get(w).copied().unwrap_or(0), n - before, "recount of {w:?}");
    }
}

#[test]
fn the_savepoint_api_refuses_what_it_cannot_do_and_a_savepoint_leaves_the_job_running() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let st = Storage::local(tmp);
    common::write_input(&tmp.join("in"), 4, 3000, 45);
    let file = manifest(tmp, "job", &st, 300, "", "");
    let mut job = run(&file, tmp, &[]);
    wait_running(&mut job);
    let api = job.addr("api");
    // Without the token, with a wrong one, with a bad body or directory.
    let (code, _, err) = savepoint_cli(&api, &[], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("WEIR_API_TOKEN"), "{err}");
    let (code, _, err) = savepoint_cli(&api, &[], Some("wrong"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("401"), "{err}");
    let (code, _, err) = savepoint_cli(&api, &["--dir", "s3://"], Some(TOKEN));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("directory") && err.contains("s3://"), "{err}");
    let (code, _, err) = savepoint_cli("localhost", &[], Some(TOKEN));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--api"), "{err}");
    let (code, body) = process::request(&api, "GET", "/v1/savepoints/nope", None).unwrap();
    assert_eq!(code, 404, "{body}");
    // A stopping savepoint that cannot be written fails, says why, and the job goes on from
    // its last checkpoint.
    let (code, _, err) =
        savepoint_cli(&api, &["--stop", "--dir", "/proc/weir-cannot-write-here"], Some(TOKEN));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("failed") && err.contains("/proc/weir-cannot-write-here"), "{err}");
    let t = Instant::now();
    while job_state(&api).as_deref() != Some("running") {
        assert!(t.elapsed() < Duration::from_secs(30), "the job did not run again");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A savepoint that does not stop the job, into a directory of the request's choosing.
    let other = tmp.join("other-savepoints");
    let (code, path, err) = savepoint_cli(&api, &["--dir", other.to_str().unwrap()], Some(TOKEN));
    assert_eq!(code, Some(0), "{err}");
    assert!(path.starts_with(other.join("default/wc-savepoints/sp-").to_str().unwrap()), "{path}");
    let meta = metadata(Path::new(&path));
    assert!(meta.savepoint && !meta.final_);
    assert_eq!(job_state(&api).as_deref(), Some("running"), "the job goes on");
    let (code, body) = process::request(&api, "GET", "/v1/savepoints", None).unwrap();
    assert_eq!(code, 200);
    let all: weir_crds::api::Savepoints = serde_json::from_str(&body).unwrap();
    // The newest first: the one that completed, then the stopping one that failed.
    assert_eq!(all.savepoints.len(), 2, "{body}");
    assert_eq!(all.savepoints[0].path.as_deref(), Some(path.as_str()));
    assert_eq!(all.savepoints[1].status, weir_crds::api::SavepointStatus::Failed);
    assert!(all.savepoints[1].stop && all.savepoints[1].path.is_none());
    let (_, body) = process::request(&api, "GET", "/v1/job", None).unwrap();
    assert!(body.contains(&path), "the job names its last savepoint: {body}");
    // A request with the idempotency key of an earlier one answers that one.
    let ask = |key: &str| {
        let body = format!("{{\"requestId\": \"{key}\"}}");
        let (code, body) =
            process::request_with(&api, "POST", "/v1/savepoints", Some(TOKEN), &body).unwrap();
        assert_eq!(code, 202, "{body}");
        serde_json::from_str::<weir_crds::api::SavepointTriggered>(&body).unwrap().id
    };
    let k1 = ask("k1");
    assert_eq!(ask("k1"), k1);
    assert_ne!(ask("k2"), k1);
    let (_, body) = process::request(&api, "GET", &format!("/v1/savepoints/{k1}"), None).unwrap();
    let info: weir_crds::api::SavepointInfo = serde_json::from_str(&body).unwrap();
    assert_eq!(info.request_id.as_deref(), Some("k1"));
    job.signal("-TERM");
    let (code, err) = job.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    // The runtime never deletes a savepoint (only the controller's retention does).
    assert!(Path::new(&path).join("_metadata").exists());
    // A job without checkpoints cannot take savepoints.
    let plain = tmp.join("plain.yaml");
    std::fs::write(
        &plain,
        std::fs::read_to_string(&file).unwrap().replace("interval: 1s", "interval: 0s"),
    )
    .unwrap();
    let mut job = run(&plain, tmp, &[]);
    wait_running(&mut job);
    let (code, _, err) = savepoint_cli(&job.addr("api"), &[], Some(TOKEN));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("409") && err.contains("spec.checkpointing.interval"), "{err}");
    job.signal("-TERM");
    let _ = job.finish(Duration::from_secs(60));
}

#[test]
fn windows_restored_at_other_parallelisms_emit_what_an_uninterrupted_run_does() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let job = |name: &str, rate: &str, out: &str| {
        let file = tmp.join(format!("{name}.yaml"));
        std::fs::write(
            &file,
            format!(
                "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: windows}}
spec:
  parallelism: 2
  maxParallelism: 128
  checkpointing: {{interval: 1s, storage: '{chk}'}}
  savepoints: {{directory: '{sp}'}}
  pipeline:
    operators:
      - {{uid: events, type: generator, format: kv, count: 30000, keys: 50, splits: 4{rate}}}
      - {{uid: per-key, type: tumbling_window_count, inputs: [events], key: key, size: 1s, allowedLateness: 1h}}
      - {{uid: out, type: file_sink, inputs: [per-key], path: {out}}}
",
                chk = tmp.join("checkpoints").display(),
                sp = tmp.join("savepoints").display(),
                out = tmp.join(out).display(),
            ),
        )
        .unwrap();
        file
    };
    // The same events uninterrupted, at parallelism 1.
    let reference = job("reference", "", "out-reference");
    let (code, err) =
        run(&reference, tmp, &["--parallelism", "1"]).finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    let want = common::sorted_lines(&tmp.join("out-reference"));
    assert!(want.len() > 50, "{want:?}");
    // Windows held in state through two savepoints, at 2, 3 and 1.
    let paced = job("paced", ", ratePerSecond: 6000", "out");
    let mut from: Option<String> = None;
    for (k, p) in ["2", "3", "1"].into_iter().enumerate() {
        let mut args = vec!["--parallelism", p];
        if let Some(f) = &from {
            args.extend(["--from-savepoint", f.as_str()]);
        }
        let mut job = run(&paced, tmp, &args);
        wait_running(&mut job);
        if k == 2 {
            let (code, err) = job.finish(Duration::from_secs(120));
            assert_eq!(code, Some(0), "{err}");
            break;
        }
        std::thread::sleep(Duration::from_millis(1500));
        let (path, _) = stop_with_savepoint(job);
        let meta = metadata(Path::new(&path));
        // The windows are keyed state (in the savepoint's keyed files), not metadata.
        let windows: Vec<_> = meta.operators.iter().filter(|o| o.uid == "per-key").collect();
        assert_eq!(windows.len(), p.parse::<usize>().unwrap(), "every subtask's part");
        assert!(windows.iter().all(|o| o.state.is_none()), "no window state in the metadata");
        assert!(windows.iter().any(|o| o.keyed_file.is_some()), "the windows' keyed state");
        from = Some(path);
    }
    assert_eq!(common::sorted_lines(&tmp.join("out")), want);
}

#[test]
fn stopping_savepoints_with_workers_killed_around_them_lose_and_duplicate_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let st = Storage::local(tmp);
    let expected = common::write_input(&tmp.join("in"), 8, 1500, 46);
    let file = manifest(tmp, "job", &st, 700, "", "");
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64;
    eprintln!("kill seed {seed}");
    let mut rng = weir_runtime::connectors::SplitMix64::new(seed);
    let mut after_completion = 0;
    let mut from: Option<String> = None;
    let mut stops = 0;
    let mut failed_stops = 0;
    let mut restarts = 0;
    for (k, p) in ["2", "3", "2", "1"].into_iter().enumerate() {
        let mut args = vec!["--parallelism", p, "--processes"];
        if let Some(f) = &from {
            args.extend(["--from-savepoint", f.as_str()]);
        }
        let mut job = run(&file, tmp, &args);
        wait_running(&mut job);
        if k == 3 {
            let (code, err) = job.finish(Duration::from_secs(300));
            assert_eq!(code, Some(0), "the last run: {err}");
            break;
        }
        std::thread::sleep(Duration::from_millis(1000));
        // A worker is killed at a random moment around the savepoint: before its barrier,
        // while it is written, or after it completed.
        let api = job.addr("api");
        let path = loop {
            let pid = job.child.id();
            // Two times in three, 0 to 150 ms after the request.
            let kill = !rng.next_u64().is_multiple_of(3);
            let delay = rng.next_u64() % 150;
            let killer = std::thread::spawn(move || {
                if !kill {
                    return;
                }
                std::thread::sleep(Duration::from_millis(delay));
                let workers = common::children_of(pid);
                if let Some(w) = workers.first() {
                    let _ = Command::new("kill").args(["-KILL", &w.to_string()]).status();
                }
            });
            let (code, path, err) =
                savepoint_cli(&api, &["--stop", "--timeout", "60s"], Some(TOKEN));
            killer.join().unwrap();
            if code == Some(0) {
                break Some(path);
            }
            if !err.contains("failed") {
                let (code, out) = job.finish(Duration::from_secs(10));
                panic!("{err}\nthe job (exit {code:?}):\n{out}");
            }
            failed_stops += 1;
            assert!(failed_stops < 30, "no stopping savepoint succeeded: {err}");
            // The job restarted from its last checkpoint; wait until it runs again.
            let t = Instant::now();
            while job_state(&api).as_deref() != Some("running") {
                if job.child.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(60), "the job did not run again");
                std::thread::sleep(Duration::from_millis(50));
            }
            if job.child.try_wait().unwrap().is_some() {
                break None; // it ran to its end meanwhile
            }
        };
        let (code, err) = job.finish(Duration::from_secs(300));
        assert_eq!(code, Some(0), "{err}");
        restarts += err.matches("restarting in").count();
        after_completion += err.matches("which it stopped into").count();
        match path {
            Some(p) => {
                stops += 1;
                committed_prefix(&tmp.join("out"));
                from = Some(p);
            }
            None => break,
        }
    }
    eprintln!(
        "{stops} stopping savepoints completed, {failed_stops} failed under kills, {restarts} restarts ({after_completion} after a savepoint completed)"
    );
    assert!(stops >= 1, "no stopping savepoint succeeded");
    common::check_counts(
        common::committed_texts(&tmp.join("out")).iter().map(String::as_str),
        &expected,
    );
}
