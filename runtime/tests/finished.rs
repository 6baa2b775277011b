//! Checkpoints go on while some subtasks have finished (FLIP-147): sources with fewer splits
//! than subtasks, and a socket read by subtask 0 only, checkpoint periodically, take
//! savepoints, and lose nothing to a kill -9 and `--resume`; a savepoint that cannot complete
//! fails within `spec.savepoints.timeout`.

mod common;
#[allow(dead_code)]
mod process;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use process::{Proc, WEIR};

const TOKEN: &str = "finished-test-token";

fn write_job(dir: &Path, name: &str, extra: &str, source: &str, then: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {{name: {name}}}\nspec:\n  parallelism: 2\n  checkpointing: {{interval: 300ms, storage: {}}}\n{extra}  pipeline:\n    operators:\n      - {source}\n{then}      - {{uid: out, type: file_sink, inputs: [counts], path: {}}}\n",
            dir.join("checkpoints").display(),
            dir.join("out").display()
        ),
    )
    .unwrap();
    file
}

fn run(file: &Path, dir: &Path, extra: &[&str]) -> Proc {
    let state = dir.join("state");
    let mut args = vec!["run", file.to_str().unwrap(), "--api-addr", "127.0.0.1:0"];
    args.extend(["--state-dir", state.to_str().unwrap()]);
    args.extend(extra);
    process::start_with_env(&args, &[("WEIR_API_TOKEN", TOKEN)])
}

