//! `weir`: runs stream-processing jobs.
//!
//! `weir run FILE` runs the job of a StreamJob manifest (the file `kubectl apply` takes) in
//! this process, every subtask a thread. Exit codes: 0 when the job finished (a bounded job
//! exhausted its sources, or it was stopped with Ctrl-C / SIGTERM), 2 when the manifest or
//! pipeline is refused before anything starts, 1 when the job failed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use weir_runtime::exec::{JobMetrics, RunOptions, run_local};

#[derive(Parser, Debug)]
#[command(name = "weir", version, about = "Stateful stream processing")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the job of a StreamJob manifest locally; flags override the manifest.
    Run {
        /// The manifest (the same file `kubectl apply -f` takes).
        file: PathBuf,
        /// Parallel subtasks (overrides spec.parallelism).
        #[arg(long)]
        parallelism: Option<u32>,
        /// Number of key groups (overrides spec.maxParallelism).
        #[arg(long)]
        max_parallelism: Option<u32>,
        /// Where the workers' RocksDB instances go.
        #[arg(long, default_value = "/var/tmp/weir/state")]
        state_dir: PathBuf,
        /// Keep the workers' state directories after the run.
        #[arg(long)]
        keep_state: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Run { file, parallelism, max_parallelism, state_dir, keep_state } => {
            run(file, parallelism, max_parallelism, state_dir, keep_state)
        }
    }
}

fn run(
    file: PathBuf,
    parallelism: Option<u32>,
    max_parallelism: Option<u32>,
    state_dir: PathBuf,
    keep_state: bool,
) -> ExitCode {
    let plan = match weir_runtime::load_manifest(&file)
        .and_then(|job| weir_runtime::plan::build(&job.spec, parallelism, max_parallelism))
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("weir: {e}");
            return ExitCode::from(2);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("weir: installing the signal handler: {e}");
        }
    }
    let run_id = format!(
        "{}-{:04x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
        std::process::id() & 0xffff
    );
    let opts = RunOptions { state_dir, run_id: run_id.clone(), stop, keep_state };
    let metrics = Arc::new(JobMetrics::new(&plan));
    eprintln!(
        "weir: running {} ({} operators, parallelism {}, {} key groups), run {run_id}",
        file.display(),
        plan.ops.len(),
        plan.parallelism,
        plan.max_parallelism
    );
    let done = Arc::new(AtomicBool::new(false));
    let progress = {
        let (metrics, done) = (metrics.clone(), done.clone());
        std::thread::spawn(move || report_progress(&metrics, &done))
    };
    let result = run_local(&plan, &opts, metrics);
    done.store(true, Ordering::Relaxed);
    let _ = progress.join();
    match result {
        Ok(summary) => {
            let per_op: Vec<String> = summary
                .records
                .iter()
                .map(|(uid, (i, o))| format!("{uid} {i} in / {o} out"))
                .collect();
            eprintln!(
                "weir: finished in {:.2} s: {}",
                summary.elapsed.as_secs_f64(),
                per_op.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weir: the job failed ({:?} error): {e}", e.whose);
            ExitCode::from(1)
        }
    }
}

/// Records per second in and out of each operator: a live line on a terminal, a log line
/// every 10 s otherwise.
fn report_progress(metrics: &JobMetrics, done: &AtomicBool) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty { Duration::from_secs(1) } else { Duration::from_secs(10) };
    let mut last: Vec<(u64, u64)> = vec![(0, 0); metrics.operators.len()];
    let mut last_t = Instant::now();
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if last_t.elapsed() < every {
            continue;
        }
        let dt = last_t.elapsed().as_secs_f64();
        last_t = Instant::now();
        let mut parts = Vec::new();
        for (k, (uid, m)) in metrics.operators.iter().enumerate() {
            let now = (m.records_in.load(Ordering::Relaxed), m.records_out.load(Ordering::Relaxed));
            let rate = |a: u64, b: u64| (a - b) as f64 / dt;
            parts.push(format!(
                "{uid} {:.0}/s in {:.0}/s out",
                rate(now.0, last[k].0),
                rate(now.1, last[k].1)
            ));
            last[k] = now;
        }
        let line =
            format!("[{:>6.1}s] {}", metrics.started.elapsed().as_secs_f64(), parts.join(" | "));
        if tty { eprint!("\r\x1b[2K{line}") } else { eprintln!("weir: {line}") }
    }
    if tty {
        eprint!("\r\x1b[2K");
    }
}
