//! The example's operators as a user runs them: `weir-detector run` of a manifest whose
//! pipeline names them beside built-in ones. The alerts committed must be exactly those a
//! model of the detector computes from the input, also when worker processes are killed at
//! random moments and when the job is stopped into savepoints and restored at parallelism
//! 2, then 3, then 1 (its keyed state split by key group each time). Bad parameters are
//! refused before anything starts, naming the operator.

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/process/mod.rs"]
mod process;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use weir_runtime::connectors::SplitMix64;
use weir_runtime::record::Value;

use process::{Proc, WEIR, wait_running};

const TOKEN: &str = "weir-detector-tests-api-token";
const FACTOR: f64 = 3.0;
const MIN_HISTORY: u64 = 3;

/// Writes `files` input files of `lines` transactions each (a second of event time apart);
/// each account's lines are in one file (so that its records arrive in one order, whichever
/// subtask reads the file), with some lines that are no transaction, and some accounts that
/// have transactions only at the start. Returns the alerts the
/// detector must emit, sorted: its spikes, and the silences of each account (which fire at
/// the end of the input, when event time ends: the source declares none).
fn write_transactions(dir: &Path, files: usize, lines: usize, seed: u64) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = SplitMix64::new(seed);
    let mut alerts = Vec::new();
    for f in 0..files {
        let mut text = String::new();
        let mut stats: BTreeMap<String, (u64, i64)> = BTreeMap::new();
        let mut flagged: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let mut times: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for line in 0..lines {
            if rng.next_u64().is_multiple_of(50) {
                text.push_str("not a transaction\n");
                continue;
            }
            // Some accounts go silent early: their timers are registered long before the end
            // and must survive every restore and rescale to fire once.
            let account = if line < 100 && rng.next_u64().is_multiple_of(2) {
                format!("early-{f}-{}", rng.next_u64() % 5)
            } else {
                format!("acct-{f}-{}", rng.next_u64() % 40)
            };
            let amount = if rng.next_u64().is_multiple_of(12) {
                200 + (rng.next_u64() % 20) as i64 * 100
            } else {
                10 + (rng.next_u64() % 90) as i64
            };
            let time = line as i64 * 1000;
            text.push_str(&format!("{account},{amount},{time}\n"));
            // The model of the detector.
            let (count, sum) = stats.entry(account.clone()).or_default();
            if *count >= MIN_HISTORY {
                let mean = *sum / *count as i64;
                let seen = flagged.entry(account.clone()).or_default();
                if amount as f64 > FACTOR * mean as f64 && !seen.contains(&amount) {
                    seen.push(amount);
                    alerts.push(format!("{account},spike,{amount},{mean}"));
                }
            }
            *count += 1;
            *sum += amount;
            times.entry(account.clone()).or_default().push(time);
        }
        // A silence after each transaction that no other of its account follows within 5 s
        // (every one fires at the end of the input, when event time ends: the mean is the
        // account's final one).
        for (account, (count, sum)) in stats {
            for t in silences(&times[&account]) {
                alerts.push(format!("{account},silent,{t},{}", sum / count as i64));
            }
        }
        std::fs::write(dir.join(format!("tx-{f:02}.csv")), text).unwrap();
    }
    alerts.sort();
    assert!(alerts.len() > 50 * files, "too few alerts to tell anything: {}", alerts.len());
    alerts
}

/// The silences of an account whose transactions are at `times` (in order): 5 s after each
/// that no other follows within 5 s.
fn silences(times: &[i64]) -> Vec<i64> {
    times
        .iter()
        .enumerate()
        .filter(|(i, t)| times.get(i + 1).is_none_or(|next| *next > **t + 5000))
        .map(|(_, t)| t + 5000)
        .collect()
}

