//! Keyed state in savepoints: self-contained files, sorted by key group, that a job restored
//! at any parallelism reads only its own part of.
//!
//! The keyed state of one operator subtask is one file:
//!
//! ```text
//!   WEIR-KEYED 1\n
//!   entries, in key order: varint key length, key, varint value length, value
//! ```
//!
//! where a key is the stored key (its key group as 2 big-endian bytes, then the key's bytes).
//! The savepoint's metadata keeps, beside the file's name, the offset where each of its key
//! groups starts ([`KeyedFile`]). A subtask that owns key groups `a..=b` after a restore reads
//! from each file that holds any of them the one byte range `offset(a)..offset(b + 1)` (a
//! ranged GET on S3), writes the entries into an SST file and ingests it into RocksDB.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;
use crate::state::{StateBackend, StateError, sst_options};
use crate::storage::Storage;
use crate::wire::put_varint;

/// The first bytes of a keyed state file.
pub const KEYED_MAGIC: &[u8] = b"WEIR-KEYED 1\n";

/// A keyed state file of a savepoint and its key-group index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyedFile {
    /// The file, relative to the savepoint's directory.
    pub file: String,
    /// The key groups it holds, first and last.
    pub key_groups: (u16, u16),
    /// Where each key group starts (`offsets[g - first]`), then the file's length.
    pub offsets: Vec<u64>,
    pub entries: u64,
}

impl KeyedFile {
    /// The bytes holding key groups `range` (first and last), where they overlap this file's;
    /// `None` when none of them has an entry here.
    pub fn byte_range(&self, range: (u16, u16)) -> Option<(u64, u64)> {
        let lo = range.0.max(self.key_groups.0);
        let hi = range.1.min(self.key_groups.1);
        if lo > hi {
            return None;
        }
        let start = self.offsets[usize::from(lo - self.key_groups.0)];
        let end = self.offsets[usize::from(hi - self.key_groups.0) + 1];
        (end > start).then_some((start, end))
    }

    /// Checks the index against the key-group range (metadata read from elsewhere).
    pub fn check(&self) -> Result<(), String> {
        let (a, b) = self.key_groups;
        if a > b || self.offsets.len() != usize::from(b - a) + 2 {
            return Err(format!("{}: a key-group index that does not fit its range", self.file));
        }
        if self.offsets[0] != KEYED_MAGIC.len() as u64
            || self.offsets.windows(2).any(|w| w[0] > w[1])
        {
            return Err(format!("{}: key-group offsets out of order", self.file));
        }
        Ok(())
    }
}

/// Calls a visitor with stored (key, value) entries in key order.
pub type EntrySource<'a> = dyn FnMut(&mut EntryVisitor<'_>) -> Result<(), RuntimeError> + 'a;
/// Takes one stored (key, value) entry.
pub type EntryVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), RuntimeError> + 'a;

/// Writes entries (in key order) of key groups `key_groups` as a keyed state file into `out`;
/// returns the key-group offsets and the number of entries.
pub fn write_entries<W: Write>(
    mut out: W,
    key_groups: (u16, u16),
    entries: &mut EntrySource<'_>,
) -> Result<(Vec<u64>, u64), RuntimeError> {
    let io = |e: std::io::Error| RuntimeError::internal(format!("writing keyed state: {e}"));
    out.write_all(KEYED_MAGIC).map_err(io)?;
    let (first, last) = key_groups;
    let mut offsets = Vec::with_capacity(usize::from(last - first) + 2);
    let mut at = KEYED_MAGIC.len() as u64;
    let mut count = 0u64;
    let mut buf = Vec::with_capacity(64 << 10);
    let mut result = Ok(());
    entries(&mut |k: &[u8], v: &[u8]| {
        if k.len() < 2 {
            return Err(RuntimeError::internal("a stored key without its key group"));
        }
        let g = u16::from_be_bytes([k[0], k[1]]);
        if g < first || g > last {
            return Err(RuntimeError::internal(format!(
                "key group {g} in the state of key groups {first}..={last}"
            )));
        }
        // Every key group up to this one starts here (empty ones too).
        while offsets.len() <= usize::from(g - first) {
            offsets.push(at + buf.len() as u64);
        }
        put_varint(&mut buf, k.len() as u64);
        buf.extend_from_slice(k);
        put_varint(&mut buf, v.len() as u64);
        buf.extend_from_slice(v);
        count += 1;
        if buf.len() >= 64 << 10 {
            at += buf.len() as u64;
            if let Err(e) = out.write_all(&buf) {
                result = Err(io(e));
            }
            buf.clear();
        }
        Ok(())
    })?;
    result?;
    at += buf.len() as u64;
    out.write_all(&buf).map_err(io)?;
    out.flush().map_err(io)?;
    while offsets.len() <= usize::from(last - first) + 1 {
        offsets.push(at);
    }
    Ok((offsets, count))
}

