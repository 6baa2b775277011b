//! Where checkpoints and savepoints go: one trait, a local directory and S3 behind it, and a
//! wrapper that injects failures and delays for tests.
//!
//! Keys are `/`-separated paths relative to the storage's root (a directory, or a bucket and
//! prefix). Writes are all-or-nothing: a reader sees the whole object or none of it (a local
//! write goes to a temporary name first and is renamed). Listing is recursive, in key order.
//! Deleting a missing key is not an error.

use std::fmt::Debug;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weir_crds::StorageUri;

use crate::error::RuntimeError;
use crate::objstore::S3Client;

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key, relative to the storage's root.
    pub key: String,
    pub size: u64,
}

/// A place to keep snapshot files.
pub trait Storage: Send + Sync + Debug {
    /// Writes `bytes` as `key`, replacing what was there.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), RuntimeError>;
    /// Writes the local file `path` as `key` (large files in parts); returns its size.
    fn put_file(&self, key: &str, path: &Path) -> Result<u64, RuntimeError>;
    /// Writes as `key` what `write` writes, as it writes it (no local copy first; on S3 the
    /// parts of a multipart upload go up while `write` goes on). If `write` fails, nothing is
    /// stored and its error is returned. Returns the size written.
    fn put_streamed(&self, key: &str, write: &mut StreamWriter<'_>) -> Result<u64, RuntimeError>;
    /// The object `key`, or `None` if there is none.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RuntimeError>;
    /// Bytes `start..end` (end exclusive) of `key`.
    fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, RuntimeError>;
    /// Every object whose key starts with `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<Entry>, RuntimeError>;
    fn delete(&self, key: &str) -> Result<(), RuntimeError>;
    /// Where `key` is, for messages and metadata (`s3://...` or a path).
    fn describe(&self, key: &str) -> String;
    /// Removes directory `dir` (a key prefix without the trailing `/`) and the directories
    /// below it when nothing is left in them; object stores have no directories to remove.
    fn remove_empty_dirs(&self, _dir: &str) {}
}

/// Writes an object's bytes, for [`Storage::put_streamed`].
pub type StreamWriter<'a> = dyn FnMut(&mut dyn Write) -> Result<(), RuntimeError> + 'a;

/// Opens the storage a URI names (`s3://bucket/prefix` needs a client).
pub fn open(uri: &StorageUri, s3: Option<&S3Client>) -> Result<Box<dyn Storage>, RuntimeError> {
    match uri {
        StorageUri::Local(dir) => Ok(Box::new(LocalStorage::new(dir))),
        StorageUri::S3 { bucket, prefix } => {
            let client = s3.ok_or_else(|| RuntimeError::internal("S3 storage without a client"))?;
            Ok(Box::new(S3Storage::new(client.clone(), bucket, prefix)))
        }
    }
}

/// Opens `uri`, with an S3 client of `spec`'s settings when it is on S3.
pub fn open_uri(
    uri: &StorageUri,
    spec: Option<&weir_crds::streamjob::S3Spec>,
) -> Result<Arc<dyn Storage>, RuntimeError> {
    let s3 = match uri {
        StorageUri::S3 { .. } => Some(S3Client::new(spec)?),
        StorageUri::Local(_) => None,
    };
    Ok(Arc::from(open(uri, s3.as_ref())?))
}

fn check_key(key: &str) -> Result<(), RuntimeError> {
    if key.is_empty()
        || key.starts_with('/')
        || key.split('/').any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(RuntimeError::internal(format!("storage key {key:?} is not a relative path")));
    }
    Ok(())
}

/// Suffix of a local file being written (it starts with a dot too); never listed.
const PARTIAL: &str = ".weir-partial";

fn is_partial(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(PARTIAL)
}

/// A local directory.
#[derive(Debug)]
pub struct LocalStorage {
    root: PathBuf,
    tmp_seq: AtomicU64,
}

