//! The heap backend: keyed state in the worker's memory, a sorted map per key group and
//! operator. No disk, no serialization on the way to a value: the fastest path, for state
//! that fits the worker's memory (`/v1/job` and `weir_subtask_state_bytes` show how much it
//! holds).
//!
//! A checkpoint copies every table, under its lock, into a keyed state file of savepoints'
//! format 1 (entries in key order, an offset and an XXH3 checksum per key group), which the
//! upload sends as it is: a full snapshot each time, no incremental one. Restoring reads those
//! files back at any parallelism (each subtask its own key groups' byte range); a savepoint's
//! SST files are read through a scratch RocksDB instance, since RocksDB reads its tables.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use super::{Backend, Batch, HeapImage, LocalSnapshot, StateBackendKind, StateError, Table};
use crate::error::RuntimeError;
use crate::exchange::wire::put_varint;

/// What an entry costs beyond its key's and value's bytes, as counted in the state's size:
/// the map's node share and the two allocations' headers (an estimate).
const ENTRY_OVERHEAD: u64 = 48;

/// The entries of one key group: keys without their key group's two bytes.
type Group = BTreeMap<Box<[u8]>, Box<[u8]>>;

#[derive(Debug, Default)]
struct HeapTable {
    /// By key group (grown as groups are written).
    groups: Vec<Group>,
    bytes: u64,
}

impl HeapTable {
    fn put(&mut self, g: u16, rest: &[u8], value: &[u8]) {
        let g = usize::from(g);
        if self.groups.len() <= g {
            self.groups.resize_with(g + 1, Group::new);
        }
        let map = &mut self.groups[g];
        match map.get_mut(rest) {
            Some(v) => {
                self.bytes = self.bytes - v.len() as u64 + value.len() as u64;
                *v = value.into();
            }
            None => {
                self.bytes += (rest.len() + 2 + value.len()) as u64 + ENTRY_OVERHEAD;
                map.insert(rest.into(), value.into());
            }
        }
    }

    fn delete(&mut self, g: u16, rest: &[u8]) {
        if let Some(v) = self.groups.get_mut(usize::from(g)).and_then(|m| m.remove(rest)) {
            self.bytes -= (rest.len() + 2 + v.len()) as u64 + ENTRY_OVERHEAD;
        }
    }
}

/// A key's key group and the rest of it.
fn split(key: &[u8]) -> Result<(u16, &[u8]), StateError> {
    match key {
        [a, b, rest @ ..] => Ok((u16::from_be_bytes([*a, *b]), rest)),
        _ => Err(StateError::Other(format!("a key of {} bytes has no key group", key.len()))),
    }
}

/// One subtask's heap instance.
#[derive(Debug)]
pub struct Heap {
    uids: Vec<String>,
    tables: Vec<Mutex<HeapTable>>,
}

impl Heap {
    pub fn new(operators: &[String]) -> Self {
        Self {
            uids: operators.to_vec(),
            tables: operators.iter().map(|_| Mutex::default()).collect(),
        }
    }