/// Reads the entries of a byte range of a keyed state file (whole entries, as
/// [`KeyedFile::byte_range`] gives), calling `f` with each (key, value).
pub fn read_entries(
    bytes: &[u8],
    f: impl FnMut(&[u8], &[u8]) -> Result<(), RuntimeError>,
) -> Result<(), String> {
    let used = read_whole_entries(bytes, f)?;
    if used == bytes.len() { Ok(()) } else { Err("keyed state cut short".into()) }
}

/// Writes operator `uid`'s state from the RocksDB checkpoint at `checkpoint` (key groups
/// `key_groups`) to `storage` as `key`, streamed: on S3 its parts go up while RocksDB is read
/// (no local copy).
pub fn save_keyed(
    checkpoint: &Path,
    uid: &str,
    key_groups: (u16, u16),
    storage: &dyn Storage,
    key: &str,
) -> Result<KeyedFile, RuntimeError> {
    let mut index = None;
    storage.put_streamed(key, &mut |out| {
        index = Some(write_entries(out, key_groups, &mut |f| {
            StateBackend::for_each_in_checkpoint(checkpoint, uid, |k, v| f(k, v))
        })?);
        Ok(())
    })?;
    let (offsets, entries) = index
        .ok_or_else(|| RuntimeError::internal("a keyed state file written without an index"))?;
    Ok(KeyedFile { file: key.to_string(), key_groups, offsets, entries })
}

impl From<StateError> for RuntimeError {
    fn from(e: StateError) -> Self {
        RuntimeError::internal(e.to_string())
    }
}

/// Bytes of a keyed state file read per ranged request while restoring.
pub const RESTORE_CHUNK: u64 = 8 << 20;

/// Ranged requests a restoring subtask has on their way at the same time (each of
/// [`RESTORE_CHUNK`] bytes; at most twice as many chunks are in memory).
pub const GETS_IN_FLIGHT: usize = 3;

/// Loads into `backend` operator `uid`'s entries of key groups `range` from `files` (of a
/// savepoint in `storage`): from each file that holds any, only the byte range of those key
/// groups, read in ranged requests of [`RESTORE_CHUNK`] bytes ([`GETS_IN_FLIGHT`] on their way
/// while the entries of earlier ones are written), into one SST file, which is ingested.
pub fn restore_keyed(
    storage: &dyn Storage,
    files: &[KeyedFile],
    range: (u16, u16),
    backend: &StateBackend,
    uid: &str,
    scratch: &Path,
) -> Result<Restored, RuntimeError> {
    restore_keyed_with(storage, files, range, backend, uid, scratch, &sst_options())
}

/// [`restore_keyed`], with the SST file written with `sst` (for comparisons: the table
/// options must be ones the column family can read, which RocksDB checks when ingesting).
pub fn restore_keyed_with(
    storage: &dyn Storage,
    files: &[KeyedFile],
    range: (u16, u16),
    backend: &StateBackend,
    uid: &str,
    scratch: &Path,
    sst: &rocksdb::Options,
) -> Result<Restored, RuntimeError> {
    restore_keyed_in_chunks(
        storage,
        files,
        range,
        SstTarget { backend, uid, scratch, options: sst },
        RESTORE_CHUNK,
    )
}

