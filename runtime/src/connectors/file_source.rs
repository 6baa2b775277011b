//! The `file_source`: lines of the files under a local directory or an S3 prefix, each file a
//! split, read from the position the checkpoint recorded.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use weir_crds::StorageUri;

use super::Pacer;
use super::format::{LineBuffer, SourceDecoder};
use crate::error::RuntimeError;
use crate::objstore::S3Client;
use crate::operator::{Rescale, Source, bad_state};
use crate::record::Record;

/// One file of a file source (a split): a local file, or an S3 object as listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SourceFile {
    Local(PathBuf),
    S3 {
        bucket: String,
        key: String,
        /// The size when listed: the object is read up to here.
        size: u64,
        /// The entity tag when listed: reading fails if the object is replaced meanwhile.
        etag: Option<String>,
    },
}

impl std::fmt::Display for SourceFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceFile::Local(p) => write!(f, "{}", p.display()),
            SourceFile::S3 { bucket, key, .. } => write!(f, "s3://{bucket}/{key}"),
        }
    }
}

/// Every file under a local directory or an S3 prefix (sorted by path or key, names starting
/// with `.` or `_` skipped, at any level below the directory or prefix), one record per line;
/// each file is a split, dealt round-robin.
pub struct FileSource {
    /// The files still to read and where in each, the next one last.
    files: Vec<(SourceFile, u64)>,
    s3: Option<S3Client>,
    /// The file being read, its name, the offset of the next line and its reader.
    current: Option<(SourceFile, String, u64, Box<dyn BufRead + Send>)>,
    pacer: Pacer,
    buf: LineBuffer,
    /// Lines to records, with the source's `onError`.
    decoder: SourceDecoder,
    /// Lines read of the current file, and the offset it was opened at (for messages).
    line: (u64, u64),
}

/// A file of a file source's position: read from `offset` on.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct FilePosition {
    file: SourceFile,
    offset: u64,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("files_left", &self.files.len())
            .field("current", &self.current.as_ref().map(|c| &c.1))
            .finish_non_exhaustive()
    }
}

/// Whether a file source skips a name (a path segment below its directory or prefix).
fn hidden(name: &str) -> bool {
    name.starts_with('.') || name.starts_with('_')
}

/// The files of a directory tree that a file source reads, in order.
pub fn list_files(dir: &Path) -> Result<Vec<PathBuf>, RuntimeError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(|e| {
            RuntimeError::user(format!("file_source: reading directory {}: {e}", d.display()))
        })?;
        for e in rd {
            let e = e.map_err(|e| {
                RuntimeError::external(format!("file_source: {}: {e}", d.display()))
            })?;
            let name = e.file_name();
            if hidden(&name.to_string_lossy()) {
                continue;
            }
            let p = e.path();
            if p.is_dir() { stack.push(p) } else { out.push(p) }
        }
    }
    out.sort();
    Ok(out)
}

/// The files a file source reads at `uri`, in order: a local directory tree, or every object
/// under an S3 prefix (as if the prefix were a directory: `s3://b/in` reads `in/...`, not
/// `input/...`; keys ending in `/` are folder markers and skipped).
pub fn list_source_files(
    uri: &StorageUri,
    s3: Option<&S3Client>,
) -> Result<Vec<SourceFile>, RuntimeError> {
    match uri {
        StorageUri::Local(dir) => Ok(list_files(dir)?.into_iter().map(SourceFile::Local).collect()),
        StorageUri::S3 { bucket, prefix } => {
            let s3 = s3.ok_or_else(|| {
                RuntimeError::internal(format!("file_source: reading {uri} needs an S3 client"))
            })?;
            let dir = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
            let objects = s3.list(bucket, &dir).map_err(|e| RuntimeError {
                message: format!("file_source: {}", e.message),
                ..e
            })?;
            Ok(objects
                .into_iter()
                .filter(|o| {
                    let rel = &o.key[dir.len().min(o.key.len())..];
                    !rel.is_empty() && !rel.ends_with('/') && !rel.split('/').any(hidden)
                })
                .map(|o| SourceFile::S3 {
                    bucket: bucket.clone(),
                    key: o.key,
                    size: o.size,
                    etag: o.etag,
                })
                .collect())
        }
    }
}

/// Bytes an S3 source reads per request.
pub const S3_READ_CHUNK: u64 = 8 << 20;

/// Reads an S3 object in ranged GETs of [`S3_READ_CHUNK`] bytes, so that a large object
/// never sits in memory whole.
struct ObjectReader {
    client: S3Client,
    bucket: String,
    key: String,
    size: u64,
    etag: Option<String>,
    /// Offset of the next request.
    next: u64,
    chunk: Vec<u8>,
    at: usize,
}

impl std::io::Read for ObjectReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = {
            let have = self.fill_buf()?;
            let n = have.len().min(out.len());
            out[..n].copy_from_slice(&have[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ObjectReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.at >= self.chunk.len() && self.next < self.size {
            let end = (self.next + S3_READ_CHUNK).min(self.size) - 1;
            let bytes = self
                .client
                .get_range(&self.bucket, &self.key, self.next, end, self.etag.as_deref())
                .map_err(std::io::Error::other)?;
            let want = end - self.next + 1;
            if bytes.is_empty() || bytes.len() as u64 > want {
                return Err(std::io::Error::other(RuntimeError::external(format!(
                    "S3 reading s3://{}/{} (bytes={}-{end}): {} bytes came back instead of {want}",
                    self.bucket,
                    self.key,
                    self.next,
                    bytes.len()
                ))));
            }
            self.next += bytes.len() as u64;
            self.chunk = bytes;
            self.at = 0;
        }
        Ok(&self.chunk[self.at..])
    }

    fn consume(&mut self, n: usize) {
        self.at = (self.at + n).min(self.chunk.len());
    }
}

/// The runtime error inside an I/O error, or a new one naming the file.
fn io_error(e: std::io::Error, file: &str) -> RuntimeError {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<RuntimeError>()) {
        Some(inner) => inner.clone(),
        None => RuntimeError::external(format!("file_source: {file}: {e}")),
    }
}

