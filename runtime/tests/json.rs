//! JSON records end to end: `weir run` reads JSON lines written by the test (nested fields,
//! booleans, timestamps in both forms, and bad lines among them), filters on a boolean,
//! counts by an integer key into a `file_sink` with `format: json` and prints the records it
//! kept on `stdout` with `format: json`. With `onError: skip` the output is exactly what the
//! test computes on its own and the skipped lines are counted and logged; with `onError:
//! fail` the run fails naming the line.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// One good record of the input, as the test expects it out of the source.
struct Bid {
    auction: i64,
    price: f64,
    ts: i64,
    ok: bool,
    who: String,
}

impl Bid {
    /// The line `stdout` prints for it with `format: json` (the fields in their sorted order,
    /// the dotted names as flat keys, the price a float).
    fn printed(&self) -> String {
        format!(
            "{{\"auction\":{},\"bid.ok\":{},\"bid.who\":{},\"price\":{},\"ts\":{}}}",
            self.auction,
            self.ok,
            serde_json::to_string(&self.who).unwrap(),
            serde_json::to_string(&self.price).unwrap(),
            self.ts
        )
    }
}

/// Writes two files of JSON lines with three bad lines among them; returns the good records.
/// The bad ones: line 7 of `input-00.json` (a price that is text), line 11 of `input-01.json`
/// (JSON cut short) and its line 20 (bytes that are not UTF-8).
fn write_input(dir: &Path) -> Vec<Bid> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = weir_runtime::connectors::SplitMix64::new(22);
    let mut good = Vec::new();
    for f in 0..2 {
        let mut text: Vec<u8> = Vec::new();
        for line in 1..=600u64 {
            match (f, line) {
                (0, 7) => text.extend_from_slice(
                    br#"{"auction": 3, "price": "cheap", "ts": 1, "bid": {"ok": true, "who": "x"}}"#,
                ),
                (1, 11) => text.extend_from_slice(br#"{"auction": 4, "price": 1.5, "ts": 5, "bid": {"ok": tru"#),
                (1, 20) => text.extend_from_slice(b"{\"auction\": \"\xff\xfe\"}"),
                _ => {
                    let i = f * 600 + line;
                    let b = Bid {
                        auction: (rng.next_u64() % 40) as i64 - 5,
                        // Quarters are exact in binary; some are whole.
                        price: (rng.next_u64() % 400) as f64 / 4.0,
                        // Seconds of 2023-11-14 from 22:13:20 on, with milliseconds.
                        ts: (1_699_920_000 + 80_000 + i as i64) * 1000 + (i as i64 * 7) % 1000,
                        ok: !rng.next_u64().is_multiple_of(3),
                        who: if line % 50 == 0 { "é\"q\\".into() } else { format!("u{}", line % 9) },
                    };
                    let secs = 80_000 + i;
                    let ms = b.ts % 1000;
                    let ts = match line % 3 {
                        0 => b.ts.to_string(),
                        1 => format!(
                            "\"2023-11-14T{:02}:{:02}:{:02}.{ms:03}Z\"",
                            secs / 3600,
                            secs % 3600 / 60,
                            secs % 60
                        ),
                        _ => format!(
                            "\"2023-11-14T{:02}:{:02}:{:02}.{ms:03}+01:00\"",
                            secs / 3600 + 1,
                            secs % 3600 / 60,
                            secs % 60
                        ),
                    };
                    // Keys in another order than the fields', nesting, and fields not read.
                    let l = format!(
                        "{{\"bid\": {{\"who\": {}, \"extra\": [1, {{\"a\": null}}], \"ok\": {}}}, \"ts\": {ts}, \"price\": {}, \"auction\": {}, \"note\": \"x\"}}",
                        serde_json::to_string(&b.who).unwrap(),
                        b.ok,
                        b.price,
                        b.auction
                    );
                    text.extend_from_slice(l.as_bytes());
                    good.push(b);
                }
            }
            text.extend_from_slice(if line % 4 == 0 { b"\r\n" } else { b"\n" });
        }
        std::fs::write(dir.join(format!("input-{f:02}.json")), text).unwrap();
    }
    good
}