/// The job: transactions read at `rate` lines per second, checkpointed every second.
fn manifest(dir: &Path, rate: u32, detector: &str) -> PathBuf {
    let file = dir.join("job.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: fraud}}
spec:
  parallelism: 2
  maxParallelism: 128
  checkpointing: {{interval: 1s, storage: '{chk}'}}
  savepoints: {{directory: '{sp}'}}
  restartStrategy: {{type: fixed-delay, delay: 200ms, attempts: 100}}
  pipeline:
    operators:
      - {{uid: lines, type: file_source, path: '{input}', ratePerSecond: {rate}}}
      - {{uid: tx, type: transactions, inputs: [lines]}}
      - {{uid: fraud, inputs: [tx], {detector}}}
      - {{uid: alerts, type: file_sink, inputs: [fraud], path: '{out}'}}
",
            chk = dir.join("checkpoints").display(),
            sp = dir.join("savepoints").display(),
            input = dir.join("in").display(),
            out = dir.join("out").display(),
        ),
    )
    .unwrap();
    file
}

const DETECTOR: &str = "type: fraud_detector, factor: 3, minHistory: 3, silence: 5s";

fn committed_alerts(dir: &Path) -> Vec<String> {
    let mut lines: Vec<String> = common::committed_texts(&dir.join("out"))
        .iter()
        .flat_map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
        .collect();
    lines.sort();
    lines
}

fn run(file: &Path, dir: &Path, args: &[&str]) -> Proc {
    let state = dir.join("state");
    let mut all = vec!["run", file.to_str().unwrap(), "--api-addr", "127.0.0.1:0"];
    all.extend(["--state-dir", state.to_str().unwrap()]);
    all.extend(args);
    process::start_with_env(&all, &[("WEIR_API_TOKEN", TOKEN)])
}

/// The detector's own metrics, as the job serves them: every subtask has judged some
/// transactions (none more than came in), in `/v1/job` and on `/metrics`.
fn check_metrics(api: &str, p: u32) {
    // Each worker reports with its progress, a few times a second: wait for every subtask's.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (judged, came_in) = loop {
        let info = process::job_info(api).expect("/v1/job");
        let ops = info["operators"].as_array().unwrap();
        let fraud = ops.iter().find(|o| o["uid"] == "fraud").expect("the detector").clone();
        let metrics = fraud["metrics"].as_array().cloned().unwrap_or_default();
        let judged: Vec<Option<i64>> = (0..p)
            .map(|s| {
                let m =
                    metrics.iter().find(|m| m["name"] == "transactions" && m["subtask"] == s)?;
                assert_eq!(m["kind"], "counter");
                m["value"].as_i64()
            })
            .collect();
        if judged.iter().all(|n| n.is_some_and(|n| n > 0)) {
            let judged: Vec<i64> = judged.into_iter().flatten().collect();
            break (judged, fraud["recordsIn"].as_i64().unwrap());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every subtask's transactions counter came up: {judged:?} in {metrics:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(judged.iter().sum::<i64>() <= came_in, "{judged:?} of {came_in}");
    let (code, text) = process::request(api, "GET", "/metrics", None).expect("/metrics");
    assert_eq!(code, 200);
    let line = text
        .lines()
        .find(|l| l.starts_with("weir_user_transactions{") && l.contains("subtask=\"0\""))
        .unwrap_or_else(|| panic!("no weir_user_transactions of subtask 0:\n{text}"));
    assert!(
        line.contains("operator=\"fraud\"") && line.contains("type=\"fraud_detector\""),
        "{line}"
    );
    assert!(text.contains("# TYPE weir_user_alerts counter"), "{text}");
}

#[test]
fn the_detector_runs_with_weir_run_and_flags_exactly_what_it_should() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = write_transactions(&tmp.path().join("in"), 4, 2000, 1);
    let file = manifest(tmp.path(), 1_000_000, DETECTOR);
    let (code, err) = run(&file, tmp.path(), &[]).finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(committed_alerts(tmp.path()), expected);
}

