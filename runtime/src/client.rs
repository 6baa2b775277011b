//! A client of the coordinator's HTTP API, for the `weir` commands that talk to a running job
//! (`weir savepoint`): plain HTTP/1.1 over a TCP connection, one request per connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use weir_crds::api::{
    JobState, SavepointInfo, SavepointRequest, SavepointStatus, SavepointTriggered,
};

use crate::error::RuntimeError;

/// The API of one coordinator.
#[derive(Debug, Clone)]
pub struct Api {
    /// `host:port`.
    addr: String,
    token: Option<String>,
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
        s.set_read_timeout(Some(Duration::from_secs(30))).map_err(fail)?;
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
        s.read_to_end(&mut raw).map_err(fail)?;
        parse_response(&raw).ok_or_else(|| {
            RuntimeError::external(format!(
                "the API at {} sent an answer that is not HTTP",
                self.addr
            ))
        })
    }

    /// Asks for a savepoint; returns its id.
    pub fn trigger_savepoint(
        &self,
        stop: bool,
        directory: Option<&str>,
    ) -> Result<String, RuntimeError> {
        if self.token.is_none() {
            return Err(RuntimeError::user(
                "taking a savepoint changes the job and needs the API token: set WEIR_API_TOKEN",
            ));
        }
        let req =
            SavepointRequest { stop, directory: directory.map(str::to_string), request_id: None };
        let body = serde_json::to_string(&req).expect("a request serializes");
        let (code, text) = self.call("POST", "/v1/savepoints", Some(&body))?;
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

    pub fn savepoint(&self, id: &str) -> Result<SavepointInfo, RuntimeError> {
        let (code, text) = self.call("GET", &format!("/v1/savepoints/{id}"), None)?;
        if code != 200 {
            return Err(RuntimeError::external(format!("savepoint {id}: {code} {}", text.trim())));
        }
        serde_json::from_str(&text).map_err(|e| {
            RuntimeError::external(format!("an answer that is not understood ({e}): {text}"))
        })
    }

    /// The job's state; `None` once the coordinator no longer answers (it exited).
    pub fn job_state(&self) -> Option<JobState> {
        let (code, text) = self.call("GET", "/v1/job", None).ok()?;
        if code != 200 {
            return None;
        }
        serde_json::from_str::<weir_crds::api::JobInfo>(&text).ok().map(|j| j.state)
    }
}

/// `weir savepoint`: takes a savepoint and waits for it, saying how it goes on stderr; the
/// savepoint's path goes to stdout. With `stop`, waits for the job to end too.
pub fn take_savepoint(
    api: &Api,
    stop: bool,
    directory: Option<&str>,
    timeout: Duration,
) -> Result<SavepointInfo, RuntimeError> {
    let id = api.trigger_savepoint(stop, directory)?;
    eprintln!("weir: savepoint {id} requested{}", if stop { " (then the job stops)" } else { "" });
    let start = Instant::now();
    let mut last_said = Instant::now();
    let done = loop {
        let sp = api.savepoint(&id)?;
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
        std::thread::sleep(Duration::from_millis(100));
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
            match api.job_state() {
                Some(JobState::Finished) | None => {
                    eprintln!("weir: the job stopped");
                    break;
                }
                Some(JobState::Failed) => {
                    return Err(RuntimeError::external(
                        "the savepoint completed, but the job failed while it stopped",
                    ));
                }
                Some(_) => std::thread::sleep(Duration::from_millis(100)),
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
}
