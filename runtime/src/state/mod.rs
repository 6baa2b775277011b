//! Keyed state: one backend instance per keyed operator subtask, behind one trait
//! ([`Backend`]), in one of two kinds (`spec.stateBackend`):
//!
//! - [`rocksdb`]: RocksDB on the worker's disk, a column family per operator (by uid).
//!   Checkpoints are RocksDB checkpoints (hard links), uploaded incrementally.
//! - [`heap`]: sorted maps in the worker's memory, one per key group. A checkpoint is a full
//!   copy in the keyed file format of savepoints' format 1 (entries, indexed by key group).
//!
//! Every key starts with its key group in big-endian, so that a range of key groups is one
//! contiguous byte range in both, and checkpoints, savepoints and rescaling treat every
//! operator's state alike. Savepoints are written in one format (an SST file per key group,
//! [`crate::savepoint`]) that both kinds read.
//!
//! Aggregating operators do not pay a lookup per record: [`CachedValueState`] keeps the
//! values it has touched in memory and writes the changed ones back in one batch (at the end,
//! or when the cache outgrows its budget). At a checkpoint it only copies the changed values
//! out ([`CachedValueState::detach`]): the checkpoint's own thread writes them into the backend
//! and takes the backend's snapshot ([`DeferredWrite::apply_then`]) while the operator goes
//! on, and the operator writes nothing into the backend until that snapshot is taken, so that
//! it holds exactly the state at the barrier.

pub mod heap;
pub mod rocksdb;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use crate::error::RuntimeError;
use crate::keygroup::{KeyGroup, key_group_of, state_key};
pub use weir_crds::streamjob::StateBackendKind;

/// A failure of the state backend (the local disk, or state that cannot be read): an
/// internal error; the job restarts.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state backend: {0}")]
    RocksDb(#[from] ::rocksdb::Error),
    #[error("state backend: {0}")]
    Other(String),
}

/// One stored value: its key group, its key, its encoded value.
pub type StateEntry = (KeyGroup, Vec<u8>, Vec<u8>);

/// A table of a backend instance: the state of one operator (found by [`Backend::table`]).
pub type Table = usize;

/// What a keyed state backend does. An instance holds the state of the operators it was
/// opened with, each a [`Table`]; every key starts with its key group (2 bytes, big-endian).
/// A backend is used by one subtask's thread, and read for its size by others.
pub trait Backend: Send + Sync {
    fn kind(&self) -> StateBackendKind;
    /// The table of operator `uid`, if the instance was opened with it.
    fn table(&self, uid: &str) -> Option<Table>;
    /// Calls `f` with the value of `key`, if it has one; returns whether it had.
    fn get(&self, t: Table, key: &[u8], f: &mut dyn FnMut(&[u8])) -> Result<bool, StateError>;
    fn put(&self, t: Table, key: &[u8], value: &[u8]) -> Result<(), StateError>;
    fn delete(&self, t: Table, key: &[u8]) -> Result<(), StateError>;
    /// Applies every write of `batch`, in order.
    fn write(&self, t: Table, batch: &Batch) -> Result<(), StateError>;
    /// Applies every write of `batch`, whose keys are in order and unique; `scratch` is a
    /// path the backend may write a file at (RocksDB writes a large batch as an SST file and
    /// ingests it, which costs a fraction of inserting it into a memtable and flushing that).
    fn write_sorted(&self, t: Table, batch: &Batch, _scratch: &Path) -> Result<(), StateError> {
        self.write(t, batch)
    }
    /// Calls `f` with every (key, value) whose key starts with `prefix`, in key order. `f`
    /// must not call back into the backend.
    fn scan_prefix(
        &self,
        t: Table,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), StateError>;
    /// Bytes of live state of table `t` (an estimate).
    fn size_bytes(&self, t: Table) -> u64;
    /// A checkpoint's consistent copy of every table, of key groups `key_groups`, at `local`
    /// (a directory that must not exist, used as the backend needs): taken while nothing
    /// writes into the instance (the subtask waits, or holds its writes back behind a
    /// [`DeferredWrite`]).
    fn snapshot(&self, local: &Path, key_groups: (u16, u16))
    -> Result<LocalSnapshot, RuntimeError>;
    /// Loads the SST files `ssts` (keys in order, no two overlapping) into table `t`; they
    /// are consumed.
    fn ingest_files(&self, t: Table, ssts: &[&Path]) -> Result<(), StateError>;
    /// Compacts the stored state as far as the backend can (benchmarks and tools).
    fn compact(&self) {}
}

