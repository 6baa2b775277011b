//! A container's environment as the kubelet builds it: `envFrom`, then `env` (literal values
//! with `$(VAR)` expansion, `fieldRef`, `resourceFieldRef`, `secretKeyRef`,
//! `configMapKeyRef`), on top of the variables every container gets.

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVarSource, Pod, Secret, ServiceAccount};
use kube::Api;
use kube::api::PostParams;

/// Why a container's environment could not be built (the kubelet's
/// `CreateContainerConfigError`).
pub type ConfigError = String;

/// Reads the Secrets and ConfigMaps a pod refers to.
#[derive(Clone)]
pub struct ObjectSource {
    pub client: kube::Client,
}

impl std::fmt::Debug for ObjectSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObjectSource")
    }
}

impl ObjectSource {
    pub async fn secret(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, ConfigError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let s = api.get_opt(name).await.map_err(|e| format!("reading secret {ns}/{name}: {e}"))?;
        Ok(s.map(|s| {
            let mut out: BTreeMap<String, Vec<u8>> =
                s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
            for (k, v) in s.string_data.unwrap_or_default() {
                out.insert(k, v.into_bytes());
            }
            out
        }))
    }

    /// A token of the pod's ServiceAccount, bound to the pod, as the kubelet asks for one for
    /// a projected `serviceAccountToken` (the `kube-api-access-*` volume every pod gets since
    /// 1.24 unless it opts out). Not refreshed: the tests' pods live shorter than it.
    pub async fn service_account_token(
        &self,
        pod: &Pod,
        audience: Option<&str>,
        expiration_seconds: Option<i64>,
    ) -> Result<String, ConfigError> {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let spec = pod.spec.as_ref();
        let sa = spec.and_then(|s| s.service_account_name.as_deref()).unwrap_or("default");
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(audience.map(|a| vec![a.to_string()]).unwrap_or_default()),
                expiration_seconds: Some(expiration_seconds.unwrap_or(3600)),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let answer = api
            .create_token_request(sa, &PostParams::default(), &request)
            .await
            .map_err(|e| format!("requesting a token of serviceaccount {ns}/{sa}: {e}"))?;
        answer
            .status
            .and_then(|s| s.token)
            .ok_or_else(|| format!("the token request of serviceaccount {ns}/{sa} has no token"))
    }

    pub async fn config_map(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, ConfigError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let c =
            api.get_opt(name).await.map_err(|e| format!("reading configmap {ns}/{name}: {e}"))?;
        Ok(c.map(|c| {
            let mut out: BTreeMap<String, Vec<u8>> =
                c.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
            for (k, v) in c.binary_data.unwrap_or_default() {
                out.insert(k, v.0);
            }
            out
        }))
    }
}

/// Facts about the pod that `fieldRef` can refer to beyond its object.
#[derive(Debug, Clone)]
pub struct PodFacts {
    pub pod_ip: String,
    pub host_ip: String,
    pub node_name: String,
}

/// Builds the environment of `container` (base variables first, later entries win).
pub async fn container_env(
    objects: &ObjectSource,
    pod: &Pod,
    container: &Container,
    facts: &PodFacts,
    base: &[(String, String)],
) -> Result<Vec<(String, String)>, ConfigError> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut env: Vec<(String, String)> = base.to_vec();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(n, _)| n != &k);
        env.push((k, v));
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (data, what, optional) = if let Some(r) = &from.config_map_ref {
            (objects.config_map(ns, &r.name).await?, format!("configmap {:?}", r.name), r.optional)
        } else if let Some(r) = &from.secret_ref {
            (objects.secret(ns, &r.name).await?, format!("secret {:?}", r.name), r.optional)
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (k, v) in data {
                    let name = format!("{prefix}{k}");
                    if is_env_name(&name) {
                        set(&mut env, name, String::from_utf8_lossy(&v).into_owned());
                    }
                }
            }
            None if optional == Some(true) => {}
            None => return Err(format!("{what} not found")),
        }
    }
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => {
                let lookup: BTreeMap<&str, &str> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                expand(var.value.as_deref().unwrap_or(""), |n| lookup.get(n).map(|s| s.to_string()))
            }
            Some(src) => match value_from(objects, pod, container, facts, ns, src).await? {
                Some(v) => v,
                None => continue, // optional reference that is missing: the variable is not set
            },
        };
        set(&mut env, var.name.clone(), value);
    }
    Ok(env)
}

async fn value_from(
    objects: &ObjectSource,
    pod: &Pod,
    container: &Container,
    facts: &PodFacts,
    ns: &str,
    src: &EnvVarSource,
) -> Result<Option<String>, ConfigError> {
    if let Some(f) = &src.field_ref {
        return field_ref(pod, facts, &f.field_path).map(Some);
    }
    if let Some(r) = &src.resource_field_ref {
        return resource_field(container, &r.resource).map(Some);
    }
    if let Some(r) = &src.secret_key_ref {
        return key_ref(objects.secret(ns, &r.name).await?, "secret", &r.name, &r.key, r.optional);
    }
    if let Some(r) = &src.config_map_key_ref {
        return key_ref(
            objects.config_map(ns, &r.name).await?,
            "configmap",
            &r.name,
            &r.key,
            r.optional,
        );
    }
    Err("an env valueFrom with no source".into())
}

