//! The Weir operator: turns an applied StreamJob into a running job and tells the truth about
//! it in its status.
//!
//! One reconcile of one StreamJob is a pipeline:
//!
//! ```text
//!   read        the StreamJob, the existence of its objects (metadata stores fed by the same
//!               watches that trigger reconciles), the credentials Secret it names
//!   validate    pure: validate::validate           refusal → Degraded + Warning event,
//!                                                   a running job left untouched
//!   build       pure: build::objects               ConfigMap, Services, Deployment, StatefulSet
//!               (and build::network_policy, apart from the run)
//!   act         server-side apply of each object whose applied hash differs (or delete them
//!               all when suspended); every step idempotent
//!   observe     GET /v1/job from the coordinator
//!   status      pure: status::next, written only when it changed; status::notes → Events
//! ```
//!
//! [`run`] drives it with kube's controller runtime; `main.rs` adds the flags, the logs, the
//! metrics server and leader election.

pub mod build;
pub mod coordinator;
pub mod lifecycle;
pub mod metrics;
pub mod retention;
pub mod status;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};
use weir_crds::streamjob::{DesiredState, JobPhase};
use weir_crds::{FIELD_MANAGER, LABEL_JOB, StreamJob};

use crate::metrics::Metrics;
use crate::status::Observation;
use crate::validate::{Defaults, Invalid, Observed};

/// Settings of the controller.
#[derive(Debug, Clone)]
pub struct Config {
    pub build: build::BuildConfig,
    pub defaults: Defaults,
    /// Namespaces watched; empty means all.
    pub namespaces: Vec<String>,
    /// How often a running job's coordinator is read.
    pub poll: Duration,
    /// Name of this replica in events.
    pub instance: Option<String>,
}

/// Why a reconcile failed; the category labels the failure metric.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Kubernetes API refused {what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading the system's random source for the API token or the job's secret: {0}")]
    Random(std::io::Error),
    #[error("{0}")]
    Coordinator(String),
    #[error("{0}")]
    Status(String),
}

impl Error {
    /// A short label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube { source: kube::Error::Api(s), .. } if s.code == 409 => "conflict",
            Error::Kube { source: kube::Error::Api(s), .. } if s.code == 403 => "forbidden",
            Error::Kube { .. } => "kube_api",
            Error::Random(_) => "random",
            Error::Coordinator(_) => "coordinator",
            Error::Status(_) => "status",
        }
    }
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Kube { what, source }
}

/// The metadata of one kind of owned object, as watched.
type MetaStore<K> = Store<PartialObjectMeta<K>>;

