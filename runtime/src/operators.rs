//! The built-in operators. A source produces records from its splits; every other operator
//! implements [`Operator`]: it takes a batch from one of its inputs and appends what it emits.
//! The engine holds them as trait objects, so a user's own operators plug in the same way.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weir_crds::StorageUri;

use crate::error::RuntimeError;
use crate::objstore::S3Client;
use crate::plan::{Aggregate, FilterSpec, GeneratorFormat, GeneratorSpec, MapSpec};
use crate::record::{Record, Value, to_lines};
use crate::state::{CachedValueState, Num};

/// An operator that is not a source.
pub trait Operator: Send {
    /// Processes a batch from input number `input` (records in the input's field order),
    /// appending what it emits to `out`.
    fn process(
        &mut self,
        input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError>;

    /// Every input has ended: emit what is left and make state durable.
    fn finish(&mut self, _out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Records dropped since the last call because the operator could not use them (a
    /// `sum` of a field that is not a number); counted in
    /// `weir_operator_records_dropped_total`.
    fn take_dropped(&mut self) -> u64 {
        0
    }

    /// Called once before the first batch, with the state [`Operator::snapshot`] returned in
    /// the checkpoint the job restores from (`None` when it starts afresh or the operator
    /// had none).
    fn restore(&mut self, _state: Option<serde_json::Value>) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// The job restores at another parallelism: `states` holds this operator's state of
    /// every old subtask (with its index); the operator keeps its share. The default accepts
    /// only operators without state.
    fn rescale(
        &mut self,
        states: Vec<(u32, serde_json::Value)>,
        at: &Rescale,
    ) -> Result<(), RuntimeError> {
        no_rescale(states, at)
    }

    /// Checkpoint barrier `id` has reached this operator: everything it processed before
    /// belongs to the checkpoint. Returns the operator's non-keyed state to store with it
    /// (keyed state in RocksDB is snapshotted by the engine once this returns).
    fn snapshot(&mut self, _id: u64) -> Result<Option<serde_json::Value>, RuntimeError> {
        Ok(None)
    }

    /// Called right after [`Operator::snapshot`]: the keyed state writes it held back for
    /// the checkpoint's thread to apply before that thread takes the backend's snapshot
    /// ([`crate::state::CachedValueState::detach`]). None: the state is in the backend
    /// already, and the snapshot is taken at once.
    fn deferred_write(&mut self) -> Option<crate::state::DeferredWrite> {
        None
    }

    /// Checkpoint `id` is complete (its metadata is written): a sink makes the output that
    /// it covers visible.
    fn checkpoint_complete(&mut self, _id: u64) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// The operator holds records back to emit later (a throttle): while it does, its
    /// subtask takes no more input batches (barriers still come in, so the held records
    /// must be in [`Operator::snapshot`]), and [`Operator::release`] is called every few
    /// milliseconds.
    fn holding(&self) -> bool {
        false
    }

    /// Emits the held records that may go now.
    fn release(&mut self, _out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Called every few milliseconds, whether records come or not (and between batches):
    /// processing-time timers that are due fire.
    fn tick(&mut self, _out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// One subtask of a source, reading the splits dealt to it.
pub trait Source: Send {
    /// Appends up to `max` records; false once every split is exhausted.
    fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> Result<bool, RuntimeError>;

    /// The position to resume from: the state of every split this subtask still reads.
    /// `None` for a source that cannot be replayed (its records after the last checkpoint
    /// are lost on a failure).
    fn snapshot(&mut self) -> Result<Option<serde_json::Value>, RuntimeError> {
        Ok(None)
    }

    /// Takes over the position [`Source::snapshot`] returned, before the first poll.
    fn restore(&mut self, _state: serde_json::Value) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// The job restores at another parallelism: `states` holds the positions of every old
    /// subtask; the source keeps its share of the splits.
    fn rescale(
        &mut self,
        states: Vec<(u32, serde_json::Value)>,
        at: &Rescale,
    ) -> Result<(), RuntimeError> {
        no_rescale(states, at)
    }
}

/// Where a subtask stands in a job restored at another parallelism.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rescale {
    /// The operator, for messages.
    pub uid: String,
    pub subtask: u32,
    pub parallelism: u32,
    pub old_parallelism: u32,
    /// The key groups this subtask owns, first and last.
    pub key_groups: (u16, u16),
}

/// An operator that keeps no state rescales to anything; one that does must say how.
fn no_rescale(states: Vec<(u32, serde_json::Value)>, at: &Rescale) -> Result<(), RuntimeError> {
    if states.iter().all(|(_, v)| v.is_null()) {
        return Ok(());
    }
    Err(RuntimeError::user(format!(
        "operator {:?} cannot be restored at parallelism {} from state taken at {}: restore it at {}",
        at.uid, at.parallelism, at.old_parallelism, at.old_parallelism
    )))
}

/// A state that does not parse: the checkpoint was not written by this operator.
fn bad_state(what: &str, e: serde_json::Error) -> RuntimeError {
    RuntimeError::user(format!("restoring {what}: the checkpoint's state does not fit: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Sources

/// SplitMix64: small, fast, and the same everywhere.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Zipf-distributed integers in `1..=n` by rejection-inversion (Hörmann and Derflinger).
#[derive(Debug, Clone)]
pub struct Zipf {
    n: f64,
    s: f64,
    h_x1: f64,
    h_n: f64,
    s_val: f64,
}

impl Zipf {
    pub fn new(n: u64, s: f64) -> Self {
        let mut z = Self { n: n as f64, s, h_x1: 0.0, h_n: 0.0, s_val: 0.0 };
        z.h_x1 = z.h_integral(1.5) - 1.0;
        z.h_n = z.h_integral(z.n + 0.5);
        z.s_val = 2.0 - z.h_integral_inv(z.h_integral(2.5) - z.h(2.0));
        z
    }
    fn helper1(x: f64) -> f64 {
        if x.abs() > 1e-8 { x.ln_1p() / x } else { 1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x)) }
    }
    fn helper2(x: f64) -> f64 {
        if x.abs() > 1e-8 {
            x.exp_m1() / x
        } else {
            1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x))
        }
    }
    fn h_integral(&self, x: f64) -> f64 {
        let lx = x.ln();
        Self::helper2((1.0 - self.s) * lx) * lx
    }
    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }
    fn h_integral_inv(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.s)).max(-1.0);
        (Self::helper1(t) * x).exp()
    }
    pub fn sample(&self, rng: &mut SplitMix64) -> u64 {
        loop {
            let u = self.h_n + rng.next_f64() * (self.h_x1 - self.h_n);
            let x = self.h_integral_inv(u);
            let k = x.round().clamp(1.0, self.n);
            if k - x <= self.s_val || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64;
            }
        }
    }
}