/// What a restore of keyed state read and where its time went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Restored {
    /// Bytes of the savepoint's files read.
    pub bytes: u64,
    pub entries: u64,
    /// Seconds spent waiting for bytes from storage (none had arrived yet).
    pub waiting_secs: f64,
    /// Seconds spent decoding entries and writing them into the SST file (finishing it too).
    pub writing_secs: f64,
    /// Seconds spent ingesting the SST file into RocksDB.
    pub ingest_secs: f64,
}

/// Where a restore writes: the SST file `scratch` (written with `options`), ingested into
/// operator `uid`'s state in `backend`.
struct SstTarget<'a> {
    backend: &'a StateBackend,
    uid: &'a str,
    scratch: &'a Path,
    options: &'a rocksdb::Options,
}

/// One ranged request of a restore.
struct Piece<'a> {
    file: &'a KeyedFile,
    start: u64,
    end: u64,
    /// The last piece of its file's range: no entry may run on past it.
    last: bool,
}

fn restore_keyed_in_chunks(
    storage: &dyn Storage,
    files: &[KeyedFile],
    range: (u16, u16),
    into: SstTarget<'_>,
    chunk_bytes: u64,
) -> Result<Restored, RuntimeError> {
    let mut files: Vec<&KeyedFile> = files.iter().collect();
    files.sort_by_key(|f| f.key_groups.0);
    let mut pieces = Vec::new();
    for f in files {
        f.check().map_err(RuntimeError::user)?;
        let Some((start, end)) = f.byte_range(range) else { continue };
        let mut at = start;
        while at < end {
            let to = at.saturating_add(chunk_bytes.max(1)).min(end);
            pieces.push(Piece { file: f, start: at, end: to, last: to == end });
            at = to;
        }
    }
    let mut done = Restored::default();
    if pieces.is_empty() {
        return Ok(done);
    }
    let mut writer = rocksdb::SstFileWriter::create(into.options);
    writer
        .open(into.scratch)
        .map_err(|e| RuntimeError::internal(format!("writing an SST file: {e}")))?;
    // Fetcher `i` reads pieces i, i + k, i + 2k, ... into a channel of its own, one piece
    // ahead; the pieces are taken in order, round the channels.
    let k = GETS_IN_FLIGHT.min(pieces.len());
    std::thread::scope(|scope| -> Result<(), RuntimeError> {
        let mut fetched = Vec::with_capacity(k);
        for i in 0..k {
            let (tx, rx) = crossbeam_channel::bounded::<Result<Vec<u8>, RuntimeError>>(1);
            fetched.push(rx);
            let pieces = &pieces;
            scope.spawn(move || {
                for p in pieces.iter().skip(i).step_by(k) {
                    let r = storage.get_range(&p.file.file, p.start, p.end);
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                }
            });
        }
        // Entries cross chunk boundaries: the part of one left at the end of a chunk waits
        // for the next.
        let mut carry: Vec<u8> = Vec::new();
        for (j, p) in pieces.iter().enumerate() {
            let damaged = |what: String| {
                RuntimeError::external(format!(
                    "{}: {what}: the savepoint is damaged",
                    storage.describe(&p.file.file)
                ))
            };
            let t = Instant::now();
            let chunk = fetched[j % k]
                .recv()
                .map_err(|_| RuntimeError::internal("a savepoint reader stopped early"))??;
            done.waiting_secs += t.elapsed().as_secs_f64();
            let t = Instant::now();
            if chunk.len() as u64 != p.end - p.start {
                return Err(damaged(format!(
                    "read {} bytes of {}..{}",
                    chunk.len(),
                    p.start,
                    p.end
                )));
            }
            done.bytes += chunk.len() as u64;
            let mut put = |k: &[u8], v: &[u8]| {
                done.entries += 1;
                writer
                    .put(k, v)
                    .map_err(|e| RuntimeError::internal(format!("writing an SST file: {e}")))
            };
            // The entry cut at the end of the last chunk is completed in `carry` with bytes
            // of this one, a few at a time (not the whole chunk copied after it); the bytes
            // that turn out to belong to the entries after it are read where they are.
            let mut from = 0;
            let mut step = 4 << 10;
            while !carry.is_empty() && from < chunk.len() {
                let take = step.min(chunk.len() - from);
                let before = carry.len();
                carry.extend_from_slice(&chunk[from..from + take]);
                from += take;
                let used = read_whole_entries(&carry, &mut put).map_err(&damaged)?;
                if used > 0 {
                    // What was carried is part of the first whole entry: all that is left
                    // over came from this chunk.
                    debug_assert!(used >= before);
                    from -= carry.len() - used;
                    carry.clear();
                }
                step *= 2;
            }
            let used = read_whole_entries(&chunk[from..], &mut put).map_err(&damaged)?;
            carry.extend_from_slice(&chunk[from + used..]);
            done.writing_secs += t.elapsed().as_secs_f64();
            if p.last && !carry.is_empty() {
                return Err(damaged(format!(
                    "{} bytes left over at the end of {}..{}",
                    carry.len(),
                    p.start,
                    p.end
                )));
            }
        }
        Ok(())
    })?;
    // RocksDB refuses to finish a file without entries (key groups that hold none).
    if done.entries > 0 {
        let t = Instant::now();
        writer.finish().map_err(|e| RuntimeError::internal(format!("writing an SST file: {e}")))?;
        done.writing_secs += t.elapsed().as_secs_f64();
        let t = Instant::now();
        into.backend.ingest(into.uid, into.scratch)?;
        done.ingest_secs = t.elapsed().as_secs_f64();
    }
    drop(writer);
    let _ = std::fs::remove_file(into.scratch);
    Ok(done)
}

