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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};
use weir_crds::api::{
    CheckpointInfo, CheckpointStatus, Checkpoints, JobInfo, JobState, OperatorInfo, SavepointInfo,
    SavepointStatus,
};
use weir_crds::{StorageUri, StreamJobSpec};

use crate::auth::{self, JobSecret};
use crate::checkpoint::{self, Metadata, Restarts, Settings, TaskAck};
use crate::control::{
    self, AssignedCheckpoints, Assignment, PROTOCOL, Reader, SavepointTarget, ToCoordinator,
    ToWorker, Writer,
};
use crate::error::{RuntimeError, Whose};
use crate::exec::{FINAL, RunSummary};
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

/// The job as the coordinator sees it; read by the HTTP API and the progress display.
#[derive(Debug)]
pub struct Status {
    pub info: Mutex<JobInfo>,
    pub started: Instant,
    pub checkpoints: Mutex<Checkpoints>,
    /// Set by `POST /v1/checkpoints`: take a checkpoint as soon as the settings allow.
    pub trigger: AtomicBool,
    /// Whether the job takes checkpoints (`POST /v1/checkpoints` is refused otherwise).
    pub checkpointing: AtomicBool,
    /// Whether the job can take savepoints (it has checkpoint storage).
    pub savepoints_allowed: AtomicBool,
    /// Savepoints requested and not triggered yet, oldest first.
    savepoint_requests: Mutex<VecDeque<SavepointRequested>>,
    /// The savepoints of this run, newest first.
    savepoints: Mutex<Vec<SavepointInfo>>,
    savepoint_counter: std::sync::atomic::AtomicU64,
    /// The result of the savepoint that stopped the job (completed) was read through the API.
    stop_result_read: AtomicBool,
}

/// A savepoint request waiting for its trigger.
#[derive(Debug, Clone)]
struct SavepointRequested {
    id: String,
    stop: bool,
    directory: Option<StorageUri>,
}

/// Why a savepoint cannot be requested now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SavepointRefused {
    /// The request is wrong (400).
    BadRequest(String),
    /// Not now (409).
    Conflict(String),
}

impl Status {
    pub fn new(name: &str, run_id: &str, plan: &Plan, workers_expected: u32) -> Self {
        Self {
            info: Mutex::new(JobInfo {
                name: name.to_string(),
                run_id: run_id.to_string(),
                job_id: String::new(),
                state: JobState::Starting,
                parallelism: plan.parallelism,
                max_parallelism: plan.max_parallelism,
                workers_connected: 0,
                workers_expected,
                uptime_seconds: 0.0,
                started_at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                state_bytes: 0,
                subtask_state_bytes: Vec::new(),
                operators: plan
                    .ops
                    .iter()
                    .map(|o| OperatorInfo {
                        records_dropped: 0,
                        metrics: Vec::new(),
                        uid: o.uid.clone(),
                        type_: o.type_name.clone(),
                        records_in: 0,
                        records_out: 0,
                    })
                    .collect(),
                restarts: 0,
                last_checkpoint: None,
                last_savepoint: None,
                error: None,
            }),
            started: Instant::now(),
            checkpoints: Mutex::default(),
            trigger: AtomicBool::new(false),
            checkpointing: AtomicBool::new(false),
            savepoints_allowed: AtomicBool::new(false),
            savepoint_requests: Mutex::default(),
            savepoints: Mutex::default(),
            savepoint_counter: Default::default(),
            stop_result_read: AtomicBool::new(false),
        }
    }

    /// Asks for a savepoint (`POST /v1/savepoints`); returns its id. It is taken as soon as
    /// the job runs and no other savepoint is in flight.
    pub fn request_savepoint(
        &self,
        stop: bool,
        directory: Option<&str>,
        request_id: Option<&str>,
    ) -> Result<String, SavepointRefused> {
        let request_id = request_id.map(str::trim).filter(|r| !r.is_empty());
        if let Some(key) = request_id {
            let all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = all.iter().find(|s| {
                s.request_id.as_deref() == Some(key) && s.status != SavepointStatus::Failed
            }) {
                return Ok(s.id.clone());
            }
        }
        let directory = match directory.map(str::trim).filter(|d| !d.is_empty()) {
            Some(d) => Some(d.parse::<StorageUri>().map_err(|e| {
                SavepointRefused::BadRequest(format!(
                    "directory {d:?}: {e}: give s3://bucket/prefix or an absolute directory"
                ))
            })?),
            None => None,
        };
        if !self.savepoints_allowed.load(Ordering::Relaxed) {
            return Err(SavepointRefused::Conflict(
                "this job takes no checkpoints, and savepoints need them: set spec.checkpointing.interval above 0s".into(),
            ));
        }
        let state = self.snapshot().state;
        if state != JobState::Running {
            return Err(SavepointRefused::Conflict(format!(
                "the job is {state:?}, not running: a savepoint needs a running job"
            )));
        }
        let mut queue = self.savepoint_requests.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = all.iter().find(|s| s.stop && s.status == SavepointStatus::InProgress) {
            return Err(SavepointRefused::Conflict(format!(
                "savepoint {} is already stopping the job",
                s.id
            )));
        }
        let n = self.savepoint_counter.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:011x}{:03x}", checkpoint::now_ms(), n & 0xfff);
        queue.push_back(SavepointRequested { id: id.clone(), stop, directory });
        all.insert(
            0,
            SavepointInfo {
                id: id.clone(),
                status: SavepointStatus::InProgress,
                stop,
                checkpoint_id: None,
                requested_at: checkpoint::now_ms(),
                duration_ms: 0,
                size_bytes: 0,
                path: None,
                failure: None,
                request_id: request_id.map(str::to_string),
            },
        );
        all.truncate(100);
        Ok(id)
    }

    /// Savepoint `id` of this run, now.
    pub fn savepoint(&self, id: &str) -> Option<SavepointInfo> {
        let all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().find(|s| s.id == id).cloned().map(with_duration)
    }

    /// Savepoint `id` as a client asks for it: reading that a savepoint stopped the job lets
    /// the coordinator exit. Reading that one failed does not: the job goes on, and a later
    /// stop's result must still be read.
    pub fn read_savepoint(&self, id: &str) -> Option<SavepointInfo> {
        let sp = self.savepoint(id)?;
        if sp.stop && sp.status == SavepointStatus::Completed {
            self.stop_result_read.store(true, Ordering::Relaxed);
        }
        Some(sp)
    }

    /// The savepoint that stopped the job, while nobody has read its result through the API.
    pub fn unread_stop_savepoint(&self) -> Option<String> {
        if self.stop_result_read.load(Ordering::Relaxed) {
            return None;
        }
        let all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().find(|s| s.stop && s.status == SavepointStatus::Completed).map(|s| s.id.clone())
    }

    /// The savepoints of this run, newest first.
    pub fn savepoints(&self) -> Vec<SavepointInfo> {
        let all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().cloned().map(with_duration).collect()
    }

    /// Changes savepoint `id`'s record.
    fn update_savepoint(&self, id: &str, f: impl FnOnce(&mut SavepointInfo)) {
        let mut all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = all.iter_mut().find(|s| s.id == id) {
            f(s);
            if s.status != SavepointStatus::InProgress {
                s.duration_ms = checkpoint::now_ms().saturating_sub(s.requested_at);
            }
            if s.status == SavepointStatus::Completed {
                let done = s.clone();
                drop(all);
                self.update(|i| i.last_savepoint = Some(done));
            }
        }
    }

    /// The next savepoint request, if any.
    fn next_savepoint_request(&self) -> Option<SavepointRequested> {
        self.savepoint_requests.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }

    /// Fails the savepoint requests that have waited for their trigger longer than
    /// `timeout` (`spec.savepoints.timeout`): a savepoint completes or fails within it.
    fn expire_savepoint_requests(&self, timeout: Duration) {
        let now = checkpoint::now_ms();
        let limit = timeout.as_millis() as u64;
        let mut q = self.savepoint_requests.lock().unwrap_or_else(|e| e.into_inner());
        if q.is_empty() {
            return;
        }
        let mut all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|r| {
            let Some(s) = all.iter_mut().find(|s| s.id == r.id) else { return false };
            if now.saturating_sub(s.requested_at) <= limit {
                return true;
            }
            s.status = SavepointStatus::Failed;
            s.failure = Some(format!(
                "it was not taken within spec.savepoints.timeout ({} s): the job was not running with every subtask able to take it (restarting, or another savepoint in flight)",
                timeout.as_secs()
            ));
            s.duration_ms = now.saturating_sub(s.requested_at);
            false
        });
    }

    /// Fails every savepoint in progress (queued ones too when `queued`).
    fn fail_savepoints(&self, why: &str, queued: bool) {
        let waiting: Vec<String> = if queued {
            let mut q = self.savepoint_requests.lock().unwrap_or_else(|e| e.into_inner());
            q.drain(..).map(|r| r.id).collect()
        } else {
            Vec::new()
        };
        let mut all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
        for s in all.iter_mut().filter(|s| s.status == SavepointStatus::InProgress) {
            if s.checkpoint_id.is_some() || waiting.contains(&s.id) {
                s.status = SavepointStatus::Failed;
                s.failure = Some(why.to_string());
                s.duration_ms = checkpoint::now_ms().saturating_sub(s.requested_at);
            }
        }
    }

    /// A copy of the job's state, now.
    pub fn snapshot(&self) -> JobInfo {
        let mut i = self.info.lock().unwrap_or_else(|e| e.into_inner()).clone();
        i.uptime_seconds = self.started.elapsed().as_secs_f64();
        i
    }

    /// A copy of the checkpoint statistics, now.
    pub fn checkpoints(&self) -> Checkpoints {
        self.checkpoints.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut JobInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Records what happened to a checkpoint (newest first in the history).
    fn record(&self, c: CheckpointInfo) {
        let mut s = self.checkpoints.lock().unwrap_or_else(|e| e.into_inner());
        match c.status {
            CheckpointStatus::Completed => s.completed += 1,
            CheckpointStatus::Failed => s.failed += 1,
            CheckpointStatus::InProgress => {}
        }
        s.history.retain(|h| h.id != c.id || c.final_ != h.final_);
        s.history.insert(0, c.clone());
        s.history.truncate(20);
        s.in_progress =
            s.history.iter().filter(|h| h.status == CheckpointStatus::InProgress).count() as u32;
        drop(s);
        if c.status == CheckpointStatus::Completed {
            self.update(|i| i.last_checkpoint = Some(c));
        }
    }
}