impl FileSource {
    /// Subtask `subtask` of `parallelism`: reads the files `i` with `i % parallelism ==
    /// subtask`, at its share of `rate` records per second. `s3` is needed for S3 files.
    pub fn new(
        files: &[SourceFile],
        s3: Option<S3Client>,
        rate: Option<f64>,
        subtask: u32,
        parallelism: u32,
    ) -> Self {
        let mine: Vec<SourceFile> = files
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 % parallelism == subtask)
            .map(|(_, f)| f.clone())
            .collect();
        let share = if files.is_empty() { 0.0 } else { mine.len() as f64 / files.len() as f64 };
        Self {
            files: mine.into_iter().rev().map(|f| (f, 0)).collect(),
            s3,
            current: None,
            pacer: Pacer::new(rate.map(|r| r * share)),
            buf: LineBuffer::new(),
            decoder: SourceDecoder::text("file_source"),
            line: (0, 0),
        }
    }

    /// Reads its lines with `decoder` (the default: text, failing on a line that is not
    /// UTF-8).
    pub fn decode_with(mut self, decoder: SourceDecoder) -> Self {
        self.decoder = decoder;
        self
    }

    fn open(&self, f: SourceFile, offset: u64) -> Result<Box<dyn BufRead + Send>, RuntimeError> {
        match f {
            SourceFile::Local(p) => {
                use std::io::Seek;
                let mut file = std::fs::File::open(&p).map_err(|e| {
                    RuntimeError::external(format!("file_source: opening {}: {e}", p.display()))
                })?;
                if offset > 0 {
                    file.seek(std::io::SeekFrom::Start(offset)).map_err(|e| {
                        RuntimeError::external(format!("file_source: seeking {}: {e}", p.display()))
                    })?;
                }
                Ok(Box::new(BufReader::with_capacity(1 << 16, file)))
            }
            SourceFile::S3 { bucket, key, size, etag } => {
                let client = self.s3.clone().ok_or_else(|| {
                    RuntimeError::internal(format!(
                        "file_source: reading s3://{bucket}/{key} needs an S3 client"
                    ))
                })?;
                Ok(Box::new(ObjectReader {
                    client,
                    bucket,
                    key,
                    size,
                    etag,
                    next: offset,
                    chunk: Vec::new(),
                    at: 0,
                }))
            }
        }
    }
}

impl Source for FileSource {
    fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> Result<bool, RuntimeError> {
        let n = self.pacer.allow(max);
        let mut got = 0;
        while got < n {
            let Some((_, name, offset, reader)) = self.current.as_mut() else {
                let Some((f, at)) = self.files.pop() else { return Ok(false) };
                let name = f.to_string();
                let reader = self.open(f.clone(), at)?;
                self.current = Some((f, name, at, reader));
                self.line = (0, at);
                continue;
            };
            let Some(line) = self.buf.read(reader).map_err(|e| io_error(e, name))? else {
                self.current = None;
                continue;
            };
            let start = *offset;
            *offset += line.consumed;
            self.line.0 += 1;
            let (n, from) = self.line;
            // A skipped line counts towards the batch, so that a poll ends.
            self.decoder.push(line, || line_position(name.as_str(), n, from, start), out)?;
            got += 1;
        }
        Ok(true)
    }

    fn take_dropped(&mut self) -> u64 {
        self.decoder.take_dropped()
    }

    fn snapshot(&mut self) -> Result<Option<serde_json::Value>, RuntimeError> {
        let mut files: Vec<FilePosition> = Vec::new();
        if let Some((f, _, offset, _)) = &self.current {
            files.push(FilePosition { file: f.clone(), offset: *offset });
        }
        for (f, offset) in self.files.iter().rev() {
            files.push(FilePosition { file: f.clone(), offset: *offset });
        }
        Ok(Some(serde_json::json!({ "files": files })))
    }

    fn restore(&mut self, state: serde_json::Value) -> Result<(), RuntimeError> {
        self.current = None;
        self.files = file_positions(state)?.into_iter().rev().map(|f| (f.file, f.offset)).collect();
        Ok(())
    }

    fn rescale(
        &mut self,
        states: Vec<(u32, serde_json::Value)>,
        at: &Rescale,
    ) -> Result<(), RuntimeError> {
        let mut all = Vec::new();
        for (_, v) in states {
            all.extend(file_positions(v)?);
        }
        // Every file left (part-read ones from where they stopped) is dealt round-robin, in
        // name order, so that the subtasks agree without talking.
        all.sort_by_key(|p| p.file.to_string());
        self.current = None;
        self.files = all
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 % at.parallelism == at.subtask)
            .map(|(_, p)| (p.file, p.offset))
            .rev()
            .collect();
        Ok(())
    }
}

/// Where line `n` of a file is, for messages: its line number when the file was read from
/// its start, else (resumed from a checkpoint's offset) its byte offset.
fn line_position(file: &str, n: u64, opened_at: u64, offset: u64) -> String {
    if opened_at == 0 { format!("{file} line {n}") } else { format!("{file} at byte {offset}") }
}

/// The positions in a file source's snapshot.
fn file_positions(state: serde_json::Value) -> Result<Vec<FilePosition>, RuntimeError> {
    #[derive(serde::Deserialize)]
    struct State {
        files: Vec<FilePosition>,
    }
    let st: State = serde_json::from_value(state).map_err(|e| bad_state("a file_source", e))?;
    Ok(st.files)
}
