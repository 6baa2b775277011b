//! `weir-node exec-container`: the last step before a container's program runs. Started by the
//! agent as a fresh single-threaded process, it gives the container what a container runtime
//! would: its own session (so the agent can signal the whole process group), its own mount
//! namespace with the pod's volumes bind-mounted at their `mountPath`, a read-only root file
//! system when the pod asks for one, its own hostname, and the user it runs as. Then it
//! replaces itself with the program, so the agent's child pid is the container's pid.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{Gid, Uid, setgid, setgroups, sethostname, setsid, setuid};

/// One bind mount: a host path shown at `target` inside the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

impl BindMount {
    /// `SOURCE=TARGET` or `SOURCE=TARGET:ro`.
    pub fn to_arg(&self) -> String {
        let ro = if self.read_only { ":ro" } else { "" };
        format!("{}={}{ro}", self.source.display(), self.target.display())
    }

    pub fn parse(arg: &str) -> Result<Self> {
        let (source, rest) = arg.split_once('=').context("a bind mount is SOURCE=TARGET[:ro]")?;
        let (target, read_only) = match rest.strip_suffix(":ro") {
            Some(t) => (t, true),
            None => (rest, false),
        };
        Ok(Self { source: source.into(), target: target.into(), read_only })
    }
}

/// What `exec-container` is asked to do.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    pub hostname: Option<String>,
    pub binds: Vec<BindMount>,
    pub read_only_root: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// Sets the container up and execs its program; returns only on failure.
pub fn exec_container(spec: &ExecSpec) -> Result<std::convert::Infallible> {
    setsid().context("setsid")?;
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS)
        .context("unshare(mount, uts): the node agent must run as root")?;
    // Nothing mounted here may show on the host.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .context("making / private")?;
    if let Some(h) = &spec.hostname {
        sethostname(h).with_context(|| format!("sethostname {h}"))?;
    }
    for b in &spec.binds {
        if b.source.is_dir() {
            std::fs::create_dir_all(&b.target)
        } else {
            if let Some(parent) = b.target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::OpenOptions::new().create(true).append(true).open(&b.target).map(drop)
        }
        .with_context(|| format!("creating mount point {}", b.target.display()))?;
        mount(
            Some(&b.source),
            &b.target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| {
            format!("bind-mounting {} at {}", b.source.display(), b.target.display())
        })?;
        if b.read_only {
            remount_read_only(&b.target)?;
        }
    }
    if spec.read_only_root {
        remount_read_only("/".as_ref())?;
    }
    if let Some(gid) = spec.gid {
        setgroups(&[Gid::from_raw(gid)]).context("setgroups")?;
        setgid(Gid::from_raw(gid)).context("setgid")?;
    }
    if let Some(uid) = spec.uid {
        if spec.gid.is_none() {
            setgroups(&[]).context("setgroups")?;
        }
        setuid(Uid::from_raw(uid)).context("setuid")?;
    }
    let err = Command::new(&spec.program).args(&spec.args).exec();
    bail!("exec {}: {err}", spec.program.display())
}

fn remount_read_only(target: &std::path::Path) -> Result<()> {
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .with_context(|| format!("remounting {} read-only", target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_mount_args_round_trip() {
        for b in [
            BindMount { source: "/a/b".into(), target: "/etc/x".into(), read_only: true },
            BindMount { source: "/a".into(), target: "/var/lib/weir".into(), read_only: false },
        ] {
            assert_eq!(BindMount::parse(&b.to_arg()).unwrap(), b);
        }
        assert!(BindMount::parse("/no-target").is_err());
    }
}
