//! The coordinator: takes the workers' hellos, hands out the job, watches it run, and
//! serves its state over HTTP.
//!
//! `weir run` starts a coordinator with one worker thread that runs every subtask (or, with
//! `--processes`, a `weir worker` child process per subtask index); in pods the coordinator
//! and the workers are started separately (`weir coordinator`, `weir worker`).

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, unbounded};
use weir_crds::StreamJobSpec;
use weir_crds::api::{JobInfo, JobState, OperatorInfo};

use crate::control::{Assignment, PROTOCOL, Reader, ToCoordinator, ToWorker, Writer};
use crate::error::{RuntimeError, Whose};
use crate::exec::RunSummary;
use crate::plan::Plan;

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
    /// `metadata.name` of the job.
    pub name: String,
    pub run_id: String,
    /// Where the workers connect (`127.0.0.1:0` picks a port).
    pub control_addr: String,
    pub launch: Launch,
    pub keep_state: bool,
    /// Set to stop the job: the workers stop their sources and flush.
    pub stop: Arc<AtomicBool>,
}

/// The job as the coordinator sees it; read by the HTTP API and the progress display.
#[derive(Debug)]
pub struct Status {
    pub info: Mutex<JobInfo>,
    pub started: Instant,
}

impl Status {
    pub fn new(name: &str, run_id: &str, plan: &Plan, workers_expected: u32) -> Self {
        Self {
            info: Mutex::new(JobInfo {
                name: name.to_string(),
                run_id: run_id.to_string(),
                state: JobState::Starting,
                parallelism: plan.parallelism,
                max_parallelism: plan.max_parallelism,
                workers_connected: 0,
                workers_expected,
                uptime_seconds: 0.0,
                state_bytes: 0,
                operators: plan
                    .ops
                    .iter()
                    .map(|o| OperatorInfo {
                        uid: o.uid.clone(),
                        type_: o.type_name.clone(),
                        records_in: 0,
                        records_out: 0,
                    })
                    .collect(),
                error: None,
            }),
            started: Instant::now(),
        }
    }

    /// A copy of the job's state, now.
    pub fn snapshot(&self) -> JobInfo {
        let mut i = self.info.lock().unwrap_or_else(|e| e.into_inner()).clone();
        i.uptime_seconds = self.started.elapsed().as_secs_f64();
        i
    }