/// A consistent copy of a backend instance, taken synchronously at a checkpoint: what its
/// upload (or a savepoint's files) is made from.
#[derive(Debug)]
pub enum LocalSnapshot {
    /// A RocksDB checkpoint in this directory.
    RocksDb(PathBuf),
    /// The heap's tables, each encoded as a keyed state file of format 1; `scratch` is a
    /// directory for what a savepoint builds from them.
    Heap { images: Vec<HeapImage>, scratch: PathBuf },
}

/// One table of a heap snapshot: a keyed state file of format 1 (see [`crate::savepoint`]).
#[derive(Debug)]
pub struct HeapImage {
    pub uid: String,
    pub bytes: Vec<u8>,
    /// Where each key group starts in `bytes`, then its length.
    pub offsets: Vec<u64>,
    /// The XXH3 of each key group's bytes (0 for an empty one).
    pub checksums: Vec<u64>,
    pub entries: u64,
}

impl LocalSnapshot {
    /// Calls `f` with every stored (key, value) of operator `uid`, in key order.
    pub fn for_each(
        &self,
        uid: &str,
        f: &mut crate::savepoint::EntryVisitor<'_>,
    ) -> Result<(), RuntimeError> {
        match self {
            LocalSnapshot::RocksDb(dir) => rocksdb::for_each_in_checkpoint(dir, uid, f),
            LocalSnapshot::Heap { images, .. } => {
                let Some(image) = images.iter().find(|i| i.uid == uid) else { return Ok(()) };
                let magic = crate::savepoint::KEYED_MAGIC.len();
                crate::savepoint::read_entries(&image.bytes[magic..], f)
                    .map_err(RuntimeError::internal)
            }
        }
    }

    /// Where a savepoint may build its files beside the snapshot.
    pub fn scratch(&self) -> PathBuf {
        match self {
            LocalSnapshot::RocksDb(dir) => dir.with_extension("keyed.sst"),
            LocalSnapshot::Heap { scratch, .. } => scratch.with_extension("keyed.sst"),
        }
    }

    /// Removes what the snapshot keeps on the local disk.
    pub fn remove(&self) {
        if let LocalSnapshot::RocksDb(dir) = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Writes to apply together: keys, and values or deletions.
#[derive(Debug, Default)]
pub struct Batch {
    bytes: Vec<u8>,
    /// Where each write's key ends in `bytes`, and its value (None: a deletion).
    writes: Vec<(usize, Option<usize>)>,
}

impl Batch {
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.bytes.extend_from_slice(key);
        let k = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.writes.push((k, Some(self.bytes.len())));
    }

    pub fn delete(&mut self, key: &[u8]) {
        self.bytes.extend_from_slice(key);
        self.writes.push((self.bytes.len(), None));
    }

    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.writes.clear();
    }

