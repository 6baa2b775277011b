//! Checkpoints: their settings, their metadata and where they are kept, retention, and the
//! restart strategy that brings a failed job back from the last one.
//!
//! Storage layout, below the storage's root (`spec.checkpointing.storage`):
//!
//! ```text
//!   <namespace>/<job-name>/<job-id>/chk-<n>/_metadata                  written last
//!   <namespace>/<job-name>/<job-id>/chk-<n>/inflight/<task>-<subtask>  records overtaken (unaligned)
//!   <namespace>/<job-name>/<job-id>/shared/<instance>/<sst>            SST files, shared by checkpoints
//!   <namespace>/<job-name>/<job-id>/shared/own-<n>/<instance>/<file>   other RocksDB files of checkpoint n
//! ```
//!
//! and savepoints, below the savepoint directory, self-contained (their file names are
//! relative to their own directory):
//!
//! ```text
//!   <namespace>/<job-name>/sp-<id>/_metadata                           written last
//!   <namespace>/<job-name>/sp-<id>/keyed/<uid>-<subtask>               keyed state by key group
//! ```
//!
//! A checkpoint exists once its `_metadata` does: the coordinator writes it after every
//! subtask has acknowledged, so a checkpoint that failed half-way is never restored from.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use weir_crds::StorageUri;
use weir_crds::streamjob::{
    CheckpointMode, CheckpointingSpec, RestartStrategy, RestartStrategyType,
};

use crate::auth::{self, JobSecret};
use crate::error::RuntimeError;
use crate::snapshot::StateHandle;
use crate::storage::Storage;

/// The first bytes of a metadata file: the format and its version. Format 2 ends in the
/// SHA-256 of everything before it and, when the job has a secret of its own, an HMAC of the
/// same by it:
///
/// ```text
///   WEIR-CHECKPOINT 2\n<json>\nsha256:<hex>\n[hmac-sha256:<hex>\n]
/// ```
pub const MAGIC: &[u8] = b"WEIR-CHECKPOINT 2\n";
/// Format 1, written before checkpoints were sealed: read without a check.
pub const MAGIC_V1: &[u8] = b"WEIR-CHECKPOINT 1\n";
const SUM: &[u8] = b"\nsha256:";
const MAC: &[u8] = b"hmac-sha256:";
/// The metadata format this build writes. Version 2 added savepoints' keyed files of format 2
/// (an SST file per key group, [`crate::savepoint::KeyedFormat`]); a Weir that reads only
/// version 1 would take them for entries, so it must refuse them by the version. Version 3
/// added the backend that took a checkpoint (`stateBackend`) and heap checkpoints' keyed
/// files below `chk-<id>/keyed/`, which a Weir that reads only version 2 would restore
/// into RocksDB.
pub const VERSION: u32 = 3;
/// The oldest metadata format this build reads (its savepoints' keyed files are of format 1).
pub const OLDEST_VERSION: u32 = 1;
pub const METADATA: &str = "_metadata";

/// The checkpoint settings of a job, checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// Zero: no periodic checkpoints.
    pub interval: Duration,
    pub exactly_once: bool,
    pub timeout: Duration,
    pub min_pause: Duration,
    pub max_concurrent: u32,
    pub tolerable_failures: u32,
    pub unaligned: bool,
    pub alignment_timeout: Duration,
    pub incremental: bool,
    pub retained: u32,
}

impl Settings {
    pub fn from_spec(c: &CheckpointingSpec) -> Self {
        Self {
            interval: c.interval.as_std(),
            exactly_once: c.mode == CheckpointMode::ExactlyOnce,
            timeout: c.timeout.as_std(),
            min_pause: c.min_pause.as_std(),
            max_concurrent: c.max_concurrent.max(1) as u32,
            tolerable_failures: c.tolerable_failures.max(0) as u32,
            unaligned: c.unaligned,
            alignment_timeout: c.alignment_timeout.as_std(),
            incremental: c.incremental,
            retained: c.retained.max(1) as u32,
        }
    }
}

/// The default checkpoint storage when the spec names none: a local directory.
pub fn default_storage() -> StorageUri {
    StorageUri::Local("/var/tmp/weir/checkpoints".into())
}

/// Where savepoints go when neither the request nor `spec.savepoints.directory` says:
/// `savepoints` beside the checkpoint storage (`/var/tmp/weir/checkpoints` →
/// `/var/tmp/weir/savepoints`; `s3://b/p/checkpoints` → `s3://b/p/savepoints`), or inside it
/// when it is a bucket's or a file system's root.
pub fn default_savepoint_dir(checkpoints: &StorageUri) -> StorageUri {
    match checkpoints {
        StorageUri::Local(p) => match p.parent() {
            Some(parent) if p.file_name().is_some() => StorageUri::Local(parent.join("savepoints")),
            _ => StorageUri::Local(p.join("savepoints")),
        },
        StorageUri::S3 { bucket, prefix } => {
            let prefix = prefix.trim_end_matches('/');
            let parent = prefix
                .rsplit_once('/')
                .map_or("savepoints".to_string(), |(parent, _)| format!("{parent}/savepoints"));
            StorageUri::S3 { bucket: bucket.clone(), prefix: parent }
        }
    }
}

