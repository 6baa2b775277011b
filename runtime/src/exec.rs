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
//! it through an exchange: batches over a bounded channel per receiving subtask, so that a slow
//! consumer blocks its producers (backpressure) instead of growing a queue. Keyed exchanges
//! send each record to the subtask that owns its key group; the others go to the subtask of
//! the same index. Subtask `i` of every operator is worker `i`, with one RocksDB instance.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::error::RuntimeError;
use crate::keygroup::{key_group_of, subtask_of};
use crate::objstore::S3Client;
use crate::operators::{
    Blackhole, FileSink, FileSource, Filter, GeneratorSource, KeyedAggregate, Map, Operator,
    SourceFile,
};
use crate::plan::{OpKind, Plan};
use crate::record::Record;
use crate::state::StateBackend;

/// Records per batch on an exchange.
pub const BATCH: usize = 1024;
/// Batches a receiving subtask buffers before its producers block.
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
}

/// Records in and out of each operator, updated as the job runs.
#[derive(Debug, Default)]
pub struct OpMetrics {
    pub records_in: AtomicU64,
    pub records_out: AtomicU64,
}

/// The live counters of a job.
#[derive(Debug)]
pub struct JobMetrics {
    pub operators: Vec<(String, OpMetrics)>,
    pub started: Instant,
}

impl JobMetrics {
    pub fn new(plan: &Plan) -> Self {
        Self {
            operators: plan.ops.iter().map(|o| (o.uid.clone(), OpMetrics::default())).collect(),
            started: Instant::now(),
        }
    }
}

enum Msg {
    Batch { input: u32, records: Vec<Record> },
    End,
}

/// An exchange from one operator of a task to the head of another task.
struct Edge {
    senders: Vec<Sender<Msg>>,
    input: u32,
    key: Option<usize>,
    buffers: Vec<Vec<Record>>,
}

impl Edge {
    fn send(&mut self, target: usize) -> Result<(), RuntimeError> {
        let records = std::mem::replace(&mut self.buffers[target], Vec::with_capacity(BATCH));
        if records.is_empty() {
            return Ok(());
        }
        self.senders[target]
            .send(Msg::Batch { input: self.input, records })
            .map_err(|_| cancelled())
    }
}

fn cancelled() -> RuntimeError {
    RuntimeError::internal("cancelled: another subtask of the job failed")
}

struct ChainOp {
    plan_index: usize,
    op: Option<Box<dyn Operator>>,
    /// Chained operators fed by this one (indexes in the chain).
    children: Vec<usize>,
    edges: Vec<Edge>,
}

/// One subtask of a task: its operators, in topological order (the head first).
struct Chain {
    ops: Vec<ChainOp>,
    subtask: u32,
    parallelism: u32,
    max_parallelism: u32,
    metrics: Arc<JobMetrics>,
    last_flush: Instant,
}

