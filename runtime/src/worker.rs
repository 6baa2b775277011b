//! A worker: connects to the coordinator, waits for the job, runs its subtasks and reports.
//!
//! The same function serves `weir worker` (a process per subtask index, in pods or started
//! by `weir run --processes`) and `weir run` (one worker thread running every subtask).

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::control::{Assignment, PROTOCOL, Reader, ToCoordinator, ToWorker, Writer};
use crate::error::{RuntimeError, Whose};
use crate::exchange::Network;
use crate::exec::{JobMetrics, Placement, RunOptions, run_worker};

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
}

/// Runs one worker until its job ends. Errors are also reported to the coordinator.
pub fn run(opts: &WorkerOptions) -> Result<(), RuntimeError> {
    let listener = TcpListener::bind(&opts.data_bind).map_err(|e| {
        RuntimeError::user(format!("--data-addr {}: cannot listen: {e}", opts.data_bind))
    })?;
    let local = listener.local_addr().map_err(|e| RuntimeError::internal(e.to_string()))?;
    let deadline = Instant::now() + opts.connect_timeout;
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
    let io = |e: std::io::Error| {
        RuntimeError::external(format!("the connection to the coordinator broke: {e}")).retryable()
    };
    let writer = Arc::new(Writer::new(ctrl.try_clone().map_err(io)?));
    let mut reader = Reader::new(ctrl);
    writer
        .send(&ToCoordinator::Hello { protocol: PROTOCOL, index: opts.index, data_addr })
        .map_err(io)?;
    let start = match reader.recv::<ToWorker>() {
        Ok(Some(m)) => m,
        Ok(None) => {
            return Err(RuntimeError::external("the coordinator closed the connection").retryable());
        }
        Err(e) => return Err(RuntimeError::external(format!("from the coordinator: {e}"))),
    };
    let job = match start {
        ToWorker::Start(job) => job,
        ToWorker::Refused { reason } => {
            return Err(RuntimeError::user(format!(
                "the coordinator refused this worker: {reason}"
            )));
        }
        other => {
            return Err(RuntimeError::internal(format!("expected the job, got {other:?}")));
        }
    };
    let result = run_job(opts, &job, &listener, &writer, reader);
    let report = match &result {
        Ok(records) => ToCoordinator::Finished { records: records.clone() },
        Err(e) => ToCoordinator::Failed {
            message: e.message.clone(),
            user: e.whose == Whose::User,
            retryable: e.retryable,
        },
    };
    let _ = writer.send(&report);
    writer.shutdown();
    result.map(|_| ())
}

fn run_job(
    opts: &WorkerOptions,
    job: &Assignment,
    listener: &TcpListener,
    writer: &Arc<Writer>,
    mut reader: Reader,
) -> Result<Vec<(u64, u64)>, RuntimeError> {
    let p = job.parallelism;
    let plan = crate::plan::build(&job.spec, Some(p), Some(job.max_parallelism))
        .map_err(|e| RuntimeError::user(e.0))?;
    let worker_of = job.worker_of.clone();
    if worker_of.len() != p as usize {
        return Err(RuntimeError::internal("a placement that does not cover every subtask"));
    }
    let me = opts.index.unwrap_or_default();
    let hosted: Vec<u32> = (0..p).filter(|&s| worker_of[s as usize] == me).collect();
    let mut run = RunOptions::new(&opts.state_dir, &job.run_id);
    run.keep_state = job.keep_state;
    run.stop = opts.stop.clone();
    // Messages from the coordinator while the job runs.
    {
        let (stop, cancel) = (run.stop.clone(), run.cancel.clone());
        std::thread::spawn(move || {
            loop {
                match reader.recv::<ToWorker>() {
                    Ok(Some(ToWorker::Stop)) => stop.store(true, Ordering::Relaxed),
                    Ok(Some(_)) | Ok(None) | Err(_) => {
                        // Cancelled, or the coordinator is gone: nobody will take the results.
                        cancel.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            }
        });
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
            &job.run_id,
            opts.connect_timeout,
            &run.cancel,
        )?)
    };
    let metrics = Arc::new(JobMetrics::new(&plan));
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
                let records = metrics.records_in_order();
                let msg = ToCoordinator::Progress { records, state_bytes: metrics.state_bytes() };
                if writer.send(&msg).is_err() {
                    return;
                }
            }
        })
    };
    let placement = Placement { hosted, worker_of };
    let result = run_worker(&plan, &run, &placement, network, metrics.clone());
    done.store(true, Ordering::Relaxed);
    let _ = progress.join();
    result.map(|_| metrics.records_in_order())
}
