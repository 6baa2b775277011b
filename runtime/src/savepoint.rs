//! Keyed state in savepoints: self-contained files, sorted by key group, that a job restored
//! at any parallelism reads only its own part of.
//!
//! The keyed state of one operator subtask is one file. Savepoints are written in format 2:
//!
//! ```text
//!   WEIR-KEYED 2\n
//!   for each key group that holds entries, in order: an SST file of its entries
//! ```
//!
//! Each key group's SST file is written with the options of the state's column family (LZ4,
//! bloom filter), so a restoring subtask copies the bytes of its key groups into files as they
//! arrive and ingests them into RocksDB as they are: it decodes and encodes no entry. The
//! savepoint pays for building the tables instead, once, while its parts go up.
//!
//! Format 1, which this version still restores, holds the entries themselves:
//!
//! ```text
//!   WEIR-KEYED 1\n
//!   entries, in key order: varint key length, key, varint value length, value
//! ```
//!
//! In both, a key is the stored key (its key group as 2 big-endian bytes, then the key's
//! bytes). The savepoint's metadata keeps, beside the file's name and format, the offset where
//! each of its key groups starts, and in format 2 the XXH3 checksum of each key group's bytes
//! ([`KeyedFile`]). A subtask that owns key groups `a..=b` after a restore reads from each file
//! that holds any of them the one byte range `offset(a)..offset(b + 1)` (ranged GETs on S3).

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;
use crate::exchange::wire::put_varint;
use crate::state::{LocalSnapshot, StateBackend, StateBackendKind, StateError, sst_options};
use crate::storage::Storage;

/// The first bytes of a keyed state file of format 1 (entries).
pub const KEYED_MAGIC: &[u8] = b"WEIR-KEYED 1\n";
/// The first bytes of a keyed state file of format 2 (an SST file per key group).
pub const KEYED_MAGIC_SST: &[u8] = b"WEIR-KEYED 2\n";

/// How a keyed state file holds its entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum KeyedFormat {
    /// Format 1: the entries, length-prefixed (the metadata of savepoints written before
    /// format 2 names no format).
    #[default]
    Entries,
    /// Format 2: an SST file per key group, ingested as it is.
    Sst,
}

impl KeyedFormat {
    fn magic(self) -> &'static [u8] {
        match self {
            KeyedFormat::Entries => KEYED_MAGIC,
            KeyedFormat::Sst => KEYED_MAGIC_SST,
        }
    }
}

/// A keyed state file of a savepoint and its key-group index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyedFile {
    /// The file, relative to the savepoint's directory.
    pub file: String,
    #[serde(default)]
    pub format: KeyedFormat,
    /// The key groups it holds, first and last.
    pub key_groups: (u16, u16),
    /// Where each key group starts (`offsets[g - first]`), then the file's length.
    pub offsets: Vec<u64>,
    /// Format 2: the XXH3 (64 bits) of each key group's bytes (0 for an empty one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checksums: Vec<u64>,
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
        // Format 1 has them when a heap checkpoint wrote it (savepoints of format 1 did not).
        let checksums = match self.format {
            KeyedFormat::Entries if self.checksums.is_empty() => 0,
            _ => usize::from(b - a) + 1,
        };
        if self.checksums.len() != checksums {
            return Err(format!(
                "{}: {} key-group checksums for {checksums} key groups",
                self.file,
                self.checksums.len()
            ));
        }
        if self.offsets[0] != self.format.magic().len() as u64
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

/// The index of a keyed state file of format 2, as [`write_sst_groups`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SstGroups {
    /// Where each key group starts, then the file's length.
    pub offsets: Vec<u64>,
    /// The XXH3 of each key group's bytes (0 for an empty one).
    pub checksums: Vec<u64>,
    pub entries: u64,
}

/// Writes entries (in key order) of key groups `key_groups` as a keyed state file of format 2
/// into `out`: each key group's entries as an SST file (built at `scratch`, then copied out).
pub fn write_sst_groups<W: Write>(
    out: W,
    key_groups: (u16, u16),
    entries: &mut EntrySource<'_>,
    scratch: &Path,
) -> Result<SstGroups, RuntimeError> {
    let options = sst_options();
    let mut plain = sst_options();
    plain.set_compression_type(rocksdb::DBCompressionType::None);
    let mut w = GroupWriter {
        out,
        scratch,
        options: &options,
        plain: &plain,
        compress: None,
        raw: (0, 0),
        first: key_groups.0,
        at: KEYED_MAGIC_SST.len() as u64,
        open: None,
        index: SstGroups {
            offsets: Vec::with_capacity(usize::from(key_groups.1 - key_groups.0) + 2),
            checksums: Vec::with_capacity(usize::from(key_groups.1 - key_groups.0) + 1),
            entries: 0,
        },
        buf: Vec::new(),
    };
    w.out.write_all(KEYED_MAGIC_SST).map_err(write_error)?;
    let result = entries(&mut |k: &[u8], v: &[u8]| {
        if k.len() < 2 {
            return Err(RuntimeError::internal("a stored key without its key group"));
        }
        let g = u16::from_be_bytes([k[0], k[1]]);
        if g < key_groups.0 || g > key_groups.1 {
            return Err(RuntimeError::internal(format!(
                "key group {g} in the state of key groups {}..={}",
                key_groups.0, key_groups.1
            )));
        }
        w.put(g, k, v)
    });
    let finished = result.and_then(|()| w.finish_group());
    let _ = std::fs::remove_file(scratch);
    finished?;
    // The key groups after the last with entries are empty; the file's length ends the index.
    while w.index.checksums.len() <= usize::from(key_groups.1 - key_groups.0) {
        w.index.offsets.push(w.at);
        w.index.checksums.push(0);
    }
    w.index.offsets.push(w.at);
    w.out.flush().map_err(write_error)?;
    Ok(w.index)
}

