//! One pod on the node: its containers as supervised local processes, and the status the
//! kubelet would report for it.
//!
//! ```text
//!  run_pod ── prepare volumes ── init containers, one after another ── main containers
//!     │                                                                   │ one supervisor each:
//!     │◄──── slot changes (Notify) ◄─────────────────────────────────── spawn, probe, wait,
//!     │                                                                   restart with backoff
//!     └── status patch when it changed; on deletion: stop all with the grace period,
//!         final status, delete the pod object
//! ```

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::env::{ConfigError, PodFacts, container_env};
use super::exec::BindMount;
use super::{Agent, probe, volumes};

/// What the pod watcher tells a pod's runner.
#[derive(Debug, Clone)]
pub enum PodUpdate {
    /// The pod object as last seen.
    Present(Box<Pod>),
    /// The pod object is gone from the API: stop at once.
    Gone,
}

/// A container's state, as in `ContainerStatus.state`.
#[derive(Debug, Clone, PartialEq)]
enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started: Timestamp,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        started: Option<Timestamp>,
        finished: Timestamp,
    },
}

/// Everything the status needs to know of one container.
#[derive(Debug, Clone)]
struct Slot {
    name: String,
    image: String,
    state: State,
    last: Option<State>,
    ready: bool,
    started: bool,
    restart_count: i32,
    /// The supervisor returned: the container will not run again.
    done: bool,
}