/// A savepoint with its duration so far while it is in progress.
fn with_duration(mut s: SavepointInfo) -> SavepointInfo {
    if s.status == SavepointStatus::InProgress {
        s.duration_ms = checkpoint::now_ms().saturating_sub(s.requested_at);
    }
    s
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
    /// (subtask, bytes of its keyed state).
    subtask_state_bytes: Vec<(u32, u64)>,
    /// (operator index, a metric its code registered).
    user_metrics: Vec<(u32, crate::operator::metrics::UserMetric)>,
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
    /// The checkpoint the next attempt starts from.
    restore_from: Option<Metadata>,
    /// The directory `restore_from` refers to its files in, when it is another job's (or a
    /// savepoint).
    restore_uri: Option<StorageUri>,
    /// Where savepoints go unless a request says otherwise.
    savepoint_root: Option<StorageUri>,
    /// The savepoint that stopped the job, once complete: a failure before the job ended
    /// restarts from it.
    stopped_into: Option<(Metadata, StorageUri)>,
    /// The next attempt restores the savepoint that stopped the job and ends at once.
    stop_at_start: bool,
    /// The last checkpoint id used.
    last_id: u64,
    restarts: Restarts,
    attempt: u32,
    /// Subtasks of all tasks: acknowledgements a checkpoint needs.
    acks_needed: usize,
    started_once: bool,
    /// Connections that reported the end of the current attempt.
    ended: std::collections::HashSet<u64>,
    /// The last attempt failed (retryably) before every worker ran it: a failure of the
    /// restart, not a new one of the job.
    failed_while_starting: bool,
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
            restore_from,
            restore_uri,
            savepoint_root,
            stopped_into: None,
            stop_at_start: false,
            last_id,
            restarts: Restarts::new(&c.spec.restart_strategy),
            attempt: 0,
            acks_needed: heads.len() * c.plan.parallelism as usize,
            started_once: false,
            ended: Default::default(),
            failed_while_starting: false,
            uncounted: 0,
        };
        d.launch()?;
        Ok(d)
    }

    /// Starts the workers that are this coordinator's to start and are not running.
    fn launch(&mut self) -> Result<(), RuntimeError> {
        match &self.c.opts.launch {
            Launch::InProcess { state_dir } => {
                if self.in_process.as_ref().is_some_and(|t| !t.is_finished()) {
                    return Ok(());
                }
                let wopts = crate::worker::WorkerOptions {
                    coordinator: self.connect_to.clone(),
                    index: None,
                    state_dir: state_dir.clone(),
                    data_bind: "127.0.0.1:0".into(),
                    advertise_host: None,
                    stop: Arc::default(),
                    connect_timeout: crate::worker::CONNECT_TIMEOUT,
                    secret: self.c.opts.secret.clone(),
                };
                self.in_process = Some(
                    std::thread::Builder::new()
                        .name("worker".into())
                        .spawn(move || crate::worker::run(&wopts))
                        .map_err(|e| RuntimeError::internal(format!("starting a thread: {e}")))?,
                );
            }
            Launch::Processes { exe, state_dir } => {
                for i in 0..self.expected {
                    if self.slots[i].is_some() {
                        continue;
                    }
                    if let Some(c) = &mut self.children[i]
                        && matches!(c.try_wait(), Ok(None))
                    {
                        continue; // still starting
                    }
                    let child = std::process::Command::new(exe)
                        .args(["worker", "--coordinator", &self.connect_to])
                        .args(["--index", &i.to_string()])
                        .arg("--state-dir")
                        .arg(state_dir)
                        .args(["--data-addr", "127.0.0.1:0"])
                        .env("WEIR_DIE_WITH_PARENT", "1")
                        .env(auth::ENV, self.c.opts.secret.text())
                        .stdin(std::process::Stdio::null())
                        .spawn()
                        .map_err(|e| {
                            RuntimeError::internal(format!("starting {}: {e}", exe.display()))
                        })?;
                    self.children[i] = Some(child);
                }
            }
            Launch::External => {}
        }
        Ok(())
    }

    fn connected(&self) -> u32 {
        self.slots.iter().filter(|s| s.is_some()).count() as u32
    }

    fn stop_requested(&self) -> bool {
        self.c.opts.stop.load(Ordering::Relaxed)
    }

    fn drive(&mut self) -> Result<RunSummary, RuntimeError> {
        loop {
            match self.wait_for_workers()? {
                AttemptEnd::StoppedIdle => {
                    self.c.status.update(|i| i.state = JobState::Finished);
                    return Ok(self.summary());
                }
                AttemptEnd::Failed(e) | AttemptEnd::Abandoned(e) => return Err(e),
                AttemptEnd::Finished => {}
            }
            let end = self.run_attempt();
            match end {
                AttemptEnd::Abandoned(e) => {
                    eprintln!("weir: coordinator: {}", e.message);
                    self.cancel_attempt();
                    self.c.status.fail_savepoints(&e.message, false);
                    return Err(e);
                }
                AttemptEnd::Finished | AttemptEnd::StoppedIdle => {
                    self.c.status.update(|i| {
                        i.state = JobState::Finished;
                        i.state_bytes = 0;
                        i.subtask_state_bytes.clear();
                    });
                    return Ok(self.summary());
                }
                AttemptEnd::Failed(e) => {
                    self.cancel_attempt();
                    self.c.status.fail_savepoints(
                        &format!("the job failed before the savepoint completed: {}", e.message),
                        false,
                    );
                    let restart = if e.whose == Whose::User {
                        Err("the error is in the job's spec or input, so a restart would fail the same way".to_string())
                    } else if e.whose == Whose::Damaged {
                        Err("the stored state it restores is damaged, and a restart would read the same bytes: restore the job from a savepoint or an older checkpoint (--from-savepoint, spec.restore.path)".to_string())
                    } else if self.failed_while_starting
                        && self.uncounted < MAX_UNCOUNTED
                        && self.restarts.restarts_at_all()
                    {
                        // A worker lost while the job was restarting: the same restart, again.
                        self.uncounted += 1;
                        Ok(self.restarts.again())
                    } else {
                        self.uncounted = 0;
                        self.restarts.on_failure(Instant::now())
                    };
                    let delay = match restart {
                        Ok(d) => d,
                        Err(why) => {
                            return Err(RuntimeError {
                                message: format!("{} (not restarted: {why})", e.message),
                                ..e
                            });
                        }
                    };
                    self.attempt += 1;
                    // (Kept: should that attempt fail too, the next one restores it again.)
                    if let Some((m, uri)) = self.stopped_into.clone() {
                        // Stopped into a savepoint, then failed before every worker ended (and
                        // so perhaps before every sink committed): the next attempt restores
                        // it, which commits what it holds, and ends at once.
                        self.restore_from = Some(m);
                        self.restore_uri = Some(uri);
                        self.stop_at_start = true;
                    } else if let Some(own) = self.completed.back() {
                        self.restore_from = Some(own.clone());
                        self.restore_uri = None;
                    }
                    let from = match &self.restore_from {
                        Some(m) if self.stop_at_start => format!(
                            "from {}, which it stopped into, to commit what it holds and end",
                            m.describe()
                        ),
                        Some(m) => format!("from {}", m.describe()),
                        None => "from the beginning (no checkpoint completed yet)".into(),
                    };
                    eprintln!(
                        "weir: coordinator: {}; restarting in {:.1} s {from} (attempt {}{})",
                        e.message,
                        delay.as_secs_f64(),
                        self.attempt,
                        if self.uncounted > 0 {
                            "; it failed while restarting, which is not counted as a new failure"
                        } else {
                            ""
                        }
                    );
                    self.c.status.update(|i| {
                        i.state = JobState::Restarting;
                        i.restarts += 1;
                        i.error = Some(e.message.clone());
                    });
                    let until = Instant::now() + delay;
                    while Instant::now() < until {
                        if self.stop_requested() {
                            self.c.status.update(|i| i.state = JobState::Finished);
                            eprintln!("weir: coordinator: stopped while restarting");
                            return Ok(self.summary());
                        }
                        self.pump(Duration::from_millis(20));
                    }
                }
            }
        }
    }

    fn summary(&self) -> RunSummary {
        let records: BTreeMap<String, (u64, u64)> = self
            .c
            .status
            .snapshot()
            .operators
            .iter()
            .map(|o| (o.uid.clone(), (o.records_in, o.records_out)))
            .collect();
        RunSummary { elapsed: self.c.status.started.elapsed(), records }
    }

    /// Handles connection events between attempts: new workers take their slots, lost ones
    /// leave them.
    fn pump(&mut self, wait: Duration) {
        self.c.status.expire_savepoint_requests(self.c.spec.savepoints.timeout.as_std());
        match self.events.recv_timeout(wait) {
            Ok(Event::Joined { slot, conn, writer, data_addr }) => {
                self.join(slot, conn, writer, data_addr)
            }
            Ok(Event::Msg { conn, msg }) => {
                if !matches!(msg, Ok(Some(_))) {
                    self.lose(conn);
                }
            }
            Err(_) => {}
        }
    }

    fn join(&mut self, slot: usize, conn: u64, writer: Arc<Writer>, data_addr: String) {
        if self.slots[slot].is_some() {
            let why = format!("a second worker with --index {slot}");
            let _ = writer.send(&ToWorker::Refused { reason: why.clone() });
            eprintln!("weir: coordinator: refused a worker: {why}");
            return;
        }
        self.conns.insert(conn, slot);
        self.slots[slot] = Some(Slot { conn, writer, data_addr });
        let n = self.connected();
        self.c.status.update(|i| i.workers_connected = n);
    }

    /// Connection `conn` closed: its slot is free.
    fn lose(&mut self, conn: u64) -> Option<usize> {
        let slot = self.conns.remove(&conn)?;
        if self.slots[slot].as_ref().is_some_and(|s| s.conn == conn) {
            self.slots[slot] = None;
        }
        let n = self.connected();
        self.c.status.update(|i| i.workers_connected = n);
        Some(slot)
    }

    /// Waits until a worker is connected for every slot (starting the ones it launches).
    fn wait_for_workers(&mut self) -> Result<AttemptEnd, RuntimeError> {
        let mut last_log = Instant::now();
        let mut last_launch = Instant::now();
        while (self.connected() as usize) < self.expected {
            if self.stop_requested() {
                for (w, s) in self.slots.iter().enumerate() {
                    if let Some(s) = s {
                        let _ = s.writer.send(&ToWorker::Refused {
                            reason: format!("the job was stopped before it started (worker {w})"),
                        });
                    }
                }
                eprintln!(
                    "weir: coordinator: stopped with {} of {} workers connected",
                    self.connected(),
                    self.expected
                );
                return Ok(AttemptEnd::StoppedIdle);
            }
            for (i, c) in self.children.iter_mut().enumerate() {
                if self.slots[i].is_some() {
                    continue;
                }
                if let Some(child) = c
                    && let Ok(Some(st)) = child.try_wait()
                {
                    if !self.started_once {
                        return Err(RuntimeError::internal(format!(
                            "worker {i} exited ({st}) before the job started"
                        )));
                    }
                    *c = None;
                }
            }
            if self.started_once && last_launch.elapsed() > Duration::from_millis(200) {
                self.launch()?;
                last_launch = Instant::now();
            }
            if last_log.elapsed() > Duration::from_secs(30) {
                eprintln!(
                    "weir: coordinator: {} of {} workers connected, waiting",
                    self.connected(),
                    self.expected
                );
                last_log = Instant::now();
            }
            self.pump(Duration::from_millis(10));
        }
        Ok(AttemptEnd::Finished)
    }

    /// Tells every worker to give up the attempt and waits (a while) until each has said so
    /// or is gone.
    fn cancel_attempt(&mut self) {
        let mut waiting: HashMap<u64, usize> = HashMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(s) = s
                && !self.ended.contains(&s.conn)
            {
                let _ = s.writer.send(&ToWorker::Cancel);
                waiting.insert(s.conn, i);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while !waiting.is_empty() && Instant::now() < deadline {
            match self.events.recv_timeout(Duration::from_millis(50)) {
                Ok(Event::Msg { conn, msg }) => match msg {
                    Ok(Some(ToCoordinator::Failed { .. } | ToCoordinator::Finished { .. })) => {
                        waiting.remove(&conn);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        waiting.remove(&conn);
                        self.lose(conn);
                    }
                },
                Ok(Event::Joined { slot, conn, writer, data_addr }) => {
                    self.join(slot, conn, writer, data_addr)
                }
                Err(_) => {}
            }
        }
        // Workers that did not answer are dropped (and killed, if this coordinator started
        // them): the next attempt starts with fresh ones.
        for (conn, slot) in waiting {
            eprintln!("weir: coordinator: worker {slot} did not end its attempt; dropping it");
            if let Some(s) = &self.slots[slot] {
                s.writer.shutdown();
            }
            self.lose(conn);
            if let Some(c) = &mut self.children[slot] {
                let _ = c.kill();
                let _ = c.wait();
                self.children[slot] = None;
            }
        }
    }

    fn assignment(&self, worker: usize, worker_of: &[u32]) -> Assignment {
        let p = self.c.plan.parallelism;
        let data_addrs: Vec<String> = self
            .slots
            .iter()
            .map(|s| s.as_ref().map(|s| s.data_addr.clone()).unwrap_or_default())
            .collect();
        let checkpoints = self.ck.as_ref().map(|ck| {
            let hosted: Vec<u32> =
                (0..p).filter(|&s| worker_of[s as usize] == worker as u32).collect();
            // At another parallelism every subtask may take state of any old one.
            let restore = self
                .restore_from
                .as_ref()
                .map(|m| {
                    m.operators
                        .iter()
                        .filter(|o| m.parallelism != p || hosted.contains(&o.subtask))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            AssignedCheckpoints {
                settings: ck.settings.clone(),
                storage: ck.uri.clone(),
                job_dir: ck.dir.clone(),
                after_id: self.last_id,
                restore,
                restored_parallelism: self.restore_from.as_ref().map(|m| m.parallelism),
                restore_storage: self.restore_uri.clone(),
                stop_at_start: self.stop_at_start,
            }
        });
        Assignment {
            plan: self.c.plan.clone(),
            run_id: self.c.opts.run_id.clone(),
            worker_of: worker_of.to_vec(),
            data_addrs,
            keep_state: self.c.opts.keep_state,
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            checkpoints,
        }
    }

    /// The checkpoint settings of a job that takes checkpoints.
    fn settings(&self) -> Settings {
        self.ck.as_ref().expect("checkpointing").settings.clone()
    }

    fn send_all(&self, msg: &ToWorker) {
        for s in self.slots.iter().flatten() {
            let _ = s.writer.send(msg);
        }
    }

    /// Runs one attempt of the job until it finishes or fails.
    fn run_attempt(&mut self) -> AttemptEnd {
        let p = self.c.plan.parallelism;
        let worker_of: Vec<u32> = (0..p).map(|s| if self.expected == 1 { 0 } else { s }).collect();
        for w in 0..self.expected {
            let start = ToWorker::Start(Box::new(self.assignment(w, &worker_of)));
            let slot = self.slots[w].as_ref().expect("all connected");
            if let Err(e) = slot.writer.send(&start) {
                return AttemptEnd::Failed(
                    RuntimeError::external(format!("sending the job to worker {w}: {e}"))
                        .retryable(),
                );
            }
        }
        self.started_once = true;
        self.ended.clear();
        self.restarts.started(Instant::now());
        self.c.status.update(|i| {
            i.state = JobState::Running;
            i.error = None;
        });
        let conns: HashMap<u64, usize> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (s.conn, i)))
            .collect();
        let mut progress: Vec<Progress> = vec![Progress::default(); self.expected];
        let mut finished = vec![false; self.expected];
        // Workers that reported progress: their subtasks run (the exchange connected, the
        // state restored). A lost connection before all have is a failure of the restart.
        let mut running = vec![false; self.expected];
        self.failed_while_starting = false;
        let mut stopping = false;
        let mut stopping_since = Instant::now();
        // Told to stop, the workers flush and take their final checkpoint: as long as a
        // checkpoint may take, and no less than half a minute.
        let stop_limit = self.c.spec.checkpointing.timeout.as_std().max(Duration::from_secs(30));
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut final_acks: BTreeMap<(String, u32), TaskAck> = BTreeMap::new();
        let mut final_sent = false;
        // A savepoint that stops the job was triggered: no checkpoint after it.
        let mut stop_savepoint = self.stop_at_start;
        let mut failures_in_a_row: u32 = 0;
        let attempt_start = Instant::now();
        let mut last_trigger: Option<Instant> = None;
        let mut last_done = attempt_start;
        loop {
            if !stopping && self.stop_requested() {
                stopping = true;
                stopping_since = Instant::now();
                self.c.status.update(|i| i.state = JobState::Stopping);
                self.send_all(&ToWorker::Stop);
            }
            self.c.status.expire_savepoint_requests(self.c.spec.savepoints.timeout.as_std());
            if stopping && stopping_since.elapsed() > stop_limit {
                return AttemptEnd::Abandoned(RuntimeError::external(format!(
                    "the job did not stop within {} s of being told to (spec.checkpointing.timeout, at least 30 s): its workers were cancelled; it resumes from its last completed checkpoint",
                    stop_limit.as_secs()
                )));
            }
            // Checkpoints and savepoints: trigger, time out.
            if let Some(settings) = self.ck.as_ref().map(|ck| ck.settings.clone()) {
                // Subtasks that ended take part with their final state: checkpoints go on
                // until every subtask has ended (FLIP-147).
                let open = !stopping && !stop_savepoint && !final_sent;
                // One savepoint at a time, and no checkpoint while it is in flight: nothing
                // can turn its barrier into an unaligned one.
                if open
                    && !pending.iter().any(|p| p.savepoint.is_some())
                    && let Some(req) = self.c.status.next_savepoint_request()
                {
                    let root = req.directory.clone().or_else(|| self.savepoint_root.clone());
                    let dir = root.expect("checkpointing has a savepoint directory").join(
                        &format!("{}/{}/sp-{}", self.c.opts.namespace, self.c.opts.name, req.id),
                    );
                    self.last_id += 1;
                    let id = self.last_id;
                    let target = SavepointTarget { dir: dir.clone(), stop: req.stop };
                    eprintln!(
                        "weir: coordinator: savepoint {} (checkpoint {id}) to {dir}{}",
                        req.id,
                        if req.stop { ", then the job stops" } else { "" }
                    );
                    self.send_all(&ToWorker::Trigger { id, savepoint: Some(target.clone()) });
                    pending.push_back(Pending {
                        id,
                        triggered: Instant::now(),
                        triggered_at: checkpoint::now_ms(),
                        acks: BTreeMap::new(),
                        savepoint: Some(PendingSavepoint { request: req.id.clone(), target }),
                    });
                    self.c.status.update_savepoint(&req.id, |s| s.checkpoint_id = Some(id));
                    if req.stop {
                        stop_savepoint = true;
                        self.c.status.update(|i| i.state = JobState::Stopping);
                    }
                }
                let open = open && !stop_savepoint;
                let requested = self.c.status.trigger.load(Ordering::Relaxed);
                let due = !settings.interval.is_zero()
                    && last_trigger.unwrap_or(attempt_start).elapsed() >= settings.interval
                    && last_done.elapsed() >= settings.min_pause;
                if (due || requested)
                    && open
                    && !pending.iter().any(|p| p.savepoint.is_some())
                    && pending.len() < settings.max_concurrent as usize
                {
                    self.c.status.trigger.store(false, Ordering::Relaxed);
                    self.last_id += 1;
                    let id = self.last_id;
                    let now_ms = checkpoint::now_ms();
                    pending.push_back(Pending {
                        id,
                        triggered: Instant::now(),
                        triggered_at: now_ms,
                        acks: BTreeMap::new(),
                        savepoint: None,
                    });
                    last_trigger = Some(Instant::now());
                    self.send_all(&ToWorker::Trigger { id, savepoint: None });
                    self.c.status.record(self.info(
                        id,
                        CheckpointStatus::InProgress,
                        now_ms,
                        0,
                        &BTreeMap::new(),
                        false,
                        None,
                    ));
                }
                let sp_timeout = self.c.spec.savepoints.timeout.as_std();
                while let Some(pos) = pending.iter().position(|p| {
                    let t = if p.savepoint.is_some() { sp_timeout } else { settings.timeout };
                    p.triggered.elapsed() >= t
                }) {
                    let pd = pending.remove(pos).expect("found");
                    if pd.savepoint.is_some() {
                        let why = format!(
                            "expired after {} (spec.savepoints.timeout) with {} of {} subtasks acknowledged",
                            self.c.spec.savepoints.timeout,
                            pd.acks.len(),
                            self.acks_needed
                        );
                        if let Some(end) = self.savepoint_failed(&pd, &why) {
                            return end;
                        }
                        continue;
                    }
                    let why = format!(
                        "checkpoint {} expired after {} with {} of {} subtasks acknowledged",
                        pd.id,
                        self.c.spec.checkpointing.timeout,
                        pd.acks.len(),
                        self.acks_needed
                    );
                    if let Some(end) =
                        self.checkpoint_failed(&pd, why, &mut failures_in_a_row, &settings)
                    {
                        return end;
                    }
                    last_done = Instant::now();
                }
            }
            let (conn, msg) = match self.events.recv_timeout(Duration::from_millis(20)) {
                Ok(Event::Msg { conn, msg }) => (conn, msg),
                Ok(Event::Joined { slot, conn, writer, data_addr }) => {
                    // A worker for a slot that is taken (the job runs with all slots filled).
                    self.join(slot, conn, writer, data_addr);
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return AttemptEnd::Failed(RuntimeError::internal(
                        "the control listener stopped",
                    ));
                }
            };
            let Some(&w) = conns.get(&conn) else {
                // A connection from before this attempt.
                if !matches!(msg, Ok(Some(_))) {
                    self.lose(conn);
                }
                continue;
            };
            // Only what the coordinator assigned: a forged acknowledgement would complete a
            // checkpoint that holds no state of the subtask it names.
            // What belongs to an attempt that is over (a worker slow to report its end) is
            // not this attempt's.
            if let Ok(Some(
                ToCoordinator::Ack { attempt, .. }
                | ToCoordinator::Decline { attempt, .. }
                | ToCoordinator::Finished { attempt, .. }
                | ToCoordinator::Failed { attempt, .. },
            )) = &msg
                && *attempt != self.attempt
            {
                continue;
            }
            if let Ok(Some(ToCoordinator::Ack { ack, .. })) = &msg
                && let Err(why) = self.check_ack(w, ack)
            {
                return AttemptEnd::Failed(RuntimeError::internal(format!(
                    "worker {w} sent an acknowledgement that does not fit the job, so the attempt is given up: {why}"
                )));
            }
            match msg {
                Ok(Some(ToCoordinator::Progress {
                    records,
                    state_bytes,
                    dropped,
                    subtask_state_bytes,
                    user_metrics,
                })) => {
                    progress[w] = Progress {
                        records,
                        state_bytes,
                        dropped,
                        subtask_state_bytes,
                        user_metrics,
                    };
                    running[w] = true;
                    self.publish(&progress);
                }
                Ok(Some(ToCoordinator::Ack { id, ack, .. })) if id == FINAL => {
                    // A subtask that ended takes part in later checkpoints with its final
                    // state (FLIP-147). A savepoint is self-contained: keyed state in the
                    // checkpoint's files cannot be part of it.
                    if ack.operators.iter().any(|o| o.keyed.is_some() || o.keyed_file.is_some()) {
                        while let Some(pos) = pending.iter().position(|p| p.savepoint.is_some()) {
                            let pd = pending.remove(pos).expect("found");
                            let why = format!(
                                "subtask {} of {:?} ended (its input was exhausted) before the savepoint's barrier reached it, and its keyed state cannot be written into the savepoint after its end",
                                ack.subtask, ack.task
                            );
                            if let Some(end) = self.savepoint_failed(&pd, &why) {
                                return end;
                            }
                        }
                    }
                    final_acks.insert((ack.task.clone(), ack.subtask), *ack);
                    if final_acks.len() == self.acks_needed && !final_sent {
                        // Pending checkpoints can no longer complete: the final one subsumes them.
                        pending.clear();
                        self.last_id += 1;
                        let id = self.last_id;
                        let now = checkpoint::now_ms();
                        if let Err(e) = self.complete(id, now, now, &final_acks, true) {
                            return AttemptEnd::Failed(e);
                        }
                        final_sent = true;
                        self.send_all(&ToWorker::Complete { id, final_: true });
                        continue;
                    }
                    if let Some(end) = self.conclude_covered(
                        &mut pending,
                        &final_acks,
                        &mut failures_in_a_row,
                        &mut last_done,
                    ) {
                        return end;
                    }
                }
                Ok(Some(ToCoordinator::Ack { id, ack, .. })) => {
                    let Some(pd) = pending.iter_mut().find(|p| p.id == id) else { continue };
                    pd.acks.insert((ack.task.clone(), ack.subtask), *ack);
                    if let Some(end) = self.conclude_covered(
                        &mut pending,
                        &final_acks,
                        &mut failures_in_a_row,
                        &mut last_done,
                    ) {
                        return end;
                    }
                }
                Ok(Some(ToCoordinator::Decline { id, message, .. })) => {
                    if id == FINAL {
                        return AttemptEnd::Failed(
                            RuntimeError::external(format!(
                                "worker {w}: the final checkpoint failed: {message}"
                            ))
                            .retryable(),
                        );
                    }
                    let Some(pos) = pending.iter().position(|p| p.id == id) else { continue };
                    let pd = pending.remove(pos).expect("found");
                    if pd.savepoint.is_some() {
                        let why = format!("declined by worker {w}: {message}");
                        if let Some(end) = self.savepoint_failed(&pd, &why) {
                            return end;
                        }
                        continue;
                    }
                    let settings = self.settings();
                    let why = format!("checkpoint {id} declined by worker {w}: {message}");
                    if let Some(end) =
                        self.checkpoint_failed(&pd, why, &mut failures_in_a_row, &settings)
                    {
                        return end;
                    }
                    last_done = Instant::now();
                }
                Ok(Some(ToCoordinator::Finished { records, dropped, user_metrics, .. })) => {
                    self.ended.insert(conn);
                    progress[w] = Progress {
                        records,
                        state_bytes: 0,
                        dropped,
                        subtask_state_bytes: Vec::new(),
                        user_metrics,
                    };
                    finished[w] = true;
                    self.publish(&progress);
                    if finished.iter().all(|&f| f) {
                        return AttemptEnd::Finished;
                    }
                }
                Ok(Some(ToCoordinator::Failed { message, user, retryable, damaged, .. })) => {
                    self.ended.insert(conn);
                    self.failed_while_starting = retryable && !running.iter().all(|&r| r);
                    let whose = match (user, damaged) {
                        (true, _) => Whose::User,
                        (_, true) => Whose::Damaged,
                        _ => Whose::External,
                    };
                    return AttemptEnd::Failed(RuntimeError {
                        whose,
                        retryable,
                        message: format!("worker {w}: {message}"),
                    });
                }
                Ok(Some(ToCoordinator::Hello { .. } | ToCoordinator::Proof { .. })) => {
                    return AttemptEnd::Failed(RuntimeError::internal(format!(
                        "worker {w} said hello twice"
                    )));
                }
                Ok(None) | Err(_) => {
                    let why = match msg {
                        Err(e) => e,
                        _ => "closed the connection".into(),
                    };
                    self.lose(conn);
                    if finished[w] {
                        continue;
                    }
                    self.failed_while_starting = !running.iter().all(|&r| r);
                    return AttemptEnd::Failed(
                        RuntimeError::external(format!("worker {w} was lost: {why}")).retryable(),
                    );
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn info(
        &self,
        id: u64,
        status: CheckpointStatus,
        triggered_at: u64,
        completed_at: u64,
        acks: &BTreeMap<(String, u32), TaskAck>,
        final_: bool,
        failure: Option<String>,
    ) -> CheckpointInfo {
        let end = if completed_at > 0 { completed_at } else { checkpoint::now_ms() };
        CheckpointInfo {
            id,
            status,
            trigger_time: triggered_at,
            duration_ms: end.saturating_sub(triggered_at),
            size_bytes: acks.values().map(|a| a.state_bytes).sum(),
            uploaded_bytes: acks.values().map(|a| a.uploaded_bytes).sum(),
            alignment_ms: acks.values().map(|a| a.alignment_ms).max().unwrap_or(0),
            unaligned: acks.values().any(|a| a.unaligned),
            in_flight_bytes: acks.values().map(|a| a.in_flight_bytes).sum(),
            acknowledged: acks.len() as u32,
            subtasks: self.acks_needed as u32,
            final_,
            path: None,
            failure,
        }
    }

    /// A checkpoint failed: counts it, and ends the attempt once failures in a row pass the
    /// tolerance.
    fn checkpoint_failed(
        &self,
        pd: &Pending,
        why: String,
        in_a_row: &mut u32,
        settings: &Settings,
    ) -> Option<AttemptEnd> {
        eprintln!("weir: coordinator: {why}");
        *in_a_row += 1;
        self.c.status.record(self.info(
            pd.id,
            CheckpointStatus::Failed,
            pd.triggered_at,
            0,
            &pd.acks,
            false,
            Some(why.clone()),
        ));
        if *in_a_row > settings.tolerable_failures {
            return Some(AttemptEnd::Failed(
                RuntimeError::external(format!(
                    "{in_a_row} checkpoints failed in a row (checkpointing.tolerableFailures is {}); the last: {why}",
                    settings.tolerable_failures
                ))
                .retryable(),
            ));
        }
        None
    }

    /// A savepoint failed: records why. One that was to stop the job fails the attempt (its
    /// sources took no input after the barrier): the job restarts from its last checkpoint
    /// and goes on running.
    fn savepoint_failed(&self, pd: &Pending, why: &str) -> Option<AttemptEnd> {
        let sp = pd.savepoint.as_ref()?;
        eprintln!(
            "weir: coordinator: savepoint {} (checkpoint {}) failed: {why}",
            sp.request, pd.id
        );
        self.c.status.update_savepoint(&sp.request, |s| {
            s.status = SavepointStatus::Failed;
            s.failure = Some(why.to_string());
        });
        sp.target.stop.then(|| {
            AttemptEnd::Failed(
                RuntimeError::external(format!(
                    "savepoint {} was to stop the job and failed: {why}",
                    sp.request
                ))
                .retryable(),
            )
        })
    }

    /// Writes a savepoint's metadata into its directory: it exists from then on, and the
    /// runtime never deletes it.
    fn complete_savepoint(
        &self,
        pd: &Pending,
        sp: &PendingSavepoint,
    ) -> Result<Metadata, RuntimeError> {
        let meta =
            self.metadata(pd.id, pd.triggered_at, checkpoint::now_ms(), &pd.acks, false, true);
        let storage = crate::storage::open_uri(&sp.target.dir, self.c.spec.s3.as_ref())?;
        storage.put(checkpoint::METADATA, &meta.to_bytes(self.c.opts.secret.for_metadata()))?;
        let size = meta.size_bytes();
        eprintln!(
            "weir: coordinator: savepoint {} completed: {} ({size} bytes of keyed state)",
            sp.request, sp.target.dir
        );
        self.c.status.update_savepoint(&sp.request, |s| {
            s.status = SavepointStatus::Completed;
            s.path = Some(sp.target.dir.to_string());
            s.size_bytes = size;
        });
        Ok(meta)
    }

    fn metadata(
        &self,
        id: u64,
        triggered_at: u64,
        completed_at: u64,
        acks: &BTreeMap<(String, u32), TaskAck>,
        final_: bool,
        savepoint: bool,
    ) -> Metadata {
        let plan = &self.c.plan;
        Metadata {
            version: checkpoint::VERSION,
            job_name: self.c.opts.name.clone(),
            job_id: self.job_id.clone(),
            id,
            triggered_at,
            completed_at,
            parallelism: plan.parallelism,
            max_parallelism: plan.max_parallelism,
            operator_uids: plan.ops.iter().map(|o| o.uid.clone()).collect(),
            final_,
            savepoint,
            state_backend: plan.state_backend,
            operators: acks.values().flat_map(|a| a.operators.iter().cloned()).collect(),
        }
    }

    /// Writes checkpoint `id`'s metadata (the moment it exists), then applies retention.
    fn complete(
        &mut self,
        id: u64,
        triggered_at: u64,
        completed_at: u64,
        acks: &BTreeMap<(String, u32), TaskAck>,
        final_: bool,
    ) -> Result<(), RuntimeError> {
        let ck = self.ck.as_ref().expect("checkpointing");
        let (job, retained) = (ck.job.clone(), ck.settings.retained as usize);
        let meta = self.metadata(id, triggered_at, completed_at, acks, final_, false);
        let key = format!("{}/{}", Metadata::dir(id), checkpoint::METADATA);
        job.put(&key, &meta.to_bytes(self.c.opts.secret.for_metadata()))?;
        let mut info = self.info(
            id,
            CheckpointStatus::Completed,
            triggered_at,
            checkpoint::now_ms(),
            acks,
            final_,
            None,
        );
        info.path = Some(job.describe(&key));
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        eprintln!(
            "weir: {}checkpoint {id} completed in {} ms: {:.1} MiB of state, {:.1} MiB uploaded{} ({})",
            if final_ { "final " } else { "" },
            info.duration_ms,
            mib(info.size_bytes),
            mib(info.uploaded_bytes),
            if info.unaligned {
                format!(", unaligned with {:.1} MiB in flight", mib(info.in_flight_bytes))
            } else {
                String::new()
            },
            job.describe(&key)
        );
        self.c.status.record(info);
        self.completed.push_back(meta);
        if self.completed.len() > retained {
            let n = self.completed.len() - retained;
            let dropped: Vec<Metadata> = self.completed.drain(..n).collect();
            let kept: Vec<Metadata> = self.completed.iter().cloned().collect();
            if let Err(e) = checkpoint::discard(job.as_ref(), &dropped, &kept) {
                eprintln!("weir: coordinator: deleting old checkpoints: {e}");
            }
        }
        Ok(())
    }

    /// Deletes every checkpoint of this job id (`spec.checkpointing.onCancel: delete`).
    fn delete_checkpoints(&self) {
        let Some(ck) = &self.ck else { return };
        let r = ck.job.list("").and_then(|all| {
            let n = all.len();
            for e in all {
                ck.job.delete(&e.key)?;
            }
            Ok(n)
        });
        match r {
            Ok(n) => {
                ck.root.remove_empty_dirs(&ck.dir);
                eprintln!(
                    "weir: spec.checkpointing.onCancel is delete: deleted the job's checkpoints ({n} files, {})",
                    ck.job.describe("")
                );
            }
            Err(e) => eprintln!(
                "weir: spec.checkpointing.onCancel is delete, but deleting the job's checkpoints in {} failed: {e}",
                ck.job.describe("")
            ),
        }
    }

    /// Completes the pending checkpoints and savepoints that every subtask has acknowledged
    /// or, having ended, takes part in with its final state.
    fn conclude_covered(
        &mut self,
        pending: &mut VecDeque<Pending>,
        final_acks: &BTreeMap<(String, u32), TaskAck>,
        failures_in_a_row: &mut u32,
        last_done: &mut Instant,
    ) -> Option<AttemptEnd> {
        let needed = self.acks_needed;
        let covered = |p: &Pending| {
            p.acks.len() + final_acks.keys().filter(|k| !p.acks.contains_key(*k)).count() >= needed
        };
        while let Some(pos) = pending.iter().position(covered) {
            let mut pd = pending.remove(pos).expect("found");
            for (k, a) in final_acks {
                pd.acks.entry(k.clone()).or_insert_with(|| a.clone());
            }
            if let Some(end) = self.conclude(pd, pending, failures_in_a_row, last_done) {
                return Some(end);
            }
        }
        None
    }

    /// Completes a checkpoint or savepoint that has every subtask's part.
    fn conclude(
        &mut self,
        pd: Pending,
        pending: &mut VecDeque<Pending>,
        failures_in_a_row: &mut u32,
        last_done: &mut Instant,
    ) -> Option<AttemptEnd> {
        let id = pd.id;
        if let Some(sp) = &pd.savepoint {
            match self.complete_savepoint(&pd, sp) {
                Ok(meta) if sp.target.stop => {
                    // The sinks commit, then the workers end.
                    self.send_all(&ToWorker::Complete { id, final_: false });
                    self.stopped_into = Some((meta, sp.target.dir.clone()));
                }
                Ok(_) => {}
                Err(e) => {
                    let why = format!("writing its metadata: {e}");
                    return self.savepoint_failed(&pd, &why);
                }
            }
            return None;
        }
        // Older checkpoints still in flight are subsumed by this one (savepoints are not).
        pending.retain(|p| p.savepoint.is_some() || p.id > pd.id);
        match self.complete(pd.id, pd.triggered_at, checkpoint::now_ms(), &pd.acks, false) {
            Ok(()) => {
                *failures_in_a_row = 0;
                self.send_all(&ToWorker::Complete { id, final_: false });
            }
            Err(e) => {
                let settings = self.settings();
                let why = format!("checkpoint {id}: writing its metadata: {e}");
                if let Some(end) = self.checkpoint_failed(&pd, why, failures_in_a_row, &settings) {
                    return Some(end);
                }
            }
        }
        *last_done = Instant::now();
        None
    }

    fn publish(&self, progress: &[Progress]) {
        // Counters from the workers saturate rather than overflow.
        let sum = |it: &mut dyn Iterator<Item = u64>| it.fold(0u64, u64::saturating_add);
        self.c.status.update(|i| {
            for (k, op) in i.operators.iter_mut().enumerate() {
                let of = |p: &Progress| p.records.get(k).copied().unwrap_or_default();
                op.records_in = sum(&mut progress.iter().map(|p| of(p).0));
                op.records_out = sum(&mut progress.iter().map(|p| of(p).1));
                op.records_dropped =
                    sum(&mut progress.iter().filter_map(|p| p.dropped.get(k).copied()));
                op.metrics = user_metrics_of(progress, k, i.parallelism);
            }
            i.state_bytes = sum(&mut progress.iter().map(|p| p.state_bytes));
            // A subtask index a worker reports that is not the job's is left out.
            let mut by = vec![0u64; i.parallelism as usize];
            for (s, bytes) in progress.iter().flat_map(|p| &p.subtask_state_bytes) {
                if let Some(b) = by.get_mut(*s as usize) {
                    *b = b.saturating_add(*bytes);
                }
            }
            i.subtask_state_bytes = by;
        });
    }

    /// Whether worker `w` may acknowledge `ack`: a task of the job, a subtask this
    /// coordinator placed on that worker, and state of that task's operators only, each once.
    fn check_ack(&self, w: usize, ack: &TaskAck) -> Result<(), String> {
        let plan = &self.c.plan;
        let (task_of, heads) = crate::exec::tasks(plan);
        let Some(&head) = heads.iter().find(|&&h| plan.ops[h].uid == ack.task) else {
            return Err(format!("it names task {:?}, which the job does not have", ack.task));
        };
        if ack.subtask >= plan.parallelism {
            return Err(format!(
                "it names subtask {} of {:?}, but the job runs {} subtasks",
                ack.subtask, ack.task, plan.parallelism
            ));
        }
        let placed = if self.expected == 1 { 0 } else { ack.subtask as usize };
        if placed != w {
            return Err(format!(
                "it names subtask {} of {:?}, which runs on worker {placed}",
                ack.subtask, ack.task
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for o in &ack.operators {
            let ours = plan.ops.iter().position(|p| p.uid == o.uid);
            if ours.is_none_or(|i| task_of[i] != task_of[head]) {
                return Err(format!(
                    "it holds state of operator {:?}, which is not in task {:?}",
                    o.uid, ack.task
                ));
            }
            if o.subtask != ack.subtask {
                return Err(format!(
                    "it holds state of subtask {} of {:?} as subtask {}'s",
                    o.subtask, o.uid, ack.subtask
                ));
            }
            if !seen.insert(o.uid.as_str()) {
                return Err(format!("it holds the state of operator {:?} twice", o.uid));
            }
        }
        Ok(())
    }
}

/// Checks that a checkpoint fits the job before anything starts.
fn check_restore(m: &Metadata, plan: &Plan, allow_non_restored: bool) -> Result<(), RuntimeError> {
    // A savepoint is in the one format both backends read; a checkpoint is in its backend's
    // own (RocksDB's files, or the heap's full copy).
    if !m.savepoint && m.state_backend != plan.state_backend {
        return Err(RuntimeError::user(format!(
            "{} was taken with spec.stateBackend {}, but the job has {}: a checkpoint restores only into the backend that took it; to change spec.stateBackend, start from a savepoint (take one with the old backend, then restore it with the new one)",
            m.describe(),
            m.state_backend,
            plan.state_backend
        )));
    }
    if m.max_parallelism != plan.max_parallelism {
        return Err(RuntimeError::user(format!(
            "{} was taken with maxParallelism {}, but the job has {}: maxParallelism cannot change once a job has state",
            m.describe(),
            m.max_parallelism,
            plan.max_parallelism
        )));
    }
    if !allow_non_restored {
        // Operators without state (a map, a split) may come and go.
        let has_state = |o: &&checkpoint::OperatorState| {
            o.keyed.is_some()
                || o.keyed_file.is_some()
                || o.state.is_some()
                || o.in_flight.is_some()
        };
        for o in m.operators.iter().filter(has_state) {
            if !plan.ops.iter().any(|p| p.uid == o.uid) {
                return Err(RuntimeError::user(format!(
                    "{} holds state of operator uid {:?}, which the pipeline no longer has: put it back, or set spec.restore.allowNonRestoredState to drop its state",
                    m.describe(),
                    o.uid
                )));
            }
        }
    }
    Ok(())
}

/// Restarts in a row that fail while the job is restarting and are not counted as new
/// failures; the next one counts.
const MAX_UNCOUNTED: u32 = 10;

/// Control connections whose opening is read at the same time; more are closed at once
/// (a flood of connections cannot make the coordinator run out of threads).
const MAX_OPENING: usize = 64;

/// Accepts workers on the control listener: reads each opening on a thread of its own
/// (within [`control::HANDSHAKE_DEADLINE`]) and reports the worker, then every message it
/// sends.
fn spawn_acceptor(
    listener: &TcpListener,
    tx: Sender<Event>,
    expected: usize,
    parallelism: u32,
    secret: JobSecret,
) -> Result<(), RuntimeError> {
    let listener = listener.try_clone().map_err(|e| RuntimeError::internal(e.to_string()))?;
    listener.set_nonblocking(false).map_err(|e| RuntimeError::internal(e.to_string()))?;
    let opening = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control-accept".into())
        .spawn(move || {
            let mut next_conn = 0u64;
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors, say: try again in a moment.
                        eprintln!("weir: coordinator: accepting a control connection: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if opening.fetch_add(1, Ordering::AcqRel) >= MAX_OPENING {
                    opening.fetch_sub(1, Ordering::AcqRel);
                    drop(stream);
                    continue;
                }
                next_conn += 1;
                let (tx, conn, secret, opening) =
                    (tx.clone(), next_conn, secret.clone(), opening.clone());
                let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                let spawned =
                    std::thread::Builder::new().name("control-conn".into()).spawn(move || {
                        let opened = hello(stream, expected, parallelism, &secret);
                        opening.fetch_sub(1, Ordering::AcqRel);
                        match opened {
                            Ok((slot, writer, mut reader, data_addr)) => {
                                if tx.send(Event::Joined { slot, conn, writer, data_addr }).is_err()
                                {
                                    return;
                                }
                                loop {
                                    let msg = reader.recv::<ToCoordinator>();
                                    let end = !matches!(msg, Ok(Some(_)));
                                    if tx.send(Event::Msg { conn, msg }).is_err() || end {
                                        return;
                                    }
                                }
                            }
                            Err(why) => eprintln!(
                                "weir: coordinator: refused a connection from {peer}: {why}"
                            ),
                        }
                    });
                if let Err(e) = spawned {
                    eprintln!("weir: coordinator: starting a thread for a control connection: {e}");
                }
            }
        })
        .map_err(|e| RuntimeError::internal(format!("starting a thread: {e}")))?;
    Ok(())
}

/// Reads a worker's opening (its hello, the challenge and its proof) and says which slot it
/// takes. Nothing about the job is sent before the worker's proof is checked.
fn hello(
    s: TcpStream,
    expected: usize,
    parallelism: u32,
    secret: &JobSecret,
) -> Result<(usize, Arc<Writer>, Reader, String), String> {
    let deadline = Some(Instant::now() + control::HANDSHAKE_DEADLINE);
    s.set_write_timeout(Some(control::HANDSHAKE_DEADLINE)).map_err(|e| e.to_string())?;
    let writer = Arc::new(Writer::new(s.try_clone().map_err(|e| e.to_string())?));
    let mut reader = Reader::new(s, control::HELLO_LIMIT);
    let refuse = |why: String| {
        let _ = writer.send(&ToWorker::Refused { reason: why.clone() });
        writer.shutdown();
        why
    };
    let Some(ToCoordinator::Hello { protocol, index, data_addr, nonce }) =
        reader.recv_by(deadline)?
    else {
        return Err(refuse("the first message must be a hello".into()));
    };
    if protocol != PROTOCOL {
        return Err(refuse(format!(
            "protocol {protocol}; this coordinator speaks {PROTOCOL}: run the same weir version"
        )));
    }
    let Some(theirs) = auth::unhex::<{ auth::NONCE_LEN }>(&nonce) else {
        return Err(refuse("a hello without a nonce of 32 bytes in hex".into()));
    };
    let ours = auth::nonce();
    writer
        .send(&ToWorker::Challenge {
            nonce: auth::hex(&ours),
            proof: auth::hex(&control::coordinator_proof(secret, &theirs, &ours)),
        })
        .map_err(|e| e.to_string())?;
    let proven = match reader.recv_by::<ToCoordinator>(deadline)? {
        Some(ToCoordinator::Proof { proof }) => auth::unhex::<{ auth::PROOF_LEN }>(&proof)
            .is_some_and(|p| {
                let want = control::worker_proof(secret, &ours, &theirs, index, &data_addr);
                auth::same(&want, &p)
            }),
        _ => false,
    };
    if !proven {
        return Err(refuse(format!(
            "the worker did not prove the job's secret: give it the coordinator's {}",
            auth::ENV
        )));
    }
    let slot = match (index, expected) {
        (None, 1) => 0,
        (Some(i), _) if (i as usize) < expected && expected > 1 => i as usize,
        (Some(0), 1) => 0,
        (Some(i), _) => {
            return Err(refuse(format!(
                "--index {i} is not below the job's parallelism {parallelism}"
            )));
        }
        (None, _) => {
            return Err(refuse(
                "a worker without --index, but the job needs one per subtask".into(),
            ));
        }
    };
    reader.set_limit(control::MESSAGE_LIMIT);
    reader.get_ref().set_write_timeout(None).map_err(|e| e.to_string())?;
    Ok((slot, writer, reader, data_addr))
}
