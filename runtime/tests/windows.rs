//! Event-time windows end to end: `weir run` of JSON bids written by the test, out of order
//! within a known bound, through a `window` of each kind with several aggregates, into a
//! `file_sink` with `format: json`. The output is compared with a model the test computes
//! itself, at parallelism 1, 2 and 3 (the watermark is the lowest over the source's files
//! and subtasks). Late records within the allowed lateness update and re-emit their window;
//! later ones are dropped and counted. Bad windows are refused before anything starts.

#[path = "common/mod.rs"]
mod common;
#[path = "process/mod.rs"]
mod process;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use weir_runtime::connectors::SplitMix64;

/// A bid: auction, price, event time.
type Bid = (i64, i64, i64);

/// `files` files of `n` bids each, 3 ms apart in event time, each up to `disorder` ms early.
fn write_bids(dir: &Path, files: usize, n: usize, disorder: i64, seed: u64) -> Vec<Bid> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = SplitMix64::new(seed);
    let mut all = Vec::new();
    for f in 0..files {
        let mut text = String::new();
        for i in 0..n {
            let base = 1_000_000 + (i * 3) as i64;
            let ts = base - (rng.next_u64() % (disorder as u64 + 1)) as i64;
            let auction = (rng.next_u64() % 12) as i64;
            let price = 1 + (rng.next_u64() % 500) as i64;
            text.push_str(&format!(
                "{{\"auction\": {auction}, \"price\": {price}, \"ts\": {ts}, \"url\": \"/a/{f}\"}}\n"
            ));
            all.push((auction, price, ts));
        }
        std::fs::write(dir.join(format!("bids-{f:02}.json")), text).unwrap();
    }
    all
}

/// The windows `[start, end)` a bid at `ts` is in.
fn windows_of(kind: &str, ts: i64, size: i64, slide: i64) -> Vec<(i64, i64)> {
    match kind {
        "tumbling" => vec![(ts - ts.rem_euclid(size), ts - ts.rem_euclid(size) + size)],
        _ => {
            let mut out = Vec::new();
            let mut s = ts - ts.rem_euclid(slide);
            while s > ts - size {
                out.push((s, s + size));
                s -= slide;
            }
            out
        }
    }
}

/// One output line as `file_sink` writes it with `format: json`: the fields in the order the
/// window emits them.
fn line(auction: i64, (start, end): (i64, i64), bids: &[i64]) -> String {
    let count = bids.len();
    let sum: i64 = bids.iter().sum();
    let max = bids.iter().max().unwrap();
    let avg = sum as f64 / count as f64;
    format!(
        "{{\"auction\":{auction},\"window_start\":{start},\"window_end\":{end},\"count\":{count},\"sum_price\":{sum},\"max_price\":{max},\"avg_price\":{}}}",
        serde_json::to_string(&avg).unwrap()
    )
}

/// The model of fixed windows: every window of every auction, once.
fn model_fixed(bids: &[Bid], kind: &str, size: i64, slide: i64) -> Vec<String> {
    let mut w: BTreeMap<(i64, (i64, i64)), Vec<i64>> = BTreeMap::new();
    for &(a, p, ts) in bids {
        for win in windows_of(kind, ts, size, slide) {
            w.entry((a, win)).or_default().push(p);
        }
    }
    let mut out: Vec<String> = w.iter().map(|((a, win), ps)| line(*a, *win, ps)).collect();
    out.sort();
    out
}