    /// Every write: the key, and the value or None for a deletion.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        let mut at = 0;
        self.writes.iter().map(move |&(k, v)| {
            let key = &self.bytes[at..k];
            at = v.unwrap_or(k);
            (key, v.map(|v| &self.bytes[k..v]))
        })
    }

    /// The same writes in key order; of two writes of one key, the later one.
    pub fn sorted(&self) -> Batch {
        let writes: Vec<(&[u8], Option<&[u8]>)> = self.iter().collect();
        // Compared by their first 16 bytes as one integer (the key group and most keys),
        // then by the rest; stable on the index, so that the later of two writes of a key
        // sorts last, and is kept.
        let prefix = |k: &[u8]| {
            let mut b = [0u8; 16];
            let n = k.len().min(16);
            b[..n].copy_from_slice(&k[..n]);
            u128::from_be_bytes(b)
        };
        let mut order: Vec<(u128, u32)> =
            writes.iter().enumerate().map(|(i, (k, _))| (prefix(k), i as u32)).collect();
        order.sort_unstable_by(|(p, i), (q, j)| {
            p.cmp(q).then_with(|| writes[*i as usize].0.cmp(writes[*j as usize].0)).then(i.cmp(j))
        });
        let mut out = Batch {
            bytes: Vec::with_capacity(self.bytes.len()),
            writes: Vec::with_capacity(writes.len()),
        };
        for (n, &(_, i)) in order.iter().enumerate() {
            let (k, v) = writes[i as usize];
            if order.get(n + 1).is_some_and(|&(_, j)| writes[j as usize].0 == k) {
                continue;
            }
            match v {
                Some(v) => out.put(k, v),
                None => out.delete(k),
            }
        }
        out
    }
}

/// One subtask's state backend instance (cheap to clone: a handle).
#[derive(Clone)]
pub struct StateBackend {
    inner: Arc<dyn Backend>,
    operators: Vec<String>,
    path: PathBuf,
}

impl std::fmt::Debug for StateBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateBackend")
            .field("kind", &self.inner.kind())
            .field("operators", &self.operators)
            .finish()
    }
}

impl StateBackend {
    /// Opens (creating) a RocksDB instance at `path` with a table for each of `operators`.
    pub fn open(path: &Path, operators: &[String]) -> Result<Self, StateError> {
        Self::open_kind(StateBackendKind::Rocksdb, path, operators)
    }

    /// Opens an instance of `kind` with a table for each of `operators` (RocksDB at `path`;
    /// the heap keeps nothing there).
    pub fn open_kind(
        kind: StateBackendKind,
        path: &Path,
        operators: &[String],
    ) -> Result<Self, StateError> {
        let inner: Arc<dyn Backend> = match kind {
            StateBackendKind::Rocksdb => Arc::new(rocksdb::RocksDb::open(path, operators)?),
            StateBackendKind::Heap => Arc::new(heap::Heap::new(operators)),
        };
        Ok(Self { inner, operators: operators.to_vec(), path: path.to_path_buf() })
    }

    /// Where it was opened (RocksDB's directory; the heap keeps nothing there).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> StateBackendKind {
        self.inner.kind()
    }

    fn table(&self, uid: &str) -> Table {
        self.inner.table(uid).expect("a table opened with the backend")
    }

    /// The estimate of the bytes of live state.
    pub fn size_bytes(&self) -> u64 {
        self.operators
            .iter()
            .filter_map(|u| self.inner.table(u))
            .map(|t| self.inner.size_bytes(t))
            .sum()
    }

    /// The value state of operator `uid`, cached up to `cache_entries` keys.
    pub fn value_state(
        &self,
        uid: &str,
        max_parallelism: u32,
        cache_entries: usize,
    ) -> CachedValueState {
        CachedValueState {
            store: self.keyed_store(uid, max_parallelism),
            cache: HashMap::new(),
            cache_entries,
            key_buf: Vec::new(),
            batch: Batch::default(),
            gate: Arc::default(),
            scratch: self.path.with_extension(format!("{uid}.writes.sst")),
        }
    }

    /// The raw keyed state of operator `uid`: what the state handles of a user's operator
    /// ([`crate::operator::ValueState`] and the others) read and write, key by key.
    pub fn keyed_store(&self, uid: &str, max_parallelism: u32) -> KeyedStore {
        KeyedStore { backend: self.inner.clone(), table: self.table(uid), max_parallelism }
    }

    /// The synchronous part of a checkpoint, at `local` (which must not exist).
    pub fn snapshot(
        &self,
        local: &Path,
        key_groups: (u16, u16),
    ) -> Result<LocalSnapshot, RuntimeError> {
        self.inner.snapshot(local, key_groups)
    }

    /// Compacts every table as far as the backend can (benchmarks and tools).
    pub fn compact(&self) {
        self.inner.compact()
    }

    /// Loads the SST file `sst` (written with [`sst_options`], keys in order) into operator
    /// `uid`'s state.
    pub fn ingest(&self, uid: &str, sst: &Path) -> Result<(), StateError> {
        self.ingest_files(uid, &[sst])
    }

    /// Loads the SST files `ssts` (each written with [`sst_options`], keys in order; no two
    /// overlapping) into operator `uid`'s state in one ingestion; they are consumed.
    pub fn ingest_files<P: AsRef<Path>>(&self, uid: &str, ssts: &[P]) -> Result<(), StateError> {
        let paths: Vec<&Path> = ssts.iter().map(AsRef::as_ref).collect();
        self.inner.ingest_files(self.table(uid), &paths)
    }

    /// Puts entries (keys starting with their key group) into operator `uid`'s state.
    pub fn put(&self, uid: &str, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        self.inner.put(self.table(uid), key, value)
    }

    /// Every (key group, key, value) of operator `uid`, in key order (for tests and tools).
    pub fn scan(&self, uid: &str) -> Result<Vec<StateEntry>, StateError> {
        let mut out = Vec::new();
        self.inner.scan_prefix(self.table(uid), &[], &mut |k, v| {
            let g = u16::from_be_bytes([k[0], k[1]]);
            out.push((g, k[2..].to_vec(), v.to_vec()));
        })?;
        Ok(out)
    }
}

