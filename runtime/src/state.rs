//! Keyed state in RocksDB: one instance per worker, one column family per stateful operator
//! (by uid), every key prefixed by its key group in big-endian so that a range of key groups
//! is one contiguous byte range.
//!
//! Aggregating operators do not pay a read per record: [`CachedValueState`] keeps the values
//! it has touched in memory and writes the changed ones back in one batch when asked (at a
//! checkpoint, at the end, or when the cache outgrows its budget). A key costs one RocksDB read
//! the first time it is touched after a write-back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};

use crate::keygroup::{KeyGroup, key_group_of, state_key};

/// A failure of the state backend (the local disk): an internal error; the job restarts.
#[derive(Debug, thiserror::Error)]
#[error("state backend: {0}")]
pub struct StateError(#[from] rocksdb::Error);

/// One stored value: its key group, its key, its encoded value.
pub type StateEntry = (KeyGroup, Vec<u8>, Vec<u8>);

/// One worker's RocksDB instance.
#[derive(Clone)]
pub struct StateBackend {
    db: Arc<DB>,
    path: PathBuf,
}

impl std::fmt::Debug for StateBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateBackend").field("path", &self.path).finish()
    }
}

fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o.increase_parallelism(2);
    // A key touched for the first time is a lookup that finds nothing: bloom filters answer
    // it without reading the files.
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    o.set_block_based_table_factory(&table);
    // Universal compaction merges small sorted runs with each other and leaves the big ones
    // alone, so the files an incremental checkpoint must upload are about the data changed
    // since the last one (leveled compaction rewrites much of the next level instead).
    o.set_compaction_style(rocksdb::DBCompactionStyle::Universal);
    o
}

impl StateBackend {
    /// Opens (creating) the instance at `path` with a column family for each of `operators`.
    pub fn open(path: &Path, operators: &[String]) -> Result<Self, StateError> {
        std::fs::create_dir_all(path).ok();
        let cfs =
            operators.iter().map(|uid| ColumnFamilyDescriptor::new(cf_name(uid), db_options()));
        let db = DB::open_cf_descriptors(&db_options(), path, cfs)?;
        Ok(Self { db: Arc::new(db), path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// RocksDB's estimate of the bytes of live state, on disk and in memtables.
    pub fn size_bytes(&self, operators: &[String]) -> u64 {
        let mut total = 0;
        for uid in operators {
            let Some(cf) = self.db.cf_handle(&cf_name(uid)) else { continue };
            for prop in ["rocksdb.estimate-live-data-size", "rocksdb.cur-size-all-mem-tables"] {
                total += self.db.property_int_value_cf(&cf, prop).ok().flatten().unwrap_or(0);
            }
        }
        total
    }

    /// The value state of operator `uid`, cached up to `cache_entries` keys.
    pub fn value_state(
        &self,
        uid: &str,
        max_parallelism: u32,
        cache_entries: usize,
    ) -> CachedValueState {
        CachedValueState {
            backend: self.clone(),
            cf: cf_name(uid),
            max_parallelism,
            cache: HashMap::new(),
            cache_entries,
            key_buf: Vec::new(),
        }
    }

    /// The raw keyed state of operator `uid`: what the state handles of a user's operator
    /// ([`crate::operator::ValueState`] and the others) read and write, key by key.
    pub fn keyed_store(&self, uid: &str, max_parallelism: u32) -> KeyedStore {
        let mut write = WriteOptions::default();
        write.disable_wal(true); // durability comes from checkpoints, not the WAL
        KeyedStore { backend: self.clone(), cf: cf_name(uid), max_parallelism, write }
    }

    /// Writes a consistent copy of the instance into `dir` (which must not exist): memtables
    /// are flushed (writes skip the WAL), then RocksDB links the live files there.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), StateError> {
        let cfs: Vec<_> = self.cf_names().iter().filter_map(|n| self.db.cf_handle(n)).collect();
        self.db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())?;
        rocksdb::checkpoint::Checkpoint::new(&self.db)?.create_checkpoint(dir)?;
        Ok(())
    }

    /// Compacts every column family into as few files as the compaction style allows
    /// (benchmarks and tools: a settled instance).
    pub fn compact(&self) {
        for name in self.cf_names() {
            if let Some(cf) = self.db.cf_handle(&name) {
                self.db.compact_range_cf(&cf, None::<&[u8]>, None::<&[u8]>);
            }
        }
    }

    fn cf_names(&self) -> Vec<String> {
        DB::list_cf(&Options::default(), &self.path).unwrap_or_default()
    }

    /// Loads the SST file `sst` (written with [`sst_options`], keys in order) into operator
    /// `uid`'s state.
    pub fn ingest(&self, uid: &str, sst: &Path) -> Result<(), StateError> {
        self.ingest_files(uid, &[sst])
    }

    /// Loads the SST files `ssts` (each written with options the column family can read,
    /// keys in order; no two overlapping) into operator `uid`'s state in one ingestion: they
    /// form one sorted run, and RocksDB places them in the lowest level.
    pub fn ingest_files<P: AsRef<Path>>(&self, uid: &str, ssts: &[P]) -> Result<(), StateError> {
        let cf = self.db.cf_handle(&cf_name(uid)).expect("column family opened with the backend");
        // Moved (hard-linked) into the instance, not copied: they were written for it.
        let mut opts = rocksdb::IngestExternalFileOptions::default();
        opts.set_move_files(true);
        self.db.ingest_external_file_cf_opts(
            &cf,
            &opts,
            ssts.iter().map(AsRef::as_ref).collect(),
        )?;
        Ok(())
    }

    /// Calls `f` with every stored (key, value) of operator `uid` in the RocksDB checkpoint at
    /// `dir` (opened read-only), in key order: the key starts with its key group (2 bytes,
    /// big-endian). A checkpoint without that operator's column family has no entries.
    pub fn for_each_in_checkpoint<E: From<StateError>>(
        dir: &Path,
        uid: &str,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let names = DB::list_cf(&Options::default(), dir).map_err(StateError::from)?;
        if !names.contains(&cf_name(uid)) {
            return Ok(());
        }
        let db = DB::open_cf_for_read_only(&db_options(), dir, &names, false)
            .map_err(StateError::from)?;
        let cf = db.cf_handle(&cf_name(uid)).expect("listed above");
        // One pass over every file: read ahead, and keep the blocks out of the block cache.
        // The raw iterator lends each key and value instead of copying them.
        let mut ro = rocksdb::ReadOptions::default();
        ro.fill_cache(false);
        ro.set_readahead_size(4 << 20);
        let mut it = db.raw_iterator_cf_opt(&cf, ro);
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            f(k, v)?;
            it.next();
        }
        it.status().map_err(StateError::from)?;
        Ok(())
    }