/// The model of session windows with `gap`: each auction's bids in time order, a new session
/// where the next bid is more than `gap` after the session's end... as Flink merges them:
/// `[ts, ts + gap)` windows that touch or overlap.
fn model_sessions(bids: &[Bid], gap: i64) -> Vec<String> {
    let mut by: BTreeMap<i64, Vec<(i64, i64)>> = BTreeMap::new();
    for &(a, p, ts) in bids {
        by.entry(a).or_default().push((ts, p));
    }
    let mut out = Vec::new();
    for (a, mut v) in by {
        v.sort();
        let mut cur: Option<((i64, i64), Vec<i64>)> = None;
        for (ts, p) in v {
            cur = match cur {
                Some(((s, e), mut ps)) if ts <= e => {
                    ps.push(p);
                    Some(((s, e.max(ts + gap)), ps))
                }
                other => {
                    if let Some((win, ps)) = other {
                        out.push(line(a, win, &ps));
                    }
                    Some(((ts, ts + gap), vec![p]))
                }
            };
        }
        if let Some((win, ps)) = cur {
            out.push(line(a, win, &ps));
        }
    }
    out.sort();
    out
}

fn job(dir: &Path, window: &str, lateness: &str) -> PathBuf {
    job_with(dir, window, lateness, "", "")
}

