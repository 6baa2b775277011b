//! Checkpoint metadata read back from storage is untrusted: truncated, changed, forged or
//! naming files outside the state directory, it is refused with a message naming it, nothing
//! is written outside the state directory, and nothing starts from the beginning unasked.

mod common;
#[allow(dead_code)]
mod process;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use process::{SECRET, WEIR};
use weir_runtime::checkpoint::{Metadata, seal};

/// A word count read at 4000 lines a second, checkpointed every 300 ms into `dir`.
fn manifest(dir: &Path) -> PathBuf {
    let file = dir.join("job.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {{name: wc-tamper}}\nspec:\n  parallelism: 2\n  checkpointing: {{interval: 300ms, storage: {}, retained: 3}}\n  pipeline:\n    operators:\n      - {{uid: lines, type: file_source, path: {}, ratePerSecond: 4000}}\n      - {{uid: words, type: split, inputs: [lines]}}\n      - {{uid: counts, type: count, inputs: [words], key: word}}\n      - {{uid: out, type: file_sink, inputs: [counts], path: {}}}\n",
            dir.join("checkpoints").display(),
            dir.join("in").display(),
            dir.join("out").display()
        ),
    )
    .unwrap();
    file
}

fn weir(dir: &Path, file: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(WEIR);
    c.args(["run", file.to_str().unwrap(), "--state-dir", dir.join("state").to_str().unwrap()])
        .args(args)
        .env("WEIR_JOB_SECRET", SECRET);
    c
}

/// The completed checkpoints' directories under `root`, by id.
fn checkpoints(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<(u64, PathBuf)> = Vec::new();
    let Ok(jobs) = std::fs::read_dir(root) else { return Vec::new() };
    for job in jobs.flatten() {
        for chk in std::fs::read_dir(job.path()).unwrap().flatten() {
            let name = chk.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_prefix("chk-").and_then(|n| n.parse::<u64>().ok())
                && chk.path().join("_metadata").exists()
            {
                out.push((n, chk.path()));
            }
        }
    }
    out.sort();
    out.into_iter().map(|(_, p)| p).collect()
}

