//! The coordinator and its workers as a user runs them: the HTTP API while a job runs,
//! stopping with SIGTERM, a worker that dies, and workers that are refused.

mod process;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use process::{Proc, WEIR, start};

fn unbounded_job(dir: &std::path::Path, parallelism: u32) -> std::path::PathBuf {
    job_with(dir, parallelism, "")
}

/// The unbounded job with more spec fields (lines indented by two spaces); checkpoints go
/// under `dir` unless `extra` says where.
fn job_with(dir: &std::path::Path, parallelism: u32, extra: &str) -> std::path::PathBuf {
    let file = dir.join("job.yaml");
    let checkpoints = if extra.contains("checkpointing:") {
        String::new()
    } else {
        format!("  checkpointing: {{storage: {}}}\n", dir.join("checkpoints").display())
    };
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {{name: counter}}\nspec:\n  parallelism: {parallelism}\n{checkpoints}{extra}  pipeline:\n    operators:\n      - {{uid: events, type: generator, format: kv, keys: 1000, ratePerSecond: 20000, seed: 7}}\n      - {{uid: counts, type: count, inputs: [events], key: key}}\n      - {{uid: out, type: file_sink, inputs: [counts], path: {}}}\n",
            dir.join("out").display()
        ),
    )
    .unwrap();
    file
}

/// Starts `weir worker --index i` for the coordinator at `control`, its state under `dir`.
fn start_worker(control: &str, i: u32, dir: &std::path::Path) -> Proc {
    let state = dir.join("state");
    start(&[
        "worker",
        "--coordinator",
        control,
        "--index",
        &i.to_string(),
        "--state-dir",
        state.to_str().unwrap(),
        "--data-addr",
        "127.0.0.1:0",
    ])
}

/// `GET path`: the status code and body.
fn get(addr: &str, path: &str) -> (u16, String) {
    request(addr, "GET", path, None)
}

/// A request with an optional bearer token; the status code and body.
fn request(addr: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    process::request(addr, method, path, token).expect("the API answers")
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Committed output lines `key,count`: for every key the counts must be exactly 1..n.
fn check_counts(out: &std::path::Path) -> u64 {
    let mut seen: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for e in std::fs::read_dir(out).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "an uncommitted file after a clean stop: {name}");
        for line in std::fs::read_to_string(e.path()).unwrap().lines() {
            let (k, c) = line.rsplit_once(',').unwrap();
            seen.entry(k.into()).or_default().push(c.parse().unwrap());
        }
    }
    let mut total = 0;
    for (k, mut counts) in seen {
        counts.sort_unstable();
        let n = counts.len() as u64;
        assert_eq!(counts, (1..=n).collect::<Vec<_>>(), "counts of {k}");
        total += n;
    }
    total
}