impl Slot {
    fn new(c: &Container, reason: &str) -> Self {
        Self {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: State::Waiting { reason: reason.into(), message: None },
            last: None,
            ready: false,
            started: false,
            restart_count: 0,
            done: false,
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    init: Vec<Slot>,
    main: Vec<Slot>,
    init_done: bool,
    init_failed: bool,
}

type SharedRef = Arc<(Mutex<Shared>, Notify)>;

fn update(shared: &SharedRef, init: bool, idx: usize, f: impl FnOnce(&mut Slot)) {
    {
        let mut s = shared.0.lock().unwrap();
        let slot = if init { &mut s.init[idx] } else { &mut s.main[idx] };
        f(slot);
    }
    shared.1.notify_one();
}

/// Runs the pod until it is deleted (or gone) and its processes have stopped.
pub async fn run_pod(agent: Arc<Agent>, mut updates: watch::Receiver<PodUpdate>) {
    let PodUpdate::Present(first) = updates.borrow().clone() else { return };
    let pod = *first;
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let key = format!("{ns}/{name}");
    let ip = agent.ips.lock().unwrap().allocate();
    let dir = agent.pod_dir(&ns, &name);
    let _ = std::fs::create_dir_all(&dir);
    info!(pod = %key, %ip, "starting pod");
    let facts = PodFacts {
        pod_ip: ip.to_string(),
        host_ip: agent.host_ip.clone(),
        node_name: agent.node_name.clone(),
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let shared: SharedRef = Arc::new((
        Mutex::new(Shared {
            init: spec
                .init_containers
                .iter()
                .flatten()
                .map(|c| Slot::new(c, "PodInitializing"))
                .collect(),
            main: spec.containers.iter().map(|c| Slot::new(c, "ContainerCreating")).collect(),
            init_done: spec.init_containers.as_ref().is_none_or(|v| v.is_empty()),
            init_failed: false,
        }),
        Notify::new(),
    ));
    let (stop_tx, stop_rx) = watch::channel::<Option<Duration>>(None);
    let mut reporter = StatusReporter::new(agent.clone(), &ns, &name, &facts, Timestamp::now());
    reporter.report(&shared).await;

    let work = {
        let agent = agent.clone();
        let shared = shared.clone();
        let pod = pod.clone();
        let facts = facts.clone();
        let dir = dir.clone();
        tokio::spawn(async move { run_containers(agent, pod, facts, dir, shared, stop_rx).await })
    };
    let mut work = Some(work);
    let mut deleting: Option<(Duration, Pod)> = None;
    loop {
        tokio::select! {
            changed = updates.changed() => {
                let update = if changed.is_err() { PodUpdate::Gone } else { updates.borrow().clone() };
                match update {
                    PodUpdate::Gone => {
                        info!(pod = %key, "pod is gone from the API: killing its processes");
                        let _ = stop_tx.send(Some(Duration::ZERO));
                        if let Some(w) = work.take() { let _ = w.await; }
                        break;
                    }
                    PodUpdate::Present(p) if p.metadata.deletion_timestamp.is_some() && deleting.is_none() => {
                        let grace = p.metadata.deletion_grace_period_seconds
                            .or(p.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
                            .unwrap_or(30).max(0) as u64;
                        info!(pod = %key, grace, "pod deleted: stopping its containers");
                        let _ = stop_tx.send(Some(Duration::from_secs(grace)));
                        deleting = Some((Duration::from_secs(grace), *p));
                    }
                    PodUpdate::Present(_) => {}
                }
            }
            _ = shared.1.notified() => {
                reporter.report(&shared).await;
            }
            res = async { work.as_mut().unwrap().await }, if work.is_some() => {
                work = None;
                if let Err(e) = res { warn!(pod = %key, "pod runner task failed: {e}"); }
                reporter.report(&shared).await;
                if deleting.is_some() {
                    break;
                }
            }
        }
        agent.set_dns(&uid, &pod, ip, reporter.ready && deleting.is_none() && work.is_some());
    }
    agent.set_dns(&uid, &pod, ip, false);
    agent.dns_remove(&uid);
    agent.ips.lock().unwrap().release(ip);
    if let Some((_, p)) = deleting {
        reporter.report(&shared).await;
        let api: Api<Pod> = Api::namespaced(agent.client.clone(), &ns);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: p.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        if let Err(e) = api.delete(&name, &dp).await
            && !matches!(&e, kube::Error::Api(s) if s.code == 404 || s.code == 409)
        {
            warn!(pod = %key, "deleting pod object: {e}");
        }
    }
    info!(pod = %key, "pod stopped");
}

/// Init containers one after another, then the main containers side by side.
async fn run_containers(
    agent: Arc<Agent>,
    pod: Pod,
    facts: PodFacts,
    dir: PathBuf,
    shared: SharedRef,
    stop: watch::Receiver<Option<Duration>>,
) {
    let spec = pod.spec.clone().unwrap_or_default();
    let fs_group = spec.security_context.as_ref().and_then(|s| s.fs_group).map(|g| g as u32);
    // Volumes, retried until they can be made (a Secret created after the pod, say).
    let vols = loop {
        match volumes::prepare(&agent.objects, &pod, &facts, &dir, fs_group).await {
            Ok(v) => break v,
            Err(e) => {
                for i in 0..spec.containers.len() {
                    update(&shared, false, i, |s| {
                        s.state = State::Waiting {
                            reason: "ContainerCreating".into(),
                            message: Some(e.clone()),
                        }
                    });
                }
                if wait_or_stop(&stop, Duration::from_secs(2)).await {
                    return;
                }
            }
        }
    };
    let ctx = Arc::new(PodRun { agent, pod, facts, dir, vols });
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        let ok = supervise(ctx.clone(), c.clone(), true, i, shared.clone(), stop.clone()).await;
        if !ok {
            let mut s = shared.0.lock().unwrap();
            s.init_failed = true;
            for m in s.main.iter_mut() {
                m.done = true;
            }
            drop(s);
            shared.1.notify_one();
            return;
        }
    }
    shared.0.lock().unwrap().init_done = true;
    shared.1.notify_one();
    let tasks: Vec<_> = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(supervise(ctx.clone(), c.clone(), false, i, shared.clone(), stop.clone()))
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// What every container of a pod shares.
struct PodRun {
    agent: Arc<Agent>,
    pod: Pod,
    facts: PodFacts,
    dir: PathBuf,
    vols: BTreeMap<String, PathBuf>,
}

/// Sleeps for `d`; true when the pod is being stopped instead.
async fn wait_or_stop(stop: &watch::Receiver<Option<Duration>>, d: Duration) -> bool {
    let mut stop = stop.clone();
    if stop.borrow().is_some() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.changed() => true,
    }
}

/// Runs one container until it will not run again; true when it ended successfully (for init
/// containers: exit 0).
async fn supervise(
    ctx: Arc<PodRun>,
    c: Container,
    init: bool,
    idx: usize,
    shared: SharedRef,
    mut stop: watch::Receiver<Option<Duration>>,
) -> bool {
    let spec = ctx.pod.spec.clone().unwrap_or_default();
    let policy = spec.restart_policy.clone().unwrap_or_else(|| "Always".into());
    let key = format!(
        "{}/{}/{}",
        ctx.pod.metadata.namespace.as_deref().unwrap_or(""),
        ctx.pod.metadata.name.as_deref().unwrap_or(""),
        c.name
    );
    let mut backoff = ctx.agent.backoff_initial;
    let result = loop {
        if stop.borrow().is_some() {
            break false;
        }
        let started_at = Instant::now();
        let (mut child, env) = match start(&ctx, &c).await {
            Ok(x) => x,
            Err((reason, message)) => {
                warn!(container = %key, "{reason}: {message}");
                update(&shared, init, idx, |s| {
                    s.state = State::Waiting { reason, message: Some(message) }
                });
                if wait_or_stop(&stop, backoff).await {
                    break false;
                }
                backoff = (backoff * 2).min(ctx.agent.backoff_max);
                continue;
            }
        };
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        ctx.agent.track_pid(pid, true);
        let started = Timestamp::now();
        let has_readiness = !init && c.readiness_probe.is_some();
        update(&shared, init, idx, |s| {
            s.state = State::Running { started };
            s.started = c.startup_probe.is_none();
            s.ready = !init && !has_readiness && c.startup_probe.is_none();
        });
        let (probe_fail_tx, mut probe_fail_rx) = tokio::sync::mpsc::channel::<&'static str>(1);
        let probes = (!init).then(|| {
            tokio::spawn(run_probes(
                c.clone(),
                ctx.facts.pod_ip.clone(),
                env.clone(),
                shared.clone(),
                idx,
                probe_fail_tx,
            ))
        });
        let grace_default =
            Duration::from_secs(spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64);
        let (status, stopping) = tokio::select! {
            st = child.wait() => (st.ok(), false),
            Some(which) = probe_fail_rx.recv() => {
                info!(container = %key, "{which} probe failed: restarting");
                (kill_and_wait(&mut child, pid, grace_default).await, false)
            }
            _ = stop.changed() => {
                let grace = stop.borrow().unwrap_or(grace_default);
                (kill_and_wait(&mut child, pid, grace).await, true)
            }
        };
        ctx.agent.track_pid(pid, false);
        if let Some(p) = probes {
            p.abort();
        }
        let (exit_code, signal) = match status {
            Some(st) => match (st.code(), st.signal()) {
                (Some(code), _) => (code, None),
                (None, Some(sig)) => (128 + sig, Some(sig)),
                _ => (255, None),
            },
            None => (255, None),
        };
        let reason = if exit_code == 0 { "Completed" } else { "Error" };
        info!(container = %key, exit_code, "container exited");
        let term = State::Terminated {
            exit_code,
            signal,
            reason: reason.into(),
            started: Some(started),
            finished: Timestamp::now(),
        };
        let restart = !stopping
            && match policy.as_str() {
                "Never" => false,
                "OnFailure" => exit_code != 0,
                _ => !init || exit_code != 0,
            };
        if !restart {
            update(&shared, init, idx, |s| {
                s.state = term;
                s.ready = false;
            });
            break exit_code == 0;
        }
        if started_at.elapsed() > ctx.agent.backoff_max * 10 {
            backoff = ctx.agent.backoff_initial;
        }
        update(&shared, init, idx, |s| {
            s.last = Some(term);
            s.ready = false;
            s.restart_count += 1;
            s.state = State::Waiting {
                reason: if exit_code == 0 { "Completed".into() } else { "CrashLoopBackOff".into() },
                message: Some(format!(
                    "back-off {}ms restarting container {}",
                    backoff.as_millis(),
                    c.name
                )),
            };
        });
        if wait_or_stop(&stop, backoff).await {
            break false;
        }
        backoff = (backoff * 2).min(ctx.agent.backoff_max);
    };
    update(&shared, init, idx, |s| s.done = true);
    result
}

/// TERM to the container's process group, KILL after `grace`; returns its exit status.
async fn kill_and_wait(
    child: &mut tokio::process::Child,
    pid: i32,
    grace: Duration,
) -> Option<std::process::ExitStatus> {
    if pid > 0 {
        let sig = if grace.is_zero() { Signal::SIGKILL } else { Signal::SIGTERM };
        let _ = killpg(Pid::from_raw(pid), sig);
    }
    match tokio::time::timeout(grace.max(Duration::from_millis(10)), child.wait()).await {
        Ok(st) => {
            // The main process is gone; take the rest of its group with it.
            if pid > 0 {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            st.ok()
        }
        Err(_) => {
            if pid > 0 {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            child.wait().await.ok()
        }
    }
}

/// Probes of a running container: a startup probe first, then readiness (sets `ready`) and
/// liveness (a failure asks the supervisor to restart).
async fn run_probes(
    c: Container,
    pod_ip: String,
    env: Vec<(String, String)>,
    shared: SharedRef,
    idx: usize,
    fail: tokio::sync::mpsc::Sender<&'static str>,
) {
    if let Some(p) = &c.startup_probe {
        let t = probe::timing(p);
        tokio::time::sleep(t.initial_delay).await;
        let mut failures = 0;
        loop {
            if probe::check(p, &c, &pod_ip, &env).await {
                break;
            }
            failures += 1;
            if failures >= t.failure_threshold {
                let _ = fail.send("startup").await;
                return;
            }
            tokio::time::sleep(t.period).await;
        }
        update(&shared, false, idx, |s| {
            s.started = true;
            s.ready = c.readiness_probe.is_none();
        });
    }
    let readiness = c.readiness_probe.clone().map(|p| {
        let (c, pod_ip, env, shared) = (c.clone(), pod_ip.clone(), env.clone(), shared.clone());
        tokio::spawn(async move {
            let t = probe::timing(&p);
            tokio::time::sleep(t.initial_delay).await;
            let (mut ok_run, mut fail_run, mut ready) = (0, 0, false);
            loop {
                if probe::check(&p, &c, &pod_ip, &env).await {
                    ok_run += 1;
                    fail_run = 0;
                } else {
                    fail_run += 1;
                    ok_run = 0;
                }
                let now_ready = if ready {
                    fail_run < t.failure_threshold
                } else {
                    ok_run >= t.success_threshold
                };
                if now_ready != ready {
                    ready = now_ready;
                    update(&shared, false, idx, |s| s.ready = ready);
                }
                tokio::time::sleep(t.period).await;
            }
        })
    });
    struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            if let Some(h) = &self.0 {
                h.abort();
            }
        }
    }
    let _readiness = AbortOnDrop(readiness);
    if let Some(p) = &c.liveness_probe {
        let t = probe::timing(p);
        tokio::time::sleep(t.initial_delay).await;
        let mut failures = 0;
        loop {
            if probe::check(p, &c, &pod_ip, &env).await {
                failures = 0;
            } else {
                failures += 1;
                if failures >= t.failure_threshold {
                    let _ = fail.send("liveness").await;
                    return;
                }
            }
            tokio::time::sleep(t.period).await;
        }
    }
    std::future::pending::<()>().await;
}

/// Starts the container's process; on failure, the waiting reason and message.
async fn start(
    ctx: &PodRun,
    c: &Container,
) -> Result<(tokio::process::Child, Vec<(String, String)>), (String, String)> {
    let agent = &ctx.agent;
    let config_err = |m: ConfigError| ("CreateContainerConfigError".to_string(), m);
    // The user the container runs as: the container's security context over the pod's.
    let pod_sc = ctx.pod.spec.as_ref().and_then(|s| s.security_context.clone()).unwrap_or_default();
    let sc = c.security_context.clone().unwrap_or_default();
    let uid = sc.run_as_user.or(pod_sc.run_as_user);
    let gid = sc.run_as_group.or(pod_sc.run_as_group).or(pod_sc.fs_group);
    if sc.run_as_non_root.or(pod_sc.run_as_non_root) == Some(true) && uid.unwrap_or(0) == 0 {
        return Err(config_err(
            "container has runAsNonRoot and image will run as root (set runAsUser to a non-zero uid)".into(),
        ));
    }
    let image = c.image.clone().unwrap_or_default();
    let (program, args) =
        agent.resolve_command(&image, c).map_err(|m| ("ErrImagePull".to_string(), m))?;
    let hostname = ctx
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or_else(|| ctx.pod.metadata.name.clone())
        .unwrap_or_default();
    let home = ctx.dir.join(format!("{}.home", c.name));
    let _ = std::fs::create_dir_all(&home);
    if let Some(u) = uid {
        let _ = nix::unistd::chown(&home, Some(nix::unistd::Uid::from_raw(u as u32)), None);
    }
    let mut base = vec![
        (
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        ),
        ("HOSTNAME".to_string(), hostname.clone()),
        ("HOME".to_string(), home.display().to_string()),
    ];
    base.extend(agent.pod_base_env.iter().cloned());
    let env =
        container_env(&agent.objects, &ctx.pod, c, &ctx.facts, &base).await.map_err(config_err)?;
    let lookup: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let expand = |s: &str| super::env::expand(s, |n| lookup.get(n).map(|v| v.to_string()));
    let args: Vec<String> = args.iter().map(|a| expand(a)).collect();
    let binds: Vec<BindMount> = volumes::mounts(c, &ctx.vols).map_err(config_err)?;
    let log = open_log(&ctx.dir, &c.name).map_err(|e| ("RunContainerError".to_string(), e))?;
    let log2 = log.try_clone().map_err(|e| ("RunContainerError".to_string(), e.to_string()))?;
    let mut cmd = tokio::process::Command::new(&agent.self_exe);
    cmd.arg("exec-container").arg("--hostname").arg(&hostname);
    for b in &binds {
        cmd.arg("--bind").arg(b.to_arg());
    }
    if sc.read_only_root_filesystem == Some(true) {
        cmd.arg("--read-only-root");
    }
    if let Some(u) = uid {
        cmd.arg("--uid").arg(u.to_string());
    }
    if let Some(g) = gid {
        cmd.arg("--gid").arg(g.to_string());
    }
    cmd.arg("--").arg(&program).args(&args);
    let workdir = c.working_dir.clone().map(PathBuf::from).unwrap_or_else(|| home.clone());
    cmd.env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(if workdir.is_dir() { workdir } else { home })
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2);
    let child = cmd.spawn().map_err(|e| {
        ("RunContainerError".to_string(), format!("starting {}: {e}", program.display()))
    })?;
    Ok((child, env))
}

fn open_log(dir: &Path, container: &str) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{container}.log")))
        .map_err(|e| format!("opening log: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Status

struct StatusReporter {
    agent: Arc<Agent>,
    api: Api<Pod>,
    name: String,
    facts: PodFacts,
    start_time: Timestamp,
    last_sent: Option<Value>,
    transitions: BTreeMap<&'static str, (bool, Timestamp)>,
    ready: bool,
}

impl StatusReporter {
    fn new(
        agent: Arc<Agent>,
        ns: &str,
        name: &str,
        facts: &PodFacts,
        start_time: Timestamp,
    ) -> Self {
        Self {
            api: Api::namespaced(agent.client.clone(), ns),
            agent,
            name: name.into(),
            facts: facts.clone(),
            start_time,
            last_sent: None,
            transitions: BTreeMap::new(),
            ready: false,
        }
    }

    async fn report(&mut self, shared: &SharedRef) {
        let status = {
            let s = shared.0.lock().unwrap();
            self.compute(&s)
        };
        if self.last_sent.as_ref() == Some(&status) {
            return;
        }
        let patch = json!({ "status": status });
        match self
            .api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            Ok(_) => self.last_sent = Some(status),
            Err(kube::Error::Api(e)) if e.code == 404 => self.last_sent = Some(status),
            Err(e) => warn!(pod = %self.name, "writing pod status: {e}"),
        }
        let _ = &self.agent;
    }

    fn condition(&mut self, kind: &'static str, value: bool) -> Value {
        let entry = self.transitions.entry(kind).or_insert((value, Timestamp::now()));
        if entry.0 != value {
            *entry = (value, Timestamp::now());
        }
        json!({
            "type": kind,
            "status": if value { "True" } else { "False" },
            "lastProbeTime": null,
            "lastTransitionTime": entry.1.to_string(),
        })
    }

    fn compute(&mut self, s: &Shared) -> Value {
        let all_done = !s.main.is_empty() && s.main.iter().all(|c| c.done);
        let phase = if s.init_failed {
            "Failed"
        } else if !s.init_done {
            "Pending"
        } else if all_done {
            let ok =
                s.main.iter().all(|c| matches!(c.state, State::Terminated { exit_code: 0, .. }));
            if ok { "Succeeded" } else { "Failed" }
        } else if s
            .main
            .iter()
            .any(|c| c.restart_count > 0 || !matches!(c.state, State::Waiting { .. }))
        {
            "Running"
        } else {
            "Pending"
        };
        let ready = s.init_done && !all_done && s.main.iter().all(|c| c.ready);
        self.ready = ready && phase == "Running";
        let conditions = vec![
            self.condition("Initialized", s.init_done),
            self.condition("ContainersReady", ready),
            self.condition("Ready", ready),
        ];
        let statuses =
            |slots: &[Slot]| -> Vec<Value> { slots.iter().map(container_status).collect() };
        json!({
            "phase": phase,
            "hostIP": self.facts.host_ip,
            "podIP": self.facts.pod_ip,
            "podIPs": [{ "ip": self.facts.pod_ip }],
            "startTime": self.start_time.to_string(),
            "conditions": conditions,
            "initContainerStatuses": if s.init.is_empty() { Value::Null } else { Value::Array(statuses(&s.init)) },
            "containerStatuses": statuses(&s.main),
            // No qosClass: the apiserver sets it from the resources when the pod is created,
            // and since 1.32 it cannot change (a node that wrote another one had every status
            // write of the pod refused).
        })
    }
}

fn state_json(st: &State) -> Value {
    match st {
        State::Waiting { reason, message } => {
            json!({ "waiting": { "reason": reason, "message": message } })
        }
        State::Running { started } => json!({ "running": { "startedAt": started.to_string() } }),
        State::Terminated { exit_code, signal, reason, started, finished } => {
            json!({ "terminated": {
                "exitCode": exit_code,
                "signal": signal,
                "reason": reason,
                "startedAt": started.map(|t| t.to_string()),
                "finishedAt": finished.to_string(),
            }})
        }
    }
}

fn container_status(c: &Slot) -> Value {
    json!({
        "name": c.name,
        "image": c.image,
        "imageID": format!("weir-node://{}", c.image),
        "ready": c.ready,
        "started": c.started && matches!(c.state, State::Running { .. }),
        "restartCount": c.restart_count,
        "state": state_json(&c.state),
        "lastState": c.last.as_ref().map(state_json).unwrap_or_else(|| json!({})),
    })
}
