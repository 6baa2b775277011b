//! Nexmark-shaped jobs end to end: `weir run` over JSON bids that the test writes (event
//! time as RFC 3339 text, out of order within a known bound), compared with what the test
//! computes itself.
//!
//! q5 (hot items): bids counted per auction in 10 s windows sliding by 2 s, then the auction
//! with the most bids in each window (`window_top_n`, ties to the lowest auction id).

#[path = "common/mod.rs"]
mod common;
#[path = "process/mod.rs"]
mod process;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use weir_runtime::connectors::SplitMix64;

/// Event time of the first bid: 2026-12-01T00:00:00Z.
const START_MS: i64 = 1_796_083_200_000;

/// A bid: auction, bidder, price, event time (ms).
type Bid = (i64, i64, i64, i64);

fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// `files` files of `n` bids each, 2 ms apart, each up to `disorder` ms early; auctions
/// skewed so that windows have a clear top and some ties.
fn write_bids(dir: &Path, files: usize, n: usize, disorder: i64, seed: u64) -> Vec<Bid> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = SplitMix64::new(seed);
    let mut all = Vec::new();
    for f in 0..files {
        let mut text = String::new();
        for i in 0..n {
            let ts = START_MS + (i as i64) * 2 - (rng.next_u64() % (disorder as u64 + 1)) as i64;
            // Hot auctions come and go: a window's top changes over time.
            let hot = 1000 + (ts - START_MS) / 4000;
            let auction = if rng.next_u64().is_multiple_of(3) {
                hot
            } else {
                1000 + (rng.next_u64() % 40) as i64
            };
            let bidder = (rng.next_u64() % 500) as i64;
            let price = 1 + (rng.next_u64() % 10_000) as i64;
            text.push_str(&format!(
                "{{\"auction\": {auction}, \"bidder\": {bidder}, \"price\": {price}, \"channel\": \"web\", \"url\": \"https://nexmark/{f}/{i}\", \"dateTime\": \"{}\", \"extra\": \"\"}}\n",
                rfc3339(ts)
            ));
            all.push((auction, bidder, price, ts));
        }
        std::fs::write(dir.join(format!("bids-{f}.json")), text).unwrap();
    }
    all
}

/// q5 as the model computes it: per window [s, s + 10 s) with s a multiple of 2 s, the
/// auction with the most bids (the lowest id of those tied), as `window_top_n` writes it.
fn model_q5(bids: &[Bid]) -> Vec<String> {
    let (size, slide) = (10_000i64, 2_000i64);
    let mut counts: BTreeMap<(i64, i64), i64> = BTreeMap::new(); // (window_start, auction)
    for &(auction, _, _, ts) in bids {
        let last = ts - ts.rem_euclid(slide);
        let mut s = last;
        while s > ts - size {
            *counts.entry((s, auction)).or_default() += 1;
            s -= slide;
        }
    }
    let mut top: BTreeMap<i64, (i64, i64)> = BTreeMap::new(); // start -> (count, auction)
    for (&(s, auction), &c) in &counts {
        let e = top.entry(s).or_insert((c, auction));
        if c > e.0 || (c == e.0 && auction < e.1) {
            *e = (c, auction);
        }
    }
    let mut lines: Vec<String> = top
        .into_iter()
        .map(|(s, (c, a))| {
            format!(
                "{{\"auction\":{a},\"window_start\":{s},\"window_end\":{},\"count\":{c},\"rank\":1}}",
                s + size
            )
        })
        .collect();
    lines.sort();
    lines
}

fn q5_job(dir: &Path, n: u32) -> std::path::PathBuf {
    let file = dir.join("q5.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: nexmark-q5}}
spec:
  parallelism: 1
  pipeline:
    operators:
      - {{uid: bids, type: file_source, path: '{input}', format: json,
          fields: {{auction: int, bidder: int, price: int, url: string, dateTime: timestamp}},
          eventTime: {{field: dateTime, maxOutOfOrderness: 2s, idleTimeout: 30s}}}}
      - {{uid: hot, type: window, inputs: [bids], key: auction, kind: sliding, size: 10s, slide: 2s,
          aggregate: {{count: '*'}}}}
      - {{uid: top, type: window_top_n, inputs: [hot], orderBy: count, n: {n}}}
      - {{uid: out, type: file_sink, inputs: [top], path: '{out}', format: json}}
",
            input = dir.join("in").display(),
            out = dir.join("out").display(),
        ),
    )
    .unwrap();
    file
}

