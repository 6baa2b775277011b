//! Keyed-state snapshots in storage: a subtask's RocksDB checkpoint (hard links, taken
//! synchronously) uploaded to a [`Storage`], incrementally.
//!
//! SST files never change once written and their names are unique within an instance, so
//! they go to `shared/<instance>/<name>` and a later snapshot of the same instance uploads
//! only the SST files that earlier ones have not. An instance restored from a snapshot goes on
//! from that snapshot's files (RocksDB numbers new files above the ones it has), so its first
//! snapshot names the restored files where they already are and uploads only the new ones,
//! under its own instance. The few other files (MANIFEST, CURRENT, OPTIONS) change and go
//! under the snapshot's own prefix every time. A [`StateHandle`] lists every file a snapshot
//! needs; a shared file may be deleted only when no retained snapshot's handle names it
//! ([`unreferenced`]).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;
use crate::state::StateBackend;
use crate::storage::Storage;

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotFile {
    /// The file's name in the RocksDB directory.
    pub name: String,
    /// Where it is in the storage.
    pub key: String,
    pub size: u64,
}

/// Everything needed to bring one subtask's keyed state back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateHandle {
    /// Names the RocksDB instance the files came from (its SST names are unique within it).
    pub instance: String,
    /// The key groups the instance held, first and last.
    pub key_groups: (u16, u16),
    pub files: Vec<SnapshotFile>,
}

impl StateHandle {
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// What an upload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uploaded {
    pub files: usize,
    pub bytes: u64,
}

/// Files uploaded at the same time.
pub const UPLOADS: usize = 4;

fn io(what: &str, p: &Path, e: std::io::Error) -> RuntimeError {
    RuntimeError::internal(format!("{what} {}: {e}", p.display()))
}

/// Takes the synchronous part of a snapshot: a RocksDB checkpoint of `backend` in `local`
/// (which must not exist).
pub fn take(backend: &StateBackend, local: &Path) -> Result<(), RuntimeError> {
    backend.snapshot(local, (0, u16::MAX)).map(drop)
}

/// Uploads the checkpoint in `local` (the asynchronous part). SST files already in
/// `previous` are not sent again: it is the handle of an earlier snapshot of this instance,
/// or of the snapshot the instance was restored from (whose files it started with). A file
/// of `previous` counts only if the local file of that name has its size; the other SST files
/// go under `shared/<instance>/`, the rest under `own_prefix`.
pub fn upload(
    storage: &dyn Storage,
    local: &Path,
    instance: &str,
    key_groups: (u16, u16),
    own_prefix: &str,
    previous: Option<&StateHandle>,
) -> Result<(StateHandle, Uploaded), RuntimeError> {
    let known: HashMap<&str, &SnapshotFile> = previous
        .map(|p| {
            p.files
                .iter()
                .filter(|f| f.name.ends_with(".sst"))
                .map(|f| (f.name.as_str(), f))
                .collect()
        })
        .unwrap_or_default();
    let mut names: Vec<String> = std::fs::read_dir(local)
        .map_err(|e| io("reading", local, e))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| io("reading", local, e))?;
    names.sort();
    // Files already uploaded are named again; the others go up, several at a time.
    let mut files: Vec<Option<SnapshotFile>> = Vec::with_capacity(names.len());
    let mut todo: Vec<(usize, String, String)> = Vec::new();
    for name in names {
        if let Some(f) = known.get(name.as_str()) {
            let path = local.join(&name);
            let size = std::fs::metadata(&path).map_err(|e| io("reading", &path, e))?.len();
            if size == f.size {
                files.push(Some((*f).clone()));
                continue;
            }
        }
        let key = if name.ends_with(".sst") {
            format!("shared/{instance}/{name}")
        } else {
            format!("{own_prefix}/{instance}/{name}")
        };
        todo.push((files.len(), name, key));
        files.push(None);
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Result<Vec<(usize, SnapshotFile)>, RuntimeError>> =
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..UPLOADS.min(todo.len()))
                .map(|_| {
                    scope.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some((at, name, key)) = todo.get(i) else { return Ok(out) };
                            let size = storage.put_file(key, &local.join(name))?;
                            out.push((
                                *at,
                                SnapshotFile { name: name.clone(), key: key.clone(), size },
                            ));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join().unwrap_or_else(|_| Err(RuntimeError::internal("an upload panicked")))
                })
                .collect()
        });
    let mut done = Uploaded::default();
    for r in results {
        for (at, f) in r? {
            done.files += 1;
            done.bytes += f.size;
            files[at] = Some(f);
        }
    }
    let files: Vec<SnapshotFile> = files.into_iter().map(|f| f.expect("uploaded")).collect();
    Ok((StateHandle { instance: instance.to_string(), key_groups, files }, done))
}

/// Downloads the files of `handle` into `dir` (created), ready for [`StateBackend::open`].
pub fn download(
    storage: &dyn Storage,
    handle: &StateHandle,
    dir: &Path,
) -> Result<(), RuntimeError> {
    std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
    for f in &handle.files {
        let bytes = storage.get(&f.key)?.ok_or_else(|| {
            RuntimeError::damaged(format!(
                "the snapshot file {} is missing: the snapshot cannot be restored",
                storage.describe(&f.key)
            ))
        })?;
        if bytes.len() as u64 != f.size {
            return Err(RuntimeError::damaged(format!(
                "the snapshot file {} has {} bytes, not the {} its snapshot recorded",
                storage.describe(&f.key),
                bytes.len(),
                f.size
            )));
        }
        let path = dir.join(&f.name);
        std::fs::write(&path, bytes).map_err(|e| io("writing", &path, e))?;
    }
    Ok(())
}

/// The shared files of `dropped` snapshots that no `retained` one names: these can go.
pub fn unreferenced<'a>(
    dropped: impl IntoIterator<Item = &'a StateHandle>,
    retained: impl IntoIterator<Item = &'a StateHandle>,
) -> Vec<String> {
    let keep: BTreeSet<&str> =
        retained.into_iter().flat_map(|h| h.files.iter().map(|f| f.key.as_str())).collect();
    let drop: BTreeSet<&str> = dropped
        .into_iter()
        .flat_map(|h| h.files.iter().map(|f| f.key.as_str()))
        .filter(|k| k.starts_with("shared/") && !keep.contains(k))
        .collect();
    drop.into_iter().map(str::to_string).collect()
}
