//! What the tests that run `weir` as a user share: a process whose stderr is read in the
//! background (with the addresses it announces), and plain HTTP requests to its API.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary under test: the stock `weir`, or (for the SDK example's tests, which include
/// this module) the example's own `weir-detector`, which takes the same commands.
pub const WEIR: &str =
    match (option_env!("CARGO_BIN_EXE_weir"), option_env!("CARGO_BIN_EXE_weir-detector")) {
        (Some(weir), _) => weir,
        (None, Some(detector)) => detector,
        (None, None) => panic!("no weir binary to test"),
    };
/// The job's secret of the coordinators and workers these tests start (`WEIR_JOB_SECRET`).
pub const SECRET: &str = "weir-tests-job-secret-0123456789abcdef";

/// A started `weir` process whose stderr is read in the background; lines that announce an
/// address (`api`, `control`) are passed on.
pub struct Proc {
    pub child: Child,
    addrs: mpsc::Receiver<(String, String)>,
    seen: std::cell::RefCell<HashMap<String, String>>,
    stderr: std::thread::JoinHandle<String>,
}

/// `weir run <file>` at parallelism `p`, its state under `state`, to its end within `timeout`:
/// its log (it must exit 0).
#[allow(dead_code)] // not every test crate runs jobs to their end
pub fn run_to_end(
    file: &std::path::Path,
    state: &std::path::Path,
    p: u32,
    timeout: Duration,
) -> String {
    let ps = p.to_string();
    let args = ["run", file.to_str().unwrap(), "--parallelism", &ps, "--state-dir"];
    let mut args: Vec<&str> = args.to_vec();
    args.push(state.to_str().unwrap());
    let (code, err) = start(&args).finish(timeout);
    assert_eq!(code, Some(0), "parallelism {p}: {err}");
    err
}

/// `weir run <file>`, which must refuse it before it starts: what it said.
#[allow(dead_code)] // not every test crate has jobs to refuse
pub fn refused(file: &std::path::Path) -> String {
    let out = Command::new(WEIR).args(["run", file.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{}: it ran: {err}", file.display());
    err
}

/// Starts `weir` with `args`.
#[allow(dead_code)] // not every test crate starts `weir` without an environment of its own
pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Proc {
    start_with_env(args, &[])
}

/// Starts `weir` with `args` and these environment variables.
pub fn start_with_env<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Proc {
    let mut child = Command::new(WEIR)
        .args(args)
        .env("WEIR_JOB_SECRET", SECRET)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, addrs) = mpsc::channel();
    let stderr = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some((_, a)) = line.split_once("HTTP API on http://") {
                let _ = tx.send(("api".into(), a.trim().to_string()));
            }
            if let Some((_, a)) = line.split_once(", control ") {
                let _ = tx.send(("control".into(), a.trim().to_string()));
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    Proc { child, addrs, seen: Default::default(), stderr }
}

impl Proc {
    /// The address the process announced as `what` (waiting up to a minute for it).
    pub fn addr(&self, what: &str) -> String {
        loop {
            if let Some(v) = self.seen.borrow().get(what) {
                return v.clone();
            }
            let (k, v) = self.addrs.recv_timeout(Duration::from_secs(60)).expect("an address");
            self.seen.borrow_mut().insert(k, v);
        }
    }

    #[allow(dead_code)] // not every test crate signals its processes
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    /// Waits for the exit (at most `limit`) and returns the code and everything on stderr.
    pub fn finish(mut self, limit: Duration) -> (Option<i32>, String) {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st.code(), self.stderr.join().unwrap());
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("did not exit within {limit:?}: {}", self.stderr.join().unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A request with an optional bearer token: the status code and body (`None` if the API does
/// not answer).
#[allow(dead_code)]
pub fn request(addr: &str, method: &str, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    request_with(addr, method, path, token, "")
}

/// [`request`] with a body.
#[allow(dead_code)]
pub fn request_with(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

/// Opens a control connection to the coordinator at `addr` by hand, as worker `index` with
/// exchange address `data_addr`, proving `secret`: the connection, and the reader of the
/// coordinator's lines after the opening.
#[allow(dead_code)]
pub fn open_control(
    addr: &str,
    index: u32,
    data_addr: &str,
    secret: &str,
) -> (TcpStream, BufReader<TcpStream>) {
    use weir_runtime::{auth, control};
    let secret = auth::JobSecret::new(secret).unwrap();
    let s = TcpStream::connect(addr).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let ours = auth::nonce();
    let protocol = control::PROTOCOL;
    writeln!(
        w,
        r#"{{"type":"hello","protocol":{protocol},"index":{index},"dataAddr":"{data_addr}","nonce":"{}"}}"#,
        auth::hex(&ours)
    )
    .unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["type"], "challenge", "{line}");
    let theirs: auth::Nonce = auth::unhex(v["nonce"].as_str().unwrap()).unwrap();
    let proof = control::worker_proof(&secret, &theirs, &ours, Some(index), data_addr);
    writeln!(w, r#"{{"type":"proof","proof":"{}"}}"#, auth::hex(&proof)).unwrap();
    (w, r)
}

/// The job as the coordinator's API reports it (`GET /v1/job`), when it answers.
#[allow(dead_code)]
pub fn job_info(api: &str) -> Option<serde_json::Value> {
    let (code, body) = request(api, "GET", "/v1/job", None)?;
    (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
}

/// Waits until the job runs (all workers connected) after `restarts` restarts; false if the
/// process ended first.
#[allow(dead_code)]
pub fn wait_running(job: &mut Proc, restarts: u64) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if job.child.try_wait().unwrap().is_some() {
            return false;
        }
        if let Some(i) = job_info(&job.addr("api"))
            && i["state"] == "running"
            && i["restarts"].as_u64() == Some(restarts)
            && i["workersConnected"] == i["workersExpected"]
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the job did not run (again) after {restarts} restarts");
}