/// The state of one operator subtask in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorState {
    pub uid: String,
    pub subtask: u32,
    /// Keyed state: the RocksDB files (checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyed: Option<StateHandle>,
    /// Keyed state: one file sorted by key group, with its index (savepoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyed_file: Option<crate::savepoint::KeyedFile>,
    /// Everything else the operator keeps (a source's position, a sink's pending files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<serde_json::Value>,
    /// The records an unaligned checkpoint overtook on the way into this subtask (on the
    /// first operator of a task), processed first on restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<InFlightHandle>,
}

/// A file of in-flight records in the checkpoint's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InFlightHandle {
    /// Relative to the job's directory.
    pub key: String,
    pub bytes: u64,
    pub records: u64,
}

/// What one subtask of a task reports for a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskAck {
    /// The uid of the task's first operator.
    pub task: String,
    pub subtask: u32,
    pub operators: Vec<OperatorState>,
    /// Bytes of keyed state the checkpoint refers to, and how many of them were uploaded.
    pub state_bytes: u64,
    pub uploaded_bytes: u64,
    /// From the first barrier to the last one (aligned) at this subtask.
    pub alignment_ms: u64,
    /// The synchronous part (flush and RocksDB checkpoint) and the upload.
    pub sync_ms: u64,
    pub async_ms: u64,
    /// Taken unaligned, storing `in_flight_bytes` of records it overtook.
    #[serde(default)]
    pub unaligned: bool,
    #[serde(default)]
    pub in_flight_bytes: u64,
}

/// A completed checkpoint's `_metadata`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub version: u32,
    pub job_name: String,
    pub job_id: String,
    pub id: u64,
    /// Milliseconds since the epoch.
    pub triggered_at: u64,
    pub completed_at: u64,
    pub parallelism: u32,
    pub max_parallelism: u32,
    pub operator_uids: Vec<String>,
    /// Taken when every source had ended (exhausted or stopped): the job's final state.
    pub final_: bool,
    /// A savepoint: self-contained, its files named relative to its own directory.
    #[serde(default)]
    pub savepoint: bool,
    /// The backend that took it (`spec.stateBackend`). A savepoint restores into either; a
    /// checkpoint only into this one.
    #[serde(default)]
    pub state_backend: crate::state::StateBackendKind,
    pub operators: Vec<OperatorState>,
}

impl Metadata {
    /// The metadata file, sealed with a checksum and, given the job's secret, its MAC.
    pub fn to_bytes(&self, secret: Option<&JobSecret>) -> Vec<u8> {
        seal(&serde_json::to_vec_pretty(self).expect("metadata serializes"), secret)
    }

    /// Reads a metadata file read back from storage (`where_` names it in errors): its seal
    /// checked (and its MAC, given the secret the job signs with), then every name in it.
    /// Nothing in it is trusted before.
    pub fn parse(
        bytes: &[u8],
        where_: &str,
        secret: Option<&JobSecret>,
    ) -> Result<Self, RuntimeError> {
        let body = unseal(bytes, where_, secret)?;
        let m: Metadata = serde_json::from_slice(body).map_err(|e| {
            RuntimeError::user(format!("{where_}: damaged checkpoint metadata: {e}"))
        })?;
        if !(OLDEST_VERSION..=VERSION).contains(&m.version) {
            return Err(RuntimeError::user(format!(
                "{where_}: metadata version {}; this Weir reads version {OLDEST_VERSION} to {VERSION}",
                m.version
            )));
        }
        m.check_names().map_err(|e| {
            RuntimeError::user(format!("{where_}: refused: {e}; the metadata is damaged or forged"))
        })?;
        Ok(m)
    }

    /// Every name in the metadata that becomes a file name or a storage key: plain relative
    /// keys of the form the checkpoint writes, and RocksDB's own file names, never absolute
    /// or with `..`.
    pub fn check_names(&self) -> Result<(), String> {
        for o in &self.operators {
            if !component(&o.uid) {
                return Err(format!("operator uid {:?} is not a plain name", o.uid));
            }
            if let Some(k) = &o.keyed {
                if !component(&k.instance) {
                    return Err(format!("instance {:?} is not a plain name", k.instance));
                }
                for f in &k.files {
                    if !rocksdb_name(&f.name) {
                        return Err(format!(
                            "the file name {:?} of {:?} is not one of RocksDB's",
                            f.name, o.uid
                        ));
                    }
                    if !relative_key(&f.key, "shared/") {
                        return Err(format!(
                            "the key {:?} of {:?} is not below shared/",
                            f.key, o.uid
                        ));
                    }
                }
            }
            // A savepoint's keyed files are below its keyed/; a heap checkpoint's below
            // shared/, like RocksDB's files.
            let keyed_dir = if self.savepoint { "keyed/" } else { "shared/" };
            if let Some(f) = &o.keyed_file
                && !relative_key(&f.file, keyed_dir)
            {
                return Err(format!(
                    "the keyed file {:?} of {:?} is not below {keyed_dir}",
                    f.file, o.uid
                ));
            }
            if let Some(h) = &o.in_flight
                && !relative_key(&h.key, "chk-")
            {
                return Err(format!(
                    "the in-flight records {:?} of {:?} are not below a chk-<n>/",
                    h.key, o.uid
                ));
            }
        }
        Ok(())
    }

