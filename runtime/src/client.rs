//! A client of the coordinator's HTTP API, for the `weir` commands that talk to a running job
//! (`weir savepoint`): plain HTTP/1.1 over a TCP connection, one request per connection.
//! The token never appears in what this module prints or in an `Api`'s `Debug`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use weir_crds::api::{
    JobState, SavepointInfo, SavepointRequest, SavepointStatus, SavepointTriggered,
};

use crate::error::RuntimeError;

/// How long one request may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read.
const MAX_ANSWER: u64 = 4 << 20;
/// How often a wait looks at its interruption flag.
const TICK: Duration = Duration::from_millis(100);

/// The API of one coordinator.
#[derive(Clone)]
pub struct Api {
    /// `host:port`.
    addr: String,
    token: Option<String>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| ".."))
            .finish()
    }
}

impl Api {
    /// `addr` is `host:port`, or a URL `http://host:port`; `token` goes with requests that
    /// change the job.
    pub fn new(addr: &str, token: Option<String>) -> Result<Self, RuntimeError> {
        let a = addr.trim().trim_start_matches("http://").trim_end_matches('/');
        if addr.trim().starts_with("https://") {
            return Err(RuntimeError::user(format!(
                "--api {addr}: the coordinator's API is plain HTTP; give host:port"
            )));
        }
        if a.is_empty() || a.contains('/') || !a.contains(':') {
            return Err(RuntimeError::user(format!(
                "--api {addr:?}: give the coordinator's API address as host:port"
            )));
        }
        Ok(Self { addr: a.to_string(), token: token.filter(|t| !t.is_empty()) })
    }

    /// One request: the status code and the body.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), RuntimeError> {
        let fail = |e: std::io::Error| {
            RuntimeError::external(format!("the API at {} does not answer: {e}", self.addr))
        };
        let mut s = TcpStream::connect(&self.addr).map_err(fail)?;
        s.set_read_timeout(Some(CALL_TIMEOUT)).map_err(fail)?;
        s.set_write_timeout(Some(CALL_TIMEOUT)).map_err(fail)?;
        let auth = match &self.token {
            Some(t) if method != "GET" => format!("Authorization: Bearer {t}\r\n"),
            _ => String::new(),
        };
        let body = body.unwrap_or("");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .map_err(fail)?;
        let mut raw = Vec::new();
        s.take(MAX_ANSWER).read_to_end(&mut raw).map_err(fail)?;
        parse_response(&raw).ok_or_else(|| {
            RuntimeError::external(format!(
                "the API at {} sent an answer that is not HTTP",
                self.addr
            ))
        })
    }

    /// [`Api::call`], given up (with an error saying so) within [`TICK`] of `interrupted`
    /// being set: the request runs on a thread of its own, left behind then.
    fn call_unless(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        interrupted: &AtomicBool,
    ) -> Result<(u16, String), RuntimeError> {
        let (tx, rx) = mpsc::channel();
        let (api, method, path, body) =
            (self.clone(), method.to_string(), path.to_string(), body.map(str::to_string));
        std::thread::Builder::new()
            .name("api-call".into())
            .spawn(move || {
                let _ = tx.send(api.call(&method, &path, body.as_deref()));
            })
            .map_err(|e| RuntimeError::internal(format!("starting a thread: {e}")))?;
        loop {
            if interrupted.load(Ordering::Relaxed) {
                return Err(RuntimeError::external("interrupted"));
            }
            match rx.recv_timeout(TICK) {
                Ok(r) => return r,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(RuntimeError::internal(
                        "the request's thread ended without an answer",
                    ));
                }
            }
        }
    }

    /// Asks for a savepoint; returns its id.
    pub fn trigger_savepoint(
        &self,
        stop: bool,
        directory: Option<&str>,
    ) -> Result<String, RuntimeError> {
        self.trigger_savepoint_unless(stop, directory, &AtomicBool::new(false))
    }

    fn trigger_savepoint_unless(
        &self,
        stop: bool,
        directory: Option<&str>,
        interrupted: &AtomicBool,
    ) -> Result<String, RuntimeError> {
        if self.token.is_none() {
            return Err(RuntimeError::user(
                "taking a savepoint changes the job and needs the API token: set WEIR_API_TOKEN",
            ));
        }
        let req =
            SavepointRequest { stop, directory: directory.map(str::to_string), request_id: None };
        let body = serde_json::to_string(&req).expect("a request serializes");
        let (code, text) = self
            .call_unless("POST", "/v1/savepoints", Some(&body), interrupted)
            .map_err(|e| {
                if interrupted.load(Ordering::Relaxed) {
                    RuntimeError::external(format!(
                        "interrupted while asking for the savepoint: it may have been requested; see GET http://{}/v1/savepoints",
                        self.addr
                    ))
                } else {
                    e
                }
            })?;
        match code {
            202 => serde_json::from_str::<SavepointTriggered>(&text).map(|t| t.id).map_err(|e| {
                RuntimeError::external(format!("an answer that is not understood ({e}): {text}"))
            }),
            400 | 401 | 403 => {
                Err(RuntimeError::user(format!("refused ({code}): {}", text.trim())))
            }
            _ => Err(RuntimeError::external(format!("refused ({code}): {}", text.trim()))),
        }
    }

    /// `GET /v1/savepoints/{id}`.
    pub fn savepoint(&self, id: &str) -> Result<SavepointInfo, RuntimeError> {
        self.savepoint_unless(id, &AtomicBool::new(false))
    }

    fn savepoint_unless(
        &self,
        id: &str,
        interrupted: &AtomicBool,
    ) -> Result<SavepointInfo, RuntimeError> {
        let (code, text) =
            self.call_unless("GET", &format!("/v1/savepoints/{id}"), None, interrupted)?;
        if code != 200 {
            return Err(RuntimeError::external(format!("savepoint {id}: {code} {}", text.trim())));
        }
        serde_json::from_str(&text).map_err(|e| {
            RuntimeError::external(format!("an answer that is not understood ({e}): {text}"))
        })
    }

    /// The job's state; `None` once the coordinator no longer answers (it exited).
    pub fn job_state(&self) -> Option<JobState> {
        self.job_state_unless(&AtomicBool::new(false))
    }

    fn job_state_unless(&self, interrupted: &AtomicBool) -> Option<JobState> {
        let (code, text) = self.call_unless("GET", "/v1/job", None, interrupted).ok()?;
        if code != 200 {
            return None;
        }
        serde_json::from_str::<weir_crds::api::JobInfo>(&text).ok().map(|j| j.state)
    }
}

