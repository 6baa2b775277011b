//! Golden tests: a word count over files written by the test gives exactly the counts the test
//! computes on its own, at parallelism 1, 2 and 3, in the library and in the three ways the
//! `weir` command runs a job (one process, worker processes, coordinator and workers apart);
//! bad pipelines stop before anything starts, with exit code 2.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use weir_runtime::exec::{JobMetrics, RunOptions, run_local};

/// Writes `files` files of text and returns the true count of every word.
fn write_input(dir: &Path, files: usize, lines: usize, seed: u64) -> BTreeMap<String, u64> {
    std::fs::create_dir_all(dir).unwrap();
    let (texts, counts) = common::word_texts(files, lines, seed, None, None);
    for (f, text) in texts.iter().enumerate() {
        std::fs::write(dir.join(format!("input-{f:02}.txt")), text).unwrap();
    }
    // Files the source must skip.
    std::fs::write(dir.join(".hidden"), "ghost ghost\n").unwrap();
    std::fs::write(dir.join("_SUCCESS"), "ghost\n").unwrap();
    counts
}

fn manifest(input: &Path, output: &Path, parallelism: u32) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {{name: wc}}\nspec:\n  parallelism: {parallelism}\n  maxParallelism: 128\n  checkpointing: {{interval: 1s, storage: {}}}\n  pipeline:\n    operators:\n      - {{uid: lines,  type: file_source, path: {}}}\n      - {{uid: words,  type: split, inputs: [lines]}}\n      - {{uid: counts, type: count, inputs: [words], key: word}}\n      - {{uid: out,    type: file_sink, inputs: [counts], path: {}}}\n",
        output.with_extension("checkpoints").display(),
        input.display(),
        output.display()
    )
}

/// Reads the committed output and checks it against the true counts: for every word, each
/// count from 1 to its final value exactly once.
fn check_output(out: &Path, expected: &BTreeMap<String, u64>) {
    let texts = common::committed_texts(out);
    common::check_counts(texts.iter().map(String::as_str), expected);
}

#[test]
fn word_count_is_exact_at_parallelism_1_2_and_3_in_process() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let expected = write_input(&input, 7, 400, 11);
    for p in [1, 2, 3] {
        let out = tmp.path().join(format!("out-{p}"));
        let job: weir_crds::StreamJob = serde_saphyr::from_str(&manifest(&input, &out, p)).unwrap();
        let plan = weir_runtime::plan::build(&job.spec, None, None).unwrap();
        assert_eq!(plan.parallelism, p);
        let mut opts = RunOptions::new(tmp.path().join("state"), format!("test-{p}"));
        opts.keep_state = true;
        let summary = run_local(&plan, &opts, Arc::new(JobMetrics::new(&plan))).unwrap();
        let total: u64 = expected.values().sum();
        assert_eq!(summary.records["counts"].0, total, "records into count at p={p}");
        check_output(&out, &expected);
        // Each worker's RocksDB holds exactly the words of the key groups it owns.
        let mut stored = BTreeMap::new();
        for s in 0..p {
            let backend = weir_runtime::state::StateBackend::open(
                &tmp.path().join(format!("state/test-{p}/counts-{s}/db")),
                &["counts".to_string()],
            )
            .unwrap();
            let range = weir_runtime::keygroup::KeyGroupRange::of_subtask(128, p, s);
            for (g, k, _) in backend.scan("counts").unwrap() {
                assert!(range.contains(g), "worker {s} holds key group {g} outside {range:?}");
                stored.insert(String::from_utf8(k).unwrap(), s);
            }
        }
        assert_eq!(stored.len(), expected.len());
    }
}