/// Options of the SST files that [`StateBackend::ingest`] loads and savepoints hold.
pub fn sst_options() -> ::rocksdb::Options {
    rocksdb::db_options()
}

/// The keyed state of one operator as bytes: every key starts with its key group (2 bytes,
/// big-endian), so that checkpoints, savepoints and rescaling treat it like any other keyed
/// state.
#[derive(Clone)]
pub struct KeyedStore {
    backend: Arc<dyn Backend>,
    table: Table,
    max_parallelism: u32,
}

impl std::fmt::Debug for KeyedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedStore")
            .field("kind", &self.backend.kind())
            .field("table", &self.table)
            .finish()
    }
}

impl KeyedStore {
    /// The number of key groups keys are spread over.
    pub fn max_parallelism(&self) -> u32 {
        self.max_parallelism
    }

    /// `f` of the value of `key`, read in place (no copy of it).
    pub fn get_with<R>(
        &self,
        key: &[u8],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, StateError> {
        let mut f = Some(f);
        let mut out = None;
        self.backend.get(self.table, key, &mut |v| {
            if let Some(f) = f.take() {
                out = Some(f(v));
            }
        })?;
        Ok(out)
    }

    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        self.backend.put(self.table, key, value)
    }

    pub fn delete(&self, key: &[u8]) -> Result<(), StateError> {
        self.backend.delete(self.table, key)
    }

    pub fn write(&self, batch: &Batch) -> Result<(), StateError> {
        self.backend.write(self.table, batch)
    }

    /// [`KeyedStore::write`] for a batch of unique keys that may be large: from
    /// [`rocksdb::INGEST_AT`] writes it is sorted for [`Backend::write_sorted`] (which RocksDB
    /// ingests as one file, through `scratch`).
    fn write_large(&self, batch: &Batch, scratch: &Path) -> Result<(), StateError> {
        match batch.len() {
            0 => Ok(()),
            n if n >= rocksdb::INGEST_AT => {
                self.backend.write_sorted(self.table, &batch.sorted(), scratch)
            }
            _ => self.write(batch),
        }
    }

    /// Calls `f` with every (key, value) whose key starts with `prefix`, in key order (`f`
    /// must not use the store).
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), StateError> {
        self.backend.scan_prefix(self.table, prefix, &mut f)
    }
}

/// A number kept as state: integers stay integers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn encode(self) -> [u8; 9] {
        let mut b = [0u8; 9];
        match self {
            Num::Int(i) => {
                b[0] = 0;
                b[1..].copy_from_slice(&i.to_be_bytes());
            }
            Num::Float(f) => {
                b[0] = 1;
                b[1..].copy_from_slice(&f.to_bits().to_be_bytes());
            }
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Num> {
        let v: [u8; 8] = b.get(1..9)?.try_into().ok()?;
        match b.first()? {
            0 => Some(Num::Int(i64::from_be_bytes(v))),
            1 => Some(Num::Float(f64::from_bits(u64::from_be_bytes(v)))),
            _ => None,
        }
    }
}