#[test]
fn the_http_api_serves_the_running_job_and_sigterm_stops_it_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let file = unbounded_job(tmp.path(), 2);
    let state = tmp.path().join("state");
    let p = start(&[
        "run",
        file.to_str().unwrap(),
        "--processes",
        "--api-addr",
        "127.0.0.1:0",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let api = p.addr("api");
    assert_eq!(get(&api, "/healthz").0, 200);
    wait_until("the job to be ready", || get(&api, "/readyz").0 == 200);
    let job =
        |api: &str| -> serde_json::Value { serde_json::from_str(&get(api, "/v1/job").1).unwrap() };
    wait_until("records through count", || {
        job(&api)["operators"][1]["recordsIn"].as_u64().unwrap() > 1000
    });
    let j = job(&api);
    assert_eq!(j["name"], "counter");
    assert_eq!(j["state"], "running");
    assert_eq!((j["parallelism"].as_u64(), j["maxParallelism"].as_u64()), (Some(2), Some(128)));
    assert_eq!((j["workersConnected"].as_u64(), j["workersExpected"].as_u64()), (Some(2), Some(2)));
    let ops: Vec<(&str, &str)> = j["operators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["uid"].as_str().unwrap(), o["type"].as_str().unwrap()))
        .collect();
    assert_eq!(ops, [("events", "generator"), ("counts", "count"), ("out", "file_sink")]);
    wait_until("state in RocksDB", || job(&api)["stateBytes"].as_u64().unwrap() > 0);
    // And per subtask: each of the two holds some (its keys' counts), and they add up to
    // the job's (reported in one round, so read them from one answer).
    wait_until("state in each subtask", || {
        let j = job(&api);
        let per: Vec<u64> = j["subtaskStateBytes"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        per.len() == 2
            && per.iter().all(|&b| b > 0)
            && per.iter().sum::<u64>() == j["stateBytes"].as_u64().unwrap()
    });
    let (code, metrics) = get(&api, "/metrics");
    assert_eq!(code, 200);
    for want in [
        "weir_job_parallelism{job_name=\"counter\"} 2",
        "weir_job_state{job_name=\"counter\",state=\"running\"} 1",
        "weir_operator_records_in_total{job_name=\"counter\",operator=\"counts\",type=\"count\"}",
        "weir_job_workers_connected{job_name=\"counter\"} 2",
        "weir_subtask_state_bytes{job_name=\"counter\",subtask=\"1\"}",
    ] {
        assert!(metrics.contains(want), "/metrics lacks {want}:\n{metrics}");
    }
    assert_eq!(get(&api, "/v1/nothing").0, 404);
    // SIGTERM: the sources stop, everything in flight is counted and committed, exit 0.
    p.signal("-TERM");
    let (code, err) = p.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    let total = check_counts(&tmp.path().join("out"));
    let line = err.lines().find(|l| l.contains("weir: stopped (Ctrl-C")).expect("a summary");
    assert!(line.contains(&format!("counts {total} in / {total} out")), "{line} vs {total}");
}

#[test]
fn a_worker_that_dies_fails_the_job_and_the_other_workers_go_too() {
    let tmp = tempfile::tempdir().unwrap();
    // Without restarts: a lost worker ends the job.
    let file = job_with(tmp.path(), 2, "  restartStrategy: {type: none}\n");
    let coord = start(&[
        "coordinator",
        file.to_str().unwrap(),
        "--control-addr",
        "127.0.0.1:0",
        "--api-addr",
        "127.0.0.1:0",
    ]);
    let control = coord.addr("control");
    let api = coord.addr("api");
    let (w0, w1) = (start_worker(&control, 0, tmp.path()), start_worker(&control, 1, tmp.path()));
    wait_until("the job to run", || get(&api, "/readyz").0 == 200);
    std::thread::sleep(Duration::from_millis(300));
    w1.signal("-KILL");
    let (code, err) = coord.finish(Duration::from_secs(60));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("worker 1 was lost"), "{err}");
    assert!(err.contains("not restarted: restartStrategy.type is none"), "{err}");
    let (code, err0) = w0.finish(Duration::from_secs(60));
    assert_ne!(code, Some(0), "worker 0 went on: {err0}");
    let _ = w1.finish(Duration::from_secs(10));
}

#[test]
fn workers_with_a_wrong_index_are_refused_and_a_stop_before_the_start_is_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let file = unbounded_job(tmp.path(), 2);
    let coord = start(&["coordinator", file.to_str().unwrap(), "--control-addr", "127.0.0.1:0"]);
    let control = coord.addr("control");
    let worker = |i: &str| {
        Command::new(WEIR)
            .env("WEIR_JOB_SECRET", process::SECRET)
            .args(["worker", "--coordinator", &control, "--index", i, "--state-dir"])
            .arg(tmp.path().join("state"))
            .args(["--data-addr", "127.0.0.1:0"])
            .output()
            .unwrap()
    };
    let out = worker("5");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--index 5 is not below the job's parallelism 2"), "{err}");
    // One good worker joins, then the coordinator is stopped before the second comes.
    let w0 = start_worker(&control, 0, tmp.path());
    std::thread::sleep(Duration::from_millis(500));
    coord.signal("-TERM");
    let (code, err) = coord.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("stopped with 1 of 2 workers connected"), "{err}");
    let (code, err) = w0.finish(Duration::from_secs(30));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("stopped before it started"), "{err}");
    assert!(!tmp.path().join("out").exists(), "something started");
}

#[test]
fn a_worker_without_a_coordinator_gives_up_with_a_clear_error() {
    let out = Command::new(WEIR)
        .env("WEIR_JOB_SECRET", process::SECRET)
        .args([
            "worker",
            "--coordinator",
            "127.0.0.1:1",
            "--index",
            "0",
            "--state-dir",
            "/tmp/none",
        ])
        .env("WEIR_CONNECT_TIMEOUT", "1s")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot reach the coordinator at 127.0.0.1:1"), "{err}");
}

