//! What the word-count tests share: input text with counts computed independently of Weir,
//! the check of committed `word,count` output, and the files and processes those tests handle.

#![allow(dead_code)] // each test crate uses some of these

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `files` texts of `lines` lines of words from a skewed vocabulary (some words frequent, most
/// rare), separated by single spaces or runs of whitespace, and the true count of each word.
/// File `crlf` ends its lines with CRLF, and file `no_final_newline` lacks the last newline.
pub fn word_texts(
    files: usize,
    lines: usize,
    seed: u64,
    crlf: Option<usize>,
    no_final_newline: Option<usize>,
) -> (Vec<String>, BTreeMap<String, u64>) {
    let mut rng = weir_runtime::connectors::SplitMix64::new(seed);
    let mut counts = BTreeMap::new();
    let mut texts = Vec::new();
    for f in 0..files {
        let mut text = String::new();
        for _ in 0..lines {
            let n = 1 + rng.next_u64() % 12;
            let words: Vec<String> = (0..n)
                .map(|_| {
                    let k = if rng.next_u64().is_multiple_of(4) {
                        rng.next_u64() % 5
                    } else {
                        rng.next_u64() % 3000
                    };
                    format!("word{k}")
                })
                .collect();
            for w in &words {
                *counts.entry(w.clone()).or_insert(0) += 1;
            }
            text.push_str(&words.join(if rng.next_u64().is_multiple_of(2) { " " } else { "  \t" }));
            text.push_str(if crlf == Some(f) { "\r\n" } else { "\n" });
        }
        if no_final_newline == Some(f) {
            text.pop();
        }
        texts.push(text);
    }
    (texts, counts)
}

/// The texts of the files in a local output directory; fails on an in-progress (dot-named)
/// file left behind.
pub fn committed_texts(dir: &std::path::Path) -> Vec<String> {
    let mut texts = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "an uncommitted file was left behind: {name}");
        texts.push(std::fs::read_to_string(e.path()).unwrap());
    }
    texts
}

/// Sorted lines of every committed file in `dir`.
pub fn sorted_lines(dir: &Path) -> Vec<String> {
    let mut lines: Vec<String> =
        committed_texts(dir).iter().flat_map(|t| t.lines().map(str::to_string)).collect();
    lines.sort();
    lines
}

/// Checks committed output (the texts of the committed files) against the true counts: for
/// every word, each count from 1 to its final value exactly once.
pub fn check_counts<'a>(
    files: impl IntoIterator<Item = &'a str>,
    expected: &BTreeMap<String, u64>,
) {
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut n = 0;
    for text in files {
        n += 1;
        for line in text.lines() {
            let (w, c) = line.rsplit_once(',').unwrap_or_else(|| panic!("bad line {line:?}"));
            seen.entry(w.to_string()).or_default().push(c.parse().unwrap());
        }
    }
    assert!(n > 0, "no committed output");
    assert_eq!(
        seen.keys().collect::<BTreeSet<_>>(),
        expected.keys().collect::<BTreeSet<_>>(),
        "the words differ"
    );
    for (w, mut counts) in seen {
        counts.sort_unstable();
        let want: Vec<u64> = (1..=expected[&w]).collect();
        assert_eq!(counts, want, "counts of {w:?}");
    }
}

/// Writes the input files; returns the true count of every word.
pub fn write_input(dir: &Path, files: usize, lines: usize, seed: u64) -> BTreeMap<String, u64> {
    std::fs::create_dir_all(dir).unwrap();
    let (texts, counts) = word_texts(files, lines, seed, None, None);
    for (f, text) in texts.iter().enumerate() {
        std::fs::write(dir.join(format!("input-{f:02}.txt")), text).unwrap();
    }
    counts
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

/// The pids of the processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // pid (comm) state ppid ...: the command may hold spaces, so split after ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let ppid = rest.split_whitespace().nth(1).and_then(|x| x.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}
