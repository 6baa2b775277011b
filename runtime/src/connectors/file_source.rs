//! The `file_source`: lines of the files under a local directory or an S3 prefix, each file a
//! split, read from the position the checkpoint recorded.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use weir_crds::StorageUri;

use super::Pacer;
use super::format::{LineBuffer, SourceDecoder};
use crate::error::RuntimeError;
use crate::event_time::{EventClock, SplitTime, Watermark};
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
/// each file is a split, dealt round-robin. A subtask reads its files one after the other;
/// with `eventTime`, up to [`OPEN_WITH_EVENT_TIME`] at once, taking turns, each keeping its
/// own watermark (a file opened later than the others may find its records late).
pub struct FileSource {
    /// The files not opened yet, where to start in each and their event time, the next one
    /// last.
    files: Vec<(SourceFile, u64, SplitTime)>,
    s3: Option<S3Client>,
    /// The files being read.
    open: Vec<OpenFile>,
    /// How many files it reads at once.
    width: usize,
    /// The turn of the next poll among the open files.
    next: usize,
    pacer: Pacer,
    buf: LineBuffer,
    /// Lines to records, with the source's `onError`.
    decoder: SourceDecoder,
    clock: Option<EventClock>,
}

/// Files a subtask of a source with event time reads at once.
pub const OPEN_WITH_EVENT_TIME: usize = 8;

/// A file being read: its name, the offset of the next line, its reader and event time.
struct OpenFile {
    file: SourceFile,
    name: String,
    offset: u64,
    reader: Box<dyn BufRead + Send>,
    time: SplitTime,
    /// Lines read since it was opened, and the offset it was opened at (for messages).
    lines: u64,
    opened_at: u64,
}

/// A file of a file source's position: read from `offset` on.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct FilePosition {
    file: SourceFile,
    offset: u64,
    /// Its event time, with `eventTime`.
    #[serde(default, skip_serializing_if = "SplitTime::is_empty")]
    time: SplitTime,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("files_left", &self.files.len())
            .field("open", &self.open.iter().map(|f| &f.name).collect::<Vec<_>>())
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
            files: mine.into_iter().rev().map(|f| (f, 0, SplitTime::default())).collect(),
            s3,
            open: Vec::new(),
            width: 1,
            next: 0,
            clock: None,
            pacer: Pacer::new(rate.map(|r| r * share)),
            buf: LineBuffer::new(),
            decoder: SourceDecoder::text("file_source"),
        }
    }

    /// Reads its lines with `decoder` (the default: text, failing on a line that is not
    /// UTF-8).
    pub fn decode_with(mut self, decoder: SourceDecoder) -> Self {
        self.decoder = decoder;
        self
    }

    /// Its records carry the event time `clock` reads, per file.
    pub fn with_event_time(mut self, clock: Option<EventClock>) -> Self {
        self.width = if clock.is_some() { OPEN_WITH_EVENT_TIME } else { 1 };
        self.clock = clock;
        self
    }

    /// Every file it has left, open ones first, where it stands in each.
    fn positions(&self) -> Vec<FilePosition> {
        let open = self.open.iter().map(|f| FilePosition {
            file: f.file.clone(),
            offset: f.offset,
            time: f.time.clone(),
        });
        let waiting = self.files.iter().rev().map(|(f, offset, time)| FilePosition {
            file: f.clone(),
            offset: *offset,
            time: time.clone(),
        });
        open.chain(waiting).collect()
    }

    /// Takes over `positions` (the next to read first), none open yet.
    fn take(&mut self, positions: Vec<FilePosition>) {
        self.open.clear();
        self.files = positions.into_iter().rev().map(|p| (p.file, p.offset, p.time)).collect();
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
            while self.open.len() < self.width {
                let Some((file, offset, time)) = self.files.pop() else { break };
                let name = file.to_string();
                let reader = self.open(file.clone(), offset)?;
                let lines = 0;
                self.open.push(OpenFile {
                    file,
                    name,
                    offset,
                    reader,
                    time,
                    lines,
                    opened_at: offset,
                });
            }
            if self.open.is_empty() {
                return Ok(false);
            }
            // One file per poll, in turns.
            let i = self.next % self.open.len();
            let from = out.len();
            let f = &mut self.open[i];
            let mut ended = false;
            while got < n {
                let Some(line) = self.buf.read(&mut f.reader).map_err(|e| io_error(e, &f.name))?
                else {
                    ended = true;
                    break;
                };
                let start = f.offset;
                f.offset += line.consumed;
                f.lines += 1;
                let (name, n, opened_at) = (f.name.as_str(), f.lines, f.opened_at);
                // A skipped line counts towards the batch, so that a poll ends.
                self.decoder.push(line, || line_position(name, n, opened_at, start), out)?;
                got += 1;
            }
            if let Some(clock) = &self.clock {
                clock.observe(&mut f.time, &out[from..], Instant::now())?;
            }
            if ended {
                self.open.remove(i);
                continue;
            }
            self.next = self.next.wrapping_add(1);
        }
        Ok(true)
    }

    fn watermark(&mut self) -> Option<Watermark> {
        let clock = self.clock.as_ref()?;
        Some(clock.watermark(self.open.iter().map(|f| &f.time), Instant::now()))
    }

    fn take_dropped(&mut self) -> u64 {
        self.decoder.take_dropped()
    }

    fn snapshot(&mut self, _id: u64) -> Result<Option<serde_json::Value>, RuntimeError> {
        Ok(Some(serde_json::json!({ "files": self.positions() })))
    }

    fn restore(&mut self, state: serde_json::Value) -> Result<(), RuntimeError> {
        let positions = file_positions(state)?;
        self.take(positions);
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
        let mine = all
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 % at.parallelism == at.subtask)
            .map(|(_, p)| p)
            .collect();
        self.take(mine);
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