#[test]
fn a_worker_that_fails_at_setup_cancels_the_others_while_they_connect() {
    let tmp = tempfile::tempdir().unwrap();
    let file = job_with(tmp.path(), 2, "  restartStrategy: {type: none}\n");
    let coord = start(&["coordinator", file.to_str().unwrap(), "--control-addr", "127.0.0.1:0"]);
    let control = coord.addr("control");
    let w0 = start_worker(&control, 0, tmp.path());
    // Worker 1 speaks the control protocol by hand: it gives an exchange address nobody
    // answers on, takes the job, and reports a failure.
    let (mut w, mut r) = process::open_control(&control, 1, "127.0.0.1:1", process::SECRET);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains(r#""type":"start""#), "{line}");
    std::thread::sleep(Duration::from_millis(300));
    writeln!(w, r#"{{"type":"failed","message":"disk on fire","user":false,"retryable":true}}"#)
        .unwrap();
    let (code, err) = coord.finish(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("worker 1: disk on fire"), "{err}");
    // Worker 0 was still trying to reach worker 1; it gives up at once, not after 60 s.
    let t = Instant::now();
    let (code, err) = w0.finish(Duration::from_secs(10));
    assert_ne!(code, Some(0), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}: {err}", t.elapsed());
}

#[test]
fn checkpoints_are_listed_triggered_with_the_token_and_counted_in_the_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    // Periodic checkpoints far apart: the ones that complete here are the triggered ones.
    let file = job_with(
        tmp.path(),
        2,
        &format!(
            "  checkpointing: {{interval: 1h, storage: {}}}\n",
            tmp.path().join("checkpoints").display()
        ),
    );
    let mut child = Command::new(WEIR)
        .args(["run", file.to_str().unwrap(), "--processes", "--api-addr", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .env("WEIR_API_TOKEN", "s3cret-t0ken")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let api = loop {
        let line = lines.next().expect("the API address").unwrap();
        if let Some((_, a)) = line.split_once("HTTP API on http://") {
            break a.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    wait_until("the job to run", || get(&api, "/readyz").0 == 200);
    let (code, body) = get(&api, "/v1/checkpoints");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["completed"], 0, "{body}");
    // Without the token, or with a wrong one, nothing is triggered.
    let (code, body) = request(&api, "POST", "/v1/checkpoints", None);
    assert_eq!(code, 401, "{body}");
    let (code, _) = request(&api, "POST", "/v1/checkpoints", Some("wrong"));
    assert_eq!(code, 401);
    std::thread::sleep(Duration::from_millis(500));
    assert!(get(&api, "/v1/checkpoints").1.contains("\"completed\":0"));
    // With it, a checkpoint is taken now.
    let (code, body) = request(&api, "POST", "/v1/checkpoints", Some("s3cret-t0ken"));
    assert_eq!(code, 202, "{body}");
    let mut done = serde_json::Value::Null;
    wait_until("the triggered checkpoint", || {
        done = serde_json::from_str(&get(&api, "/v1/checkpoints").1).unwrap();
        done["completed"] == 1
    });
    let c = &done["history"][0];
    assert_eq!(c["status"], "completed", "{done}");
    assert_eq!(c["subtasks"], 4, "two tasks at parallelism 2: {done}");
    assert_eq!(c["acknowledged"], 4, "{done}");
    assert!(c["sizeBytes"].as_u64().unwrap() > 0, "{done}");
    assert!(c["uploadedBytes"].as_u64().unwrap() > 0, "{done}");
    let path = c["path"].as_str().unwrap();
    assert!(path.ends_with("/chk-1/_metadata") && Path::new(path).exists(), "{done}");
    let (_, job) = get(&api, "/v1/job");
    assert!(job.contains("\"lastCheckpoint\":{\"id\":1"), "{job}");
    let (_, metrics) = get(&api, "/metrics");
    assert!(
        metrics.contains("weir_checkpoints_completed_total{job_name=\"counter\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("weir_last_checkpoint_id{job_name=\"counter\"} 1"), "{metrics}");
    // The token never shows.
    assert!(!metrics.contains("s3cret") && !job.contains("s3cret"));
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let st = child.wait().unwrap();
    assert!(st.success());
}

#[test]
fn in_pods_workers_take_their_index_from_the_pod_name_and_an_ended_job_keeps_its_coordinator() {
    let tmp = tempfile::tempdir().unwrap();
    // A bounded job: the generator stops after 2,000 records.
    let file = job_with(tmp.path(), 2, "").to_str().unwrap().to_string();
    let text =
        std::fs::read_to_string(&file).unwrap().replace("ratePerSecond: 20000", "count: 2000");
    std::fs::write(&file, text).unwrap();
    let coord = start(&[
        "coordinator",
        &file,
        "--control-addr",
        "127.0.0.1:0",
        "--api-addr",
        "127.0.0.1:0",
        "--stay-after-end",
    ]);
    let (control, api) = (coord.addr("control"), coord.addr("api"));
    let state = tmp.path().join("state");
    let worker = |pod: &str| {
        start(&[
            "worker",
            "--coordinator",
            &control,
            "--pod-name",
            pod,
            "--state-dir",
            state.to_str().unwrap(),
            "--data-addr",
            "127.0.0.1:0",
        ])
    };
    // A pod name without an ordinal is refused, naming the flag.
    let (code, err) = worker("counter-worker").finish(Duration::from_secs(30));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--pod-name \"counter-worker\" does not end in -<index>"), "{err}");
    let (w0, w1) = (worker("counter-worker-0"), worker("counter-worker-1"));
    // The job is over; the coordinator stays and says how it ended, until SIGTERM.
    wait_until("the job to finish", || get(&api, "/v1/job").1.contains("\"state\":\"finished\""));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(get(&api, "/healthz").0, 200, "the coordinator still serves after the end");
    // Workers in pods outlive the run, waiting for the next coordinator; SIGTERM ends them
    // at once.
    for w in [w0, w1] {
        w.signal("-TERM");
        let (code, err) = w.finish(Duration::from_secs(30));
        assert_eq!(code, Some(143), "{err}");
        assert!(err.contains("the run ended; waiting for the next one"), "{err}");
    }
    coord.signal("-TERM");
    let (code, err) = coord.finish(Duration::from_secs(30));
    // Over already: ending its wait (0) or terminated (143) are the same.
    assert!(matches!(code, Some(0 | 143)), "{code:?} {err}");
    assert!(err.contains("serving its final state until SIGTERM"), "{err}");
    check_counts(&tmp.path().join("out"));
}
