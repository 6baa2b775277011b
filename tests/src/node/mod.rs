//! The node agent that plays the kubelet in the test environment (there is no container
//! runtime on these machines).
//!
//! It registers a Node and keeps it Ready, watches the pods bound to it, and runs each
//! pod's containers as local processes ([`pod`]): one loopback address per pod
//! (`status.podIP`), the command, args and environment of the pod spec (fieldRef, Secret and
//! ConfigMap references included), volumes bind-mounted in a mount namespace of the
//! container's own, probes, the restart policy, and a graceful kill on deletion. Images map to
//! local binaries by name: the last path segment of the image's repository (`ghcr.io/x/weir:1`
//! runs `weir` from the image path). Service and pod DNS names resolve through a managed
//! block in the hosts file, built from the pods this agent runs (Endpoints cannot hold
//! loopback addresses). A Service's name resolves straight to its ready pods' addresses, so
//! a Service's port must equal its target port.

pub mod env;
pub mod exec;
pub mod pod;
pub mod probe;
pub mod volumes;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Container, Node, Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use self::env::ObjectSource;
use self::pod::PodUpdate;

/// CPUs the node reports (and a container without a CPU limit sees).
pub const NODE_CPUS: u64 = 64;
/// Memory the node reports.
pub const NODE_MEMORY_BYTES: u64 = 256 << 30;

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_name: String,
    /// Where pods' directories (volumes, logs) and pulled images go.
    pub state_dir: PathBuf,
    /// Directories searched for an image's binary.
    pub image_path: Vec<PathBuf>,
    /// First address of the pods' loopback range, and how many addresses it has.
    pub pod_network: (Ipv4Addr, u32),
    /// The hosts file that receives the managed DNS block.
    pub hosts_file: PathBuf,
    /// First and largest delay before a container is restarted.
    pub backoff: (Duration, Duration),
    /// Variables every container gets (the apiserver's address for in-cluster clients).
    pub pod_base_env: Vec<(String, String)>,
}

/// State shared by the agent's tasks.
pub struct Agent {
    pub client: Client,
    pub objects: ObjectSource,
    pub node_name: String,
    pub host_ip: String,
    pub state_dir: PathBuf,
    pub image_path: Vec<PathBuf>,
    pub self_exe: PathBuf,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub pod_base_env: Vec<(String, String)>,
    pub ips: Mutex<IpPool>,
    dns: Mutex<DnsState>,
    dns_changed: Notify,
    pids: Mutex<BTreeSet<i32>>,
    images: Mutex<HashMap<String, PathBuf>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("node_name", &self.node_name).finish_non_exhaustive()
    }
}

impl Agent {
    pub fn pod_dir(&self, ns: &str, name: &str) -> PathBuf {
        self.state_dir.join("pods").join(ns).join(name)
    }

    /// Records a running container's process group, so that `make env-down` can kill what a
    /// crashed agent left behind (`state_dir/pids`).
    pub fn track_pid(&self, pid: i32, running: bool) {
        let mut pids = self.pids.lock().unwrap();
        if running {
            pids.insert(pid);
        } else {
            pids.remove(&pid);
        }
        let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
        let _ = std::fs::write(self.state_dir.join("pids"), text);
    }

    /// The program and arguments of a container: `command` (resolved on the image path, then
    /// `PATH`) or the image's binary, then `args`.
    pub fn resolve_command(
        &self,
        image: &str,
        c: &Container,
    ) -> Result<(PathBuf, Vec<String>), String> {
        let args = c.args.clone().unwrap_or_default();
        match c.command.as_deref() {
            Some([prog, rest @ ..]) => {
                let p =
                    self.find_program(prog).ok_or_else(|| format!("command {prog:?} not found"))?;
                Ok((p, rest.iter().cloned().chain(args).collect()))
            }
            _ => Ok((self.pull(image)?, args)),
        }
    }