impl Chain {
    fn push(&mut self, idx: usize, input: usize, batch: Vec<Record>) -> Result<(), RuntimeError> {
        let m = &self.metrics.operators[self.ops[idx].plan_index].1;
        m.records_in.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let out = match self.ops[idx].op.as_mut() {
            Some(op) => {
                let mut out = Vec::with_capacity(batch.len());
                op.process(input, batch, &mut out)?;
                out
            }
            None => batch,
        };
        self.route(idx, out)
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
                Some(k) => {
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

    /// Sends every partly filled batch.
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

    /// Every input ended: finish the operators in order, then tell the downstream tasks.
    fn finish(&mut self) -> Result<(), RuntimeError> {
        for idx in 0..self.ops.len() {
            let mut out = Vec::new();
            if let Some(op) = self.ops[idx].op.as_mut() {
                op.finish(&mut out)?;
            }
            self.route(idx, out)?;
        }
        self.flush()?;
        for op in &self.ops {
            for edge in &op.edges {
                for s in &edge.senders {
                    s.send(Msg::End).map_err(|_| cancelled())?;
                }
            }
        }
        Ok(())
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
/// everything is flushed.
pub fn run_local(
    plan: &Plan,
    opts: &RunOptions,
    metrics: Arc<JobMetrics>,
) -> Result<RunSummary, RuntimeError> {
    let p = plan.parallelism;
    // Tasks: an operator joins its input's task unless it is a source, keyed, or has several
    // inputs.
    let mut task_of = vec![0usize; plan.ops.len()];
    let mut heads: Vec<usize> = Vec::new();
    for (i, op) in plan.ops.iter().enumerate() {
        if op.kind.is_source() || op.inputs.len() != 1 || op.kind.key_field().is_some() {
            task_of[i] = heads.len();
            heads.push(i);
        } else {
            task_of[i] = task_of[op.inputs[0]];
        }
    }
    // Checks and resources that must be in place before anything starts.
    let s3 = if plan.uses_s3() { Some(S3Client::new(plan.s3.as_ref())?) } else { None };
    let mut files_of: BTreeMap<usize, Vec<SourceFile>> = BTreeMap::new();
    for (i, op) in plan.ops.iter().enumerate() {
        if let OpKind::FileSource(f) = &op.kind {
            files_of.insert(i, crate::operators::list_source_files(&f.path, s3.as_ref())?);
        }
    }
    let keyed: Vec<String> =
        plan.ops.iter().filter(|o| o.kind.key_field().is_some()).map(|o| o.uid.clone()).collect();
    let run_state = opts.state_dir.join(&opts.run_id);
    let backends: Vec<Option<StateBackend>> = (0..p)
        .map(|s| {
            (!keyed.is_empty())
                .then(|| StateBackend::open(&run_state.join(format!("worker-{s}")), &keyed))
                .transpose()
                .map_err(|e| RuntimeError::internal(e.to_string()))
        })
        .collect::<Result<_, _>>()?;

    // A channel per (task, subtask), and how many senders each has.
    let mut channels: Vec<Vec<(Sender<Msg>, Receiver<Msg>)>> =
        heads.iter().map(|_| (0..p).map(|_| bounded(CHANNEL_BATCHES)).collect()).collect();
    let mut expected_ends = vec![0usize; heads.len()];
    for (t, &h) in heads.iter().enumerate() {
        // A keyed head hears from every upstream subtask, another head from one per input.
        let per_input = if plan.ops[h].kind.key_field().is_some() { p as usize } else { 1 };
        expected_ends[t] = plan.ops[h].inputs.len() * per_input;
    }

    let mut threads = Vec::new();
    for (t, &h) in heads.iter().enumerate() {
        let members: Vec<usize> = (0..plan.ops.len()).filter(|&i| task_of[i] == t).collect();
        for s in 0..p {
            let mut ops: Vec<ChainOp> = Vec::new();
            for &i in &members {
                let op = &plan.ops[i];
                let instance: Option<Box<dyn Operator>> = match &op.kind {
                    OpKind::Generator(_) | OpKind::FileSource(_) | OpKind::Socket(_) => None,
                    OpKind::Split(sp) => Some(Box::new(crate::operators::Split {
                        field: plan.ops[op.inputs[0]]
                            .fields
                            .iter()
                            .position(|f| f == &sp.field)
                            .unwrap_or(0),
                    })),
                    OpKind::Map(m) => Some(Box::new(Map::new(m, &plan.ops[op.inputs[0]].fields))),
                    OpKind::Filter(f) => {
                        Some(Box::new(Filter::new(f, &plan.ops[op.inputs[0]].fields)))
                    }
                    OpKind::Keyed { aggregate, field, .. } => {
                        let in_fields = &plan.ops[op.inputs[0]].fields;
                        let backend =
                            backends[s as usize].as_ref().expect("opened for keyed operators");
                        Some(Box::new(KeyedAggregate::new(
                            *aggregate,
                            op.key_positions[0],
                            field.as_ref().and_then(|f| in_fields.iter().position(|x| x == f)),
                            backend.value_state(&op.uid, plan.max_parallelism, STATE_CACHE_ENTRIES),
                        )))
                    }
                    OpKind::TumblingWindowCount(w) => {
                        Some(Box::new(crate::operators::TumblingWindowCount::new(
                            w,
                            &plan.ops[op.inputs[0]].fields,
                        )))
                    }
                    OpKind::Stdout => Some(Box::new(crate::operators::Stdout::default())),
                    OpKind::Blackhole => Some(Box::new(Blackhole)),
                    OpKind::FileSink(f) => {
                        Some(Box::new(FileSink::new(&f.path, s3.as_ref(), &opts.run_id, s)?))
                    }
                };
                ops.push(ChainOp {
                    plan_index: i,
                    op: instance,
                    children: Vec::new(),
                    edges: Vec::new(),
                });
            }
            // Wire chained children and exchanges.
            for (ci, &i) in members.iter().enumerate() {
                for (j, consumer) in plan.ops.iter().enumerate() {
                    for (input_no, &inp) in consumer.inputs.iter().enumerate() {
                        if inp != i {
                            continue;
                        }
                        if task_of[j] == t {
                            let cj = members.iter().position(|&m| m == j).unwrap();
                            ops[ci].children.push(cj);
                        } else {
                            let tt = task_of[j];
                            let key =
                                consumer.kind.key_field().map(|_| consumer.key_positions[input_no]);
                            ops[ci].edges.push(Edge {
                                senders: channels[tt].iter().map(|(tx, _)| tx.clone()).collect(),
                                input: input_no as u32,
                                key,
                                buffers: (0..p).map(|_| Vec::new()).collect(),
                            });
                        }
                    }
                }
            }
            let chain = Chain {
                ops,
                subtask: s,
                parallelism: p,
                max_parallelism: plan.max_parallelism,
                metrics: metrics.clone(),
                last_flush: Instant::now(),
            };
            let name = format!("{}-{s}", plan.ops[h].uid);
            let rx = channels[t][s as usize].1.clone();
            let head = plan.ops[h].clone();
            let files = files_of.get(&h).cloned().unwrap_or_default();
            let (stop, ends, s3) = (opts.stop.clone(), expected_ends[t], s3.clone());
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || -> Result<(), RuntimeError> {
                    let mut chain = chain;
                    if head.kind.is_source() {
                        let mut source: Box<dyn crate::operators::Source> = match &head.kind {
                            OpKind::Generator(g) => Box::new(GeneratorSource::new(g.clone(), s, p)),
                            OpKind::FileSource(f) => {
                                Box::new(FileSource::new(&files, s3, f.rate_per_second, s, p))
                            }
                            OpKind::Socket(so) => {
                                Box::new(crate::operators::SocketSource::new(&so.host, so.port, s)?)
                            }
                            _ => unreachable!("a source head"),
                        };
                        loop {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            let mut batch = Vec::with_capacity(BATCH);
                            let more = source.poll(&mut batch, BATCH)?;
                            if !batch.is_empty() {
                                chain.route(0, batch)?;
                            }
                            if !more {
                                break;
                            }
                            chain.maybe_flush()?;
                        }
                    } else {
                        let mut ended = 0;
                        while ended < ends {
                            let msg = match rx.recv_timeout(Duration::from_millis(10)) {
                                Ok(m) => m,
                                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                                    chain.flush()?;
                                    continue;
                                }
                                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                                    return Err(cancelled());
                                }
                            };
                            match msg {
                                Msg::Batch { input, records } => {
                                    chain.push(0, input as usize, records)?
                                }
                                Msg::End => ended += 1,
                            }
                            if rx.is_empty() {
                                chain.maybe_flush()?;
                            }
                        }
                    }
                    chain.finish()
                })
                .map_err(|e| RuntimeError::internal(format!("starting a thread: {e}")))?;
            threads.push(handle);
        }
    }
    // Only the subtasks hold senders and receivers now: a failed subtask drops its receiver,
    // its producers' sends fail, and the whole job unwinds.
    channels.clear();
    let mut first_error: Option<RuntimeError> = None;
    for h in threads {
        let r = h.join().unwrap_or_else(|_| Err(RuntimeError::internal("a subtask panicked")));
        if let Err(e) = r {
            let cancel = e.message.starts_with("cancelled:");
            if first_error.as_ref().is_none_or(|f| f.message.starts_with("cancelled:") && !cancel) {
                first_error = Some(e);
            }
        }
    }
    drop(backends);
    if !opts.keep_state {
        let _ = std::fs::remove_dir_all(&run_state);
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(RunSummary {
        elapsed: metrics.started.elapsed(),
        records: metrics
            .operators
            .iter()
            .map(|(uid, m)| {
                (
                    uid.clone(),
                    (m.records_in.load(Ordering::Relaxed), m.records_out.load(Ordering::Relaxed)),
                )
            })
            .collect(),
    })
}
