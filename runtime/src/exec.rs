//! Running a plan: operators are chained into tasks, and every task runs as `parallelism`
//! subtasks, one thread each.
//!
//! ```text
//!   task 0 (source ─► split)  ══ key groups ══►  task 1 (count ─► sink)
//!      subtask 0 ─────────────┬──────────────►     subtask 0
//!      subtask 1 ─────────────┴──────────────►     subtask 1
//! ```
//!
//! An operator joins its input's task when it has exactly one input and is not keyed;
//! a keyed operator (or one with several inputs) starts a task of its own, and records reach
//! it through an exchange: batches over a channel per producing and receiving subtask, with
//! credits, so that a slow consumer holds its producers back (backpressure) instead of growing
//! a queue ([`crate::exchange`]). Keyed exchanges
//! send each record to the subtask that owns its key group; the others go to the subtask of
//! the same index. Every subtask index has its own RocksDB instance.
//!
//! A worker runs some of the subtask indexes (all of them in `weir run`, one in a worker
//! process); a keyed exchange to a subtask that another worker runs goes over the network
//! ([`crate::exchange`]). Forward exchanges never leave a worker: subtask `i` of every
//! operator runs on the same worker.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::collections::HashMap;

use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::checkpoint::{
    InFlightHandle, Metadata, OperatorState, Restored, Settings, TaskAck, now_ms,
};
use crate::connectors::SourceFile;
use crate::error::RuntimeError;
use crate::event_time::{Forwarded, InputClock, Watermark};
use crate::exchange::align::{Action, Aligner, InFlightRecords};
use crate::exchange::wire::Barrier;
use crate::exchange::{InChannel, Inbox, Msg, Network, Outlet, Route, cancelled};
use crate::keygroup::{key_group_of, subtask_of};
use crate::objstore::S3Client;
use crate::operator::{Operator, Source};
use crate::plan::{FieldType, OpKind, Plan};
use crate::record::Record;
use crate::snapshot::StateHandle;
use crate::state::{DeferredWrite, LocalSnapshot, StateBackend, StateBackendKind};
use crate::storage::Storage;

/// Records per batch on an exchange.
pub const BATCH: usize = 1024;
/// Batches a producer may have in flight to a consuming subtask in the same worker.
pub const CHANNEL_BATCHES: usize = 16;
/// Keys a keyed operator keeps in memory between write-backs.
pub const STATE_CACHE_ENTRIES: usize = 2_000_000;

/// How a job runs locally.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where each worker's RocksDB instance goes (`<state_dir>/<run_id>/worker-<i>`).
    pub state_dir: PathBuf,
    /// Unique per run: names the sinks' part files and the state directories.
    pub run_id: String,
    /// Set to stop the sources; the job then ends as if they were exhausted.
    pub stop: Arc<AtomicBool>,
    /// Keep the workers' state directories after the run (for inspection and tests).
    pub keep_state: bool,
    /// Set when the job must end at once (another part of it failed); the subtasks unwind
    /// with an error.
    pub cancel: Arc<AtomicBool>,
    /// Names the sinks' part files: the same in every attempt of a job (the run id when
    /// there are no checkpoints).
    pub job_id: String,
    /// Checkpoints, when the job takes them.
    pub checkpoints: Option<CheckpointRun>,
}

impl RunOptions {
    pub fn new(state_dir: impl Into<PathBuf>, run_id: impl Into<String>) -> Self {
        let run_id = run_id.into();
        Self {
            state_dir: state_dir.into(),
            job_id: run_id.clone(),
            run_id,
            stop: Arc::default(),
            keep_state: false,
            cancel: Arc::default(),
            checkpoints: None,
        }
    }
}

/// The id a subtask's final snapshot is acknowledged with (taken when its inputs ended); the
/// coordinator gives the final checkpoint the next id when it completes.
pub const FINAL: u64 = u64::MAX;
/// How often a source subtask that polls nothing looks at its watermark (one that polls
/// records looks after every poll): how soon its splits' idleness is told.
const WATERMARK_EVERY_MS: u64 = 100;

/// The savepoints triggered in an attempt, by checkpoint id: where each goes.
pub type SavepointTargets = Arc<std::sync::Mutex<HashMap<u64, crate::control::SavepointTarget>>>;

/// What a subtask tells its worker about a checkpoint: its acknowledgement, or why it could
/// not take its part.
pub type AckEvent = (u64, Result<TaskAck, RuntimeError>);

/// How a run takes checkpoints.
#[derive(Clone)]
pub struct CheckpointRun {
    pub settings: Settings,
    /// The job's checkpoint directory.
    pub storage: Arc<dyn Storage>,
    /// The state to start from, for the subtasks of this worker (of every old subtask when
    /// the job restores at another parallelism).
    pub restore: Arc<Restored>,
    /// The parallelism of the checkpoint restored from.
    pub restored_parallelism: Option<u32>,
    /// Where the files of the snapshot restored from are: `storage`, or another job's
    /// directory (then the first checkpoint uploads everything).
    pub restore_storage: Arc<dyn Storage>,
    pub restore_foreign: bool,
    /// Restore, then end at once without finishing the operators (the job was stopped into
    /// the savepoint it restores from).
    pub stop_at_start: bool,
    /// Checkpoint ids of this run start above this one.
    pub after_id: u64,
    /// The highest checkpoint id triggered: sources emit a barrier for every id above the
    /// last one they emitted (starting above `after_id`, even when a trigger came before the
    /// source started).
    pub triggered: Arc<AtomicU64>,
    /// The highest checkpoint id completed ([`FINAL`]: the final one).
    pub completed: Arc<AtomicU64>,
    /// The checkpoints that are savepoints, and where they go.
    pub savepoints: SavepointTargets,
    /// S3 settings, for savepoints on S3.
    pub s3: Option<weir_crds::streamjob::S3Spec>,
    pub acks: Sender<AckEvent>,
}

impl std::fmt::Debug for CheckpointRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointRun")
            .field("settings", &self.settings)
            .field("storage", &self.storage)
            .field("restore", &self.restore.len())
            .finish_non_exhaustive()
    }
}

/// Records in and out of each operator, updated as the job runs.
#[derive(Debug, Default)]
pub struct OpMetrics {
    pub records_in: AtomicU64,
    pub records_out: AtomicU64,
    /// Records the operator could not use (see [`Operator::take_dropped`]).
    pub records_dropped: AtomicU64,
    /// Records that came too late to use (see [`Operator::take_late`]).
    pub records_late: AtomicU64,
    /// The watermark each of this worker's subtasks of the operator has taken in, by subtask.
    watermarks: std::sync::Mutex<BTreeMap<u32, i64>>,
}

impl OpMetrics {
    fn set_watermark(&self, subtask: u32, t: i64) {
        self.watermarks.lock().unwrap_or_else(|e| e.into_inner()).insert(subtask, t);
    }
}

/// The live counters of a job.
#[derive(Debug)]
pub struct JobMetrics {
    pub operators: Vec<(String, OpMetrics)>,
    pub started: Instant,
    /// The state backend instances of the running subtasks, by subtask.
    state: std::sync::Mutex<Vec<(u32, StateBackend)>>,
    /// The metrics the operators' own code registered.
    pub(crate) user: crate::operator::metrics::Registry,
    /// What the connectors tell of the systems they read and write.
    pub(crate) connectors: crate::connectors::stats::ConnectorRegistry,
}

impl JobMetrics {
    pub fn new(plan: &Plan) -> Self {
        Self {
            operators: plan.ops.iter().map(|o| (o.uid.clone(), OpMetrics::default())).collect(),
            started: Instant::now(),
            state: Default::default(),
            user: Default::default(),
            connectors: Default::default(),
        }
    }

    /// The connectors' figures, now: (operator index in plan order, subtask, figures) each.
    pub fn connector_stats(&self) -> Vec<(u32, u32, crate::connectors::stats::ConnectorStats)> {
        crate::connectors::stats::report(&self.connectors)
    }

    /// The operators' own metrics, now: (operator index in plan order, metric) each.
    pub fn user_metrics(&self) -> Vec<(u32, crate::operator::metrics::UserMetric)> {
        crate::operator::metrics::report(&self.user)
    }

