//! `kubectl-weir` (run as `kubectl weir ...`): Weir's command line for people, which reads
//! and changes StreamJobs through the Kubernetes API, like kubectl does, and nothing else.
//!
//! It is a crate of its own because the runtime never talks to the Kubernetes API; `weir`
//! forwards these commands to it. Every change is a merge patch of a spec field that the
//! controller then acts on (the controller is the only one that talks to a job's
//! coordinator); the commands that wait watch the status the controller writes.
//!
//! Exit codes: 0 done, 1 failed (the message says why and what to do), 2 a usage error.

mod change;
mod cluster;
mod format;
mod show;
mod wait;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::Value;
use weir_crds::snapshot::StreamSnapshot;
use weir_crds::streamjob::{DesiredState, UpgradeMode};
use weir_crds::{LABEL_JOB, StreamJob};

use crate::cluster::{Cluster, Target};
use crate::wait::SavepointWait;

const GITOPS: &str = "\
Changes are merge patches of the StreamJob's spec, as `kubectl patch` makes them. A GitOps tool
(Argo CD, Flux) that manages the StreamJob sees them as drift and reverts them on its next sync
unless the same change is made in git: there, change the manifest instead (a savepoint's
trigger nonce included).";

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-weir",
    bin_name = "kubectl weir",
    version,
    about = "Look at and steer Weir's StreamJobs: jobs, status, savepoints, rescale, suspend and resume",
    after_help = GITOPS
)]
struct Cli {
    /// The namespace (default: the kubeconfig context's, else "default").
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true)]
    context: Option<String>,
    /// The kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone, Copy)]