#[test]
fn bad_parameters_of_a_user_operator_are_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    write_transactions(&tmp.path().join("in"), 1, 400, 2);
    for (detector, says) in [
        (
            "type: fraud_detector, factor: 0.5",
            "operator \"fraud\" (fraud_detector): factor 0.5 must be a number above 1",
        ),
        (
            "type: fraud_detector, factor: 3, factr: 4",
            "operator \"fraud\" (fraud_detector): unknown field `factr`",
        ),
        (
            "type: fraud_detector, factor: high",
            "operator \"fraud\" (fraud_detector): invalid type: string \"high\", expected f64",
        ),
        (
            "type: fraud_detector, factor: 3, key: acct",
            "operator \"fraud\" (fraud_detector): key \"acct\" is not a field of its input (fields: account, amount, time)",
        ),
        (
            "type: fraud_detectr, factor: 3",
            "type \"fraud_detectr\" is unknown: use one of generator,",
        ),
    ] {
        let file = manifest(tmp.path(), 1000, detector);
        let (code, err) = run(&file, tmp.path(), &[]).finish(Duration::from_secs(60));
        assert_eq!(code, Some(2), "{detector}: {err}");
        assert!(err.contains(says), "{detector}: {err}");
        assert!(!tmp.path().join("out").exists(), "{detector}: the job started: {err}");
    }
    // The unknown type's message lists the binary's own types too.
    let file = manifest(tmp.path(), 1000, "type: fraud_detectr");
    let (_, err) = run(&file, tmp.path(), &[]).finish(Duration::from_secs(60));
    assert!(err.contains("file_sink, kafka_sink, fraud_detector, transactions"), "{err}");
}

#[test]
fn killed_worker_processes_lose_and_duplicate_no_alert() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = write_transactions(&tmp.path().join("in"), 6, 2500, 3);
    let file = manifest(tmp.path(), 1500, DETECTOR);
    let mut job = run(&file, tmp.path(), &["--processes"]);
    let mut rng = SplitMix64::new(0xf00d);
    let mut kills = 0;
    while kills < 5 {
        if !wait_running(&mut job, kills) {
            break;
        }
        std::thread::sleep(Duration::from_millis(300 + rng.next_u64() % 1700));
        let workers = common::children_of(job.child.id());
        if workers.is_empty() || job.child.try_wait().unwrap().is_some() {
            break;
        }
        let victim = workers[(rng.next_u64() % workers.len() as u64) as usize];
        let _ = Command::new("kill").args(["-KILL", &victim.to_string()]).status();
        kills += 1;
    }
    let (code, err) = job.finish(Duration::from_secs(300));
    assert_eq!(code, Some(0), "{err}");
    assert!(kills >= 4, "the job ended after {kills} kills; make the input longer: {err}");
    assert!(err.contains("from checkpoint"), "no restart restored a checkpoint: {err}");
    assert_eq!(committed_alerts(tmp.path()), expected);
}