/// The job, with `source` added to the source's parameters and `spec` to the spec.
fn job_with(dir: &Path, window: &str, lateness: &str, source: &str, spec: &str) -> PathBuf {
    let file = dir.join("job.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: windows}}
spec:
  parallelism: 1
  checkpointing: {{interval: 1s, storage: '{chk}'}}
  savepoints: {{directory: '{sp}'}}{spec}
  pipeline:
    operators:
      - {{uid: bids, type: file_source, path: '{input}', format: json, fields: {{auction: int, price: int, ts: timestamp, url: string}}, eventTime: {{field: ts, maxOutOfOrderness: 2s}}{source}}}
      - {{uid: cheap, type: filter, inputs: [bids], field: price, greaterThan: 0}}
      - {{uid: hot, type: window, inputs: [cheap], key: auction, {window}, aggregate: {{count: '*', sum: price, max: price, avg: price}}{lateness}}}
      - {{uid: out, type: file_sink, inputs: [hot], path: '{out}', format: json}}
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

fn run(file: &Path, dir: &Path, p: u32) -> String {
    let _ = std::fs::remove_dir_all(dir.join("out"));
    let _ = std::fs::remove_dir_all(dir.join("checkpoints"));
    process::run_to_end(file, &dir.join(format!("state-{p}")), p, Duration::from_secs(120))
}

#[test]
fn tumbling_sliding_and_session_windows_over_out_of_order_bids_are_exact_at_1_2_and_3() {
    let tmp = tempfile::tempdir().unwrap();
    // Up to 1.5 s early, within the source's 2 s out-of-orderness: no bid is late.
    let bids = write_bids(&tmp.path().join("in"), 3, 3000, 1500, 5);
    for (window, expected) in [
        ("kind: tumbling, size: 1s", model_fixed(&bids, "tumbling", 1000, 1000)),
        ("kind: sliding, size: 2s, slide: 500ms", model_fixed(&bids, "sliding", 2000, 500)),
        ("kind: session, gap: 40ms", model_sessions(&bids, 40)),
    ] {
        assert!(expected.len() > 50, "{window}: {}", expected.len());
        let file = job(tmp.path(), window, "");
        for p in [1, 2, 3] {
            run(&file, tmp.path(), p);
            let got = common::sorted_lines(&tmp.path().join("out"));
            assert_eq!(got.len(), expected.len(), "{window} at parallelism {p}");
            assert!(got == expected, "{window} at parallelism {p}: the windows differ");
        }
    }
}

/// A window without a key: one over all bids, kept by one subtask at any parallelism.
#[test]
fn a_global_window_counts_every_bid_once_at_1_2_and_3() {
    let tmp = tempfile::tempdir().unwrap();
    let bids = write_bids(&tmp.path().join("in"), 3, 2000, 1500, 6);
    let mut by: BTreeMap<(i64, i64), Vec<i64>> = BTreeMap::new();
    for &(_, p, ts) in &bids {
        by.entry(windows_of("tumbling", ts, 1000, 1000)[0]).or_default().push(p);
    }
    // The lines without the key field.
    let mut expected: Vec<String> =
        by.iter().map(|(w, ps)| line(0, *w, ps).replacen("\"auction\":0,", "", 1)).collect();
    expected.sort();
    let file = job(tmp.path(), "kind: tumbling, size: 1s", "");
    let text = std::fs::read_to_string(&file).unwrap().replace("key: auction, ", "");
    std::fs::write(&file, text).unwrap();
    for p in [1, 2, 3] {
        run(&file, tmp.path(), p);
        let got = common::sorted_lines(&tmp.path().join("out"));
        assert!(
            got == expected,
            "parallelism {p}: {} lines, {} expected",
            got.len(),
            expected.len()
        );
    }
}

#[test]
fn a_late_bid_within_the_lateness_updates_its_window_and_a_later_one_is_dropped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("in");
    std::fs::create_dir_all(&dir).unwrap();
    // One file, in time order (1 ms apart from 1 000 000); two bids far behind: one 4 s after
    // its window [1 010 000, 1 020 000) fired (within the 10 s lateness), one long after.
    let mut bids: Vec<Bid> =
        (0..60_000).map(|i| ((i % 3) as i64, 1 + (i % 7) as i64, 1_000_000 + i as i64)).collect();
    let within = (1, 1000, 1_015_000);
    let beyond = (2, 1000, 1_012_000);
    let mut text = String::new();
    for (i, b) in bids.iter().enumerate() {
        if i == 24_000 {
            text.push_str(&format!(
                "{{\"auction\": {}, \"price\": {}, \"ts\": {}, \"url\": \"late\"}}\n",
                within.0, within.1, within.2
            ));
        }
        if i == 50_000 {
            text.push_str(&format!(
                "{{\"auction\": {}, \"price\": {}, \"ts\": {}, \"url\": \"later\"}}\n",
                beyond.0, beyond.1, beyond.2
            ));
        }
        text.push_str(&format!(
            "{{\"auction\": {}, \"price\": {}, \"ts\": {}, \"url\": \"x\"}}\n",
            b.0, b.1, b.2
        ));
    }
    std::fs::write(dir.join("bids.json"), text).unwrap();
    let on_time = model_fixed(&bids, "tumbling", 10_000, 10_000);
    // The window of the bid within the lateness is emitted twice: without it, then with it.
    bids.push(within);
    let updated = model_fixed(&bids, "tumbling", 10_000, 10_000);
    let mut expected = on_time.clone();
    expected.extend(updated.into_iter().filter(|l| !on_time.contains(l)));
    expected.sort();
    assert_eq!(expected.len(), on_time.len() + 1);
    let file = job(tmp.path(), "kind: tumbling, size: 10s", ", allowedLateness: 10s");
    for p in [1, 2, 3] {
        let err = run(&file, tmp.path(), p);
        let got = common::sorted_lines(&tmp.path().join("out"));
        assert!(
            got == expected,
            "parallelism {p}: {} lines, {} expected: {err}",
            got.len(),
            expected.len()
        );
        // The bid beyond the lateness is dropped and counted.
        assert!(
            err.lines().any(|l| l.contains("hot 60002 in") && l.contains("(1 late)")),
            "parallelism {p}: {err}"
        );
    }
    // With a lateOutput, the bid beyond the lateness goes there (as it came in), and only it;
    // the windows are the same.
    let file = job(
        tmp.path(),
        "kind: tumbling, size: 10s",
        ", allowedLateness: 10s, lateOutput: late_bids",
    );
    let late_dir = tmp.path().join("late");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str(&format!(
        "      - {{uid: late, type: file_sink, inputs: [late_bids], path: '{}', format: json}}\n",
        late_dir.display()
    ));
    std::fs::write(&file, text).unwrap();
    let beyond_line = format!(
        "{{\"auction\":{},\"price\":{},\"ts\":{},\"url\":\"later\"}}",
        beyond.0, beyond.1, beyond.2
    );
    for p in [1, 3] {
        let _ = std::fs::remove_dir_all(&late_dir);
        let err = run(&file, tmp.path(), p);
        let got = common::sorted_lines(&tmp.path().join("out"));
        assert!(got == expected, "parallelism {p}, with lateOutput: {} lines: {err}", got.len());
        let late = common::sorted_lines(&late_dir);
        assert_eq!(late, std::slice::from_ref(&beyond_line), "parallelism {p}: {err}");
        assert!(
            err.lines().any(|l| l.contains("hot 60002 in") && l.contains("(1 late)")),
            "parallelism {p}: {err}"
        );
    }
}

/// A window's `lateOutput` is read by name like an operator; a name taken, one that nothing
/// reads, and one on another type are refused before anything starts.
#[test]
fn bad_late_outputs_are_refused_naming_the_operator() {
    let tmp = tempfile::tempdir().unwrap();
    write_bids(&tmp.path().join("in"), 1, 10, 10, 1);
    let cases = [
        (", lateOutput: bids", "", "lateOutput \"bids\" is already the name of an operator"),
        (", lateOutput: late_bids", "", "its lateOutput \"late_bids\" goes nowhere"),
        ("", "inputs: [late_bids]", "inputs names \"late_bids\", which is no operator"),
    ];
    for (lateness, reader, text) in cases {
        let file = job(tmp.path(), "kind: tumbling, size: 10s", lateness);
        if !reader.is_empty() {
            let mut t = std::fs::read_to_string(&file).unwrap();
            t.push_str(&format!("      - {{uid: late, type: blackhole, {reader}}}\n"));
            std::fs::write(&file, t).unwrap();
        }
        let err = process::refused(&file);
        assert!(err.contains(text), "{lateness} {reader}: {err}");
        assert!(!tmp.path().join("out").exists(), "{lateness} {reader}: output was written");
    }
    // On an operator other than a window.
    let file = job(tmp.path(), "kind: tumbling, size: 10s", "");
    let t = std::fs::read_to_string(&file)
        .unwrap()
        .replace("greaterThan: 0}", "greaterThan: 0, lateOutput: x}");
    std::fs::write(&file, t).unwrap();
    let err = process::refused(&file);
    assert!(
        err.contains("operator \"cheap\" (filter): lateOutput is a parameter of a window only"),
        "{err}"
    );
}

const TOKEN: &str = "weir-window-tests-api-token";

/// Windows open at each savepoint fire once, on the subtask that owns their key after the
/// rescale: stopped into a savepoint at parallelism 2, restored at 3, stopped again, restored
/// at 1, the output is the model's, each window once.
#[test]
fn windows_open_across_savepoints_and_a_rescale_2_3_1_fire_once() {
    let tmp = tempfile::tempdir().unwrap();
    let bids = write_bids(&tmp.path().join("in"), 4, 3000, 1500, 9);
    let expected = model_fixed(&bids, "sliding", 2000, 500);
    let file = job_with(
        tmp.path(),
        "kind: sliding, size: 2s, slide: 500ms",
        "",
        ", ratePerSecond: 2000",
        "",
    );
    let state = tmp.path().join("state");
    let mut from: Option<String> = None;
    for (k, p) in [2u32, 3, 1].into_iter().enumerate() {
        let ps = p.to_string();
        let mut args = vec!["run", file.to_str().unwrap(), "--api-addr", "127.0.0.1:0"];
        args.extend(["--state-dir", state.to_str().unwrap(), "--parallelism", &ps]);
        if let Some(f) = &from {
            args.extend(["--from-savepoint", f.as_str()]);
        }
        let mut job = process::start_with_env(&args, &[("WEIR_API_TOKEN", TOKEN)]);
        assert!(process::wait_running(&mut job, 0), "run {k} ended before it ran");
        if k == 2 {
            let (code, err) = job.finish(Duration::from_secs(120));
            assert_eq!(code, Some(0), "the last run: {err}");
            break;
        }
        std::thread::sleep(Duration::from_millis(1500));
        let out = std::process::Command::new(process::WEIR)
            .args(["savepoint", "--api", &job.addr("api"), "--stop"])
            .env("WEIR_API_TOKEN", TOKEN)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "weir savepoint --stop: {err}");
        let (code, job_err) = job.finish(Duration::from_secs(60));
        assert_eq!(code, Some(0), "the job after its stopping savepoint: {job_err}");
        // A part of the windows so far, each once.
        let sofar = common::sorted_lines(&tmp.path().join("out"));
        assert!(sofar.len() < expected.len(), "run {k} read everything");
        for l in &sofar {
            assert!(expected.binary_search(l).is_ok(), "run {k}: {l} is no window of the model");
        }
        from = Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let got = common::sorted_lines(&tmp.path().join("out"));
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "the windows differ from the model");
}