    /// The state of operator `uid`'s subtask `subtask`.
    pub fn state_of(&self, uid: &str, subtask: u32) -> Option<&OperatorState> {
        self.operators.iter().find(|o| o.uid == uid && o.subtask == subtask)
    }

    pub fn size_bytes(&self) -> u64 {
        let files = self.operators.iter().filter_map(|o| o.keyed_file.as_ref());
        self.operators.iter().filter_map(|o| o.keyed.as_ref()).map(StateHandle::size).sum::<u64>()
            + files.map(|f| f.offsets.last().copied().unwrap_or(0)).sum::<u64>()
    }

    /// What it is, for messages: "checkpoint 3" or "savepoint (checkpoint 3)".
    pub fn describe(&self) -> String {
        if self.savepoint {
            format!("savepoint (checkpoint {})", self.id)
        } else {
            format!("checkpoint {}", self.id)
        }
    }

    /// The prefix of a checkpoint's own files, relative to the job's directory.
    pub fn dir(id: u64) -> String {
        format!("chk-{id}")
    }
}

/// `json` as a metadata file of format 2.
pub fn seal(json: &[u8], secret: Option<&JobSecret>) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(json);
    let sum = ring::digest::digest(&ring::digest::SHA256, &b);
    let mac = secret.map(|s| s.prove(&[b"weir checkpoint metadata", &b]));
    b.extend_from_slice(SUM);
    b.extend_from_slice(auth::hex(sum.as_ref()).as_bytes());
    b.push(b'\n');
    if let Some(m) = mac {
        b.extend_from_slice(MAC);
        b.extend_from_slice(auth::hex(&m).as_bytes());
        b.push(b'\n');
    }
    b
}

/// The JSON of a metadata file, its seal checked; with `secret`, its MAC too.
fn unseal<'a>(
    bytes: &'a [u8],
    where_: &str,
    secret: Option<&JobSecret>,
) -> Result<&'a [u8], RuntimeError> {
    let damaged = |why: &str| RuntimeError::user(format!("{where_} is damaged: {why}"));
    if let Some(body) = bytes.strip_prefix(MAGIC_V1) {
        // Written before metadata was sealed: nothing to check it against.
        return Ok(body);
    }
    let Some(rest) = bytes.strip_prefix(MAGIC) else {
        let first = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
        return Err(RuntimeError::user(format!(
            "{where_} is not checkpoint metadata of this version of Weir (it starts with {first:?})"
        )));
    };
    let Some(at) = rest.windows(SUM.len()).rposition(|w| w == SUM) else {
        return Err(damaged("it ends before its checksum (truncated?)"));
    };
    let sealed = &bytes[..MAGIC.len() + at];
    // `<64 hex>\n`, then nothing or `hmac-sha256:<64 hex>\n`.
    let trailer = &rest[at + SUM.len()..];
    let hex_line = |l: &[u8]| {
        l.strip_suffix(b"\n").and_then(|l| std::str::from_utf8(l).ok()).and_then(auth::unhex::<32>)
    };
    let (sum_line, mac_line) = trailer.split_at(trailer.len().min(65));
    let Some(sum) = hex_line(sum_line) else {
        return Err(damaged("its checksum is cut short (truncated?)"));
    };
    if ring::digest::digest(&ring::digest::SHA256, sealed).as_ref() != sum {
        return Err(damaged("its checksum does not match (truncated or changed)"));
    }
    let mac = match mac_line {
        [] => None,
        l => match l.strip_prefix(MAC).and_then(hex_line) {
            Some(m) => Some(m),
            None => return Err(damaged("what follows its checksum is not a MAC")),
        },
    };
    if let Some(secret) = secret {
        let ok = mac.is_some_and(|m| secret.check(&[b"weir checkpoint metadata", sealed], &m));
        if !ok {
            return Err(RuntimeError::user(format!(
                "{where_} was not written by this job: its MAC does not match the job's secret ({}), so it was changed or forged",
                auth::ENV
            )));
        }
    }
    Ok(&rest[..at])
}

/// A plain name: one path component of letters, digits, `.`, `_`, `-` and `=`, not starting
/// with a dot.
fn component(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 255
        && !c.starts_with('.')
        && c.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-=".contains(&b))
}

/// A storage key relative to a snapshot's directory, below `prefix`, of plain components.
fn relative_key(k: &str, prefix: &str) -> bool {
    k.len() <= 1024 && k.starts_with(prefix) && k.split('/').all(component)
}

/// A file name RocksDB gives the files of a checkpoint.
fn rocksdb_name(n: &str) -> bool {
    let number = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    matches!(n, "CURRENT" | "IDENTITY")
        || n.strip_prefix("MANIFEST-").is_some_and(number)
        || n.strip_prefix("OPTIONS-").is_some_and(number)
        || [".sst", ".log", ".blob"].iter().any(|x| n.strip_suffix(x).is_some_and(number))
}