fn write_error(e: std::io::Error) -> RuntimeError {
    RuntimeError::internal(format!("writing keyed state: {e}"))
}

fn sst_error(e: rocksdb::Error) -> RuntimeError {
    RuntimeError::internal(format!("writing an SST file: {e}"))
}

/// Bytes of entries in a key group enough to judge from its SST file whether the state
/// compresses.
const COMPRESSION_SAMPLE: u64 = 1 << 20;

/// Builds the SST file of one key group at a time and appends it to the keyed state file.
///
/// The tables are compressed as the column family's are (LZ4), unless the state does not
/// compress: the first key group of [`COMPRESSION_SAMPLE`] bytes or more decides, and when
/// its SST file is not smaller than 85% of what its entries take uncompressed (their bytes
/// and about 12 bytes of each entry's overhead in a table), the later key groups are written
/// without compression. LZ4 over state that does not compress (random keys, hashes,
/// encrypted or already compressed values) costs about 40% of building a table and saves
/// nothing, in the savepoint and in the instance that ingests it.
struct GroupWriter<'a, W> {
    out: W,
    scratch: &'a Path,
    options: &'a rocksdb::Options,
    /// [`Self::options`] without compression.
    plain: &'a rocksdb::Options,
    /// Whether the state compresses, once a key group has shown it.
    compress: Option<bool>,
    /// Bytes and entries of the open key group.
    raw: (u64, u64),
    first: u16,
    /// The keyed state file's length so far.
    at: u64,
    /// The key group being written, and its SST file.
    open: Option<(u16, rocksdb::SstFileWriter<'a>)>,
    index: SstGroups,
    buf: Vec<u8>,
}

impl<W: Write> GroupWriter<'_, W> {
    fn put(&mut self, g: u16, k: &[u8], v: &[u8]) -> Result<(), RuntimeError> {
        if self.open.as_ref().is_none_or(|(at, _)| *at != g) {
            self.finish_group()?;
            if self.index.offsets.len() > usize::from(g - self.first) {
                return Err(RuntimeError::internal(format!(
                    "key group {g} after key group {}: keys out of order",
                    self.first as usize + self.index.offsets.len() - 1
                )));
            }
            // Every key group up to this one starts here (empty ones too).
            while self.index.offsets.len() <= usize::from(g - self.first) {
                self.index.offsets.push(self.at);
                self.index.checksums.push(0);
            }
            let options = if self.compress == Some(false) { self.plain } else { self.options };
            let sst = rocksdb::SstFileWriter::create(options);
            sst.open(self.scratch).map_err(sst_error)?;
            self.open = Some((g, sst));
            self.raw = (0, 0);
        }
        let (_, sst) = self.open.as_mut().expect("opened above");
        sst.put(k, v).map_err(sst_error)?;
        self.raw.0 += (k.len() + v.len()) as u64;
        self.raw.1 += 1;
        self.index.entries += 1;
        Ok(())
    }

    /// Finishes the open key group's SST file and appends it, with its checksum.
    fn finish_group(&mut self) -> Result<(), RuntimeError> {
        let Some((g, mut sst)) = self.open.take() else { return Ok(()) };
        sst.finish().map_err(sst_error)?;
        drop(sst);
        let io = |e: std::io::Error| {
            RuntimeError::internal(format!("reading {}: {e}", self.scratch.display()))
        };
        let mut file = std::fs::File::open(self.scratch).map_err(io)?;
        self.buf.resize(1 << 20, 0);
        let mut hash = xxhash_rust::xxh3::Xxh3Default::new();
        loop {
            let n = std::io::Read::read(&mut file, &mut self.buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hash.update(&self.buf[..n]);
            self.out.write_all(&self.buf[..n]).map_err(write_error)?;
            self.at += n as u64;
        }
        self.index.checksums[usize::from(g - self.first)] = hash.digest();
        let (bytes, entries) = self.raw;
        if self.compress.is_none() && bytes >= COMPRESSION_SAMPLE {
            let size = self.at - self.index.offsets[usize::from(g - self.first)];
            self.compress = Some(size * 100 < (bytes + 12 * entries) * 85);
        }
        Ok(())
    }
}

/// Writes operator `uid`'s state from the local snapshot `checkpoint` (key groups
/// `key_groups`) to `storage` as `key`, in format 2, streamed: on S3 its parts go up while
/// the snapshot is read and the next key group's SST file is built (no local copy of the
/// file). Either backend's snapshot gives the same file.
pub fn save_keyed(
    checkpoint: &LocalSnapshot,
    uid: &str,
    key_groups: (u16, u16),
    storage: &dyn Storage,
    key: &str,
) -> Result<KeyedFile, RuntimeError> {
    save_keyed_as(checkpoint, uid, key_groups, storage, key, KeyedFormat::Sst)
}