impl LocalStorage {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf(), tmp_seq: AtomicU64::new(0) }
    }

    fn path(&self, key: &str) -> Result<PathBuf, RuntimeError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn io(&self, what: &str, key: &str, e: std::io::Error) -> RuntimeError {
        use std::io::ErrorKind::{
            PermissionDenied, QuotaExceeded, ReadOnlyFilesystem, StorageFull,
        };
        let lasting =
            matches!(e.kind(), PermissionDenied | StorageFull | QuotaExceeded | ReadOnlyFilesystem);
        let err = RuntimeError::external(format!("{what} {}: {e}", self.describe(key)));
        if lasting { err } else { err.retryable() }
    }

    /// Writes through a temporary name in the same directory, then renames.
    fn write_atomic(
        &self,
        key: &str,
        f: impl FnOnce(&mut std::fs::File) -> std::io::Result<u64>,
    ) -> Result<u64, RuntimeError> {
        let path = self.path(key)?;
        let dir = path.parent().expect("a key has a parent: the root");
        std::fs::create_dir_all(dir).map_err(|e| self.io("creating the directory of", key, e))?;
        let name = path.file_name().expect("checked key").to_string_lossy();
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}-{n}{PARTIAL}", std::process::id()));
        let result = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            let size = f(&mut file)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(size)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(|e| self.io("writing", key, e))
    }
}

impl Storage for LocalStorage {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), RuntimeError> {
        self.write_atomic(key, |f| f.write_all(bytes).map(|_| bytes.len() as u64)).map(|_| ())
    }

    fn put_file(&self, key: &str, path: &Path) -> Result<u64, RuntimeError> {
        let mut src = std::fs::File::open(path)
            .map_err(|e| self.io(&format!("reading {} for", path.display()), key, e))?;
        self.write_atomic(key, |f| std::io::copy(&mut src, f))
    }

    fn put_streamed(&self, key: &str, write: &mut StreamWriter<'_>) -> Result<u64, RuntimeError> {
        let mut failed = None;
        let r = self.write_atomic(key, |f| {
            let mut out =
                CountingWriter { inner: std::io::BufWriter::with_capacity(1 << 20, f), n: 0 };
            if let Err(e) = write(&mut out) {
                failed = Some(e);
                return Err(std::io::Error::other("the writer failed"));
            }
            out.flush()?;
            Ok(out.n)
        });
        match failed {
            Some(e) => Err(e),
            None => r,
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RuntimeError> {
        match std::fs::read(self.path(key)?) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("reading", key, e)),
        }
    }

    fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, RuntimeError> {
        let mut f = std::fs::File::open(self.path(key)?).map_err(|e| self.io("reading", key, e))?;
        let len = f.metadata().map_err(|e| self.io("reading", key, e))?.len();
        if start > end || end > len {
            return Err(RuntimeError::internal(format!(
                "reading {}: range {start}..{end} outside its {len} bytes",
                self.describe(key)
            )));
        }
        let mut buf = vec![0u8; (end - start) as usize];
        f.seek(SeekFrom::Start(start)).map_err(|e| self.io("reading", key, e))?;
        f.read_exact(&mut buf).map_err(|e| self.io("reading", key, e))?;
        Ok(buf)
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, RuntimeError> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(d) = stack.pop() {
            let rd = match std::fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io("listing", prefix, e)),
            };
            for e in rd {
                let e = e.map_err(|e| self.io("listing", prefix, e))?;
                let p = e.path();
                let rel = p.strip_prefix(&self.root).expect("under the root");
                let key = rel.to_string_lossy().into_owned();
                let ft = e.file_type().map_err(|e| self.io("listing", prefix, e))?;
                if ft.is_dir() {
                    // Only walk directories that can hold matching keys.
                    let dir_key = format!("{key}/");
                    if dir_key.starts_with(prefix) || prefix.starts_with(&dir_key) {
                        stack.push(p);
                    }
                } else if key.starts_with(prefix) && !is_partial(&e.file_name().to_string_lossy()) {
                    let size = e.metadata().map_err(|e| self.io("listing", prefix, e))?.len();
                    out.push(Entry { key, size });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), RuntimeError> {
        match std::fs::remove_file(self.path(key)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io("deleting", key, e)),
        }
    }

    fn describe(&self, key: &str) -> String {
        self.root.join(key).display().to_string()
    }

    fn remove_empty_dirs(&self, dir: &str) {
        fn prune(d: &Path) -> bool {
            let Ok(entries) = std::fs::read_dir(d) else { return false };
            let mut empty = true;
            for e in entries.flatten() {
                let sub = e.file_type().is_ok_and(|t| t.is_dir()) && prune(&e.path());
                empty &= sub;
            }
            empty && std::fs::remove_dir(d).is_ok()
        }
        if let Ok(p) = self.path(dir) {
            prune(&p);
        }
    }
}