fn manifest(input: &Path, output: &Path, on_error: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {{name: bids}}\nspec:\n  parallelism: 1\n  maxParallelism: 64\n  checkpointing: {{interval: 1s, storage: {}}}\n  pipeline:\n    operators:\n      - {{uid: bids, type: file_source, path: {}, format: json, fields: {{auction: int, price: float, ts: timestamp, \"bid.ok\": bool, \"bid.who\": string}}, onError: {on_error}}}\n      - {{uid: valid, type: filter, inputs: [bids], field: bid.ok, equals: true}}\n      - {{uid: counts, type: count, inputs: [valid], key: auction}}\n      - {{uid: out, type: file_sink, inputs: [counts], path: {}, format: json}}\n      - {{uid: seen, type: stdout, inputs: [valid], format: json}}\n",
        output.with_extension("checkpoints").display(),
        input.display(),
        output.display()
    )
}

/// The committed `{"auction":..,"count":..}` lines: for every auction, each count from 1 to
/// its total exactly once.
fn check_counts(out: &Path, expected: &BTreeMap<i64, u64>) {
    let mut seen: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
    let mut files = 0;
    for e in std::fs::read_dir(out).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "an uncommitted file was left behind: {name}");
        files += 1;
        for line in std::fs::read_to_string(e.path()).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("the sink wrote {line:?}, not JSON: {e}"));
            let o = v.as_object().unwrap();
            assert_eq!(o.keys().collect::<Vec<_>>(), ["auction", "count"], "{line}");
            let auction = o["auction"].as_i64().unwrap_or_else(|| panic!("{line}: an integer key"));
            seen.entry(auction).or_default().push(o["count"].as_u64().unwrap());
        }
    }
    assert!(files > 0, "no committed output");
    assert_eq!(seen.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    for (auction, mut counts) in seen {
        counts.sort_unstable();
        assert_eq!(counts, (1..=expected[&auction]).collect::<Vec<_>>(), "auction {auction}");
    }
}

#[test]
fn json_records_are_read_filtered_counted_and_written_as_json_skipping_bad_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let good = write_input(&input);
    let kept: Vec<&Bid> = good.iter().filter(|b| b.ok).collect();
    let mut expected: BTreeMap<i64, u64> = BTreeMap::new();
    for b in &kept {
        *expected.entry(b.auction).or_default() += 1;
    }
    let mut printed: Vec<String> = kept.iter().map(|b| b.printed()).collect();
    printed.sort();
    assert!(expected.len() > 30 && kept.len() > 600 && kept.len() < good.len());
    for (p, processes) in [(1, false), (2, false), (3, true)] {
        let out = tmp.path().join(format!("out-{p}"));
        let file = tmp.path().join(format!("bids-{p}.yaml"));
        std::fs::write(&file, manifest(&input, &out, "skip")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
        cmd.arg("run").arg(&file).args(["--parallelism", &p.to_string(), "--state-dir"]);
        cmd.arg(tmp.path().join("state"));
        if processes {
            cmd.arg("--processes");
        }
        let res = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(res.status.success(), "p={p}: {stderr}");
        check_counts(&out, &expected);
        // The three bad lines are dropped and counted.
        let summary = format!("bids 0 in / {} out (3 dropped: not usable)", good.len());
        assert!(stderr.contains(&summary), "p={p}: {summary} is not in {stderr}");
        assert!(stderr.contains(&format!("valid {} in / {} out", good.len(), kept.len())));
        if processes {
            continue;
        }
        // Each is logged with where it is and what is wrong with it.
        let at = |f: &str, line: u32| format!("{} line {line}", input.join(f).display());
        for want in [
            format!(
                "skipped {}: field \"price\": expected float, got the string \"cheap\": ",
                at("input-00.json", 7)
            ),
            format!("skipped {}: not JSON: ", at("input-01.json", 11)),
            format!("skipped {}: the line is not UTF-8 (at byte 13): ", at("input-01.json", 20)),
        ] {
            assert!(stderr.contains(&want), "p={p}: {want:?} is not in {stderr}");
        }
        assert!(stderr.contains("weir: operator \"bids\" (file_source) subtask "), "{stderr}");
        // stdout printed every record kept, as JSON, exactly.
        let mut lines: Vec<String> =
            String::from_utf8(res.stdout).unwrap().lines().map(str::to_string).collect();
        lines.sort();
        assert_eq!(lines.len(), printed.len(), "p={p}");
        assert_eq!(lines, printed, "p={p}");
    }
}

#[test]
fn a_bad_json_line_fails_the_run_naming_the_line_with_on_error_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write_input(&input);
    let out = tmp.path().join("out");
    let file = tmp.path().join("bids.yaml");
    std::fs::write(&file, manifest(&input, &out, "fail")).unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("run")
        .arg(&file)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{stderr}");
    let want = format!(
        "operator \"bids\" (file_source): {} line 7: field \"price\": expected float, got the string \"cheap\": fix the line, or set onError: skip",
        input.join("input-00.json").display()
    );
    assert!(stderr.contains(&want), "{want:?} is not in {stderr}");
    assert!(stderr.contains("the job failed (User error)"), "{stderr}");
    // Nothing was committed.
    let committed = std::fs::read_dir(&out)
        .map(|d| d.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')).count())
        .unwrap_or(0);
    assert_eq!(committed, 0);
}