/// Which owned objects exist, and the hash they were applied with.
#[derive(Clone)]
pub struct Stores {
    config_maps: MetaStore<ConfigMap>,
    services: MetaStore<Service>,
    deployments: MetaStore<Deployment>,
    stateful_sets: MetaStore<StatefulSet>,
    network_policies: MetaStore<NetworkPolicy>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

fn applied_hash<K: Resource<DynamicType = ()> + Clone>(
    store: &MetaStore<K>,
    ns: &str,
    name: &str,
) -> Option<Option<String>>
where
    PartialObjectMeta<K>: Resource<DynamicType = ()> + Clone,
{
    store
        .get(&ObjectRef::new(name).within(ns))
        .map(|m| m.annotations().get(build::APPLIED_HASH).cloned())
}

/// Whether the object `name` of the store is there with a deletion timestamp.
fn being_deleted<K: Resource<DynamicType = ()> + Clone>(
    store: &MetaStore<K>,
    ns: &str,
    name: &str,
) -> bool
where
    PartialObjectMeta<K>: Resource<DynamicType = ()> + Clone,
{
    store
        .get(&ObjectRef::new(name).within(ns))
        .is_some_and(|m| m.metadata.deletion_timestamp.is_some())
}

/// What a reconcile needs.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub stores: Stores,
    /// When retention last went over each job's snapshots (`namespace/name`).
    pub retention_passes: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Jobs (by uid) whose Secrets (API token, job secret) are known to exist. Secrets are not
    /// watched: that would need `list` and `watch` on every Secret of the namespaces (RBAC
    /// cannot narrow a list to a label), so the controller only `get`s and `create`s the
    /// Secrets it names.
    pub tokens: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Failed attempts at deleting a deleted job's checkpoints (`onCancel: delete`), by uid.
    pub cleanups: std::sync::Mutex<std::collections::HashMap<String, i32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The finalizer that makes deleting a job in savepoint mode take a final savepoint first.
pub const FINALIZER: &str = "weir.dev/final-savepoint";
/// Attempts at the final savepoint before a deleted job is let go without one.
const FINAL_SAVEPOINT_ATTEMPTS: i32 = 3;
/// Attempts at deleting a deleted job's checkpoints (`onCancel: delete`) before it is let go
/// with what is left of them.
const CHECKPOINT_DELETE_ATTEMPTS: i32 = 3;

/// Reconciles one StreamJob (see the crate's documentation for the steps).
pub async fn reconcile(job: Arc<StreamJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile();
    let ns = job.namespace().unwrap_or_else(|| "default".into());
    let name = job.name_any();
    let exists = ctx.deployed(&ns, &name);
    let addr = build::api_address(&job, &ctx.config.build);
    let old = job.status.clone().unwrap_or_default();
    if job.metadata.deletion_timestamp.is_some() {
        return ctx.finalize(&job, &ns, &name, exists, &addr, old).await;
    }

    // Read.
    let observed = Observed { credentials_secret: ctx.credentials_secret(&job, &ns).await? };
    let mut info = if exists { Some(coordinator::job(&addr).await) } else { None };

    // Validate.
    let validation = validate::validate(&job, &observed, &ctx.config.defaults);

    // Act: one step of whatever is under way, each recorded in the status before it is taken.
    let mut written = old.clone();
    let mut st = old.clone();
    let mut step = Step { problem: None, requeue: None, applied: Vec::new(), deployed: exists };
    match (&validation, job.spec.state) {
        (Err(_), _) => {}
        (Ok(valid), DesiredState::Running) => {
            ctx.run(&job, valid, &observed, info.as_ref(), &mut st, &mut written, &mut step)
                .await?;
        }
        (Ok(_), DesiredState::Suspended) => {
            ctx.suspend(&job, info.as_ref(), &mut st, &mut written, &mut step).await?;
        }
    }
    if step.deployed && !exists {
        info = Some(coordinator::job(&addr).await);
    } else if !step.deployed {
        info = None;
    }

    // Status, from the coordinator of the run deployed: another one answering is one on its
    // way out (an upgrade's old job, or the job of a StreamJob deleted under the same name).
    let job_id = st.deployed.as_ref().map_or_else(|| build::job_id(&job), |d| d.job_id.clone());
    let info = info.map(|r| match r {
        Ok(i) if !i.job_id.is_empty() && i.job_id != job_id && st.upgrade.is_none() => Err(format!(
            "the coordinator that answers runs job id {}, not {job_id}: the new one is not up yet",
            i.job_id
        )),
        r => r,
    });
    let invalid: Option<&Invalid> = validation.as_ref().err();
    let obs = Observation {
        invalid,
        deployed: step.deployed,
        coordinator: info,
        job_id,
        selector: build::worker_selector(&name),
        problem: step.problem.clone(),
    };
    let new = status::next(&job, &st, &obs, &Time(Timestamp::now()));
    if !step.applied.is_empty() {
        let verb = if exists { "applied" } else { "created" };
        ctx.publish(&job, false, "Deployed", format!("{verb} {}", step.applied.join(", "))).await;
    }
    for n in status::notes(&old, &new) {
        ctx.publish(&job, n.warning, n.reason, n.message).await;
    }
    ctx.save_status(&job, &mut written, &new).await?;
    let phase = new.phase.map(|p| format!("{p:?}")).unwrap_or_default();
    ctx.metrics.job(
        &ns,
        &name,
        &phase,
        new.last_checkpoint.as_ref().map(|c| c.completed_at.0.as_millisecond()),
    );

    if let Some(after) = step.requeue {
        return Ok(Action::requeue(after));
    }
    Ok(match (&validation, new.phase) {
        (Err(e), _) if e.external => Action::requeue(Duration::from_secs(60)),
        (Err(_), _) if !step.deployed => Action::await_change(),
        (_, Some(JobPhase::Suspended | JobPhase::Created)) => Action::await_change(),
        (_, Some(JobPhase::Finished | JobPhase::Failed)) => {
            Action::requeue(Duration::from_secs(60))
        }
        (_, Some(JobPhase::Deploying | JobPhase::Upgrading | JobPhase::RollingBack)) => {
            Action::requeue(Duration::from_secs(1).min(ctx.config.poll))
        }
        _ => Action::requeue(ctx.config.poll),
    })
}

/// What one reconcile's act step did and learned.
#[derive(Debug)]
struct Step {
    /// Degraded's reason and message, when the step found a problem.
    problem: Option<(&'static str, String)>,
    /// Look again after this long instead of the phase's usual interval.
    requeue: Option<Duration>,
    /// Objects applied.
    applied: Vec<String>,
    /// Whether the job's objects exist after the step.
    deployed: bool,
}

/// After a failed reconcile: count it, and retry after a while.
pub fn error_policy(job: Arc<StreamJob>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failures.with_label_values(&[err.category()]).inc();
    warn!(job = %job.name_any(), namespace = ?job.namespace(), reason = err.category(), "reconcile failed: {err}");
    Action::requeue(Duration::from_secs(5))
}

impl Context {
    /// The data of the Secret `spec.s3.credentialsSecret` names, if the job names one and it
    /// exists.
    pub(crate) async fn credentials_secret(
        &self,
        job: &StreamJob,
        ns: &str,
    ) -> Result<Option<std::collections::BTreeMap<String, k8s_openapi::ByteString>>, Error> {
        let Some(secret) = job.spec.s3.as_ref().and_then(|s| s.credentials_secret.as_ref()) else {
            return Ok(None);
        };
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let found = api
            .get_opt(&secret.name)
            .await
            .map_err(kube_err(format!("reading Secret {ns}/{}", secret.name)))?;
        Ok(found.map(|s| {
            let mut data = s.data.unwrap_or_default();
            for (k, v) in s.string_data.unwrap_or_default() {
                data.insert(k, k8s_openapi::ByteString(v.into_bytes()));
            }
            data
        }))
    }