/// Counts the bytes written through it.
struct CountingWriter<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A bucket and a prefix on S3.
#[derive(Debug)]
pub struct S3Storage {
    client: S3Client,
    bucket: String,
    /// Empty, or ends with `/`.
    prefix: String,
}

impl S3Storage {
    pub fn new(client: S3Client, bucket: &str, prefix: &str) -> Self {
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        Self { client, bucket: bucket.to_string(), prefix }
    }

    fn key(&self, key: &str) -> Result<String, RuntimeError> {
        check_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }
}

impl Storage for S3Storage {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), RuntimeError> {
        self.client.put(&self.bucket, &self.key(key)?, bytes.to_vec())
    }

    fn put_file(&self, key: &str, path: &Path) -> Result<u64, RuntimeError> {
        let size = std::fs::metadata(path)
            .map_err(|e| RuntimeError::external(format!("reading {}: {e}", path.display())))?
            .len();
        self.client.put_file(&self.bucket, &self.key(key)?, path)?;
        Ok(size)
    }

    fn put_streamed(&self, key: &str, write: &mut StreamWriter<'_>) -> Result<u64, RuntimeError> {
        self.client.put_streamed(&self.bucket, &self.key(key)?, write)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RuntimeError> {
        self.client.get_opt(&self.bucket, &self.key(key)?)
    }

    fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, RuntimeError> {
        if start == end {
            return Ok(Vec::new());
        }
        self.client.get_range(&self.bucket, &self.key(key)?, start, end - 1, None)
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, RuntimeError> {
        let full = format!("{}{prefix}", self.prefix);
        Ok(self
            .client
            .list(&self.bucket, &full)?
            .into_iter()
            .filter_map(|o| {
                let key = o.key.strip_prefix(&self.prefix)?.to_string();
                Some(Entry { key, size: o.size })
            })
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), RuntimeError> {
        self.client.delete(&self.bucket, &self.key(key)?)
    }

    fn describe(&self, key: &str) -> String {
        format!("s3://{}/{}{key}", self.bucket, self.prefix)
    }
}

/// What [`Faulty`] does to the calls it passes on.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Fail every `n`-th call (1: every call; 0: never), before it reaches the storage.
    pub fail_every: u64,
    /// Fail writes after they reached the storage (the write happened; the caller is told it
    /// did not), as when a connection drops before the answer.
    pub fail_after_write: bool,
    /// Wait this long before every call.
    pub delay: Duration,
}

/// Wraps a storage and injects failures and delays, for tests of everything that stores.
#[derive(Debug)]
pub struct Faulty<S> {
    inner: S,
    faults: Mutex<Faults>,
    calls: AtomicU64,
    /// Failures injected so far.
    pub injected: AtomicU64,
}

impl<S: Storage> Faulty<S> {
    pub fn new(inner: S, faults: Faults) -> Self {
        Self {
            inner,
            faults: Mutex::new(faults),
            calls: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    pub fn set(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
    }

    fn before(&self, op: &str, key: &str) -> Result<bool, RuntimeError> {
        let f = self.faults.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !f.delay.is_zero() {
            std::thread::sleep(f.delay);
        }
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        if f.fail_every > 0 && n.is_multiple_of(f.fail_every) {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(injected(op, &self.inner.describe(key)));
        }
        Ok(f.fail_after_write)
    }

    fn after_write(&self, fail: bool, op: &str, key: &str) -> Result<(), RuntimeError> {
        if fail {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(injected(op, &self.inner.describe(key)));
        }
        Ok(())
    }
}

fn injected(op: &str, what: &str) -> RuntimeError {
    RuntimeError::external(format!("{op} {what}: injected failure")).retryable()
}

impl<S: Storage> Storage for Faulty<S> {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), RuntimeError> {
        let fail = self.before("writing", key)?;
        self.inner.put(key, bytes)?;
        self.after_write(fail, "writing", key)
    }

    fn put_file(&self, key: &str, path: &Path) -> Result<u64, RuntimeError> {
        let fail = self.before("writing", key)?;
        let n = self.inner.put_file(key, path)?;
        self.after_write(fail, "writing", key).map(|_| n)
    }

    fn put_streamed(&self, key: &str, write: &mut StreamWriter<'_>) -> Result<u64, RuntimeError> {
        let fail = self.before("writing", key)?;
        let n = self.inner.put_streamed(key, write)?;
        self.after_write(fail, "writing", key).map(|_| n)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RuntimeError> {
        self.before("reading", key)?;
        self.inner.get(key)
    }

    fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, RuntimeError> {
        self.before("reading", key)?;
        self.inner.get_range(key, start, end)
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, RuntimeError> {
        self.before("listing", prefix)?;
        self.inner.list(prefix)
    }

    fn delete(&self, key: &str) -> Result<(), RuntimeError> {
        let fail = self.before("deleting", key)?;
        self.inner.delete(key)?;
        self.after_write(fail, "deleting", key)
    }

    fn describe(&self, key: &str) -> String {
        self.inner.describe(key)
    }

    fn remove_empty_dirs(&self, dir: &str) {
        self.inner.remove_empty_dirs(dir)
    }
}

/// A storage seen below a prefix: key `k` is `<prefix>/k` of the storage underneath.
#[derive(Debug, Clone)]
pub struct Prefixed {
    inner: std::sync::Arc<dyn Storage>,
    prefix: String,
}

impl Prefixed {
    /// `prefix` without leading or trailing `/`; empty for the root.
    pub fn new(inner: std::sync::Arc<dyn Storage>, prefix: &str) -> Self {
        Self { inner, prefix: prefix.trim_matches('/').to_string() }
    }

    fn full(&self, key: &str) -> String {
        if self.prefix.is_empty() { key.to_string() } else { format!("{}/{key}", self.prefix) }
    }
}

impl Storage for Prefixed {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), RuntimeError> {
        self.inner.put(&self.full(key), bytes)
    }

    fn put_file(&self, key: &str, path: &Path) -> Result<u64, RuntimeError> {
        self.inner.put_file(&self.full(key), path)
    }

    fn put_streamed(&self, key: &str, write: &mut StreamWriter<'_>) -> Result<u64, RuntimeError> {
        self.inner.put_streamed(&self.full(key), write)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RuntimeError> {
        self.inner.get(&self.full(key))
    }

    fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, RuntimeError> {
        self.inner.get_range(&self.full(key), start, end)
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, RuntimeError> {
        let cut = if self.prefix.is_empty() { 0 } else { self.prefix.len() + 1 };
        let mut out = self.inner.list(&self.full(prefix))?;
        for e in &mut out {
            e.key = e.key[cut..].to_string();
        }
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), RuntimeError> {
        self.inner.delete(&self.full(key))
    }

    fn describe(&self, key: &str) -> String {
        self.inner.describe(&self.full(key))
    }

    fn remove_empty_dirs(&self, dir: &str) {
        self.inner.remove_empty_dirs(&self.full(dir))
    }
}
