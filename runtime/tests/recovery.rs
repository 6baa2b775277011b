//! Exactly-once under failure: a bounded word count with 1-second checkpoints whose worker
//! processes are killed with SIGKILL at random moments, and whose whole process is killed and
//! resumed; the committed output must hold every count of every word exactly once. In
//! at-least-once mode nothing may be missing.

mod common;
mod process;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use weir_runtime::connectors::SplitMix64;

use process::{Proc, WEIR, wait_running};

/// A word count read at `rate` lines per second, checkpointed every second into `dir`.
fn manifest(dir: &Path, rate: u32, mode: &str) -> PathBuf {
    let file = dir.join("job.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: wc-recovery}}
spec:
  parallelism: 2
  checkpointing: {{interval: 1s, mode: {mode}, storage: {chk}, retained: 2}}
  restartStrategy: {{type: fixed-delay, delay: 200ms, attempts: 100}}
  pipeline:
    operators:
      - {{uid: lines,  type: file_source, path: {input}, ratePerSecond: {rate}}}
      - {{uid: words,  type: split, inputs: [lines]}}
      - {{uid: counts, type: count, inputs: [words], key: word}}
      - {{uid: out,    type: file_sink, inputs: [counts], path: {out}}}
",
            chk = dir.join("checkpoints").display(),
            input = dir.join("in").display(),
            out = dir.join("out").display(),
        ),
    )
    .unwrap();
    file
}

/// A `weir run` of `file` in the background, its API on a free port, its state under `dir`.
fn start(file: &Path, dir: &Path, extra: &[&str]) -> Proc {
    let state = dir.join("state");
    let mut args = vec!["run", file.to_str().unwrap(), "--api-addr", "127.0.0.1:0"];
    args.extend(["--state-dir", state.to_str().unwrap()]);
    args.extend(extra);
    process::start(&args)
}

fn exited(job: &mut Proc) -> bool {
    job.child.try_wait().unwrap().is_some()
}

/// `GET path`: the status code and body (None if the API does not answer).
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    process::request(addr, "GET", path, None)
}

#[test]
fn killed_worker_processes_lose_and_duplicate_nothing() {
    killed_workers("rocksdb", 0x5eed);
}

/// The same with `--state-backend heap`: full copies in memory, restored after each kill.
#[test]
fn killed_worker_processes_lose_and_duplicate_nothing_with_the_heap_backend() {
    killed_workers("heap", 0x4ea9);
}

fn killed_workers(backend: &str, seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let expected = common::write_input(&tmp.path().join("in"), 8, 1500, 11);
    let file = manifest(tmp.path(), 600, "exactly-once");
    let mut job = start(&file, tmp.path(), &["--processes", "--state-backend", backend]);
    let mut rng = SplitMix64::new(seed);
    let mut kills = 0;
    while kills < 12 {
        if !wait_running(&mut job, kills) {
            break;
        }
        // A random moment: before, during or after a checkpoint.
        std::thread::sleep(Duration::from_millis(300 + rng.next_u64() % 2200));
        let workers = common::children_of(job.child.id());
        if workers.is_empty() || exited(&mut job) {
            break;
        }
        let victim = workers[(rng.next_u64() % workers.len() as u64) as usize];
        let _ = Command::new("kill").args(["-KILL", &victim.to_string()]).status();
        kills += 1;
    }
    let (code, err) = job.finish(Duration::from_secs(300));
    assert_eq!(code, Some(0), "{err}");
    assert!(kills >= 10, "the job ended after {kills} kills; make the input longer: {err}");
    let restarts = err.matches("restarting in").count();
    assert!(restarts >= 10, "{restarts} restarts: {err}");
    assert!(err.contains("from checkpoint"), "no restart restored a checkpoint: {err}");
    common::check_counts(
        common::committed_texts(&tmp.path().join("out")).iter().map(String::as_str),
        &expected,
    );
    // Only the retained checkpoints are left, each complete.
    let chk = tmp.path().join("checkpoints/default/wc-recovery");
    let jobs: Vec<_> = std::fs::read_dir(&chk).unwrap().flatten().collect();
    assert_eq!(jobs.len(), 1, "one job id");
    let metas: Vec<_> = std::fs::read_dir(jobs[0].path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("_metadata").exists())
        .collect();
    assert!(metas.len() <= 2, "{} checkpoints retained, not 2", metas.len());
    // The heap's keyed files left are exactly those the retained checkpoints name.
    let mut named = std::collections::BTreeSet::new();
    for m in &metas {
        let bytes = std::fs::read(m.path().join("_metadata")).unwrap();
        let meta = weir_runtime::checkpoint::Metadata::parse(&bytes, "test", None).unwrap();
        assert_eq!(meta.state_backend.as_str(), backend);
        named.extend(meta.operators.iter().filter_map(|o| o.keyed_file.clone()).map(|f| f.file));
    }
    let mut stored = std::collections::BTreeSet::new();
    if let Ok(instances) = std::fs::read_dir(jobs[0].path().join("shared")) {
        for i in instances.flatten() {
            for f in std::fs::read_dir(i.path()).into_iter().flatten().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.starts_with("keyed-") {
                    stored.insert(format!("shared/{}/{name}", i.file_name().to_string_lossy()));
                }
            }
        }
    }
    assert_eq!(stored, named, "{backend}: keyed files stored and named");
    assert_eq!(named.is_empty(), backend == "rocksdb");
}