    fn deployed(&self, ns: &str, name: &str) -> bool {
        let s = &self.stores;
        applied_hash(&s.config_maps, ns, &build::config_map_name(name)).is_some()
            || applied_hash(&s.deployments, ns, &build::coordinator_name(name)).is_some()
            || applied_hash(&s.stateful_sets, ns, &build::workers_name(name)).is_some()
            || applied_hash(&s.services, ns, &build::coordinator_name(name)).is_some()
            || applied_hash(&s.services, ns, &build::workers_name(name)).is_some()
    }

    /// Applies `obj` unless the one in the cluster carries the same applied hash.
    async fn apply_if_changed<K>(
        &self,
        store: &MetaStore<K>,
        ns: &str,
        obj: K,
        applied: &mut Vec<String>,
    ) -> Result<(), Error>
    where
        K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
        K::Scope: Send,
        PartialObjectMeta<K>: Resource<DynamicType = ()> + Clone,
        K: Resource<Scope = kube::core::NamespaceResourceScope>,
    {
        let name = obj.name_any();
        let want = obj.annotations().get(build::APPLIED_HASH).cloned();
        if applied_hash(store, ns, &name) == Some(want) {
            return Ok(());
        }
        let kind = K::kind(&());
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        api.patch(&name, &apply_params(), &Patch::Apply(&obj))
            .await
            .map_err(kube_err(format!("applying {kind} {ns}/{name}")))?;
        info!(namespace = ns, "applied {kind} {name}");
        applied.push(format!("{kind} {name}"));
        Ok(())
    }

