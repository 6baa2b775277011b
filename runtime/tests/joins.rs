//! Joins of two streams end to end: `weir run` over JSON persons and auctions that the test
//! writes (out of order within a known bound), through a `window_join` (Nexmark q8's shape:
//! persons who created auctions in the same window) and an `interval_join`, compared with
//! the pairs the test computes itself at parallelism 1, 2 and 3. Then with one input far
//! behind the other and worker processes killed, aligned and unaligned; and bad joins are
//! refused before anything starts, naming the field.

#[path = "common/mod.rs"]
mod common;
#[path = "process/mod.rs"]
mod process;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use weir_runtime::connectors::SplitMix64;

const START_MS: i64 = 1_796_083_200_000;

/// A person: id, signup time.
type Person = (i64, i64);
/// An auction: id, seller (a person's id), time.
type Auction = (i64, i64, i64);

/// Persons every 10 ms and auctions every 4 ms, each up to `disorder` ms early, over `files`
/// files per input; a seller is a person who signed up around the auction's time.
fn write_input(
    dir: &Path,
    n: usize,
    files: usize,
    disorder: i64,
    seed: u64,
) -> (Vec<Person>, Vec<Auction>) {
    let mut rng = SplitMix64::new(seed);
    let early = |rng: &mut SplitMix64| (rng.next_u64() % (disorder as u64 + 1)) as i64;
    let (pdir, adir) = (dir.join("persons"), dir.join("auctions"));
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::create_dir_all(&adir).unwrap();
    let mut persons = Vec::new();
    let mut texts = vec![String::new(); files];
    for i in 0..n as i64 {
        let ts = START_MS + i * 10 - early(&mut rng);
        texts[(i as usize) % files]
            .push_str(&format!("{{\"id\": {i}, \"name\": \"p{i}\", \"ts\": {ts}}}\n"));
        persons.push((i, ts));
    }
    for (f, t) in texts.iter().enumerate() {
        std::fs::write(pdir.join(format!("persons-{f}.json")), t).unwrap();
    }
    let mut auctions = Vec::new();
    let mut texts = vec![String::new(); files];
    for j in 0..(n as i64 * 5 / 2) {
        let ts = START_MS + j * 4 - early(&mut rng);
        // A person who signed up up to 3 s before or 0.5 s after.
        let near = (j * 4) / 10 - 300 + (rng.next_u64() % 350) as i64;
        let seller = near.clamp(0, n as i64 - 1);
        texts[(j as usize) % files].push_str(&format!(
            "{{\"id\": {}, \"seller\": {seller}, \"ts\": {ts}}}\n",
            100_000 + j
        ));
        auctions.push((100_000 + j, seller, ts));
    }
    for (f, t) in texts.iter().enumerate() {
        std::fs::write(adir.join(format!("auctions-{f}.json")), t).unwrap();
    }
    (persons, auctions)
}

fn window_line(s: i64, e: i64, p: &Person, a: &Auction) -> String {
    format!(
        "{{\"window_start\":{s},\"window_end\":{e},\"persons.id\":{},\"name\":\"p{}\",\"persons.ts\":{},\"auctions.id\":{},\"seller\":{},\"auctions.ts\":{}}}",
        p.0, p.0, p.1, a.0, a.1, a.2
    )
}

/// The window join as the model computes it: per window and person, the person with each of
/// their auctions in that window.
fn model_window_join(
    persons: &[Person],
    auctions: &[Auction],
    size: i64,
    slide: i64,
) -> Vec<String> {
    let starts = |ts: i64| {
        let mut s = ts - ts.rem_euclid(slide);
        let mut out = Vec::new();
        while s > ts - size {
            out.push(s);
            s -= slide;
        }
        out
    };
    let mut by: BTreeMap<(i64, i64), (Vec<Person>, Vec<Auction>)> = BTreeMap::new();
    for p in persons {
        for s in starts(p.1) {
            by.entry((s, p.0)).or_default().0.push(*p);
        }
    }
    for a in auctions {
        for s in starts(a.2) {
            by.entry((s, a.1)).or_default().1.push(*a);
        }
    }
    let mut lines = Vec::new();
    for ((s, _), (ps, as_)) in by {
        for p in &ps {
            for a in &as_ {
                lines.push(window_line(s, s + size, p, a));
            }
        }
    }
    lines.sort();
    lines
}

/// The interval join as the model computes it: each auction with its seller if the seller
/// signed up within `[auction time + lower, auction time + upper]`.
fn model_interval_join(
    persons: &[Person],
    auctions: &[Auction],
    lower: i64,
    upper: i64,
) -> Vec<String> {
    let ts_of: BTreeMap<i64, i64> = persons.iter().copied().collect();
    let mut lines: Vec<String> = auctions
        .iter()
        .filter_map(|a| {
            let pts = *ts_of.get(&a.1)?;
            (a.2 + lower <= pts && pts <= a.2 + upper).then(|| {
                format!(
                    "{{\"auctions.id\":{},\"seller\":{},\"auctions.ts\":{},\"persons.id\":{},\"name\":\"p{}\",\"persons.ts\":{pts}}}",
                    a.0, a.1, a.2, a.1, a.1
                )
            })
        })
        .collect();
    lines.sort();
    lines
}

