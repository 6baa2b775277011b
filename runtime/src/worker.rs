//! A worker: connects to the coordinator, waits for the job, runs its subtasks and reports;
//! after a failure it stays connected and runs the next attempt the coordinator starts.
//!
//! The same function serves `weir worker` (a process per subtask index, in pods or started
//! by `weir run --processes`) and `weir run` (one worker thread running every subtask).

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth;
use crate::auth::JobSecret;
use crate::checkpoint::Restored;
use crate::control::{
    Assignment, HELLO_LIMIT, MESSAGE_LIMIT, PROTOCOL, Reader, ToCoordinator, ToWorker, Writer,
};
use crate::error::{RuntimeError, Whose};
use crate::exchange::Network;
use crate::exec::{AckEvent, CheckpointRun, FINAL, JobMetrics, Placement, RunOptions, run_worker};
use crate::storage::{Prefixed, Storage};

/// How long a worker keeps trying to reach the coordinator and the other workers, unless
/// told otherwise.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a worker reports its counters.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// `host:port` of the coordinator's control listener.
    pub coordinator: String,
    /// The subtask index this worker runs; `None` runs them all (no network exchange).
    pub index: Option<u32>,
    pub state_dir: PathBuf,
    /// Address to listen on for the other workers' exchange connections.
    pub data_bind: String,
    /// Host the other workers connect to (default: the IP of the bind address, or of the
    /// connection to the coordinator when bound to all interfaces).
    pub advertise_host: Option<String>,
    /// Set to stop this worker's sources (a signal to a worker process).
    pub stop: Arc<AtomicBool>,
    /// How long to keep trying to reach the coordinator and the other workers.
    pub connect_timeout: Duration,
    /// The job's secret: this worker proves it to the coordinator and to the other workers,
    /// and they to it.
    pub secret: JobSecret,
}

/// How an opening failed.
enum Opening {
    Io(std::io::Error),
    Refused(RuntimeError),
}

/// How long a worker waits for the coordinator's challenge.
const CHALLENGE_WAIT: Duration = Duration::from_secs(10);

/// Opens the control connection: the hello with this worker's challenge, the coordinator's
/// proof checked, and this worker's proof.
fn open(
    opts: &WorkerOptions,
    writer: &Writer,
    reader: &mut Reader,
    data_addr: String,
) -> Result<(), Opening> {
    let ours = auth::nonce();
    writer
        .send(&ToCoordinator::Hello {
            protocol: PROTOCOL,
            index: opts.index,
            data_addr: data_addr.clone(),
            nonce: auth::hex(&ours),
        })
        .map_err(Opening::Io)?;
    let deadline = Some(Instant::now() + CHALLENGE_WAIT);
    let refused = |why: String| {
        Opening::Refused(RuntimeError::user(format!(
            "the coordinator at {} {why}",
            opts.coordinator
        )))
    };
    let theirs = match reader.recv_by::<ToWorker>(deadline) {
        Ok(Some(ToWorker::Challenge { nonce, proof })) => {
            let nonce = auth::unhex::<{ auth::NONCE_LEN }>(&nonce);
            let proof = auth::unhex::<{ auth::PROOF_LEN }>(&proof);
            match (nonce, proof) {
                (Some(n), Some(p))
                    if auth::same(
                        &crate::control::coordinator_proof(&opts.secret, &ours, &n),
                        &p,
                    ) =>
                {
                    n
                }
                _ => {
                    return Err(refused(format!(
                        "did not prove the job's secret: give the coordinator and every worker the same {}",
                        auth::ENV
                    )));
                }
            }
        }
        Ok(Some(ToWorker::Refused { reason })) => {
            return Err(refused(format!("refused this worker: {reason}")));
        }
        Ok(Some(_)) => {
            return Err(refused(
                "did not answer with a challenge: run the same weir version".into(),
            ));
        }
        Ok(None) => {
            return Err(Opening::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed the connection",
            )));
        }
        Err(e) => return Err(Opening::Io(std::io::Error::other(e))),
    };
    let proof = crate::control::worker_proof(&opts.secret, &theirs, &ours, opts.index, &data_addr);
    writer.send(&ToCoordinator::Proof { proof: auth::hex(&proof) }).map_err(Opening::Io)
}