#[test]
fn a_killed_run_resumes_from_its_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = common::write_input(&tmp.path().join("in"), 8, 1500, 12);
    let file = manifest(tmp.path(), 1000, "exactly-once");
    let mut rng = SplitMix64::new(0xfeed);
    let mut runs = 0;
    let err = loop {
        runs += 1;
        let resume: &[&str] = if runs == 1 { &[] } else { &["--resume"] };
        let mut job = start(&file, tmp.path(), resume);
        if runs <= 4 {
            wait_running(&mut job, 0);
            std::thread::sleep(Duration::from_millis(1200 + rng.next_u64() % 1500));
            if !exited(&mut job) {
                job.signal("-KILL");
                let _ = job.finish(Duration::from_secs(30));
                continue;
            }
        }
        let (code, err) = job.finish(Duration::from_secs(300));
        assert_eq!(code, Some(0), "{err}");
        break err;
    };
    assert!(runs >= 5, "the job finished before it was killed 4 times: {err}");
    assert!(err.contains("resuming job wc-recovery from checkpoint"), "{err}");
    common::check_counts(
        common::committed_texts(&tmp.path().join("out")).iter().map(String::as_str),
        &expected,
    );
}

#[test]
fn at_least_once_loses_nothing_when_workers_die() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = common::write_input(&tmp.path().join("in"), 4, 1000, 13);
    let file = manifest(tmp.path(), 800, "at-least-once");
    let mut job = start(&file, tmp.path(), &["--processes"]);
    let mut rng = SplitMix64::new(7);
    for kills in 0..3 {
        if !wait_running(&mut job, kills) {
            break;
        }
        std::thread::sleep(Duration::from_millis(800 + rng.next_u64() % 1500));
        if let Some(&victim) = common::children_of(job.child.id()).first() {
            let _ = Command::new("kill").args(["-KILL", &victim.to_string()]).status();
        }
    }
    let (code, err) = job.finish(Duration::from_secs(300));
    assert_eq!(code, Some(0), "{err}");
    // Every record was counted at least once: every word is there, and its highest committed
    // count is at least its true count (records replayed after a restore may count twice).
    let mut top: BTreeMap<String, u64> = BTreeMap::new();
    for text in common::committed_texts(&tmp.path().join("out")) {
        for line in text.lines() {
            let (w, c) = line.rsplit_once(',').unwrap();
            let c: u64 = c.parse().unwrap();
            let t = top.entry(w.into()).or_default();
            *t = (*t).max(c);
        }
    }
    assert_eq!(top.len(), expected.len(), "words missing");
    for (w, n) in &expected {
        assert!(top[w] >= *n, "{w}: counted {} of {n}", top[w]);
    }
    assert!(err.matches("restarting in").count() >= 1, "{err}");
}

