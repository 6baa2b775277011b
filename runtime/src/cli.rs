//! The `weir` command, as a library: [`main`] runs it with the operator types of a
//! [`Registry`] (the stock binary's are the built-in ones; a user's binary adds its own and
//! accepts every command and flag the stock one does).
//!
//! `weir`: runs stream-processing jobs.
//!
//! - `weir run FILE` runs the job of a StreamJob manifest (the file `kubectl apply` takes)
//!   here: a coordinator and one worker thread running every subtask, or with `--processes`
//!   a `weir worker` child process per subtask index.
//! - `weir coordinator FILE` and `weir worker --coordinator ADDR --index I` are the same
//!   parts started separately, as the pods run them.
//! - `weir savepoint --api ADDR [--stop] [--dir DIR]` takes a savepoint of a running job
//!   through its coordinator's API and waits for it (the token in `WEIR_API_TOKEN`).
//! - `weir jobs|status|snapshots|rescale|suspend|resume ...` and `weir savepoint JOB ...`
//!   (without `--api`) are the commands for jobs under the operator: `weir` runs
//!   `kubectl-weir` with the same arguments (the runtime never talks to the Kubernetes API).
//!
//! Exit codes: 0 when the job finished (a bounded job exhausted its sources, or it was
//! stopped with Ctrl-C / SIGTERM), 2 when the manifest, the pipeline or a flag is refused
//! before anything starts, 1 when the job failed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::auth::JobSecret;
use crate::coordinator::{Coordinator, CoordinatorOptions, Launch, Status};
use crate::error::Whose;
use crate::operator::Registry;
use clap::{Parser, Subcommand};
use weir_crds::api::JobInfo;

#[derive(Parser, Debug)]
#[command(name = "weir", version, about = "Stateful stream processing")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug)]
struct JobArgs {
    /// The manifest (the same file `kubectl apply -f` takes).
    file: PathBuf,
    /// Parallel subtasks (overrides spec.parallelism).
    #[arg(long)]
    parallelism: Option<u32>,
    /// Number of key groups (overrides spec.maxParallelism).
    #[arg(long)]
    max_parallelism: Option<u32>,
    /// Serve the HTTP API on this address: `GET /v1/job`, `GET|POST /v1/checkpoints`,
    /// `GET|POST /v1/savepoints`, `GET /v1/savepoints/{id}`, `/metrics`, `/healthz`,
    /// `/readyz` (a POST needs the bearer token in `WEIR_API_TOKEN`).
    #[arg(long)]
    api_addr: Option<String>,
    /// Keep the workers' state directories after the run.
    #[arg(long)]
    keep_state: bool,
    /// Continue from the last completed checkpoint of this job in the checkpoint storage
    /// (or start from the beginning when there is none).
    #[arg(long)]
    resume: bool,
    /// With --resume: when the metadata of a checkpoint is damaged or was not written by this
    /// job, resume from the newest usable one (or from the beginning) instead of refusing.
    /// Output committed after that checkpoint is written again.
    #[arg(long, requires = "resume")]
    resume_from_older: bool,
    /// When restoring, drop the state of operators the pipeline no longer has (overrides
    /// spec.restore.allowNonRestoredState).
    #[arg(long)]
    allow_non_restored_state: bool,
    /// Where checkpoints go (`s3://bucket/prefix` or a directory), instead of
    /// spec.checkpointing.storage (default /var/tmp/weir/checkpoints).
    #[arg(long)]
    storage: Option<weir_crds::StorageUri>,
    /// Start from this savepoint or checkpoint (its directory or its `_metadata`, a local
    /// path or `s3://...`), at the job's parallelism; overrides spec.restore.path.
    #[arg(long, conflicts_with = "resume")]
    from_savepoint: Option<weir_crds::StorageUri>,
    /// Where keyed state lives: `rocksdb` or `heap` (overrides spec.stateBackend).
    #[arg(long, value_parser = state_backend)]
    state_backend: Option<weir_crds::streamjob::StateBackendKind>,
}