/// Runs one worker until its job ends. Errors are also reported to the coordinator.
pub fn run(opts: &WorkerOptions) -> Result<(), RuntimeError> {
    let listener = TcpListener::bind(&opts.data_bind).map_err(|e| {
        RuntimeError::user(format!("--data-addr {}: cannot listen: {e}", opts.data_bind))
    })?;
    let local = listener.local_addr().map_err(|e| RuntimeError::internal(e.to_string()))?;
    let deadline = Instant::now() + opts.connect_timeout;
    let io = |e: std::io::Error| {
        RuntimeError::external(format!("the connection to the coordinator broke: {e}")).retryable()
    };
    // A connection dropped during its opening (the coordinator was busy with many openings
    // at once, or restarted) is opened again until the deadline.
    let (writer, mut reader) = loop {
        let ctrl = loop {
            match TcpStream::connect(&opts.coordinator) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(RuntimeError::external(format!(
                        "cannot reach the coordinator at {} within {:?}: {e}",
                        opts.coordinator, opts.connect_timeout
                    ))
                    .retryable());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let host = match &opts.advertise_host {
            Some(h) => h.clone(),
            None if local.ip().is_unspecified() => ctrl
                .local_addr()
                .map(|a| a.ip().to_string())
                .map_err(|e| RuntimeError::internal(e.to_string()))?,
            None => local.ip().to_string(),
        };
        let data_addr = if host.contains(':') {
            format!("[{host}]:{}", local.port())
        } else {
            format!("{host}:{}", local.port())
        };
        let writer = Arc::new(Writer::new(ctrl.try_clone().map_err(io)?));
        let mut reader = Reader::new(ctrl, HELLO_LIMIT);
        match open(opts, &writer, &mut reader, data_addr) {
            Ok(()) => break (writer, reader),
            Err(Opening::Refused(e)) => return Err(e),
            Err(Opening::Io(e)) if Instant::now() >= deadline => return Err(io(e)),
            Err(Opening::Io(e)) => {
                eprintln!(
                    "weir: worker: opening the connection to the coordinator at {}: {e}; trying again",
                    opts.coordinator
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    reader.set_limit(MESSAGE_LIMIT);
    // The coordinator's messages: the job's start and end to this thread, the rest to the
    // attempt that runs.
    let current: Arc<Mutex<Option<AttemptCtl>>> = Arc::default();
    let (main_tx, main_rx) = crossbeam_channel::unbounded::<Option<ToWorker>>();
    {
        let (current, stop) = (current.clone(), opts.stop.clone());
        std::thread::spawn(move || {
            loop {
                let msg = reader.recv::<ToWorker>();
                let ctl = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match msg {
                    Ok(Some(ToWorker::Stop)) => stop.store(true, Ordering::Relaxed),
                    Ok(Some(ToWorker::Cancel)) => {
                        if let Some(c) = ctl {
                            c.cancel.store(true, Ordering::Relaxed);
                        }
                    }
                    Ok(Some(ToWorker::Trigger { id, savepoint })) => {
                        if let Some(c) = ctl {
                            // Known before the sources emit its barrier.
                            if let Some(sp) = savepoint {
                                c.savepoints
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(id, sp);
                            }
                            c.triggered.fetch_max(id, Ordering::AcqRel);
                        }
                    }
                    Ok(Some(ToWorker::Complete { id, final_ })) => {
                        if let Some(c) = ctl {
                            let id = if final_ { FINAL } else { id };
                            c.completed.fetch_max(id, Ordering::AcqRel);
                        }
                    }
                    Ok(Some(m)) => {
                        if main_tx.send(Some(m)).is_err() {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => {
                        // The coordinator is gone: nobody will take the results.
                        if let Some(c) = ctl {
                            c.cancel.store(true, Ordering::Relaxed);
                        }
                        let _ = main_tx.send(None);
                        return;
                    }
                }
            }
        });
    }
    let mut last: Option<Result<(), RuntimeError>> = None;
    loop {
        let msg = main_rx.recv().ok().flatten();
        let job = match msg {
            Some(ToWorker::Start(job)) => job,
            Some(ToWorker::Refused { reason }) => {
                return Err(RuntimeError::user(format!(
                    "the coordinator refused this worker: {reason}"
                )));
            }
            Some(ToWorker::Exit) => return last.unwrap_or(Ok(())),
            Some(other) => {
                return Err(RuntimeError::internal(format!("expected the job, got {other:?}")));
            }
            None => {
                return match last {
                    Some(r) => r,
                    None => {
                        Err(RuntimeError::external("the coordinator closed the connection")
                            .retryable())
                    }
                };
            }
        };
        let ctl = AttemptCtl {
            cancel: Arc::default(),
            triggered: Arc::new(AtomicU64::new(job.checkpoints.as_ref().map_or(0, |c| c.after_id))),
            completed: Arc::default(),
            savepoints: Arc::default(),
        };
        *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(ctl.clone());
        let result = run_job(opts, &job, &listener, &writer, &ctl);
        *current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let report = match &result {
            Ok(records) => {
                let Counts { records, dropped, late, user_metrics, connectors } = records.clone();
                ToCoordinator::Finished {
                    records,
                    dropped,
                    late,
                    user_metrics,
                    connectors,
                    attempt: job.attempt,
                }
            }
            Err(e) => ToCoordinator::Failed {
                message: e.message.clone(),
                user: e.whose == Whose::User,
                retryable: e.retryable,
                damaged: e.whose == Whose::Damaged,
                attempt: job.attempt,
            },
        };
        if let Err(e) = &result {
            eprintln!("weir: worker {}: attempt {}: {e}", opts.index.unwrap_or(0), job.attempt);
        }
        if writer.send(&report).is_err() {
            writer.shutdown();
            return result.map(|_| ());
        }
        last = Some(result.map(|_| ()));
    }
}

/// What the coordinator's messages change in the attempt that runs.
#[derive(Debug, Clone)]
struct AttemptCtl {
    cancel: Arc<AtomicBool>,
    triggered: Arc<AtomicU64>,
    completed: Arc<AtomicU64>,
    savepoints: crate::exec::SavepointTargets,
}

/// What a worker's subtasks counted, per operator in plan order: records in and out,
/// dropped and late, and the operators' own metrics.
#[derive(Debug, Clone)]
struct Counts {
    records: Vec<(u64, u64)>,
    dropped: Vec<u64>,
    late: Vec<u64>,
    user_metrics: Vec<(u32, crate::operator::metrics::UserMetric)>,
    connectors: Vec<(u32, u32, crate::connectors::stats::ConnectorStats)>,
}

fn run_job(
    opts: &WorkerOptions,
    job: &Assignment,
    listener: &TcpListener,
    writer: &Arc<Writer>,
    ctl: &AttemptCtl,
) -> Result<Counts, RuntimeError> {
    let plan = &job.plan;
    crate::plan::verify(plan).map_err(|e| {
        RuntimeError::internal(format!("the plan the coordinator handed over: {}", e.message))
    })?;
    let p = plan.parallelism;
    let worker_of = job.worker_of.clone();
    if worker_of.len() != p as usize {
        return Err(RuntimeError::internal("a placement that does not cover every subtask"));
    }
    let me = opts.index.unwrap_or_default();
    let hosted: Vec<u32> = (0..p).filter(|&s| worker_of[s as usize] == me).collect();
    let run_id = format!("{}-a{}", job.run_id, job.attempt);
    let mut run = RunOptions::new(&opts.state_dir, &run_id);
    run.job_id = job.job_id.clone();
    run.keep_state = job.keep_state;
    run.stop = opts.stop.clone();
    run.cancel = ctl.cancel.clone();
    // Acknowledgements go to the coordinator as the subtasks send them.
    let (acks_tx, acks_rx) = crossbeam_channel::unbounded::<AckEvent>();
    let forward = {
        let (writer, attempt) = (writer.clone(), job.attempt);
        std::thread::spawn(move || {
            for (id, r) in acks_rx {
                let msg = match r {
                    Ok(ack) => ToCoordinator::Ack { id, ack: Box::new(ack), attempt },
                    Err(e) => ToCoordinator::Decline { id, message: e.message, attempt },
                };
                if writer.send(&msg).is_err() {
                    return;
                }
            }
        })
    };
    if let Some(c) = &job.checkpoints {
        let root = crate::storage::open_uri(&c.storage, plan.s3.as_ref())?;
        let restore: Restored =
            c.restore.iter().map(|o| ((o.uid.clone(), o.subtask), o.clone())).collect();
        let storage: Arc<dyn Storage> = Arc::new(Prefixed::new(root, &c.job_dir));
        let restore_storage: Arc<dyn Storage> = match &c.restore_storage {
            Some(uri) => crate::storage::open_uri(uri, plan.s3.as_ref())?,
            None => storage.clone(),
        };
        run.checkpoints = Some(CheckpointRun {
            settings: c.settings.clone(),
            storage,
            restore: Arc::new(restore),
            restored_parallelism: c.restored_parallelism,
            restore_storage,
            restore_foreign: c.restore_storage.is_some(),
            stop_at_start: c.stop_at_start,
            after_id: c.after_id,
            triggered: ctl.triggered.clone(),
            completed: ctl.completed.clone(),
            savepoints: ctl.savepoints.clone(),
            s3: plan.s3.clone(),
            acks: acks_tx,
        });
    } else {
        drop(acks_tx);
    }
    let network = if hosted.len() == p as usize {
        None
    } else {
        let peers: HashMap<u32, String> = job
            .data_addrs
            .iter()
            .enumerate()
            .filter(|&(w, _)| w as u32 != me)
            .map(|(w, a)| (w as u32, a.clone()))
            .collect();
        Some(Network::connect(
            me,
            &peers,
            listener,
            &run_id,
            &opts.secret,
            opts.connect_timeout,
            &run.cancel,
        )?)
    };
    let metrics = Arc::new(JobMetrics::new(plan));
    let done = Arc::new(AtomicBool::new(false));
    let progress = {
        let (metrics, done, writer) = (metrics.clone(), done.clone(), writer.clone());
        std::thread::spawn(move || {
            let mut last = Instant::now();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                if last.elapsed() < PROGRESS_EVERY {
                    continue;
                }
                last = Instant::now();
                // The operators' own metrics before the engine's counts: what they counted
                // came from records the counts already hold (a counter of records judged is
                // never above the records in).
                let user_metrics = metrics.user_metrics();
                let records = metrics.records_in_order();
                let msg = ToCoordinator::Progress {
                    records,
                    state_bytes: metrics.state_bytes(),
                    dropped: metrics.dropped_in_order(),
                    late: metrics.late_in_order(),
                    subtask_state_bytes: metrics.subtask_state_bytes(),
                    watermarks: metrics.watermarks(),
                    user_metrics,
                    connectors: metrics.connector_stats(),
                };
                if writer.send(&msg).is_err() {
                    return;
                }
            }
        })
    };
    let placement = Placement { hosted, worker_of };
    let result = run_worker(plan, &run, &placement, network, metrics.clone());
    done.store(true, Ordering::Relaxed);
    let _ = progress.join();
    drop(run);
    let _ = forward.join();
    result.map(|_| Counts {
        records: metrics.records_in_order(),
        dropped: metrics.dropped_in_order(),
        late: metrics.late_in_order(),
        user_metrics: metrics.user_metrics(),
        connectors: metrics.connector_stats(),
    })
}