#[test]
fn stopped_into_savepoints_and_restored_at_2_3_1_the_alerts_stay_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = write_transactions(&tmp.path().join("in"), 6, 1500, 4);
    let file = manifest(tmp.path(), 1500, DETECTOR);
    let mut from: Option<String> = None;
    let mut committed = 0;
    for (k, p) in [2u32, 3, 1].into_iter().enumerate() {
        let ps = p.to_string();
        let mut args = vec!["--parallelism", ps.as_str()];
        if let Some(f) = &from {
            args.extend(["--from-savepoint", f.as_str()]);
        }
        let mut job = run(&file, tmp.path(), &args);
        assert!(wait_running(&mut job, 0), "run {k} ended before it ran");
        if k == 2 {
            let (code, err) = job.finish(Duration::from_secs(300));
            assert_eq!(code, Some(0), "the last run: {err}");
            assert!(err.contains("restored key groups 0..=127"), "{err}");
            break;
        }
        std::thread::sleep(Duration::from_millis(1500));
        check_metrics(&job.addr("api"), p);
        let out = Command::new(WEIR)
            .args(["savepoint", "--api", &job.addr("api"), "--stop"])
            .env("WEIR_API_TOKEN", TOKEN)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "weir-detector savepoint --stop: {err}");
        let (code, job_err) = job.finish(Duration::from_secs(60));
        assert_eq!(code, Some(0), "the job after its stopping savepoint: {job_err}");
        if k == 1 {
            assert!(
                job_err.contains("state taken at parallelism 2 at parallelism 3"),
                "restored at another parallelism: {job_err}"
            );
        }
        // What is committed so far is a part of the alerts, each once, and more than before;
        // no silence fired yet (event time ends with the input).
        let sofar = committed_alerts(tmp.path());
        assert!(sofar.len() > committed, "run {k} committed no alert");
        committed = sofar.len();
        let mut rest = expected.clone();
        for a in &sofar {
            let i = rest.binary_search(a).unwrap_or_else(|_| panic!("{a}: wrong, or twice"));
            rest.remove(i);
        }
        assert!(sofar.iter().all(|a| a.contains(",spike,")), "a silence fired early");
        assert!(rest.iter().any(|a| a.contains(",spike,")), "run {k} read everything");
        from = Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    assert_eq!(committed_alerts(tmp.path()), expected);
}

/// The lines holding `what` in the files committed so far (part files in progress are
/// hidden).
fn committed_so_far(dir: &Path, what: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with(['.', '_']))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .flat_map(|t| {
            t.lines().filter(|l| l.contains(what)).map(str::to_string).collect::<Vec<_>>()
        })
        .collect()
}

/// The generator's records of a job with event time: `(key, value, ts)` of its one split.
fn generated(spec: &str) -> Vec<(String, i64, i64)> {
    let spec: weir_runtime::plan::GeneratorSpec = serde_json::from_str(spec).unwrap();
    let mut g = weir_runtime::connectors::GeneratorSource::new(spec, 0, 1);
    let mut out = Vec::new();
    while weir_runtime::operator::Source::poll(&mut g, &mut out, 1000).unwrap() {}
    out.iter()
        .map(|r| match (&r[0], &r[1], &r[2]) {
            (Value::Str(k), Value::Int(v), Value::Int(t)) => (k.to_string(), *v, *t),
            other => panic!("not a kv record: {other:?}"),
        })
        .collect()
}

/// The silences of the generator's records, `key,silent,time` sorted (the generator's one
/// split is in time order).
fn model_silences(records: &[(String, i64, i64)]) -> Vec<String> {
    let mut by_key: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (k, _, t) in records {
        by_key.entry(k).or_default().push(*t);
    }
    let mut expected: Vec<String> = by_key
        .iter()
        .flat_map(|(k, ts)| silences(ts).into_iter().map(move |t| format!("{k},silent,{t}")))
        .collect();
    expected.sort();
    expected
}

/// A job of the generator `gen` (JSON of its parameters) into the detector.
fn silence_job(dir: &Path, generator: &str) -> PathBuf {
    let file = dir.join("job.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: silences}}
spec:
  parallelism: 2
  checkpointing: {{interval: 1s, storage: '{chk}'}}
  pipeline:
    operators:
      - {{uid: tx, type: generator, {gen}}}
      - {{uid: fraud, inputs: [tx], type: fraud_detector, key: key, field: value, timeField: ts, factor: 3, silence: 5s}}
      - {{uid: alerts, type: file_sink, inputs: [fraud], path: '{out}'}}
",
            chk = dir.join("checkpoints").display(),
            gen = &generator[1..generator.len() - 1],
            out = dir.join("out").display(),
        ),
    )
    .unwrap();
    file
}

