//! The coordinator: takes the workers' hellos, hands out the job, triggers and completes its
//! checkpoints, restarts it from the last completed one when a part fails, and serves its
//! state over HTTP.
//!
//! `weir run` starts a coordinator with one worker thread that runs every subtask (or, with
//! `--processes`, a `weir worker` child process per subtask index); in pods the coordinator
//! and the workers are started separately (`weir coordinator`, `weir worker`).
//!
//! A run of a job is a series of attempts. An attempt starts once a worker is connected for
//! every slot; it ends when every worker reports `Finished`, or when a part fails: a worker
//! reports `Failed` or is lost, or checkpoints fail more often in a row than the spec
//! tolerates. The coordinator then cancels the attempt, asks the restart strategy whether and
//! when to go on, and starts the next attempt from the last completed checkpoint. A worker
//! process that died is started again (`--processes`) or awaited (pods come back).

mod accept;
mod attempts;
mod checkpoints;
mod savepoints;
mod status;

use accept::*;
use checkpoints::check_restore;
pub use status::{SavepointRefused, Status};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, unbounded};
use weir_crds::api::JobState;
use weir_crds::{StorageUri, StreamJobSpec};

use crate::auth::JobSecret;
use crate::checkpoint::{self, Metadata, Restarts, Settings, TaskAck};
use crate::control::{SavepointTarget, ToCoordinator, ToWorker, Writer};
use crate::error::RuntimeError;
use crate::exec::RunSummary;
use crate::plan::Plan;
use crate::storage::{Prefixed, Storage};

/// How the workers come to be.
#[derive(Debug, Clone)]
pub enum Launch {
    /// One worker thread in this process runs every subtask.
    InProcess { state_dir: PathBuf },
    /// A `weir worker` child process per subtask index.
    Processes { exe: PathBuf, state_dir: PathBuf },
    /// Started by someone else (pods): wait for `parallelism` workers to connect.
    External,
}

#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// `metadata.name` and `metadata.namespace` of the job.
    pub name: String,
    pub namespace: String,
    pub run_id: String,
    /// Names the job in the checkpoint storage; default: the run id (a new job).
    pub job_id: Option<String>,
    /// Where the workers connect (`127.0.0.1:0` picks a port).
    pub control_addr: String,
    pub launch: Launch,
    pub keep_state: bool,
    /// Set to stop the job: the workers stop their sources and flush.
    pub stop: Arc<AtomicBool>,
    /// Start from the last completed checkpoint of this job in the storage.
    pub resume: bool,
    /// With `resume`: when a checkpoint's metadata cannot be used, resume from the newest one
    /// that can (or from the beginning) instead of refusing to start.
    pub resume_from_older: bool,
    /// Drop the state of operators the pipeline no longer has when restoring (as
    /// `spec.restore.allowNonRestoredState`).
    pub allow_non_restored_state: bool,
    /// Where checkpoints go, instead of `spec.checkpointing.storage`.
    pub storage: Option<StorageUri>,
    /// Start from this savepoint or checkpoint (its directory or its `_metadata`), instead of
    /// `spec.restore.path`; `resume` wins when it finds a checkpoint.
    pub from: Option<StorageUri>,
    /// The job's secret, which every worker must prove (and which this coordinator gives the
    /// workers it starts).
    pub secret: JobSecret,
}

/// One worker runs every subtask in this process; otherwise one per subtask index.
fn workers_expected(opts: &CoordinatorOptions, plan: &Plan) -> u32 {
    match opts.launch {
        Launch::InProcess { .. } => 1,
        _ => plan.parallelism,
    }
}

/// The control listener, bound before anything else so that its address can be given out.
#[derive(Debug)]
pub struct Coordinator {
    listener: TcpListener,
    opts: CoordinatorOptions,
    spec: StreamJobSpec,
    plan: Plan,
    pub status: Arc<Status>,
}

/// What the connections tell the coordinator.
enum Event {
    /// A worker said hello for `slot`.
    Joined { slot: usize, conn: u64, writer: Arc<Writer>, data_addr: String },
    /// A message from connection `conn`; `Ok(None)` when it closed.
    Msg { conn: u64, msg: Result<Option<ToCoordinator>, String> },
}

/// A connected worker.
struct Slot {
    conn: u64,
    writer: Arc<Writer>,
    data_addr: String,
}