/// The job: persons and auctions from JSON files with event time, `join` (its line after
/// `type:`), into a JSON file sink; `source` goes into the persons source, `spec` into the
/// spec.
fn job(dir: &Path, join: &str, persons_extra: &str, spec: &str) -> PathBuf {
    let file = dir.join("join.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: joins}}
spec:
  parallelism: 1{spec}
  pipeline:
    operators:
      - {{uid: persons, type: file_source, path: '{p}', format: json, fields: {{id: int, name: string, ts: int}},
          eventTime: {{field: ts, maxOutOfOrderness: 1s}}{persons_extra}}}
      - {{uid: auctions, type: file_source, path: '{a}', format: json, fields: {{id: int, seller: int, ts: int}},
          eventTime: {{field: ts, maxOutOfOrderness: 1s}}}}
      - {{uid: j, type: {join}}}
      - {{uid: out, type: file_sink, inputs: [j], path: '{out}', format: json}}
",
            p = dir.join("in/persons").display(),
            a = dir.join("in/auctions").display(),
            out = dir.join("out").display(),
        ),
    )
    .unwrap();
    file
}

const WINDOW_JOIN: &str = "window_join, inputs: [persons, auctions], keys: [id, seller]";
const INTERVAL_JOIN: &str = "interval_join, inputs: [auctions, persons], keys: [seller, id], lowerBound: -2s, upperBound: 500ms";

fn run(file: &Path, dir: &Path, p: u32) -> String {
    let _ = std::fs::remove_dir_all(dir.join("out"));
    process::run_to_end(file, &dir.join(format!("state-{p}")), p, Duration::from_secs(180))
}

#[test]
fn window_joins_pair_each_window_exactly_at_1_2_and_3() {
    let tmp = tempfile::tempdir().unwrap();
    let (persons, auctions) = write_input(&tmp.path().join("in"), 3000, 3, 800, 81);
    for (window, size, slide) in [
        ("kind: tumbling, size: 2s", 2000, 2000),
        ("kind: sliding, size: 3s, slide: 1s", 3000, 1000),
    ] {
        let expected = model_window_join(&persons, &auctions, size, slide);
        assert!(expected.len() > 1000, "{window}: {} pairs", expected.len());
        let file = job(tmp.path(), &format!("{WINDOW_JOIN}, {window}"), "", "");
        for p in [1, 2, 3] {
            let err = run(&file, tmp.path(), p);
            let got = common::sorted_lines(&tmp.path().join("out"));
            assert_eq!(got.len(), expected.len(), "{window} at parallelism {p}: {err}");
            assert!(got == expected, "{window} at parallelism {p}: the pairs differ");
        }
    }
}

#[test]
fn interval_joins_pair_within_the_bounds_exactly_at_1_2_and_3() {
    let tmp = tempfile::tempdir().unwrap();
    let (persons, auctions) = write_input(&tmp.path().join("in"), 3000, 3, 800, 82);
    let expected = model_interval_join(&persons, &auctions, -2000, 500);
    assert!(expected.len() > 1000 && expected.len() < auctions.len(), "{} pairs", expected.len());
    let file = job(tmp.path(), INTERVAL_JOIN, "", "");
    for p in [1, 2, 3] {
        let err = run(&file, tmp.path(), p);
        let got = common::sorted_lines(&tmp.path().join("out"));
        assert_eq!(got.len(), expected.len(), "parallelism {p}: {err}");
        assert!(got == expected, "parallelism {p}: the pairs differ");
    }
}

const TOKEN: &str = "weir-join-tests-api-token";

