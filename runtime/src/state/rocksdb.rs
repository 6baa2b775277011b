//! The RocksDB backend: one instance per subtask on the worker's disk, one column family per
//! operator (by uid). Writes skip the WAL: durability comes from checkpoints, which flush the
//! memtables and link the live files into a directory ([`Backend::snapshot`]), uploaded
//! incrementally by [`crate::snapshot`].

use std::path::{Path, PathBuf};

use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};

use super::{Backend, Batch, LocalSnapshot, StateBackendKind, StateError, Table};
use crate::error::RuntimeError;

/// The options of every column family, and of the SST files savepoints hold.
pub fn db_options() -> Options {
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
    // Every checkpoint adds a sorted run (a flush, or the ingested file of a cache's
    // changes): merging them only once 8 have gathered rather than RocksDB's 4 halves the
    // rewriting, and the uploading of what compaction rewrote, at one-second checkpoints.
    o.set_level_zero_file_num_compaction_trigger(8);
    o
}

/// The size from which a sorted batch is written as an SST file and ingested rather than put
/// into the memtable: below it, the file's creation and the ingestion's manifest write cost
/// more than the inserts.
pub const INGEST_AT: usize = 4096;

pub(super) fn cf_name(uid: &str) -> String {
    format!("op:{uid}")
}

/// One subtask's RocksDB instance.
pub struct RocksDb {
    db: DB,
    path: PathBuf,
    /// The column family of each table.
    cfs: Vec<String>,
    uids: Vec<String>,
    /// Without the WAL. RocksDB's options are `Send` but not `Sync`: held in a lock that
    /// only the subtask's thread takes.
    write: std::sync::Mutex<WriteOptions>,
}

impl std::fmt::Debug for RocksDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksDb").field("path", &self.path).field("uids", &self.uids).finish()
    }
}

impl RocksDb {
    /// Opens (creating) the instance at `path` with a column family for each of `operators`.
    pub fn open(path: &Path, operators: &[String]) -> Result<Self, StateError> {
        std::fs::create_dir_all(path).ok();
        let cfs: Vec<String> = operators.iter().map(|u| cf_name(u)).collect();
        let descriptors = cfs.iter().map(|n| ColumnFamilyDescriptor::new(n, db_options()));
        let db = DB::open_cf_descriptors(&db_options(), path, descriptors)?;
        let mut write = WriteOptions::default();
        write.disable_wal(true); // durability comes from checkpoints, not the WAL
        Ok(Self {
            db,
            path: path.to_path_buf(),
            cfs,
            uids: operators.to_vec(),
            write: std::sync::Mutex::new(write),
        })
    }

    fn cf(&self, t: Table) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(&self.cfs[t]).expect("column family opened with the backend")
    }

    fn wo(&self) -> std::sync::MutexGuard<'_, WriteOptions> {
        self.write.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cf_names(&self) -> Vec<String> {
        DB::list_cf(&Options::default(), &self.path).unwrap_or_default()
    }
}

impl Backend for RocksDb {
    fn kind(&self) -> StateBackendKind {
        StateBackendKind::Rocksdb
    }

    fn table(&self, uid: &str) -> Option<Table> {
        self.uids.iter().position(|u| u == uid)
    }

    fn get(&self, t: Table, key: &[u8], f: &mut dyn FnMut(&[u8])) -> Result<bool, StateError> {
        Ok(match self.db.get_pinned_cf(self.cf(t), key)? {
            Some(v) => {
                f(&v);
                true
            }
            None => false,
        })
    }

    fn put(&self, t: Table, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        Ok(self.db.put_cf_opt(self.cf(t), key, value, &self.wo())?)
    }

    fn delete(&self, t: Table, key: &[u8]) -> Result<(), StateError> {
        Ok(self.db.delete_cf_opt(self.cf(t), key, &self.wo())?)
    }