/// Worker processes killed at random moments: every window once.
#[test]
fn killed_worker_processes_lose_and_duplicate_no_window() {
    let tmp = tempfile::tempdir().unwrap();
    let bids = write_bids(&tmp.path().join("in"), 6, 2500, 1500, 10);
    let expected = model_sessions(&bids, 40);
    let file = job_with(
        tmp.path(),
        "kind: session, gap: 40ms",
        "",
        ", ratePerSecond: 3000",
        "\n  restartStrategy: {type: fixed-delay, delay: 200ms, attempts: 100}",
    );
    let state = tmp.path().join("state");
    let args = [
        "run",
        file.to_str().unwrap(),
        "--api-addr",
        "127.0.0.1:0",
        "--state-dir",
        state.to_str().unwrap(),
        "--parallelism",
        "3",
        "--processes",
    ];
    let mut job = process::start_with_env(&args, &[("WEIR_API_TOKEN", TOKEN)]);
    let mut rng = SplitMix64::new(0xbeef);
    let mut kills = 0;
    while kills < 4 {
        if !process::wait_running(&mut job, kills) {
            break;
        }
        std::thread::sleep(Duration::from_millis(300 + rng.next_u64() % 1200));
        let workers = common::children_of(job.child.id());
        if workers.is_empty() || job.child.try_wait().unwrap().is_some() {
            break;
        }
        let victim = workers[(rng.next_u64() % workers.len() as u64) as usize];
        let _ = std::process::Command::new("kill").args(["-KILL", &victim.to_string()]).status();
        kills += 1;
    }
    let (code, err) = job.finish(Duration::from_secs(300));
    assert_eq!(code, Some(0), "{err}");
    assert!(kills >= 3, "the job ended after {kills} kills; make the input longer: {err}");
    let got = common::sorted_lines(&tmp.path().join("out"));
    assert_eq!(got.len(), expected.len(), "{err}");
    assert!(got == expected, "the windows differ from the model");
}