/// `spec.stateBackend: heap` gives the same output as RocksDB, exact, at parallelism 1, 2
/// and 3, and keeps nothing on disk.
#[test]
fn the_heap_backend_counts_exactly_what_rocksdb_does() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let expected = write_input(&input, 5, 300, 12);
    for p in [1, 2, 3] {
        let mut outputs = Vec::new();
        for backend in ["rocksdb", "heap"] {
            let out = tmp.path().join(format!("out-{backend}-{p}"));
            let yaml = manifest(&input, &out, p)
                .replace("spec:\n", &format!("spec:\n  stateBackend: {backend}\n"));
            let job: weir_crds::StreamJob = serde_saphyr::from_str(&yaml).unwrap();
            let plan = weir_runtime::plan::build(&job.spec, None, None).unwrap();
            assert_eq!(plan.state_backend.as_str(), backend);
            let state = tmp.path().join(format!("state-{backend}"));
            let mut opts = RunOptions::new(state.clone(), format!("test-{p}"));
            opts.keep_state = true;
            run_local(&plan, &opts, Arc::new(JobMetrics::new(&plan))).unwrap();
            check_output(&out, &expected);
            outputs.push(common::sorted_lines(&out));
            let db = state.join(format!("test-{p}/counts-0/db"));
            assert_eq!(db.exists(), backend == "rocksdb", "{}", db.display());
        }
        assert_eq!(outputs[0], outputs[1], "rocksdb and heap at parallelism {p}");
    }
}

/// The three ways to run a job.
#[derive(Debug, Clone, Copy)]
enum Way {
    /// `weir run FILE`: every subtask a thread of one process.
    InProcess,
    /// `weir run FILE --processes`: a worker process per subtask index.
    Processes,
    /// `weir coordinator FILE` and `weir worker --index I`, started separately.
    Separate,
}

struct Outcome {
    ok: bool,
    stderr: String,
}

/// The job's secret of the coordinators and workers started separately.
const SECRET: &str = "weir-golden-job-secret-0123456789abcdef";

/// Runs the job of `file` the given way; `args` go to `weir run` / `weir coordinator`.
fn run_job(way: Way, file: &Path, args: &[&str], state: &Path) -> Outcome {
    let weir = env!("CARGO_BIN_EXE_weir");
    let state = state.to_str().unwrap();
    match way {
        Way::InProcess | Way::Processes => {
            let mut cmd = Command::new(weir);
            cmd.arg("run").arg(file).args(args).args(["--state-dir", state]);
            if matches!(way, Way::Processes) {
                cmd.arg("--processes");
            }
            let res = cmd.output().unwrap();
            Outcome {
                ok: res.status.success(),
                stderr: String::from_utf8_lossy(&res.stderr).into(),
            }
        }
        Way::Separate => {
            let mut coord = Command::new(weir)
                .env("WEIR_JOB_SECRET", SECRET)
                .arg("coordinator")
                .arg(file)
                .args(args)
                .args(["--control-addr", "127.0.0.1:0"])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            // The coordinator says where it listens; read on in the background.
            let (tx, rx) = std::sync::mpsc::channel();
            let err = coord.stderr.take().unwrap();
            let reader = std::thread::spawn(move || {
                use std::io::BufRead;
                let mut all = String::new();
                for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    if let Some((_, addr)) = line.split_once(", control ") {
                        let _ = tx.send(addr.trim().to_string());
                    }
                    all.push_str(&line);
                    all.push('\n');
                }
                all
            });
            let addr = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("the coordinator's address");
            let parallelism: u32 = args
                .iter()
                .position(|a| *a == "--parallelism")
                .map(|i| args[i + 1].parse().unwrap())
                .expect("--parallelism for the separate way");
            let workers: Vec<_> =
                (0..parallelism)
                    .map(|i| {
                        let mut cmd = Command::new(weir);
                        cmd.env("WEIR_JOB_SECRET", SECRET);
                        cmd.args(["worker", "--coordinator", &addr, "--index", &i.to_string()])
                            .args(["--state-dir", state, "--data-addr", "127.0.0.1:0"]);
                        std::thread::spawn(move || cmd.output())
                    })
                    .collect();
            let status = coord.wait().unwrap();
            let mut stderr = reader.join().unwrap();
            for w in workers {
                let w = w.join().unwrap().unwrap();
                stderr.push_str(&String::from_utf8_lossy(&w.stderr));
                assert!(w.status.success() || !status.success(), "a worker failed: {stderr}");
            }
            Outcome { ok: status.success(), stderr }
        }
    }
}