    fn update(&self, f: impl FnOnce(&mut JobInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// A worker that said hello: its control connection and exchange address.
type Joined = (Arc<Writer>, Reader, String);

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

    /// Launches the workers (if it is its job), hands out the job and waits until it ends.
    pub fn run(self) -> Result<RunSummary, RuntimeError> {
        let addr = self.control_addr();
        let connect_to = if addr.ip().is_unspecified() {
            format!("127.0.0.1:{}", addr.port())
        } else {
            addr.to_string()
        };
        let mut children: Vec<Child> = Vec::new();
        let mut in_process = None;
        match &self.opts.launch {
            Launch::InProcess { state_dir } => {
                let wopts = crate::worker::WorkerOptions {
                    coordinator: connect_to,
                    index: None,
                    state_dir: state_dir.clone(),
                    data_bind: "127.0.0.1:0".into(),
                    advertise_host: None,
                    stop: Arc::default(),
                    connect_timeout: crate::worker::CONNECT_TIMEOUT,
                };
                in_process = Some(
                    std::thread::Builder::new()
                        .name("worker".into())
                        .spawn(move || crate::worker::run(&wopts))
                        .map_err(|e| RuntimeError::internal(format!("starting a thread: {e}")))?,
                );
            }
            Launch::Processes { exe, state_dir } => {
                for i in 0..self.plan.parallelism {
                    let child = std::process::Command::new(exe)
                        .args(["worker", "--coordinator", &connect_to, "--index", &i.to_string()])
                        .arg("--state-dir")
                        .arg(state_dir)
                        .args(["--data-addr", "127.0.0.1:0"])
                        .stdin(std::process::Stdio::null())
                        .spawn()
                        .map_err(|e| {
                            RuntimeError::internal(format!("starting {}: {e}", exe.display()))
                        })?;
                    children.push(child);
                }
            }
            Launch::External => {}
        }
        let result = self.drive(&mut children);
        if result.is_err() {
            // Workers that hang on (or never connected) go with the job.
            for c in &mut children {
                let _ = c.kill();
            }
        }
        for mut c in children {
            let _ = c.wait();
        }
        if let Some(t) = in_process {
            let _ = t.join();
        }
        result
    }

    fn drive(&self, children: &mut [Child]) -> Result<RunSummary, RuntimeError> {
        let p = self.plan.parallelism;
        let expected = workers_expected(&self.opts, &self.plan) as usize;
        let fail = |e: RuntimeError| {
            self.status.update(|i| {
                i.state = JobState::Failed;
                i.error = Some(e.message.clone());
            });
            e
        };
        // Hellos.
        let mut workers: Vec<Option<Joined>> = (0..expected).map(|_| None).collect();
        self.listener.set_nonblocking(true).map_err(|e| RuntimeError::internal(e.to_string()))?;
        let mut connected = 0;
        let mut last_wait_log = Instant::now();
        while connected < expected {
            if self.opts.stop.load(Ordering::Relaxed) {
                // Stopped before it started: nothing ran, nothing to flush.
                self.status.update(|i| i.state = JobState::Finished);
                for (w, slot) in workers.iter().enumerate() {
                    if let Some((writer, _, _)) = slot {
                        let _ = writer.send(&ToWorker::Refused {
                            reason: format!("the job was stopped before it started (worker {w})"),
                        });
                    }
                }
                eprintln!(
                    "weir: coordinator: stopped with {connected} of {expected} workers connected"
                );
                return Ok(RunSummary {
                    elapsed: self.status.started.elapsed(),
                    records: BTreeMap::new(),
                });
            }
            for (i, c) in children.iter_mut().enumerate() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(fail(RuntimeError::internal(format!(
                        "worker {i} exited ({st}) before the job started"
                    ))));
                }
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if last_wait_log.elapsed() > Duration::from_secs(30) {
                        eprintln!(
                            "weir: coordinator: {connected} of {expected} workers connected, waiting"
                        );
                        last_wait_log = Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => {
                    return Err(fail(RuntimeError::internal(format!("accepting workers: {e}"))));
                }
            };
            match self.hello(stream, expected) {
                Ok((slot, w)) if workers[slot].is_some() => {
                    let why = format!("a second worker with --index {slot}");
                    let _ = w.0.send(&ToWorker::Refused { reason: why.clone() });
                    eprintln!("weir: coordinator: refused a worker: {why}");
                }
                Ok((slot, w)) => {
                    workers[slot] = Some(w);
                    connected += 1;
                    self.status.update(|i| i.workers_connected = connected as u32);
                }
                Err(why) => eprintln!("weir: coordinator: refused a worker: {why}"),
            }
        }
        // The job.
        let worker_of: Vec<u32> = (0..p).map(|s| if expected == 1 { 0 } else { s }).collect();
        let data_addrs: Vec<String> =
            workers.iter().map(|w| w.as_ref().expect("all connected").2.clone()).collect();
        let start = ToWorker::Start(Box::new(Assignment {
            spec: self.spec.clone(),
            parallelism: p,
            max_parallelism: self.plan.max_parallelism,
            run_id: self.opts.run_id.clone(),
            worker_of,
            data_addrs,
            keep_state: self.opts.keep_state,
        }));
        let (tx, rx) = unbounded::<(usize, Result<Option<ToCoordinator>, String>)>();
        let mut writers = Vec::new();
        for (w, slot) in workers.into_iter().enumerate() {
            let (writer, mut reader, _) = slot.expect("all connected");
            writer.send(&start).map_err(|e| {
                fail(
                    RuntimeError::external(format!("sending the job to worker {w}: {e}"))
                        .retryable(),
                )
            })?;
            writers.push(writer);
            let tx = tx.clone();
            std::thread::spawn(move || {
                loop {
                    let m = reader.recv::<ToCoordinator>();
                    let end = !matches!(m, Ok(Some(_)));
                    if tx.send((w, m)).is_err() || end {
                        return;
                    }
                }
            });
        }
        drop(tx);
        self.status.update(|i| i.state = JobState::Running);
        let mut progress: Vec<(Vec<(u64, u64)>, u64)> = vec![(Vec::new(), 0); expected];
        let mut finished = vec![false; expected];
        let mut stopping = false;
        let cancel_all = |writers: &[Arc<Writer>]| {
            for w in writers {
                let _ = w.send(&ToWorker::Cancel);
            }
        };
        loop {
            if !stopping && self.opts.stop.load(Ordering::Relaxed) {
                stopping = true;
                self.status.update(|i| i.state = JobState::Stopping);
                for w in &writers {
                    let _ = w.send(&ToWorker::Stop);
                }
            }
            let (w, m) = match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(x) => x,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            match m {
                Ok(Some(ToCoordinator::Progress { records, state_bytes })) => {
                    progress[w] = (records, state_bytes);
                    self.publish(&progress);
                }
                Ok(Some(ToCoordinator::Finished { records })) => {
                    progress[w] = (records, 0);
                    finished[w] = true;
                    self.publish(&progress);
                    if finished.iter().all(|&f| f) {
                        break;
                    }
                }
                Ok(Some(ToCoordinator::Failed { message, user, retryable })) => {
                    cancel_all(&writers);
                    let whose = if user { Whose::User } else { Whose::External };
                    let e = RuntimeError {
                        whose,
                        retryable,
                        message: format!("worker {w}: {message}"),
                    };
                    return Err(fail(e));
                }
                Ok(Some(ToCoordinator::Hello { .. })) => {
                    cancel_all(&writers);
                    return Err(fail(RuntimeError::internal(format!(
                        "worker {w} said hello twice"
                    ))));
                }
                Ok(None) | Err(_) if finished[w] => {}
                Ok(None) | Err(_) => {
                    cancel_all(&writers);
                    let why = match m {
                        Err(e) => e,
                        _ => "closed the connection".into(),
                    };
                    return Err(fail(
                        RuntimeError::external(format!("worker {w} was lost: {why}")).retryable(),
                    ));
                }
            }
        }
        if !finished.iter().all(|&f| f) {
            return Err(fail(RuntimeError::internal("the workers went away before finishing")));
        }
        self.status.update(|i| {
            i.state = JobState::Finished;
            i.state_bytes = 0;
        });
        let records: BTreeMap<String, (u64, u64)> = self
            .status
            .snapshot()
            .operators
            .iter()
            .map(|o| (o.uid.clone(), (o.records_in, o.records_out)))
            .collect();
        Ok(RunSummary { elapsed: self.status.started.elapsed(), records })
    }

    /// Reads a worker's hello and says which slot it takes.
    fn hello(&self, s: TcpStream, expected: usize) -> Result<(usize, Joined), String> {
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
        let writer = Arc::new(Writer::new(s.try_clone().map_err(|e| e.to_string())?));
        let mut reader = Reader::new(s);
        let refuse = |why: String| {
            let _ = writer.send(&ToWorker::Refused { reason: why.clone() });
            why
        };
        let Some(ToCoordinator::Hello { protocol, index, data_addr }) = reader.recv()? else {
            return Err(refuse("the first message must be a hello".into()));
        };
        if protocol != PROTOCOL {
            return Err(refuse(format!(
                "protocol {protocol}; this coordinator speaks {PROTOCOL}: run the same weir version"
            )));
        }
        let slot = match (index, expected) {
            (None, 1) => 0,
            (Some(i), _) if (i as usize) < expected && expected > 1 => i as usize,
            (Some(0), 1) => 0,
            (Some(i), _) => {
                return Err(refuse(format!(
                    "--index {i} is not below the job's parallelism {}",
                    self.plan.parallelism
                )));
            }
            (None, _) => {
                return Err(refuse(
                    "a worker without --index, but the job needs one per subtask".into(),
                ));
            }
        };
        reader.get_ref().set_read_timeout(None).map_err(|e| e.to_string())?;
        Ok((slot, (writer, reader, data_addr)))
    }

    fn publish(&self, progress: &[(Vec<(u64, u64)>, u64)]) {
        self.status.update(|i| {
            for (k, op) in i.operators.iter_mut().enumerate() {
                op.records_in = progress.iter().filter_map(|p| p.0.get(k)).map(|r| r.0).sum();
                op.records_out = progress.iter().filter_map(|p| p.0.get(k)).map(|r| r.1).sum();
            }
            i.state_bytes = progress.iter().map(|p| p.1).sum();
        });
    }
}