fn get_json(api: &str, path: &str) -> Option<serde_json::Value> {
    let (code, body) = process::request(api, "GET", path, None)?;
    (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
}

/// Waits (at most a minute) until the job's API says it runs.
fn wait_running(api: &str) {
    let t = Instant::now();
    while get_json(api, "/v1/job").is_none_or(|i| i["state"] != "running") {
        assert!(t.elapsed() < Duration::from_secs(60), "the job did not start running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `n` checkpoints completed; false if the job ended first.
fn wait_checkpoints(job: &mut Proc, n: u64, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if job.child.try_wait().unwrap().is_some() {
            return false;
        }
        if let Some(c) = get_json(&job.addr("api"), "/v1/checkpoints")
            && c["completed"].as_u64().unwrap_or(0) >= n
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `weir savepoint --api`: its exit code, stdout and stderr.
fn savepoint(api: &str) -> (Option<i32>, String, String) {
    let res = Command::new(WEIR)
        .args(["savepoint", "--api", api, "--timeout", "60s"])
        .env("WEIR_API_TOKEN", TOKEN)
        .output()
        .unwrap();
    (
        res.status.code(),
        String::from_utf8_lossy(&res.stdout).trim().to_string(),
        String::from_utf8_lossy(&res.stderr).into_owned(),
    )
}

/// `key,count` lines: for each key, the counts 1..k exactly once; the final count per key.
fn self_consistent(dir: &Path) -> BTreeMap<String, u64> {
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for text in common::committed_texts(dir) {
        for line in text.lines() {
            let (k, c) = line.rsplit_once(',').unwrap();
            seen.entry(k.into()).or_default().push(c.parse().unwrap());
        }
    }
    seen.into_iter()
        .map(|(k, mut c)| {
            c.sort_unstable();
            let n = c.len() as u64;
            assert_eq!(c, (1..=n).collect::<Vec<_>>(), "counts of {k}");
            (k, n)
        })
        .collect()
}

#[test]
fn sources_with_fewer_splits_than_subtasks_checkpoint_take_savepoints_and_resume_exactly() {
    // One input file for two subtasks, and a generator of one split: subtask 1 of the
    // source ends at once.
    let tmp = tempfile::tempdir().unwrap();
    let file_dir = tmp.path().join("file");
    let expected = common::write_input(&file_dir.join("in"), 1, 12000, 9);
    let files = write_job(
        &file_dir,
        "one-file",
        "",
        &format!(
            "{{uid: lines, type: file_source, path: {}, ratePerSecond: 2000}}",
            file_dir.join("in").display()
        ),
        "      - {uid: words, type: split, inputs: [lines]}\n      - {uid: counts, type: count, inputs: [words], key: word}\n",
    );
    let gen_dir = tmp.path().join("gen");
    let records = 30000u64;
    let generator = write_job(
        &gen_dir,
        "one-split",
        "",
        &format!(
            "{{uid: events, type: generator, format: kv, splits: 1, count: {records}, ratePerSecond: 4000, keys: 300, seed: 4}}"
        ),
        "      - {uid: counts, type: count, inputs: [events], key: key}\n",
    );
    for (file, dir) in [(&files, &file_dir), (&generator, &gen_dir)] {
        let mut job = run(file, dir, &[]);
        assert!(
            wait_checkpoints(&mut job, 2, Duration::from_secs(60)),
            "{}: no periodic checkpoint while a source subtask has finished",
            file.display()
        );
        let (code, path, err) = savepoint(&job.addr("api"));
        assert_eq!(code, Some(0), "{}: the savepoint failed: {err}", file.display());
        assert!(Path::new(&path).join("_metadata").exists(), "{path}");
        assert!(wait_checkpoints(&mut job, 4, Duration::from_secs(60)), "{}", file.display());
        job.child.kill().unwrap();
        let (_, err) = job.finish(Duration::from_secs(30));
        assert!(!err.contains("finished in"), "the job ended before the kill: {err}");
        let job = run(file, dir, &["--resume"]);
        let (code, err) = job.finish(Duration::from_secs(180));
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("resuming job"), "{err}");
    }
    let texts = common::committed_texts(&file_dir.join("out"));
    common::check_counts(texts.iter().map(String::as_str), &expected);
    let counts = self_consistent(&gen_dir.join("out"));
    assert_eq!(counts.values().sum::<u64>(), records, "every generated record counted once");
}

#[test]
fn a_socket_read_by_one_subtask_checkpoints_and_a_kill_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let (first, expected_first) = common::word_texts(1, 2000, 17, None, None);
    let (second, expected_second) = common::word_texts(1, 2000, 18, None, None);
    let words_first: u64 = expected_first.values().sum();
    let mut expected = expected_first;
    for (w, n) in expected_second {
        *expected.entry(w).or_default() += n;
    }
    let file = write_job(
        tmp.path(),
        "socket-wc",
        "",
        &format!("{{uid: lines, type: socket, host: 127.0.0.1, port: {port}}}"),
        "      - {uid: words, type: split, inputs: [lines]}\n      - {uid: counts, type: count, inputs: [words], key: word}\n",
    );
    let mut job = run(&file, tmp.path(), &[]);
    let (mut conn, _) = server.accept().unwrap();
    conn.write_all(first[0].as_bytes()).unwrap();
    // Every word of the first part counted, then a checkpoint of that.
    let api = job.addr("api");
    let t = Instant::now();
    loop {
        assert!(t.elapsed() < Duration::from_secs(60), "the first part was not counted");
        let info = get_json(&api, "/v1/job").unwrap_or_default();
        let counted = info["operators"]
            .as_array()
            .and_then(|o| o.iter().find(|o| o["uid"] == "counts"))
            .and_then(|o| o["recordsIn"].as_u64());
        if counted == Some(words_first) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = get_json(&api, "/v1/checkpoints").unwrap()["completed"].as_u64().unwrap();
    assert!(wait_checkpoints(&mut job, seen + 2, Duration::from_secs(30)), "no checkpoint");
    let (code, _, err) = savepoint(&api);
    assert_eq!(code, Some(0), "the savepoint failed: {err}");
    job.child.kill().unwrap();
    let _ = job.finish(Duration::from_secs(30));
    drop(conn);
    // The resumed job connects again and reads the second part; its state holds the first.
    let job = run(&file, tmp.path(), &["--resume"]);
    let (mut conn, _) = server.accept().unwrap();
    conn.write_all(second[0].as_bytes()).unwrap();
    drop(conn);
    let (code, err) = job.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    let texts = common::committed_texts(&tmp.path().join("out"));
    common::check_counts(texts.iter().map(String::as_str), &expected);
}

#[test]
fn a_savepoint_that_cannot_complete_fails_within_its_timeout() {
    // The sink takes 300 words a second: an aligned savepoint's barrier waits behind
    // thousands of buffered words, far longer than the 2 s its spec gives it.
    let tmp = tempfile::tempdir().unwrap();
    common::write_input(&tmp.path().join("in"), 4, 3000, 23);
    let file = write_job(
        tmp.path(),
        "slow",
        "  savepoints: {timeout: 2s}\n",
        &format!("{{uid: lines, type: file_source, path: {}}}", tmp.path().join("in").display()),
        "      - {uid: words, type: split, inputs: [lines]}\n      - {uid: counted, type: count, inputs: [words], key: word}\n      - {uid: counts, type: throttle, inputs: [counted], ratePerSecond: 300}\n",
    );
    let mut job = run(&file, tmp.path(), &["--processes"]);
    let api = job.addr("api");
    wait_running(&api);
    // Let the channels into the sink side fill up.
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    let (code, _, err) = savepoint(&api);
    let took = t.elapsed();
    assert_ne!(code, Some(0), "{err}");
    assert!(took < Duration::from_secs(30), "the savepoint failed only after {took:?}: {err}");
    assert!(err.contains("expired") || err.contains("timeout"), "{err}");
    let _ = job.child.kill();
    let _ = job.finish(Duration::from_secs(30));
}

#[test]
fn a_job_stopped_with_on_cancel_delete_leaves_no_checkpoints_and_retain_keeps_them() {
    for on_cancel in ["delete", "retain"] {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("job.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {{name: cancelled}}\nspec:\n  parallelism: 2\n  checkpointing: {{interval: 200ms, onCancel: {on_cancel}, storage: {}}}\n  pipeline:\n    operators:\n      - {{uid: events, type: generator, format: kv, ratePerSecond: 2000}}\n      - {{uid: counts, type: count, inputs: [events], key: key}}\n      - {{uid: out, type: file_sink, inputs: [counts], path: {}}}\n",
                tmp.path().join("checkpoints").display(),
                tmp.path().join("out").display()
            ),
        )
        .unwrap();
        let mut job = run(&file, tmp.path(), &[]);
        assert!(wait_checkpoints(&mut job, 2, Duration::from_secs(60)), "{on_cancel}");
        job.signal("-TERM");
        let (code, err) = job.finish(Duration::from_secs(60));
        assert_eq!(code, Some(0), "{err}");
        let jobs = tmp.path().join("checkpoints/default/cancelled");
        let left = std::fs::read_dir(&jobs).map(|d| d.count()).unwrap_or(0);
        if on_cancel == "delete" {
            assert!(err.contains("onCancel is delete: deleted the job's checkpoints"), "{err}");
            assert_eq!(left, 0, "checkpoints were left behind: {err}");
        } else {
            assert_eq!(left, 1, "the job's checkpoints are gone: {err}");
        }
    }
}

#[test]
fn a_job_that_does_not_stop_in_time_is_cancelled_and_resumes_exactly() {
    // The sink side takes 20 words a second: told to stop, the job's final barrier waits
    // behind thousands of buffered words. After 30 s the coordinator cancels the workers and
    // says so; `--resume` then counts every word once.
    let tmp = tempfile::tempdir().unwrap();
    let expected = common::write_input(&tmp.path().join("in"), 2, 400, 31);
    let source =
        format!("{{uid: lines, type: file_source, path: {}}}", tmp.path().join("in").display());
    let job_with = |rate: &str| {
        write_job(
            tmp.path(),
            "stuck",
            "  restartStrategy: {type: none}\n",
            &source,
            &format!(
                "      - {{uid: words, type: split, inputs: [lines]}}\n      - {{uid: counted, type: count, inputs: [words], key: word}}\n      - {{uid: counts, type: throttle, inputs: [counted], ratePerSecond: {rate}}}\n"
            ),
        )
    };
    // A stop may take as long as a checkpoint (spec.checkpointing.timeout), and at least 30 s;
    // the checkpoints that expire meanwhile are tolerated.
    let file = job_with("20");
    let text = std::fs::read_to_string(&file).unwrap();
    let text =
        text.replace("interval: 300ms", "interval: 300ms, timeout: 5s, tolerableFailures: 100");
    assert!(text.contains("timeout: 5s"), "{text}");
    std::fs::write(&file, text).unwrap();
    let mut job = run(&file, tmp.path(), &[]);
    let api = job.addr("api");
    wait_running(&api);
    std::thread::sleep(Duration::from_secs(2));
    assert!(job.child.try_wait().unwrap().is_none(), "the job ended before it was told to stop");
    let told = Instant::now();
    job.signal("-TERM");
    let (code, err) = job.finish(Duration::from_secs(120));
    let took = told.elapsed();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the job did not stop within 30 s of being told to (spec.checkpointing.timeout, at least 30 s): its workers were cancelled"),
        "{err}"
    );
    assert!(took >= Duration::from_secs(30), "cancelled after {took:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    // Resumed with a fast sink side: nothing lost, nothing twice. (The cancelled run may
    // leave a part file in progress, hidden by its dot name, that no checkpoint names: it is
    // not output, and is left as it is.)
    let file = job_with("1000000");
    let (code, err) = run(&file, tmp.path(), &["--resume"]).finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    let out = tmp.path().join("out");
    remove_parts_in_progress(&out);
    let texts = common::committed_texts(&out);
    common::check_counts(texts.iter().map(String::as_str), &expected);
}

/// Removes the hidden part files in progress that a killed or cancelled run left in the
/// output directory `out` (no checkpoint names them: they are not output); any other hidden
/// file fails the test.
fn remove_parts_in_progress(out: &Path) {
    for e in std::fs::read_dir(out).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            assert!(name.ends_with(".inprogress"), "{name}");
            std::fs::remove_file(e.path()).unwrap();
        }
    }
}

/// The `_metadata` of the newest completed checkpoint below `dir` (by its id).
fn newest_metadata(dir: &Path) -> Option<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_prefix("chk-").and_then(|n| n.parse::<u64>().ok()) {
                let m = e.path().join("_metadata");
                if m.exists() && best.as_ref().is_none_or(|(b, _)| n > *b) {
                    best = Some((n, m));
                }
            } else if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            }
        }
    }
    best.map(|(_, p)| p)
}