    /// Creates the job's two Secrets when they do not exist: the API token (`<job>-api-token`)
    /// and the job's secret (`<job>-job-secret`); never rewrites one, and never patches any
    /// (the controller's role has `get` and `create` on Secrets, nothing more). Looked up once
    /// per job and controller process, and again after a suspend; a Secret deleted by hand
    /// comes back when the controller restarts or the job resumes. False while a Secret found
    /// belongs to another job of the same name (one deleted, whose Secrets the garbage
    /// collector is about to remove), or another replica or attempt created one meanwhile:
    /// the caller waits and looks again.
    async fn ensure_secrets(&self, job: &StreamJob, ns: &str, name: &str) -> Result<bool, Error> {
        let uid = token_key(job, ns, name);
        if self.tokens.lock().unwrap().contains(&uid) {
            return Ok(true);
        }
        let token = build::token_secret_name(name);
        if !self
            .ensure_secret(ns, &token, &uid, || Ok(build::api_token(job, &random_hex::<24>()?)))
            .await?
        {
            return Ok(false);
        }
        let secret = build::job_secret_name(name);
        if !self
            .ensure_secret(ns, &secret, &uid, || Ok(build::job_secret(job, &random_hex::<32>()?)))
            .await?
        {
            return Ok(false);
        }
        self.tokens.lock().unwrap().insert(uid);
        Ok(true)
    }

    /// Creates Secret `secret_name` of the job with uid `uid` from `make` unless it exists;
    /// whether it exists now (see [`Context::ensure_secrets`]).
    async fn ensure_secret(
        &self,
        ns: &str,
        secret_name: &str,
        uid: &str,
        make: impl FnOnce() -> Result<Secret, Error>,
    ) -> Result<bool, Error> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let found = api
            .get_opt(secret_name)
            .await
            .map_err(kube_err(format!("reading Secret {ns}/{secret_name}")))?;
        match found {
            Some(s) if is_going(&s, uid) => {
                info!(namespace = ns, "waiting for Secret {secret_name} of a deleted job to go");
                Ok(false)
            }
            Some(_) => Ok(true),
            None => match api.create(&PostParams::default(), &make()?).await {
                Ok(_) => {
                    info!(namespace = ns, "created Secret {secret_name}");
                    Ok(true)
                }
                // Another replica's or an earlier attempt's: looked at again next time.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(kube_err(format!("creating Secret {ns}/{secret_name}"))(e)),
            },
        }
    }

    /// The job's NetworkPolicy as its spec wants it: applied (when missing or changed) while
    /// `spec.networkPolicy.enabled`, else deleted when it exists. Not part of the run: turning
    /// it on or off restarts nothing.
    async fn ensure_network_policy(
        &self,
        job: &StreamJob,
        ns: &str,
        name: &str,
        applied: &mut Vec<String>,
    ) -> Result<(), Error> {
        let s = &self.stores;
        if job.spec.network_policy.enabled {
            let np = build::network_policy(job, &self.config.build);
            return self.apply_if_changed(&s.network_policies, ns, np, applied).await;
        }
        self.delete_network_policy(ns, name).await
    }

    async fn delete_network_policy(&self, ns: &str, name: &str) -> Result<(), Error> {
        let n = build::network_policy_name(name);
        if applied_hash(&self.stores.network_policies, ns, &n).is_none() {
            return Ok(());
        }
        let api: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), ns);
        match api.delete(&n, &DeleteParams::background()).await {
            Ok(_) => info!(namespace = ns, "deleted NetworkPolicy {n}"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(kube_err(format!("deleting NetworkPolicy {ns}/{n}"))(e)),
        }
        Ok(())
    }

    /// Forgets that the job's Secrets were seen, so that they are looked at again before the
    /// pods come back (after a suspend: a `<job>-job-secret` deleted meanwhile is made anew,
    /// which is how a job's secret is replaced).
    pub(crate) fn forget_secrets(&self, job: &StreamJob, ns: &str, name: &str) {
        self.tokens.lock().unwrap().remove(&token_key(job, ns, name));
    }