    /// Bytes of keyed state held by the running subtasks.
    pub fn state_bytes(&self) -> u64 {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.iter().map(|(_, b)| b.size_bytes()).sum()
    }

    /// Bytes of keyed state per running subtask (that has any), by subtask index.
    pub fn subtask_state_bytes(&self) -> Vec<(u32, u64)> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut by: BTreeMap<u32, u64> = BTreeMap::new();
        for (subtask, b) in s.iter() {
            *by.entry(*subtask).or_default() += b.size_bytes();
        }
        by.into_iter().collect()
    }

    /// Records in and out per operator, in plan order.
    pub fn records_in_order(&self) -> Vec<(u64, u64)> {
        self.operators
            .iter()
            .map(|(_, m)| {
                (m.records_in.load(Ordering::Relaxed), m.records_out.load(Ordering::Relaxed))
            })
            .collect()
    }

    /// Late records per operator, in plan order, now.
    pub fn late_in_order(&self) -> Vec<u64> {
        self.operators.iter().map(|(_, m)| m.records_late.load(Ordering::Relaxed)).collect()
    }

    /// The watermark of each operator's subtasks here that has one, now: (operator index in
    /// plan order, subtask, milliseconds).
    pub fn watermarks(&self) -> Vec<(u32, u32, i64)> {
        let mut out = Vec::new();
        for (k, (_, m)) in self.operators.iter().enumerate() {
            let w = m.watermarks.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(w.iter().map(|(&s, &t)| (k as u32, s, t)));
        }
        out
    }

    /// Records dropped per operator, in plan order, now.
    pub fn dropped_in_order(&self) -> Vec<u64> {
        self.operators.iter().map(|(_, m)| m.records_dropped.load(Ordering::Relaxed)).collect()
    }

    /// Records in and out per operator uid, now.
    pub fn records(&self) -> BTreeMap<String, (u64, u64)> {
        self.operators.iter().map(|(uid, _)| uid.clone()).zip(self.records_in_order()).collect()
    }
}

/// An exchange from one operator of a task to the head of another task.
struct Edge {
    /// One outlet per consuming subtask this producer sends to (`None`: never sends there).
    outlets: Vec<Option<Outlet>>,
    input: u32,
    /// How records are dealt to the consuming subtasks (`None`: to the one of the same index).
    key: Option<Partition>,
    buffers: Vec<Vec<Record>>,
}

/// How a keyed exchange deals records.
#[derive(Debug, Clone, Copy)]
enum Partition {
    /// By the key group of a field.
    Field(usize),
    /// All to the owner of the empty key's group (a global window).
    Single,
}

impl Edge {
    fn send(&mut self, target: usize) -> Result<(), RuntimeError> {
        if self.buffers[target].is_empty() {
            return Ok(());
        }
        let records = std::mem::replace(&mut self.buffers[target], Vec::with_capacity(BATCH));
        let outlet = self.outlets[target].as_mut().ok_or_else(|| {
            RuntimeError::internal(format!("no channel to subtask {target} on this exchange"))
        })?;
        outlet.enqueue(self.input, records)
    }
}

/// A window's late output: it passes on the records its window sets aside.
struct LateRecords;

impl Operator for LateRecords {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        out.extend(batch);
        Ok(())
    }
}

struct ChainOp {
    plan_index: usize,
    uid: String,
    op: Option<Box<dyn Operator>>,
    /// Chained operators fed by this one (indexes in the chain).
    children: Vec<usize>,
    /// Its late output (a window's `lateOutput`), chained to it: what it takes from
    /// [`Operator::take_late_records`].
    late: Option<usize>,
    edges: Vec<Edge>,
    keyed: Option<Keyed>,
    /// A watermark that waits until the operator lets go of the records it holds back (they
    /// are before it).
    held_watermark: Option<Watermark>,
}

/// A keyed operator's part of a checkpoint: its backend's snapshot, or what the checkpoint's
/// thread takes it from.
enum Snap {
    Taken(LocalSnapshot),
    /// The operator's changed values, written into the backend before its snapshot is taken
    /// (`scratch`: where the backend may write them as a file; `local`: the snapshot's
    /// directory).
    Deferred {
        write: DeferredWrite,
        backend: StateBackend,
        scratch: PathBuf,
        local: PathBuf,
    },
}

impl Snap {
    fn take(self, key_groups: (u16, u16)) -> Result<LocalSnapshot, RuntimeError> {
        match self {
            Snap::Taken(local) => Ok(local),
            Snap::Deferred { write, backend, scratch, local } => {
                write.apply_then(&scratch, || backend.snapshot(&local, key_groups))
            }
        }
    }
}

/// The state backend instance of a keyed operator's subtask.
struct Keyed {
    backend: StateBackend,
    /// Where its checkpoints are taken (next to the database).
    dir: PathBuf,
    /// Names the instance in the checkpoint storage: unique per attempt.
    instance: String,
    key_groups: (u16, u16),
    /// The files of the last upload (or of the restored checkpoint): incremental checkpoints
    /// upload only the SST files it does not have.
    last: Arc<std::sync::Mutex<Option<StateHandle>>>,
}

/// One subtask of a task: its operators, in topological order (the head first).
struct Chain {
    ops: Vec<ChainOp>,
    subtask: u32,
    parallelism: u32,
    max_parallelism: u32,
    metrics: Arc<JobMetrics>,
    last_flush: Instant,
    ckpt: Option<CheckpointRun>,
    /// The highest completed checkpoint the operators were told of.
    told_complete: u64,
    /// The task's source once it has ended, told when the final checkpoint completes.
    ended_source: Option<Box<dyn Source>>,
    /// Uploads still running.
    uploads: Vec<std::thread::JoinHandle<()>>,
    /// The task reads exchanges (it is not a source).
    has_inputs: bool,
    /// For each input of the head: the operator it comes from, and the names and types of
    /// the fields its records have.
    input_fields: Vec<(String, Vec<String>, Vec<FieldType>)>,
    /// With unaligned checkpoints: the alignment timeout in milliseconds.
    unaligned_after: Option<u64>,
    /// Unaligned checkpoints whose overtaken records are still being collected: where they
    /// go once known (to the upload of that checkpoint).
    in_flight: BTreeMap<u64, Sender<InFlightRecords>>,
    /// The savepoint that stops the job, once this subtask has taken its part: it takes no
    /// more input, and ends without finishing its operators.
    stopped: Option<u64>,
}

impl Chain {
    /// Checks records that came from another subtask (over the network, or stored in a
    /// checkpoint) before the head takes them: each has the fields its producer emits. A
    /// record that does not is damage or a forgery, and fails the job with what it was.
    fn check_input(&self, input: usize, records: &[Record]) -> Result<(), RuntimeError> {
        let head = &self.ops[0].uid;
        let Some((from, names, types)) = self.input_fields.get(input) else {
            return Err(RuntimeError::external(format!(
                "a batch for input {input} of {head:?}, which has {} inputs",
                self.input_fields.len()
            )));
        };
        let damaged = "the exchange or the checkpoint's in-flight records are damaged";
        for r in records {
            if r.len() != types.len() {
                return Err(RuntimeError::external(format!(
                    "a record with {} fields arrived at {head:?} from {from:?}, whose records have {}: {damaged}",
                    r.len(),
                    types.len()
                )));
            }
            if let Some(i) = (0..r.len()).find(|&i| !types[i].admits(r[i].kind())) {
                return Err(RuntimeError::external(format!(
                    "a record arrived at {head:?} from {from:?} with {} in field {:?}, which holds {}: {damaged}",
                    r[i].kind().describe(),
                    names[i],
                    types[i].describe()
                )));
            }
        }
        Ok(())
    }

    fn push(&mut self, idx: usize, input: usize, batch: Vec<Record>) -> Result<(), RuntimeError> {
        let m = &self.metrics.operators[self.ops[idx].plan_index].1;
        m.records_in.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let out = match self.ops[idx].op.as_mut() {
            Some(op) => {
                let mut out = Vec::with_capacity(batch.len());
                op.process(input, batch, &mut out)?;
                let dropped = op.take_dropped();
                if dropped > 0 {
                    m.records_dropped.fetch_add(dropped, Ordering::Relaxed);
                }
                let late = op.take_late();
                if late > 0 {
                    m.records_late.fetch_add(late, Ordering::Relaxed);
                }
                out
            }
            None => batch,
        };
        self.route(idx, out)?;
        if let Some(aside) = self.ops[idx].late {
            let late = self.ops[idx].op.as_mut().map(|op| op.take_late_records());
            if let Some(records) = late.filter(|r| !r.is_empty()) {
                self.push(aside, 0, records)?;
            }
        }
        Ok(())
    }