/// Paces a subtask to a rate (records per second). When it is ahead it sleeps at most a few
/// milliseconds and lets nothing go, so that the source's loop takes barriers and stop
/// requests while it waits.
#[derive(Debug)]
pub struct Pacer {
    rate: Option<f64>,
    start: Instant,
    emitted: u64,
}

impl Pacer {
    pub fn new(rate: Option<f64>) -> Self {
        Self { rate: rate.filter(|r| *r > 0.0), start: Instant::now(), emitted: 0 }
    }
    /// How many records may go now (at most `max`); 0 after a wait of at most
    /// [`Pacer::MAX_WAIT`] when none may yet.
    pub fn allow(&mut self, max: usize) -> usize {
        let Some(rate) = self.rate else { return max };
        let due = |p: &Self| (p.start.elapsed().as_secs_f64() * rate) as u64;
        if due(self) <= self.emitted {
            let wait = (self.emitted + 1) as f64 / rate - self.start.elapsed().as_secs_f64();
            std::thread::sleep(Duration::from_secs_f64(
                wait.clamp(0.0005, Self::MAX_WAIT.as_secs_f64()),
            ));
        }
        let due = due(self);
        if due <= self.emitted {
            return 0;
        }
        let n = ((due - self.emitted) as usize).min(max);
        self.emitted += n as u64;
        n
    }

    /// The longest a poll waits for its next record to be due.
    pub const MAX_WAIT: Duration = Duration::from_millis(10);
}

/// The position of one generator split: how many records it has emitted, and its random
/// stream.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct GenSplit {
    split: u32,
    emitted: u64,
    #[serde(skip)]
    total: Option<u64>,
    rng: SplitMix64,
}

/// The deterministic generator: split `s` of `S` is its own stream, seeded from the seed and
/// `s`, holding `count / S` records (the first `count % S` splits one more).
pub struct GeneratorSource {
    spec: GeneratorSpec,
    zipf: Option<Zipf>,
    splits: Vec<GenSplit>,
    next: usize,
    pacer: Pacer,
    line: String,
}

impl std::fmt::Debug for GeneratorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratorSource").field("splits", &self.splits.len()).finish()
    }
}

impl GeneratorSource {
    pub fn new(spec: GeneratorSpec, subtask: u32, parallelism: u32) -> Self {
        let total_splits = spec.splits.max(1);
        let splits: Vec<GenSplit> = (0..total_splits)
            .filter(|s| s % parallelism == subtask)
            .map(|s| GenSplit {
                split: s,
                emitted: 0,
                total: split_total(&spec, s),
                rng: SplitMix64::new(
                    spec.seed ^ (u64::from(s) + 1).wrapping_mul(0x2545_f491_4f6c_dd1d),
                ),
            })
            .collect();
        let share = splits.len() as f64 / f64::from(total_splits);
        let pacer = Pacer::new(spec.rate_per_second.map(|r| r * share));
        let zipf = (spec.distribution == crate::plan::Distribution::Zipf)
            .then(|| Zipf::new(spec.keys.max(1), spec.zipf_exponent));
        Self { spec, zipf, splits, next: 0, pacer, line: String::new() }
    }

    /// Takes over restored splits (checked against the spec), dropping finished ones.
    fn take_splits(&mut self, splits: Vec<GenSplit>) -> Result<(), RuntimeError> {
        let n = self.spec.splits.max(1);
        self.splits = splits;
        for sp in &mut self.splits {
            if sp.split >= n {
                return Err(RuntimeError::user(format!(
                    "restoring a generator: split {} is not below its {n} splits (spec.splits changed?)",
                    sp.split
                )));
            }
            sp.total = split_total(&self.spec, sp.split);
        }
        self.splits.retain(|sp| sp.total.is_none_or(|t| sp.emitted < t));
        Ok(())
    }

    #[inline]
    fn key(&self, rng: &mut SplitMix64) -> u64 {
        match &self.zipf {
            Some(z) => z.sample(rng) - 1,
            None => rng.next_u64() % self.spec.keys.max(1),
        }
    }
}

/// The splits in a generator's snapshot.
fn gen_splits(state: serde_json::Value) -> Result<Vec<GenSplit>, RuntimeError> {
    #[derive(serde::Deserialize)]
    struct State {
        splits: Vec<GenSplit>,
    }
    let st: State = serde_json::from_value(state).map_err(|e| bad_state("a generator", e))?;
    Ok(st.splits)
}

/// Records split `s` of a generator holds (`None`: unbounded).
fn split_total(spec: &GeneratorSpec, s: u32) -> Option<u64> {
    let n = u64::from(spec.splits.max(1));
    spec.count.map(|c| c / n + u64::from(u64::from(s) < c % n))
}

impl Source for GeneratorSource {
    fn snapshot(&mut self) -> Result<Option<serde_json::Value>, RuntimeError> {
        Ok(Some(serde_json::json!({ "splits": self.splits })))
    }

    fn restore(&mut self, state: serde_json::Value) -> Result<(), RuntimeError> {
        self.take_splits(gen_splits(state)?)
    }

    fn rescale(
        &mut self,
        states: Vec<(u32, serde_json::Value)>,
        at: &Rescale,
    ) -> Result<(), RuntimeError> {
        let mut all = Vec::new();
        for (_, v) in states {
            all.extend(gen_splits(v)?);
        }
        // Splits are dealt round-robin, as at the start.
        all.retain(|sp| sp.split % at.parallelism == at.subtask);
        all.sort_by_key(|sp| sp.split);
        self.take_splits(all)
    }

    fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> Result<bool, RuntimeError> {
        use std::fmt::Write;
        if self.splits.is_empty() {
            return Ok(false);
        }
        let n = self.pacer.allow(max);
        let i = self.next % self.splits.len();
        self.next = self.next.wrapping_add(1);
        let mut split = self.splits[i].clone();
        let n = match split.total {
            Some(t) => n.min((t - split.emitted) as usize),
            None => n,
        };
        for _ in 0..n {
            match self.spec.format {
                GeneratorFormat::Text => {
                    self.line.clear();
                    for w in 0..self.spec.words_per_line {
                        if w > 0 {
                            self.line.push(' ');
                        }
                        let k = self.key(&mut split.rng);
                        let _ = write!(self.line, "w{k}");
                    }
                    out.push(vec![Value::str(&self.line)]);
                }
                GeneratorFormat::Kv => {
                    let k = self.key(&mut split.rng);
                    let v = (split.rng.next_u64() % 100) as i64;
                    out.push(vec![
                        Value::Str(format!("k{k}").into()),
                        Value::Int(v),
                        Value::Int(split.emitted as i64),
                    ]);
                }
            }
            split.emitted += 1;
        }
        let done = split.total.is_some_and(|t| split.emitted >= t);
        if done {
            self.splits.remove(i);
        } else {
            self.splits[i] = split;
        }
        Ok(!self.splits.is_empty())
    }
}

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
    buf: String,
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
            buf: String::new(),
        }
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
                continue;
            };
            self.buf.clear();
            let read = reader.read_line(&mut self.buf).map_err(|e| io_error(e, name))?;
            if read == 0 {
                self.current = None;
                continue;
            }
            *offset += read as u64;
            let line = self.buf.trim_end_matches(['\n', '\r']);
            out.push(vec![Value::str(line)]);
            got += 1;
        }
        Ok(true)
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