struct Entry {
    value: Option<Num>,
    dirty: bool,
    group: KeyGroup,
}

/// Orders the writes that checkpoints' threads apply to one table ([`DeferredWrite`]) with
/// each other and with the operator's own: a write is issued a ticket, applied when every
/// earlier ticket is done, and the operator writes again only once every issued one is.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    turn: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    issued: u64,
    done: u64,
    /// A deferred write that failed or was dropped: the values it held are in neither the
    /// cache (they were clean there) nor the backend, so the state must not be used again.
    failed: Option<String>,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn issue(&self) -> u64 {
        let mut s = self.lock();
        s.issued += 1;
        s.issued - 1
    }

    fn wait_turn(&self, ticket: u64) {
        let mut s = self.lock();
        while s.done < ticket {
            s = self.turn.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn done(&self, ticket: u64, failure: Option<String>) {
        let mut s = self.lock();
        debug_assert_eq!(s.done, ticket, "deferred writes are done in ticket order");
        s.done = ticket + 1;
        if let (None, Some(f)) = (&s.failed, failure) {
            s.failed = Some(f);
        }
        self.turn.notify_all();
    }

    /// Waits until every issued write is applied; the first failure, if any.
    fn drain(&self) -> Result<(), StateError> {
        let mut s = self.lock();
        while s.done < s.issued {
            s = self.turn.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        Self::check(&s)
    }

    fn check(s: &GateState) -> Result<(), StateError> {
        match &s.failed {
            Some(f) => Err(StateError::Other(format!(
                "the values a checkpoint was to write into the state backend were lost ({f}): the state is incomplete, the attempt restarts from the last checkpoint"
            ))),
            None => Ok(()),
        }
    }
}

/// The changed values of a [`CachedValueState`] at a checkpoint's barrier, to be written into
/// its backend, in order with the other writes of that table, by the checkpoint's own thread
/// ([`DeferredWrite::apply_then`]). Dropped unapplied, it marks the state as lost.
#[derive(Debug)]
pub struct DeferredWrite {
    store: KeyedStore,
    /// State keys, in the order the cache held them (sorted when applied).
    batch: Batch,
    gate: Arc<Gate>,
    ticket: Option<u64>,
}

impl DeferredWrite {
    /// The number of values it writes.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Once every earlier write of the table is applied: writes the values (sorted; through
    /// `scratch` if the backend wants a file), then calls `then` (the backend's snapshot),
    /// before the operator may write into the backend again.
    pub fn apply_then<T>(
        mut self,
        scratch: &Path,
        then: impl FnOnce() -> Result<T, RuntimeError>,
    ) -> Result<T, RuntimeError> {
        let ticket = self.ticket.take().expect("a deferred write is applied once");
        self.gate.wait_turn(ticket);
        let written = self.store.write_large(&self.batch, scratch);
        let result =
            written.map_err(|e| RuntimeError::internal(e.to_string())).and_then(|()| then());
        self.gate.done(ticket, result.as_ref().err().map(|e| e.message.clone()));
        result
    }
}

impl Drop for DeferredWrite {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.gate.wait_turn(ticket);
            self.gate.done(ticket, Some("its checkpoint ended before writing them".into()));
        }
    }
}

/// A value per key, cached in memory and written back in batches.
pub struct CachedValueState {
    store: KeyedStore,
    cache: HashMap<Box<[u8]>, Entry>,
    cache_entries: usize,
    key_buf: Vec<u8>,
    batch: Batch,
    /// The writes checkpoints' threads have yet to apply ([`CachedValueState::detach`]).
    gate: Arc<Gate>,
    /// Where a large write-back may be written as a file ([`Backend::write_sorted`]).
    scratch: PathBuf,
}