    /// Deletes the job's objects (those that exist).
    async fn delete_objects(&self, ns: &str, name: &str) -> Result<(), Error> {
        let s = &self.stores;
        let dp = DeleteParams::background();
        macro_rules! delete {
            ($store:expr, $k:ty, $n:expr) => {
                let n = $n;
                if applied_hash(&$store, ns, &n).is_some() {
                    let api: Api<$k> = Api::namespaced(self.client.clone(), ns);
                    match api.delete(&n, &dp).await {
                        Ok(_) => info!(namespace = ns, "deleted {} {n}", stringify!($k)),
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => {
                            return Err(kube_err(format!("deleting {} {ns}/{n}", stringify!($k)))(
                                e,
                            ));
                        }
                    }
                }
            };
        }
        delete!(s.deployments, Deployment, build::coordinator_name(name));
        delete!(s.stateful_sets, StatefulSet, build::workers_name(name));
        delete!(s.services, Service, build::coordinator_name(name));
        delete!(s.services, Service, build::workers_name(name));
        delete!(s.config_maps, ConfigMap, build::config_map_name(name));
        // No pods, nothing to let in: it comes back before them.
        self.delete_network_policy(ns, name).await?;
        Ok(())
    }

    /// Deletes the job's coordinator Deployment and worker StatefulSet in the foreground (each
    /// goes only once its pods have) and says whether both are gone: then no process of the
    /// job writes to its storage any more.
    pub(crate) async fn pods_gone(&self, ns: &str, name: &str) -> Result<bool, Error> {
        let s = &self.stores;
        let coordinator = build::coordinator_name(name);
        let workers = build::workers_name(name);
        let a = self.delete_in_foreground(&s.deployments, ns, &coordinator).await?;
        let b = self.delete_in_foreground(&s.stateful_sets, ns, &workers).await?;
        Ok(a && b)
    }

    /// Whether the job's coordinator Deployment or worker StatefulSet is being deleted (its
    /// pods on their way out).
    pub(crate) fn pods_going(&self, ns: &str, name: &str) -> bool {
        let s = &self.stores;
        being_deleted(&s.deployments, ns, &build::coordinator_name(name))
            || being_deleted(&s.stateful_sets, ns, &build::workers_name(name))
    }

