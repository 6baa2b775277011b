//! Checkpoint benchmark: how long a keyed-state checkpoint of a given size takes to reach S3,
//! full and incremental (5% of the keys changed), beside the S3 server's raw PUT bandwidth
//! measured in the same run.
//!
//! `cargo run --release --example checkpoint_bench -- s3://bucket/prefix 100 1024`
//! (sizes in MiB; S3 settings from the AWS environment variables).

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use weir_crds::StorageUri;
use weir_runtime::connectors::SplitMix64;
use weir_runtime::objstore::S3Client;
use weir_runtime::snapshot;
use weir_runtime::state::StateBackend;
use weir_runtime::storage::{Prefixed, Storage};

const MIB: f64 = 1024.0 * 1024.0;
/// Key bytes: random, so that the state does not compress.
const KEY: usize = 64;

fn key(rng: &mut SplitMix64, out: &mut [u8; KEY]) {
    for c in out.chunks_mut(8) {
        c.copy_from_slice(&rng.next_u64().to_le_bytes()[..c.len()]);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let uri: StorageUri =
        args.first().ok_or("usage: checkpoint_bench s3://bucket/prefix MIB...")?.parse()?;
    let sizes: Vec<u64> = args[1..].iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
    let client = S3Client::new(None)?;
    let root: Arc<dyn Storage> = Arc::from(weir_runtime::storage::open(&uri, Some(&client))?);
    let run = format!("bench-{}", std::process::id());
    let storage = Prefixed::new(root, &run);
    let tmp = tempfile::tempdir()?;

    // The server's raw bandwidth: one 256 MiB object of random bytes.
    let raw_path = tmp.path().join("raw");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&raw_path)?);
        let mut rng = SplitMix64::new(1);
        for _ in 0..(256 << 20) / 8 {
            f.write_all(&rng.next_u64().to_le_bytes())?;
        }
    }
    let t = Instant::now();
    let n = storage.put_file("raw", &raw_path)?;
    let raw = n as f64 / MIB / t.elapsed().as_secs_f64();
    storage.delete("raw")?;
    std::fs::remove_file(&raw_path)?;
    println!(
        "raw PUT: {:.0} MiB in {:.2} s = {raw:.0} MiB/s",
        n as f64 / MIB,
        t.elapsed().as_secs_f64()
    );
    println!(
        "{:>9} {:>12} {:>8} {:>8} {:>8} {:>11} {:>10} {:>7}",
        "state", "checkpoint", "sync s", "upload s", "total s", "uploaded", "MiB/s", "of raw"
    );

    for mib in sizes {
        let dir = tmp.path().join(format!("state-{mib}"));
        let uid = "counts".to_string();
        let backend = StateBackend::open(&dir.join("db"), std::slice::from_ref(&uid))?;
        let mut state = backend.value_state(&uid, 128, 1 << 20);
        // About 85 bytes a key in RocksDB: key, key group, value, overhead.
        let keys = mib * (1 << 20) / 85;
        let mut rng = SplitMix64::new(mib);
        let mut k = [0u8; KEY];
        for i in 0..keys {
            key(&mut rng, &mut k);
            state.update(&k, |_| weir_runtime::state::Num::Int(i as i64))?;
        }
        state.write_back()?;
        // A settled instance, as a running job's is between bursts of compaction.
        backend.compact();
        let report = |what: &str, sync: f64, up: f64, size: u64, sent: u64| {
            let rate = sent as f64 / MIB / up.max(1e-9);
            println!(
                "{:>5} MiB {what:>12} {sync:>8.2} {up:>8.2} {:>8.2} {:>7.0} MiB {rate:>10.0} {:>6.0}%   (state files {:.0} MiB)",
                mib,
                sync + up,
                sent as f64 / MIB,
                100.0 * rate / raw,
                size as f64 / MIB
            );
        };
        // Full.
        let t = Instant::now();
        let local = dir.join("chk-1");
        snapshot::take(&backend, &local)?;
        let sync = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (full, done) =
            snapshot::upload(&storage, &local, &format!("i{mib}"), (0, 127), "shared/own-1", None)?;
        report("full", sync, t.elapsed().as_secs_f64(), full.size(), done.bytes);
        std::fs::remove_dir_all(&local)?;
        // Incremental: 5% of the keys change.
        let mut rng = SplitMix64::new(mib);
        for i in 0..keys {
            key(&mut rng, &mut k);
            if i % 20 == 0 {
                state.update(&k, |_| weir_runtime::state::Num::Int(-(i as i64)))?;
            }
        }
        state.write_back()?;
        let t = Instant::now();
        let local = dir.join("chk-2");
        snapshot::take(&backend, &local)?;
        let sync = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (inc, done) = snapshot::upload(
            &storage,
            &local,
            &format!("i{mib}"),
            (0, 127),
            "shared/own-2",
            Some(&full),
        )?;
        report("incremental", sync, t.elapsed().as_secs_f64(), inc.size(), done.bytes);
        drop(state);
        drop(backend);
        std::fs::remove_dir_all(&dir)?;
        for e in storage.list("")? {
            storage.delete(&e.key)?;
        }
    }
    Ok(())
}