/// How an attempt ended.
enum AttemptEnd {
    Finished,
    /// Stopped before the job started (or while it was restarting): nothing to flush.
    StoppedIdle,
    Failed(RuntimeError),
    /// A worker failed (retryably) or was lost before every worker ran the attempt (had
    /// its exchange connected and its state restored): a failure of the restart, not a new
    /// one of the job.
    FailedStarting(RuntimeError),
    /// Told to stop, the workers did not end in time: they were cancelled, and the job
    /// ends with this error (it is not restarted).
    Abandoned(RuntimeError),
}

/// What a worker last reported of its subtasks: records in and out and dropped per
/// operator (in plan order), and the bytes of their state.
#[derive(Debug, Clone, Default)]
struct Progress {
    records: Vec<(u64, u64)>,
    state_bytes: u64,
    dropped: Vec<u64>,
    late: Vec<u64>,
    /// (subtask, bytes of its keyed state).
    subtask_state_bytes: Vec<(u32, u64)>,
    /// (operator index, subtask, the watermark it has taken in).
    watermarks: Vec<(u32, u32, i64)>,
    /// (operator index, a metric its code registered).
    user_metrics: Vec<(u32, crate::operator::metrics::UserMetric)>,
    /// (operator index, subtask, what a connector tells).
    connectors: Vec<(u32, u32, crate::connectors::stats::ConnectorStats)>,
}

/// The metrics of operator `k` that the workers reported, by name and subtask. What a worker
/// says is checked as anything that comes over a socket: a name that is not a metric's, a
/// subtask not of the job, more than a subtask may register, are left out.
fn user_metrics_of(
    progress: &[Progress],
    k: usize,
    parallelism: u32,
) -> Vec<crate::operator::metrics::UserMetric> {
    use crate::operator::metrics::{MAX_METRICS, valid_name};
    let mut out: Vec<crate::operator::metrics::UserMetric> = progress
        .iter()
        .flat_map(|p| &p.user_metrics)
        .filter(|(op, m)| *op as usize == k && m.subtask < parallelism && valid_name(&m.name))
        .map(|(_, m)| m.clone())
        .collect();
    out.sort_by(|a, b| (a.subtask, &a.name).cmp(&(b.subtask, &b.name)));
    out.dedup_by(|a, b| (a.subtask, &a.name) == (b.subtask, &b.name));
    let mut per_subtask = std::collections::HashMap::new();
    out.retain(|m| {
        let n = per_subtask.entry(m.subtask).or_insert(0usize);
        *n += 1;
        *n <= MAX_METRICS
    });
    out
}

/// A checkpoint in flight.
struct Pending {
    id: u64,
    triggered: Instant,
    triggered_at: u64,
    acks: BTreeMap<(String, u32), TaskAck>,
    /// It is a savepoint.
    savepoint: Option<PendingSavepoint>,
}

/// A savepoint in flight: its request and where it goes.
struct PendingSavepoint {
    request: String,
    target: SavepointTarget,
}

impl Coordinator {
    pub fn bind(
        spec: StreamJobSpec,
        plan: Plan,
        opts: CoordinatorOptions,
    ) -> Result<Self, RuntimeError> {
        let listener = TcpListener::bind(&opts.control_addr).map_err(|e| {
            RuntimeError::user(format!("--control-addr {}: cannot listen: {e}", opts.control_addr))
        })?;
        let status =
            Arc::new(Status::new(&opts.name, &opts.run_id, &plan, workers_expected(&opts, &plan)));
        Ok(Self { listener, opts, spec, plan, status })
    }

    pub fn control_addr(&self) -> std::net::SocketAddr {
        self.listener.local_addr().expect("a bound listener")
    }