    /// Every (key group, key, value) of operator `uid`, in key order (for tests and tools).
    pub fn scan(&self, uid: &str) -> Result<Vec<StateEntry>, StateError> {
        let cf = self.db.cf_handle(&cf_name(uid)).expect("column family opened with the backend");
        let mut out = Vec::new();
        for item in self.db.iterator_cf(&cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            let g = u16::from_be_bytes([k[0], k[1]]);
            out.push((g, k[2..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

/// The keyed state of one operator as bytes: every key starts with its key group (2 bytes,
/// big-endian), so that checkpoints, savepoints and rescaling treat it like any other keyed
/// state. Writes go straight to RocksDB (its memtable is the cache); a checkpoint flushes them.
pub struct KeyedStore {
    backend: StateBackend,
    cf: String,
    max_parallelism: u32,
    write: WriteOptions,
}

impl std::fmt::Debug for KeyedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedStore").field("cf", &self.cf).finish()
    }
}

impl KeyedStore {
    /// The number of key groups keys are spread over.
    pub fn max_parallelism(&self) -> u32 {
        self.max_parallelism
    }

    fn cf(&self) -> &rocksdb::ColumnFamily {
        self.backend.db.cf_handle(&self.cf).expect("column family opened with the backend")
    }

    /// `f` of the value of `key`, read in place (no copy of it).
    pub fn get_with<R>(
        &self,
        key: &[u8],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, StateError> {
        Ok(self.backend.db.get_pinned_cf(self.cf(), key)?.map(|v| f(&v)))
    }

    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        Ok(self.backend.db.put_cf_opt(self.cf(), key, value, &self.write)?)
    }

    pub fn delete(&self, key: &[u8]) -> Result<(), StateError> {
        Ok(self.backend.db.delete_cf_opt(self.cf(), key, &self.write)?)
    }

    /// Calls `f` with every (key, value) whose key starts with `prefix`, in key order.
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), StateError> {
        let mut it = self.backend.db.raw_iterator_cf(self.cf());
        it.seek(prefix);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(prefix) {
                break;
            }
            f(k, v);
            it.next();
        }
        Ok(it.status()?)
    }
}

/// Options for SST files that [`StateBackend::ingest`] loads.
pub fn sst_options() -> Options {
    db_options()
}

fn cf_name(uid: &str) -> String {
    format!("op:{uid}")
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
    backend: StateBackend,
    cf: String,
    max_parallelism: u32,
    cache: HashMap<Box<[u8]>, Entry>,
    cache_entries: usize,
    key_buf: Vec<u8>,
}

impl std::fmt::Debug for CachedValueState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedValueState")
            .field("cf", &self.cf)
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
        let g = key_group_of(key, self.max_parallelism);
        state_key(g, key, &mut self.key_buf);
        let cf =
            self.backend.db.cf_handle(&self.cf).expect("column family opened with the backend");
        Ok(self.backend.db.get_pinned_cf(&cf, &self.key_buf)?.and_then(|b| Num::decode(&b)))
    }

    /// Writes every changed value to RocksDB in one batch.
    pub fn write_back(&mut self) -> Result<(), StateError> {
        let cf =
            self.backend.db.cf_handle(&self.cf).expect("column family opened with the backend");
        let mut batch = WriteBatch::default();
        let mut n = 0;
        for (k, e) in self.cache.iter_mut().filter(|(_, e)| e.dirty) {
            let g = key_group_of(k, self.max_parallelism);
            state_key(g, k, &mut self.key_buf);
            match e.value {
                Some(v) => batch.put_cf(&cf, &self.key_buf, v.encode()),
                None => batch.delete_cf(&cf, &self.key_buf),
            }
            e.dirty = false;
            n += 1;
        }
        if n > 0 {
            let mut wo = WriteOptions::default();
            wo.disable_wal(true); // durability comes from checkpoints, not the WAL
            self.backend.db.write_opt(batch, &wo)?;
        }
        Ok(())
    }

    /// The key's value, from the cache or RocksDB.
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