    fn route(&mut self, idx: usize, out: Vec<Record>) -> Result<(), RuntimeError> {
        if out.is_empty() {
            return Ok(());
        }
        self.metrics.operators[self.ops[idx].plan_index]
            .1
            .records_out
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        let (max_p, p, me) = (self.max_parallelism, self.parallelism, self.subtask as usize);
        let n_children = self.ops[idx].children.len();
        let n_edges = self.ops[idx].edges.len();
        let consumers = n_edges + n_children;
        // The last consumer takes the batch; the others get copies.
        let mut out = Some(out);
        let take = |k: usize, out: &mut Option<Vec<Record>>| {
            if k + 1 == consumers {
                out.take().unwrap_or_default()
            } else {
                out.clone().unwrap_or_default()
            }
        };
        let mut scratch = [0u8; 8];
        for e in 0..n_edges {
            let batch = take(e, &mut out);
            let edge = &mut self.ops[idx].edges[e];
            match edge.key {
                Some(Partition::Single) => {
                    let t = subtask_of(key_group_of(&[], max_p), max_p, p) as usize;
                    edge.buffers[t].extend(batch);
                    if edge.buffers[t].len() >= BATCH {
                        edge.send(t)?;
                    }
                }
                Some(Partition::Field(k)) => {
                    for r in batch {
                        let g = key_group_of(r[k].key_bytes(&mut scratch), max_p);
                        let t = subtask_of(g, max_p, p) as usize;
                        edge.buffers[t].push(r);
                        if edge.buffers[t].len() >= BATCH {
                            edge.send(t)?;
                        }
                    }
                }
                None => {
                    edge.buffers[me].extend(batch);
                    if edge.buffers[me].len() >= BATCH {
                        edge.send(me)?;
                    }
                }
            }
        }
        for c in 0..n_children {
            let batch = take(n_edges + c, &mut out);
            let child = self.ops[idx].children[c];
            self.push(child, 0, batch)?;
        }
        Ok(())
    }

    /// The event time at operator `idx` reached `w`: the operator fires what it passes
    /// (emitted before the watermark), then the watermark goes to the operators chained after
    /// it and on every channel of its exchanges, behind the records buffered for each. An
    /// operator that holds records back forwards it once it has let them go.
    fn watermark(&mut self, idx: usize, w: Watermark) -> Result<(), RuntimeError> {
        // Nothing goes after the barrier of a savepoint that stops the job: the watermark
        // that the ends of its inputs would raise fires no window (the restored job fires
        // them once).
        if self.stopped.is_some() {
            return Ok(());
        }
        if let Watermark::At(t) = w {
            self.metrics.operators[self.ops[idx].plan_index].1.set_watermark(self.subtask, t);
        }
        if let Some(op) = self.ops[idx].op.as_mut() {
            if op.holding() {
                self.ops[idx].held_watermark = Some(w);
                return Ok(());
            }
            if let Watermark::At(t) = w {
                let mut out = Vec::new();
                op.watermark(t, &mut out)?;
                self.route(idx, out)?;
            }
        }
        for edge in &mut self.ops[idx].edges {
            for t in 0..edge.outlets.len() {
                edge.send(t)?;
                if let Some(o) = edge.outlets[t].as_mut() {
                    o.watermark(w)?;
                }
            }
        }
        for c in 0..self.ops[idx].children.len() {
            let child = self.ops[idx].children[c];
            self.watermark(child, w)?;
        }
        if let Some(aside) = self.ops[idx].late {
            self.watermark(aside, w)?;
        }
        Ok(())
    }

    /// Sends every partly filled batch (queues it where there is no credit).
    fn flush(&mut self) -> Result<(), RuntimeError> {
        for op in &mut self.ops {
            for edge in &mut op.edges {
                for t in 0..edge.buffers.len() {
                    edge.send(t)?;
                }
            }
        }
        self.last_flush = Instant::now();
        Ok(())
    }

    fn maybe_flush(&mut self) -> Result<(), RuntimeError> {
        if self.last_flush.elapsed() >= Duration::from_millis(10) { self.flush() } else { Ok(()) }
    }

    fn outlets(&mut self) -> impl Iterator<Item = &mut Outlet> {
        self.ops
            .iter_mut()
            .flat_map(|o| o.edges.iter_mut())
            .flat_map(|e| e.outlets.iter_mut().flatten())
    }

    /// Sends what credit allows; aligned barriers that waited past the alignment timeout
    /// overtake the batches ahead of them.
    fn pump(&mut self) -> Result<(), RuntimeError> {
        self.release_held()?;
        let overtake = self.unaligned_after.map(|t| (now_ms(), t));
        for o in self.outlets() {
            if let Some((now, t)) = overtake {
                o.overtake(now, t)?;
            }
            o.pump()?;
        }
        Ok(())
    }

    /// Lets the records that operators held back go, where they may now
    /// ([`Operator::release`]), and what their due timers emit ([`Operator::tick`]; not
    /// after a savepoint that stops the job: nothing after its barrier).
    fn release_held(&mut self) -> Result<(), RuntimeError> {
        let tick = self.stopped.is_none();
        for idx in 0..self.ops.len() {
            let Some(op) = self.ops[idx].op.as_mut() else { continue };
            let mut out = Vec::new();
            if op.holding() {
                op.release(&mut out)?;
            }
            if tick {
                op.tick(&mut out)?;
            }
            if !out.is_empty() {
                self.route(idx, out)?;
            }
            if !self.ops[idx].op.as_ref().is_some_and(|op| op.holding())
                && let Some(w) = self.ops[idx].held_watermark.take()
            {
                self.watermark(idx, w)?;
            }
        }
        Ok(())
    }

    /// Some operator holds records back.
    fn holding(&self) -> bool {
        self.ops.iter().any(|o| o.op.as_ref().is_some_and(|op| op.holding()))
    }

    /// No batch waits for credit and no operator holds records back: the subtask may take
    /// more input.
    fn output_ready(&self) -> bool {
        !self.holding()
            && self
                .ops
                .iter()
                .flat_map(|o| o.edges.iter())
                .flat_map(|e| e.outlets.iter().flatten())
                .all(|o| o.backlog() == 0)
    }

    /// The credits of the outlets with a batch waiting.
    fn waiting_credits(&self) -> Vec<&Receiver<()>> {
        self.ops
            .iter()
            .flat_map(|o| o.edges.iter())
            .flat_map(|e| e.outlets.iter().flatten())
            .filter_map(|o| o.waiting_credits())
            .collect()
    }

    /// Carries out what the aligner decided, in order.
    fn act(&mut self, actions: &mut Vec<Action>) -> Result<(), RuntimeError> {
        for a in actions.drain(..) {
            match a {
                Action::Take { barrier, alignment_ms } => {
                    self.checkpoint(barrier, None, alignment_ms)?;
                }
                Action::InFlight { id, records } => {
                    if let Some(tx) = self.in_flight.remove(&id) {
                        let _ = tx.send(records);
                    }
                }
            }
        }
        Ok(())
    }

    /// Every input ended: finish the operators in order, take the final snapshot (with
    /// checkpoints), then tell the downstream tasks.
    fn finish(
        &mut self,
        source: Option<&mut Box<dyn Source>>,
        cancel: &AtomicBool,
    ) -> Result<(), RuntimeError> {
        for idx in 0..self.ops.len() {
            // What an operator holds back goes at its pace before it finishes.
            while self.ops[idx].op.as_ref().is_some_and(|op| op.holding()) {
                if cancel.load(Ordering::Relaxed) {
                    return Err(cancelled());
                }
                self.pump()?;
                self.maybe_flush()?;
                Inbox::default().wait(&self.waiting_credits(), Duration::from_millis(5));
            }
            let mut out = Vec::new();
            if let Some(op) = self.ops[idx].op.as_mut() {
                op.finish(&mut out)?;
            }
            self.route(idx, out)?;
        }
        self.flush()?;
        if self.ckpt.is_some() {
            let position = match source {
                Some(s) => s.snapshot(FINAL)?,
                None => None,
            };
            self.checkpoint(Barrier::checkpoint(FINAL, now_ms(), false), position, 0)?;
        }
        self.end_outputs(cancel)
    }