/// [`save_keyed`] in the given format (format 1 for comparisons and for tests that it still
/// restores).
pub fn save_keyed_as(
    checkpoint: &LocalSnapshot,
    uid: &str,
    key_groups: (u16, u16),
    storage: &dyn Storage,
    key: &str,
    format: KeyedFormat,
) -> Result<KeyedFile, RuntimeError> {
    let mut index = None;
    // One key group's SST file at a time, beside the checkpoint.
    let scratch = checkpoint.scratch();
    storage.put_streamed(key, &mut |out| {
        let mut source = |f: &mut EntryVisitor<'_>| checkpoint.for_each(uid, f);
        index = Some(match format {
            KeyedFormat::Entries => {
                let (offsets, entries) = write_entries(out, key_groups, &mut source)?;
                SstGroups { offsets, checksums: Vec::new(), entries }
            }
            KeyedFormat::Sst => write_sst_groups(out, key_groups, &mut source, &scratch)?,
        });
        Ok(())
    })?;
    let SstGroups { offsets, checksums, entries } = index
        .ok_or_else(|| RuntimeError::internal("a keyed state file written without an index"))?;
    Ok(KeyedFile { file: key.to_string(), format, key_groups, offsets, checksums, entries })
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
/// while earlier ones are written out). Format 2: each key group's SST file is written under
/// the directory `scratch` as its bytes arrive, checked against its checksum, and all are
/// ingested at once. Format 1: the entries are written into one SST file, which is ingested.
pub fn restore_keyed(
    storage: &dyn Storage,
    files: &[KeyedFile],
    range: (u16, u16),
    backend: &StateBackend,
    uid: &str,
    scratch: &Path,
) -> Result<Restored, RuntimeError> {
    restore_keyed_in_chunks(storage, files, range, backend, uid, scratch, RESTORE_CHUNK)
}

/// What a restore of keyed state read and where its time went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Restored {
    /// Bytes of the savepoint's files read.
    pub bytes: u64,
    /// Entries decoded (format 1; format 2 decodes none).
    pub entries: u64,
    /// SST files ingested.
    pub files: u64,
    /// Seconds spent waiting for bytes from storage (none had arrived yet).
    pub waiting_secs: f64,
    /// Seconds spent writing what arrived into SST files: format 2 copies the bytes (and checks
    /// them), format 1 decodes the entries and builds a table of them (finishing it too).
    pub writing_secs: f64,
    /// Seconds spent ingesting the SST files into RocksDB.
    pub ingest_secs: f64,
}

impl std::ops::AddAssign for Restored {
    fn add_assign(&mut self, o: Restored) {
        self.bytes += o.bytes;
        self.entries += o.entries;
        self.files += o.files;
        self.waiting_secs += o.waiting_secs;
        self.writing_secs += o.writing_secs;
        self.ingest_secs += o.ingest_secs;
    }
}

fn restore_keyed_in_chunks(
    storage: &dyn Storage,
    files: &[KeyedFile],
    range: (u16, u16),
    backend: &StateBackend,
    uid: &str,
    scratch: &Path,
    chunk_bytes: u64,
) -> Result<Restored, RuntimeError> {
    std::fs::create_dir_all(scratch)
        .map_err(|e| RuntimeError::internal(format!("creating {}: {e}", scratch.display())))?;
    // A savepoint's files share a format; format 1's key groups are other than format 2's.
    let mut files: Vec<&KeyedFile> = files.iter().collect();
    files.sort_by_key(|f| f.key_groups.0);
    let (ssts, entries): (Vec<&KeyedFile>, Vec<&KeyedFile>) =
        files.into_iter().partition(|f| f.format == KeyedFormat::Sst);
    let mut done = Restored::default();
    if !entries.is_empty() && backend.kind() == StateBackendKind::Heap {
        // The heap takes the entries as they are decoded.
        let pieces = pieces(&entries, range, chunk_bytes)?;
        let mut put = |k: &[u8], v: &[u8]| {
            let g = u16::from_be_bytes([k[0], k[1]]);
            if g < range.0 || g > range.1 {
                return Err(RuntimeError::damaged(format!(
                    "an entry of key group {g} among key groups {}..={}: the keyed state is damaged",
                    range.0, range.1
                )));
            }
            backend.put(uid, k, v).map_err(RuntimeError::from)
        };
        done += read_pieces(storage, &pieces, &mut put)?;
    } else if !entries.is_empty() {
        let sst = scratch.join("entries.sst");
        let target = SstTarget { backend, uid, scratch: &sst, options: &sst_options() };
        done += restore_entries_in_chunks(storage, &entries, range, target, chunk_bytes)?;
    }
    if !ssts.is_empty() {
        done += restore_sst_groups(storage, &ssts, range, backend, uid, scratch, chunk_bytes)?;
    }
    Ok(done)
}

/// Where a restore of format 1 writes: the SST file `scratch` (written with `options`),
/// ingested into operator `uid`'s state in `backend`.
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