/// With event time from the source, watermarks reach the detector as the job runs: an
/// account's silence fires once the watermark passes it. Over threads, and over worker
/// processes (watermarks on the wire): a bounded run gives exactly the silences of the model;
/// an unbounded one commits silences while it runs (without watermarks none would ever
/// fire), each one the model has.
#[test]
fn with_event_time_from_the_source_silences_fire_as_the_watermark_passes_them() {
    const BOUNDED: &str = r#"{"format": "kv", "count": 20000, "keys": 3000, "splits": 1, "seed": 11, "ratePerSecond": 10000, "eventTime": {"field": "ts"}}"#;
    const UNBOUNDED: &str = r#"{"format": "kv", "keys": 3000, "splits": 1, "seed": 11, "ratePerSecond": 4000, "eventTime": {"field": "ts"}}"#;
    let expected = model_silences(&generated(BOUNDED));
    assert!(expected.len() > 3500, "too few silences to tell anything: {}", expected.len());
    // The unbounded generator's first 200 000 records: far more than a run reads.
    let long = model_silences(&generated(&BOUNDED.replace("20000", "200000")));
    for args in [&[][..], &["--processes"][..]] {
        let tmp = tempfile::tempdir().unwrap();
        let file = silence_job(tmp.path(), BOUNDED);
        let (code, err) = run(&file, tmp.path(), args).finish(Duration::from_secs(120));
        assert_eq!(code, Some(0), "{args:?}: {err}");
        // The mean depends on how far the records ran ahead of the watermark: not compared.
        let silences: Vec<String> = committed_alerts(tmp.path())
            .iter()
            .filter(|a| a.contains(",silent,"))
            .map(|a| a.rsplit_once(',').unwrap().0.to_string())
            .collect();
        assert_eq!(silences.len(), expected.len(), "{args:?}");
        assert!(silences == expected, "{args:?}: the silences differ from the model");

        let tmp = tempfile::tempdir().unwrap();
        let file = silence_job(tmp.path(), UNBOUNDED);
        let mut job = run(&file, tmp.path(), args);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut fired = Vec::new();
        while fired.is_empty() && std::time::Instant::now() < deadline {
            assert!(job.child.try_wait().unwrap().is_none(), "{args:?}: the job ended");
            std::thread::sleep(Duration::from_millis(100));
            fired = committed_so_far(&tmp.path().join("out"), ",silent,");
        }
        for w in common::children_of(job.child.id()) {
            let _ = Command::new("kill").args(["-KILL", &w.to_string()]).status();
        }
        job.signal("-KILL");
        let _ = job.finish(Duration::from_secs(30));
        assert!(!fired.is_empty(), "{args:?}: no silence fired in a minute of the job");
        for a in &fired {
            let silence = a.rsplit_once(',').unwrap().0.to_string();
            assert!(long.binary_search(&silence).is_ok(), "{args:?}: {a} is no silence");
        }
    }
}

#[test]
fn the_example_streamjob_plans_with_the_example_binarys_types_and_not_without_them() {
    let path = Path::new(&manifest_dir()).join("job.yaml");
    let job = weir_runtime::load_manifest(&path).unwrap();
    assert!(job.spec.image.as_deref().is_some_and(|i| i.contains("/weir-detector:")));
    // The stock planner does not know the types; this process's registry, as the example's
    // main registers them, does.
    let stock = weir_runtime::plan::BuiltinOnly;
    let e = weir_runtime::plan::build_with(&job.spec, None, None, &stock).unwrap_err();
    assert!(e.message.contains("type \"transactions\" is unknown"), "{e}");
    weir_runtime::operator::install(
        weir_runtime::operator::Registry::builtin()
            .with::<weir_detector::Transactions>("transactions")
            .with::<weir_detector::FraudDetector>("fraud_detector"),
    )
    .unwrap();
    let plan = weir_runtime::plan::build(&job.spec, None, None).unwrap();
    let fraud = plan.ops.iter().find(|o| o.uid == "fraud").unwrap();
    assert_eq!(fraud.fields, ["account", "alert", "value", "mean"]);
    assert_eq!(fraud.kind.key_field(), Some("account"));
}

/// The package's directory, from cargo at run time: a test binary built in another checkout
/// sharing the target directory (CI's) must not read that checkout's files.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())
}