    fn find_program(&self, prog: &str) -> Option<PathBuf> {
        if prog.contains('/') {
            return Some(PathBuf::from(prog));
        }
        if let Some(p) = self.image_path.iter().map(|d| d.join(prog)).find(|p| p.is_file()) {
            return self.pull_file(prog, &p).ok();
        }
        std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).map(|d| d.join(prog)).find(|p| p.is_file()))
            .unwrap_or(None)
    }

    /// "Pulls" an image: copies its binary into the node's image store, so that a container
    /// running as any user can execute it wherever the build put it.
    fn pull(&self, image: &str) -> Result<PathBuf, String> {
        let name = image_binary(image);
        let src = self.image_path.iter().map(|d| d.join(&name)).find(|p| p.is_file()).ok_or_else(
            || format!("image {image:?}: no binary named {name:?} on the node's image path"),
        )?;
        self.pull_file(&name, &src)
    }

    fn pull_file(&self, name: &str, src: &Path) -> Result<PathBuf, String> {
        let mtime = std::fs::metadata(src).and_then(|m| m.modified()).map_err(|e| e.to_string())?;
        let stamp = mtime.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let key = format!("{name}-{stamp}");
        let mut images = self.images.lock().unwrap();
        if let Some(p) = images.get(&key) {
            return Ok(p.clone());
        }
        let dir = self.state_dir.join("images");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let dst = dir.join(&key);
        let tmp = dir.join(format!(".{key}.tmp"));
        std::fs::copy(src, &tmp).map_err(|e| format!("pulling {}: {e}", src.display()))?;
        std::fs::rename(&tmp, &dst).map_err(|e| e.to_string())?;
        images.insert(key, dst.clone());
        Ok(dst)
    }

    /// Publishes (or withdraws) a pod's DNS names.
    pub fn set_dns(&self, uid: &str, pod: &Pod, ip: Ipv4Addr, ready: bool) {
        let spec = pod.spec.as_ref();
        let entry = PodDns {
            ns: pod.metadata.namespace.clone().unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            hostname: spec.and_then(|s| s.hostname.clone()),
            subdomain: spec.and_then(|s| s.subdomain.clone()),
            ip,
            ready,
        };
        let mut dns = self.dns.lock().unwrap();
        if dns.pods.get(uid) != Some(&entry) {
            dns.pods.insert(uid.to_string(), entry);
            drop(dns);
            self.dns_changed.notify_one();
        }
    }

    pub fn dns_remove(&self, uid: &str) {
        if self.dns.lock().unwrap().pods.remove(uid).is_some() {
            self.dns_changed.notify_one();
        }
    }
}

/// The binary an image runs: the last path segment of its repository, without tag or digest.
pub fn image_binary(image: &str) -> String {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split(':').next().unwrap_or(last).to_string()
}

/// Loopback addresses for pods.
#[derive(Debug)]
pub struct IpPool {
    base: u32,
    size: u32,
    next: u32,
    free: BTreeSet<u32>,
}

impl IpPool {
    pub fn new(base: Ipv4Addr, size: u32) -> Self {
        Self { base: u32::from(base), size, next: 2, free: BTreeSet::new() }
    }

    /// The next address; addresses are reused only after the range has been gone through once,
    /// so a stale DNS answer does not reach a new pod.
    pub fn allocate(&mut self) -> Ipv4Addr {
        if self.next < self.size - 1 {
            self.next += 1;
            return Ipv4Addr::from(self.base + self.next - 1);
        }
        let off = self.free.pop_first().expect("the pod network is exhausted");
        Ipv4Addr::from(self.base + off)
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.free.insert(u32::from(ip) - self.base);
    }
}

