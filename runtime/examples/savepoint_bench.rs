//! Savepoint and rescale benchmark: keyed state of a given size in RocksDB instances of
//! parallelism 4 (128 key groups), written to S3 as a savepoint, restored at 3 and at 2, the
//! state at 2 saved again and restored at 4. For each: the wall-clock time (every subtask on a
//! thread of its own, as in a job), the bytes each new subtask read against its share of the
//! savepoint, and the restore's read rate against the server's raw GET rate measured in the
//! same run at the same number of parallel readers. As a comparison, the state at 4 is also
//! saved in format 1 (entries, which a restore decodes and builds tables of) and restored at 2.
//!
//! `cargo run --release --example savepoint_bench -- s3://bucket/prefix 1024`
//! (size in MiB; S3 settings from the AWS environment variables).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use weir_crds::StorageUri;
use weir_runtime::connectors::SplitMix64;
use weir_runtime::keygroup::{KeyGroupRange, key_group_of, subtask_of};
use weir_runtime::objstore::S3Client;
use weir_runtime::savepoint::{
    GETS_IN_FLIGHT, KeyedFile, KeyedFormat, Restored, restore_keyed, save_keyed_as,
};
use weir_runtime::state::{Num, StateBackend};
use weir_runtime::storage::{Prefixed, Storage};

const MIB: f64 = 1024.0 * 1024.0;
const MAX_P: u32 = 128;
/// Key bytes: random, so that the state does not compress.
const KEY: usize = 64;
const UID: &str = "counts";

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Runs `f(i)` for `i` in `0..n`, each on a thread of its own; returns the results in order.
fn parallel<T: Send>(n: u32, f: impl Fn(u32) -> Result<T, Error> + Sync) -> Result<Vec<T>, Error> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = (0..n).map(|i| s.spawn(move || f(i))).collect();
        handles.into_iter().map(|h| h.join().expect("a bench thread panicked")).collect()
    })
}

/// The RocksDB instances of parallelism `p`, filled with `mib` MiB of keyed state.
fn build(dir: &Path, mib: u64, p: u32) -> Result<Vec<StateBackend>, Error> {
    let keys = mib * (1 << 20) / 85; // about 85 bytes a key in RocksDB
    parallel(p, |s| {
        let backend = StateBackend::open(&dir.join(format!("old-{s}")), &[UID.to_string()])?;
        let mut state = backend.value_state(UID, MAX_P, 1 << 20);
        let mut rng = SplitMix64::new(mib);
        let mut k = [0u8; KEY];
        for i in 0..keys {
            for c in k.chunks_mut(8) {
                c.copy_from_slice(&rng.next_u64().to_le_bytes()[..c.len()]);
            }
            if subtask_of(key_group_of(&k, MAX_P), MAX_P, p) == s {
                state.update(&k, |_| Num::Int(i as i64))?;
            }
        }
        state.write_back()?;
        drop(state);
        backend.compact();
        Ok(backend)
    })
}

/// A savepoint of `backends` (one per subtask of parallelism `backends.len()`) in `format`: its
/// files and the seconds it took (RocksDB checkpoints, then keyed files streamed to storage,
/// every subtask at the same time). Before the timed savepoint, where its time goes is
/// measured apart and printed: the checkpoints, and reading them and encoding the keyed files
/// into nothing (no upload).
fn savepoint(
    storage: &dyn Storage,
    dir: &Path,
    backends: &[StateBackend],
    name: &str,
    format: KeyedFormat,
) -> Result<(Vec<KeyedFile>, f64), Error> {
    let p = backends.len() as u32;
    let local = |s: u32| dir.join(format!("{name}-chk-{s}"));
    let range = |s: u32| {
        let r = KeyGroupRange::of_subtask(MAX_P, p, s);
        (r.start, r.end)
    };
    let t = Instant::now();
    parallel(p, |s| Ok(weir_runtime::snapshot::take(&backends[s as usize], &local(s))?))?;
    let checkpoint_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    parallel(p, |s| {
        let src = &mut |f: &mut weir_runtime::savepoint::EntryVisitor<'_>| {
            weir_runtime::state::rocksdb::for_each_in_checkpoint(&local(s), UID, f)
        };
        match format {
            KeyedFormat::Entries => {
                weir_runtime::savepoint::write_entries(std::io::sink(), range(s), src)?;
            }
            KeyedFormat::Sst => {
                let scratch = dir.join(format!("{name}-encode-{s}.sst"));
                weir_runtime::savepoint::write_sst_groups(
                    std::io::sink(),
                    range(s),
                    src,
                    &scratch,
                )?;
            }
        }
        Ok(())
    })?;
    let encode_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let files = parallel(p, |s| {
        let key = format!("{name}/keyed/{UID}-{s}");
        let snapshot = weir_runtime::state::LocalSnapshot::RocksDb(local(s));
        let f = save_keyed_as(&snapshot, UID, range(s), storage, &key, format)?;
        std::fs::remove_dir_all(local(s))?;
        Ok(f)
    })?;
    let save_secs = t.elapsed().as_secs_f64();
    println!(
        "  savepoint at {p} ({format:?}): RocksDB checkpoints {checkpoint_secs:.2} s; reading them \
         and encoding (no upload) {encode_secs:.2} s; streaming to storage {save_secs:.2} s"
    );
    Ok((files, checkpoint_secs + save_secs))
}