#[test]
fn bad_windows_are_refused_before_anything_starts_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    write_bids(&tmp.path().join("in"), 1, 10, 0, 1);
    for (window, says) in [
        ("kind: tumbling", "size is missing: a tumbling window needs its length"),
        ("kind: sliding, size: 2s, slide: 5s", "slide 5s is larger than size 2s"),
        ("kind: tumbling, size: 1s, gap: 1s", "gap is not a parameter of a tumbling window"),
        ("kind: session", "gap is missing"),
        ("kind: hopping, size: 1s", "unknown variant `hopping`"),
        ("kind: tumbling, size: 1s, aggregate: {median: price}", "unknown field `median`"),
    ] {
        let window = if window.contains("aggregate") {
            window.replace(", aggregate: {median: price}", "")
        } else {
            window.to_string()
        };
        let mut file = job(tmp.path(), &window, "");
        if says.contains("median") {
            let text = std::fs::read_to_string(&file)
                .unwrap()
                .replace("count: '*', sum: price", "median: price, count: '*'");
            file = tmp.path().join("median.yaml");
            std::fs::write(&file, text).unwrap();
        }
        let proc = process::start(&["run", file.to_str().unwrap()]);
        let (code, err) = proc.finish(Duration::from_secs(60));
        assert_eq!(code, Some(2), "{window}: {err}");
        assert!(err.contains("operator \"hot\" (window)") && err.contains(says), "{window}: {err}");
        assert!(!tmp.path().join("out").exists(), "{window}: the job started");
    }
    // An event-time field that is not in the records.
    let text = std::fs::read_to_string(job(tmp.path(), "kind: tumbling, size: 1s", "")).unwrap();
    let file = tmp.path().join("time.yaml");
    std::fs::write(&file, text.replace("eventTime: {field: ts", "eventTime: {field: time"))
        .unwrap();
    let (code, err) =
        process::start(&["run", file.to_str().unwrap()]).finish(Duration::from_secs(60));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("eventTime.field \"time\" is not a field of its records"), "{err}");
}