    /// Deletes `name` in the foreground unless it is gone or going; whether it is gone.
    async fn delete_in_foreground<K>(
        &self,
        store: &MetaStore<K>,
        ns: &str,
        name: &str,
    ) -> Result<bool, Error>
    where
        K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
        PartialObjectMeta<K>: Resource<DynamicType = ()> + Clone,
    {
        if store.get(&ObjectRef::new(name).within(ns)).is_none() {
            return Ok(true);
        }
        if being_deleted(store, ns, name) {
            return Ok(false);
        }
        let kind = K::kind(&());
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        match api.delete(name, &DeleteParams::foreground()).await {
            Ok(_) => {
                info!(namespace = ns, "deleting {kind} {name} and its pods");
                Ok(false)
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(true),
            Err(e) => Err(kube_err(format!("deleting {kind} {ns}/{name}"))(e)),
        }
    }

    pub(crate) async fn publish(&self, job: &StreamJob, warning: bool, reason: &str, note: String) {
        let ev = KubeEvent {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.to_string(),
            note: Some(truncate(note, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &job.object_ref(&())).await {
            warn!(job = %job.name_any(), "publishing event {reason}: {e}");
        }
    }
}

/// What [`Context::tokens`] knows a job by.
fn token_key(job: &StreamJob, ns: &str, name: &str) -> String {
    job.uid().unwrap_or_else(|| format!("{ns}/{name}"))
}

/// `N` bytes of the system's random source, as 2N hex digits.
fn random_hex<const N: usize>() -> Result<String, Error> {
    use std::io::Read;
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(Error::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether a job's token Secret is on its way out: being deleted, or owned by other objects
/// only (a deleted job of the same name, which the garbage collector removes it with).
fn is_going(secret: &Secret, job_uid: &str) -> bool {
    let owners = secret.metadata.owner_references.as_deref().unwrap_or_default();
    secret.metadata.deletion_timestamp.is_some()
        || (!owners.is_empty() && owners.iter().all(|o| o.uid != job_uid))
}

/// `s` cut to at most `max` bytes (at a character boundary): events' notes, and the
/// coordinator's texts the status repeats ([`coordinator::bounded`]).
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Watches a kind's objects labelled with a job, as metadata: a store of them, and the stream
/// that triggers their owners' reconciles.
fn owned<K>(
    client: &Client,
    ns: Option<&str>,
) -> (
    MetaStore<K>,
    impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    PartialObjectMeta<K>: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Send
        + Sync
        + std::fmt::Debug,
{
    let api: Api<PartialObjectMeta<K>> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (reader, writer) = reflector::store();
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default().labels(LABEL_JOB)))
            .default_backoff()
            .touched_objects();
    (reader, stream)
}

/// Runs the controller for every namespace of `config` until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: config.instance.clone() };
    let recorder = Recorder::new(client.clone(), reporter);
    let mut runs = Vec::new();
    for scope in scopes {
        let ns = scope.as_deref();
        let (config_maps, cm) = owned::<ConfigMap>(&client, ns);
        let (services, sv) = owned::<Service>(&client, ns);
        let (deployments, dp) = owned::<Deployment>(&client, ns);
        let (stateful_sets, ss) = owned::<StatefulSet>(&client, ns);
        let (network_policies, np) = owned::<NetworkPolicy>(&client, ns);
        let stores = Stores { config_maps, services, deployments, stateful_sets, network_policies };
        let jobs: Api<StreamJob> = match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let ctx = Arc::new(Context {
            client: client.clone(),
            config: config.clone(),
            metrics: metrics.clone(),
            recorder: recorder.clone(),
            stores,
            retention_passes: Default::default(),
            tokens: Default::default(),
            cleanups: Default::default(),
        });
        info!(namespace = ns.unwrap_or("(all)"), "watching StreamJobs");
        let controller = Controller::new(jobs, watcher::Config::default())
            .owns_stream(cm)
            .owns_stream(sv)
            .owns_stream(dp)
            .owns_stream(ss)
            .owns_stream(np)
            .graceful_shutdown_on(shutdown.clone())
            .run(reconcile, error_policy, ctx)
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!("reconcile: {e}");
                }
            });
        runs.push(controller);
    }
    futures::future::join_all(runs).await;
}

/// How the controller applies what it builds: server-side, as its one field manager, taking
/// the fields it owns back from anyone, and with strict field validation, so that a field the
/// apiserver does not know (a typo in the builder, or a field of a newer Kubernetes than the
/// cluster's) is an error naming it instead of a warning header nobody reads.
pub(crate) fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force().validation_strict()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(owners: &[&str], deleting: bool) -> Secret {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "wc-api-token",
                "deletionTimestamp": deleting.then_some("2026-11-21T12:00:00Z"),
                "ownerReferences": owners.iter().map(|uid| serde_json::json!({
                    "apiVersion": "weir.dev/v1alpha1", "kind": "StreamJob", "name": "wc", "uid": uid,
                })).collect::<Vec<_>>(),
            },
        }))
        .unwrap()
    }

    /// The same for both of a job's Secrets, `<job>-api-token` and `<job>-job-secret`.
    #[test]
    fn a_secret_of_a_deleted_job_of_the_same_name_is_waited_for() {
        assert!(!is_going(&secret(&["new"], false), "new"), "the job's own");
        assert!(is_going(&secret(&["old"], false), "new"), "a deleted job's, not yet collected");
        assert!(is_going(&secret(&["new"], true), "new"), "being deleted");
        assert!(!is_going(&secret(&[], false), "new"), "made by hand: used as it is");
    }

    #[test]
    fn random_hex_draws_n_bytes_anew_each_time_as_lowercase_hex() {
        let (a, b) = (random_hex::<32>().unwrap(), random_hex::<32>().unwrap());
        assert_eq!(a.len(), 64, "at least the 32 bytes the runtime asks for");
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{a}");
        assert_ne!(a, b);
        assert_eq!(random_hex::<24>().unwrap().len(), 48);
    }
}