#[test]
fn a_throttle_behind_a_source_takes_barriers_and_its_held_records_resume_exactly() {
    // Lines go through a throttle of 200 a second per subtask, chained to the file source,
    // which reads 1024 lines a poll: the throttle holds most of each batch back, in its
    // state. Its checkpoints still complete every 300 ms; told to stop, the job lets the
    // held lines go and stops part-way through its input; killed while it holds lines, it
    // resumes from a checkpoint that holds them; and the last run, at a fast rate, counts
    // every word once.
    let tmp = tempfile::tempdir().unwrap();
    let expected = common::write_input(&tmp.path().join("in"), 2, 2000, 43);
    let words: u64 = expected.values().sum();
    let source =
        format!("{{uid: lines, type: file_source, path: {}}}", tmp.path().join("in").display());
    let job_with = |rate: &str| {
        write_job(
            tmp.path(),
            "paced",
            "  restartStrategy: {type: none}\n",
            &source,
            &format!(
                "      - {{uid: slow, type: throttle, inputs: [lines], ratePerSecond: {rate}}}\n      - {{uid: words, type: split, inputs: [slow]}}\n      - {{uid: counts, type: count, inputs: [words], key: word}}\n"
            ),
        )
    };
    let committed_words = || -> u64 {
        common::committed_texts(&tmp.path().join("out"))
            .iter()
            .map(|t| t.lines().count() as u64)
            .sum()
    };
    let holds = |what: &str| {
        let m = newest_metadata(&tmp.path().join("checkpoints")).expect("a checkpoint");
        let text = String::from_utf8_lossy(&std::fs::read(&m).unwrap()).into_owned();
        assert!(text.contains("\"held\""), "{what}: {} holds no throttled lines", m.display());
    };

    let mut job = run(&job_with("200"), tmp.path(), &[]);
    assert!(
        wait_checkpoints(&mut job, 3, Duration::from_secs(60)),
        "no 3 checkpoints while the throttle held lines: {}",
        job.finish(Duration::from_secs(30)).1
    );
    holds("run 1");
    job.signal("-TERM");
    let (code, err) = job.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    let first = committed_words();
    assert!(first < words, "the job did not stop part-way: {first} of {words} words counted");

    let mut job = run(&job_with("200"), tmp.path(), &["--resume"]);
    assert!(
        wait_checkpoints(&mut job, 2, Duration::from_secs(60)),
        "run 2: {}",
        job.finish(Duration::from_secs(30)).1
    );
    holds("run 2");
    job.signal("-KILL");
    let _ = job.finish(Duration::from_secs(30));

    let (code, err) =
        run(&job_with("1000000"), tmp.path(), &["--resume"]).finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    // The killed run may leave a part file in progress that no checkpoint names.
    remove_parts_in_progress(&tmp.path().join("out"));
    let texts = common::committed_texts(&tmp.path().join("out"));
    common::check_counts(texts.iter().map(String::as_str), &expected);
    assert_eq!(committed_words(), words, "every word counted once");
}