    /// Launches the workers (if it is its job), runs the job's attempts and waits until it
    /// ends. `ready` runs once the job is ready to start: its checkpoint found and checked.
    pub fn run(self, ready: impl FnOnce()) -> Result<RunSummary, RuntimeError> {
        let fail = |e: RuntimeError| {
            self.status.update(|i| {
                i.state = JobState::Failed;
                i.error = Some(e.message.clone());
            });
            e
        };
        let mut driver = Driver::new(&self).map_err(fail)?;
        ready();
        let result = driver.drive();
        // Stopped (Ctrl-C, SIGTERM) without a savepoint: `onCancel: delete` takes the run's
        // checkpoints with it.
        if result.is_ok()
            && self.opts.stop.load(Ordering::Relaxed)
            && driver.stopped_into.is_none()
            && self.spec.checkpointing.on_cancel == weir_crds::streamjob::OnCancel::Delete
        {
            driver.delete_checkpoints();
        }
        self.status.fail_savepoints("the job ended before the savepoint was taken", true);
        // Workers that hang on (or never connected) go with the job.
        for slot in driver.slots.iter().flatten() {
            let _ = slot.writer.send(&ToWorker::Exit);
        }
        let grace = Instant::now() + Duration::from_secs(if result.is_ok() { 30 } else { 5 });
        for c in driver.children.iter_mut().flatten() {
            while Instant::now() < grace && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for s in driver.slots.iter().flatten() {
            s.writer.shutdown();
        }
        if let Some(t) = driver.in_process.take() {
            let _ = t.join();
        }
        result.map_err(fail)
    }
}

/// How a job's checkpoints are taken and where they go.
struct Checkpointing {
    settings: Settings,
    /// The storage's root, as the spec (or `--storage`) names it.
    uri: StorageUri,
    /// The job's directory below the root.
    dir: String,
    /// The storage seen from that directory.
    job: Arc<dyn Storage>,
    /// The storage's root.
    root: Arc<dyn Storage>,
}

/// What an attempt starts from.
enum Start {
    /// The beginning: there is nothing to restore.
    Fresh,
    /// A checkpoint or a savepoint; `uri` is the directory its files are in when it is not
    /// one of this job's own checkpoints.
    Restore { from: Metadata, uri: Option<StorageUri> },
    /// The savepoint that stopped the job (the job failed before every worker ended, and so
    /// perhaps before every sink committed): restore it, which commits what it holds, and
    /// end at once.
    CommitAndEnd { from: Metadata, uri: StorageUri },
}

impl Start {
    /// The checkpoint or savepoint it restores.
    fn metadata(&self) -> Option<&Metadata> {
        match self {
            Start::Fresh => None,
            Start::Restore { from, .. } | Start::CommitAndEnd { from, .. } => Some(from),
        }
    }

    /// Where the files of what it restores are, when not in the job's own directory.
    fn uri(&self) -> Option<&StorageUri> {
        match self {
            Start::Fresh => None,
            Start::Restore { uri, .. } => uri.as_ref(),
            Start::CommitAndEnd { uri, .. } => Some(uri),
        }
    }

    fn ends_at_once(&self) -> bool {
        matches!(self, Start::CommitAndEnd { .. })
    }
}

/// The coordinator's state while the job runs.
struct Driver<'a> {
    c: &'a Coordinator,
    connect_to: String,
    expected: usize,
    events: Receiver<Event>,
    slots: Vec<Option<Slot>>,
    /// Slots of connections, by connection.
    conns: HashMap<u64, usize>,
    children: Vec<Option<Child>>,
    in_process: Option<std::thread::JoinHandle<Result<(), RuntimeError>>>,
    /// `None`: the job takes no checkpoints.
    ck: Option<Checkpointing>,
    job_id: String,
    /// Completed checkpoints of this job id, oldest first.
    completed: VecDeque<Metadata>,
    /// What the next attempt starts from.
    start: Start,
    /// Where savepoints go unless a request says otherwise.
    savepoint_root: Option<StorageUri>,
    /// The savepoint that stopped the job, once complete: a failure before the job ended
    /// restarts from it.
    stopped_into: Option<(Metadata, StorageUri)>,
    /// The last checkpoint id used.
    last_id: u64,
    restarts: Restarts,
    attempt: u32,
    /// Subtasks of all tasks: acknowledgements a checkpoint needs.
    acks_needed: usize,
    started_once: bool,
    /// Connections that reported the end of the current attempt.
    ended: std::collections::HashSet<u64>,
    /// Restarts in a row that failed while starting and were not counted.
    uncounted: u32,
}

