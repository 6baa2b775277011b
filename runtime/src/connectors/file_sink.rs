//! The `file_sink`: part files in a local directory or under an S3 prefix, committed in two
//! phases with the checkpoints.

use std::io::Write;
use std::path::PathBuf;

use weir_crds::StorageUri;

use super::format::Encoder;
use crate::error::RuntimeError;
use crate::objstore::S3Client;
use crate::operator::{Operator, Rescale, bad_state};
use crate::record::Record;

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
    /// Records to lines (comma-separated values, or JSON objects).
    encoder: Encoder,
    buf: Vec<u8>,
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
            encoder: Encoder::new(weir_crds::plan::SinkFormat::Csv, &[]),
            buf: Vec::new(),
            two_phase,
            open: None,
            closed: Vec::new(),
            pending: Vec::new(),
            next_part: 0,
            part_bytes: S3_PART_BYTES,
        })
    }

    /// Writes its records with `encoder` (the default: comma-separated values).
    pub fn encode_with(mut self, encoder: Encoder) -> Self {
        self.encoder = encoder;
        self
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
        self.encoder.write(&batch, &mut buf);
        let r = self.write(&buf);
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
    use crate::record::Value;

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
    fn a_restored_sink_state_names_plain_parts_only() {
        for ok in ["part-1796128818449-0513-0", "part-job.v2_1-3"] {
            assert!(plain_stem(ok), "{ok}");
        }
        for bad in ["../../etc/part-x", "part-", "part-a/b", "x-1", "part-../x", "/part-x"] {
            assert!(!plain_stem(bad), "{bad}");
        }
    }
}