#[derive(Debug, Clone, PartialEq)]
struct PodDns {
    ns: String,
    labels: BTreeMap<String, String>,
    hostname: Option<String>,
    subdomain: Option<String>,
    ip: Ipv4Addr,
    ready: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct ServiceDns {
    selector: Option<BTreeMap<String, String>>,
    publish_not_ready: bool,
}

#[derive(Debug, Default)]
struct DnsState {
    pods: BTreeMap<String, PodDns>,
    services: BTreeMap<(String, String), ServiceDns>,
}

impl DnsState {
    /// The hosts lines: each Service's names to its ready pods; each pod with a hostname and a
    /// subdomain (a StatefulSet's) to its address under that headless Service.
    fn render(&self) -> Vec<String> {
        let mut lines = BTreeSet::new();
        for ((ns, name), svc) in &self.services {
            let Some(sel) = &svc.selector else { continue };
            if sel.is_empty() {
                continue;
            }
            for p in self.pods.values() {
                if &p.ns == ns
                    && (p.ready || svc.publish_not_ready)
                    && sel.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                {
                    lines.insert(format!(
                        "{} {name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}.{ns}",
                        p.ip
                    ));
                }
            }
        }
        for p in self.pods.values() {
            if let (Some(h), Some(sub)) = (&p.hostname, &p.subdomain) {
                let publish = self
                    .services
                    .get(&(p.ns.clone(), sub.clone()))
                    .is_some_and(|s| s.publish_not_ready);
                if p.ready || publish {
                    let ns = &p.ns;
                    lines.insert(format!(
                        "{} {h}.{sub}.{ns}.svc.cluster.local {h}.{sub}.{ns}.svc",
                        p.ip
                    ));
                }
            }
        }
        lines.into_iter().collect()
    }
}

/// Replaces the managed block of `tag` in the hosts file (written in place: the file may be a
/// bind mount that a rename would not reach).
pub fn write_hosts_block(hosts: &Path, tag: &str, lines: &[String]) -> std::io::Result<()> {
    let begin = format!("# BEGIN weir-node {tag}");
    let end = format!("# END weir-node {tag}");
    let current = std::fs::read_to_string(hosts).unwrap_or_default();
    let mut out = String::new();
    let mut skipping = false;
    for l in current.lines() {
        if l == begin {
            skipping = true;
        } else if l == end {
            skipping = false;
        } else if !skipping {
            out.push_str(l);
            out.push('\n');
        }
    }
    if !lines.is_empty() {
        out.push_str(&begin);
        out.push('\n');
        for l in lines {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str(&end);
        out.push('\n');
    }
    if out != current {
        std::fs::write(hosts, out)?;
    }
    Ok(())
}

/// Registers the node and runs the agent until `shutdown` fires; then stops every pod's
/// processes and removes the DNS block.
pub async fn run(
    client: Client,
    cfg: NodeConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let agent = Arc::new(Agent {
        objects: ObjectSource { client: client.clone() },
        client: client.clone(),
        node_name: cfg.node_name.clone(),
        host_ip: "127.0.0.1".into(),
        state_dir: cfg.state_dir.clone(),
        image_path: cfg.image_path.clone(),
        self_exe: std::env::current_exe().context("locating weir-node")?,
        backoff_initial: cfg.backoff.0,
        backoff_max: cfg.backoff.1,
        pod_base_env: cfg.pod_base_env.clone(),
        ips: Mutex::new(IpPool::new(cfg.pod_network.0, cfg.pod_network.1)),
        dns: Mutex::new(DnsState::default()),
        dns_changed: Notify::new(),
        pids: Mutex::new(BTreeSet::new()),
        images: Mutex::new(HashMap::new()),
    });
    register_node(&client, &cfg.node_name).await?;
    info!(node = %cfg.node_name, "node registered and Ready");

    let heartbeat = tokio::spawn(heartbeat(client.clone(), cfg.node_name.clone()));
    let services = tokio::spawn(watch_services(agent.clone()));
    let hosts = {
        let agent = agent.clone();
        let (file, tag) = (cfg.hosts_file.clone(), cfg.node_name.clone());
        tokio::spawn(async move {
            loop {
                let lines = agent.dns.lock().unwrap().render();
                if let Err(e) = write_hosts_block(&file, &tag, &lines) {
                    warn!("writing {}: {e}", file.display());
                }
                agent.dns_changed.notified().await;
            }
        })
    };

    let pods: Api<Pod> = Api::all(client.clone());
    let stream = watcher::watcher(
        pods,
        watcher::Config::default().fields(&format!("spec.nodeName={}", cfg.node_name)),
    );
    let mut stream = std::pin::pin!(stream);
    let mut running: HashMap<String, (watch::Sender<PodUpdate>, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    let mut listed: Option<BTreeSet<String>> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => break,
            e = stream.try_next() => e,
        };
        let event = match event {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(e) => {
                warn!("pod watch: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        running.retain(|_, (_, h)| !h.is_finished());
        match event {
            Event::Init => listed = Some(BTreeSet::new()),
            Event::InitApply(p) | Event::Apply(p) => {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                if let Some(l) = listed.as_mut() {
                    l.insert(uid.clone());
                }
                if let Some((tx, _)) = running.get(&uid) {
                    let _ = tx.send(PodUpdate::Present(Box::new(p)));
                } else if should_start(&p) {
                    let (tx, rx) = watch::channel(PodUpdate::Present(Box::new(p)));
                    let h = tokio::spawn(pod::run_pod(agent.clone(), rx));
                    running.insert(uid, (tx, h));
                }
            }
            Event::Delete(p) => {
                if let Some((tx, _)) = running.get(p.metadata.uid.as_deref().unwrap_or_default()) {
                    let _ = tx.send(PodUpdate::Gone);
                }
            }
            Event::InitDone => {
                if let Some(seen) = listed.take() {
                    for (uid, (tx, _)) in &running {
                        if !seen.contains(uid) {
                            let _ = tx.send(PodUpdate::Gone);
                        }
                    }
                }
            }
        }
    }
    info!("shutting down: stopping all pods");
    for (_, (tx, h)) in running.drain() {
        let _ = tx.send(PodUpdate::Gone);
        let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
    }
    heartbeat.abort();
    services.abort();
    hosts.abort();
    write_hosts_block(&cfg.hosts_file, &cfg.node_name, &[]).ok();
    Ok(())
}

/// A pod is started when it has not finished and is not being deleted already.
fn should_start(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    p.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded") | Some("Failed"))
}

fn node_conditions(now: &str) -> serde_json::Value {
    let c = |t: &str, s: &str, reason: &str| {
        json!({"type": t, "status": s, "reason": reason, "message": reason,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!([
        c("Ready", "True", "KubeletReady"),
        c("MemoryPressure", "False", "KubeletHasSufficientMemory"),
        c("DiskPressure", "False", "KubeletHasNoDiskPressure"),
        c("PIDPressure", "False", "KubeletHasSufficientPID"),
    ])
}

async fn register_node(client: &Client, name: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(name).await?.is_none() {
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
        }))?;
        nodes.create(&PostParams::default(), &node).await.context("creating the Node")?;
    }
    // The kubelet version a node reports is that of the control plane it plays for.
    let version = client.apiserver_version().await.context("reading the apiserver's version")?;
    let kubelet_version = format!("{}-weir-node", version.git_version);
    let now = Timestamp::now().to_string();
    let capacity = json!({"cpu": NODE_CPUS.to_string(), "memory": format!("{}Ki", NODE_MEMORY_BYTES / 1024),
                          "pods": "1000", "ephemeral-storage": "1Ti"});
    let status = json!({"status": {
        "capacity": capacity, "allocatable": capacity,
        "conditions": node_conditions(&now),
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
        "nodeInfo": {"kubeletVersion": kubelet_version, "kubeProxyVersion": "", "operatingSystem": "linux",
                     "architecture": "amd64", "containerRuntimeVersion": "weir-node://0.1",
                     "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "weir test node"},
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("reporting node status")?;
    untaint(&nodes, name).await
}

/// Removes the `not-ready` taint that a hand-registered node starts with.
async fn untaint(nodes: &Api<Node>, name: &str) -> Result<()> {
    let node = nodes.get(name).await?;
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    let keep: Vec<_> =
        taints.iter().filter(|t| !t.key.starts_with("node.kubernetes.io/")).cloned().collect();
    if keep.len() != taints.len() {
        nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"taints": keep}})))
            .await?;
    }
    Ok(())
}

async fn heartbeat(client: Client, name: String) {
    let nodes: Api<Node> = Api::all(client);
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let now = Timestamp::now().to_string();
        let patch = json!({"status": {"conditions": node_conditions(&now)}});
        if let Err(e) =
            nodes.patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch)).await
        {
            warn!("node heartbeat: {e}");
        }
        if let Err(e) = untaint(&nodes, &name).await {
            warn!("node taints: {e}");
        }
    }
}

