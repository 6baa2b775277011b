//! `weir-node`: the test environment's node agent (see `weir_e2e::node`).
//!
//! `weir-node run` registers a Node and runs the pods bound to it as local processes;
//! `weir-node exec-container` is what it starts each container's process through.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use weir_e2e::node::exec::{BindMount, ExecSpec, exec_container};
use weir_e2e::node::{NodeConfig, run};

#[derive(Parser, Debug)]
#[command(name = "weir-node", about = "Plays the kubelet for Weir's test environment")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Register a node and run the pods bound to it (uses KUBECONFIG).
    Run {
        /// Name of the Node.
        #[arg(long, default_value = "weir-node")]
        node_name: String,
        /// Directory for pod volumes, logs and pulled images.
        #[arg(long)]
        state_dir: PathBuf,
        /// Directories searched for images' binaries, `:`-separated.
        #[arg(long, value_delimiter = ':')]
        image_path: Vec<PathBuf>,
        /// Loopback range for pod addresses, e.g. 127.42.0.0/16.
        #[arg(long, default_value = "127.42.0.0/16")]
        pod_network: String,
        /// Hosts file that receives the Service and pod names.
        #[arg(long, default_value = "/etc/hosts")]
        hosts_file: PathBuf,
        /// First delay before a container restart, in milliseconds (doubles up to the max).
        #[arg(long, default_value_t = 1000)]
        restart_backoff_ms: u64,
        /// Largest delay before a container restart, in milliseconds.
        #[arg(long, default_value_t = 20_000)]
        restart_backoff_max_ms: u64,
        /// `host:port` of the apiserver, given to pods as KUBERNETES_SERVICE_HOST/PORT.
        #[arg(long)]
        apiserver: Option<String>,
    },
    /// Set up a container (session, mount namespace, binds, user) and exec its program.
    ExecContainer {
        #[arg(long)]
        hostname: Option<String>,
        /// SOURCE=TARGET[:ro]
        #[arg(long = "bind")]
        binds: Vec<String>,
        #[arg(long)]
        read_only_root: bool,
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long)]
        gid: Option<u32>,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u32)> {
    let (ip, bits) = s.split_once('/').context("the pod network is ADDRESS/BITS")?;
    let ip: Ipv4Addr = ip.parse().context("pod network address")?;
    let bits: u32 = bits.parse().context("pod network prefix length")?;
    if !ip.is_loopback() || !(8..=30).contains(&bits) {
        bail!("the pod network must be a loopback range from /8 to /30, got {s}");
    }
    Ok((ip, 1u32 << (32 - bits)))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::ExecContainer { hostname, binds, read_only_root, uid, gid, command } => {
            let (program, args) = command.split_first().context("no command")?;
            let spec = ExecSpec {
                hostname,
                binds: binds.iter().map(|b| BindMount::parse(b)).collect::<Result<_>>()?,
                read_only_root,
                uid,
                gid,
                program: program.into(),
                args: args.to_vec(),
            };
            match exec_container(&spec) {
                Ok(never) => match never {},
                Err(e) => {
                    eprintln!("weir-node exec-container: {e:#}");
                    std::process::exit(127);
                }
            }
        }
        Cmd::Run {
            node_name,
            state_dir,
            image_path,
            pod_network,
            hosts_file,
            restart_backoff_ms,
            restart_backoff_max_ms,
            apiserver,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info,kube=warn".into()),
                )
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            let mut pod_base_env = Vec::new();
            if let Some(a) = apiserver {
                let (host, port) = a.rsplit_once(':').context("--apiserver is host:port")?;
                pod_base_env.push(("KUBERNETES_SERVICE_HOST".into(), host.into()));
                pod_base_env.push(("KUBERNETES_SERVICE_PORT".into(), port.into()));
            }
            let cfg = NodeConfig {
                node_name,
                state_dir,
                image_path,
                pod_network: parse_cidr(&pod_network)?,
                hosts_file,
                backoff: (
                    Duration::from_millis(restart_backoff_ms),
                    Duration::from_millis(restart_backoff_max_ms),
                ),
                pod_base_env,
            };
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let client =
                    kube::Client::try_default().await.context("connecting to the apiserver")?;
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .expect("SIGTERM");
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = tokio::signal::ctrl_c() => {},
                    }
                    let _ = tx.send(true);
                });
                run(client, cfg, rx).await
            })
        }
    }
}