/// A TCP server for one `socket` source: it sends `lines`, then keeps the connection open,
/// saying nothing, until told to close (or two minutes pass). Its port, the sender that
/// closes it, and its thread.
fn quiet_socket(
    lines: Vec<String>,
) -> (u16, std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (close_tx, close_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        for l in lines {
            writeln!(conn, "{l}").unwrap();
        }
        let _ = close_rx.recv_timeout(Duration::from_secs(120));
    });
    (port, close_tx, server)
}

/// A socket input that sends one bid and then nothing, unioned with the files into the
/// window: with `idleTimeout` it stops holding the watermark back once idle, and the files'
/// windows are emitted while it is still open; without, none is until it closes. Either way
/// the output, once it closes, is the model's, with its bid.
#[test]
fn an_idle_input_stops_holding_the_windows_back_after_its_idle_timeout() {
    for idle in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let mut bids = write_bids(&tmp.path().join("in"), 2, 2000, 1500, 12);
        let quiet: Bid = (1, 7, bids.iter().map(|b| b.2).min().unwrap() + 500);
        bids.push(quiet);
        let expected = model_fixed(&bids, "tumbling", 1000, 1000);
        let line = format!(
            "{{\"auction\": {}, \"price\": {}, \"ts\": {}, \"url\": \"q\"}}",
            quiet.0, quiet.1, quiet.2
        );
        let (port, close_tx, server) = quiet_socket(vec![line]);
        let idle_timeout = if idle { ", idleTimeout: 1s" } else { "" };
        let file = tmp.path().join("idle.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: idle}}
spec:
  parallelism: 2
  checkpointing: {{interval: 300ms, storage: '{chk}'}}
  pipeline:
    operators:
      - {{uid: bids, type: file_source, path: '{input}', format: json, fields: {{auction: int, price: int, ts: timestamp, url: string}}, eventTime: {{field: ts, maxOutOfOrderness: 2s}}}}
      - {{uid: quiet, type: socket, host: 127.0.0.1, port: {port}, format: json, fields: {{auction: int, price: int, ts: int, url: string}}, eventTime: {{field: ts, maxOutOfOrderness: 2s{idle_timeout}}}}}
      - {{uid: hot, type: window, inputs: [bids, quiet], key: auction, kind: tumbling, size: 1s, aggregate: {{count: '*', sum: price, max: price, avg: price}}}}
      - {{uid: out, type: file_sink, inputs: [hot], path: '{out}', format: json}}
",
                chk = tmp.path().join("chk").display(),
                input = tmp.path().join("in").display(),
                out = tmp.path().join("out").display(),
            ),
        )
        .unwrap();
        let out = tmp.path().join("out");
        let mut job = process::start(&["run", file.to_str().unwrap()]);
        let committed = || {
            std::fs::read_dir(&out).map_or(0, |d| {
                d.filter_map(Result::ok)
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default().lines().count())
                    .sum::<usize>()
            })
        };
        let t = std::time::Instant::now();
        let wait = if idle { Duration::from_secs(60) } else { Duration::from_secs(4) };
        while t.elapsed() < wait && committed() < expected.len() / 2 {
            assert!(job.child.try_wait().unwrap().is_none(), "the job ended with its socket open");
            std::thread::sleep(Duration::from_millis(100));
        }
        let before_close = committed();
        if idle {
            assert!(
                before_close >= expected.len() / 2,
                "idle: {before_close} windows before the socket closed"
            );
        } else {
            assert_eq!(
                before_close, 0,
                "without idleTimeout the quiet input holds every window back"
            );
        }
        close_tx.send(()).unwrap();
        server.join().unwrap();
        let (code, err) = job.finish(Duration::from_secs(120));
        assert_eq!(code, Some(0), "idle {idle}: {err}");
        let got = common::sorted_lines(&out);
        assert_eq!(got.len(), expected.len(), "idle {idle}: {err}");
        assert!(got == expected, "idle {idle}: the windows differ");
    }
}

