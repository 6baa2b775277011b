//! `weir`: runs stream-processing jobs (`weir run FILE`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "weir", version, about = "Stateful stream processing")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the job of a StreamJob manifest locally.
    Run {
        /// The manifest (the same file `kubectl apply -f` takes).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Run { file } => match weir_runtime::load_manifest(&file) {
            Ok(job) => {
                let ops = &job.spec.pipeline.operators;
                println!(
                    "{}: a valid StreamJob with {} operators at parallelism {}.",
                    file.display(),
                    ops.len(),
                    job.spec.parallelism
                );
                println!(
                    "weir: the streaming engine is not built yet, so there is nothing to run."
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weir: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}