fn state_backend(s: &str) -> Result<weir_crds::streamjob::StateBackendKind, String> {
    use weir_crds::streamjob::StateBackendKind as K;
    [K::Rocksdb, K::Heap]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| format!("{s:?} is no state backend: give rocksdb or heap"))
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the job of a StreamJob manifest here; flags override the manifest.
    Run {
        #[command(flatten)]
        job: JobArgs,
        /// Where the workers' RocksDB instances go.
        #[arg(long, default_value = "/var/tmp/weir/state")]
        state_dir: PathBuf,
        /// Run each subtask index in a `weir worker` child process (exchanging over TCP).
        #[arg(long)]
        processes: bool,
    },
    /// Coordinate a job whose workers are started separately (`weir worker`).
    Coordinator {
        #[command(flatten)]
        job: JobArgs,
        /// Where the workers connect.
        #[arg(long, default_value = "0.0.0.0:6123")]
        control_addr: String,
        /// Names this run (state directories, part files); default: time and process id.
        #[arg(long)]
        run_id: Option<String>,
        /// Names the job in the checkpoint storage (stable across restarts of the
        /// coordinator); default: the run id.
        #[arg(long)]
        job_id: Option<String>,
        /// Run as in a pod: after the job ended (finished, failed or stopped into a
        /// savepoint), keep serving the HTTP API, which then reports how it ended, so the
        /// coordinator is not restarted into a job that is over; and on SIGTERM exit at once
        /// without ending the job, which the next coordinator resumes from its last
        /// checkpoint.
        #[arg(long)]
        stay_after_end: bool,
    },
    /// Take a savepoint of a running job and wait for it; its path goes to stdout.
    ///
    /// With --api: directly from the job's coordinator. Without it, `weir savepoint JOB
    /// [--stop] [-n NAMESPACE]` asks the operator for one through the Kubernetes API
    /// (`kubectl-weir savepoint`; see `kubectl weir savepoint --help`).
    ///
    /// Ctrl-C / SIGTERM stops the waiting, not the savepoint: exit code 130, and where to
    /// follow it (`GET /v1/savepoints/ID`) on stderr.
    Savepoint {
        /// The coordinator's API address (`host:port`, the job's `--api-addr`).
        #[arg(long)]
        api: String,
        /// Stop the job once the savepoint is complete (the sinks commit what came before it).
        #[arg(long)]
        stop: bool,
        /// Where the savepoint goes (`s3://bucket/prefix` or a directory), instead of
        /// spec.savepoints.directory.
        #[arg(long)]
        dir: Option<String>,
        /// How long to wait.
        #[arg(long, default_value = "15m")]
        timeout: weir_crds::Duration,
    },
    /// Run one subtask index of the job a coordinator hands out.
    Worker {
        /// `host:port` of the coordinator's control address.
        #[arg(long)]
        coordinator: String,
        /// The subtask index this worker runs (0 ≤ index < parallelism).
        #[arg(long, required_unless_present = "pod_name")]
        index: Option<u32>,
        /// Take the index from a StatefulSet pod's name: the number after its last `-`
        /// (`wordcount-worker-2` runs index 2).
        #[arg(long, env = "WEIR_POD_NAME", conflicts_with = "index")]
        pod_name: Option<String>,
        /// Where this worker's RocksDB instance goes.
        #[arg(long, default_value = "/var/tmp/weir/state")]
        state_dir: PathBuf,
        /// Where the other workers connect for the exchange.
        #[arg(long, default_value = "0.0.0.0:0")]
        data_addr: String,
        /// Host name or IP the other workers use to reach this one (default: the address
        /// this worker reaches the coordinator from).
        #[arg(long, env = "WEIR_ADVERTISE_HOST")]
        advertise_host: Option<String>,
        /// How long to keep trying to reach the coordinator and the other workers.
        #[arg(long, env = "WEIR_CONNECT_TIMEOUT", default_value = "60s")]
        connect_timeout: weir_crds::Duration,
    },
    /// List the operator's StreamJobs (runs kubectl-weir jobs).
    Jobs(Forwarded),
    /// Show a StreamJob's status (runs kubectl-weir status).
    Status(Forwarded),
    /// List StreamSnapshots (runs kubectl-weir snapshots).
    Snapshots(Forwarded),
    /// Change a StreamJob's parallelism (runs kubectl-weir rescale).
    Rescale(Forwarded),
    /// Suspend a StreamJob (runs kubectl-weir suspend).
    Suspend(Forwarded),
    /// Resume a StreamJob (runs kubectl-weir resume).
    Resume(Forwarded),
}