/// The server's raw PUT rate in MiB/s with `n` writers, each streaming its share of `data`
/// as an object of its own (multipart, as savepoints are written).
fn raw_put(storage: &dyn Storage, data: &[u8], n: u32) -> Result<f64, Error> {
    let share = data.len() / n as usize;
    let t = Instant::now();
    parallel(n, |i| {
        let part = &data[i as usize * share..(i as usize + 1) * share];
        storage.put_streamed(&format!("raw-put-{i}"), &mut |out| {
            for c in part.chunks(64 << 10) {
                out.write_all(c).map_err(|e| {
                    weir_runtime::error::RuntimeError::internal(format!("writing: {e}"))
                })?;
            }
            Ok(())
        })?;
        Ok(())
    })?;
    let rate = (share * n as usize) as f64 / MIB / t.elapsed().as_secs_f64();
    for i in 0..n {
        storage.delete(&format!("raw-put-{i}"))?;
    }
    Ok(rate)
}

/// The server's raw GET rate in MiB/s with `n` readers, each reading its share of `key`
/// (`len` bytes) in ranged requests of the restore's size.
fn raw_get(storage: &dyn Storage, key: &str, len: u64, n: u32) -> Result<f64, Error> {
    let chunk = weir_runtime::savepoint::RESTORE_CHUNK;
    let share = len / u64::from(n);
    let t = Instant::now();
    parallel(n, |i| {
        let (mut at, end) = (u64::from(i) * share, u64::from(i + 1) * share);
        while at < end {
            let to = (at + chunk).min(end);
            let b = storage.get_range(key, at, to)?;
            assert_eq!(b.len() as u64, to - at);
            at = to;
        }
        Ok(())
    })?;
    Ok((share * u64::from(n)) as f64 / MIB / t.elapsed().as_secs_f64())
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let uri: StorageUri =
        args.first().ok_or("usage: savepoint_bench s3://bucket/prefix MIB")?.parse()?;
    let mib: u64 = args.get(1).map_or(Ok(1024), |a| a.parse())?;
    let client = S3Client::new(None)?;
    let root: Arc<dyn Storage> = Arc::from(weir_runtime::storage::open(&uri, Some(&client))?);
    let storage = Prefixed::new(root, &format!("savepoint-bench-{}", std::process::id()));
    let tmp = tempfile::tempdir()?;

    // The server's raw PUT and GET rates: 256 MiB of random bytes.
    let mut data = Vec::with_capacity(256 << 20);
    let mut rng = SplitMix64::new(1);
    for _ in 0..(256 << 20) / 8 {
        data.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    let mut raw_puts = Vec::new();
    for n in [2, 4] {
        raw_puts.push(format!("{:.0} MiB/s with {n} writers", raw_put(&storage, &data, n)?));
    }
    println!("raw PUT (streamed multipart, S3 {uri}): {}", raw_puts.join(", "));
    let raw_len = storage.put_streamed("raw", &mut |out| {
        out.write_all(&data)
            .map_err(|e| weir_runtime::error::RuntimeError::internal(format!("writing: {e}")))
    })?;
    drop(data);
    // Per number of readers, the better of: that many sequential readers, and that many with
    // as many requests on their way each as a restoring subtask has.
    let mut raw = std::collections::BTreeMap::new();
    let mut raw_text = Vec::new();
    for n in [1, 2, 3, 4] {
        let one = raw_get(&storage, "raw", raw_len, n)?;
        let many = raw_get(&storage, "raw", raw_len, n * GETS_IN_FLIGHT as u32)?;
        raw.insert(n, one.max(many));
        raw_text.push(format!(
            "{n} reader(s) {one:.0} MiB/s ({} requests at a time: {many:.0})",
            n * GETS_IN_FLIGHT as u32
        ));
    }
    println!("raw GET (S3 {uri}): {}", raw_text.join(", "));
    storage.delete("raw")?;

    let t = Instant::now();
    let old = build(tmp.path(), mib, 4)?;
    println!(
        "built {mib} MiB of keyed state at parallelism 4 in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    println!(
        "{:<8} {:>10} {:>10} {:>11} {:>12} {:>10} {:>9} {:>8}",
        "rescale",
        "savepoint",
        "restore",
        "state MiB",
        "worst/share",
        "read MiB/s",
        "raw GET",
        "of raw"
    );
    let (files4, sp4) = savepoint(&storage, tmp.path(), &old, "sp-4", KeyedFormat::Sst)?;
    let (files4_v1, sp4_v1) =
        savepoint(&storage, tmp.path(), &old, "sp-4-v1", KeyedFormat::Entries)?;
    // Disk is scarce where this runs: every instance goes as soon as it is no longer needed.
    let remove = |backends: Vec<StateBackend>| -> Result<(), Error> {
        let dirs: Vec<_> = backends.iter().map(|b| b.path().to_path_buf()).collect();
        drop(backends);
        for d in dirs {
            std::fs::remove_dir_all(d)?;
        }
        Ok(())
    };
    remove(old)?;
    let mut at2 = None;
    // (from, to, the savepoint in format 1): the format-1 restore is a comparison, not what a
    // job does now (its savepoints are written in format 2).
    let plan: Vec<(u32, u32, bool)> =
        vec![(4, 3, false), (4, 2, true), (4, 2, false), (2, 4, false)];
    let mut saved: std::collections::BTreeMap<u32, (Vec<KeyedFile>, f64)> =
        [(4, (files4, sp4))].into();
    for (from, to, v1) in plan {
        let tag = if v1 { "-v1" } else { "" };
        if let std::collections::btree_map::Entry::Vacant(e) = saved.entry(from) {
            let backends: Vec<StateBackend> = at2.take().ok_or("no state at parallelism 2")?;
            let name = format!("sp-{from}");
            e.insert(savepoint(&storage, tmp.path(), &backends, &name, KeyedFormat::Sst)?);
            remove(backends)?;
        }
        let (files, sp_secs) =
            if v1 { (&files4_v1, &sp4_v1) } else { (&saved[&from].0, &saved[&from].1) };
        let total: u64 = files.iter().map(|f| f.offsets.last().copied().unwrap_or(0)).sum();
        let t = Instant::now();
        let restored = parallel(to, |s| {
            let r = KeyGroupRange::of_subtask(MAX_P, to, s);
            let b = StateBackend::open(
                &tmp.path().join(format!("new-{from}-{to}{tag}-{s}")),
                &[UID.to_string()],
            )?;
            let scratch = tmp.path().join(format!("restore-{from}-{to}{tag}-{s}"));
            let done = restore_keyed(&storage, files, (r.start, r.end), &b, UID, &scratch)?;
            std::fs::remove_dir_all(&scratch)?;
            Ok((b, done))
        })?;
        let secs = t.elapsed().as_secs_f64();
        let share = total as f64 / f64::from(to);
        let worst = restored.iter().map(|(_, r)| r.bytes as f64 / share).fold(0.0, f64::max);
        let read: u64 = restored.iter().map(|(_, r)| r.bytes).sum();
        let rate = read as f64 / MIB / secs;
        let raw_n = raw[&to.min(4)];
        let rescale = format!("{from}->{to}{}", if v1 { "*" } else { "" });
        println!(
            "{rescale:<8} {sp_secs:>9.2}s {secs:>9.2}s {:>11.0} {worst:>11.3}x {rate:>10.0} {raw_n:>9.0} {:>7.0}%",
            total as f64 / MIB,
            100.0 * rate / raw_n
        );
        let most = |f: fn(&Restored) -> f64| restored.iter().map(|(_, r)| f(r)).fold(0.0, f64::max);
        println!(
            "  restore at {to}{}, the most of one subtask: waiting for S3 {:.2} s, writing its SST \
             files {:.2} s, ingesting them {:.2} s ({} files)",
            if v1 {
                " (* a savepoint of format 1: entries decoded into a new SST file, a comparison)"
            } else {
                ""
            },
            most(|r| r.waiting_secs),
            most(|r| r.writing_secs),
            most(|r| r.ingest_secs),
            restored.iter().map(|(_, r)| r.files).sum::<u64>(),
        );
        let backends: Vec<StateBackend> = restored.into_iter().map(|(b, _)| b).collect();
        if (from, to, v1) == (4, 2, false) {
            at2 = Some(backends);
        } else {
            remove(backends)?;
        }
    }
    for e in storage.list("")? {
        storage.delete(&e.key)?;
    }
    Ok(())
}