/// A word count whose sink side is throttled to `rate` words per second per subtask, so that
/// the channels into it stay full; checkpoints every second with a 2-second timeout.
fn backpressured(dir: &Path, rate: u32, unaligned: &str) -> PathBuf {
    let file = dir.join("slow.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: wc-slow}}
spec:
  parallelism: 2
  checkpointing: {{interval: 1s, timeout: 2s, tolerableFailures: 1000, storage: {chk}, retained: 2, {unaligned}}}
  restartStrategy: {{type: fixed-delay, delay: 200ms, attempts: 100}}
  pipeline:
    operators:
      - {{uid: lines,  type: file_source, path: {input}}}
      - {{uid: words,  type: split, inputs: [lines]}}
      - {{uid: counts, type: count, inputs: [words], key: word}}
      - {{uid: slow,   type: throttle, inputs: [counts], ratePerSecond: {rate}}}
      - {{uid: out,    type: file_sink, inputs: [slow], path: {out}}}
",
            chk = dir.join("checkpoints").display(),
            input = dir.join("in").display(),
            out = dir.join("out").display(),
        ),
    )
    .unwrap();
    file
}

fn checkpoints(api: &str) -> serde_json::Value {
    let (code, body) = get(api, "/v1/checkpoints").expect("the API answers");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The newest completed checkpoint in a `/v1/checkpoints` answer.
fn newest_completed(c: &serde_json::Value) -> Option<&serde_json::Value> {
    c["history"].as_array().unwrap().iter().find(|h| h["status"] == "completed")
}

#[test]
fn unaligned_checkpoints_complete_under_backpressure_where_aligned_ones_time_out() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = common::write_input(&tmp.path().join("in"), 8, 1500, 21);
    let total: u64 = expected.values().sum();

    // Aligned: the barriers wait behind thousands of buffered words that the sink takes at
    // 2,000 a second, and every checkpoint expires.
    let aligned = tmp.path().join("aligned");
    std::fs::create_dir_all(aligned.join("in")).unwrap();
    for e in std::fs::read_dir(tmp.path().join("in")).unwrap().flatten() {
        std::fs::copy(e.path(), aligned.join("in").join(e.file_name())).unwrap();
    }
    let file = backpressured(&aligned, 2000, "unaligned: false");
    let mut job = start(&file, &aligned, &["--processes"]);
    wait_running(&mut job, 0);
    std::thread::sleep(Duration::from_secs(7));
    let c = checkpoints(&job.addr("api"));
    let _ = job.child.kill();
    let (_, err) = job.finish(Duration::from_secs(30));
    assert_eq!(c["completed"], 0, "an aligned checkpoint completed under backpressure: {c}");
    assert!(c["failed"].as_u64().unwrap() >= 2, "{c}\n{err}");
    assert!(err.contains("expired after 2s"), "{err}");

    // Unaligned, from the start: the same job checkpoints every second, storing the words its
    // barriers overtook, and worker processes killed at random moments restore them.
    let file = backpressured(tmp.path(), 2000, "unaligned: true");
    let mut job = start(&file, tmp.path(), &["--processes"]);
    let mut rng = SplitMix64::new(0xbacc);
    let (mut kills, mut in_flight_restores) = (0, 0);
    while kills < 4 {
        if !wait_running(&mut job, kills) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2500 + rng.next_u64() % 2000));
        let c = checkpoints(&job.addr("api"));
        let workers = common::children_of(job.child.id());
        if workers.is_empty() || exited(&mut job) {
            break;
        }
        // The checkpoint the job restores from after this kill (a newer one may complete in
        // between, which holds in-flight records as likely).
        if newest_completed(&c).is_some_and(|n| n["inFlightBytes"].as_u64() > Some(0)) {
            in_flight_restores += 1;
        }
        let victim = workers[(rng.next_u64() % workers.len() as u64) as usize];
        let _ = Command::new("kill").args(["-KILL", &victim.to_string()]).status();
        kills += 1;
    }
    let (code, err) = job.finish(Duration::from_secs(300));
    assert_eq!(code, Some(0), "{err}");
    assert!(kills >= 3, "the job ended after {kills} kills: {err}");
    assert!(in_flight_restores >= 1, "no restore had in-flight records: {err}");
    common::check_counts(
        common::committed_texts(&tmp.path().join("out")).iter().map(String::as_str),
        &expected,
    );
    let lines: usize =
        common::committed_texts(&tmp.path().join("out")).iter().map(|t| t.lines().count()).sum();
    assert_eq!(lines as u64, total, "every word counted once");
}