    fn lock(&self, t: Table) -> MutexGuard<'_, HeapTable> {
        // A panic while the table was held cannot leave a map half changed: take it.
        self.tables[t].lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for Heap {
    fn kind(&self) -> StateBackendKind {
        StateBackendKind::Heap
    }

    fn table(&self, uid: &str) -> Option<Table> {
        self.uids.iter().position(|u| u == uid)
    }

    fn get(&self, t: Table, key: &[u8], f: &mut dyn FnMut(&[u8])) -> Result<bool, StateError> {
        let (g, rest) = split(key)?;
        let table = self.lock(t);
        Ok(match table.groups.get(usize::from(g)).and_then(|m| m.get(rest)) {
            Some(v) => {
                f(v);
                true
            }
            None => false,
        })
    }

    fn put(&self, t: Table, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        let (g, rest) = split(key)?;
        self.lock(t).put(g, rest, value);
        Ok(())
    }

    fn delete(&self, t: Table, key: &[u8]) -> Result<(), StateError> {
        let (g, rest) = split(key)?;
        self.lock(t).delete(g, rest);
        Ok(())
    }

    fn write(&self, t: Table, batch: &Batch) -> Result<(), StateError> {
        let mut table = self.lock(t);
        for (k, v) in batch.iter() {
            let (g, rest) = split(k)?;
            match v {
                Some(v) => table.put(g, rest, v),
                None => table.delete(g, rest),
            }
        }
        Ok(())
    }

    fn scan_prefix(
        &self,
        t: Table,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), StateError> {
        let table = self.lock(t);
        let mut key = Vec::new();
        let mut visit = |g: usize, map: &Group, rest: &[u8]| {
            let from = (Bound::Included(rest), Bound::Unbounded);
            for (k, v) in map.range::<[u8], _>(from) {
                if !k.starts_with(rest) {
                    break;
                }
                key.clear();
                key.extend_from_slice(&(g as u16).to_be_bytes());
                key.extend_from_slice(k);
                f(&key, v);
            }
        };
        match split(prefix) {
            Ok((g, rest)) => {
                if let Some(map) = table.groups.get(usize::from(g)) {
                    visit(usize::from(g), map, rest);
                }
            }
            // A prefix shorter than a key group: every group it begins.
            Err(_) => {
                for (g, map) in table.groups.iter().enumerate() {
                    if (g as u16).to_be_bytes().starts_with(prefix) {
                        visit(g, map, &[]);
                    }
                }
            }
        }
        Ok(())
    }

    fn size_bytes(&self, t: Table) -> u64 {
        self.lock(t).bytes
    }

    /// Every table encoded as a keyed state file of format 1, while it is held: one pass
    /// over the state, in memory (on the checkpoint's thread for the built-in aggregates).
    fn snapshot(
        &self,
        local: &Path,
        key_groups: (u16, u16),
    ) -> Result<LocalSnapshot, RuntimeError> {
        let (first, last) = key_groups;
        let mut images = Vec::with_capacity(self.tables.len());
        for (t, uid) in self.uids.iter().enumerate() {
            let table = self.lock(t);
            if let Some(g) = table
                .groups
                .iter()
                .enumerate()
                .find(|(g, m)| !m.is_empty() && (*g < usize::from(first) || *g > usize::from(last)))
                .map(|(g, _)| g)
            {
                return Err(RuntimeError::internal(format!(
                    "operator {uid:?}: state in key group {g}, outside this subtask's {first}..={last}"
                )));
            }
            let magic = crate::savepoint::KEYED_MAGIC;
            let mut bytes = Vec::with_capacity(magic.len() + table.bytes as usize);
            bytes.extend_from_slice(magic);
            let n = usize::from(last - first) + 1;
            let (mut offsets, mut checksums) = (Vec::with_capacity(n + 1), Vec::with_capacity(n));
            let mut entries = 0;
            for g in first..=last {
                let start = bytes.len();
                offsets.push(start as u64);
                if let Some(map) = table.groups.get(usize::from(g)) {
                    for (k, v) in map {
                        put_varint(&mut bytes, k.len() as u64 + 2);
                        bytes.extend_from_slice(&g.to_be_bytes());
                        bytes.extend_from_slice(k);
                        put_varint(&mut bytes, v.len() as u64);
                        bytes.extend_from_slice(v);
                    }
                    entries += map.len() as u64;
                }
                checksums.push(if bytes.len() > start {
                    xxhash_rust::xxh3::xxh3_64(&bytes[start..])
                } else {
                    0
                });
            }
            offsets.push(bytes.len() as u64);
            images.push(HeapImage { uid: uid.clone(), bytes, offsets, checksums, entries });
        }
        Ok(LocalSnapshot::Heap { images, scratch: local.to_path_buf() })
    }

    /// The files are ingested into a scratch RocksDB instance beside them, whose entries are
    /// then read into the table.
    fn ingest_files(&self, t: Table, ssts: &[&Path]) -> Result<(), StateError> {
        let Some(first) = ssts.first() else { return Ok(()) };
        let dir = first.with_extension("heap-ingest");
        let _ = std::fs::remove_dir_all(&dir);
        let result = (|| {
            let uid = self.uids[t].clone();
            let scratch = super::rocksdb::RocksDb::open(&dir, std::slice::from_ref(&uid))?;
            scratch.ingest_files(0, ssts)?;
            let mut table = self.lock(t);
            let mut bad = None;
            scratch.scan_prefix(0, &[], &mut |k, v| match split(k) {
                Ok((g, rest)) => table.put(g, rest, v),
                Err(e) => bad = Some(e),
            })?;
            bad.map_or(Ok(()), Err)
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateBackend;

    /// A heap instance with one table, "a" (it keeps nothing at its path).
    fn heap() -> StateBackend {
        StateBackend::open_kind(StateBackendKind::Heap, Path::new("/nonexistent"), &["a".into()])
            .unwrap()
    }

    #[test]
    fn puts_gets_deletes_and_counts_its_bytes() {
        let b = heap();
        let s = b.keyed_store("a", 128);
        assert_eq!(b.size_bytes(), 0);
        s.put(&[0, 5, b'k'], b"one").unwrap();
        s.put(&[0, 5, b'k'], b"three").unwrap();
        s.put(&[0, 2, b'x', b'y'], b"v").unwrap();
        assert_eq!(s.get_with(&[0, 5, b'k'], |v| v.to_vec()).unwrap(), Some(b"three".to_vec()));
        assert_eq!(s.get_with(&[0, 5, b'q'], |v| v.to_vec()).unwrap(), None);
        assert_eq!(b.size_bytes(), (3 + 5 + 4 + 1) + 2 * ENTRY_OVERHEAD);
        s.delete(&[0, 5, b'k']).unwrap();
        assert_eq!(b.size_bytes(), 4 + 1 + ENTRY_OVERHEAD);
        // A key too short to have a key group is an error, not a panic.
        assert!(s.put(&[7], b"v").is_err());
        assert!(s.get_with(&[], |_| ()).is_err());
    }

    #[test]
    fn scans_by_prefix_in_key_order_within_and_across_key_groups() {
        let b = heap();
        let s = b.keyed_store("a", 128);
        for k in [&[0u8, 3, 2, 9][..], &[0, 3, 1], &[0, 3, 1, 5], &[0, 1, 1], &[0, 4]] {
            s.put(k, b"").unwrap();
        }
        let mut seen = Vec::new();
        s.scan_prefix(&[0, 3, 1], |k, _| seen.push(k.to_vec())).unwrap();
        assert_eq!(seen, vec![vec![0, 3, 1], vec![0, 3, 1, 5]]);
        let rows = b.scan("a").unwrap();
        let keys: Vec<(u16, Vec<u8>)> = rows.into_iter().map(|(g, k, _)| (g, k)).collect();
        assert_eq!(
            keys,
            vec![(1, vec![1]), (3, vec![1]), (3, vec![1, 5]), (3, vec![2, 9]), (4, vec![])]
        );
    }

    #[test]
    fn a_snapshot_is_a_keyed_file_that_reads_back_and_refuses_foreign_key_groups() {
        let b = heap();
        let s = b.keyed_store("a", 128);
        s.put(&[0, 2, b'x'], b"1").unwrap();
        s.put(&[0, 4, b'y'], b"22").unwrap();
        let snap = b.snapshot(Path::new("/nonexistent/chk"), (2, 5)).unwrap();
        let LocalSnapshot::Heap { images, .. } = &snap else { panic!("{snap:?}") };
        let image = &images[0];
        assert_eq!(image.entries, 2);
        assert_eq!(image.offsets.len(), 5);
        assert_eq!(image.checksums[1], 0); // group 3 is empty
        assert_eq!(*image.offsets.last().unwrap(), image.bytes.len() as u64);
        let mut back = Vec::new();
        snap.for_each("a", &mut |k, v| {
            back.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            back,
            vec![(vec![0, 2, b'x'], b"1".to_vec()), (vec![0, 4, b'y'], b"22".to_vec())]
        );
        let e = b.snapshot(Path::new("/nonexistent/chk"), (3, 5)).unwrap_err();
        assert!(e.message.contains("key group 2"), "{}", e.message);
    }
}
