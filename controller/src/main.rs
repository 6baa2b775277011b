//! `weir-controller`: the Weir operator's binary. Flags and environment, JSON logs, the
//! metrics and health server, and leader election on a Lease; the reconcile logic is the
//! library's.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tracing::{error, info};
use weir_controller::build::BuildConfig;
use weir_controller::metrics::Metrics;
use weir_controller::validate::Defaults;
use weir_controller::{Config, run};

#[derive(Parser, Debug)]
#[command(name = "weir-controller", version, about = "The Weir operator: runs StreamJobs")]
struct Args {
    /// Namespaces to watch (repeat, or separate with commas); all when none is given.
    #[arg(long = "namespace", env = "WEIR_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Runtime image of jobs whose spec names none.
    #[arg(long, env = "WEIR_RUNTIME_IMAGE", default_value = concat!("ghcr.io/weir-dev/weir:", env!("CARGO_PKG_VERSION")))]
    runtime_image: String,
    /// Checkpoint storage of jobs whose spec sets none (`s3://bucket/prefix`).
    #[arg(long, env = "WEIR_DEFAULT_CHECKPOINT_STORAGE")]
    default_checkpoint_storage: Option<weir_crds::StorageUri>,
    /// DNS suffix of Services after `<service>.<namespace>.`.
    #[arg(long, env = "WEIR_SERVICE_DOMAIN", default_value = "svc")]
    service_domain: String,
    /// How often a running job's coordinator is read for the status.
    #[arg(long, env = "WEIR_POLL_INTERVAL", default_value = "10s")]
    poll_interval: weir_crds::Duration,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "WEIR_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// Reconcile only while holding the Lease (run two replicas or more for failover).
    #[arg(long, env = "WEIR_LEADER_ELECT")]
    leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "WEIR_LEASE_NAME", default_value = "weir-controller")]
    lease_name: String,
    /// Namespace of the Lease (default: the controller's own, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// The controller's own namespace: the jobs' NetworkPolicies let it, and no other
    /// namespace, reach the coordinators' API (default: POD_NAMESPACE, else the client's
    /// namespace: in a pod, its ServiceAccount's; else the kubeconfig context's).
    #[arg(long, env = "POD_NAMESPACE")]
    controller_namespace: Option<String>,
    /// How long a Lease holds without renewal: a standby takes over within this time after
    /// the leader dies.
    #[arg(long, env = "WEIR_LEASE_DURATION", default_value = "15s")]
    lease_duration: weir_crds::Duration,
    /// This replica's name, in the Lease and in events (default: POD_NAME, else the host name
    /// and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log lines as JSON objects (for log collectors) or as text (for people).
    #[arg(long, env = "WEIR_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Json,
    Text,
}

/// Logs go to stdout, filtered by `WEIR_LOG` (else `RUST_LOG`; an EnvFilter directive such as
/// `info,kube=warn` or `debug`).
fn init_logs(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("WEIR_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => logs.json().with_current_span(false).init(),
        LogFormat::Text => logs.with_ansi(false).init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logs(args.log_format);
    match serve(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let client = Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "no Kubernetes client (in a pod: the service account; else KUBECONFIG): {e}"
        )
    })?;
    let controller_namespace = args
        .controller_namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| client.default_namespace().to_string());
    info!(namespace = %controller_namespace, "the jobs' NetworkPolicies let this namespace reach their API");
    let config = Config {
        build: BuildConfig {
            runtime_image: args.runtime_image.clone(),
            service_domain: args.service_domain.clone(),
            controller_namespace,
        },
        defaults: Defaults { checkpoint_storage: args.default_checkpoint_storage.clone() },
        namespaces: args.namespaces.iter().filter(|n| !n.is_empty()).cloned().collect(),
        poll: args.poll_interval.as_std().max(Duration::from_secs(1)),
        instance: Some(identity.clone()),
    };
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(&args.metrics_addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-addr {}: {e}", args.metrics_addr))?;
    info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    let router = weir_controller::metrics::router(metrics.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            error!("the metrics server stopped: {e}");
        }
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        info!("stopping");
        let _ = stop_tx.send(true);
    });
    let shutdown = {
        let rx = stop_rx.clone();
        async move {
            let mut rx = rx;
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    if !args.leader_elect {
        metrics.leading.store(true, Ordering::Relaxed);
        info!(namespaces = ?config.namespaces, "reconciling (no leader election)");
        run(client, config, metrics, shared(shutdown)).await;
        return Ok(());
    }

    let secs = args.lease_duration.as_std().as_secs().max(2);
    let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&args.lease_namespace)
        .with_parameters(LeaseParams::new(identity.clone(), secs, (secs / 3).max(1)))
        .build()
        .await
        .map_err(|e| {
            anyhow::anyhow!("setting up Lease {}/{}: {e}", args.lease_namespace, args.lease_name)
        })?;
    let (mut leading, lease_task) = manager.watch().await;
    info!(lease = %args.lease_name, identity = %identity, "waiting to lead");
    let mut stop = stop_rx.clone();
    loop {
        if *leading.borrow_and_update() {
            break;
        }
        tokio::select! {
            r = leading.changed() => r.map_err(|_| anyhow::anyhow!("the Lease watch ended"))?,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
    metrics.leading.store(true, Ordering::Relaxed);
    info!(identity = %identity, "leading: reconciling");
    // Leadership lost: stop at once and exit, so that no two replicas ever reconcile (the
    // pod restarts and waits as a standby).
    let lost = {
        let mut leading = leading.clone();
        async move {
            let _ = leading.wait_for(|l| !*l).await;
        }
    };
    let stop_or_lost = {
        let shutdown = shared(shutdown);
        let lost = shared(lost);
        async move {
            tokio::select! {
                _ = shutdown => {},
                _ = lost => {},
            }
        }
    };
    run(client, config, metrics.clone(), shared(stop_or_lost)).await;
    let still_leading = *leading.borrow();
    // Release the Lease (dropping the receivers makes the lease task release it).
    drop(leading);
    let _ = tokio::time::timeout(Duration::from_secs(5), lease_task).await;
    if !still_leading && !*stop_rx.borrow() {
        anyhow::bail!(
            "lost the Lease {}: exiting so that only the leader reconciles",
            args.lease_name
        );
    }
    Ok(())
}

/// A future that can be cloned (each clone resolves when the original does).
fn shared(
    f: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + Sync + Clone + 'static {
    use futures::FutureExt;
    f.boxed().shared()
}