/// The arguments of a command `weir` hands to `kubectl-weir` as they are.
#[derive(clap::Args, Debug)]
#[command(disable_help_flag = true)]
struct Forwarded {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<std::ffi::OsString>,
}

/// The commands for jobs under the operator, which `kubectl-weir` has.
const FORWARDED: [&str; 6] = ["jobs", "status", "snapshots", "rescale", "suspend", "resume"];

/// Whether `weir` hands this command line to `kubectl-weir`: one of [`FORWARDED`], or a
/// savepoint without `--api` (with it, `weir savepoint` asks the coordinator itself).
fn forwarded(args: &[std::ffi::OsString]) -> bool {
    let Some(cmd) = args.get(1).and_then(|a| a.to_str()) else { return false };
    if FORWARDED.contains(&cmd) {
        return true;
    }
    cmd == "savepoint"
        && !args[2..]
            .iter()
            .map(|a| a.to_string_lossy())
            .any(|a| a == "--api" || a.starts_with("--api=") || a == "-h" || a == "--help")
}

/// `kubectl-weir`: next to this program first (they are installed together), else on PATH.
fn kubectl_weir() -> Option<PathBuf> {
    const NAME: &str = "kubectl-weir";
    let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join(NAME)));
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(NAME)).collect::<Vec<_>>())
        .unwrap_or_default();
    beside.into_iter().chain(on_path).find(|p| p.is_file())
}

/// Replaces this process with `kubectl-weir` and the arguments after `weir`.
fn forward(args: &[std::ffi::OsString]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let cmd = args.get(1).map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
    let Some(exe) = kubectl_weir() else {
        eprintln!(
            "weir: `weir {cmd}` runs kubectl-weir, which is neither next to weir nor on PATH: install kubectl-weir (cargo install --path cli, or copy the kubectl-weir binary onto PATH)"
        );
        return ExitCode::from(1);
    };
    let e = std::process::Command::new(&exe).args(&args[1..]).exec();
    eprintln!("weir: running {}: {e}", exe.display());
    ExitCode::from(1)
}

