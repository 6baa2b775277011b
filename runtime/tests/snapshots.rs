//! Keyed-state snapshots through storage: a restored instance holds exactly what was
//! snapshotted, a second snapshot uploads only the new SST files (so does the first snapshot
//! of an instance restored from one), and retention finds the shared files no retained
//! snapshot needs.

use std::path::Path;

use weir_runtime::snapshot::{self, StateHandle};
use weir_runtime::state::{Num, StateBackend, StateEntry};
use weir_runtime::storage::{LocalStorage, S3Storage, Storage};

const OPS: [&str; 2] = ["counts", "sums"];

fn ops() -> Vec<String> {
    OPS.iter().map(|s| s.to_string()).collect()
}

/// Adds `by` to `n` keys, starting at key `from`, in both operators' state.
fn write(b: &StateBackend, from: u64, n: u64, by: i64) {
    for uid in OPS {
        let mut st = b.value_state(uid, 128, 1 << 20);
        for k in from..from + n {
            st.update(format!("key-{k}").as_bytes(), |v| match v {
                Some(Num::Int(x)) => Num::Int(x + by),
                _ => Num::Int(by),
            })
            .unwrap();
        }
        st.write_back().unwrap();
    }
}

fn contents(b: &StateBackend) -> Vec<Vec<StateEntry>> {
    OPS.iter().map(|uid| b.scan(uid).unwrap()).collect()
}

fn restore(storage: &dyn Storage, h: &StateHandle, dir: &Path) -> Vec<Vec<StateEntry>> {
    snapshot::download(storage, h, dir).unwrap();
    contents(&StateBackend::open(dir, &ops()).unwrap())
}

fn snapshots_round_trip_incrementally(storage: &dyn Storage) {
    let tmp = tempfile::tempdir().unwrap();
    let b = StateBackend::open(&tmp.path().join("db"), &ops()).unwrap();
    write(&b, 0, 20_000, 1);
    let at_1 = contents(&b);
    assert_eq!(at_1[0].len(), 20_000);

    snapshot::take(&b, &tmp.path().join("chk-1")).unwrap();
    let (h1, up1) =
        snapshot::upload(storage, &tmp.path().join("chk-1"), "w0-run1", (0, 127), "chk-1", None)
            .unwrap();
    assert_eq!(up1.bytes, h1.size(), "a first snapshot uploads everything");
    assert!(
        h1.files.iter().any(|f| f.key.starts_with("shared/w0-run1/") && f.name.ends_with(".sst"))
    );

    // 5% of the keys change.
    write(&b, 0, 1_000, 10);
    let at_2 = contents(&b);
    assert_ne!(at_1, at_2);
    snapshot::take(&b, &tmp.path().join("chk-2")).unwrap();
    let (h2, up2) = snapshot::upload(
        storage,
        &tmp.path().join("chk-2"),
        "w0-run1",
        (0, 127),
        "chk-2",
        Some(&h1),
    )
    .unwrap();
    let reused: Vec<_> = h2.files.iter().filter(|f| h1.files.contains(f)).collect();
    assert!(!reused.is_empty(), "the second snapshot shares SST files with the first");
    assert!(up2.bytes < h2.size() / 2, "uploaded {} of {} bytes", up2.bytes, h2.size());

    // Each snapshot restores to exactly its own state, while the instance goes on changing.
    write(&b, 5_000, 10, 100);
    assert_eq!(restore(storage, &h1, &tmp.path().join("r1")), at_1);
    assert_eq!(restore(storage, &h2, &tmp.path().join("r2")), at_2);

    // An instance restored from snapshot 2 (a new attempt, with an instance name of its own)
    // goes on from its files: its first snapshot names them where they are and uploads only
    // what changed since.
    let again = StateBackend::open(&tmp.path().join("r2"), &ops()).unwrap();
    write(&again, 0, 500, 1);
    let at_3 = contents(&again);
    snapshot::take(&again, &tmp.path().join("chk-3")).unwrap();
    let (h3, up3) = snapshot::upload(
        storage,
        &tmp.path().join("chk-3"),
        "w0-run2",
        (0, 127),
        "chk-3",
        Some(&h2),
    )
    .unwrap();
    drop(again);
    assert!(
        h3.files.iter().any(|f| f.key.starts_with("shared/w0-run1/")),
        "the restored files are named where they are: {h3:?}"
    );
    assert!(
        h3.files.iter().filter(|f| !h2.files.contains(f)).all(|f| f.key.contains("/w0-run2/")),
        "new files go under the new instance: {h3:?}"
    );
    assert!(up3.bytes < h3.size() / 2, "uploaded {} of {} bytes", up3.bytes, h3.size());
    assert_eq!(restore(storage, &h3, &tmp.path().join("r3")), at_3);
    // A file of the earlier handle whose local copy has another size is not trusted: it goes
    // up again, under the new instance.
    let mut stale = h2.clone();
    for f in stale.files.iter_mut() {
        f.size += 1;
    }
    let (h3b, up3b) = snapshot::upload(
        storage,
        &tmp.path().join("chk-3"),
        "w0-run2",
        (0, 127),
        "chk-3b",
        Some(&stale),
    )
    .unwrap();
    assert_eq!(up3b.bytes, h3b.size(), "nothing of a mismatched handle is reused");
    assert!(h3b.files.iter().all(|f| !f.key.contains("/w0-run1/")), "{h3b:?}");

    // Dropping snapshot 1: the shared files only it names can go, and 2 still restores.
    let gone = snapshot::unreferenced([&h1], [&h2]);
    assert!(gone.iter().all(|k| k.starts_with("shared/")));
    assert!(gone.iter().all(|k| h2.files.iter().all(|f| &f.key != k)));
    for k in &gone {
        storage.delete(k).unwrap();
    }
    assert_eq!(restore(storage, &h2, &tmp.path().join("r2b")), at_2);

    // A missing file is an error that names it, not a half-restored instance.
    let victim = &h2.files.iter().find(|f| f.name.ends_with(".sst")).unwrap().key;
    storage.delete(victim).unwrap();
    let err = snapshot::download(storage, &h2, &tmp.path().join("r2c")).unwrap_err();
    assert!(err.message.contains(victim.as_str()) && err.message.contains("missing"), "{err}");
}

#[test]
fn snapshots_in_a_local_directory() {
    let tmp = tempfile::tempdir().unwrap();
    snapshots_round_trip_incrementally(&LocalStorage::new(tmp.path()));
}

#[test]
#[ignore = "needs S3: run by make e2e"]
fn snapshots_on_the_s3_server() {
    let bucket = std::env::var("WEIR_TEST_BUCKET").expect("WEIR_TEST_BUCKET: run with make e2e");
    let client = weir_runtime::objstore::S3Client::new(None).unwrap();
    let prefix = format!("snapshots/{}", std::process::id());
    snapshots_round_trip_incrementally(&S3Storage::new(client, &bucket, &prefix));
}
