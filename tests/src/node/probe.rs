//! Readiness, liveness and startup probes: HTTP GET, TCP connect, or a command, with the
//! kubelet's timing fields.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Timing of a probe, with the kubelet's defaults.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

pub fn timing(p: &Probe) -> Timing {
    let secs = |v: Option<i32>, d: i32| Duration::from_secs(v.unwrap_or(d).max(0) as u64);
    Timing {
        initial_delay: secs(p.initial_delay_seconds, 0),
        period: secs(p.period_seconds, 10).max(Duration::from_millis(100)),
        timeout: secs(p.timeout_seconds, 1).max(Duration::from_millis(100)),
        success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
    }
}

/// Runs the probe once; true when it succeeds within its timeout.
pub async fn check(
    p: &Probe,
    container: &Container,
    pod_ip: &str,
    env: &[(String, String)],
) -> bool {
    let t = timing(p);
    tokio::time::timeout(t.timeout, check_inner(p, container, pod_ip, env)).await.unwrap_or(false)
}

async fn check_inner(
    p: &Probe,
    container: &Container,
    pod_ip: &str,
    env: &[(String, String)],
) -> bool {
    if let Some(h) = &p.http_get {
        let Some(port) = resolve_port(&h.port, container) else { return false };
        let host = h.host.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| pod_ip.to_string());
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        return http_ok(&host, port, &path).await;
    }
    if let Some(t) = &p.tcp_socket {
        let Some(port) = resolve_port(&t.port, container) else { return false };
        let host = t.host.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| pod_ip.to_string());
        return TcpStream::connect((host.as_str(), port)).await.is_ok();
    }
    if let Some(e) = &p.exec {
        let Some((prog, args)) = e.command.as_deref().and_then(|c| c.split_first()) else {
            return false;
        };
        return tokio::process::Command::new(prog)
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status()
            .await
            .is_ok_and(|s| s.success());
    }
    false
}

fn resolve_port(port: &IntOrString, container: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// An HTTP/1.1 GET; success is a status from 200 to 399, as for the kubelet.
pub async fn http_ok(host: &str, port: u16, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect((host, port)).await else { return false };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: weir-node-probe\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .is_some_and(|c| (200..400).contains(&c))
}