struct WaitArgs {
    /// Wait until the controller has done it, with progress on stderr.
    #[arg(long)]
    wait: bool,
    /// How long to wait (500ms, 30s, 5m, 1h).
    #[arg(long, default_value = "10m")]
    timeout: weir_crds::Duration,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List StreamJobs: phase, parallelism (running/desired), last checkpoint and savepoint.
    Jobs {
        /// List the StreamJobs of every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Show everything a StreamJob's status says, in sections.
    Status {
        /// The StreamJob's name.
        job: String,
        /// Print the whole object instead, as JSON or YAML.
        #[arg(short, long, value_enum)]
        output: Option<Output>,
    },
    /// Take a savepoint and wait for it; its path goes to stdout, progress to stderr.
    ///
    /// Sets spec.savepoints.triggerNonce to a new value; the controller takes the savepoint,
    /// records it as a StreamSnapshot and in status.lastSavepoint. A savepoint that fails exits
    /// 1 with the controller's message. `path=$(kubectl weir savepoint JOB)` works.
    #[command(after_help = GITOPS)]
    Savepoint {
        /// The StreamJob's name.
        job: String,
        /// Stop the job with the savepoint: suspends it (spec.state: suspended), which in
        /// upgradeMode savepoint makes the controller take a stopping savepoint and then
        /// remove the pods; `kubectl weir resume JOB` starts it again from that savepoint.
        /// Refused in the other upgrade modes, whose suspend takes no savepoint.
        #[arg(long)]
        stop: bool,
        /// How long to wait for the savepoint (500ms, 30s, 5m, 1h).
        #[arg(long, default_value = "10m")]
        timeout: weir_crds::Duration,
    },
    /// Change a StreamJob's parallelism (spec.parallelism).
    ///
    /// The controller treats it as an upgrade: in upgradeMode savepoint it stops the job with
    /// a savepoint and starts it from it at the new parallelism, redistributing the key groups.
    #[command(after_help = GITOPS)]
    Rescale {
        /// The StreamJob's name.
        job: String,
        /// The new parallelism, from 1 to the job's maxParallelism.
        #[arg(value_parser = change::parse_parallelism)]
        parallelism: i32,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Suspend a StreamJob (spec.state: suspended) and remove its pods.
    ///
    /// In upgradeMode savepoint the controller stops the job with a savepoint first, and
    /// `resume` starts it from that savepoint; in last-state mode it resumes from its last
    /// checkpoint, in stateless mode with empty state.
    #[command(after_help = GITOPS)]
    Suspend {
        /// The StreamJob's name.
        job: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Resume a suspended StreamJob (spec.state: running).
    ///
    /// It starts from the savepoint it was suspended with (upgradeMode savepoint), from its
    /// last checkpoint (last-state), or with empty state (stateless).
    #[command(after_help = GITOPS)]
    Resume {
        /// The StreamJob's name.
        job: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// List StreamSnapshots (savepoints kept as objects): of one job, or all of the namespace.
    Snapshots {
        /// Only this job's (by the weir.dev/job label the controller puts on them).
        #[arg(conflicts_with = "all_namespaces")]
        job: Option<String>,
        /// List the StreamSnapshots of every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Json,
    Yaml,
}

/// Why a command did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The command line is wrong (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Something else (exit 1).
    #[error("{0}")]
    Failed(String),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // clap exits 2 on a usage error and 0 for --help and --version.
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                Failure::Usage(_) => ExitCode::from(2),
                Failure::Failed(_) => ExitCode::from(1),
            }
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let all = matches!(
        cli.cmd,
        Cmd::Jobs { all_namespaces: true } | Cmd::Snapshots { all_namespaces: true, .. }
    );
    if all && cli.namespace.is_some() {
        return Err(Failure::Usage(
            "-n/--namespace and -A/--all-namespaces exclude each other: give one".into(),
        ));
    }
    let target =
        Target { kubeconfig: cli.kubeconfig, context: cli.context, namespace: cli.namespace };
    let cluster = Cluster::connect(&target).await?;
    match cli.cmd {
        Cmd::Jobs { all_namespaces } => jobs(&cluster, all_namespaces).await,
        Cmd::Status { job, output } => status(&cluster, &job, output).await,
        Cmd::Savepoint { job, stop: false, timeout } => savepoint(&cluster, &job, timeout).await,
        Cmd::Savepoint { job, stop: true, timeout } => stop(&cluster, &job, timeout).await,
        Cmd::Rescale { job, parallelism, wait } => rescale(&cluster, &job, parallelism, wait).await,
        Cmd::Suspend { job, wait } => suspend(&cluster, &job, wait).await,
        Cmd::Resume { job, wait } => resume(&cluster, &job, wait).await,
        Cmd::Snapshots { job, all_namespaces } => {
            snapshots(&cluster, job.as_deref(), all_namespaces).await
        }
    }
}

async fn jobs(c: &Cluster, all: bool) -> Result<(), Failure> {
    let api = if all { kube::Api::all(c.client.clone()) } else { c.jobs() };
    let mut list =
        api.list(&ListParams::default()).await.map_err(|e| c.error("listing streamjobs", e))?.items;
    if list.is_empty() {
        if all {
            eprintln!("No StreamJobs found.");
        } else {
            c.namespace_exists().await?;
            eprintln!("No StreamJobs found in namespace {}.", c.namespace);
        }
        return Ok(());
    }
    list.sort_by_key(|j| (j.namespace(), j.name_any()));
    print!("{}", show::jobs_table(&list, all, Timestamp::now()));
    Ok(())
}

async fn status(c: &Cluster, name: &str, output: Option<Output>) -> Result<(), Failure> {
    let j = c.job(name).await?;
    match output {
        None => print!("{}", show::status_text(&j, Timestamp::now())),
        Some(format) => {
            // The object as the apiserver has it, not as this program's types would write it
            // back (with their defaults filled in).
            let ar = kube::api::ApiResource::erase::<StreamJob>(&());
            let api: kube::Api<kube::api::DynamicObject> =
                kube::Api::namespaced_with(c.client.clone(), &c.namespace, &ar);
            let mut j = api
                .get(name)
                .await
                .map_err(|e| c.error(&format!("reading streamjob {name:?}"), e))?;
            // As kubectl prints it: without the bookkeeping of who wrote which field.
            j.metadata.managed_fields = None;
            let text = match format {
                Output::Json => serde_json::to_string_pretty(&j).map(|s| s + "\n").ok(),
                Output::Yaml => serde_saphyr::to_string(&j).ok(),
            };
            print!("{}", text.unwrap_or_default());
        }
    }
    Ok(())
}

async fn snapshots(c: &Cluster, job: Option<&str>, all: bool) -> Result<(), Failure> {
    let api: kube::Api<StreamSnapshot> = if all {
        kube::Api::all(c.client.clone())
    } else {
        kube::Api::namespaced(c.client.clone(), &c.namespace)
    };
    let lp = match job {
        Some(j) => ListParams::default().labels(&format!("{LABEL_JOB}={j}")),
        None => ListParams::default(),
    };
    let mut list = api.list(&lp).await.map_err(|e| c.error("listing streamsnapshots", e))?.items;
    if list.is_empty() {
        if !all {
            c.namespace_exists().await?;
        }
        match (job, all) {
            (Some(j), _) => {
                eprintln!("No StreamSnapshots of job {j} found in namespace {}.", c.namespace)
            }
            (None, true) => eprintln!("No StreamSnapshots found."),
            (None, false) => eprintln!("No StreamSnapshots found in namespace {}.", c.namespace),
        }
        return Ok(());
    }
    // Oldest first: the newest, the one a job restores from, ends the list.
    list.sort_by_key(|s| (s.namespace(), s.metadata.creation_timestamp.clone().map(|t| t.0)));
    print!("{}", show::snapshots_table(&list, all, Timestamp::now()));
    Ok(())
}

/// A merge patch of job `name`; the job as it is after it.
async fn patch(c: &Cluster, name: &str, p: &Value, what: &str) -> Result<StreamJob, Failure> {
    c.jobs()
        .patch(name, &PatchParams::default(), &Patch::Merge(p))
        .await
        .map_err(|e| c.error(&format!("{what} of streamjob {name:?}"), e))
}

async fn savepoint(c: &Cluster, name: &str, timeout: weir_crds::Duration) -> Result<(), Failure> {
    // The nonce is computed from a version of the job and sent only against that version;
    // when the job changed in between (the controller writes its status often) it is
    // computed again.
    let mut tries = 0;
    let (nonce, after) = loop {
        let j = c.job(name).await?;
        change::check_savepoint(&j, name).map_err(Failure::Failed)?;
        let nonce = change::next_nonce(&j);
        let rv = j.resource_version().unwrap_or_default();
        match c
            .jobs()
            .patch(name, &PatchParams::default(), &Patch::Merge(change::nonce_patch(nonce, &rv)))
            .await
        {
            Ok(after) => break (nonce, after),
            Err(kube::Error::Api(s)) if s.code == 409 && tries < 10 => tries += 1,
            Err(e) => {
                return Err(c.error(&format!("setting the savepoint trigger of {name:?}"), e));
            }
        }
    };
    eprintln!(
        "{name}: asked for a savepoint (spec.savepoints.triggerNonce {nonce}); waiting for it"
    );
    let mut w = SavepointWait::new(nonce, &after);
    let path =
        wait::until(c, name, after, timeout.as_std(), "the savepoint", |j| w.look(j)).await?;
    eprintln!("{name}: savepoint completed");
    println!("{path}");
    Ok(())
}

async fn stop(c: &Cluster, name: &str, timeout: weir_crds::Duration) -> Result<(), Failure> {
    let j = c.job(name).await?;
    change::check_stop(&j, name).map_err(Failure::Failed)?;
    let before = j.status.as_ref().and_then(|s| s.last_savepoint.clone());
    let after = patch(c, name, &change::state_patch(DesiredState::Suspended), "suspending").await?;
    eprintln!(
        "{name}: suspending with a savepoint (spec.state: suspended); `kubectl weir resume {name}` starts it again from it"
    );
    let generation = after.metadata.generation.unwrap_or(0);
    let path = wait::until(c, name, after, timeout.as_std(), "the stopping savepoint", |j| {
        wait::stopped(j, generation, before.as_ref())
    })
    .await?;
    match path {
        Some(p) => {
            eprintln!("{name}: stopped with a savepoint; suspended");
            println!("{p}");
            Ok(())
        }
        None => Err(Failure::Failed(format!(
            "streamjob {name:?} was suspended without a savepoint (it was not running when the controller came to it); `kubectl weir resume {name}` starts it from its last checkpoint"
        ))),
    }
}

async fn rescale(c: &Cluster, name: &str, n: i32, w: WaitArgs) -> Result<(), Failure> {
    let j = c.job(name).await?;
    change::check_rescale(&j, n).map_err(Failure::Failed)?;
    let was = j.spec.parallelism;
    let after = if was == n {
        println!("streamjob {name:?}: spec.parallelism is {n} already; nothing changed");
        j
    } else {
        let after = patch(c, name, &change::parallelism_patch(n), "rescaling").await?;
        println!(
            "streamjob {name:?} rescaled: spec.parallelism {was} -> {n}; {}",
            change::rescale_says(&after)
        );
        after
    };
    if w.wait {
        let generation = after.metadata.generation.unwrap_or(0);
        let what = format!("the job to run at parallelism {n}");
        wait::until(c, name, after, w.timeout.as_std(), &what, |j| {
            wait::running(j, generation, Some(n))
        })
        .await?;
        eprintln!("{name}: running at parallelism {n}");
    }
    Ok(())
}

async fn suspend(c: &Cluster, name: &str, w: WaitArgs) -> Result<(), Failure> {
    let j = c.job(name).await?;
    let before = j.status.as_ref().and_then(|s| s.last_savepoint.clone());
    let after = if j.spec.state == DesiredState::Suspended {
        println!("streamjob {name:?}: spec.state is suspended already; nothing changed");
        j
    } else {
        let after =
            patch(c, name, &change::state_patch(DesiredState::Suspended), "suspending").await?;
        println!(
            "streamjob {name:?} suspended: spec.state running -> suspended; {}",
            change::suspend_says(&after, name)
        );
        after
    };
    if w.wait {
        let generation = after.metadata.generation.unwrap_or(0);
        let timeout = w.timeout.as_std();
        if after.spec.upgrade_mode == UpgradeMode::Savepoint {
            let path = wait::until(c, name, after, timeout, "the job to be suspended", |j| {
                wait::stopped(j, generation, before.as_ref())
            })
            .await?;
            match path {
                Some(p) => eprintln!("{name}: suspended, with a savepoint at {p}"),
                None => eprintln!("{name}: suspended (it was not running: no savepoint)"),
            }
        } else {
            wait::until(c, name, after, timeout, "the job to be suspended", |j| {
                wait::suspended(j, generation)
            })
            .await?;
            eprintln!("{name}: suspended");
        }
    }
    Ok(())
}

async fn resume(c: &Cluster, name: &str, w: WaitArgs) -> Result<(), Failure> {
    let j = c.job(name).await?;
    let after = if j.spec.state == DesiredState::Running {
        println!("streamjob {name:?}: spec.state is running already; nothing changed");
        j
    } else {
        let after = patch(c, name, &change::state_patch(DesiredState::Running), "resuming").await?;
        println!(
            "streamjob {name:?} resumed: spec.state suspended -> running; {}",
            change::resume_says(&after)
        );
        after
    };
    if w.wait {
        let generation = after.metadata.generation.unwrap_or(0);
        wait::until(c, name, after, w.timeout.as_std(), "the job to run", |j| {
            wait::running(j, generation, None)
        })
        .await?;
        eprintln!("{name}: running");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kubectl-weir").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_parse_like_kubectls() {
        let cli = parse(&["jobs", "-A"]).unwrap();
        assert!(matches!(cli.cmd, Cmd::Jobs { all_namespaces: true }));
        let cli =
            parse(&["-n", "prod", "--context", "kind", "status", "wc", "-o", "yaml"]).unwrap();
        assert_eq!(cli.namespace.as_deref(), Some("prod"));
        assert_eq!(cli.context.as_deref(), Some("kind"));
        assert!(matches!(cli.cmd, Cmd::Status { output: Some(Output::Yaml), .. }));
        // The global flags also go after the command, as kubectl takes them.
        let cli = parse(&["rescale", "wc", "3", "--wait", "-n", "prod"]).unwrap();
        assert_eq!(cli.namespace.as_deref(), Some("prod"));
        assert!(matches!(
            cli.cmd,
            Cmd::Rescale { parallelism: 3, wait: WaitArgs { wait: true, .. }, .. }
        ));
        let cli = parse(&["savepoint", "wc", "--stop", "--timeout", "90s"]).unwrap();
        let Cmd::Savepoint { stop: true, timeout, .. } = cli.cmd else { panic!() };
        assert_eq!(timeout.as_std(), std::time::Duration::from_secs(90));
    }

    #[test]
    fn bad_input_is_a_usage_error_that_names_the_value() {
        let e = parse(&["rescale", "wc", "0"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("parallelism 0 is too small"), "{e}");
        let e = parse(&["savepoint", "wc", "--timeout", "soon"]).unwrap_err();
        assert!(e.to_string().contains("invalid duration \"soon\""), "{e}");
        assert_eq!(parse(&["status"]).unwrap_err().exit_code(), 2);
        assert!(parse(&["snapshots", "wc", "-A"]).is_err());
    }
}