/// The positions in a file source's snapshot.
fn file_positions(state: serde_json::Value) -> Result<Vec<FilePosition>, RuntimeError> {
    #[derive(serde::Deserialize)]
    struct State {
        files: Vec<FilePosition>,
    }
    let st: State = serde_json::from_value(state).map_err(|e| bad_state("a file_source", e))?;
    Ok(st.files)
}

/// Text lines from a TCP server (subtask 0 only), until it closes the connection.
#[derive(Debug)]
pub struct SocketSource {
    reader: Option<BufReader<std::net::TcpStream>>,
    buf: String,
}

impl SocketSource {
    pub fn new(host: &str, port: u16, subtask: u32) -> Result<Self, RuntimeError> {
        if subtask != 0 {
            return Ok(Self { reader: None, buf: String::new() });
        }
        let s = std::net::TcpStream::connect((host, port)).map_err(|e| {
            RuntimeError::external(format!("socket: connecting to {host}:{port}: {e}")).retryable()
        })?;
        s.set_read_timeout(Some(Duration::from_millis(100))).ok();
        Ok(Self { reader: Some(BufReader::new(s)), buf: String::new() })
    }
}

impl Source for SocketSource {
    fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> Result<bool, RuntimeError> {
        let Some(r) = self.reader.as_mut() else { return Ok(false) };
        for _ in 0..max {
            match r.read_line(&mut self.buf) {
                Ok(0) => {
                    self.reader = None;
                    return Ok(false);
                }
                Ok(_) => {
                    if self.buf.ends_with('\n') {
                        out.push(vec![Value::str(self.buf.trim_end_matches(['\n', '\r']))]);
                        self.buf.clear();
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(RuntimeError::external(format!("socket: {e}")).retryable()),
            }
        }
        Ok(true)
    }
}

// ---------------------------------------------------------------------------------------------
// Transforms

/// Splits a text field on white space: one record per word.
#[derive(Debug)]
pub struct Split {
    pub field: usize,
}

impl Operator for Split {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        for r in batch {
            if let Some(Value::Str(s)) = r.get(self.field) {
                out.extend(s.split_whitespace().map(|w| vec![Value::str(w)]));
            }
        }
        Ok(())
    }
}

/// Sets, selects and re-cases fields.
#[derive(Debug)]
pub struct Map {
    /// For each field to set: its position in the output, and the template parts (literal
    /// text, or an input field position).
    set: Vec<(usize, Vec<Part>)>,
    upper: Vec<usize>,
    lower: Vec<usize>,
    select: Option<Vec<usize>>,
    width: usize,
}

#[derive(Debug)]
enum Part {
    Text(String),
    Field(usize),
}

impl Map {
    pub fn new(spec: &MapSpec, in_fields: &[String]) -> Self {
        let pos = |n: &str| in_fields.iter().position(|f| f == n).expect("checked by the plan");
        let mut all: Vec<String> = in_fields.to_vec();
        let mut set = Vec::new();
        for (name, template) in &spec.set {
            let at = match all.iter().position(|f| f == name) {
                Some(i) => i,
                None => {
                    all.push(name.clone());
                    all.len() - 1
                }
            };
            let mut parts = Vec::new();
            let mut rest = template.as_str();
            while let Some(i) = rest.find('{') {
                if i > 0 {
                    parts.push(Part::Text(rest[..i].to_string()));
                }
                let after = &rest[i + 1..];
                let Some(j) = after.find('}') else {
                    parts.push(Part::Text(rest[i..].to_string()));
                    rest = "";
                    break;
                };
                parts.push(Part::Field(pos(&after[..j])));
                rest = &after[j + 1..];
            }
            if !rest.is_empty() {
                parts.push(Part::Text(rest.to_string()));
            }
            set.push((at, parts));
        }
        let out_pos = |n: &str| all.iter().position(|f| f == n).expect("checked by the plan");
        Self {
            upper: spec.upper.iter().map(|f| pos(f)).collect(),
            lower: spec.lower.iter().map(|f| pos(f)).collect(),
            select: spec.select.as_ref().map(|s| s.iter().map(|f| out_pos(f)).collect()),
            width: all.len(),
            set,
        }
    }
}

impl Operator for Map {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        for mut r in batch {
            for &i in &self.upper {
                if let Value::Str(s) = &r[i] {
                    r[i] = Value::Str(s.to_uppercase().into());
                }
            }
            for &i in &self.lower {
                if let Value::Str(s) = &r[i] {
                    r[i] = Value::Str(s.to_lowercase().into());
                }
            }
            let input = r.clone();
            r.resize(self.width, Value::Int(0));
            for (at, parts) in &self.set {
                let mut s = String::new();
                for p in parts {
                    match p {
                        Part::Text(t) => s.push_str(t),
                        Part::Field(f) => s.push_str(&input[*f].to_string()),
                    }
                }
                r[*at] = Value::Str(s.into());
            }
            if let Some(sel) = &self.select {
                r = sel.iter().map(|&i| r[i].clone()).collect();
            }
            out.push(r);
        }
        Ok(())
    }
}

/// Keeps the records whose field meets every condition given.
#[derive(Debug)]
pub struct Filter {
    field: usize,
    spec: FilterSpec,
}

impl Filter {
    pub fn new(spec: &FilterSpec, in_fields: &[String]) -> Self {
        Self {
            field: in_fields.iter().position(|f| f == &spec.field).expect("checked by the plan"),
            spec: spec.clone(),
        }
    }

    fn keep(&self, v: &Value) -> bool {
        let eq = |j: &serde_json::Value| match (v, j) {
            (Value::Str(s), serde_json::Value::String(t)) => &**s == t.as_str(),
            (_, serde_json::Value::Number(n)) => v.as_f64() == n.as_f64(),
            _ => v.to_string() == *j,
        };
        self.spec.equals.as_ref().is_none_or(eq)
            && self.spec.not_equals.as_ref().is_none_or(|j| !eq(j))
            && self.spec.contains.as_ref().is_none_or(|c| v.to_string().contains(c.as_str()))
            && self.spec.greater_than.is_none_or(|g| v.as_f64().is_some_and(|x| x > g))
            && self.spec.less_than.is_none_or(|l| v.as_f64().is_some_and(|x| x < l))
            && self.spec.min_length.is_none_or(|m| v.to_string().chars().count() >= m)
    }
}