/// The event time each operator has reached is in `/v1/job` and on `/metrics`: the least
/// over its subtasks, the highest time seen less the out-of-orderness (and 1 ms).
#[test]
fn the_watermark_of_each_operator_is_in_the_job_status_and_the_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let t0: i64 = 1_796_083_200_000;
    let lines = (0..1000)
        .map(|i| {
            format!("{{\"auction\": {}, \"price\": 1, \"ts\": {}, \"url\": \"u\"}}", i % 7, t0 + i)
        })
        .collect();
    let (port, close_tx, server) = quiet_socket(lines);
    let file = tmp.path().join("wm.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: wm}}
spec:
  parallelism: 2
  pipeline:
    operators:
      - {{uid: bids, type: socket, host: 127.0.0.1, port: {port}, format: json, fields: {{auction: int, price: int, ts: int, url: string}}, eventTime: {{field: ts, maxOutOfOrderness: 2s}}}}
      - {{uid: hot, type: window, inputs: [bids], key: auction, kind: tumbling, size: 1s, aggregate: {{count: '*'}}}}
      - {{uid: out, type: blackhole, inputs: [hot]}}
"
        ),
    )
    .unwrap();
    let mut job = process::start_with_env(
        &["run", file.to_str().unwrap(), "--api-addr", "127.0.0.1:0"],
        &[("WEIR_API_TOKEN", TOKEN)],
    );
    assert!(process::wait_running(&mut job, 0), "the job did not run");
    let want = t0 + 999 - 2000 - 1;
    let api = job.addr("api");
    let t = std::time::Instant::now();
    let mut last = String::new();
    let watermark_of = |body: &str, uid: &str| -> Option<i64> {
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        v["operators"].as_array()?.iter().find(|o| o["uid"] == uid)?["watermark"].as_i64()
    };
    while t.elapsed() < Duration::from_secs(30) {
        if let Some((200, body)) = process::request(&api, "GET", "/v1/job", Some(TOKEN)) {
            if watermark_of(&body, "hot") == Some(want) && watermark_of(&body, "out") == Some(want)
            {
                last.clear();
                break;
            }
            last = body;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(last.is_empty(), "the watermarks never reached {want}: {last}");
    let (code, metrics) = process::request(&api, "GET", "/metrics", Some(TOKEN)).unwrap();
    assert_eq!(code, 200);
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("weir_operator_watermark_milliseconds{") && l.contains("operator=\"hot\"")
        })
        .unwrap_or_else(|| panic!("no watermark of hot in:\n{metrics}"));
    assert!(line.ends_with(&format!(" {want}")), "{line}");
    close_tx.send(()).unwrap();
    server.join().unwrap();
    let (code, err) = job.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
}