async fn watch_services(agent: Arc<Agent>) {
    let api: Api<Service> = Api::all(agent.client.clone());
    let mut stream = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
    let mut listing: Option<BTreeMap<(String, String), ServiceDns>> = None;
    while let Some(e) = stream.next().await {
        let e = match e {
            Ok(e) => e,
            Err(err) => {
                warn!("service watch: {err}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let key = |s: &Service| {
            (
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default(),
            )
        };
        let val = |s: &Service| ServiceDns {
            selector: s.spec.as_ref().and_then(|sp| sp.selector.clone()),
            publish_not_ready: s
                .spec
                .as_ref()
                .and_then(|sp| sp.publish_not_ready_addresses)
                .unwrap_or(false),
        };
        {
            let mut dns = agent.dns.lock().unwrap();
            match e {
                Event::Init => listing = Some(BTreeMap::new()),
                Event::InitApply(s) => {
                    if let Some(l) = listing.as_mut() {
                        l.insert(key(&s), val(&s));
                    }
                }
                Event::InitDone => {
                    if let Some(l) = listing.take() {
                        dns.services = l;
                    }
                }
                Event::Apply(s) => {
                    dns.services.insert(key(&s), val(&s));
                }
                Event::Delete(s) => {
                    dns.services.remove(&key(&s));
                }
            }
        }
        agent.dns_changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_map_to_binaries_by_name() {
        assert_eq!(image_binary("ghcr.io/weir-dev/weir:0.1.0"), "weir");
        assert_eq!(image_binary("weir-controller"), "weir-controller");
        assert_eq!(image_binary("localhost:5000/a/b@sha256:abc"), "b");
        assert_eq!(image_binary("busybox:1.36"), "busybox");
    }

    #[test]
    fn ip_pool_hands_out_distinct_addresses_and_reuses_late() {
        // A /28: .0 and .1 are not handed out, nor .15; that leaves 13.
        let mut pool = IpPool::new(Ipv4Addr::new(127, 9, 0, 0), 16);
        let a: Vec<_> = (0..6).map(|_| pool.allocate()).collect();
        assert_eq!(a[0], Ipv4Addr::new(127, 9, 0, 2));
        assert_eq!(a.iter().collect::<BTreeSet<_>>().len(), 6);
        pool.release(a[1]);
        let rest: Vec<_> = (0..7).map(|_| pool.allocate()).collect();
        assert!(!rest.contains(&a[1]), "a released address came back before the range was used up");
        assert_eq!(rest.last(), Some(&Ipv4Addr::new(127, 9, 0, 14)));
        assert_eq!(pool.allocate(), a[1]);
    }

    #[test]
    fn dns_block_names_services_and_statefulset_pods() {
        let mut s = DnsState::default();
        let labels: BTreeMap<String, String> = [("app".to_string(), "w".to_string())].into();
        s.services.insert(
            ("ns".into(), "w".into()),
            ServiceDns { selector: Some(labels.clone()), publish_not_ready: false },
        );
        s.pods.insert(
            "u1".into(),
            PodDns {
                ns: "ns".into(),
                labels: labels.clone(),
                hostname: Some("w-0".into()),
                subdomain: Some("w".into()),
                ip: Ipv4Addr::new(127, 9, 0, 2),
                ready: true,
            },
        );
        s.pods.insert(
            "u2".into(),
            PodDns {
                ns: "ns".into(),
                labels,
                hostname: Some("w-1".into()),
                subdomain: Some("w".into()),
                ip: Ipv4Addr::new(127, 9, 0, 3),
                ready: false,
            },
        );
        assert_eq!(
            s.render(),
            vec![
                "127.9.0.2 w-0.w.ns.svc.cluster.local w-0.w.ns.svc".to_string(),
                "127.9.0.2 w.ns.svc.cluster.local w.ns.svc w.ns".to_string(),
            ]
        );
    }

    #[test]
    fn hosts_block_is_replaced_and_removed_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("hosts");
        std::fs::write(&f, "127.0.0.1 localhost\n").unwrap();
        write_hosts_block(&f, "n1", &["127.9.0.2 a".into()]).unwrap();
        write_hosts_block(&f, "n1", &["127.9.0.3 b".into()]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            "127.0.0.1 localhost\n# BEGIN weir-node n1\n127.9.0.3 b\n# END weir-node n1\n"
        );
        write_hosts_block(&f, "n1", &[]).unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "127.0.0.1 localhost\n");
    }
}