impl std::fmt::Debug for CachedValueState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedValueState")
            .field("store", &self.store)
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl CachedValueState {
    /// Applies `f` to the key's value (None when it has none) and stores the result; returns
    /// the new value.
    pub fn update(
        &mut self,
        key: &[u8],
        f: impl FnOnce(Option<Num>) -> Num,
    ) -> Result<Num, StateError> {
        if let Some(e) = self.cache.get_mut(key) {
            let v = f(e.value);
            e.value = Some(v);
            e.dirty = true;
            return Ok(v);
        }
        if self.cache.len() >= self.cache_entries {
            self.write_back()?;
            self.cache.clear();
        }
        let group = key_group_of(key, self.store.max_parallelism);
        let current = self.read(group, key)?;
        let v = f(current);
        self.cache.insert(key.into(), Entry { value: Some(v), dirty: true, group });
        Ok(v)
    }

    /// The stored value of a key that is not in the cache. A key whose value a checkpoint's
    /// thread is still writing is in the cache: what the backend holds for any other is its
    /// value.
    fn read(&mut self, group: KeyGroup, key: &[u8]) -> Result<Option<Num>, StateError> {
        state_key(group, key, &mut self.key_buf);
        Ok(self.store.get_with(&self.key_buf, Num::decode)?.flatten())
    }

    /// Moves every changed value into `batch` (as state keys) and marks it clean.
    fn take_dirty(&mut self, batch: &mut Batch) {
        for (k, e) in self.cache.iter_mut().filter(|(_, e)| e.dirty) {
            state_key(e.group, k, &mut self.key_buf);
            match e.value {
                Some(v) => batch.put(&self.key_buf, &v.encode()),
                None => batch.delete(&self.key_buf),
            }
            e.dirty = false;
        }
    }

    /// Writes every changed value to the backend in one batch, after the writes checkpoints'
    /// threads have yet to apply.
    pub fn write_back(&mut self) -> Result<(), StateError> {
        self.gate.drain()?;
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        self.take_dirty(&mut batch);
        let written = self.store.write_large(&batch, &self.scratch);
        self.batch = batch;
        written
    }

    /// A checkpoint's barrier: copies every changed value out (and marks it clean) for the
    /// checkpoint's thread to write ([`DeferredWrite::apply_then`]) and the backend's
    /// snapshot to take after it. Always a write, an empty one too: the snapshot must come
    /// after the writes of earlier checkpoints, which may not be applied yet.
    pub fn detach(&mut self) -> Result<DeferredWrite, StateError> {
        Gate::check(&self.gate.lock())?;
        let mut batch = Batch::default();
        self.take_dirty(&mut batch);
        Ok(DeferredWrite {
            store: self.store.clone(),
            batch,
            gate: self.gate.clone(),
            ticket: Some(self.gate.issue()),
        })
    }

    /// The key's value, from the cache or the backend.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Num>, StateError> {
        match self.cache.get(key) {
            Some(e) => Ok(e.value),
            None => self.read(key_group_of(key, self.store.max_parallelism), key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_write_back_eviction_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let uids = vec!["counts".to_string()];
        {
            let backend = StateBackend::open(dir.path(), &uids).unwrap();
            // A cache of 2 entries forces write-backs and re-reads.
            let mut st = backend.value_state("counts", 128, 2);
            for w in ["a", "b", "c", "a", "a", "b", "d", "c"] {
                st.update(w.as_bytes(), |v| match v {
                    Some(Num::Int(n)) => Num::Int(n + 1),
                    _ => Num::Int(1),
                })
                .unwrap();
            }
            assert_eq!(st.get(b"a").unwrap(), Some(Num::Int(3)));
            st.write_back().unwrap();
        }
        let backend = StateBackend::open(dir.path(), &uids).unwrap();
        let mut st = backend.value_state("counts", 128, 100);
        for (k, n) in [("a", 3), ("b", 2), ("c", 2), ("d", 1)] {
            assert_eq!(st.get(k.as_bytes()).unwrap(), Some(Num::Int(n)), "{k}");
        }
        // Stored under their key group, in key-group order.
        let rows = backend.scan("counts").unwrap();
        assert_eq!(rows.len(), 4);
        for (g, k, _) in &rows {
            assert_eq!(*g, key_group_of(k, 128));
        }
        assert!(rows.windows(2).all(|w| w[0].0 <= w[1].0));
        assert_eq!(Num::decode(&Num::Float(2.5).encode()), Some(Num::Float(2.5)));
    }

    fn count(v: Option<Num>) -> Num {
        match v {
            Some(Num::Int(n)) => Num::Int(n + 1),
            _ => Num::Int(1),
        }
    }

    /// Every (key without its key group, value) of table `uid` in a snapshot.
    fn snapshot_values(snap: &LocalSnapshot, uid: &str) -> HashMap<Vec<u8>, Num> {
        let mut out = HashMap::new();
        snap.for_each(uid, &mut |k, v| {
            out.insert(k[2..].to_vec(), Num::decode(v).expect("a number"));
            Ok(())
        })
        .unwrap();
        out
    }

    /// An instance of `kind` with one table, "counts", in a directory of its own.
    fn counts(kind: StateBackendKind) -> (tempfile::TempDir, StateBackend) {
        let dir = tempfile::tempdir().unwrap();
        let uids = vec!["counts".to_string()];
        let backend = StateBackend::open_kind(kind, &dir.path().join("db"), &uids).unwrap();
        (dir, backend)
    }

    #[test]
    fn a_detached_write_is_in_its_snapshot_and_what_came_after_the_barrier_is_not() {
        for kind in [StateBackendKind::Rocksdb, StateBackendKind::Heap] {
            let (dir, backend) = counts(kind);
            let mut st = backend.value_state("counts", 128, 1 << 20);
            // Enough values for RocksDB to write them as an SST file and ingest it.
            let n = super::rocksdb::INGEST_AT + 100;
            for i in 0..n {
                st.update(format!("k{i}").as_bytes(), count).unwrap();
            }
            let first = st.detach().unwrap();
            assert_eq!(first.len(), n, "{kind}");
            // Past the barrier: the operator goes on while the first write is pending.
            for i in 0..10 {
                st.update(format!("k{i}").as_bytes(), count).unwrap();
            }
            st.update(b"late", count).unwrap();
            let second = st.detach().unwrap();
            assert_eq!(second.len(), 11, "{kind}");
            // Started first, the second waits for the first: tickets keep their order.
            let later = {
                let (b, local) = (backend.clone(), dir.path().join("chk-2"));
                let scratch = dir.path().join("w2.sst");
                std::thread::spawn(move || {
                    second.apply_then(&scratch, || b.snapshot(&local, (0, 127)))
                })
            };
            std::thread::sleep(std::time::Duration::from_millis(100));
            assert!(!later.is_finished(), "{kind}: the second write went before the first");
            let s1 = first
                .apply_then(&dir.path().join("w1.sst"), || {
                    backend.snapshot(&dir.path().join("chk-1"), (0, 127))
                })
                .unwrap();
            let s2 = later.join().unwrap().unwrap();
            let v1 = snapshot_values(&s1, "counts");
            assert_eq!(v1.len(), n, "{kind}");
            assert!(v1.values().all(|v| *v == Num::Int(1)), "{kind}: an update past the barrier");
            let v2 = snapshot_values(&s2, "counts");
            assert_eq!(v2.len(), n + 1, "{kind}");
            assert_eq!(v2[b"k3".as_slice()], Num::Int(2), "{kind}");
            assert_eq!(v2[b"k99".as_slice()], Num::Int(1), "{kind}");
            assert_eq!(v2[b"late".as_slice()], Num::Int(1), "{kind}");
            // Nothing is left to write, and the written scratch files are gone.
            st.write_back().unwrap();
            assert!(!dir.path().join("w1.sst").exists());
        }
    }

    #[test]
    fn large_write_backs_go_in_as_one_sorted_file_and_read_back() {
        for kind in [StateBackendKind::Rocksdb, StateBackendKind::Heap] {
            let (dir, backend) = counts(kind);
            let n = super::rocksdb::INGEST_AT + 10;
            // Evicts once the cache holds n keys: a write-back of n values.
            let mut st = backend.value_state("counts", 128, n);
            for i in 0..n + 20 {
                st.update(format!("k{i}").as_bytes(), count).unwrap();
            }
            for i in 0..5 {
                st.update(format!("k{i}").as_bytes(), count).unwrap();
            }
            st.write_back().unwrap();
            let mut fresh = backend.value_state("counts", 128, 10);
            for i in [0, 4, 5, n - 1, n, n + 19] {
                let want = if i < 5 { 2 } else { 1 };
                assert_eq!(
                    fresh.get(format!("k{i}").as_bytes()).unwrap(),
                    Some(Num::Int(want)),
                    "{kind} k{i}"
                );
            }
            assert_eq!(backend.scan("counts").unwrap().len(), n + 20, "{kind}");
            let left: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|f| f.ends_with(".sst"))
                .collect();
            assert!(left.is_empty(), "{kind}: {left:?}");
        }
    }

    #[test]
    fn the_cache_writes_only_after_the_pending_checkpoint_writes() {
        for kind in [StateBackendKind::Rocksdb, StateBackendKind::Heap] {
            let (dir, backend) = counts(kind);
            // Two entries: the third key evicts, which writes back.
            let mut st = backend.value_state("counts", 128, 2);
            st.update(b"a", count).unwrap();
            st.update(b"b", count).unwrap();
            let pending = st.detach().unwrap();
            st.update(b"a", count).unwrap(); // a = 2, past the barrier
            let applied = {
                let scratch = dir.path().join("w.sst");
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    pending.apply_then(&scratch, || Ok(()))
                })
            };
            // Evicts: waits for the pending write (a = 1), then writes a = 2 after it.
            st.update(b"c", count).unwrap();
            applied.join().unwrap().unwrap();
            st.write_back().unwrap();
            let mut fresh = backend.value_state("counts", 128, 100);
            assert_eq!(fresh.get(b"a").unwrap(), Some(Num::Int(2)), "{kind}");
            assert_eq!(fresh.get(b"b").unwrap(), Some(Num::Int(1)), "{kind}");
            assert_eq!(fresh.get(b"c").unwrap(), Some(Num::Int(1)), "{kind}");
        }
    }

    #[test]
    fn a_deferred_write_dropped_unapplied_fails_the_state_instead_of_losing_it() {
        let dir = tempfile::tempdir().unwrap();
        let uids = vec!["counts".to_string()];
        let backend = StateBackend::open(&dir.path().join("db"), &uids).unwrap();
        let mut st = backend.value_state("counts", 128, 100);
        st.update(b"a", count).unwrap();
        drop(st.detach().unwrap());
        let e = st.write_back().unwrap_err().to_string();
        assert!(e.contains("were lost") && e.contains("restarts from the last checkpoint"), "{e}");
        assert!(st.detach().is_err());
    }

    #[test]
    fn a_sorted_batch_keeps_the_last_write_of_a_key() {
        let mut b = Batch::default();
        b.put(b"b", b"1");
        b.put(b"a", b"1");
        b.delete(b"c");
        b.put(b"b", b"2");
        // Keys longer than the 16 bytes compared as one integer, and one that is a prefix of
        // another.
        b.put(b"0123456789abcdef-z", b"1");
        b.put(b"0123456789abcdef-a", b"1");
        b.put(b"0123456789abcdef", b"1");
        let sorted: Vec<_> =
            b.sorted().iter().map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))).collect();
        assert_eq!(
            sorted,
            vec![
                (b"0123456789abcdef".to_vec(), Some(b"1".to_vec())),
                (b"0123456789abcdef-a".to_vec(), Some(b"1".to_vec())),
                (b"0123456789abcdef-z".to_vec(), Some(b"1".to_vec())),
                (b"a".to_vec(), Some(b"1".to_vec())),
                (b"b".to_vec(), Some(b"2".to_vec())),
                (b"c".to_vec(), None),
            ]
        );
    }
}
