//! The cluster the commands talk to, chosen like kubectl chooses it (the kubeconfig in
//! `KUBECONFIG` or `~/.kube/config`, its current context unless `--context` names another,
//! in-cluster when there is none), and the errors of talking to it in words that say what to
//! do. No credential of the kubeconfig is ever printed: errors name the server and the
//! context, never a token or a key.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Namespace;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use weir_crds::StreamJob;

use crate::Failure;

/// How to reach the cluster, from the global flags.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// `--kubeconfig`: a kubeconfig file instead of `KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// `--context`: a context of the kubeconfig instead of its current one.
    pub context: Option<String>,
    /// `-n/--namespace`: instead of the context's namespace.
    pub namespace: Option<String>,
}

/// A connection to the cluster and the namespace the commands work in.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    /// The namespace: `-n`, else the context's, else `default`.
    pub namespace: String,
    /// The API server's address, for errors (no credentials in it).
    pub server: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("namespace", &self.namespace)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    pub async fn connect(t: &Target) -> Result<Self, Failure> {
        let options = KubeConfigOptions { context: t.context.clone(), ..Default::default() };
        let config = match (&t.kubeconfig, &t.context) {
            (Some(path), _) => {
                let file = Kubeconfig::read_from(path).map_err(|e| {
                    Failure::Failed(format!("reading the kubeconfig {}: {e}", path.display()))
                })?;
                Config::from_custom_kubeconfig(file, &options).await.map_err(|e| {
                    Failure::Failed(format!("the kubeconfig {}: {e}", path.display()))
                })?
            }
            // A context named on the command line must come from a kubeconfig.
            (None, Some(ctx)) => Config::from_kubeconfig(&options).await.map_err(|e| {
                Failure::Failed(format!(
                    "context {ctx:?}: {e} (kubectl config get-contexts lists the contexts)"
                ))
            })?,
            (None, None) => Config::infer().await.map_err(|e| {
                Failure::Failed(format!(
                    "no cluster to talk to: {e}; set KUBECONFIG or --kubeconfig, or run in a pod"
                ))
            })?,
        };
        let server = config.cluster_url.to_string();
        let namespace = t.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config)
            .map_err(|e| Failure::Failed(format!("a client for {server}: {e}")))?;
        Ok(Self { client, namespace, server })
    }

    pub fn jobs(&self) -> Api<StreamJob> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// A kube error while doing `what`, in words: a missing CRD, no access, no server.
    pub fn error(&self, what: &str, e: kube::Error) -> Failure {
        Failure::Failed(describe(what, &self.server, e))
    }

    /// StreamJob `name` of the namespace; a clear error when it or the namespace is missing.
    pub async fn job(&self, name: &str) -> Result<StreamJob, Failure> {
        match self.jobs().get_opt(name).await {
            Ok(Some(j)) => Ok(j),
            Ok(None) => {
                self.namespace_exists().await?;
                Err(Failure::Failed(format!(
                    "streamjob {name:?} not found in namespace {:?} (kubectl weir jobs lists them)",
                    self.namespace
                )))
            }
            Err(e) => Err(self.error(&format!("reading streamjob {name:?}"), e)),
        }
    }

    /// An error when the namespace does not exist (a list in it is empty rather than an
    /// error, and a get says only that the object is not there). Someone allowed to read
    /// StreamJobs but not Namespaces gets the benefit of the doubt.
    pub async fn namespace_exists(&self) -> Result<(), Failure> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        match api.get_opt(&self.namespace).await {
            Ok(None) => Err(Failure::Failed(format!(
                "namespace {:?} not found (kubectl get namespaces lists them; -n picks one)",
                self.namespace
            ))),
            _ => Ok(()),
        }
    }
}

/// A kube error while doing `what` against `server`.
pub fn describe(what: &str, server: &str, e: kube::Error) -> String {
    match e {
        kube::Error::Api(s)
            if s.code == 404 && s.message.contains("could not find the requested resource") =>
        {
            format!(
                "{what}: the cluster at {server} does not know StreamJobs or StreamSnapshots: install Weir's CRDs (kubectl apply --server-side -f crds/weir-crds.yaml, or the Helm chart)"
            )
        }
        kube::Error::Api(s) if s.code == 403 => {
            format!("{what}: forbidden: {} (kubectl auth can-i lists what you may do)", s.message)
        }
        kube::Error::Api(s) if s.code == 401 => format!(
            "{what}: the cluster at {server} did not accept your credentials ({}); log in again or pick another context",
            s.message
        ),
        kube::Error::Api(s) => format!("{what}: {} ({})", s.message, s.reason),
        other => format!(
            "{what}: cannot talk to the Kubernetes API at {server}: {other} (is the cluster up, and is the kubeconfig's context the right one?)"
        ),
    }
}