#[test]
fn word_count_is_exact_in_all_three_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let expected = write_input(&input, 7, 300, 5);
    for way in [Way::InProcess, Way::Processes, Way::Separate] {
        for p in [1, 2, 3] {
            let out = tmp.path().join(format!("out-{way:?}-{p}"));
            let file = tmp.path().join(format!("wc-{way:?}-{p}.yaml"));
            // The manifest says parallelism 2; the flag overrides it.
            std::fs::write(&file, manifest(&input, &out, 2)).unwrap();
            let res =
                run_job(way, &file, &["--parallelism", &p.to_string()], &tmp.path().join("state"));
            assert!(res.ok, "{way:?} at p={p} failed: {}", res.stderr);
            assert!(res.stderr.contains(&format!("parallelism {p}")), "{}", res.stderr);
            check_output(&out, &expected);
        }
    }
    // Runs never overwrite each other's files: a second run into the same directory adds files.
    let out = tmp.path().join("out-InProcess-1");
    let before = std::fs::read_dir(&out).unwrap().count();
    let file = tmp.path().join("wc-InProcess-1.yaml");
    let res = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", file.to_str().unwrap(), "--parallelism", "1"])
        .output()
        .unwrap();
    assert!(res.status.success());
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), before * 2);
}

#[test]
fn bad_pipelines_exit_2_naming_the_operator_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write_input(&input, 1, 10, 1);
    let out = tmp.path().join("out");
    let good = manifest(&input, &out, 2);
    let cases: &[(&str, &str, &[&str])] = &[
        ("type: split", "type: splitter", &["\"words\"", "splitter", "unknown"]),
        ("key: word", "key: wrd", &["\"counts\"", "\"wrd\""]),
        ("inputs: [words]", "inputs: [wordz]", &["\"counts\"", "\"wordz\""]),
        ("uid: words", "uid: lines", &["\"lines\"", "unique"]),
        ("inputs: [lines]", "inputs: [counts]", &["cycle"]),
        ("parallelism: 2", "parallelism: 300", &["spec.parallelism 300", "maxParallelism 128"]),
        (
            "interval: 1s,",
            "interval: 1s, mode: at-least-once, unaligned: true,",
            &["spec.checkpointing.unaligned", "exactly-once"],
        ),
        (
            "inputs: [words], key: word}",
            "inputs: [slow], key: word}\n      - {uid: slow, type: throttle, inputs: [words], ratePerSecond: 0}",
            &["\"slow\"", "ratePerSecond"],
        ),
        (
            "inputs: [words], key: word}",
            "inputs: [slow], key: word}\n      - {uid: slow, type: throttle, inputs: [words], rate: 5}",
            &["\"slow\"", "rate"],
        ),
    ];
    for (from, to, wants) in cases {
        let file = tmp.path().join("bad.yaml");
        std::fs::write(&file, good.replace(from, to)).unwrap();
        let res = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["run", file.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(2), "{to}: {err}");
        for w in *wants {
            assert!(err.contains(w), "{to}: the error does not say {w}: {err}");
        }
        assert!(!out.exists(), "{to}: something started: {} exists", out.display());
    }
    // A parallelism flag above maxParallelism is refused too.
    let file = tmp.path().join("good.yaml");
    std::fs::write(&file, &good).unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", file.to_str().unwrap(), "--parallelism", "129"])
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(2));
    // A missing file and a file that is not a manifest.
    let res = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", "/nonexistent.yaml"])
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(2));
    std::fs::write(&file, "spec: [1, 2").unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(2));
}

#[test]
fn a_sum_counts_the_records_it_drops_for_a_field_that_is_not_a_number() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(input.join("a.txt"), "a 1\nb x 2\n").unwrap();
    let file = tmp.path().join("sum.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {{name: sums}}\nspec:\n  parallelism: 1\n  pipeline:\n    operators:\n      - {{uid: lines, type: file_source, path: {}}}\n      - {{uid: words, type: split, inputs: [lines]}}\n      - {{uid: sums, type: sum, inputs: [words], key: word, field: word}}\n      - {{uid: out, type: file_sink, inputs: [sums], path: {}}}\n",
            input.display(),
            tmp.path().join("out").display()
        ),
    )
    .unwrap();
    let res = run_job(Way::InProcess, &file, &[], &tmp.path().join("state"));
    assert!(res.ok, "{}", res.stderr);
    // "a", "b" and "x" are not numbers; "1" and "2" are summed.
    assert!(res.stderr.contains("sums 5 in / 2 out (3 dropped: not usable)"), "{}", res.stderr);
}