/// The ranged requests that read key groups `range` from `files` (in key-group order).
fn pieces<'a>(
    files: &[&'a KeyedFile],
    range: (u16, u16),
    chunk_bytes: u64,
) -> Result<Vec<Piece<'a>>, RuntimeError> {
    let mut pieces = Vec::new();
    for &f in files {
        f.check().map_err(RuntimeError::user)?;
        let Some((start, end)) = f.byte_range(range) else { continue };
        let mut at = start;
        while at < end {
            let to = at.saturating_add(chunk_bytes.max(1)).min(end);
            pieces.push(Piece { file: f, start: at, end: to, last: to == end });
            at = to;
        }
    }
    Ok(pieces)
}

fn damaged(storage: &dyn Storage, file: &KeyedFile, what: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::damaged(format!(
        "{}: {what}: the savepoint is damaged",
        storage.describe(&file.file)
    ))
}

/// Reads `pieces` with [`GETS_IN_FLIGHT`] requests on their way and gives each to `take` in
/// order; adds the time spent waiting for one to `waiting`.
fn fetch_in_order(
    storage: &dyn Storage,
    pieces: &[Piece<'_>],
    waiting: &mut f64,
    mut take: impl FnMut(&Piece<'_>, &[u8]) -> Result<(), RuntimeError>,
) -> Result<(), RuntimeError> {
    if pieces.is_empty() {
        return Ok(());
    }
    // Fetcher `i` reads pieces i, i + k, i + 2k, ... into a channel of its own, one piece
    // ahead; the pieces are taken in order, round the channels.
    let k = GETS_IN_FLIGHT.min(pieces.len());
    std::thread::scope(|scope| -> Result<(), RuntimeError> {
        let mut fetched = Vec::with_capacity(k);
        for i in 0..k {
            let (tx, rx) = crossbeam_channel::bounded::<Result<Vec<u8>, RuntimeError>>(1);
            fetched.push(rx);
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
        for (j, p) in pieces.iter().enumerate() {
            let t = Instant::now();
            let chunk = fetched[j % k]
                .recv()
                .map_err(|_| RuntimeError::internal("a savepoint reader stopped early"))??;
            *waiting += t.elapsed().as_secs_f64();
            if chunk.len() as u64 != p.end - p.start {
                let what = format!("read {} bytes of {}..{}", chunk.len(), p.start, p.end);
                return Err(damaged(storage, p.file, what));
            }
            take(p, &chunk)?;
        }
        Ok(())
    })
}

/// Format 2: the key groups' SST files of `files` (in key-group order), written under
/// `scratch` as their bytes arrive, checked and ingested at once.
fn restore_sst_groups(
    storage: &dyn Storage,
    files: &[&KeyedFile],
    range: (u16, u16),
    backend: &StateBackend,
    uid: &str,
    scratch: &Path,
    chunk_bytes: u64,
) -> Result<Restored, RuntimeError> {
    let pieces = pieces(files, range, chunk_bytes)?;
    // The key groups with entries, in the order of the pieces: (file, group, start, end).
    let mut groups = Vec::new();
    for &f in files {
        let lo = range.0.max(f.key_groups.0);
        let hi = range.1.min(f.key_groups.1);
        for g in lo..=hi {
            let i = usize::from(g - f.key_groups.0);
            let (start, end) = (f.offsets[i], f.offsets[i + 1]);
            if end > start {
                groups.push((f, g, start, end));
            }
        }
    }
    let mut done = Restored::default();
    let mut paths = Vec::with_capacity(groups.len());
    let mut next = 0;
    let mut open: Option<(std::fs::File, xxhash_rust::xxh3::Xxh3Default)> = None;
    let path_of = |i: usize, g: u16| scratch.join(format!("{i:06}-{g}.sst"));
    let io = |p: &Path, e: std::io::Error| {
        RuntimeError::internal(format!("writing {}: {e}", p.display()))
    };
    let result = fetch_in_order(storage, &pieces, &mut done.waiting_secs, |p, chunk| {
        let t = Instant::now();
        done.bytes += chunk.len() as u64;
        let mut at = p.start;
        while at < p.end {
            let Some(&(f, g, start, end)) = groups.get(next) else {
                return Err(RuntimeError::internal("restore pieces past the key groups"));
            };
            if !std::ptr::eq(f, p.file) || at < start || at >= end {
                return Err(RuntimeError::internal("restore pieces out of key-group order"));
            }
            let path = path_of(next, g);
            let (file, hash) = match &mut open {
                Some(o) => o,
                None => {
                    let file = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
                    open.insert((file, xxhash_rust::xxh3::Xxh3Default::new()))
                }
            };
            let to = end.min(p.end);
            let bytes = &chunk[(at - p.start) as usize..(to - p.start) as usize];
            hash.update(bytes);
            std::io::Write::write_all(file, bytes).map_err(|e| io(&path, e))?;
            at = to;
            if to == end {
                let (_, hash) = open.take().expect("opened above");
                let want = f.checksums[usize::from(g - f.key_groups.0)];
                if hash.digest() != want {
                    return Err(damaged(storage, f, format!("key group {g} fails its checksum")));
                }
                paths.push(path);
                next += 1;
            }
        }
        done.writing_secs += t.elapsed().as_secs_f64();
        Ok(())
    });
    let result = result.and_then(|()| {
        if next != groups.len() {
            return Err(RuntimeError::internal("a restore ended before its last key group"));
        }
        if paths.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        backend.ingest_files(uid, &paths).map_err(|e| {
            RuntimeError::external(format!(
                "ingesting the key groups {}..={} of {}: {e}",
                range.0,
                range.1,
                files_named(storage, &groups)
            ))
        })?;
        done.ingest_secs = t.elapsed().as_secs_f64();
        done.files = paths.len() as u64;
        Ok(())
    });
    // Ingested files were moved into the instance; the rest go (the one open too).
    for (i, &(_, g, ..)) in groups.iter().enumerate().take(next + 1) {
        let _ = std::fs::remove_file(path_of(i, g));
    }
    result.map(|()| done)
}

/// The savepoint files `groups` come from, for messages.
fn files_named(storage: &dyn Storage, groups: &[(&KeyedFile, u16, u64, u64)]) -> String {
    let mut names: Vec<String> = groups.iter().map(|(f, ..)| storage.describe(&f.file)).collect();
    names.dedup();
    names.join(", ")
}

/// Format 1: the entries, decoded and written into one SST file, which is ingested.
fn restore_entries_in_chunks(
    storage: &dyn Storage,
    files: &[&KeyedFile],
    range: (u16, u16),
    into: SstTarget<'_>,
    chunk_bytes: u64,
) -> Result<Restored, RuntimeError> {
    let pieces = pieces(files, range, chunk_bytes)?;
    let mut done = Restored::default();
    if pieces.is_empty() {
        return Ok(done);
    }
    let mut writer = rocksdb::SstFileWriter::create(into.options);
    let result = writer.open(into.scratch).map_err(sst_error).and_then(|()| {
        let mut put = |k: &[u8], v: &[u8]| writer.put(k, v).map_err(sst_error);
        read_pieces(storage, &pieces, &mut put)
    });
    let result = result.and_then(|r| {
        done = r;
        // RocksDB refuses to finish a file without entries (key groups that hold none).
        if done.entries > 0 {
            let t = Instant::now();
            writer.finish().map_err(sst_error)?;
            done.writing_secs += t.elapsed().as_secs_f64();
            let t = Instant::now();
            into.backend.ingest(into.uid, into.scratch)?;
            done.ingest_secs = t.elapsed().as_secs_f64();
            done.files = 1;
        }
        Ok(())
    });
    drop(writer);
    let _ = std::fs::remove_file(into.scratch);
    result.map(|()| done)
}

/// Format 1: decodes the entries of `pieces` and gives each to `put`, checking each key
/// group's bytes against its checksum first where the file has them (heap checkpoints).
fn read_pieces(
    storage: &dyn Storage,
    pieces: &[Piece<'_>],
    put: &mut EntryVisitor<'_>,
) -> Result<Restored, RuntimeError> {
    let mut done = Restored::default();
    // Entries cross chunk boundaries: the part of one left at the end of a chunk waits for the
    // next.
    let mut carry: Vec<u8> = Vec::new();
    let mut check = GroupCheck::default();
    let mut waiting = 0.0;
    fetch_in_order(storage, pieces, &mut waiting, |p, chunk| {
        let t = Instant::now();
        let damaged = |what: String| damaged(storage, p.file, what);
        check.feed(p, chunk).map_err(&damaged)?;
        done.bytes += chunk.len() as u64;
        let mut put = |k: &[u8], v: &[u8]| {
            done.entries += 1;
            put(k, v)
        };
        // The entry cut at the end of the last chunk is completed in `carry` with bytes of
        // this one, a few at a time (not the whole chunk copied after it); the bytes that turn
        // out to belong to the entries after it are read where they are.
        let mut from = 0;
        let mut step = 4 << 10;
        while !carry.is_empty() && from < chunk.len() {
            let take = step.min(chunk.len() - from);
            let before = carry.len();
            carry.extend_from_slice(&chunk[from..from + take]);
            from += take;
            let used = read_whole_entries(&carry, &mut put).map_err(&damaged)?;
            if used > 0 {
                // What was carried is part of the first whole entry: all that is left over
                // came from this chunk.
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
        Ok(())
    })?;
    done.waiting_secs = waiting;
    Ok(done)
}

/// Checks the bytes of each key group of a keyed state file of format 1 against its
/// checksum as they arrive, piece after piece (files without checksums pass).
#[derive(Default)]
struct GroupCheck {
    /// The file and key group (index in it) being hashed, and the hash so far.
    at: Option<(*const KeyedFile, usize, xxhash_rust::xxh3::Xxh3Default)>,
}

impl GroupCheck {
    fn feed(&mut self, p: &Piece<'_>, chunk: &[u8]) -> Result<(), String> {
        let f = p.file;
        if f.checksums.is_empty() {
            return Ok(());
        }
        let mut at = p.start;
        while at < p.end {
            // The key group holding `at`: the one being hashed, or the next with bytes.
            let (i, hash) = match &mut self.at {
                Some((file, i, hash)) if std::ptr::eq(*file, f) && f.offsets[*i + 1] > at => {
                    (*i, hash)
                }
                _ => {
                    let i = f.offsets.windows(2).position(|w| w[0] <= at && at < w[1]);
                    let Some(i) = i else { return Err(format!("byte {at} is in no key group")) };
                    if f.offsets[i] != at {
                        return Err(format!("a read from byte {at}, within key group {i}"));
                    }
                    let (_, _, hash) =
                        self.at.insert((f, i, xxhash_rust::xxh3::Xxh3Default::new()));
                    (i, hash)
                }
            };
            let end = f.offsets[i + 1].min(p.end);
            hash.update(&chunk[(at - p.start) as usize..(end - p.start) as usize]);
            if end == f.offsets[i + 1] {
                let g = usize::from(f.key_groups.0) + i;
                if hash.digest() != f.checksums[i] {
                    return Err(format!("key group {g} fails its checksum"));
                }
                self.at = None;
            }
            at = end;
        }
        Ok(())
    }
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
            let n = match crate::exchange::wire::get_varint(bytes, &mut p) {
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
        crate::state::rocksdb::for_each_in_checkpoint(&dir, uid, &mut |key, v| {
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
        let file = KeyedFile {
            file: "f".into(),
            format: KeyedFormat::Entries,
            key_groups: kgs,
            offsets,
            checksums: Vec::new(),
            entries: n,
        };
        (bytes, file)
    }

    /// [`file_of`] in format 2 (SST files built under `dir`).
    fn sst_file_of(kgs: (u16, u16), es: &[(Vec<u8>, Vec<u8>)], dir: &Path) -> (Vec<u8>, KeyedFile) {
        let mut bytes = Vec::new();
        let index = write_sst_groups(
            &mut bytes,
            kgs,
            &mut |f| {
                for (k, v) in es {
                    f(k, v)?;
                }
                Ok(())
            },
            &dir.join("group.sst"),
        )
        .unwrap();
        let file = KeyedFile {
            file: "f".into(),
            format: KeyedFormat::Sst,
            key_groups: kgs,
            offsets: index.offsets,
            checksums: index.checksums,
            entries: index.entries,
        };
        (bytes, file)
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
        /// Through RocksDB, in both formats: entries of any size (some far larger than a
        /// chunk) read in chunks of any size, several on their way: the restored instance
        /// holds exactly the entries of its key groups, and only their bytes are read.
        #[test]
        fn chunked_restores_hold_exactly_their_key_groups(
            sizes in prop::collection::vec((0u16..8, 0usize..20_000), 0..60),
            chunk in 1u64..30_000,
            range in (0u16..8, 0u16..8),
            sst in any::<bool>(),
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
            let (bytes, mut f) =
                if sst { sst_file_of((0, 7), &es, tmp.path()) } else { file_of((0, 7), &es) };
            prop_assert!(f.check().is_ok());
            storage.put("counts-0", &bytes).unwrap();
            f.file = "counts-0".into();
            let uid = "counts".to_string();
            let b = StateBackend::open(&tmp.path().join("db"), std::slice::from_ref(&uid)).unwrap();
            let scratch = tmp.path().join("scratch");
            let done =
                restore_keyed_in_chunks(&storage, &[f.clone()], range, &b, &uid, &scratch, chunk)
                    .unwrap();
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
            if !sst {
                prop_assert_eq!(done.entries, want.len() as u64);
            }
            prop_assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0, "no file left behind");
        }

        /// Format 2's index: each key group's byte range is an SST file of exactly its
        /// entries, with its checksum; the index round-trips through JSON.
        #[test]
        fn each_key_group_is_an_sst_file_of_its_entries(
            first in 0u16..100, len in 0u16..12, per in 0u16..5
        ) {
            let kgs = (first, first + len);
            let es = entries(kgs, per);
            let tmp = tempfile::tempdir().unwrap();
            let (bytes, f) = sst_file_of(kgs, &es, tmp.path());
            prop_assert!(f.check().is_ok());
            prop_assert_eq!(&bytes[..KEYED_MAGIC_SST.len()], KEYED_MAGIC_SST);
            let back: KeyedFile = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
            prop_assert_eq!(&back, &f);
            prop_assert_eq!(*f.offsets.last().unwrap(), bytes.len() as u64);
            prop_assert_eq!(f.entries, es.len() as u64);
            for g in kgs.0..=kgs.1 {
                let want: Vec<_> =
                    es.iter().filter(|(k, _)| u16::from_be_bytes([k[0], k[1]]) == g).collect();
                let i = usize::from(g - kgs.0);
                let Some((a, b)) = f.byte_range((g, g)) else {
                    prop_assert!(want.is_empty());
                    prop_assert_eq!(f.checksums[i], 0);
                    continue;
                };
                let sst = &bytes[a as usize..b as usize];
                prop_assert_eq!(xxhash_rust::xxh3::xxh3_64(sst), f.checksums[i]);
                let path = tmp.path().join(format!("g{g}.sst"));
                std::fs::write(&path, sst).unwrap();
                let uid = "u".to_string();
                let db = StateBackend::open(&tmp.path().join(format!("db{g}")), std::slice::from_ref(&uid)).unwrap();
                db.ingest(&uid, &path).unwrap();
                let got = db.scan(&uid).unwrap();
                prop_assert_eq!(got.len(), want.len());
                for ((gg, k, v), (wk, wv)) in got.iter().zip(want) {
                    prop_assert_eq!(*gg, g);
                    prop_assert_eq!(&k[..], &wk[2..]);
                    prop_assert_eq!(v, wv);
                }
            }
        }
    }

    #[test]
    fn a_bad_index_is_refused() {
        let (_, mut f) = file_of((3, 6), &entries((3, 6), 2));
        assert!(f.check().is_ok());
        f.offsets.pop();
        assert!(f.check().unwrap_err().contains("does not fit"));
    }

    /// Through RocksDB, in both formats: state written by two subtasks, saved from their
    /// checkpoints, restored by three into fresh instances; each holds exactly its key groups'
    /// values, every byte is read once, and a failing or damaged read is an error naming the
    /// file, with nothing ingested.
    #[test]
    fn rocksdb_state_rescales_from_two_subtasks_to_three() {
        for format in [KeyedFormat::Sst, KeyedFormat::Entries] {
            rescales_from_two_to_three(format, Kind::Rocksdb, Kind::Rocksdb, false);
        }
    }

    /// A savepoint is one format for both backends: heap state saved restores into RocksDB
    /// and the other way round, at another parallelism.
    #[test]
    fn savepoints_restore_across_backends() {
        rescales_from_two_to_three(KeyedFormat::Sst, Kind::Heap, Kind::Rocksdb, false);
        rescales_from_two_to_three(KeyedFormat::Sst, Kind::Rocksdb, Kind::Heap, false);
        rescales_from_two_to_three(KeyedFormat::Sst, Kind::Heap, Kind::Heap, false);
    }

    /// A heap checkpoint (its tables' copies as they are, with a checksum per key group)
    /// restores into the heap at another parallelism, and a changed byte fails its checksum.
    #[test]
    fn heap_checkpoints_rescale_and_are_checked() {
        rescales_from_two_to_three(KeyedFormat::Entries, Kind::Heap, Kind::Heap, true);
    }

    use crate::state::StateBackendKind as Kind;

    fn rescales_from_two_to_three(
        format: KeyedFormat,
        from: Kind,
        to: Kind,
        heap_checkpoint: bool,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let storage = crate::storage::LocalStorage::new(&tmp.path().join("sp"));
        let uid = "counts".to_string();
        let max_p = 128;
        let mut files = Vec::new();
        let mut expected = Vec::new();
        for s in 0..2u32 {
            let r = KeyGroupRange::of_subtask(max_p, 2, s);
            let b = StateBackend::open_kind(
                from,
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
            let snap = b.snapshot(&ck, (r.start, r.end)).unwrap();
            let key = format!("counts-{s}");
            let f = match &snap {
                LocalSnapshot::Heap { images, .. } if heap_checkpoint => {
                    let i = &images[0];
                    storage.put(&key, &i.bytes).unwrap();
                    KeyedFile {
                        file: key,
                        format: KeyedFormat::Entries,
                        key_groups: (r.start, r.end),
                        offsets: i.offsets.clone(),
                        checksums: i.checksums.clone(),
                        entries: i.entries,
                    }
                }
                _ => save_keyed_as(&snap, &uid, (r.start, r.end), &storage, &key, format).unwrap(),
            };
            snap.remove();
            assert_eq!(f.format, format);
            assert!(f.check().is_ok());
            assert!(!ck.with_extension("keyed.sst").exists(), "the scratch SST file is gone");
            files.push(f);
        }
        expected.sort();
        let magic = format.magic().len() as u64;
        let total: u64 = files.iter().map(|f| f.offsets.last().unwrap() - magic).sum();
        // Key groups and entries cross the boundaries of small chunks.
        for chunk in [7, 64, 4096, RESTORE_CHUNK] {
            let mut restored = Vec::new();
            let mut read = 0;
            for s in 0..3u32 {
                let r = KeyGroupRange::of_subtask(max_p, 3, s);
                let b = StateBackend::open_kind(
                    to,
                    &tmp.path().join(format!("new-{chunk}-{s}")),
                    std::slice::from_ref(&uid),
                )
                .unwrap();
                let scratch = tmp.path().join("scratch");
                let done = restore_keyed_in_chunks(
                    &storage,
                    &files,
                    (r.start, r.end),
                    &b,
                    &uid,
                    &scratch,
                    chunk,
                )
                .unwrap();
                read += done.bytes;
                if format == KeyedFormat::Sst {
                    let groups = files
                        .iter()
                        .flat_map(|f| {
                            (f.key_groups.0..=f.key_groups.1).filter(|&g| {
                                g >= r.start && g <= r.end && f.byte_range((g, g)).is_some()
                            })
                        })
                        .count();
                    assert_eq!(done.files, groups as u64, "an SST file per key group");
                }
                let got = b.scan(&uid).unwrap();
                assert!(got.iter().all(|(g, _, _)| *g >= r.start && *g <= r.end));
                restored.extend(got);
            }
            restored.sort();
            assert_eq!(restored, expected, "{format:?}, chunks of {chunk} bytes");
            assert_eq!(read, total, "{format:?}: every byte read once");
        }
        // A read that fails while others are on their way is the restore's error (no hang).
        let faulty = crate::storage::Faulty::new(
            crate::storage::LocalStorage::new(&tmp.path().join("sp")),
            crate::storage::Faults { fail_every: 5, ..Default::default() },
        );
        let b =
            StateBackend::open(&tmp.path().join("failing"), std::slice::from_ref(&uid)).unwrap();
        let scratch = tmp.path().join("scratch");
        let e =
            restore_keyed_in_chunks(&faulty, &files, (0, 127), &b, &uid, &scratch, 64).unwrap_err();
        assert!(e.message.contains("injected failure"), "{e}");
        assert!(b.scan(&uid).unwrap().is_empty(), "nothing ingested");
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0, "no file left behind");
        // A file with a byte changed, or overwritten, is an error naming it, not a panic.
        let path = tmp.path().join("sp").join("counts-0");
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let flipped = restore_keyed_in_chunks(&storage, &files, (0, 127), &b, &uid, &scratch, 64);
        if format == KeyedFormat::Sst || heap_checkpoint {
            let e = flipped.unwrap_err();
            assert!(e.message.contains("counts-0") && e.message.contains("checksum"), "{e}");
            assert!(b.scan(&uid).unwrap().is_empty(), "nothing ingested");
        }
        std::fs::write(&path, vec![0xff; bytes.len()]).unwrap();
        let b =
            StateBackend::open(&tmp.path().join("damaged"), std::slice::from_ref(&uid)).unwrap();
        let e = restore_keyed_in_chunks(&storage, &files, (0, 127), &b, &uid, &scratch, 64)
            .unwrap_err();
        assert!(e.message.contains("counts-0") && e.message.contains("damaged"), "{e}");
        assert!(b.scan(&uid).unwrap().is_empty(), "nothing ingested");
    }

    /// State that compresses is written with LZ4, state that does not is written plain once
    /// a key group has shown it; both restore.
    #[test]
    fn savepoint_tables_are_compressed_only_when_the_state_compresses() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rng = crate::connectors::SplitMix64::new(7);
        for compresses in [true, false] {
            let mut es = Vec::new();
            for g in 0..4u16 {
                for i in 0..12_000u32 {
                    let mut k = g.to_be_bytes().to_vec();
                    k.extend_from_slice(&i.to_be_bytes());
                    let v: Vec<u8> = if compresses {
                        format!("{:0>120}", i % 7).into_bytes()
                    } else {
                        (0..15).flat_map(|_| rng.next_u64().to_le_bytes()).collect()
                    };
                    es.push((k, v));
                }
            }
            let (bytes, f) = sst_file_of((0, 3), &es, tmp.path());
            let tables: Vec<&[u8]> = (0..4)
                .map(|g| {
                    let (a, b) = f.byte_range((g, g)).unwrap();
                    &bytes[a as usize..b as usize]
                })
                .collect();
            // RocksDB counts in a table's properties the data blocks it wrote without trying
            // to compress them (`rocksdb.number.data.blocks.compression.bypassed`), and the
            // name appears only when some were.
            let plain = |t: &[u8]| t.windows(20).any(|w| w == b"compression.bypassed");
            // The first key group is always written as the column family's are.
            assert!(!plain(tables[0]), "the first key group, compresses: {compresses}");
            for t in &tables[1..] {
                assert_eq!(plain(t), !compresses, "compresses: {compresses}");
            }
            let raw: usize = es.iter().map(|(k, v)| k.len() + v.len()).sum();
            if compresses {
                assert!(bytes.len() * 4 < raw, "{} of {raw}", bytes.len());
            }
            let storage = crate::storage::LocalStorage::new(&tmp.path().join("sp"));
            storage.put("f", &bytes).unwrap();
            let uid = "u".to_string();
            let db = tmp.path().join(format!("db-{compresses}"));
            let b = StateBackend::open(&db, std::slice::from_ref(&uid)).unwrap();
            let scratch = tmp.path().join("scratch");
            restore_keyed(&storage, &[f], (0, 3), &b, &uid, &scratch).unwrap();
            let got = b.scan(&uid).unwrap();
            assert_eq!(got.len(), es.len());
            assert!(got.iter().zip(&es).all(|((_, k, v), (wk, wv))| k == &wk[2..] && v == wv));
        }
    }

    #[test]
    fn keys_out_of_key_group_order_are_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let es: Vec<(Vec<u8>, Vec<u8>)> = [2u16, 1]
            .iter()
            .map(|g| ([&g.to_be_bytes()[..], b"k"].concat(), b"v".to_vec()))
            .collect();
        let e = write_sst_groups(
            std::io::sink(),
            (0, 3),
            &mut |f| es.iter().try_for_each(|(k, v)| f(k, v)),
            &tmp.path().join("g.sst"),
        )
        .unwrap_err();
        assert!(e.message.contains("key group 1 after key group 2"), "{e}");
    }

    #[test]
    fn an_index_without_its_checksums_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, mut f) = sst_file_of((3, 6), &entries((3, 6), 2), tmp.path());
        assert!(f.check().is_ok());
        f.checksums.pop();
        assert!(f.check().unwrap_err().contains("3 key-group checksums for 4 key groups"));
        // Format 1 metadata (no format, no checksums) still reads as format 1.
        let (_, old) = file_of((3, 6), &entries((3, 6), 2));
        let mut json = serde_json::to_value(&old).unwrap();
        json.as_object_mut().unwrap().remove("format");
        let back: KeyedFile = serde_json::from_value(json).unwrap();
        assert_eq!(back.format, KeyedFormat::Entries);
        assert!(back.check().is_ok());
    }
}
