//! What an end-to-end test needs from the environment that `make env-up` started (its
//! settings come from `target/testenv/env.sh`, which `make e2e` sources): a client, a
//! namespace of the test's own, `kubectl`, and waiting with a clear message on timeout.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};

/// The running test environment.
#[derive(Clone)]
pub struct TestEnv {
    pub client: Client,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub repo: PathBuf,
}

impl std::fmt::Debug for TestEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestEnv").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// A required setting of the environment.
pub fn setting(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests run against the test environment. Run `make e2e`, \
             or `make env-up` and `source target/testenv/env.sh` first."
        )
    })
}

impl TestEnv {
    pub async fn get() -> Self {
        let dir = PathBuf::from(setting("WEIR_TESTENV_DIR"));
        let kubeconfig = PathBuf::from(setting("KUBECONFIG"));
        let client = Client::try_default().await.expect("a client for the test apiserver");
        let repo = crate::argocd::repo();
        Self { client, dir, kubeconfig, repo }
    }

    /// Creates a namespace `<prefix>-<random>` for one test.
    pub async fn namespace(&self, prefix: &str) -> String {
        let name = format!("{prefix}-{:08x}", rand_u32());
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &ns).await.expect("creating a test namespace");
        // Pods need the namespace's default ServiceAccount, which the controller-manager
        // makes (its tokens are asked for when a pod needs one: no Secret since 1.24).
        let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), &name);
        wait_for(
            &format!("the default ServiceAccount of {name}"),
            Duration::from_secs(30),
            || async { sa.get_opt("default").await.ok().flatten() },
        )
        .await;
        name
    }

    /// A namespace for a job's pods, whose Pod Security admission enforces the `restricted`
    /// level: what a platform team sets, and what the pods the controller builds must pass
    /// (non-root, no privilege escalation, all capabilities dropped, RuntimeDefault seccomp).
    pub async fn job_namespace(&self, prefix: &str) -> String {
        let name = self.namespace(prefix).await;
        let api: Api<Namespace> = Api::all(self.client.clone());
        let patch = serde_json::json!({"metadata": {"labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        }}});
        api.patch(&name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
            .await
            .expect("labelling the test namespace for Pod Security admission");
        name
    }

    pub async fn delete_namespace(&self, name: &str) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let _ = api.delete(name, &DeleteParams::default()).await;
    }

    /// Runs kubectl against the environment; returns (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        self.kubectl_stdin(args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        use std::io::Write;
        let mut cmd = Command::new("kubectl");
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("running kubectl");
        {
            let mut input = child.stdin.take().unwrap();
            if let Some(s) = stdin {
                input.write_all(s.as_bytes()).unwrap();
            }
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The Secret `s3-credentials` in `ns`, holding the test S3 server's keys as
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (what `spec.s3.credentialsSecret`
    /// names by default).
    pub async fn create_s3_credentials(&self, ns: &str) {
        let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(self.client.clone(), ns);
        let s = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s3-credentials"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": setting("AWS_ACCESS_KEY_ID"),
                "AWS_SECRET_ACCESS_KEY": setting("AWS_SECRET_ACCESS_KEY"),
            },
        }))
        .expect("a Secret");
        api.create(&PostParams::default(), &s).await.expect("creating Secret s3-credentials");
    }

    /// A binary of this workspace (`cargo build --workspace --bins` builds them).
    pub fn binary(&self, name: &str) -> PathBuf {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| self.repo.join("target"));
        target.join("debug").join(name)
    }

    /// A container's log file as the node agent writes it.
    pub fn container_log(&self, ns: &str, pod: &str, container: &str) -> String {
        std::fs::read_to_string(
            self.dir.join("node/pods").join(ns).join(pod).join(format!("{container}.log")),
        )
        .unwrap_or_default()
    }

    /// Applies the generated CRDs and waits until they are established.
    pub fn install_crds(&self) {
        let crds = self.repo.join("crds/weir-crds.yaml");
        let (ok, _, err) = self.kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            crds.to_str().unwrap(),
        ]);
        assert!(ok, "applying the CRDs: {err}");
        let (ok, _, err) = self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/streamjobs.weir.dev",
            "crd/streamsnapshots.weir.dev",
        ]);
        assert!(ok, "CRDs not established: {err}");
    }
}

/// Polls `f` (every 200 ms) until it returns `Some`, panicking with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos(),
    );
    h.finish() as u32
}