impl Operator for Filter {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        out.extend(batch.into_iter().filter(|r| self.keep(&r[self.field])));
        Ok(())
    }
}

/// count, sum, min, max keyed by a field: emits `key,value` with the key's new value on every
/// update. State is a [`CachedValueState`]: no RocksDB read per record.
pub struct KeyedAggregate {
    aggregate: Aggregate,
    key: usize,
    field: Option<usize>,
    state: CachedValueState,
    scratch: [u8; 8],
    /// Records whose field is not a number, since the last [`Operator::take_dropped`].
    dropped: u64,
    /// What the last snapshot detached, until the engine takes it.
    deferred: Option<crate::state::DeferredWrite>,
}

impl std::fmt::Debug for KeyedAggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedAggregate").field("aggregate", &self.aggregate).finish()
    }
}

impl KeyedAggregate {
    pub fn new(
        aggregate: Aggregate,
        key: usize,
        field: Option<usize>,
        state: CachedValueState,
    ) -> Self {
        Self { aggregate, key, field, state, scratch: [0; 8], dropped: 0, deferred: None }
    }
}

fn num_value(v: &Value) -> Option<Num> {
    match v {
        Value::Int(i) => Some(Num::Int(*i)),
        Value::Float(f) => Some(Num::Float(*f)),
        Value::Str(s) => {
            s.parse::<i64>().map(Num::Int).ok().or_else(|| s.parse::<f64>().map(Num::Float).ok())
        }
    }
}

fn combine(a: Aggregate, old: Option<Num>, new: Num) -> Num {
    let Some(old) = old else { return new };
    match (a, old, new) {
        (Aggregate::Sum, Num::Int(x), Num::Int(y)) => Num::Int(x.wrapping_add(y)),
        (Aggregate::Min, Num::Int(x), Num::Int(y)) => Num::Int(x.min(y)),
        (Aggregate::Max, Num::Int(x), Num::Int(y)) => Num::Int(x.max(y)),
        (agg, x, y) => {
            let (x, y) = (as_f(x), as_f(y));
            Num::Float(match agg {
                Aggregate::Sum | Aggregate::Count => x + y,
                Aggregate::Min => x.min(y),
                Aggregate::Max => x.max(y),
            })
        }
    }
}

fn as_f(n: Num) -> f64 {
    match n {
        Num::Int(i) => i as f64,
        Num::Float(f) => f,
    }
}

impl Operator for KeyedAggregate {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        out.reserve(batch.len());
        for mut r in batch {
            let new = match self.aggregate {
                Aggregate::Count => {
                    let kb = r[self.key].key_bytes(&mut self.scratch);
                    self.state.update(kb, |v| match v {
                        Some(Num::Int(n)) => Num::Int(n + 1),
                        _ => Num::Int(1),
                    })
                }
                agg => {
                    let Some(x) = self.field.and_then(|f| num_value(&r[f])) else {
                        self.dropped += 1;
                        continue;
                    };
                    let kb = r[self.key].key_bytes(&mut self.scratch);
                    self.state.update(kb, |old| combine(agg, old, x))
                }
            }
            .map_err(|e| RuntimeError::internal(e.to_string()))?;
            let key = r.swap_remove(self.key);
            out.push(vec![
                key,
                match new {
                    Num::Int(i) => Value::Int(i),
                    Num::Float(f) => Value::Float(f),
                },
            ]);
        }
        Ok(())
    }

    fn finish(&mut self, _out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        self.state.write_back().map_err(|e| RuntimeError::internal(e.to_string()))
    }

    fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// The changed values are copied out, not written: the checkpoint's thread writes them
    /// and takes the backend's snapshot while this goes on with the next records.
    fn snapshot(&mut self, _id: u64) -> Result<Option<serde_json::Value>, RuntimeError> {
        let deferred = self.state.detach().map_err(|e| RuntimeError::internal(e.to_string()))?;
        self.deferred = Some(deferred);
        Ok(None)
    }

    fn deferred_write(&mut self) -> Option<crate::state::DeferredWrite> {
        self.deferred.take()
    }
}

// ---------------------------------------------------------------------------------------------
// Sinks

/// Prints each record as a line (fields joined by commas).
#[derive(Debug, Default)]
pub struct Stdout {
    buf: String,
}

impl Operator for Stdout {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        self.buf.clear();
        to_lines(&batch, &mut self.buf);
        let mut lock = std::io::stdout().lock();
        match lock.write_all(self.buf.as_bytes()) {
            // A closed pipe (`weir run ... | head`) is the reader's choice, not a failure.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            r => r.map_err(|e| RuntimeError::external(format!("stdout: {e}"))),
        }
    }
}

/// Passes records on at no more than a given rate, by a token bucket that fills at the rate
/// and holds at most a second's worth. What comes faster waits in the operator, which is
/// part of its checkpointed state; while it holds records its subtask takes no more input
/// (the pressure goes upstream through credits) but still takes barriers, and the engine
/// calls [`Operator::release`] every few milliseconds. It never sleeps.
#[derive(Debug)]
pub struct Throttle {
    rate: f64,
    tokens: f64,
    filled: Option<Instant>,
    held: std::collections::VecDeque<Record>,
}

impl Throttle {
    pub fn new(rate_per_second: f64) -> Self {
        Self { rate: rate_per_second, tokens: 1.0, filled: None, held: Default::default() }
    }

    /// The held records as the checkpoint keeps them: the wire encoding, in hex.
    fn encode_held(&mut self) -> serde_json::Value {
        let mut bytes = Vec::new();
        crate::wire::encode_batch(self.held.make_contiguous(), &mut bytes);
        serde_json::json!({ "held": crate::auth::hex(&bytes) })
    }

    fn decode_held(&mut self, state: serde_json::Value) -> Result<(), RuntimeError> {
        let bad = |why: String| {
            RuntimeError::damaged(format!(
                "restoring a throttle: the records it held do not decode ({why}): the checkpoint is damaged"
            ))
        };
        let text = state
            .get("held")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("its state has no \"held\" text".into()))?;
        let bytes = crate::auth::unhex_bytes(text).ok_or_else(|| bad("not hexadecimal".into()))?;
        let records = crate::wire::decode_batch(&bytes).map_err(bad)?;
        self.held.extend(records);
        Ok(())
    }
}