impl<'a> Driver<'a> {
    fn new(c: &'a Coordinator) -> Result<Self, RuntimeError> {
        let addr = c.control_addr();
        let connect_to = if addr.ip().is_unspecified() {
            format!("127.0.0.1:{}", addr.port())
        } else {
            addr.to_string()
        };
        let expected = workers_expected(&c.opts, &c.plan) as usize;
        let spec_ck = &c.spec.checkpointing;
        let settings = Settings::from_spec(spec_ck);
        let from =
            c.opts.from.clone().or_else(|| c.spec.restore.as_ref().and_then(|r| r.path.clone()));
        let checkpoints_on = !settings.interval.is_zero() || c.opts.resume || from.is_some();
        let mut restore_uri = None;
        let mut job_id = c.opts.job_id.clone().unwrap_or_else(|| c.opts.run_id.clone());
        let mut ck = None;
        let mut completed = VecDeque::new();
        let mut restore_from = None;
        let mut last_id = 0;
        if checkpoints_on {
            let uri = c
                .opts
                .storage
                .clone()
                .or_else(|| spec_ck.storage.clone())
                .unwrap_or_else(checkpoint::default_storage);
            let s3 = match &uri {
                StorageUri::S3 { .. } => Some(crate::objstore::S3Client::new(c.spec.s3.as_ref())?),
                StorageUri::Local(_) => None,
            };
            let root: Arc<dyn Storage> = Arc::from(crate::storage::open(&uri, s3.as_ref())?);
            if c.opts.resume {
                let found = checkpoint::completed(
                    root.as_ref(),
                    &c.opts.namespace,
                    &c.opts.name,
                    c.opts.secret.for_metadata(),
                )?;
                let mut all = found.completed;
                let mut unusable = found.unusable;
                // An explicit job id resumes that job only: a job started anew from a savepoint
                // (or empty) under a new id must not pick up an older run's checkpoints.
                if let Some(id) = &c.opts.job_id {
                    all.retain(|m| &m.job_id == id);
                    let dir =
                        format!("{}/", checkpoint::job_dir(&c.opts.namespace, &c.opts.name, id));
                    unusable.retain(|(key, _)| key.starts_with(&dir));
                }
                // A checkpoint that cannot be read is never passed over on its own: resuming
                // from an older one, or from the beginning, would write committed output again.
                if let Some((_, why)) = unusable.first() {
                    let instead = match all.last() {
                        Some(m) => format!("from {} of job id {}", m.describe(), m.job_id),
                        None => "from the beginning".into(),
                    };
                    if !(c.opts.resume_from_older
                        || c.spec.restore.as_ref().is_some_and(|r| r.resume_from_older))
                    {
                        return Err(RuntimeError::user(format!(
                            "--resume: {}{}; Weir does not fall back on its own, since that would repeat committed output: restore the file, or pass --resume-from-older (spec.restore.resumeFromOlder) to resume {instead}",
                            why.message,
                            if unusable.len() > 1 {
                                format!(" (and {} more unusable checkpoints)", unusable.len() - 1)
                            } else {
                                String::new()
                            }
                        )));
                    }
                    for (_, why) in &unusable {
                        eprintln!("weir: --resume-from-older: passing over {}", why.message);
                    }
                    eprintln!("weir: --resume-from-older: resuming {instead}");
                }
                match all.last() {
                    Some(last) => {
                        job_id = last.job_id.clone();
                        restore_from = Some(last.clone());
                        completed = all.iter().filter(|m| m.job_id == job_id).cloned().collect();
                        eprintln!(
                            "weir: resuming job {} from checkpoint {} ({})",
                            c.opts.name,
                            last.id,
                            root.describe(&format!(
                                "{}/{}/{}",
                                checkpoint::job_dir(&c.opts.namespace, &c.opts.name, &job_id),
                                Metadata::dir(last.id),
                                checkpoint::METADATA
                            ))
                        );
                    }
                    None => eprintln!(
                        "weir: --resume: no completed checkpoint of job {} in {}: starting from the beginning",
                        c.opts.name,
                        root.describe(&format!("{}/{}", c.opts.namespace, c.opts.name))
                    ),
                }
            }
            if let (None, Some(from)) = (&restore_from, &from) {
                let (parent, name) = checkpoint::split_snapshot_path(from)?;
                let s3 = match &parent {
                    StorageUri::S3 { .. } => {
                        Some(crate::objstore::S3Client::new(c.spec.s3.as_ref())?)
                    }
                    StorageUri::Local(_) => None,
                };
                let there = crate::storage::open(&parent, s3.as_ref())?;
                let key = format!("{name}/{}", checkpoint::METADATA);
                let bytes = there.get(&key)?.ok_or_else(|| {
                    RuntimeError::user(format!(
                        "{} does not exist: {from} is not a completed checkpoint or savepoint",
                        there.describe(&key)
                    ))
                })?;
                // Another job's snapshot, or this one's: its seal is checked, not its MAC.
                let m = Metadata::parse(&bytes, &there.describe(&key), None)?;
                eprintln!(
                    "weir: starting job {} from {} ({} of job id {}, parallelism {})",
                    c.opts.name,
                    there.describe(&key),
                    m.describe(),
                    m.job_id,
                    m.parallelism
                );
                // A savepoint names its files below its own directory, a checkpoint below
                // its job's.
                restore_uri = Some(if m.savepoint { parent.join(&name) } else { parent });
                restore_from = Some(m);
            }
            let dir = checkpoint::job_dir(&c.opts.namespace, &c.opts.name, &job_id);
            let job: Arc<dyn Storage> = Arc::new(Prefixed::new(root.clone(), &dir));
            last_id = checkpoint::highest_id(job.as_ref())?;
            if let Some(m) = &restore_from {
                check_restore(
                    m,
                    &c.plan,
                    c.opts.allow_non_restored_state
                        || c.spec.restore.as_ref().is_some_and(|r| r.allow_non_restored_state),
                )?;
                if m.final_ && c.opts.resume && restore_uri.is_none() {
                    eprintln!(
                        "weir: --resume: {} is the job's final checkpoint: the job had finished (its sources were exhausted or it was stopped), so it ends again at once; start it without --resume to run it anew",
                        m.describe()
                    );
                }
                if m.parallelism != c.plan.parallelism {
                    eprintln!(
                        "weir: restoring state taken at parallelism {} at parallelism {}: key groups and splits are redistributed",
                        m.parallelism, c.plan.parallelism
                    );
                }
            }
            ck = Some(Checkpointing { settings: settings.clone(), uri, dir, job, root });
        }
        c.status
            .checkpointing
            .store(ck.is_some() && !settings.interval.is_zero(), Ordering::Relaxed);
        c.status.savepoints_allowed.store(ck.is_some(), Ordering::Relaxed);
        let savepoint_root = ck.as_ref().map(|ck| {
            c.spec
                .savepoints
                .directory
                .clone()
                .unwrap_or_else(|| checkpoint::default_savepoint_dir(&ck.uri))
        });
        let (tx, rx) = unbounded();
        spawn_acceptor(&c.listener, tx, expected, c.plan.parallelism, c.opts.secret.clone())?;
        let (_, heads) = crate::exec::tasks(&c.plan);
        c.status.update(|i| i.job_id = job_id.clone());
        let mut d = Driver {
            c,
            connect_to,
            expected,
            events: rx,
            slots: (0..expected).map(|_| None).collect(),
            conns: HashMap::new(),
            children: (0..expected).map(|_| None).collect(),
            in_process: None,
            ck,
            job_id,
            completed,
            start: match restore_from {
                None => Start::Fresh,
                Some(from) => Start::Restore { from, uri: restore_uri },
            },
            savepoint_root,
            stopped_into: None,
            last_id,
            restarts: Restarts::new(&c.spec.restart_strategy),
            attempt: 0,
            acks_needed: heads.len() * c.plan.parallelism as usize,
            started_once: false,
            ended: Default::default(),
            uncounted: 0,
        };
        d.launch()?;
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::metrics::{MAX_METRICS, UserMetric};
    use weir_crds::api::MetricKind;

    fn metric(name: &str, subtask: u32, value: i64) -> UserMetric {
        UserMetric { name: name.into(), kind: MetricKind::Counter, subtask, value }
    }

    /// What a worker reports is untrusted: the coordinator shows only well-named metrics of
    /// subtasks that exist, once each, and at most its limit per subtask.
    #[test]
    fn user_metrics_from_the_workers_are_checked_before_they_are_shown() {
        let mut flood: Vec<(u32, UserMetric)> =
            (0..MAX_METRICS as i64 + 10).map(|i| (0, metric(&format!("m{i}"), 1, i))).collect();
        flood.extend([
            (0, metric("alerts", 0, 3)),
            (0, metric("alerts", 0, 99)), // twice: the first one counts
            (0, metric("Bad-Name", 0, 1)),
            (0, metric("weir_x{a=\"b\"}", 0, 1)),
            (0, metric("", 0, 1)),
            (0, metric("beyond", 2, 1)), // subtask 2 of 2 does not exist
            (1, metric("other_operator", 0, 1)),
        ]);
        let progress =
            vec![Progress { user_metrics: flood, ..Default::default() }, Progress::default()];
        let shown = user_metrics_of(&progress, 0, 2);
        let of = |s: u32| shown.iter().filter(|m| m.subtask == s).count();
        assert_eq!(of(1), MAX_METRICS, "subtask 1 is capped");
        assert_eq!(of(0), 1, "{shown:?}");
        let alerts = shown.iter().find(|m| m.subtask == 0).unwrap();
        assert_eq!((alerts.name.as_str(), alerts.value), ("alerts", 3));
        assert!(shown.iter().all(|m| m.subtask < 2));
        let other = user_metrics_of(&progress, 1, 2);
        assert_eq!(other.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["other_operator"]);
    }
}