/// A snapshot named by its path (its directory or its `_metadata`): the directory holding
/// it (the old job's directory, which its file names are relative to) and its own name
/// (`chk-<n>`).
pub fn split_snapshot_path(uri: &StorageUri) -> Result<(StorageUri, String), RuntimeError> {
    let bad = || {
        RuntimeError::user(format!(
            "{uri} does not name a checkpoint or savepoint: give its directory (…/chk-<n>) or its {METADATA}"
        ))
    };
    match uri {
        StorageUri::Local(path) => {
            let path = if path.file_name().is_some_and(|n| n == METADATA) {
                path.parent().ok_or_else(bad)?
            } else {
                path.as_path()
            };
            let name = path.file_name().ok_or_else(bad)?.to_string_lossy().into_owned();
            let parent = path.parent().ok_or_else(bad)?;
            Ok((StorageUri::Local(parent.to_path_buf()), name))
        }
        StorageUri::S3 { bucket, prefix } => {
            let prefix = prefix.strip_suffix(&format!("/{METADATA}")).unwrap_or(prefix);
            let (parent, name) = prefix.rsplit_once('/').unwrap_or(("", prefix));
            if name.is_empty() {
                return Err(bad());
            }
            Ok((StorageUri::S3 { bucket: bucket.clone(), prefix: parent.into() }, name.into()))
        }
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// The directory of a job's checkpoints, relative to the storage's root.
pub fn job_dir(namespace: &str, name: &str, job_id: &str) -> String {
    format!("{namespace}/{name}/{job_id}")
}

/// The checkpoints of a job found in storage.
#[derive(Debug, Default)]
pub struct Found {
    /// Completed checkpoints, oldest first (by completion time).
    pub completed: Vec<Metadata>,
    /// Metadata that cannot be used (damaged, forged, of an unknown version): its key
    /// (relative to the root) and why.
    pub unusable: Vec<(String, RuntimeError)>,
}

/// Every checkpoint of job `name` in `namespace`, of any job id; with `secret`, the job's
/// own MAC is required of sealed metadata.
pub fn completed(
    root: &dyn Storage,
    namespace: &str,
    name: &str,
    secret: Option<&JobSecret>,
) -> Result<Found, RuntimeError> {
    let mut found = Found::default();
    for e in root.list(&format!("{namespace}/{name}/"))? {
        // Checkpoints only (`<job-id>/chk-<n>/_metadata`), not savepoints beside them.
        let Some(dir) = e.key.strip_suffix(&format!("/{METADATA}")) else { continue };
        if !dir.rsplit('/').next().is_some_and(|d| d.starts_with("chk-")) {
            continue;
        }
        let Some(bytes) = root.get(&e.key)? else { continue };
        match Metadata::parse(&bytes, &root.describe(&e.key), secret) {
            Ok(m) => found.completed.push(m),
            Err(err) => found.unusable.push((e.key, err)),
        }
    }
    found.completed.sort_by_key(|m| (m.completed_at, m.id));
    Ok(found)
}

/// The highest checkpoint id used by a job id, complete or not (a restarted job goes on
/// above it, so that it never writes into a failed checkpoint's files).
pub fn highest_id(job: &dyn Storage) -> Result<u64, RuntimeError> {
    let mut top = 0;
    for e in job.list("chk-")? {
        let n = e.key.strip_prefix("chk-").and_then(|r| r.split('/').next());
        if let Some(n) = n.and_then(|n| n.parse::<u64>().ok()) {
            top = top.max(n);
        }
    }
    Ok(top)
}

/// Deletes the checkpoints of `dropped` and the shared files no `retained` one refers to.
pub fn discard(
    job: &dyn Storage,
    dropped: &[Metadata],
    retained: &[Metadata],
) -> Result<(), RuntimeError> {
    let handles = |ms: &[Metadata]| -> Vec<StateHandle> {
        ms.iter().flat_map(|m| m.operators.iter().filter_map(|o| o.keyed.clone())).collect()
    };
    let (d, r) = (handles(dropped), handles(retained));
    for key in crate::snapshot::unreferenced(&d, &r) {
        job.delete(&key)?;
    }
    // The heap's keyed files (checkpoints only: a savepoint's are its own).
    let keyed = |ms: &[Metadata]| -> std::collections::BTreeSet<String> {
        ms.iter()
            .filter(|m| !m.savepoint)
            .flat_map(|m| m.operators.iter().filter_map(|o| o.keyed_file.as_ref()))
            .map(|f| f.file.clone())
            .filter(|k| k.starts_with("shared/"))
            .collect()
    };
    let kept = keyed(retained);
    for key in keyed(dropped).difference(&kept) {
        job.delete(key)?;
        if let Some((dir, _)) = key.rsplit_once('/') {
            job.remove_empty_dirs(dir);
        }
    }
    for m in dropped {
        // The metadata first: a checkpoint half deleted must not look complete.
        job.delete(&format!("{}/{METADATA}", Metadata::dir(m.id)))?;
        for e in job.list(&format!("{}/", Metadata::dir(m.id)))? {
            job.delete(&e.key)?;
        }
        // No empty directories left behind on a file system.
        job.remove_empty_dirs(&Metadata::dir(m.id));
        job.remove_empty_dirs(&format!("shared/own-{}", m.id));
        if m.final_ {
            job.remove_empty_dirs("shared/own-final");
        }
    }
    Ok(())
}

/// Decides whether and when a failed job restarts.
#[derive(Debug, Clone)]
pub struct Restarts {
    spec: RestartStrategy,
    /// Restarts so far (fixed-delay), or since the last reset (exponential-delay).
    count: u32,
    /// When each failure happened (failure-rate).
    failures: Vec<std::time::Instant>,
    /// The delay of the last restart.
    last: Duration,
    /// When the job last (re)started.
    running_since: std::time::Instant,
    rng: u64,
}

impl Restarts {
    pub fn new(spec: &RestartStrategy) -> Self {
        Self {
            spec: spec.clone(),
            count: 0,
            failures: Vec::new(),
            last: spec.delay.as_std(),
            running_since: std::time::Instant::now(),
            rng: now_ms() | 1,
        }
    }

    /// Whether the strategy restarts a failed job at all.
    pub fn restarts_at_all(&self) -> bool {
        self.spec.kind != RestartStrategyType::None
    }

    /// The delay of the last restart, for a restart that failed before the job ran again: it
    /// is not a new failure.
    pub fn again(&self) -> Duration {
        self.last
    }

    /// The job failed now: `Some(delay)` to restart after it, `None` to give up (with why).
    pub fn on_failure(&mut self, now: std::time::Instant) -> Result<Duration, String> {
        let d = self.next_delay(now);
        if let Ok(d) = d {
            self.last = d;
        }
        d
    }

    fn next_delay(&mut self, now: std::time::Instant) -> Result<Duration, String> {
        let s = &self.spec;
        let delay = s.delay.as_std();
        match s.kind {
            RestartStrategyType::None => {
                Err("restartStrategy.type is none: the job is not restarted".into())
            }
            RestartStrategyType::FixedDelay => {
                if self.count >= s.attempts.max(0) as u32 {
                    return Err(format!(
                        "restartStrategy fixed-delay: all {} restart attempts are used",
                        s.attempts
                    ));
                }
                self.count += 1;
                Ok(delay)
            }
            RestartStrategyType::FailureRate => {
                let window = s.failure_rate_interval.as_std();
                self.failures.push(now);
                self.failures.retain(|t| now.duration_since(*t) <= window);
                if self.failures.len() > s.max_failures_per_interval.max(1) as usize {
                    return Err(format!(
                        "restartStrategy failure-rate: {} failures within {}",
                        self.failures.len(),
                        s.failure_rate_interval
                    ));
                }
                Ok(delay)
            }
            RestartStrategyType::ExponentialDelay => {
                if now.duration_since(self.running_since) >= s.reset_after.as_std() {
                    self.count = 0;
                }
                let base = delay.as_secs_f64() * s.backoff_multiplier.powi(self.count as i32);
                let base = base.min(s.max_delay.as_std().as_secs_f64());
                self.count += 1;
                // xorshift: enough randomness to spread restarts.
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                let unit = (self.rng >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
                let j = s.jitter.clamp(0.0, 1.0);
                let d = base * (1.0 + j * (2.0 * unit - 1.0));
                Ok(Duration::from_secs_f64(d.max(0.0)))
            }
        }
    }

    /// The job is running again.
    pub fn started(&mut self, now: std::time::Instant) {
        self.running_since = now;
    }
}

/// Per-operator state of a checkpoint, by (uid, subtask), for the subtasks a worker runs.
pub type Restored = BTreeMap<(String, u32), OperatorState>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn strategy(yaml: &str) -> RestartStrategy {
        serde_json::from_value(serde_saphyr::from_str::<serde_json::Value>(yaml).unwrap()).unwrap()
    }

    #[test]
    fn exponential_delay_grows_to_its_cap_and_resets_after_a_healthy_period() {
        let mut r = Restarts::new(&strategy(
            "{type: exponential-delay, delay: 1s, maxDelay: 5s, backoffMultiplier: 2, jitter: 0, resetAfter: 1h}",
        ));
        let t = Instant::now();
        let d: Vec<f64> = (0..5).map(|_| r.on_failure(t).unwrap().as_secs_f64()).collect();
        assert_eq!(d, vec![1.0, 2.0, 4.0, 5.0, 5.0]);
        r.started(t);
        let later = t + Duration::from_secs(3601);
        assert_eq!(r.on_failure(later).unwrap(), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_its_share() {
        let mut r = Restarts::new(&strategy("{delay: 10s, maxDelay: 10s, jitter: 0.1}"));
        for _ in 0..100 {
            let d = r.on_failure(Instant::now()).unwrap().as_secs_f64();
            assert!((9.0..=11.0).contains(&d), "{d}");
        }
    }

    #[test]
    fn fixed_delay_gives_up_after_its_attempts_and_none_never_restarts() {
        let mut r = Restarts::new(&strategy("{type: fixed-delay, delay: 2s, attempts: 2}"));
        let t = Instant::now();
        assert_eq!(r.on_failure(t).unwrap(), Duration::from_secs(2));
        assert_eq!(r.on_failure(t).unwrap(), Duration::from_secs(2));
        assert!(r.on_failure(t).unwrap_err().contains("all 2 restart attempts"));
        let mut n = Restarts::new(&strategy("{type: none}"));
        assert!(n.on_failure(t).unwrap_err().contains("none"));
    }

    #[test]
    fn failure_rate_counts_failures_within_its_interval() {
        let mut r = Restarts::new(&strategy(
            "{type: failure-rate, delay: 1s, maxFailuresPerInterval: 2, failureRateInterval: 10s}",
        ));
        let t = Instant::now();
        assert!(r.on_failure(t).is_ok());
        assert!(r.on_failure(t + Duration::from_secs(1)).is_ok());
        assert!(r.on_failure(t + Duration::from_secs(2)).unwrap_err().contains("3 failures"));
        // Old failures fall out of the interval.
        let mut r = Restarts::new(&strategy(
            "{type: failure-rate, delay: 1s, maxFailuresPerInterval: 1, failureRateInterval: 10s}",
        ));
        assert!(r.on_failure(t).is_ok());
        assert!(r.on_failure(t + Duration::from_secs(11)).is_ok());
    }

    #[test]
    fn metadata_round_trips_and_foreign_bytes_are_refused() {
        let m = Metadata {
            version: VERSION,
            job_name: "j".into(),
            job_id: "id".into(),
            id: 3,
            triggered_at: 1,
            completed_at: 2,
            parallelism: 2,
            max_parallelism: 128,
            operator_uids: vec!["a".into()],
            final_: false,
            savepoint: true,
            state_backend: Default::default(),
            operators: vec![OperatorState {
                uid: "a".into(),
                subtask: 1,
                keyed: None,
                keyed_file: Some(crate::savepoint::KeyedFile {
                    file: "keyed/a-1".into(),
                    format: crate::savepoint::KeyedFormat::Sst,
                    key_groups: (64, 127),
                    offsets: (0..66).map(|i| 13 + i * 10).collect(),
                    checksums: (0..64u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect(),
                    entries: 65,
                }),
                state: Some(serde_json::json!({"x": 1})),
                in_flight: Some(InFlightHandle {
                    key: "chk-3/inflight/a-1".into(),
                    bytes: 9,
                    records: 1,
                }),
            }],
        };
        assert_eq!(Metadata::parse(&m.to_bytes(None), "m", None).unwrap(), m);
        let e = Metadata::parse(b"{\"id\": 3}", "s3://b/chk-3/_metadata", None).unwrap_err();
        assert!(e.message.contains("s3://b/chk-3/_metadata"), "{e}");
        let mut newer = m.clone();
        newer.version = VERSION + 1;
        let e = Metadata::parse(&newer.to_bytes(None), "m", None).unwrap_err();
        assert!(e.message.contains(&format!("version {}", VERSION + 1)), "{e}");
        // Version 1 (format 1 keyed files, named without a format) still reads.
        let mut old = m.clone();
        old.version = 1;
        let mut file = old.operators[0].keyed_file.take().unwrap();
        file.format = crate::savepoint::KeyedFormat::Entries;
        file.checksums.clear();
        old.operators[0].keyed_file = Some(file);
        let mut json: serde_json::Value = serde_json::to_value(&old).unwrap();
        json["operators"][0]["keyedFile"].as_object_mut().unwrap().remove("format").unwrap();
        let mut bytes = MAGIC_V1.to_vec();
        bytes.extend(serde_json::to_vec(&json).unwrap());
        assert_eq!(Metadata::parse(&bytes, "m", None).unwrap(), old);
    }

    fn small() -> Metadata {
        Metadata {
            version: VERSION,
            job_name: "j".into(),
            job_id: "id".into(),
            id: 3,
            triggered_at: 1,
            completed_at: 2,
            parallelism: 1,
            max_parallelism: 128,
            operator_uids: vec!["counts".into()],
            final_: false,
            savepoint: false,
            state_backend: Default::default(),
            operators: vec![OperatorState {
                uid: "counts".into(),
                subtask: 0,
                keyed: Some(StateHandle {
                    instance: "counts-0-run-a0".into(),
                    key_groups: (0, 127),
                    files: vec![
                        crate::snapshot::SnapshotFile {
                            name: "000012.sst".into(),
                            key: "shared/counts-0-run-a0/000012.sst".into(),
                            size: 10,
                        },
                        crate::snapshot::SnapshotFile {
                            name: "MANIFEST-000005".into(),
                            key: "shared/own-3/counts-0-run-a0/MANIFEST-000005".into(),
                            size: 10,
                        },
                    ],
                }),
                keyed_file: None,
                state: None,
                in_flight: None,
            }],
        }
    }

    #[test]
    fn damaged_metadata_is_refused_naming_the_file() {
        let bytes = small().to_bytes(None);
        let at = "s3://b/default/j/id/chk-3/_metadata";
        // Cut anywhere: refused, never taken for something else.
        for n in [0, 10, MAGIC.len(), bytes.len() / 2, bytes.len() - 70, bytes.len() - 1] {
            let e = Metadata::parse(&bytes[..n], at, None).unwrap_err();
            assert!(e.message.starts_with(at), "{n}: {e}");
        }
        // A changed byte of the JSON.
        let mut changed = bytes.clone();
        let i = changed.windows(4).position(|w| w == b"\"id\"").unwrap() + 8;
        changed[i] ^= 1;
        let e = Metadata::parse(&changed, at, None).unwrap_err();
        assert!(e.message.contains("checksum does not match"), "{e}");
        // A newer format.
        let mut newer = b"WEIR-CHECKPOINT 3\n".to_vec();
        newer.extend_from_slice(&bytes[MAGIC.len()..]);
        let e = Metadata::parse(&newer, at, None).unwrap_err();
        assert!(e.message.contains("not checkpoint metadata of this version"), "{e}");
    }

    #[test]
    fn the_mac_ties_metadata_to_the_jobs_secret() {
        let a = JobSecret::new("the-secret-of-job-a-0123456789abcdef").unwrap();
        let b = JobSecret::new("the-secret-of-job-b-0123456789abcdef").unwrap();
        let m = small();
        let signed = m.to_bytes(Some(&a));
        assert_eq!(Metadata::parse(&signed, "m", Some(&a)).unwrap(), m);
        // Without a secret only the checksum is checked (a savepoint of another job).
        assert_eq!(Metadata::parse(&signed, "m", None).unwrap(), m);
        for (bytes, who) in [(signed.clone(), "b"), (m.to_bytes(None), "unsigned")] {
            let e = Metadata::parse(&bytes, "m", Some(&b)).unwrap_err();
            assert!(e.message.contains("not written by this job"), "{who}: {e}");
        }
        // A forger who recomputes the checksum still lacks the MAC.
        let forged = seal(&serde_json::to_vec(&m).unwrap(), None);
        assert!(Metadata::parse(&forged, "m", Some(&a)).is_err());
        assert!(JobSecret::generate().for_metadata().is_none());
        assert!(a.for_metadata().is_some());
    }

    #[test]
    fn a_dropped_checkpoint_leaves_no_empty_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let job = crate::storage::LocalStorage::new(tmp.path());
        let m = small();
        for f in &m.operators[0].keyed.as_ref().unwrap().files {
            job.put(&f.key, b"0123456789").unwrap();
        }
        job.put("chk-3/_metadata", &m.to_bytes(None)).unwrap();
        job.put("chk-3/inflight/counts-0", b"x").unwrap();
        discard(&job, &[m], &[]).unwrap();
        assert!(!tmp.path().join("chk-3").exists());
        assert!(!tmp.path().join("shared/own-3").exists());
        assert!(job.list("").unwrap().is_empty());
    }

    /// A heap checkpoint's keyed file goes with the last checkpoint that names it (the final
    /// state of a subtask is named by every checkpoint completed after it ended).
    #[test]
    fn heap_keyed_files_go_when_no_retained_checkpoint_names_them() {
        let tmp = tempfile::tempdir().unwrap();
        let job = crate::storage::LocalStorage::new(tmp.path());
        let heap = |id: u64, files: &[&str]| {
            let mut m = small();
            m.id = id;
            m.state_backend = crate::state::StateBackendKind::Heap;
            m.operators = files
                .iter()
                .enumerate()
                .map(|(s, f)| OperatorState {
                    uid: "a".into(),
                    subtask: s as u32,
                    keyed: None,
                    keyed_file: Some(crate::savepoint::KeyedFile {
                        file: f.to_string(),
                        format: crate::savepoint::KeyedFormat::Entries,
                        key_groups: (0, 0),
                        offsets: vec![13, 13],
                        checksums: vec![],
                        entries: 0,
                    }),
                    state: None,
                    in_flight: None,
                })
                .collect();
            job.put(&format!("chk-{id}/_metadata"), &m.to_bytes(None)).unwrap();
            for f in files {
                job.put(f, b"WEIR-KEYED 1\n").unwrap();
            }
            m
        };
        let ended = "shared/a-1-run/keyed-final";
        let c4 = heap(4, &["shared/a-0-run/keyed-4", ended]);
        let c5 = heap(5, &["shared/a-0-run/keyed-5", ended]);
        discard(&job, std::slice::from_ref(&c4), std::slice::from_ref(&c5)).unwrap();
        let keys: Vec<String> = job.list("").unwrap().into_iter().map(|e| e.key).collect();
        assert!(!keys.iter().any(|k| k.contains("keyed-4") || k.starts_with("chk-4")), "{keys:?}");
        assert!(keys.iter().any(|k| k == ended), "still named by checkpoint 5: {keys:?}");
        discard(&job, &[c5], &[]).unwrap();
        assert!(job.list("").unwrap().is_empty());
        assert!(!tmp.path().join("shared").join("a-0-run").exists());
    }

    #[test]
    fn names_in_metadata_are_plain_relative_names_of_the_expected_form() {
        let bad_names = ["/etc/passwd", "../../x.sst", "..", "a/000012.sst", "", "x.sst"];
        for name in bad_names {
            let mut m = small();
            m.operators[0].keyed.as_mut().unwrap().files[0].name = name.into();
            let e = Metadata::parse(&m.to_bytes(None), "m", None).unwrap_err();
            assert!(e.message.contains("is not one of RocksDB's"), "{name}: {e}");
        }
        let bad_keys =
            ["/tmp/x", "shared/../../other-job/x.sst", "shared//x", "chk-1/x", "shared/./x"];
        for key in bad_keys {
            let mut m = small();
            m.operators[0].keyed.as_mut().unwrap().files[0].key = key.into();
            let e = Metadata::parse(&m.to_bytes(None), "m", None).unwrap_err();
            assert!(e.message.contains("is not below shared/"), "{key}: {e}");
        }
        for uid in ["../x", "/x", ".x", "a/b"] {
            let mut m = small();
            m.operators[0].uid = uid.into();
            assert!(Metadata::parse(&m.to_bytes(None), "m", None).is_err(), "{uid}");
        }
        let mut m = small();
        m.operators[0].keyed.as_mut().unwrap().instance = "../../tmp".into();
        assert!(Metadata::parse(&m.to_bytes(None), "m", None).is_err());
        let mut m = small();
        m.operators[0].in_flight =
            Some(InFlightHandle { key: "../chk-1/inflight/a-0".into(), bytes: 1, records: 1 });
        assert!(Metadata::parse(&m.to_bytes(None), "m", None).is_err());
        // A heap checkpoint's keyed files are below its own chk-<id>/keyed/, a savepoint's
        // below keyed/.
        let keyed = |file: &str, savepoint: bool| {
            let mut m = small();
            m.savepoint = savepoint;
            m.operators[0].keyed = None;
            m.operators[0].keyed_file = Some(crate::savepoint::KeyedFile {
                file: file.into(),
                format: crate::savepoint::KeyedFormat::Entries,
                key_groups: (0, 0),
                offsets: vec![13, 13],
                checksums: vec![],
                entries: 0,
            });
            Metadata::parse(&m.to_bytes(None), "m", None).map(drop).map_err(|e| e.message)
        };
        assert_eq!(keyed("shared/a-0-run/keyed-3", false), Ok(()));
        assert_eq!(keyed("keyed/a-0", true), Ok(()));
        for (file, savepoint) in [
            ("keyed/a-0", false),
            ("shared/a-0-run/keyed-3", true),
            ("chk-3/keyed/a-0", false),
            ("shared/../../x", false),
            ("/shared/x", false),
        ] {
            let e = keyed(file, savepoint).unwrap_err();
            assert!(e.contains("is not below"), "{file}: {e}");
        }
        for ok in ["CURRENT", "OPTIONS-000007", "000004.log", "MANIFEST-000005", "000012.sst"] {
            assert!(rocksdb_name(ok), "{ok}");
        }
    }

    proptest::proptest! {
        #[test]
        fn savepoint_metadata_round_trips(
            id in 1u64..u64::MAX / 2,
            max_p in 1u32..=1024,
            p_seed in 0u32..1024,
            uids in proptest::collection::vec("[a-z][a-z0-9-]{0,12}", 1..4),
            lens in proptest::collection::vec(0u64..1_000_000, 1..40),
            stop in proptest::bool::ANY,
        ) {
            let p = 1 + p_seed % max_p;
            let mut operators = Vec::new();
            for uid in &uids {
                for s in 0..p.min(8) {
                    let r = crate::keygroup::KeyGroupRange::of_subtask(max_p, p, s);
                    let n = usize::from(r.end - r.start) + 2;
                    let mut at = crate::savepoint::KEYED_MAGIC_SST.len() as u64;
                    let offsets: Vec<u64> = (0..n)
                        .map(|i| {
                            let o = at;
                            at += lens[i % lens.len()];
                            o
                        })
                        .collect();
                    let file = crate::savepoint::KeyedFile {
                        file: format!("keyed/{uid}-{s}"),
                        format: crate::savepoint::KeyedFormat::Sst,
                        key_groups: (r.start, r.end),
                        offsets,
                        checksums: (0..n as u64 - 1).map(|i| i ^ id).collect(),
                        entries: u64::from(s) * 7,
                    };
                    proptest::prop_assert!(file.check().is_ok());
                    operators.push(OperatorState {
                        uid: uid.clone(),
                        subtask: s,
                        keyed: None,
                        keyed_file: Some(file),
                        state: stop.then(|| serde_json::json!({"pending": [[id, [s]]]})),
                        in_flight: None,
                    });
                }
            }
            let m = Metadata {
                version: VERSION,
                job_name: "j".into(),
                job_id: "id".into(),
                id,
                triggered_at: 1,
                completed_at: 2,
                parallelism: p,
                max_parallelism: max_p,
                operator_uids: uids.clone(),
                final_: false,
                savepoint: true,
                state_backend: Default::default(),
                operators,
            };
            let back = Metadata::parse(&m.to_bytes(None), "sp-x/_metadata", None).unwrap();
            proptest::prop_assert_eq!(back, m);
        }
    }

    #[test]
    fn savepoints_go_beside_the_checkpoints_by_default() {
        let d = |s: &str| default_savepoint_dir(&s.parse().unwrap()).to_string();
        assert_eq!(d("/var/tmp/weir/checkpoints"), "/var/tmp/weir/savepoints");
        assert_eq!(d("s3://bkt/weir/checkpoints"), "s3://bkt/weir/savepoints");
        assert_eq!(d("s3://bkt/checkpoints"), "s3://bkt/savepoints");
        assert_eq!(d("s3://bkt"), "s3://bkt/savepoints");
    }
}