impl Operator for Throttle {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        self.held.extend(batch);
        self.release(out)
    }

    fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    fn release(&mut self, out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        let now = Instant::now();
        if let Some(then) = self.filled.replace(now) {
            let burst = self.rate.max(1.0);
            self.tokens = (self.tokens + (now - then).as_secs_f64() * self.rate).min(burst);
        }
        let n = (self.tokens.floor() as usize).min(self.held.len());
        self.tokens -= n as f64;
        out.extend(self.held.drain(..n));
        Ok(())
    }

    fn snapshot(&mut self, _id: u64) -> Result<Option<serde_json::Value>, RuntimeError> {
        Ok((!self.held.is_empty()).then(|| self.encode_held()))
    }

    fn restore(&mut self, state: Option<serde_json::Value>) -> Result<(), RuntimeError> {
        match state {
            Some(st) if !st.is_null() => self.decode_held(st),
            _ => Ok(()),
        }
    }

    /// The records each old subtask held go to one new subtask (old index modulo the new
    /// parallelism): they are emitted once, by whichever subtask, before anything new.
    fn rescale(
        &mut self,
        states: Vec<(u32, serde_json::Value)>,
        at: &Rescale,
    ) -> Result<(), RuntimeError> {
        for (old, st) in states {
            if old % at.parallelism == at.subtask && !st.is_null() {
                self.decode_held(st)?;
            }
        }
        Ok(())
    }
}

/// Discards records (counts them in the metrics).
#[derive(Debug, Default)]
pub struct Blackhole;

