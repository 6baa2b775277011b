//! The storage conformance suite: the same checks against a local directory, the real S3
//! server (`make e2e`), and the fault-injecting wrapper; then the faults themselves.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use weir_runtime::storage::{Entry, Faults, Faulty, LocalStorage, S3Storage, Storage};

fn keys(entries: &[Entry]) -> Vec<&str> {
    entries.iter().map(|e| e.key.as_str()).collect()
}

/// Bytes that differ at every position, so a range taken from the wrong place shows.
fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = weir_runtime::connectors::SplitMix64::new(seed);
    (0..n.div_ceil(8)).flat_map(|_| rng.next_u64().to_le_bytes()).take(n).collect()
}

fn conformance(s: &dyn Storage, scratch: &Path) {
    // Missing objects are None, not errors.
    assert_eq!(s.get("chk-1/_metadata").unwrap(), None);
    assert!(s.list("").unwrap().is_empty(), "a new storage is empty");

    // Round trips, empty objects, replacement.
    s.put("chk-1/_metadata", b"v1").unwrap();
    assert_eq!(s.get("chk-1/_metadata").unwrap().as_deref(), Some(&b"v1"[..]));
    s.put("chk-1/_metadata", b"version 2").unwrap();
    assert_eq!(s.get("chk-1/_metadata").unwrap().as_deref(), Some(&b"version 2"[..]));
    s.put("chk-1/empty", b"").unwrap();
    assert_eq!(s.get("chk-1/empty").unwrap().as_deref(), Some(&b""[..]));
    s.put("shared/a b ü.sst", b"odd name").unwrap();
    assert_eq!(s.get("shared/a b ü.sst").unwrap().as_deref(), Some(&b"odd name"[..]));

    // Listing: recursive, sorted, sizes, and a prefix is a prefix of keys, not of directories.
    s.put("chk-10/_metadata", b"ten").unwrap();
    s.put("chk-1/worker-0/000001.sst", &pattern(1000, 1)).unwrap();
    let all = s.list("").unwrap();
    assert_eq!(
        keys(&all),
        [
            "chk-1/_metadata",
            "chk-1/empty",
            "chk-1/worker-0/000001.sst",
            "chk-10/_metadata",
            "shared/a b ü.sst"
        ]
    );
    assert_eq!(all.iter().find(|e| e.key == "chk-1/worker-0/000001.sst").unwrap().size, 1000);
    assert_eq!(
        keys(&s.list("chk-1/").unwrap()),
        ["chk-1/_metadata", "chk-1/empty", "chk-1/worker-0/000001.sst"]
    );
    assert_eq!(keys(&s.list("chk-1").unwrap()).len(), 4, "chk-1 is a prefix of chk-10 too");
    assert!(s.list("nothing/").unwrap().is_empty());

    // Ranges: the middle, the whole, nothing.
    let data = pattern(1000, 1);
    assert_eq!(s.get_range("chk-1/worker-0/000001.sst", 100, 357).unwrap(), data[100..357]);
    assert_eq!(s.get_range("chk-1/worker-0/000001.sst", 0, 1000).unwrap(), data);
    assert!(s.get_range("chk-1/worker-0/000001.sst", 5, 5).unwrap().is_empty());
    assert!(s.get_range("chk-1/nothing", 0, 10).is_err(), "a range of a missing object");

    // Files, large enough to go up in several parts on S3.
    let big = pattern(17 << 20, 2);
    let file = scratch.join("big.sst");
    std::fs::write(&file, &big).unwrap();
    assert_eq!(s.put_file("shared/big.sst", &file).unwrap(), big.len() as u64);
    let at = (8 << 20) - 3;
    assert_eq!(
        s.get_range("shared/big.sst", at, at + 10).unwrap(),
        big[at as usize..at as usize + 10]
    );
    assert_eq!(s.get("shared/big.sst").unwrap().unwrap(), big);
    assert_eq!(s.list("shared/big").unwrap()[0].size, big.len() as u64);

    // Streamed writes: written as they are produced, in writes of any size; past one upload
    // part, several parts (with the part boundaries inside writes); a small one whole.
    let unit = weir_runtime::objstore::UPLOAD_PART;
    for (n, key) in [(0, "stream/empty"), (1000, "stream/small"), (3 * unit + 12345, "stream/big")]
    {
        let data = pattern(n, 7);
        let written = s
            .put_streamed(key, &mut |out| {
                let mut at = 0;
                let mut step = 1;
                while at < data.len() {
                    let to = (at + step).min(data.len());
                    out.write_all(&data[at..to]).map_err(|e| {
                        weir_runtime::error::RuntimeError::internal(format!("writing: {e}"))
                    })?;
                    at = to;
                    step = step * 3 + 7; // 1, 10, 37, ... up to whole parts and more
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(written, n as u64, "{key}");
        assert_eq!(s.get(key).unwrap().unwrap(), data, "{key}");
        if n > unit {
            let at = unit as u64 - 5;
            assert_eq!(s.get_range(key, at, at + 10).unwrap(), data[at as usize..at as usize + 10]);
        }
    }
    // A writer that fails, early or after more than one part, leaves nothing and its error
    // is the one returned.
    for n in [10, 2 * unit + 1] {
        let e = s
            .put_streamed("stream/failed", &mut |out| {
                out.write_all(&pattern(n, 8)).unwrap();
                Err(weir_runtime::error::RuntimeError::internal("the producer broke"))
            })
            .unwrap_err();
        assert!(e.message.contains("the producer broke"), "{e}");
        assert_eq!(s.get("stream/failed").unwrap(), None, "after {n} bytes");
    }
    for key in ["stream/empty", "stream/small", "stream/big"] {
        s.delete(key).unwrap();
    }

    // Deleting: gone from get and list; deleting again is fine.
    s.delete("chk-1/empty").unwrap();
    s.delete("chk-1/empty").unwrap();
    assert_eq!(s.get("chk-1/empty").unwrap(), None);
    assert!(!keys(&s.list("chk-1/").unwrap()).contains(&"chk-1/empty"));

    // Keys that are not relative paths are refused, not followed.
    for bad in ["../escape", "/abs", "a//b", "a/./b", ""] {
        assert!(s.put(bad, b"x").is_err(), "{bad:?} accepted");
        assert!(s.get(bad).is_err(), "{bad:?} accepted");
    }

    // Writers in parallel each land whole.
    std::thread::scope(|t| {
        for i in 0..8 {
            t.spawn(move || s.put(&format!("par/{i}"), &pattern(50_000, i)).unwrap());
        }
    });
    let par = s.list("par/").unwrap();
    assert_eq!(par.len(), 8);
    for i in 0..8u64 {
        assert_eq!(s.get(&format!("par/{i}")).unwrap().unwrap(), pattern(50_000, i));
    }
    for e in s.list("").unwrap() {
        s.delete(&e.key).unwrap();
    }
    assert!(s.list("").unwrap().is_empty());
}

#[test]
fn a_local_directory_conforms() {
    let tmp = tempfile::tempdir().unwrap();
    conformance(&LocalStorage::new(&tmp.path().join("store")), tmp.path());
}

#[test]
fn the_fault_wrapper_without_faults_conforms() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Faulty::new(LocalStorage::new(&tmp.path().join("store")), Faults::default());
    conformance(&s, tmp.path());
    assert_eq!(s.injected.load(Ordering::Relaxed), 0);
}

fn s3_storage() -> S3Storage {
    let bucket = std::env::var("WEIR_TEST_BUCKET").expect("WEIR_TEST_BUCKET: run with make e2e");
    let client = weir_runtime::objstore::S3Client::new(None).unwrap();
    let prefix = format!(
        "conformance/{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    );
    S3Storage::new(client, &bucket, &prefix)
}

#[test]
#[ignore = "needs S3: run by make e2e"]
fn the_s3_server_conforms() {
    let tmp = tempfile::tempdir().unwrap();
    conformance(&s3_storage(), tmp.path());
}

#[test]
#[ignore = "needs S3: run by make e2e"]
fn the_s3_server_behind_the_fault_wrapper_conforms() {
    let tmp = tempfile::tempdir().unwrap();
    conformance(&Faulty::new(s3_storage(), Faults::default()), tmp.path());
}

#[test]
fn injected_failures_are_errors_that_say_so_and_are_retryable() {
    let tmp = tempfile::tempdir().unwrap();
    let s =
        Faulty::new(LocalStorage::new(tmp.path()), Faults { fail_every: 3, ..Faults::default() });
    let mut failed = Vec::new();
    for i in 0..30 {
        if let Err(e) = s.put(&format!("k/{i}"), b"x") {
            assert!(e.message.contains("injected failure"), "{e}");
            assert!(e.retryable);
            assert!(e.message.contains(&format!("k/{i}")), "the error names the key: {e}");
            failed.push(format!("k/{i}"));
        }
    }
    assert_eq!(failed.len(), 10, "every third call fails");
    assert_eq!(s.injected.load(Ordering::Relaxed), 10);
    // What failed before reaching the storage is not there; the rest is.
    s.set(Faults::default());
    let stored: Vec<String> = s.list("k/").unwrap().into_iter().map(|e| e.key).collect();
    assert_eq!(stored.len(), 20);
    assert!(failed.iter().all(|k| !stored.contains(k)));
    // A failed call before the write leaves nothing behind.
    s.set(Faults { fail_every: 1, ..Faults::default() });
    assert!(s.put("never", b"x").is_err());
    s.set(Faults::default());
    assert_eq!(s.get("never").unwrap(), None);
}

#[test]
fn a_write_whose_answer_is_lost_happened_but_reports_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Faulty::new(
        LocalStorage::new(tmp.path()),
        Faults { fail_after_write: true, ..Faults::default() },
    );
    assert!(s.put("chk-3/_metadata", b"m").is_err());
    s.set(Faults::default());
    assert_eq!(s.get("chk-3/_metadata").unwrap().as_deref(), Some(&b"m"[..]));
}

#[test]
fn delays_slow_every_call() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Faulty::new(
        LocalStorage::new(tmp.path()),
        Faults { delay: Duration::from_millis(50), ..Faults::default() },
    );
    let t = Instant::now();
    s.put("a", b"1").unwrap();
    s.get("a").unwrap();
    s.list("").unwrap();
    assert!(t.elapsed() >= Duration::from_millis(150), "{:?}", t.elapsed());
}