#[test]
fn q5_hot_items_over_sliding_windows_is_exact_at_1_2_and_3() {
    let tmp = tempfile::tempdir().unwrap();
    // Up to 1.5 s early, within the 2 s out-of-orderness: no bid is late.
    let bids = write_bids(&tmp.path().join("in"), 3, 20_000, 1500, 55);
    let expected = model_q5(&bids);
    assert!(expected.len() > 15, "{} windows", expected.len());
    let file = q5_job(tmp.path(), 1);
    for p in [1u32, 2, 3] {
        let _ = std::fs::remove_dir_all(tmp.path().join("out"));
        let state = tmp.path().join(format!("state-{p}"));
        let err = process::run_to_end(&file, &state, p, Duration::from_secs(180));
        let got = common::sorted_lines(&tmp.path().join("out"));
        assert_eq!(got.len(), expected.len(), "parallelism {p}: {err}");
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g, e, "parallelism {p}: {err}");
        }
        assert!(!err.contains(" late)"), "parallelism {p}: no bid is late here: {err}");
    }
}

/// `n: 3` gives each window's three busiest auctions, ranked 1 to 3.
#[test]
fn the_top_three_of_each_window_are_ranked() {
    let tmp = tempfile::tempdir().unwrap();
    let bids = write_bids(&tmp.path().join("in"), 2, 6000, 1000, 56);
    let file = q5_job(tmp.path(), 3);
    let proc = process::start(&["run", file.to_str().unwrap(), "--parallelism", "2"]);
    let (code, err) = proc.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    // The model: per window, counts by auction, ranked by count then auction.
    let mut counts: BTreeMap<i64, BTreeMap<i64, i64>> = BTreeMap::new();
    for &(auction, _, _, ts) in &bids {
        let mut s = ts - ts.rem_euclid(2000);
        while s > ts - 10_000 {
            *counts.entry(s).or_default().entry(auction).or_default() += 1;
            s -= 2000;
        }
    }
    let mut expected = Vec::new();
    for (s, by) in counts {
        let mut ranked: Vec<(i64, i64)> = by.into_iter().map(|(a, c)| (-c, a)).collect();
        ranked.sort();
        for (r, (c, a)) in ranked.into_iter().take(3).enumerate() {
            expected.push(format!(
                "{{\"auction\":{a},\"window_start\":{s},\"window_end\":{},\"count\":{},\"rank\":{}}}",
                s + 10_000,
                -c,
                r + 1
            ));
        }
    }
    expected.sort();
    let got = common::sorted_lines(&tmp.path().join("out"));
    assert!(got == expected, "{} lines, {} expected", got.len(), expected.len());
}

/// A `window_top_n` that does not read a window, and one whose orderBy is text, are refused
/// before anything starts, naming the operator and the field.
#[test]
fn a_top_n_of_no_window_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    write_bids(&tmp.path().join("in"), 1, 10, 10, 1);
    let base = std::fs::read_to_string(q5_job(tmp.path(), 1)).unwrap();
    for (from, to, text) in [
        (
            "inputs: [hot], orderBy",
            "inputs: [bids], orderBy",
            "its input \"bids\" is a file_source, not a window",
        ),
        ("orderBy: count", "orderBy: auctionn", "orderBy \"auctionn\" is not a field of its input"),
        ("n: 1}", "n: 0}", "n must be 1 or more"),
        ("n: 1}", "n: 1, order: up}", "order \"up\" is not one of desc, asc"),
    ] {
        let file = tmp.path().join("bad.yaml");
        std::fs::write(&file, base.replace(from, to)).unwrap();
        let err = process::refused(&file);
        assert!(
            err.contains("operator \"top\" (window_top_n)") && err.contains(text),
            "{to}: {err}"
        );
        assert!(!tmp.path().join("out").exists(), "{to}: output was written");
    }
}