/// Every file below `dir`, relative.
fn files_below(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn damaged_or_forged_metadata_is_refused_and_nothing_starts_from_the_beginning() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let expected = common::write_input(&dir.join("in"), 4, 3000, 5);
    let file = manifest(dir);
    let root = dir.join("checkpoints/default/wc-tamper");
    // Killed (SIGKILL) once a few checkpoints completed.
    let mut job = weir(dir, &file, &[]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    while checkpoints(&root).len() < 3 {
        assert!(t.elapsed() < Duration::from_secs(60), "no checkpoints");
        assert!(job.try_wait().unwrap().is_none(), "the job ended before its checkpoints");
        std::thread::sleep(Duration::from_millis(50));
    }
    job.kill().unwrap();
    job.wait().unwrap();
    let newest = checkpoints(&root).pop().unwrap().join("_metadata");
    let original = std::fs::read(&newest).unwrap();
    let out_before = files_below(&dir.join("out"));

    let refused = |why: &str, needles: &[&str]| {
        let res = weir(dir, &file, &["--resume"]).output().unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(2), "{why}: {err}");
        assert!(err.contains(newest.to_str().unwrap()), "{why}: the file is not named: {err}");
        assert!(err.contains("--resume-from-older"), "{why}: {err}");
        for n in needles {
            assert!(err.contains(n), "{why}: {n:?} in {err}");
        }
        assert!(!err.contains("weir: running"), "{why}: it started: {err}");
        assert_eq!(files_below(&dir.join("out")), out_before, "{why}: output was written");
    };
    // Truncated, at several lengths.
    for n in [0, 20, original.len() / 2, original.len() - 3] {
        std::fs::write(&newest, &original[..n]).unwrap();
        refused(&format!("truncated to {n}"), &[]);
    }
    // One byte changed.
    let mut changed = original.clone();
    let i = changed.windows(6).position(|w| w == b"\"id\": ").unwrap() + 6;
    changed[i] = if changed[i] == b'9' { b'1' } else { changed[i] + 1 };
    std::fs::write(&newest, &changed).unwrap();
    refused("a changed byte", &["checksum does not match"]);
    // Resealed with a checksum but without the job's secret.
    let m = Metadata::parse(&original, "original", None).unwrap();
    std::fs::write(&newest, seal(&serde_json::to_vec(&m).unwrap(), None)).unwrap();
    refused("forged", &["not written by this job"]);
    // A newer format version, sealed by the job's own secret.
    let secret = weir_runtime::auth::JobSecret::new(SECRET).unwrap();
    let mut v = serde_json::to_value(&m).unwrap();
    v["version"] = 99.into();
    std::fs::write(&newest, seal(&serde_json::to_vec(&v).unwrap(), Some(&secret))).unwrap();
    refused("a newer version", &["metadata version 99"]);

    // Names that leave the state directory, in a copy given as --from-savepoint (checked by
    // its seal only, as another job's would be).
    let evil = dir.join("evil");
    for name in [evil.join("000001.sst").display().to_string(), "../../../evil/000001.sst".into()] {
        let mut m = m.clone();
        let keyed = m.operators.iter_mut().find_map(|o| o.keyed.as_mut()).expect("keyed state");
        keyed.files[0].name = name.clone();
        let copy = dir.join("copy");
        let _ = std::fs::remove_dir_all(&copy);
        common::copy_dir(newest.parent().unwrap().parent().unwrap(), &copy);
        let chk = copy.join(newest.parent().unwrap().file_name().unwrap());
        std::fs::write(chk.join("_metadata"), seal(&serde_json::to_vec(&m).unwrap(), None))
            .unwrap();
        let res = weir(dir, &file, &["--from-savepoint", chk.to_str().unwrap()]).output().unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains("is not one of RocksDB's") && err.contains("forged"), "{err}");
        assert!(!evil.exists(), "{name}: a file was written outside the state directory");
    }

    // With the metadata as it was, the resume loses and repeats nothing.
    std::fs::write(&newest, &original).unwrap();
    let res = weir(dir, &file, &["--resume"]).output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(0), "{err}");
    let texts = common::committed_texts(&dir.join("out"));
    common::check_counts(texts.iter().map(String::as_str), &expected);

    // Asked to, it passes over a damaged checkpoint and resumes from an older one.
    let newest = checkpoints(&root).pop().unwrap().join("_metadata");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let res = weir(dir, &file, &["--resume"]).output().unwrap();
    assert_eq!(res.status.code(), Some(2));
    let res = weir(dir, &file, &["--resume", "--resume-from-older"]).output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(0), "{err}");
    assert!(err.contains("--resume-from-older: passing over"), "{err}");
    assert!(err.contains("--resume-from-older: resuming from checkpoint"), "{err}");
}

#[test]
fn damaged_state_files_fail_the_job_at_once_instead_of_restarting_for_ever() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_input(&dir.join("in"), 4, 3000, 6);
    let file = manifest(dir);
    let root = dir.join("checkpoints/default/wc-tamper");
    let mut job = weir(dir, &file, &[]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    while checkpoints(&root).len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(60), "no checkpoints");
        std::thread::sleep(Duration::from_millis(50));
    }
    job.kill().unwrap();
    job.wait().unwrap();
    let newest = checkpoints(&root).pop().unwrap();
    let bytes = std::fs::read(newest.join("_metadata")).unwrap();
    let m = Metadata::parse(&bytes, "newest", None).unwrap();
    let f = m
        .operators
        .iter()
        .filter_map(|o| o.keyed.as_ref())
        .flat_map(|k| &k.files)
        .find(|f| f.name.ends_with(".sst"))
        .expect("an SST file");
    // One state file cut short: every restart would read the same bytes.
    let path = newest.parent().unwrap().join(&f.key);
    let data = std::fs::read(&path).unwrap();
    std::fs::write(&path, &data[..data.len() / 2]).unwrap();
    let t = Instant::now();
    let res = weir(dir, &file, &["--resume"]).output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(err.contains(path.to_str().unwrap()), "the file is not named: {err}");
    assert!(err.contains("not restarted: the stored state it restores is damaged"), "{err}");
    assert!(!err.contains("restarting in"), "it restarted: {err}");
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
}
