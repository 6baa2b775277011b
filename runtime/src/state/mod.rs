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
//! values it has touched in memory and writes the changed ones back in one batch when asked
//! (at a checkpoint, at the end, or when the cache outgrows its budget).

pub mod heap;
pub mod rocksdb;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// The synchronous part of a checkpoint: a consistent copy of every table, of key groups
    /// `key_groups`, at `local` (a directory that must not exist, used as the backend needs).
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
}

/// A value per key, cached in memory and written back in batches.
pub struct CachedValueState {
    store: KeyedStore,
    cache: HashMap<Box<[u8]>, Entry>,
    cache_entries: usize,
    key_buf: Vec<u8>,
    batch: Batch,
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
        let current = self.read(key)?;
        let v = f(current);
        self.cache.insert(key.into(), Entry { value: Some(v), dirty: true });
        Ok(v)
    }

    fn read(&mut self, key: &[u8]) -> Result<Option<Num>, StateError> {
        let g = key_group_of(key, self.store.max_parallelism);
        state_key(g, key, &mut self.key_buf);
        Ok(self.store.get_with(&self.key_buf, Num::decode)?.flatten())
    }

    /// Writes every changed value to the backend in one batch.
    pub fn write_back(&mut self) -> Result<(), StateError> {
        self.batch.clear();
        for (k, e) in self.cache.iter_mut().filter(|(_, e)| e.dirty) {
            let g = key_group_of(k, self.store.max_parallelism);
            state_key(g, k, &mut self.key_buf);
            match e.value {
                Some(v) => self.batch.put(&self.key_buf, &v.encode()),
                None => self.batch.delete(&self.key_buf),
            }
            e.dirty = false;
        }
        if !self.batch.is_empty() {
            self.store.write(&self.batch)?;
        }
        Ok(())
    }

    /// The key's value, from the cache or the backend.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Num>, StateError> {
        match self.cache.get(key) {
            Some(e) => Ok(e.value),
            None => self.read(key),
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
}