/// Runs the `weir` command with the operator types of `registry`: the whole of a user's
/// `main`, for a binary of their own operators:
///
/// ```no_run
/// use weir_runtime::operator::Registry;
/// fn main() -> std::process::ExitCode {
///     weir_runtime::main(Registry::builtin())
/// }
/// ```
pub fn main(registry: Registry) -> ExitCode {
    if let Err(e) = crate::operator::install(registry) {
        eprintln!("weir: {e}");
        return ExitCode::from(2);
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("weir: installing the signal handler: {e}");
        }
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if forwarded(&args) {
        return forward(&args);
    }
    match Cli::parse().cmd {
        // Handed over above; here only if clap took a command line `forwarded` did not.
        Cmd::Jobs(_)
        | Cmd::Status(_)
        | Cmd::Snapshots(_)
        | Cmd::Rescale(_)
        | Cmd::Suspend(_)
        | Cmd::Resume(_) => forward(&args),
        Cmd::Run { job, state_dir, processes } => {
            let launch = if processes {
                match std::env::current_exe() {
                    Ok(exe) => Launch::Processes { exe, state_dir },
                    Err(e) => {
                        eprintln!("weir: finding this program to start workers: {e}");
                        return ExitCode::from(1);
                    }
                }
            } else {
                Launch::InProcess { state_dir }
            };
            // Its own workers get it from this process; given one, the job's checkpoints are
            // signed with it, and a later --resume checks them.
            let secret = match std::env::var_os(crate::auth::ENV) {
                Some(_) => match JobSecret::from_env("run") {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("weir: {e}");
                        return ExitCode::from(2);
                    }
                },
                None => JobSecret::generate(),
            };
            coordinate(job, launch, "127.0.0.1:0".into(), None, None, false, stop, secret)
        }
        Cmd::Coordinator { job, control_addr, run_id, job_id, stay_after_end } => {
            let secret = match JobSecret::from_env("coordinator") {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("weir: {e}");
                    return ExitCode::from(2);
                }
            };
            if stay_after_end {
                exit_on_signal(&stop, "coordinator");
            }
            coordinate(
                job,
                Launch::External,
                control_addr,
                run_id,
                job_id,
                stay_after_end,
                stop,
                secret,
            )
        }
        Cmd::Savepoint { api, stop: stop_job, dir, timeout } => {
            let token = std::env::var("WEIR_API_TOKEN").ok();
            let r = crate::client::Api::new(&api, token).and_then(|api| {
                let (dir, timeout) = (dir.as_deref(), timeout.as_std());
                crate::client::take_savepoint(&api, stop_job, dir, timeout, &stop)
            });
            match r {
                Ok(sp) => {
                    println!("{}", sp.path.unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("weir: {e}");
                    // 130: stopped waiting at Ctrl-C / SIGTERM (the savepoint goes on).
                    let code = if stop.load(Ordering::Relaxed) {
                        130
                    } else if e.whose == Whose::User {
                        2
                    } else {
                        1
                    };
                    ExitCode::from(code)
                }
            }
        }
        Cmd::Worker {
            coordinator,
            index,
            pod_name,
            state_dir,
            data_addr,
            advertise_host,
            connect_timeout,
        } => {
            // A worker that `weir run --processes` started goes when its parent goes, so that
            // no worker of a killed run writes on beside the next one.
            if std::env::var_os("WEIR_DIE_WITH_PARENT").is_some() {
                let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            }
            // A StatefulSet's worker outlives runs: when its job ends (an upgrade stopped it
            // into a savepoint) or its coordinator goes, it waits for the next coordinator
            // instead of exiting into the kubelet's restart back-off.
            let outlives_runs = pod_name.is_some();
            let secret = match JobSecret::from_env("worker") {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("weir: worker: {e}");
                    return ExitCode::from(2);
                }
            };
            if outlives_runs {
                exit_on_signal(&stop, "worker");
            }
            let index = match (index, pod_name) {
                (Some(i), _) => i,
                (None, Some(name)) => match index_of_pod(&name) {
                    Some(i) => i,
                    None => {
                        eprintln!(
                            "weir: worker: --pod-name {name:?} does not end in -<index> (as a StatefulSet's pods do): give --index"
                        );
                        return ExitCode::from(2);
                    }
                },
                (None, None) => unreachable!("clap requires --index or --pod-name"),
            };
            let opts = crate::worker::WorkerOptions {
                coordinator,
                index: Some(index),
                state_dir,
                data_bind: data_addr,
                advertise_host,
                stop,
                connect_timeout: connect_timeout.as_std(),
                secret,
            };
            loop {
                let r = crate::worker::run(&opts);
                if outlives_runs && opts.stop.load(Ordering::Relaxed) {
                    // SIGTERM ended the run: the signal's exit, whatever the run's end said
                    // (its thread may not have come round yet).
                    terminated("worker");
                }
                let again = outlives_runs
                    && !opts.stop.load(Ordering::Relaxed)
                    && r.as_ref().err().is_none_or(|e| e.retryable);
                match r {
                    Ok(()) if again => {
                        eprintln!("weir: worker {index}: the run ended; waiting for the next one")
                    }
                    Ok(()) => return ExitCode::SUCCESS,
                    Err(e) if again => eprintln!("weir: worker {index}: {e}; joining the next run"),
                    Err(e) => {
                        eprintln!("weir: worker {index}: {e}");
                        return ExitCode::from(if e.whose == Whose::User { 2 } else { 1 });
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
}

/// In a pod, SIGTERM (the pod deleted, a rollout, a node drained) ends the process at once,
/// without ending the job: the job resumes from its last completed checkpoint in the next
/// coordinator, as after a crash (ending it like an exhausted source would finish it).
fn exit_on_signal(stop: &Arc<AtomicBool>, who: &'static str) {
    let stop = stop.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        terminated(who);
    });
}

/// Ends the process as SIGTERM does in a pod: exit code 143.
fn terminated(who: &str) -> ! {
    eprintln!("weir: {who}: terminated; the job goes on from its last checkpoint");
    std::process::exit(143);
}

/// The index in a StatefulSet pod's name (`job-worker-12` → 12).
fn index_of_pod(name: &str) -> Option<u32> {
    name.rsplit_once('-').and_then(|(_, i)| i.parse().ok())
}

/// How long a coordinator stays after a job stopped into a savepoint, for its result to be
/// read.
const LINGER: Duration = Duration::from_secs(60);

#[allow(clippy::too_many_arguments)]
fn coordinate(
    job: JobArgs,
    launch: Launch,
    control_addr: String,
    run_id: Option<String>,
    job_id: Option<String>,
    stay_after_end: bool,
    stop: Arc<AtomicBool>,
    secret: JobSecret,
) -> ExitCode {
    let (manifest, plan) = match crate::load_manifest(&job.file).and_then(|mut m| {
        if let Some(b) = job.state_backend {
            m.spec.state_backend = b;
        }
        let plan = crate::plan::build(&m.spec, job.parallelism, job.max_parallelism)?;
        Ok((m, plan))
    }) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("weir: {e}");
            return ExitCode::from(2);
        }
    };
    let run_id = run_id.unwrap_or_else(|| {
        format!(
            "{}-{:04x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
            std::process::id() & 0xffff
        )
    });
    let name = manifest.metadata.name.clone().unwrap_or_default();
    let ways = match &launch {
        Launch::InProcess { .. } => "in this process".to_string(),
        Launch::Processes { .. } => format!("{} worker processes", plan.parallelism),
        Launch::External => "workers started separately".to_string(),
    };
    let namespace = manifest.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let stop_after = stop.clone();
    let opts = CoordinatorOptions {
        name,
        namespace,
        run_id: run_id.clone(),
        job_id,
        control_addr,
        launch,
        keep_state: job.keep_state,
        stop,
        resume: job.resume,
        resume_from_older: job.resume_from_older,
        allow_non_restored_state: job.allow_non_restored_state,
        storage: job.storage.clone(),
        from: job.from_savepoint.clone(),
        secret,
    };
    // The workers build the same plan from the spec and the parallelism the job runs at.
    let coordinator = match Coordinator::bind(manifest.spec.clone(), plan.clone(), opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weir: {e}");
            return ExitCode::from(2);
        }
    };
    let status = coordinator.status.clone();
    if let Some(addr) = &job.api_addr {
        match crate::api::serve(addr, status.clone()) {
            Ok(bound) => eprintln!("weir: HTTP API on http://{bound}"),
            Err(e) => {
                eprintln!("weir: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let control = coordinator.control_addr();
    let done = Arc::new(AtomicBool::new(false));
    let mut progress = None;
    // Once the job is ready to start (its checkpoint to restore found and checked): a
    // refusal before that says only why.
    let result = coordinator.run(|| {
        eprintln!(
            "weir: running {} ({} operators, parallelism {}, {} key groups, {ways}), run {run_id}, control {control}",
            job.file.display(),
            plan.ops.len(),
            plan.parallelism,
            plan.max_parallelism,
        );
        let (status, done) = (status.clone(), done.clone());
        progress = Some(std::thread::spawn(move || report_progress(&status, &done)));
    });
    done.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.join();
    }
    // Whoever stopped the job into a savepoint learns where it is before the API goes.
    if job.api_addr.is_some()
        && let Some(id) = status.unread_stop_savepoint()
    {
        eprintln!(
            "weir: waiting up to {} s for the path of savepoint {id} to be read (GET /v1/savepoints/{id})",
            LINGER.as_secs()
        );
        let t = Instant::now();
        while t.elapsed() < LINGER && status.unread_stop_savepoint().is_some() {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Let the answer go out.
        std::thread::sleep(Duration::from_millis(100));
    }
    if stay_after_end && job.api_addr.is_some() {
        eprintln!("weir: the job is over; serving its final state until SIGTERM");
        while !stop_after.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    match result {
        Ok(summary) => {
            let info_at_end = status.snapshot();
            let per_op: Vec<String> = summary
                .records
                .iter()
                .map(|(uid, (i, o))| {
                    let op = info_at_end.operators.iter().find(|op| &op.uid == uid);
                    let dropped = op.map_or(0, |op| op.records_dropped);
                    let late = op.map_or(0, |op| op.records_late);
                    let mut line = format!("{uid} {i} in / {o} out");
                    match (dropped, late) {
                        (0, 0) => {}
                        (d, 0) => line.push_str(&format!(" ({d} dropped: not usable)")),
                        (0, l) => line.push_str(&format!(" ({l} late)")),
                        (d, l) => line.push_str(&format!(" ({d} dropped: not usable, {l} late)")),
                    }
                    line
                })
                .collect();
            let restarts = info_at_end.restarts;
            let how = if stop_after.load(Ordering::Relaxed) {
                "stopped (Ctrl-C / SIGTERM; --resume goes on from its last checkpoint) after"
            } else {
                "finished in"
            };
            eprintln!(
                "weir: {how} {:.2} s: {}{}",
                summary.elapsed.as_secs_f64(),
                per_op.join(", "),
                if restarts > 0 {
                    format!(" (counted since the last of {restarts} restarts)")
                } else {
                    String::new()
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weir: the job failed ({:?} error): {e}", e.whose);
            // A job refused before any attempt started (say, a checkpoint that does not fit).
            let info = status.snapshot();
            let refused =
                e.whose == Whose::User && info.restarts == 0 && info.workers_connected == 0;
            ExitCode::from(if refused { 2 } else { 1 })
        }
    }
}

/// Records per second in and out of each operator and the state size: a live line on a
/// terminal, a log line every 10 s otherwise.
fn report_progress(status: &Status, done: &AtomicBool) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty { Duration::from_secs(1) } else { Duration::from_secs(10) };
    let mut last: JobInfo = status.snapshot();
    let mut last_t = Instant::now();
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if last_t.elapsed() < every {
            continue;
        }
        let dt = last_t.elapsed().as_secs_f64();
        last_t = Instant::now();
        let now = status.snapshot();
        let mut parts = Vec::new();
        for (op, before) in now.operators.iter().zip(&last.operators) {
            let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
            parts.push(format!(
                "{} {:.0}/s in {:.0}/s out",
                op.uid,
                rate(op.records_in, before.records_in),
                rate(op.records_out, before.records_out)
            ));
        }
        let checkpoint = match &now.last_checkpoint {
            Some(c) => format!(
                " | checkpoint {} {:.0}s ago",
                c.id,
                (crate::checkpoint::now_ms().saturating_sub(c.trigger_time + c.duration_ms)) as f64
                    / 1000.0
            ),
            None => String::new(),
        };
        let line = format!(
            "[{:>6.1}s] {} | state {:.1} MiB{checkpoint}",
            now.uptime_seconds,
            parts.join(" | "),
            now.state_bytes as f64 / (1024.0 * 1024.0)
        );
        last = now;
        if tty { eprint!("\r\x1b[2K{line}") } else { eprintln!("weir: {line}") }
    }
    if tty {
        eprint!("\r\x1b[2K");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(args: &[&str]) -> Vec<std::ffi::OsString> {
        std::iter::once("weir").chain(args.iter().copied()).map(Into::into).collect()
    }

    #[test]
    fn the_commands_for_jobs_under_the_operator_go_to_kubectl_weir() {
        for cmd in FORWARDED {
            assert!(forwarded(&line(&[cmd, "wc", "-n", "prod"])), "{cmd}");
        }
        assert!(forwarded(&line(&["savepoint", "wc"])));
        assert!(forwarded(&line(&["savepoint", "wc", "--stop", "-n", "prod"])));
        // With --api, weir asks the coordinator itself.
        assert!(!forwarded(&line(&["savepoint", "--api", "127.0.0.1:8081"])));
        assert!(!forwarded(&line(&["savepoint", "--api=127.0.0.1:8081", "--stop"])));
        assert!(!forwarded(&line(&["savepoint", "--help"])));
        assert!(!forwarded(&line(&["run", "job.yaml"])));
        assert!(!forwarded(&line(&[])));
    }

    #[test]
    fn help_lists_the_forwarded_commands() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let help = Cli::command().render_help().to_string();
        for cmd in FORWARDED {
            assert!(help.contains(&format!("  {cmd} ")), "{cmd} in:\n{help}");
        }
    }
}
