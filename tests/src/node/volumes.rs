//! A pod's volumes, made on the host under the pod's directory (emptyDir, configMap, secret,
//! projected, downwardAPI) or taken from it (hostPath), and the bind mounts that put them at
//! each container's `mountPath`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod, Volume};

use super::env::{ConfigError, ObjectSource, PodFacts, field_ref};
use super::exec::BindMount;

/// Makes every volume of `pod` under `dir/volumes` and returns where each one is on the host.
pub async fn prepare(
    objects: &ObjectSource,
    pod: &Pod,
    facts: &PodFacts,
    dir: &Path,
    fs_group: Option<u32>,
) -> Result<BTreeMap<String, PathBuf>, ConfigError> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut out = BTreeMap::new();
    for v in pod.spec.as_ref().map(|s| s.volumes.iter().flatten()).into_iter().flatten() {
        let path = dir.join("volumes").join(&v.name);
        let host = make_volume(objects, pod, facts, ns, v, &path).await?;
        if let Some(g) = fs_group {
            chown_tree(&host, g);
        }
        out.insert(v.name.clone(), host);
    }
    Ok(out)
}

async fn make_volume(
    objects: &ObjectSource,
    pod: &Pod,
    facts: &PodFacts,
    ns: &str,
    v: &Volume,
    path: &Path,
) -> Result<PathBuf, ConfigError> {
    let io = |e: std::io::Error| format!("volume {:?}: {e}", v.name);
    if let Some(h) = &v.host_path {
        let p = PathBuf::from(&h.path);
        if matches!(h.type_.as_deref(), Some("DirectoryOrCreate")) {
            std::fs::create_dir_all(&p).map_err(io)?;
        }
        if !p.exists() {
            return Err(format!("volume {:?}: hostPath {} does not exist", v.name, h.path));
        }
        return Ok(p);
    }
    if v.empty_dir.is_some() {
        if !path.exists() {
            std::fs::create_dir_all(path).map_err(io)?;
            // As the kubelet does: any user in the pod may write to an emptyDir.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).map_err(io)?;
        }
        return Ok(path.to_path_buf());
    }
    let mut files: Vec<(String, Vec<u8>, u32)> = Vec::new();
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let mode = s.default_mode.unwrap_or(0o644) as u32;
        match objects.secret(ns, &name).await? {
            Some(data) => files.extend(select(&data, s.items.as_deref(), mode, "secret", &name)?),
            None if s.optional == Some(true) => {}
            None => return Err(format!("secret {name:?} not found")),
        }
    } else if let Some(c) = &v.config_map {
        let mode = c.default_mode.unwrap_or(0o644) as u32;
        match objects.config_map(ns, &c.name).await? {
            Some(data) => {
                files.extend(select(&data, c.items.as_deref(), mode, "configmap", &c.name)?)
            }
            None if c.optional == Some(true) => {}
            None => return Err(format!("configmap {:?} not found", c.name)),
        }
    } else if let Some(d) = &v.downward_api {
        let mode = d.default_mode.unwrap_or(0o644) as u32;
        for item in d.items.iter().flatten() {
            if let Some(f) = &item.field_ref {
                files.push((
                    item.path.clone(),
                    field_ref(pod, facts, &f.field_path)?.into_bytes(),
                    mode,
                ));
            }
        }
    } else if let Some(p) = &v.projected {
        let mode = p.default_mode.unwrap_or(0o644) as u32;
        for src in p.sources.iter().flatten() {
            if let Some(s) = &src.secret {
                match objects.secret(ns, &s.name).await? {
                    Some(data) => {
                        files.extend(select(&data, s.items.as_deref(), mode, "secret", &s.name)?)
                    }
                    None if s.optional == Some(true) => {}
                    None => return Err(format!("secret {:?} not found", s.name)),
                }
            }
            if let Some(c) = &src.config_map {
                match objects.config_map(ns, &c.name).await? {
                    Some(data) => {
                        files.extend(select(&data, c.items.as_deref(), mode, "configmap", &c.name)?)
                    }
                    None if c.optional == Some(true) => {}
                    None => return Err(format!("configmap {:?} not found", c.name)),
                }
            }
            if let Some(t) = &src.service_account_token {
                let token = objects
                    .service_account_token(pod, t.audience.as_deref(), t.expiration_seconds)
                    .await?;
                files.push((t.path.clone(), token.into_bytes(), mode));
            }
            if let Some(d) = &src.downward_api {
                for item in d.items.iter().flatten() {
                    if let Some(f) = &item.field_ref {
                        files.push((
                            item.path.clone(),
                            field_ref(pod, facts, &f.field_path)?.into_bytes(),
                            mode,
                        ));
                    }
                }
            }
        }
    } else {
        return Err(format!(
            "volume {:?}: only emptyDir, hostPath, configMap, secret, downwardAPI and projected volumes are supported by the test node",
            v.name
        ));
    }
    std::fs::create_dir_all(path).map_err(io)?;
    for (rel, data, mode) in files {
        if rel.split('/').any(|s| s == "..") || rel.starts_with('/') {
            return Err(format!(
                "volume {:?}: item path {rel:?} must be relative without `..`",
                v.name
            ));
        }
        let f = path.join(&rel);
        if let Some(parent) = f.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&f, data).map_err(io)?;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    Ok(path.to_path_buf())
}

fn select(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: u32,
    kind: &str,
    name: &str,
) -> Result<Vec<(String, Vec<u8>, u32)>, ConfigError> {
    match items {
        None => Ok(data.iter().map(|(k, v)| (k.clone(), v.clone(), default_mode)).collect()),
        Some(items) => items
            .iter()
            .map(|i| {
                let v = data
                    .get(&i.key)
                    .ok_or_else(|| format!("couldn't find key {} in {kind} {name}", i.key))?;
                Ok((i.path.clone(), v.clone(), i.mode.map(|m| m as u32).unwrap_or(default_mode)))
            })
            .collect(),
    }
}

fn chown_tree(path: &Path, gid: u32) {
    let _ = nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)));
    if path.is_dir()
        && let Ok(rd) = std::fs::read_dir(path)
    {
        for e in rd.flatten() {
            chown_tree(&e.path(), gid);
        }
    }
}

/// The bind mounts of `container`, from its `volumeMounts`.
pub fn mounts(
    container: &Container,
    volumes: &BTreeMap<String, PathBuf>,
) -> Result<Vec<BindMount>, ConfigError> {
    container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            let base = volumes.get(&m.name).ok_or_else(|| {
                format!("volumeMounts names volume {:?}, which the pod does not have", m.name)
            })?;
            let source = match m.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => {
                    let p = base.join(sub);
                    if !p.exists() {
                        std::fs::create_dir_all(&p).map_err(|e| format!("subPath {sub}: {e}"))?;
                    }
                    p
                }
                _ => base.clone(),
            };
            Ok(BindMount {
                source,
                target: m.mount_path.clone().into(),
                read_only: m.read_only == Some(true),
            })
        })
        .collect()
}