#[test]
fn checkpoints_switch_to_unaligned_after_the_alignment_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_input(&tmp.path().join("in"), 12, 1500, 22);
    let file = backpressured(tmp.path(), 2000, "unaligned: true, alignmentTimeout: 300ms");
    let mut job = start(&file, tmp.path(), &["--processes"]);
    wait_running(&mut job, 0);
    std::thread::sleep(Duration::from_secs(6));
    let c = checkpoints(&job.addr("api"));
    let _ = job.child.kill();
    let _ = job.finish(Duration::from_secs(30));
    assert!(c["completed"].as_u64().unwrap() >= 2, "{c}");
    let n = newest_completed(&c).unwrap();
    assert_eq!(n["unaligned"], true, "{c}");
    assert!(n["inFlightBytes"].as_u64().unwrap() > 0, "{c}");
    // It waited for alignment before switching (the timeout counts from the trigger).
    assert!(n["durationMs"].as_u64().unwrap() >= 300, "{c}");
}

#[test]
fn a_stopped_job_resumes_at_another_parallelism_2_3_1_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = common::write_input(&tmp.path().join("in"), 8, 1500, 31);
    let file = manifest(tmp.path(), 1500, "exactly-once");
    let mut last_err = String::new();
    for (run, p) in [2, 3, 1].into_iter().enumerate() {
        let mut args = vec!["--parallelism".to_string(), p.to_string()];
        if run > 0 {
            args.push("--resume".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut job = start(&file, tmp.path(), &args);
        wait_running(&mut job, 0);
        if run < 2 {
            // Stopped part-way: the final checkpoint holds where every source stopped.
            std::thread::sleep(Duration::from_millis(2500));
            assert!(!exited(&mut job), "run {run} ended before it was stopped");
            job.signal("-TERM");
        }
        let (code, err) = job.finish(Duration::from_secs(300));
        assert_eq!(code, Some(0), "run {run} at parallelism {p}: {err}");
        if run > 0 {
            assert!(err.contains("resuming job wc-recovery from checkpoint"), "{err}");
            let old = [2, 3][run - 1];
            assert!(
                err.contains(&format!("state taken at parallelism {old} at parallelism {p}")),
                "{err}"
            );
        }
        last_err = err;
    }
    assert!(last_err.contains("parallelism 1"), "{last_err}");
    common::check_counts(
        common::committed_texts(&tmp.path().join("out")).iter().map(String::as_str),
        &expected,
    );
}

/// The directory of the newest completed checkpoint under `root` (any job id).
fn newest_checkpoint(root: &Path) -> PathBuf {
    let mut best: Option<(u64, PathBuf)> = None;
    for job in std::fs::read_dir(root).unwrap().flatten() {
        for chk in std::fs::read_dir(job.path()).unwrap().flatten() {
            let meta = chk.path().join("_metadata");
            if let Ok(m) = std::fs::metadata(&meta) {
                let t = m.modified().unwrap().elapsed().unwrap().as_nanos() as u64;
                if best.as_ref().is_none_or(|(b, _)| t < *b) {
                    best = Some((t, chk.path()));
                }
            }
        }
    }
    best.expect("a completed checkpoint").1
}

#[test]
fn a_job_starts_from_a_copied_checkpoint_of_another_run_at_another_parallelism() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = common::write_input(&tmp.path().join("in"), 8, 1500, 32);
    let file = manifest(tmp.path(), 1500, "exactly-once");
    let mut job = start(&file, tmp.path(), &[]);
    wait_running(&mut job, 0);
    std::thread::sleep(Duration::from_millis(2500));
    job.signal("-TERM");
    let (code, err) = job.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    // The old job's directory, copied elsewhere: a checkpoint's files are named relative to it.
    let chk = newest_checkpoint(&tmp.path().join("checkpoints/default/wc-recovery"));
    let copy = tmp.path().join("elsewhere/job");
    common::copy_dir(chk.parent().unwrap(), &copy);
    std::fs::remove_dir_all(tmp.path().join("checkpoints")).unwrap();
    let from = copy.join(chk.file_name().unwrap()).join("_metadata");
    let from = from.to_str().unwrap();
    // Bad inputs first: nothing there, and --resume beside it.
    let res = Command::new(WEIR)
        .args(["run", file.to_str().unwrap(), "--from-savepoint", "/nonexistent/chk-9"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{e}");
    assert!(e.contains("/nonexistent/chk-9/_metadata") && e.contains("not a completed"), "{e}");
    let res = Command::new(WEIR)
        .args(["run", file.to_str().unwrap(), "--resume", "--from-savepoint", from])
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(2));
    let job = start(&file, tmp.path(), &["--from-savepoint", from, "--parallelism", "3"]);
    let (code, err) = job.finish(Duration::from_secs(300));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("starting job wc-recovery from") && err.contains("parallelism 2"),
        "{err}"
    );
    // The new job's checkpoints name only files of its own directory.
    let chk = newest_checkpoint(&tmp.path().join("checkpoints/default/wc-recovery"));
    let bytes = std::fs::read(chk.join("_metadata")).unwrap();
    let m = weir_runtime::checkpoint::Metadata::parse(&bytes, "test", None).unwrap();
    let files: Vec<_> =
        m.operators.iter().filter_map(|o| o.keyed.as_ref()).flat_map(|k| &k.files).collect();
    assert!(!files.is_empty());
    for f in files {
        assert!(
            chk.parent().unwrap().join(&f.key).exists(),
            "{} is not in the new job's directory",
            f.key
        );
    }
    common::check_counts(
        common::committed_texts(&tmp.path().join("out")).iter().map(String::as_str),
        &expected,
    );
}