    fn end_outputs(&mut self, cancel: &AtomicBool) -> Result<(), RuntimeError> {
        for o in self.outlets() {
            o.end()?;
        }
        for o in self.outlets() {
            o.drain(cancel)?;
        }
        Ok(())
    }

    /// After its part of savepoint `id`, which stops the job: waits until the savepoint is
    /// complete (the sinks commit what came before it), then ends the outputs. The operators
    /// are not finished and there is no final checkpoint: a job restored from the savepoint
    /// goes on from there.
    fn end_stopped(&mut self, id: u64, cancel: &AtomicBool) -> Result<(), RuntimeError> {
        let completed = self.ckpt.as_ref().map(|c| c.completed.clone());
        while completed.as_ref().is_some_and(|c| c.load(Ordering::Acquire) < id) {
            if cancel.load(Ordering::Relaxed) {
                return Err(cancelled());
            }
            self.pump()?;
            Inbox::default().wait(&self.waiting_credits(), Duration::from_millis(5));
        }
        self.notify_complete()?;
        self.end_outputs(cancel)
    }
}

impl Chain {
    /// Takes this subtask's part of checkpoint `id` and forwards the barrier: every operator
    /// snapshots (keyed ones through a RocksDB checkpoint, which is hard links), then the
    /// uploads run on a thread of their own while the subtask goes on.
    fn checkpoint(
        &mut self,
        barrier: Barrier,
        position: Option<serde_json::Value>,
        alignment_ms: u64,
    ) -> Result<(), RuntimeError> {
        let Some(ck) = self.ckpt.clone() else { return Ok(()) };
        let id = barrier.id;
        let t0 = Instant::now();
        let mut operators = Vec::with_capacity(self.ops.len());
        let mut to_upload = Vec::new();
        let mut position = position;
        for (k, cop) in self.ops.iter_mut().enumerate() {
            let (state, deferred) = match cop.op.as_mut() {
                Some(op) => (op.snapshot(id)?, op.deferred_write()),
                None => (position.take(), None),
            };
            if let Some(keyed) = &cop.keyed {
                let tag = match (id, barrier.savepoint) {
                    (FINAL, _) => "final".to_string(),
                    (_, true) => format!("sp-{id}"),
                    _ => format!("{id}"),
                };
                let local = keyed.dir.join(format!("chk-{tag}"));
                let _ = std::fs::remove_dir_all(&local);
                let local = match deferred {
                    None => Snap::Taken(keyed.backend.snapshot(&local, keyed.key_groups)?),
                    Some(write) => Snap::Deferred {
                        write,
                        backend: keyed.backend.clone(),
                        scratch: keyed.dir.join(format!("writes-{tag}.sst")),
                        local,
                    },
                };
                to_upload.push((
                    k,
                    local,
                    keyed.instance.clone(),
                    keyed.key_groups,
                    tag,
                    keyed.last.clone(),
                ));
            } else if deferred.is_some() {
                return Err(RuntimeError::internal(format!(
                    "operator {:?} held back state writes, and has no state backend",
                    cop.uid
                )));
            }
            operators.push(OperatorState {
                uid: cop.uid.clone(),
                subtask: self.subtask,
                keyed: None,
                keyed_file: None,
                state,
                in_flight: None,
            });
        }
        if id != FINAL {
            self.flush()?;
            for o in self.outlets() {
                o.barrier(barrier)?;
            }
        }
        if barrier.stop {
            self.stopped = Some(id);
        }
        let unaligned = barrier.unaligned && id != FINAL;
        let mut ack = TaskAck {
            task: self.ops[0].uid.clone(),
            subtask: self.subtask,
            operators,
            state_bytes: 0,
            uploaded_bytes: 0,
            alignment_ms,
            sync_ms: t0.elapsed().as_millis() as u64,
            async_ms: 0,
            unaligned,
            in_flight_bytes: 0,
        };
        // An unaligned checkpoint of a task with inputs also stores the records it overtook,
        // once the barrier has come on every channel.
        let in_flight = if unaligned && self.has_inputs {
            let (tx, rx) = crossbeam_channel::bounded(1);
            self.in_flight.insert(id, tx);
            Some(rx)
        } else {
            None
        };
        if to_upload.is_empty() && in_flight.is_none() {
            let _ = ck.acks.send((id, Ok(ack)));
            return Ok(());
        }
        let incremental = ck.settings.incremental;
        let in_flight_key = format!("{}/inflight/{}-{}", Metadata::dir(id), ack.task, self.subtask);
        let savepoint = barrier.savepoint;
        let handle = std::thread::Builder::new()
            .name(format!("upload-{}-{}", self.ops[0].uid, self.subtask))
            .spawn(move || {
                let t1 = Instant::now();
                let mut result = Ok(());
                // The writes held back come first, every one of them even if an upload
                // fails: the operators marked them written.
                let to_upload: Vec<_> = to_upload
                    .into_iter()
                    .map(|(k, snap, instance, key_groups, tag, last)| {
                        (k, snap.take(key_groups), instance, key_groups, tag, last)
                    })
                    .collect();
                // A savepoint writes each operator's keyed state as one file sorted by key
                // group, below its own directory.
                let savepoint_dir = if savepoint {
                    match savepoint_storage(&ck, id) {
                        Ok(s) => Some(s),
                        Err(e) => {
                            result = Err(e);
                            None
                        }
                    }
                } else {
                    None
                };
                for (k, local, instance, key_groups, tag, last) in to_upload {
                    if result.is_err() {
                        break;
                    }
                    let local = match local {
                        Ok(local) => local,
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    };
                    if let Some(sp) = &savepoint_dir {
                        let uid = ack.operators[k].uid.clone();
                        let key = format!("keyed/{uid}-{}", ack.subtask);
                        let r = crate::savepoint::save_keyed(
                            &local,
                            &uid,
                            key_groups,
                            sp.as_ref(),
                            &key,
                        );
                        local.remove();
                        match r {
                            Ok(file) => {
                                let bytes = file.offsets.last().copied().unwrap_or(0);
                                ack.state_bytes += bytes;
                                ack.uploaded_bytes += bytes;
                                ack.operators[k].keyed_file = Some(file);
                            }
                            Err(e) => result = Err(e),
                        }
                        continue;
                    }
                    let dir = match local {
                        LocalSnapshot::RocksDb(dir) => dir,
                        LocalSnapshot::Heap { images, .. } => {
                            // The heap's copy goes up as it is: a keyed file of format 1,
                            // below the instance's shared directory (the final checkpoint's
                            // state is part of later-completing ones too), deleted when no
                            // retained checkpoint names it.
                            for image in images {
                                let file = format!("shared/{instance}/keyed-{tag}");
                                if let Err(e) = ck.storage.put(&file, &image.bytes) {
                                    result = Err(e);
                                    break;
                                }
                                let bytes = image.bytes.len() as u64;
                                ack.state_bytes += bytes;
                                ack.uploaded_bytes += bytes;
                                ack.operators[k].keyed_file = Some(crate::savepoint::KeyedFile {
                                    file,
                                    format: crate::savepoint::KeyedFormat::Entries,
                                    key_groups,
                                    offsets: image.offsets,
                                    checksums: image.checksums,
                                    entries: image.entries,
                                });
                            }
                            continue;
                        }
                    };
                    let previous = if incremental {
                        last.lock().unwrap_or_else(|e| e.into_inner()).clone()
                    } else {
                        None
                    };
                    let r = crate::snapshot::upload(
                        ck.storage.as_ref(),
                        &dir,
                        &instance,
                        key_groups,
                        &format!("shared/own-{tag}"),
                        previous.as_ref(),
                    );
                    let _ = std::fs::remove_dir_all(&dir);
                    match r {
                        Ok((handle, done)) => {
                            ack.state_bytes += handle.size();
                            ack.uploaded_bytes += done.bytes;
                            *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle.clone());
                            ack.operators[k].keyed = Some(handle);
                        }
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                if let (Ok(()), Some(rx)) = (&result, in_flight) {
                    result = match rx.recv() {
                        Ok(records) if records.is_empty() => Ok(()),
                        Ok(records) => {
                            let bytes = crate::exchange::align::encode_in_flight(&records);
                            let handle = InFlightHandle {
                                key: in_flight_key,
                                bytes: bytes.len() as u64,
                                records: records.iter().map(|(_, r)| r.len() as u64).sum(),
                            };
                            ck.storage.put(&handle.key, &bytes).map(|()| {
                                ack.in_flight_bytes = handle.bytes;
                                ack.uploaded_bytes += handle.bytes;
                                ack.operators[0].in_flight = Some(handle);
                            })
                        }
                        Err(_) => Err(RuntimeError::internal(
                            "the subtask stopped before the records its unaligned checkpoint overtook were all known",
                        )),
                    };
                }
                ack.async_ms = t1.elapsed().as_millis() as u64;
                let _ = ck.acks.send((id, result.map(|_| ack)));
            })
            .map_err(|e| RuntimeError::internal(format!("starting a thread: {e}")))?;
        self.uploads.retain(|h| !h.is_finished());
        self.uploads.push(handle);
        Ok(())
    }

    /// Tells the operators of checkpoints completed since they were last told.
    fn notify_complete(&mut self) -> Result<(), RuntimeError> {
        let Some(ck) = &self.ckpt else { return Ok(()) };
        let done = ck.completed.load(Ordering::Acquire);
        if done <= self.told_complete || done == FINAL {
            return Ok(());
        }
        self.told_complete = done;
        for cop in &mut self.ops {
            if let Some(op) = cop.op.as_mut() {
                op.checkpoint_complete(done)?;
            }
        }
        Ok(())
    }

    /// The final checkpoint completed: the sinks commit what is left.
    fn complete_final(&mut self) -> Result<(), RuntimeError> {
        if let Some(s) = self.ended_source.as_mut() {
            s.checkpoint_complete(FINAL)?;
        }
        for cop in &mut self.ops {
            if let Some(op) = cop.op.as_mut() {
                op.checkpoint_complete(FINAL)?;
            }
        }
        Ok(())
    }

    /// Waits for this subtask's uploads.
    fn join_uploads(&mut self) {
        for h in self.uploads.drain(..) {
            let _ = h.join();
        }
    }
}

/// The directory of savepoint `id`. A barrier from another worker can come before this
/// worker hears of the savepoint from the coordinator: wait a while for that.
fn savepoint_storage(ck: &CheckpointRun, id: u64) -> Result<Arc<dyn Storage>, RuntimeError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let target = ck.savepoints.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
        if let Some(t) = target {
            return crate::storage::open_uri(&t.dir, ck.s3.as_ref());
        }
        if Instant::now() >= deadline {
            return Err(RuntimeError::internal(format!(
                "the barrier of savepoint {id} came, but not where it goes"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub elapsed: Duration,
    /// Records in and out per operator uid.
    pub records: BTreeMap<String, (u64, u64)>,
}

/// Runs `plan` in this process until its sources are exhausted (or `opts.stop` is set) and
/// everything is flushed: every subtask here, exchanges over channels.
pub fn run_local(
    plan: &Plan,
    opts: &RunOptions,
    metrics: Arc<JobMetrics>,
) -> Result<RunSummary, RuntimeError> {
    let all: Vec<u32> = (0..plan.parallelism).collect();
    run_worker(
        plan,
        opts,
        &Placement { hosted: all, worker_of: vec![0; plan.parallelism as usize] },
        None,
        metrics,
    )
}

/// Which worker runs which subtask index.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The subtask indexes this worker runs.
    pub hosted: Vec<u32>,
    /// The worker of every subtask index.
    pub worker_of: Vec<u32>,
}

/// The exchanges of a plan: every (producer, consumer, input) where the consumer heads a task.
/// Numbered the same way in every worker, so that the number names it on the wire.
#[derive(Debug, Clone)]
pub struct ExchangeDef {
    pub producer: usize,
    pub consumer: usize,
    pub input: u32,
    pub keyed: bool,
}

/// Operators chained into tasks: the task of every operator, and the head of every task.
pub fn tasks(plan: &Plan) -> (Vec<usize>, Vec<usize>) {
    let mut task_of = vec![0usize; plan.ops.len()];
    let mut heads: Vec<usize> = Vec::new();
    for (i, op) in plan.ops.iter().enumerate() {
        if op.kind.is_source() || op.inputs.len() != 1 || op.kind.is_partitioned() {
            task_of[i] = heads.len();
            heads.push(i);
        } else {
            task_of[i] = task_of[op.inputs[0]];
        }
    }
    (task_of, heads)
}

pub fn exchanges(plan: &Plan, heads: &[usize]) -> Vec<ExchangeDef> {
    let mut out = Vec::new();
    for &h in heads {
        for (input, &producer) in plan.ops[h].inputs.iter().enumerate() {
            out.push(ExchangeDef {
                producer,
                consumer: h,
                input: input as u32,
                keyed: plan.ops[h].kind.is_partitioned(),
            });
        }
    }
    out
}

/// Runs the subtasks of `placement.hosted` until their inputs end; exchanges with subtasks
/// elsewhere go through `network`.
pub fn run_worker(
    plan: &Plan,
    opts: &RunOptions,
    placement: &Placement,
    network: Option<Network>,
    metrics: Arc<JobMetrics>,
) -> Result<RunSummary, RuntimeError> {
    let p = plan.parallelism;
    let hosted = &placement.hosted;
    let here = |s: u32| hosted.contains(&s);
    let (task_of, heads) = tasks(plan);
    let xchg = exchanges(plan, &heads);
    // Checks and resources that must be in place before anything starts.
    let s3 = if plan.uses_s3() { Some(S3Client::new(plan.s3.as_ref())?) } else { None };
    let mut files_of: BTreeMap<usize, Vec<SourceFile>> = BTreeMap::new();
    for (i, op) in plan.ops.iter().enumerate() {
        if let OpKind::FileSource(f) = &op.kind {
            let files =
                crate::connectors::list_source_files(&f.path, s3.as_ref()).map_err(|e| {
                    RuntimeError {
                        message: format!(
                            "operator {:?} ({}): {}: check its path",
                            op.uid,
                            op.type_name,
                            e.message.strip_prefix("file_source: ").unwrap_or(&e.message)
                        ),
                        ..e
                    }
                })?;
            files_of.insert(i, files);
        }
    }
    // A RocksDB instance per keyed operator and subtask, restored from the checkpoint's
    // files when the job restores.
    let run_state = opts.state_dir.join(&opts.run_id);
    // The directories of this worker's subtasks: the attempt's directory is shared by the
    // workers of one machine (`weir run --processes`), so each removes only its own.
    let mut own_dirs: Vec<PathBuf> = Vec::new();
    let restore = opts.checkpoints.as_ref().map(|c| c.restore.clone()).unwrap_or_default();
    // Restoring at another parallelism: every subtask takes its share of every old one's.
    let rescale_from =
        opts.checkpoints.as_ref().and_then(|c| c.restored_parallelism).filter(|&old| old != p);
    let mut keyed_of: HashMap<(usize, u32), Keyed> = HashMap::new();
    for (i, op) in plan.ops.iter().enumerate().filter(|(_, o)| o.kind.is_partitioned()) {
        for &s in hosted {
            let dir = run_state.join(format!("{}-{s}", op.uid));
            own_dirs.push(dir.clone());
            let db = dir.join("db");
            // A savepoint's keyed state: files sorted by key group, of which this subtask
            // reads only the byte ranges of its own key groups, at any parallelism.
            let files: Vec<crate::savepoint::KeyedFile> = restore
                .iter()
                .filter(|((uid, _), _)| uid == &op.uid)
                .filter_map(|(_, o)| o.keyed_file.clone())
                .collect();
            let restored = match rescale_from {
                Some(_) => None,
                None => restore.get(&(op.uid.clone(), s)).and_then(|o| o.keyed.clone()),
            };
            if let (Some(handle), Some(ck)) = (&restored, &opts.checkpoints) {
                let _ = std::fs::remove_dir_all(&db);
                crate::snapshot::download(ck.restore_storage.as_ref(), handle, &db)?;
            }
            if rescale_from.is_some() || !files.is_empty() {
                let _ = std::fs::remove_dir_all(&db);
            }
            // The heap restores from keyed files only: RocksDB's files are not its to read
            // (the coordinator refuses such a checkpoint before it starts anything).
            if plan.state_backend == StateBackendKind::Heap
                && restore.iter().any(|((uid, _), o)| uid == &op.uid && o.keyed.is_some())
            {
                return Err(RuntimeError::user(format!(
                    "operator {:?}: its state to restore is RocksDB's files, and the job's spec.stateBackend is heap: restore from a savepoint to change the backend",
                    op.uid
                )));
            }
            // Where snapshots and restores keep their scratch files, beside the instance.
            std::fs::create_dir_all(&dir)
                .map_err(|e| RuntimeError::internal(format!("creating {}: {e}", dir.display())))?;
            let backend =
                StateBackend::open_kind(plan.state_backend, &db, std::slice::from_ref(&op.uid))
                    .map_err(|e| state_error(&op.uid, s, &e.to_string()))?;
            let range = crate::keygroup::KeyGroupRange::of_subtask(plan.max_parallelism, p, s);
            if let (false, Some(ck)) = (files.is_empty(), &opts.checkpoints) {
                std::fs::create_dir_all(&dir).map_err(|e| {
                    RuntimeError::internal(format!("creating {}: {e}", dir.display()))
                })?;
                let t = Instant::now();
                let done = crate::savepoint::restore_keyed(
                    ck.restore_storage.as_ref(),
                    &files,
                    (range.start, range.end),
                    &backend,
                    &op.uid,
                    &dir.join("restore"),
                )?;
                let _ = std::fs::remove_dir_all(dir.join("restore"));
                eprintln!(
                    "weir: {}-{s}: restored key groups {}..={} from {} savepoint files: {} bytes read in {:.2} s \
                     (waiting for storage {:.2} s, writing {} SST files {:.2} s, ingesting them {:.2} s)",
                    op.uid,
                    range.start,
                    range.end,
                    files
                        .iter()
                        .filter(|f| f.byte_range((range.start, range.end)).is_some())
                        .count(),
                    done.bytes,
                    t.elapsed().as_secs_f64(),
                    done.waiting_secs,
                    done.files,
                    done.writing_secs,
                    done.ingest_secs,
                );
            } else if let (Some(_), Some(ck)) = (rescale_from, &opts.checkpoints) {
                // The old instances holding any of this subtask's key groups, filtered into
                // one SST file. The first checkpoint after it uploads everything.
                let handles: Vec<StateHandle> = restore
                    .iter()
                    .filter(|((uid, _), _)| uid == &op.uid)
                    .filter_map(|(_, o)| o.keyed.clone())
                    .collect();
                let scratch = dir.join("rescale");
                std::fs::create_dir_all(&scratch).map_err(|e| {
                    RuntimeError::internal(format!("creating {}: {e}", scratch.display()))
                })?;
                crate::savepoint::restore_keyed_from_instances(
                    ck.restore_storage.as_ref(),
                    &handles,
                    (range.start, range.end),
                    &backend,
                    &op.uid,
                    &scratch,
                )?;
                let _ = std::fs::remove_dir_all(&scratch);
            }
            keyed_of.insert(
                (i, s),
                Keyed {
                    backend,
                    dir,
                    instance: format!("{}-{s}-{}", op.uid, opts.run_id),
                    key_groups: (range.start, range.end),
                    // The first checkpoint refers to the restored files where they are
                    // (the instance goes on from them) and uploads only new ones; files of
                    // another job's snapshot are not this job's to refer to.
                    last: Arc::new(std::sync::Mutex::new(restored.filter(|_| {
                        !opts.checkpoints.as_ref().is_some_and(|c| c.restore_foreign)
                    }))),
                },
            );
        }
    }
    *metrics.state.lock().unwrap_or_else(|e| e.into_inner()) =
        keyed_of.iter().map(|((_, s), k)| (*s, k.backend.clone())).collect();
    let cancel = opts.cancel.clone();

    // An inbox per (task, hosted subtask) with a channel per producing subtask and input: a
    // queue bounded by the producer's credits.
    let mut inboxes: HashMap<(usize, u32), Inbox> = HashMap::new();
    let mut local_tx: HashMap<(usize, u32, u32), Sender<Msg>> = HashMap::new();
    let mut route: Route = HashMap::new();
    let mut peer_ends: HashMap<u32, usize> = HashMap::new();
    for (e, x) in xchg.iter().enumerate() {
        let t = task_of[x.consumer];
        for &to in hosted {
            let froms: Vec<u32> = if x.keyed { (0..p).collect() } else { vec![to] };
            for from in froms {
                let rx = if here(from) {
                    let (tx, rx) = unbounded();
                    local_tx.insert((e, from, to), tx);
                    rx
                } else {
                    let (tx, rx) = unbounded();
                    route.insert((e as u32, from, to), (tx, x.input));
                    *peer_ends.entry(placement.worker_of[from as usize]).or_default() += 1;
                    rx
                };
                inboxes
                    .entry((t, to))
                    .or_default()
                    .channels
                    .push(InChannel::new(rx, x.input, from));
            }
        }
    }
    if network.is_none() && hosted.len() != p as usize {
        return Err(RuntimeError::internal("a worker without all subtasks needs a network"));
    }
    let mut network = network;

    let mut threads = Vec::new();
    for (t, &h) in heads.iter().enumerate() {
        let members: Vec<usize> = (0..plan.ops.len()).filter(|&i| task_of[i] == t).collect();
        for &s in hosted {
            let mut ops: Vec<ChainOp> = Vec::new();
            for &i in &members {
                let op = &plan.ops[i];
                let instance: Option<Box<dyn Operator>> = if op.inputs.is_empty() {
                    None // a source: made on its thread
                } else if matches!(op.kind, OpKind::LateOutput { .. }) {
                    Some(Box::new(LateRecords))
                } else {
                    let build = crate::operator::builtin::Build {
                        plan,
                        index: i,
                        subtask: s,
                        backend: keyed_of.get(&(i, s)).map(|k| &k.backend),
                        metrics: &metrics,
                        s3: s3.as_ref(),
                        job_id: &opts.job_id,
                        checkpointed: opts.checkpoints.is_some(),
                        after_id: opts.checkpoints.as_ref().map_or(0, |c| c.after_id),
                    };
                    Some(crate::operator::registry().make(&build)?)
                };
                ops.push(ChainOp {
                    plan_index: i,
                    uid: op.uid.clone(),
                    op: instance,
                    children: Vec::new(),
                    late: None,
                    edges: Vec::new(),
                    keyed: keyed_of.remove(&(i, s)),
                    held_watermark: None,
                });
            }
            // Wire chained children and exchanges.
            for (ci, &i) in members.iter().enumerate() {
                for (j, consumer) in plan.ops.iter().enumerate() {
                    for &inp in &consumer.inputs {
                        if inp != i || task_of[j] != t {
                            continue;
                        }
                        let cj = members.iter().position(|&m| m == j).unwrap();
                        if matches!(consumer.kind, OpKind::LateOutput { .. }) {
                            ops[ci].late = Some(cj);
                        } else {
                            ops[ci].children.push(cj);
                        }
                    }
                }
                for (e, x) in xchg.iter().enumerate().filter(|(_, x)| x.producer == i) {
                    let mut outlets: Vec<Option<Outlet>> = Vec::with_capacity(p as usize);
                    for to in 0..p {
                        outlets.push(if !x.keyed && to != s {
                            None
                        } else if here(to) {
                            Some(Outlet::local(local_tx[&(e, s, to)].clone(), CHANNEL_BATCHES))
                        } else {
                            let net = network.as_mut().expect("checked above");
                            Some(net.outlet(placement.worker_of[to as usize], e as u32, s, to))
                        });
                    }
                    let key = x.keyed.then(|| {
                        match plan.ops[x.consumer].key_positions.get(x.input as usize) {
                            Some(&k) => Partition::Field(k),
                            None => Partition::Single,
                        }
                    });
                    ops[ci].edges.push(Edge {
                        outlets,
                        input: x.input,
                        key,
                        buffers: (0..p).map(|_| Vec::new()).collect(),
                    });
                }
            }
            let told_complete =
                opts.checkpoints.as_ref().map_or(0, |c| c.completed.load(Ordering::Acquire));
            let chain = Chain {
                ops,
                subtask: s,
                parallelism: p,
                max_parallelism: plan.max_parallelism,
                metrics: metrics.clone(),
                last_flush: Instant::now(),
                ckpt: opts.checkpoints.clone(),
                told_complete,
                ended_source: None,
                uploads: Vec::new(),
                has_inputs: !plan.ops[h].kind.is_source(),
                input_fields: plan.ops[h]
                    .inputs
                    .iter()
                    .map(|&i| {
                        let o = &plan.ops[i];
                        (o.uid.clone(), o.fields.clone(), o.types.clone())
                    })
                    .collect(),
                unaligned_after: opts
                    .checkpoints
                    .as_ref()
                    .map(|c| &c.settings)
                    .filter(|s| s.unaligned && s.exactly_once)
                    .map(|s| s.alignment_timeout.as_millis() as u64),
                in_flight: BTreeMap::new(),
                stopped: opts.checkpoints.as_ref().filter(|c| c.stop_at_start).map(|_| 0),
            };
            let name = format!("{}-{s}", plan.ops[h].uid);
            let who = format!("subtask {s} of {:?}", plan.ops[h].uid);
            let inbox = inboxes.remove(&(t, s)).unwrap_or_default();
            let head = plan.ops[h].clone();
            let files = files_of.get(&h).cloned().unwrap_or_default();
            let (stop, cancel) = (opts.stop.clone(), cancel.clone());
            let s3 = s3.clone();
            let restore = restore.clone();
            let max_p = plan.max_parallelism;
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || -> Result<Chain, RuntimeError> {
                    // A panic cancels the attempt at once, with its message, instead of
                    // leaving the other subtasks running until the thread is joined.
                    let run = std::panic::AssertUnwindSafe(|| {
                        new_source(&head, h, &files, s3, s, p, &chain.metrics).and_then(
                            |mut source| {
                                let mut chain = chain;
                                // The records an unaligned checkpoint overtook go first.
                                let mut replay = Vec::new();
                                let head_uid = chain.ops[0].uid.clone();
                                let in_flight: Vec<(u32, InFlightHandle)> = restore
                                    .iter()
                                    .filter(|((uid, old), _)| {
                                        uid == &head_uid && (rescale_from.is_some() || *old == s)
                                    })
                                    .filter_map(|((_, old), o)| {
                                        o.in_flight.clone().map(|h| (*old, h))
                                    })
                                    .collect();
                                if let Some(ck) = &chain.ckpt {
                                    for (old, h) in in_flight {
                                        let bytes =
                                            ck.restore_storage.get(&h.key)?.ok_or_else(|| {
                                                RuntimeError::damaged(format!(
                                                    "{} is missing: the checkpoint is damaged",
                                                    ck.restore_storage.describe(&h.key)
                                                ))
                                            })?;
                                        let records =
                                            crate::exchange::align::decode_in_flight(&bytes)
                                                .map_err(|e| {
                                                    RuntimeError::damaged(format!(
                                                        "{}: {e}",
                                                        ck.restore_storage.describe(&h.key)
                                                    ))
                                                })?;
                                        replay.extend(share_of_in_flight(
                                            records,
                                            &head,
                                            old,
                                            s,
                                            p,
                                            max_p,
                                            rescale_from.is_some(),
                                        ));
                                    }
                                }
                                if let Some(old_p) = rescale_from {
                                    let range =
                                        crate::keygroup::KeyGroupRange::of_subtask(max_p, p, s);
                                    for cop in &mut chain.ops {
                                        let states: Vec<(u32, serde_json::Value)> = restore
                                            .iter()
                                            .filter(|((uid, _), _)| uid == &cop.uid)
                                            .map(|((_, old), o)| {
                                                (*old, o.state.clone().unwrap_or_default())
                                            })
                                            .collect();
                                        if states.is_empty() {
                                            continue; // a new operator starts empty
                                        }
                                        let at = crate::operator::Rescale {
                                            uid: cop.uid.clone(),
                                            subtask: s,
                                            parallelism: p,
                                            old_parallelism: old_p,
                                            key_groups: (range.start, range.end),
                                        };
                                        match (cop.op.as_mut(), source.as_mut()) {
                                            (Some(op), _) => op.rescale(states, &at)?,
                                            (None, Some(src)) => src.rescale(states, &at)?,
                                            (None, None) => {}
                                        }
                                    }
                                    run_subtask(&mut chain, source, inbox, replay, &stop, &cancel)?;
                                    return Ok(chain);
                                }
                                for cop in &mut chain.ops {
                                    let state = restore
                                        .get(&(cop.uid.clone(), s))
                                        .and_then(|o| o.state.clone());
                                    match (cop.op.as_mut(), source.as_mut()) {
                                        (Some(op), _) => op.restore(state)?,
                                        (None, Some(src)) => {
                                            if let Some(st) = state {
                                                src.restore(st)?;
                                            }
                                        }
                                        (None, None) => {}
                                    }
                                }
                                run_subtask(&mut chain, source, inbox, replay, &stop, &cancel)?;
                                Ok(chain)
                            },
                        )
                    });
                    let r = std::panic::catch_unwind(run).unwrap_or_else(|p| {
                        Err(RuntimeError::internal(format!(
                            "{who} panicked: {}",
                            panic_message(p.as_ref())
                        )))
                    });
                    if r.is_err() {
                        cancel.store(true, Ordering::Relaxed);
                    }
                    r
                })
                .map_err(|e| RuntimeError::internal(format!("starting a thread: {e}")))?;
            threads.push(handle);
        }
    }
    // Only the subtasks hold senders and receivers now (and the network its route): a failed
    // subtask drops its receivers, its producers' sends fail, and the whole job unwinds.
    inboxes.clear();
    local_tx.clear();
    let running = network.map(|n| n.start(route, peer_ends));
    let mut first_error: Option<RuntimeError> = None;
    let mut chains = Vec::new();
    for h in threads {
        let r = h.join().unwrap_or_else(|_| Err(RuntimeError::internal("a subtask panicked")));
        match r {
            Ok(chain) => chains.push(chain),
            Err(e) => {
                cancel.store(true, Ordering::Relaxed);
                let cancel = e.message.starts_with("cancelled:");
                if first_error
                    .as_ref()
                    .is_none_or(|f| f.message.starts_with("cancelled:") && !cancel)
                {
                    first_error = Some(e);
                }
            }
        }
    }
    if first_error.is_none()
        && let Some(r) = running
    {
        r.finish();
    }
    // With checkpoints, the output of the final snapshot is committed once the coordinator
    // has completed the final checkpoint.
    // A job stopped with a savepoint has no final checkpoint: its sinks committed when the
    // savepoint completed.
    let stopped = chains.iter().any(|c| c.stopped.is_some());
    if first_error.is_none()
        && !stopped
        && let Some(ck) = &opts.checkpoints
    {
        while ck.completed.load(Ordering::Acquire) != FINAL {
            if cancel.load(Ordering::Relaxed) {
                first_error = Some(cancelled());
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if first_error.is_none() {
            for c in &mut chains {
                if let Err(e) = c.complete_final() {
                    first_error = Some(e);
                    break;
                }
            }
        }
    }
    for c in &mut chains {
        c.join_uploads();
    }
    *metrics.state.lock().unwrap_or_else(|e| e.into_inner()) = Default::default();
    drop(chains);
    if !opts.keep_state {
        for d in &own_dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        // The attempt's directory goes with the last of them.
        let _ = std::fs::remove_dir(&run_state);
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(RunSummary { elapsed: metrics.started.elapsed(), records: metrics.records() })
}

/// The in-flight records of old subtask `old` that subtask `s` of `p` replays: all of them
/// at the same parallelism; when rescaling, those of its key groups (keyed inputs) or of the
/// old subtasks dealt to it (others).
/// An error of a subtask's RocksDB instance: a corrupt file restored from storage is damage
/// that no restart heals.
fn state_error(uid: &str, subtask: u32, e: &str) -> RuntimeError {
    let msg = format!("state of {uid:?} subtask {subtask}: {e}");
    if e.contains("Corruption") {
        RuntimeError::damaged(format!("{msg}: the checkpoint it was restored from is damaged"))
    } else {
        RuntimeError::internal(msg)
    }
}

/// The message a panic was raised with.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn share_of_in_flight(
    records: InFlightRecords,
    head: &crate::plan::PlanOp,
    old: u32,
    s: u32,
    p: u32,
    max_p: u32,
    rescaling: bool,
) -> InFlightRecords {
    if !rescaling {
        return records;
    }
    if head.kind.is_global() {
        let owner = subtask_of(key_group_of(&[], max_p), max_p, p);
        return if owner == s { records } else { Vec::new() };
    }
    if head.key_positions.is_empty() {
        return if old % p == s { records } else { Vec::new() };
    }
    let mut scratch = [0u8; 8];
    records
        .into_iter()
        .map(|(input, batch)| {
            let k = head.key_positions[input as usize];
            let mine = batch
                .into_iter()
                .filter(|r| {
                    let g = key_group_of(r[k].key_bytes(&mut scratch), max_p);
                    subtask_of(g, max_p, p) == s
                })
                .collect();
            (input, mine)
        })
        .filter(|(_, b): &(u32, Vec<Record>)| !b.is_empty())
        .collect()
}

/// The source a task starts with, if it is a source task.
fn new_source(
    head: &crate::plan::PlanOp,
    index: usize,
    files: &[SourceFile],
    s3: Option<S3Client>,
    s: u32,
    p: u32,
    metrics: &JobMetrics,
) -> Result<Option<Box<dyn Source>>, RuntimeError> {
    if !head.inputs.is_empty() {
        return Ok(None);
    }
    let build = crate::operator::builtin::SourceBuild {
        op: head,
        index,
        subtask: s,
        parallelism: p,
        files,
        s3,
        metrics,
    };
    crate::operator::registry().make_source(build).map(Some)
}

fn run_subtask(
    chain: &mut Chain,
    source: Option<Box<dyn Source>>,
    mut inbox: Inbox,
    replay: InFlightRecords,
    stop: &AtomicBool,
    cancel: &AtomicBool,
) -> Result<(), RuntimeError> {
    let after_id = chain.ckpt.as_ref().map_or(0, |c| c.after_id);
    let wait = Duration::from_millis(10);
    if let Some(mut source) = source {
        let mut last_barrier = after_id;
        let mut forwarded = Forwarded::default();
        let mut last_watermark = Instant::now();
        // Unaligned from the start, or aligned until the outlets' alignment timeout.
        let unaligned = chain.unaligned_after == Some(0);
        let mut exhausted = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(cancelled());
            }
            if let Some(ck) = &chain.ckpt {
                let triggered = ck.triggered.load(Ordering::Acquire);
                while last_barrier < triggered && chain.stopped.is_none() {
                    last_barrier += 1;
                    let position = source.snapshot(last_barrier)?;
                    let savepoint = chain.ckpt.as_ref().and_then(|c| {
                        let s = c.savepoints.lock().unwrap_or_else(|e| e.into_inner());
                        s.get(&last_barrier).cloned()
                    });
                    let barrier = match savepoint {
                        // Savepoints are always aligned.
                        Some(t) => Barrier {
                            id: last_barrier,
                            ts: now_ms(),
                            unaligned: false,
                            savepoint: true,
                            stop: t.stop,
                        },
                        None => Barrier::checkpoint(last_barrier, now_ms(), unaligned),
                    };
                    chain.checkpoint(barrier, position, 0)?;
                }
                let told = chain.told_complete;
                chain.notify_complete()?;
                if chain.told_complete > told {
                    source.checkpoint_complete(chain.told_complete)?;
                }
            }
            if let Some(id) = chain.stopped {
                // The savepoint stops the job: no record after its barrier.
                chain.end_stopped(id, cancel)?;
                return source.checkpoint_complete(id);
            }
            chain.pump()?;
            if exhausted && !chain.holding() {
                break;
            }
            // While it waits too, so that a source whose splits go idle says so. An exhausted
            // source says nothing more: it has no splits left, which is not idleness (a
            // quiet input that holds no one back) but the end, which its `End` tells, after
            // the operators it feeds have let go of what they hold.
            if !exhausted
                && last_watermark.elapsed() >= Duration::from_millis(WATERMARK_EVERY_MS)
                && let Some(w) = source.watermark().and_then(|w| forwarded.offer(w))
            {
                last_watermark = Instant::now();
                chain.watermark(0, w)?;
            }
            if exhausted || !chain.output_ready() {
                // What a held-back operator let go leaves within 10 ms, not a batch later;
                // an exhausted source's subtask goes on taking barriers until its operators
                // have let go of everything they held.
                chain.maybe_flush()?;
                Inbox::default().wait(&chain.waiting_credits(), wait);
                continue;
            }
            let mut batch = Vec::with_capacity(BATCH);
            let more = source.poll(&mut batch, BATCH)?;
            let dropped = source.take_dropped();
            if dropped > 0 {
                let m = &chain.metrics.operators[chain.ops[0].plan_index].1;
                m.records_dropped.fetch_add(dropped, Ordering::Relaxed);
            }
            let polled = !batch.is_empty();
            if polled {
                chain.route(0, batch)?;
            }
            if polled
                && more
                && let Some(w) = source.watermark().and_then(|w| forwarded.offer(w))
            {
                last_watermark = Instant::now();
                chain.watermark(0, w)?;
            }
            exhausted = !more;
            chain.maybe_flush()?;
        }
        chain.finish(Some(&mut source), cancel)?;
        chain.ended_source = Some(source);
        return Ok(());
    }
    for (input, records) in replay {
        chain.check_input(input as usize, &records)?;
        chain.push(0, input as usize, records)?;
        loop {
            chain.pump()?;
            if chain.output_ready() {
                break;
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(cancelled());
            }
            Inbox::default().wait(&chain.waiting_credits(), wait);
        }
    }
    let settings = chain.ckpt.as_ref().map(|c| c.settings.clone());
    let exactly_once = settings.as_ref().is_none_or(|s| s.exactly_once);
    let mut aligner = Aligner::new(exactly_once, chain.unaligned_after, after_id);
    let mut clock = InputClock::new(inbox.channels.len());
    let mut actions = Vec::new();
    let mut last_tick = 0;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(cancelled());
        }
        chain.pump()?;
        // Take every message that has arrived: a barrier is seen however many batches are
        // ahead of it.
        let now = now_ms();
        for i in 0..inbox.channels.len() {
            while let Some(m) = inbox.receive(i) {
                if let Msg::Failed(e) = m {
                    // Fail at once, even from a channel held back for alignment.
                    return Err(e);
                }
                aligner.received(&mut inbox, i, m, now, &mut actions);
            }
        }
        if now != last_tick {
            // Timeouts are in milliseconds: look once a millisecond, not once a batch.
            last_tick = now;
            aligner.tick(&mut inbox, now, &mut actions);
        }
        chain.act(&mut actions)?;
        chain.notify_complete()?;
        if inbox.all_ended() {
            break;
        }
        match inbox.next(chain.output_ready()) {
            Some((_, Msg::Batch { input, records, credit })) => {
                chain.check_input(input as usize, &records)?;
                chain.push(0, input as usize, records)?;
                if let Some(c) = credit {
                    c.give();
                }
            }
            Some((ch, Msg::Barrier(b))) => aligner.barrier(&mut inbox, ch, b, &mut actions),
            Some((ch, Msg::Watermark(w))) => {
                if let Some(w) = clock.update(ch, w) {
                    chain.watermark(0, w)?;
                }
            }
            Some((ch, Msg::End)) => {
                aligner.ended(&mut inbox, &mut actions);
                if let Some(w) = clock.ended(ch) {
                    chain.watermark(0, w)?;
                }
            }
            Some((_, Msg::Failed(e))) => return Err(e),
            None => {
                chain.maybe_flush()?;
                inbox.wait(&chain.waiting_credits(), wait);
            }
        }
        chain.act(&mut actions)?;
    }
    match chain.stopped {
        Some(id) => chain.end_stopped(id, cancel),
        None => chain.finish(None, cancel),
    }
}