/// `weir savepoint`: takes a savepoint and waits for it, saying how it goes on stderr; the
/// savepoint's path goes to stdout. With `stop`, waits for the job to end too.
///
/// Gives up within about 100 ms of `interrupted` being set (the signal flag of Ctrl-C /
/// SIGTERM), with an error saying where the savepoint, which goes on without this command,
/// can be followed.
pub fn take_savepoint(
    api: &Api,
    stop: bool,
    directory: Option<&str>,
    timeout: Duration,
    interrupted: &AtomicBool,
) -> Result<SavepointInfo, RuntimeError> {
    let id = api.trigger_savepoint_unless(stop, directory, interrupted)?;
    let gone_on = || {
        RuntimeError::external(format!(
            "interrupted: savepoint {id} may still complete{}; see GET http://{}/v1/savepoints/{id}",
            if stop { " and then stop the job" } else { "" },
            api.addr
        ))
    };
    eprintln!("weir: savepoint {id} requested{}", if stop { " (then the job stops)" } else { "" });
    let start = Instant::now();
    let mut last_said = Instant::now();
    let done = loop {
        let sp = api
            .savepoint_unless(&id, interrupted)
            .map_err(|e| if interrupted.load(Ordering::Relaxed) { gone_on() } else { e })?;
        match sp.status {
            SavepointStatus::Completed => break sp,
            SavepointStatus::Failed => {
                return Err(RuntimeError::external(format!(
                    "savepoint {id} failed: {}",
                    sp.failure.as_deref().unwrap_or("no reason given")
                )));
            }
            SavepointStatus::InProgress => {}
        }
        if start.elapsed() > timeout {
            return Err(RuntimeError::external(format!(
                "savepoint {id} is still in progress after {:.0} s: it goes on; ask GET /v1/savepoints/{id}",
                timeout.as_secs_f64()
            )));
        }
        if last_said.elapsed() >= Duration::from_secs(2) {
            let at = match sp.checkpoint_id {
                Some(c) => format!("barrier of checkpoint {c} on its way"),
                None => "waiting for its turn".into(),
            };
            eprintln!(
                "weir: savepoint {id}: in progress for {:.1} s ({at})",
                start.elapsed().as_secs_f64()
            );
            last_said = Instant::now();
        }
        if interrupted.load(Ordering::Relaxed) {
            return Err(gone_on());
        }
        std::thread::sleep(TICK);
    };
    eprintln!(
        "weir: savepoint {id} completed in {:.2} s: {} ({} bytes of keyed state)",
        done.duration_ms as f64 / 1000.0,
        done.path.as_deref().unwrap_or("?"),
        done.size_bytes
    );
    if stop {
        // The sinks commit, then the workers and the coordinator end.
        while start.elapsed() < timeout {
            let state = api.job_state_unless(interrupted);
            if interrupted.load(Ordering::Relaxed) {
                return Err(RuntimeError::external(format!(
                    "interrupted: savepoint {id} completed ({}); the job is stopping; see GET http://{}/v1/job",
                    done.path.as_deref().unwrap_or("?"),
                    api.addr
                )));
            }
            match state {
                Some(JobState::Finished) | None => {
                    eprintln!("weir: the job stopped");
                    break;
                }
                Some(JobState::Failed) => {
                    return Err(RuntimeError::external(
                        "the savepoint completed, but the job failed while it stopped",
                    ));
                }
                Some(_) => std::thread::sleep(TICK),
            }
        }
    }
    Ok(done)
}