#[test]
fn workers_killed_every_2_to_4_s_whatever_the_job_is_doing_lose_nothing_and_it_finishes() {
    // A worker process is killed every 2 to 4 s for the first 25 kills, whether the job runs,
    // restarts or waits to restart, under the default restart strategy (exponential delay
    // from 1 s, times 1.5, at most 60 s). A kill while the job restarts is not a new failure,
    // so the delay grows with the kills of a running job only. Prints what it measured.
    let tmp = tempfile::tempdir().unwrap();
    let expected = common::write_input(&tmp.path().join("in"), 8, 1000, 17);
    let file = manifest(tmp.path(), 400, "exactly-once");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("  restartStrategy: {type: fixed-delay, delay: 200ms, attempts: 100}\n", "");
    assert!(!text.contains("restartStrategy"), "{text}");
    std::fs::write(&file, text).unwrap();
    let started = Instant::now();
    let mut job = start(&file, tmp.path(), &["--processes"]);
    let mut rng = SplitMix64::new(0x2_4000);
    let mut kills = 0;
    while kills < 25 && !exited(&mut job) {
        std::thread::sleep(Duration::from_millis(2000 + rng.next_u64() % 2000));
        let workers = common::children_of(job.child.id());
        if workers.is_empty() || exited(&mut job) {
            continue;
        }
        let victim = workers[(rng.next_u64() % workers.len() as u64) as usize];
        let _ = Command::new("kill").args(["-KILL", &victim.to_string()]).status();
        kills += 1;
    }
    let killing = started.elapsed();
    let (code, err) = job.finish(Duration::from_secs(600));
    let took = started.elapsed();
    assert_eq!(code, Some(0), "{err}");
    let restarts = err.matches("restarting in").count();
    let uncounted = err.matches("which is not counted as a new failure").count();
    let longest = err
        .match_indices("restarting in ")
        .filter_map(|(i, m)| err[i + m.len()..].split(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max);
    eprintln!(
        "kills every 2-4 s: {kills} kills in {:.0} s; the job finished after {:.0} s with {restarts} restarts, {uncounted} of them not counted; longest delay {longest:.1} s",
        killing.as_secs_f64(),
        took.as_secs_f64()
    );
    assert!(kills >= 5, "the job finished after {kills} kills; make the input longer: {err}");
    common::check_counts(
        common::committed_texts(&tmp.path().join("out")).iter().map(String::as_str),
        &expected,
    );
}