    fn write(&self, t: Table, batch: &Batch) -> Result<(), StateError> {
        let cf = self.cf(t);
        let mut b = WriteBatch::default();
        for (k, v) in batch.iter() {
            match v {
                Some(v) => b.put_cf(cf, k, v),
                None => b.delete_cf(cf, k),
            }
        }
        Ok(self.db.write_opt(b, &self.wo())?)
    }

    /// A batch of at least [`INGEST_AT`] writes becomes an SST file that is ingested: no
    /// memtable inserts, and no flush of them at the snapshot that follows.
    fn write_sorted(&self, t: Table, batch: &Batch, scratch: &Path) -> Result<(), StateError> {
        if batch.len() < INGEST_AT {
            return self.write(t, batch);
        }
        let options = db_options();
        let mut w = rocksdb::SstFileWriter::create(&options);
        let written = w.open(scratch).and_then(|()| {
            for (k, v) in batch.iter() {
                match v {
                    Some(v) => w.put(k, v)?,
                    None => w.delete(k)?,
                }
            }
            w.finish()
        });
        drop(w);
        let result =
            written.map_err(StateError::from).and_then(|()| self.ingest_files(t, &[scratch]));
        let _ = std::fs::remove_file(scratch);
        result
    }

    fn scan_prefix(
        &self,
        t: Table,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), StateError> {
        let mut it = self.db.raw_iterator_cf(self.cf(t));
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

    /// RocksDB's estimate of the bytes of live state, on disk and in memtables.
    fn size_bytes(&self, t: Table) -> u64 {
        let cf = self.cf(t);
        ["rocksdb.estimate-live-data-size", "rocksdb.cur-size-all-mem-tables"]
            .into_iter()
            .map(|p| self.db.property_int_value_cf(cf, p).ok().flatten().unwrap_or(0))
            .sum()
    }

    /// Memtables are flushed (writes skip the WAL), then RocksDB links the live files into
    /// `local`.
    fn snapshot(&self, local: &Path, _: (u16, u16)) -> Result<LocalSnapshot, RuntimeError> {
        let internal = |e: rocksdb::Error| RuntimeError::internal(StateError::from(e).to_string());
        let cfs: Vec<_> = self.cf_names().iter().filter_map(|n| self.db.cf_handle(n)).collect();
        self.db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default()).map_err(internal)?;
        rocksdb::checkpoint::Checkpoint::new(&self.db)
            .and_then(|c| c.create_checkpoint(local))
            .map_err(internal)?;
        Ok(LocalSnapshot::RocksDb(local.to_path_buf()))
    }

    fn ingest_files(&self, t: Table, ssts: &[&Path]) -> Result<(), StateError> {
        // Moved (hard-linked) into the instance, not copied: they were written for it.
        let mut opts = rocksdb::IngestExternalFileOptions::default();
        opts.set_move_files(true);
        Ok(self.db.ingest_external_file_cf_opts(self.cf(t), &opts, ssts.to_vec())?)
    }

    fn compact(&self) {
        for name in self.cf_names() {
            if let Some(cf) = self.db.cf_handle(&name) {
                self.db.compact_range_cf(&cf, None::<&[u8]>, None::<&[u8]>);
            }
        }
    }
}

/// Calls `f` with every stored (key, value) of operator `uid` in the RocksDB checkpoint at
/// `dir` (opened read-only), in key order: the key starts with its key group (2 bytes,
/// big-endian). A checkpoint without that operator's column family has no entries.
pub fn for_each_in_checkpoint(
    dir: &Path,
    uid: &str,
    f: &mut crate::savepoint::EntryVisitor<'_>,
) -> Result<(), RuntimeError> {
    let state = |e: rocksdb::Error| RuntimeError::internal(StateError::from(e).to_string());
    let names = DB::list_cf(&Options::default(), dir).map_err(state)?;
    if !names.contains(&cf_name(uid)) {
        return Ok(());
    }
    let db = DB::open_cf_for_read_only(&db_options(), dir, &names, false).map_err(state)?;
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
    it.status().map_err(state)
}