/// The status code and body of an HTTP/1.1 response (chunked or not).
fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let code = text.get(9..12)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    if !chunked {
        return Some((code, body.to_string()));
    }
    let (mut out, mut rest) = (String::new(), body);
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if n == 0 {
            return Some((code, out));
        }
        out.push_str(after.get(..n)?);
        rest = after.get(n..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_plain_and_chunked_are_read_and_bad_addresses_refused() {
        let plain = b"HTTP/1.1 202 Accepted\r\ncontent-length: 9\r\n\r\n{\"id\":1}\n";
        assert_eq!(parse_response(plain), Some((202, "{\"id\":1}\n".into())));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Some((200, "abcdef".into())));
        assert_eq!(parse_response(b"garbage"), None);
        assert!(Api::new("http://127.0.0.1:8081/", None).is_ok());
        for bad in ["", "localhost", "https://x:1", "x:1/v1"] {
            let e = Api::new(bad, None).unwrap_err();
            assert!(e.message.contains("--api"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_token_does_not_show_in_debug() {
        let api = Api::new("127.0.0.1:1", Some("s3cret-token".into())).unwrap();
        let d = format!("{api:?}");
        assert!(!d.contains("s3cret") && d.contains("127.0.0.1:1"), "{d}");
    }

    /// A coordinator that takes savepoint requests and never completes them; with `mute`,
    /// one that accepts connections and never answers.
    fn fake_api(mute: bool) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                if mute {
                    held.push(s);
                    continue;
                }
                // The whole request, head and body, before answering.
                let (mut raw, mut buf) = (Vec::new(), [0u8; 4096]);
                let req = loop {
                    let text = String::from_utf8_lossy(&raw).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break text;
                        }
                    }
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break text,
                        Ok(n) => raw.extend_from_slice(&buf[..n]),
                    }
                };
                let body = if req.starts_with("POST") {
                    r#"{"id":"sp-7"}"#.to_string()
                } else {
                    serde_json::to_string(&SavepointInfo {
                        id: "sp-7".into(),
                        status: SavepointStatus::InProgress,
                        stop: false,
                        checkpoint_id: None,
                        requested_at: 0,
                        duration_ms: 0,
                        size_bytes: 0,
                        path: None,
                        failure: None,
                        request_id: None,
                    })
                    .unwrap()
                };
                let code = if req.starts_with("POST") { "202 Accepted" } else { "200 OK" };
                let _ = write!(
                    s,
                    "HTTP/1.1 {code}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        addr
    }

    /// Sets the flag after a moment, as the signal handler of `weir savepoint` does.
    fn interrupt_soon() -> std::sync::Arc<AtomicBool> {
        let flag = std::sync::Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            f.store(true, Ordering::Relaxed);
        });
        flag
    }

    #[test]
    fn waiting_for_a_savepoint_stops_at_the_signal_and_says_where_to_look() {
        let addr = fake_api(false);
        let api = Api::new(&addr, Some("t".into())).unwrap();
        let flag = interrupt_soon();
        let t = Instant::now();
        let e = take_savepoint(&api, false, None, Duration::from_secs(600), &flag).unwrap_err();
        // Generous: the flag is looked at every 100 ms.
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
        assert!(e.message.starts_with("interrupted: savepoint sp-7 may still complete"), "{e}");
        assert!(e.message.contains(&format!("GET http://{addr}/v1/savepoints/sp-7")), "{e}");
    }

    #[test]
    fn a_coordinator_that_never_answers_does_not_hold_the_command_past_the_signal() {
        let addr = fake_api(true);
        let api = Api::new(&addr, Some("t".into())).unwrap();
        let flag = interrupt_soon();
        let t = Instant::now();
        let e = take_savepoint(&api, true, None, Duration::from_secs(600), &flag).unwrap_err();
        // Well before the request's own 30 s timeout.
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
        assert!(e.message.contains("interrupted while asking for the savepoint"), "{e}");
    }
}