fn key_ref(
    data: Option<BTreeMap<String, Vec<u8>>>,
    kind: &str,
    name: &str,
    key: &str,
    optional: Option<bool>,
) -> Result<Option<String>, ConfigError> {
    match data.as_ref().map(|d| d.get(key)) {
        Some(Some(v)) => Ok(Some(String::from_utf8_lossy(v).into_owned())),
        _ if optional == Some(true) => Ok(None),
        Some(None) => Err(format!("couldn't find key {key} in {kind} {name}")),
        None => Err(format!("{kind} {name:?} not found")),
    }
}

/// The value of a `fieldRef` path (the ones the kubelet supports).
pub fn field_ref(pod: &Pod, facts: &PodFacts, path: &str) -> Result<String, ConfigError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let map_key = |prefix: &str| -> Option<String> {
        let rest = path.strip_prefix(prefix)?.strip_prefix("['")?.strip_suffix("']")?;
        Some(rest.to_string())
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => facts.node_name.clone(),
        "spec.serviceAccountName" => {
            spec.and_then(|s| s.service_account_name.clone()).unwrap_or_default()
        }
        "status.podIP" | "status.podIPs" => facts.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.clone(),
        _ => {
            if let Some(k) = map_key("metadata.labels") {
                meta.labels.as_ref().and_then(|l| l.get(&k)).cloned().unwrap_or_default()
            } else if let Some(k) = map_key("metadata.annotations") {
                meta.annotations.as_ref().and_then(|l| l.get(&k)).cloned().unwrap_or_default()
            } else {
                return Err(format!("unsupported fieldRef path {path:?}"));
            }
        }
    })
}

/// The value of a `resourceFieldRef` (`limits.cpu` in whole cores rounded up, memory in bytes);
/// an unset limit is the node's capacity.
fn resource_field(container: &Container, resource: &str) -> Result<String, ConfigError> {
    let (section, name) =
        resource.split_once('.').ok_or_else(|| format!("unsupported resource {resource:?}"))?;
    let res = container.resources.as_ref();
    let q = match section {
        "limits" => res.and_then(|r| r.limits.as_ref()).and_then(|m| m.get(name)),
        "requests" => res.and_then(|r| r.requests.as_ref()).and_then(|m| m.get(name)),
        _ => return Err(format!("unsupported resource {resource:?}")),
    };
    let value = match q {
        Some(q) => parse_quantity(&q.0).ok_or_else(|| format!("unparsable quantity {:?}", q.0))?,
        None if name == "cpu" => super::NODE_CPUS as f64,
        None => super::NODE_MEMORY_BYTES as f64,
    };
    Ok(if name == "cpu" { value.ceil().max(1.0) as u64 } else { value.ceil() as u64 }.to_string())
}

/// Parses a Kubernetes quantity (`500m`, `2`, `1Gi`, `3k`) into a number.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(n * mult)
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced, an undefined one is left as
/// written, and `$$` stands for a literal `$`.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_the_kubelet() {
        let look = |n: &str| match n {
            "A" => Some("x".to_string()),
            "B" => Some("$(A)".to_string()),
            _ => None,
        };
        assert_eq!(expand("$(A)-$(B)", look), "x-$(A)");
        assert_eq!(expand("$(MISSING)", look), "$(MISSING)");
        assert_eq!(expand("$$(A) $$ $", look), "$(A) $ $");
        assert_eq!(expand("no vars", look), "no vars");
        assert_eq!(expand("$(A", look), "$(A");
    }

    #[test]
    fn parses_quantities() {
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("1Gi"), Some(1073741824.0));
        assert_eq!(parse_quantity("3k"), Some(3000.0));
        assert_eq!(parse_quantity("1x"), None);
    }

    #[test]
    fn field_refs_cover_the_kubelet_paths() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1",
                          "labels": {"app": "a"}, "annotations": {"x/y": "z"}},
            "spec": {"containers": [], "serviceAccountName": "sa"}
        }))
        .unwrap();
        let facts = PodFacts {
            pod_ip: "127.1.0.2".into(),
            host_ip: "127.0.0.1".into(),
            node_name: "n".into(),
        };
        for (path, want) in [
            ("metadata.name", "p"),
            ("metadata.namespace", "ns"),
            ("metadata.uid", "u1"),
            ("metadata.labels['app']", "a"),
            ("metadata.annotations['x/y']", "z"),
            ("spec.nodeName", "n"),
            ("spec.serviceAccountName", "sa"),
            ("status.podIP", "127.1.0.2"),
            ("status.hostIP", "127.0.0.1"),
        ] {
            assert_eq!(field_ref(&pod, &facts, path).unwrap(), want, "{path}");
        }
        assert!(field_ref(&pod, &facts, "spec.bogus").unwrap_err().contains("spec.bogus"));
    }
}