/// Calls `f` with each whole entry at the start of `bytes`; returns how many bytes they take
/// (an entry cut off at the end is left for the caller).
fn read_whole_entries(
    bytes: &[u8],
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), RuntimeError>,
) -> Result<usize, String> {
    // A length no entry has: the file is damaged, rather than cut at a chunk's end.
    const TOO_LONG: u64 = 1 << 30;
    let mut at = 0;
    loop {
        let mut p = at;
        let mut part = || -> Result<Option<&[u8]>, String> {
            let n = match crate::wire::get_varint(bytes, &mut p) {
                Ok(n) if n >= TOO_LONG => return Err(format!("an entry of {n} bytes")),
                Ok(n) => n as usize,
                Err(None) => return Ok(None),
                Err(Some(e)) => return Err(e.to_string()),
            };
            let b = bytes.get(p..p + n);
            p += n;
            Ok(b)
        };
        let Some(k) = part()? else { return Ok(at) };
        let Some(v) = part()? else { return Ok(at) };
        f(k, v).map_err(|e| e.message)?;
        at = p;
    }
}

/// Loads into `backend` operator `uid`'s entries of key groups `range` from the RocksDB
/// instances of a checkpoint (`handles`, files in `storage`): each instance that holds any of
/// them is downloaded under `scratch`, its entries of `range` go into one SST file, which is
/// ingested. Returns the bytes downloaded.
pub fn restore_keyed_from_instances(
    storage: &dyn Storage,
    handles: &[crate::snapshot::StateHandle],
    range: (u16, u16),
    backend: &StateBackend,
    uid: &str,
    scratch: &Path,
) -> Result<u64, RuntimeError> {
    let mut handles: Vec<_> =
        handles.iter().filter(|h| h.key_groups.0 <= range.1 && h.key_groups.1 >= range.0).collect();
    handles.sort_by_key(|h| h.key_groups.0);
    let opts = sst_options();
    let mut writer = rocksdb::SstFileWriter::create(&opts);
    let sst_path = scratch.join("restore.sst");
    let sst = |e: rocksdb::Error| RuntimeError::internal(format!("writing an SST file: {e}"));
    let (mut open, mut read) = (false, 0u64);
    for (k, h) in handles.into_iter().enumerate() {
        let dir = scratch.join(format!("instance-{k}"));
        let _ = std::fs::remove_dir_all(&dir);
        crate::snapshot::download(storage, h, &dir)?;
        read += h.size();
        StateBackend::for_each_in_checkpoint(&dir, uid, |key, v| {
            let g = u16::from_be_bytes([key[0], key[1]]);
            if g < range.0 || g > range.1 {
                return Ok(());
            }
            if !open {
                writer.open(&sst_path).map_err(sst)?;
                open = true;
            }
            writer.put(key, v).map_err(sst)
        })?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    if open {
        writer.finish().map_err(sst)?;
        backend.ingest(uid, &sst_path)?;
        let _ = std::fs::remove_file(&sst_path);
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keygroup::KeyGroupRange;
    use proptest::prelude::*;

    /// Entries of key groups `kgs`: `n` keys per group, keys sorted within a group.
    fn entries(kgs: (u16, u16), per: u16) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        for g in kgs.0..=kgs.1 {
            // Some groups stay empty.
            for k in 0..(per + g) % 4 {
                let mut key = g.to_be_bytes().to_vec();
                key.extend_from_slice(format!("k{k:03}").as_bytes());
                out.push((key, format!("v{g}-{k}").into_bytes()));
            }
        }
        out
    }

    fn file_of(kgs: (u16, u16), es: &[(Vec<u8>, Vec<u8>)]) -> (Vec<u8>, KeyedFile) {
        let mut bytes = Vec::new();
        let (offsets, n) = write_entries(&mut bytes, kgs, &mut |f| {
            for (k, v) in es {
                f(k, v)?;
            }
            Ok(())
        })
        .unwrap();
        (bytes, KeyedFile { file: "f".into(), key_groups: kgs, offsets, entries: n })
    }

    proptest! {
        #[test]
        fn restored_key_groups_are_exactly_the_owned_ones(
            max_p in 1u32..300, old_p in 1u32..40, new_p in 1u32..40, per in 0u16..5
        ) {
            let old_p = old_p.min(max_p);
            let new_p = new_p.min(max_p);
            let mut old = Vec::new();
            let mut all = Vec::new();
            for s in 0..old_p {
                let r = KeyGroupRange::of_subtask(max_p, old_p, s);
                let es = entries((r.start, r.end), per);
                all.extend(es.clone());
                old.push(file_of((r.start, r.end), &es));
            }
            let mut restored = Vec::new();
            for s in 0..new_p {
                let r = KeyGroupRange::of_subtask(max_p, new_p, s);
                for (bytes, f) in &old {
                    prop_assert!(f.check().is_ok());
                    let Some((a, b)) = f.byte_range((r.start, r.end)) else { continue };
                    read_entries(&bytes[a as usize..b as usize], |k, v| {
                        let g = u16::from_be_bytes([k[0], k[1]]);
                        assert!(g >= r.start && g <= r.end, "key group {g} outside {r:?}");
                        restored.push((k.to_vec(), v.to_vec()));
                        Ok(())
                    }).unwrap();
                }
            }
            // Every entry exactly once.
            prop_assert_eq!(restored, all);
        }

        #[test]
        fn the_key_group_index_round_trips(first in 0u16..100, len in 0u16..50, per in 0u16..5) {
            let kgs = (first, first + len);
            let es = entries(kgs, per);
            let (bytes, f) = file_of(kgs, &es);
            let json = serde_json::to_string(&f).unwrap();
            let back: KeyedFile = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(&back, &f);
            prop_assert_eq!(*f.offsets.last().unwrap(), bytes.len() as u64);
            prop_assert_eq!(f.entries, es.len() as u64);
            // Each key group's range holds exactly its entries.
            for g in kgs.0..=kgs.1 {
                let mut n = 0;
                if let Some((a, b)) = f.byte_range((g, g)) {
                    read_entries(&bytes[a as usize..b as usize], |k, _| {
                        assert_eq!(u16::from_be_bytes([k[0], k[1]]), g);
                        n += 1;
                        Ok(())
                    }).unwrap();
                }
                prop_assert_eq!(n, es.iter().filter(|(k, _)| u16::from_be_bytes([k[0], k[1]]) == g).count());
            }
        }

        #[test]
        fn damaged_bytes_are_an_error_not_a_panic(b in prop::collection::vec(any::<u8>(), 0..100)) {
            let _ = read_entries(&b, |_, _| Ok(()));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Through RocksDB, entries of any size (some far larger than a chunk) read in chunks
        /// of any size, several on their way: the restored instance holds exactly the entries
        /// of its key groups.
        #[test]
        fn chunked_restores_hold_exactly_their_key_groups(
            sizes in prop::collection::vec((0u16..8, 0usize..20_000), 0..60),
            chunk in 1u64..30_000,
            range in (0u16..8, 0u16..8),
        ) {
            let range = (range.0.min(range.1), range.0.max(range.1));
            let mut es: Vec<(Vec<u8>, Vec<u8>)> = sizes
                .iter()
                .enumerate()
                .map(|(i, (g, n))| {
                    let mut k = g.to_be_bytes().to_vec();
                    k.extend_from_slice(format!("k{i:03}").as_bytes());
                    (k, vec![i as u8; *n])
                })
                .collect();
            es.sort();
            let tmp = tempfile::tempdir().unwrap();
            let storage = crate::storage::LocalStorage::new(&tmp.path().join("sp"));
            let (bytes, mut f) = file_of((0, 7), &es);
            storage.put("counts-0", &bytes).unwrap();
            f.file = "counts-0".into();
            let uid = "counts".to_string();
            let b = StateBackend::open(&tmp.path().join("db"), std::slice::from_ref(&uid)).unwrap();
            let into = SstTarget {
                backend: &b,
                uid: &uid,
                scratch: &tmp.path().join("sst"),
                options: &sst_options(),
            };
            let done = restore_keyed_in_chunks(&storage, &[f.clone()], range, into, chunk).unwrap();
            let want: Vec<_> = es
                .iter()
                .filter(|(k, _)| (range.0..=range.1).contains(&u16::from_be_bytes([k[0], k[1]])))
                .collect();
            let got = b.scan(&uid).unwrap();
            prop_assert_eq!(got.len(), want.len());
            for ((g, k, v), (wk, wv)) in got.iter().zip(&want) {
                prop_assert_eq!(&g.to_be_bytes()[..], &wk[..2]);
                prop_assert_eq!(&k[..], &wk[2..]);
                prop_assert_eq!(v, wv);
            }
            let (a, z) = f.byte_range(range).unwrap_or((0, 0));
            prop_assert_eq!(done.bytes, z - a, "only the key groups' bytes are read");
            prop_assert_eq!(done.entries, want.len() as u64);
        }
    }

    #[test]
    fn a_bad_index_is_refused() {
        let (_, mut f) = file_of((3, 6), &entries((3, 6), 2));
        assert!(f.check().is_ok());
        f.offsets.pop();
        assert!(f.check().unwrap_err().contains("does not fit"));
    }

    /// Through RocksDB: state written by two subtasks, saved from their checkpoints, restored
    /// by three into fresh instances; each holds exactly its key groups' values.
    #[test]
    fn rocksdb_state_rescales_from_two_subtasks_to_three() {
        let tmp = tempfile::tempdir().unwrap();
        let storage = crate::storage::LocalStorage::new(&tmp.path().join("sp"));
        let uid = "counts".to_string();
        let max_p = 128;
        let mut files = Vec::new();
        let mut expected = Vec::new();
        for s in 0..2u32 {
            let r = KeyGroupRange::of_subtask(max_p, 2, s);
            let b = StateBackend::open(
                &tmp.path().join(format!("old-{s}")),
                std::slice::from_ref(&uid),
            )
            .unwrap();
            let mut st = b.value_state(&uid, max_p, 100);
            for k in 0..500u32 {
                let key = format!("w{k}");
                let g = crate::keygroup::key_group_of(key.as_bytes(), max_p);
                if g >= r.start && g <= r.end {
                    st.update(key.as_bytes(), |_| crate::state::Num::Int(i64::from(k))).unwrap();
                }
            }
            st.write_back().unwrap();
            expected.extend(b.scan(&uid).unwrap());
            let ck = tmp.path().join(format!("ck-{s}"));
            b.checkpoint(&ck).unwrap();
            files.push(
                save_keyed(&ck, &uid, (r.start, r.end), &storage, &format!("counts-{s}")).unwrap(),
            );
        }
        expected.sort();
        let total: u64 =
            files.iter().map(|f| f.offsets.last().unwrap() - KEYED_MAGIC.len() as u64).sum();
        // Entries cross the boundaries of small chunks.
        for chunk in [7, 64, RESTORE_CHUNK] {
            let mut restored = Vec::new();
            let mut read = 0;
            for s in 0..3u32 {
                let r = KeyGroupRange::of_subtask(max_p, 3, s);
                let b = StateBackend::open(
                    &tmp.path().join(format!("new-{chunk}-{s}")),
                    std::slice::from_ref(&uid),
                )
                .unwrap();
                read += restore_keyed_in_chunks(
                    &storage,
                    &files,
                    (r.start, r.end),
                    SstTarget {
                        backend: &b,
                        uid: &uid,
                        scratch: &tmp.path().join("sst"),
                        options: &sst_options(),
                    },
                    chunk,
                )
                .unwrap()
                .bytes;
                let got = b.scan(&uid).unwrap();
                assert!(got.iter().all(|(g, _, _)| *g >= r.start && *g <= r.end));
                restored.extend(got);
            }
            restored.sort();
            assert_eq!(restored, expected, "chunks of {chunk} bytes");
            assert_eq!(read, total, "every byte read once");
        }
        // A read that fails while others are on their way is the restore's error (no hang).
        let faulty = crate::storage::Faulty::new(
            crate::storage::LocalStorage::new(&tmp.path().join("sp")),
            crate::storage::Faults { fail_every: 5, ..Default::default() },
        );
        let b =
            StateBackend::open(&tmp.path().join("failing"), std::slice::from_ref(&uid)).unwrap();
        let e = restore_keyed_in_chunks(
            &faulty,
            &files,
            (0, 127),
            SstTarget {
                backend: &b,
                uid: &uid,
                scratch: &tmp.path().join("sst"),
                options: &sst_options(),
            },
            64,
        )
        .unwrap_err();
        assert!(e.message.contains("injected failure"), "{e}");
        assert!(b.scan(&uid).unwrap().is_empty(), "nothing ingested");
        // A file cut short (or overwritten) is an error naming it, not a panic.
        let path = tmp.path().join("sp").join("counts-0");
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::write(&path, vec![0xff; len as usize]).unwrap();
        let b =
            StateBackend::open(&tmp.path().join("damaged"), std::slice::from_ref(&uid)).unwrap();
        let e = restore_keyed_in_chunks(
            &storage,
            &files,
            (0, 127),
            SstTarget {
                backend: &b,
                uid: &uid,
                scratch: &tmp.path().join("sst"),
                options: &sst_options(),
            },
            64,
        )
        .unwrap_err();
        assert!(e.message.contains("counts-0") && e.message.contains("damaged"), "{e}");
    }
}