/// Persons at 800 a second, auctions as fast as they come: the join holds the auctions
/// until the persons' event time catches up. Worker processes killed at random moments, the
/// output is every pair once; aligned, then unaligned with a timeout (a throttled sink
/// backs the join up, so barriers overtake records at its two inputs).
#[test]
fn joins_with_one_input_far_behind_and_killed_workers_pair_exactly_once() {
    for (name, join, checkpointing, sink_rate) in [
        ("aligned", INTERVAL_JOIN, "{interval: 500ms}", None),
        (
            "unaligned",
            WINDOW_JOIN,
            "{interval: 500ms, timeout: 3s, tolerableFailures: 1000, unaligned: true, alignmentTimeout: 50ms}",
            Some(1500),
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (persons, auctions) = write_input(&tmp.path().join("in"), 6000, 2, 800, 83);
        let (join, expected) = if join == WINDOW_JOIN {
            let j = format!("{WINDOW_JOIN}, kind: sliding, size: 3s, slide: 1s");
            (j, model_window_join(&persons, &auctions, 3000, 1000))
        } else {
            (join.to_string(), model_interval_join(&persons, &auctions, -2000, 500))
        };
        let spec = format!(
            "\n  checkpointing: {}\n  restartStrategy: {{type: fixed-delay, delay: 200ms, attempts: 100}}",
            checkpointing
                .replace('{', &format!("{{storage: '{}', ", tmp.path().join("chk").display()))
        );
        let file = job(tmp.path(), &join, ", ratePerSecond: 800", &spec);
        if let Some(rate) = sink_rate {
            let t = std::fs::read_to_string(&file).unwrap().replace(
                "- {uid: out, type: file_sink, inputs: [j],",
                &format!(
                    "- {{uid: slow, type: throttle, inputs: [j], ratePerSecond: {rate}}}\n      - {{uid: out, type: file_sink, inputs: [slow],"
                ),
            );
            std::fs::write(&file, t).unwrap();
        }
        let state = tmp.path().join("state");
        let args = [
            "run",
            file.to_str().unwrap(),
            "--api-addr",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().unwrap(),
            "--parallelism",
            "2",
            "--processes",
        ];
        let mut job = process::start_with_env(&args, &[("WEIR_API_TOKEN", TOKEN)]);
        let mut rng = SplitMix64::new(0x701);
        let (mut kills, mut unaligned_seen) = (0, false);
        while kills < 3 {
            if !process::wait_running(&mut job, kills) {
                break;
            }
            let until =
                std::time::Instant::now() + Duration::from_millis(600 + rng.next_u64() % 900);
            while std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(100));
                if let Some((200, body)) =
                    process::request(&job.addr("api"), "GET", "/v1/checkpoints", None)
                {
                    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
                    unaligned_seen |= c["history"].as_array().is_some_and(|h| {
                        h.iter().any(|x| {
                            x["status"] == "completed"
                                && x["unaligned"] == true
                                && x["inFlightBytes"].as_u64().is_some_and(|b| b > 0)
                        })
                    });
                }
            }
            let workers = common::children_of(job.child.id());
            if workers.is_empty() || job.child.try_wait().unwrap().is_some() {
                break;
            }
            let victim = workers[(rng.next_u64() % workers.len() as u64) as usize];
            let _ =
                std::process::Command::new("kill").args(["-KILL", &victim.to_string()]).status();
            kills += 1;
        }
        let (code, err) = job.finish(Duration::from_secs(300));
        assert_eq!(code, Some(0), "{name}: {err}");
        assert!(kills >= 2, "{name}: the job ended after {kills} kills: {err}");
        if sink_rate.is_some() {
            assert!(
                unaligned_seen,
                "{name}: no completed checkpoint was unaligned with records in flight"
            );
        }
        let got = common::sorted_lines(&tmp.path().join("out"));
        assert_eq!(got.len(), expected.len(), "{name}: {err}");
        assert!(got == expected, "{name}: the pairs differ");
    }
}

/// Bad joins are refused before anything starts, naming the operator and the field.
#[test]
fn bad_joins_are_refused_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    write_input(&tmp.path().join("in"), 10, 1, 0, 1);
    let w = "window_join, inputs: [persons, auctions]";
    let cases = [
        (format!("{w}, keys: [id], kind: tumbling, size: 1s"), "keys names 1 field(s) for its 2 inputs"),
        (format!("{w}, keys: [id, seller], kind: tumbling"), "size is missing"),
        (format!("{w}, keys: [id, seller], kind: sliding, size: 1s, slide: 2s"), "slide 2s is larger than size 1s"),
        (format!("{w}, keys: [id, seller], kind: session, size: 1s"), "kind session is not a kind of window_join"),
        (format!("{w}, keys: [id, sellr], kind: tumbling, size: 1s"), "keys[1] \"sellr\" is not a field of its input"),
        (format!("{w}, keys: [name, seller], kind: tumbling, size: 1s"), "the keys must hold the same kind of values"),
        (format!("{w}, keys: [id, seller], kind: tumbling, size: 1s, timeFields: [ts, tss]"), "timeFields[1] \"tss\" is not a field"),
        (
            "window_join, inputs: [persons], keys: [id], kind: tumbling, size: 1s".to_string(),
            "a join reads two inputs, and inputs names 1",
        ),
        (
            "interval_join, inputs: [auctions, persons], keys: [seller, id], lowerBound: 1s, upperBound: -1s".to_string(),
            "lowerBound 1s is above upperBound -1s",
        ),
        (
            "interval_join, inputs: [auctions, persons], keys: [seller, id], lowerBound: 1x, upperBound: 1s".to_string(),
            "invalid duration \"1x\"",
        ),
    ];
    for (join, text) in cases {
        let file = job(tmp.path(), &join, "", "");
        let err = process::refused(&file);
        assert!(err.contains("operator \"j\"") && err.contains(text), "{join}: {err}");
        assert!(!tmp.path().join("out").exists(), "{join}: output was written");
    }
}