impl Operator for Blackhole {
    fn process(
        &mut self,
        _input: usize,
        _batch: Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// Bytes of one part file: a sink subtask starts a new part (`-1`, `-2`, ...) after this
/// many, staying far below the 5 GiB that one S3 PUT and one copy can take.
pub const S3_PART_BYTES: u64 = 1 << 30;

/// Writes lines to part files in a local directory or under an S3 prefix. A part being
/// written is named `.part-<job>-<subtask>-<n>.inprogress`; it becomes
/// `part-<job>-<subtask>-<n>` when it is committed. Readers that skip names starting with `.`
/// never see a partial file.
///
/// Without checkpoints a part is committed at the end of the input. With checkpoints the
/// commit is two-phase: at a barrier the open part is closed (made durable: fsync'd locally,
/// uploaded on S3) and recorded as pending in the checkpoint; when the checkpoint completes,
/// its pending parts are committed. A job restored from a checkpoint commits that
/// checkpoint's pending parts (the commit is idempotent) and deletes the other in-progress
/// parts of its subtask: those hold records that will be produced again.
///
/// Locally the in-progress file is renamed. On S3 the lines are staged in a temporary local
/// file (in `TMPDIR`) that is uploaded as the in-progress object; the commit copies it to its
/// final name and deletes it.
#[derive(Debug)]
pub struct FileSink {
    out: SinkOut,
    /// `part-<job>-<subtask>`: part `n` is `<stem>-<n>`.
    stem: String,
    buf: String,
    two_phase: bool,
    /// The part being written: its number, writer and size so far.
    open: Option<(u32, OpenPart, u64)>,
    /// Parts closed since the last barrier.
    closed: Vec<u32>,
    /// Parts in a checkpoint that has not completed yet, by checkpoint.
    pending: Vec<(u64, Vec<u32>)>,
    next_part: u32,
    /// A part is closed once it has this many bytes.
    part_bytes: u64,
}

#[derive(Debug)]
enum SinkOut {
    Local(PathBuf),
    S3 {
        client: S3Client,
        bucket: String,
        /// The key prefix with its trailing `/`, or empty.
        dir: String,
    },
}

#[derive(Debug)]
enum OpenPart {
    Local(std::io::BufWriter<std::fs::File>),
    S3(std::io::BufWriter<tempfile::NamedTempFile>),
}

/// What a file sink keeps in a checkpoint.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SinkState {
    /// Names the parts (`part-<job>-<subtask>`): a job restored under another id, or a
    /// subtask that takes over another's state, commits and discards the old names.
    #[serde(default)]
    stem: Option<String>,
    /// The output its parts are in (`s3://bucket/prefix/` or a directory): a job restored
    /// with another path leaves the pending parts there uncommitted (and says so), since a
    /// sink commits only under its own output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    out: Option<String>,
    next_part: u32,
    /// (checkpoint, parts) closed and waiting for that checkpoint to complete.
    pending: Vec<(u64, Vec<u32>)>,
}

fn sink_error(e: RuntimeError) -> RuntimeError {
    RuntimeError { message: format!("file_sink: {}", e.message), ..e }
}

/// A parts' stem a sink writes: `part-` and a plain name (no path).
fn plain_stem(stem: &str) -> bool {
    stem.len() <= 200
        && stem.strip_prefix("part-").is_some_and(|r| {
            !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

fn in_progress_name(stem: &str, n: u32) -> String {
    format!(".{stem}-{n}.inprogress")
}

fn sink_io(what: &str, e: std::io::Error) -> RuntimeError {
    RuntimeError::external(format!("file_sink: {what}: {e}"))
}

impl FileSink {
    /// Subtask `subtask` of the sink writing to `uri`, naming its parts after `job` (unique
    /// per job). A local directory is created; an S3 prefix is listed once, so that a missing
    /// bucket or refused credentials stop the job before it starts. `s3` is needed for an S3
    /// prefix. `two_phase`: commit on checkpoints (see the type's documentation).
    pub fn new(
        uri: &StorageUri,
        s3: Option<&S3Client>,
        job: &str,
        subtask: u32,
        two_phase: bool,
    ) -> Result<Self, RuntimeError> {
        let out = match uri {
            StorageUri::Local(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    RuntimeError::user(format!("file_sink: creating {}: {e}", dir.display()))
                })?;
                SinkOut::Local(dir.clone())
            }
            StorageUri::S3 { bucket, prefix } => {
                let client = s3.cloned().ok_or_else(|| {
                    RuntimeError::internal(format!("file_sink: writing {uri} needs an S3 client"))
                })?;
                let dir = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
                client.check_bucket(bucket, &dir).map_err(sink_error)?;
                SinkOut::S3 { client, bucket: bucket.clone(), dir }
            }
        };
        Ok(Self {
            out,
            stem: format!("part-{job}-{subtask}"),
            buf: String::new(),
            two_phase,
            open: None,
            closed: Vec::new(),
            pending: Vec::new(),
            next_part: 0,
            part_bytes: S3_PART_BYTES,
        })
    }

    /// Starts a new part once a part has `bytes` bytes (instead of [`S3_PART_BYTES`]).
    pub fn with_part_bytes(mut self, bytes: u64) -> Self {
        self.part_bytes = bytes.max(1);
        self
    }

    fn in_progress(&self, n: u32) -> String {
        in_progress_name(&self.stem, n)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), RuntimeError> {
        if self.open.is_none() {
            let n = self.next_part;
            let part = match &self.out {
                SinkOut::Local(dir) => {
                    let p = dir.join(self.in_progress(n));
                    let f = std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(true)
                        .write(true)
                        .open(&p)
                        .map_err(|e| sink_io(&format!("creating {}", p.display()), e))?;
                    OpenPart::Local(std::io::BufWriter::with_capacity(1 << 16, f))
                }
                SinkOut::S3 { .. } => {
                    let tmp =
                        tempfile::Builder::new().prefix(".weir-sink-").tempfile().map_err(|e| {
                            sink_io(
                                &format!(
                                    "creating a staging file in {}",
                                    std::env::temp_dir().display()
                                ),
                                e,
                            )
                        })?;
                    OpenPart::S3(std::io::BufWriter::with_capacity(1 << 16, tmp))
                }
            };
            self.next_part += 1;
            self.open = Some((n, part, 0));
        }
        let (_, part, size) = self.open.as_mut().expect("opened above");
        match part {
            OpenPart::Local(w) => w.write_all(bytes),
            OpenPart::S3(w) => w.write_all(bytes),
        }
        .map_err(|e| sink_io("writing", e))?;
        *size += bytes.len() as u64;
        if *size >= self.part_bytes {
            self.close_part()?;
        }
        Ok(())
    }

    /// Makes the open part durable under its in-progress name.
    fn close_part(&mut self) -> Result<(), RuntimeError> {
        let Some((n, part, _)) = self.open.take() else { return Ok(()) };
        match (part, &self.out) {
            (OpenPart::Local(mut w), _) => {
                w.flush().map_err(|e| sink_io("writing", e))?;
                w.get_ref().sync_all().map_err(|e| sink_io("syncing", e))?;
            }
            (OpenPart::S3(w), SinkOut::S3 { client, bucket, dir }) => {
                let tmp = w
                    .into_inner()
                    .map_err(|e| sink_io("writing the staging file", e.into_error()))?;
                let key = format!("{dir}{}", self.in_progress(n));
                client.put_file(bucket, &key, tmp.path()).map_err(sink_error)?;
            }
            (OpenPart::S3(_), SinkOut::Local(_)) => {
                return Err(RuntimeError::internal("file_sink: an S3 part of a local sink"));
            }
        }
        self.closed.push(n);
        Ok(())
    }

    /// Gives part `n` its final name. Idempotent: a part already committed stays so.
    fn commit(&self, n: u32) -> Result<(), RuntimeError> {
        self.commit_part(&self.stem, n)
    }

    /// Makes part `n` of `stem` visible; a part committed before is left as it is.
    fn commit_part(&self, stem: &str, n: u32) -> Result<(), RuntimeError> {
        self.out.commit(stem, n)
    }
}

impl SinkOut {
    /// Where the parts go, as the sink's state records it.
    fn location(&self) -> String {
        match self {
            SinkOut::Local(dir) => dir.display().to_string(),
            SinkOut::S3 { bucket, dir, .. } => format!("s3://{bucket}/{dir}"),
        }
    }

    fn commit(&self, stem: &str, n: u32) -> Result<(), RuntimeError> {
        let (from, to) = (in_progress_name(stem, n), format!("{stem}-{n}"));
        match self {
            SinkOut::Local(dir) => match std::fs::rename(dir.join(&from), dir.join(&to)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.join(&to).exists() => {
                    Ok(())
                }
                Err(e) => Err(sink_io(&format!("committing {}", dir.join(&from).display()), e)),
            },
            SinkOut::S3 { client, bucket, dir } => {
                let (from, to) = (format!("{dir}{from}"), format!("{dir}{to}"));
                if let Err(e) = client.copy(bucket, &from, &to) {
                    // Committed before (the in-progress object is gone, the part is there).
                    let there = client.list(bucket, &to).map_err(sink_error)?;
                    if there.iter().any(|o| o.key == to) {
                        return Ok(());
                    }
                    return Err(sink_error(e));
                }
                client.delete(bucket, &from).map_err(sink_error)
            }
        }
    }
}

impl FileSink {
    /// Takes over restored sink states: the checkpoint they come from is complete, so their
    /// pending parts are committed now; in-progress parts of their names and of this
    /// subtask's are discarded. Numbering goes on from this subtask's own state, or after
    /// the parts of its name found in the output.
    fn settle(
        &mut self,
        states: impl Iterator<Item = serde_json::Value>,
    ) -> Result<(), RuntimeError> {
        let mut own = None;
        for v in states {
            let st: SinkState =
                serde_json::from_value(v).map_err(|e| bad_state("a file_sink", e))?;
            let stem = st.stem.clone().unwrap_or_else(|| self.stem.clone());
            // The state is read back from storage: its names become file names.
            if !plain_stem(&stem) {
                return Err(RuntimeError::user(format!(
                    "file_sink: the restored state names its parts {stem:?}, not part-<job>-<subtask>: the checkpoint is damaged or forged"
                )));
            }
            let here = self.out.location();
            if let Some(there) = st.out.as_ref().filter(|o| **o != here) {
                // Another output (a savepoint restored into a job writing elsewhere): a sink
                // commits only under its own output, so those parts stay as they are.
                let parts: Vec<String> = st
                    .pending
                    .iter()
                    .flat_map(|(_, parts)| parts)
                    .map(|n| in_progress_name(&stem, *n))
                    .collect();
                if !parts.is_empty() {
                    eprintln!(
                        "weir: file_sink: the restored state has {} parts waiting to be committed in {there}, which is not this sink's output ({here}), so they are not committed: {}; to commit one, rename it there without the leading dot and the .inprogress",
                        parts.len(),
                        parts.join(", ")
                    );
                }
                continue;
            }
            for n in st.pending.iter().flat_map(|(_, parts)| parts) {
                self.commit_part(&stem, *n)?;
            }
            if stem == self.stem {
                own = Some(st.next_part);
            } else {
                self.discard_in_progress(&stem)?;
            }
        }
        self.discard_in_progress(&self.stem)?;
        self.next_part = match own {
            Some(n) => n,
            None => self.next_free_part()?,
        };
        Ok(())
    }

    /// The first part number of this subtask's name that no file in the output uses
    /// (committed or in progress): a subtask that restores without state of its own name must
    /// not write over parts of an earlier run at a higher parallelism.
    fn next_free_part(&self) -> Result<u32, RuntimeError> {
        let number = |name: &str| -> Option<u32> {
            let name = name.strip_prefix('.').unwrap_or(name);
            let name = name.strip_suffix(".inprogress").unwrap_or(name);
            name.strip_prefix(&format!("{}-", self.stem))?.parse().ok()
        };
        let names: Vec<String> = match &self.out {
            SinkOut::Local(dir) => std::fs::read_dir(dir)
                .map_err(|e| sink_io(&format!("{}", dir.display()), e))?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            SinkOut::S3 { client, bucket, dir } => {
                let mut v = Vec::new();
                for prefix in [format!("{dir}{}-", self.stem), format!("{dir}.{}-", self.stem)] {
                    for o in client.list(bucket, &prefix).map_err(sink_error)? {
                        v.push(o.key[dir.len()..].to_string());
                    }
                }
                v
            }
        };
        Ok(names.iter().filter_map(|n| number(n)).max().map_or(0, |n| n + 1))
    }

    /// Deletes the in-progress parts named `stem` (records of a failed attempt).
    fn discard_in_progress(&self, stem: &str) -> Result<(), RuntimeError> {
        let prefix = format!(".{stem}-");
        let ours = |name: &str| name.starts_with(&prefix) && name.ends_with(".inprogress");
        match &self.out {
            SinkOut::Local(dir) => {
                let entries = std::fs::read_dir(dir)
                    .map_err(|e| sink_io(&format!("{}", dir.display()), e))?;
                for e in entries.flatten() {
                    if ours(&e.file_name().to_string_lossy()) {
                        std::fs::remove_file(e.path())
                            .map_err(|x| sink_io(&format!("{}", e.path().display()), x))?;
                    }
                }
            }
            SinkOut::S3 { client, bucket, dir } => {
                for o in client.list(bucket, &format!("{dir}{prefix}")).map_err(sink_error)? {
                    if ours(&o.key[dir.len()..]) {
                        client.delete(bucket, &o.key).map_err(sink_error)?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Operator for FileSink {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        to_lines(&batch, &mut buf);
        let r = self.write(buf.as_bytes());
        self.buf = buf;
        r
    }

    fn finish(&mut self, _out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        if self.two_phase {
            // The final checkpoint closes the last part and commits it.
            return Ok(());
        }
        self.close_part()?;
        for n in std::mem::take(&mut self.closed) {
            self.commit(n)?;
        }
        Ok(())
    }

    fn restore(&mut self, state: Option<serde_json::Value>) -> Result<(), RuntimeError> {
        match state {
            Some(state) => self.settle(std::iter::once(state)),
            None => self.discard_in_progress(&self.stem),
        }
    }

    fn rescale(
        &mut self,
        states: Vec<(u32, serde_json::Value)>,
        at: &Rescale,
    ) -> Result<(), RuntimeError> {
        // Each old subtask's parts are settled by exactly one new subtask.
        self.settle(
            states
                .into_iter()
                .filter(|(old, v)| old % at.parallelism == at.subtask && !v.is_null())
                .map(|(_, v)| v),
        )
    }

    fn snapshot(&mut self, id: u64) -> Result<Option<serde_json::Value>, RuntimeError> {
        self.close_part()?;
        if !self.closed.is_empty() {
            self.pending.push((id, std::mem::take(&mut self.closed)));
        }
        let st = SinkState {
            stem: Some(self.stem.clone()),
            out: Some(self.out.location()),
            next_part: self.next_part,
            pending: self.pending.clone(),
        };
        serde_json::to_value(st).map(Some).map_err(|e| RuntimeError::internal(e.to_string()))
    }

    fn checkpoint_complete(&mut self, id: u64) -> Result<(), RuntimeError> {
        let (done, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.pending).into_iter().partition(|(c, _)| *c <= id);
        self.pending = later;
        for n in done.iter().flat_map(|(_, parts)| parts) {
            self.commit(*n)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names in a local output directory, sorted.
    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_sink_restored_under_another_job_or_subtask_commits_and_discards_the_old_names() {
        let tmp = tempfile::tempdir().unwrap();
        let uri = StorageUri::Local(tmp.path().to_path_buf());
        let line = |w: &str| vec![vec![Value::str(w)]];
        let mut old = FileSink::new(&uri, None, "jobA", 0, true).unwrap();
        old.process(0, line("a"), &mut Vec::new()).unwrap();
        let state = old.snapshot(7).unwrap();
        // Written after the checkpoint, never covered by one.
        old.process(0, line("b"), &mut Vec::new()).unwrap();
        old.close_part().unwrap();
        assert_eq!(names(tmp.path()), [".part-jobA-0-0.inprogress", ".part-jobA-0-1.inprogress"]);
        drop(old);
        let mut new = FileSink::new(&uri, None, "jobB", 1, true).unwrap();
        new.restore(state).unwrap();
        assert_eq!(names(tmp.path()), ["part-jobA-0-0"]);
        assert_eq!(std::fs::read_to_string(tmp.path().join("part-jobA-0-0")).unwrap(), "a\n");
        // The new sink's own parts start at 0 under its own name.
        new.process(0, line("c"), &mut Vec::new()).unwrap();
        new.snapshot(8).unwrap();
        new.checkpoint_complete(8).unwrap();
        assert_eq!(names(tmp.path()), ["part-jobA-0-0", "part-jobB-1-0"]);
    }

    #[test]
    fn a_sink_restored_with_another_path_commits_nothing_outside_its_own_output() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let line = |w: &str| vec![vec![Value::str(w)]];
        let mut old = FileSink::new(&StorageUri::Local(a.clone()), None, "jobA", 0, true).unwrap();
        old.process(0, line("a"), &mut Vec::new()).unwrap();
        let state = old.snapshot(7).unwrap();
        old.process(0, line("b"), &mut Vec::new()).unwrap();
        old.close_part().unwrap();
        drop(old);
        // The state names output `a`: a sink writing to `b` leaves everything there alone.
        let mut new = FileSink::new(&StorageUri::Local(b.clone()), None, "jobB", 0, true).unwrap();
        new.restore(state.clone()).unwrap();
        assert_eq!(names(&a), [".part-jobA-0-0.inprogress", ".part-jobA-0-1.inprogress"]);
        assert!(names(&b).is_empty(), "{:?}", names(&b));
        new.process(0, line("c"), &mut Vec::new()).unwrap();
        new.snapshot(8).unwrap();
        new.checkpoint_complete(8).unwrap();
        assert_eq!(names(&b), ["part-jobB-0-0"]);
        // A state whose parts' names leave the output is refused.
        let mut forged = state.unwrap();
        forged["stem"] = "../a/part-jobA-0".into();
        let mut again =
            FileSink::new(&StorageUri::Local(b.clone()), None, "jobC", 0, true).unwrap();
        let e = again.restore(Some(forged)).unwrap_err();
        assert!(e.message.contains("damaged or forged"), "{e}");
        assert_eq!(names(&a), [".part-jobA-0-0.inprogress", ".part-jobA-0-1.inprogress"]);
    }

    #[test]
    fn zipf_samples_are_in_range_and_skewed() {
        let z = Zipf::new(1000, 1.0);
        let mut rng = SplitMix64::new(1);
        let mut counts = vec![0u32; 1001];
        for _ in 0..100_000 {
            let k = z.sample(&mut rng);
            assert!((1..=1000).contains(&k));
            counts[k as usize] += 1;
        }
        // Rank 1 is about twice rank 2 and ten times rank 10 under exponent 1.
        let r = |a: usize, b: usize| f64::from(counts[a]) / f64::from(counts[b]);
        assert!((1.7..2.3).contains(&r(1, 2)), "{}", r(1, 2));
        assert!((7.0..13.0).contains(&r(1, 10)), "{}", r(1, 10));
    }

    #[test]
    fn generator_splits_do_not_depend_on_parallelism() {
        let spec: GeneratorSpec = serde_json::from_value(serde_json::json!({"seed": 3, "count": 1001, "keys": 50, "splits": 5, "format": "text", "wordsPerLine": 2})).unwrap();
        let run = |p: u32| {
            let mut lines: Vec<String> = Vec::new();
            for s in 0..p {
                let mut g = GeneratorSource::new(spec.clone(), s, p);
                let mut out = Vec::new();
                while g.poll(&mut out, 64).unwrap() {}
                lines.extend(out.iter().map(|r| r[0].to_string()));
            }
            lines.sort();
            lines
        };
        let one = run(1);
        assert_eq!(one.len(), 1001);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
    }

    #[test]
    fn a_generator_rescaled_part_way_emits_every_record_once() {
        let spec: GeneratorSpec = serde_json::from_value(serde_json::json!({"seed": 4, "count": 1003, "keys": 50, "splits": 7, "format": "text", "wordsPerLine": 2})).unwrap();
        let mut whole = Vec::new();
        let mut g = GeneratorSource::new(spec.clone(), 0, 1);
        while g.poll(&mut whole, 64).unwrap() {}
        // Two subtasks emit a little, snapshot, and three take over.
        let mut lines = Vec::new();
        let mut states = Vec::new();
        for s in 0..2 {
            let mut g = GeneratorSource::new(spec.clone(), s, 2);
            g.poll(&mut lines, 50 + 30 * s as usize).unwrap();
            states.push((s, g.snapshot().unwrap().unwrap()));
        }
        for s in 0..3 {
            let mut g = GeneratorSource::new(spec.clone(), s, 3);
            let at = Rescale {
                uid: "gen".into(),
                subtask: s,
                parallelism: 3,
                old_parallelism: 2,
                key_groups: (0, 0),
            };
            g.rescale(states.clone(), &at).unwrap();
            while g.poll(&mut lines, 64).unwrap() {}
        }
        let key = |v: &Vec<Record>| {
            let mut l: Vec<String> = v.iter().map(|r| r[0].to_string()).collect();
            l.sort();
            l
        };
        assert_eq!(key(&lines), key(&whole));
    }

    #[test]
    fn a_restored_sink_state_names_plain_parts_only() {
        for ok in ["part-1796128818449-0513-0", "part-job.v2_1-3"] {
            assert!(plain_stem(ok), "{ok}");
        }
        for bad in ["../../etc/part-x", "part-", "part-a/b", "x-1", "part-../x", "/part-x"] {
            assert!(!plain_stem(bad), "{bad}");
        }
    }

    #[test]
    fn a_throttle_holds_what_comes_faster_than_its_rate_and_never_sleeps() {
        let rec = |i: i64| vec![Value::Int(i), Value::str("x"), Value::Float(f64::NAN)];
        let mut t = Throttle::new(100.0);
        let mut out = Vec::new();
        let started = Instant::now();
        t.process(0, (0..500).map(rec).collect(), &mut out).unwrap();
        assert!(started.elapsed() < Duration::from_millis(100), "process slept");
        assert_eq!(out.len(), 1, "the first record goes at once, the others wait");
        assert!(t.holding());
        std::thread::sleep(Duration::from_millis(200));
        t.release(&mut out).unwrap();
        // 200 ms at 100 a second: about 20 more; never more than the time allows.
        let allowed = 1 + (started.elapsed().as_secs_f64() * 100.0) as usize;
        assert!(out.len() > 5 && out.len() <= allowed, "{} of at most {allowed}", out.len());
        // Held records are its state: a checkpoint restores them, in order, after those out.
        let st = t.snapshot(1).unwrap().expect("held records in the state");
        let mut back = Throttle::new(1e9);
        back.restore(Some(st.clone())).unwrap();
        let mut rest = Vec::new();
        back.release(&mut rest).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        back.release(&mut rest).unwrap();
        assert!(!back.holding());
        assert_eq!(out.len() + rest.len(), 500);
        for (i, r) in out.iter().chain(&rest).enumerate() {
            assert_eq!(r[0], Value::Int(i as i64));
            assert!(matches!(r[2], Value::Float(f) if f.is_nan()));
        }
        // Rescaled 1 -> 2: the old subtask's records go to exactly one new subtask.
        let mut got = 0;
        for subtask in 0..2 {
            let at = Rescale {
                uid: "slow".into(),
                subtask,
                parallelism: 2,
                old_parallelism: 1,
                key_groups: (0, 0),
            };
            let mut n = Throttle::new(1e9);
            n.rescale(vec![(0, st.clone())], &at).unwrap();
            got += n.held.len();
        }
        assert_eq!(got, 500 - out.len());
        // A damaged state is an error that says so, not a panic.
        for bad in [
            serde_json::json!({"held": "zz"}),
            serde_json::json!({"held": "0"}),
            serde_json::json!({"held": "ff01"}),
            serde_json::json!({"held": "+f"}),
            serde_json::json!({"other": 1}),
        ] {
            let e = Throttle::new(1.0).restore(Some(bad.clone())).unwrap_err();
            assert!(e.message.contains("throttle") && e.message.contains("damaged"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_pacer_that_is_ahead_waits_briefly_and_lets_nothing_go() {
        let mut p = Pacer::new(Some(1.0));
        let t = Instant::now();
        let first = p.allow(100);
        let second = p.allow(100);
        assert!(first + second <= 1, "{first} + {second} at 1 a second");
        assert!(t.elapsed() < Duration::from_millis(500), "allow waited {:?}", t.elapsed());
    }
}
