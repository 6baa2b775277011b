//! The coordinator's HTTP API under attack, as a client on the network may try it: half-open
//! requests and silent connections (closed after the header timeout, while honest clients
//! are served), more connections than the limit, changes without the token or with a wrong
//! one, bodies too large or trickling in, and the process out of file descriptors. After
//! each attack the API still answers. And `weir savepoint --api`, the API's client, stops
//! waiting at SIGTERM.
//!
//! The limits are those of `weir_runtime::api` (a 5 s header timeout, 10 s per request);
//! the deadlines here are generous, for a loaded machine: what is checked is that a
//! connection is closed at all, never how soon.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_runtime::api::{HEADER_TIMEOUT, MAX_BODY, MAX_CONNECTIONS, REQUEST_TIMEOUT};
use weir_runtime::client::Api;
use weir_runtime::coordinator::Status;

const TOKEN: &str = "the-api-token-of-these-tests";
/// How long a connection the server should close may take to be closed.
const CLOSED_WITHIN: Duration = Duration::from_secs(30);

/// The API of a job that has not started (no coordinator behind it), on a port of its own.
fn start(token: Option<&str>) -> SocketAddr {
    let manifest = "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {name: wc}\nspec:\n  parallelism: 2\n  maxParallelism: 128\n  pipeline:\n    operators:\n      - {uid: lines, type: file_source, path: /nonexistent/in}\n      - {uid: words, type: split, inputs: [lines]}\n      - {uid: counts, type: count, inputs: [words], key: word}\n      - {uid: out, type: file_sink, inputs: [counts], path: /nonexistent/out}\n";
    let job: weir_crds::StreamJob = serde_saphyr::from_str(manifest).unwrap();
    let plan = weir_runtime::plan::build(&job.spec, None, None).unwrap();
    let status = Arc::new(Status::new("wc", "attacks-1", &plan, 2));
    weir_runtime::api::serve_with_token("127.0.0.1:0", status, token.map(str::to_string)).unwrap()
}

/// One honest request (`Connection: close`, the token with changes): status and body.
fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let api = Api::new(&addr.to_string(), Some(TOKEN.into())).unwrap();
    api.call(method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// The server still serves: `/healthz` and `/v1/job` answer.
fn still_answers(addr: SocketAddr) {
    assert_eq!(call(addr, "GET", "/healthz", None), (200, "ok\n".into()));
    let (code, body) = call(addr, "GET", "/v1/job", None);
    assert_eq!(code, 200, "{body}");
    let job: weir_crds::api::JobInfo = serde_json::from_str(&body).unwrap();
    assert_eq!(job.name, "wc");
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(CLOSED_WITHIN)).unwrap();
    s
}

/// Waits until the server has closed `s` (a read sees the end, or the connection reset);
/// whatever the server sends before is returned. Fails when `s` is still open at `deadline`.
fn wait_closed(s: &mut TcpStream, deadline: Instant, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: still open after {CLOSED_WITHIN:?}");
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return got,
        }
    }
}

/// The status code of the answer in `raw`, if there is one.
fn status_of(raw: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(raw);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[test]
fn half_open_requests_are_closed_after_the_header_timeout_while_honest_clients_are_served() {
    let addr = start(Some(TOKEN));
    let mut half_open: Vec<TcpStream> = (0..200)
        .map(|i| {
            let mut s = connect(addr);
            // Half of them stop inside the request line, half inside the headers.
            let part: &[u8] =
                if i % 2 == 0 { b"GET /v1/job HTTP/1.1\r\nHost: x\r\n" } else { b"GET /v1/jo" };
            s.write_all(part).unwrap();
            s
        })
        .collect();
    // More of them than the server keeps open, and an honest client is still answered.
    assert!(half_open.len() > MAX_CONNECTIONS);
    still_answers(addr);
    let deadline = Instant::now() + HEADER_TIMEOUT + CLOSED_WITHIN;
    for (i, s) in half_open.iter_mut().enumerate() {
        let got = wait_closed(s, deadline, &format!("half-open connection {i}"));
        // Closed, or told why, never answered.
        assert_ne!(status_of(&got), Some(200), "{}", String::from_utf8_lossy(&got));
    }
    still_answers(addr);
}

#[test]
fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let addr = start(Some(TOKEN));
    let t = Instant::now();
    let mut s = connect(addr);
    let got = wait_closed(&mut s, t + HEADER_TIMEOUT + CLOSED_WITHIN, "silent connection");
    assert_eq!(status_of(&got), None, "{}", String::from_utf8_lossy(&got));
    // Not before its time (a lower bound, which a loaded machine cannot break).
    assert!(t.elapsed() >= HEADER_TIMEOUT / 2, "closed after {:?}", t.elapsed());
    still_answers(addr);
}

#[test]
fn a_kept_alive_connection_is_closed_once_idle() {
    let addr = start(Some(TOKEN));
    let mut s = connect(addr);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    s.set_read_timeout(Some(CLOSED_WITHIN)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"ok\n") {
        let n = s.read(&mut buf).expect("the answer on a kept-alive connection");
        assert!(n > 0, "closed before answering: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(status_of(&got), Some(200));
    // Then idle: closed after the same timeout.
    let rest = wait_closed(&mut s, Instant::now() + HEADER_TIMEOUT + CLOSED_WITHIN, "idle");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    still_answers(addr);
}

#[test]
fn a_flood_of_silent_connections_beyond_the_limit_does_not_lock_a_prompt_client_out() {
    let addr = start(Some(TOKEN));
    let mut flood: Vec<TcpStream> = (0..3 * MAX_CONNECTIONS).map(|_| connect(addr)).collect();
    for _ in 0..3 {
        still_answers(addr);
    }
    let deadline = Instant::now() + HEADER_TIMEOUT + CLOSED_WITHIN;
    for (i, s) in flood.iter_mut().enumerate() {
        wait_closed(s, deadline, &format!("silent connection {i}"));
    }
    still_answers(addr);
}

/// A request's head, `POST /v1/savepoints`.
fn post_head(auth: Option<&str>, framing: &str) -> String {
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    format!(
        "POST /v1/savepoints HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n{framing}\r\nConnection: close\r\n\r\n"
    )
}

/// Sends `head` alone and reads the answer to the end.
fn answer_to_head(addr: SocketAddr, head: &str) -> (Option<u16>, String) {
    let mut s = connect(addr);
    s.write_all(head.as_bytes()).unwrap();
    let got = wait_closed(&mut s, Instant::now() + CLOSED_WITHIN, "answer");
    (status_of(&got), String::from_utf8_lossy(&got).into_owned())
}

#[test]
fn changes_need_the_right_token_before_any_body_is_read() {
    let addr = start(Some(TOKEN));
    let huge = "Content-Length: 1073741824";
    for auth in [
        None,
        Some("Bearer".to_string()),
        Some("Bearer wrong".to_string()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(format!("Basic {TOKEN}")),
    ] {
        for framing in ["Content-Length: 2", huge] {
            // A gigabyte announced and none of it sent: refused on the head alone.
            let (code, text) = answer_to_head(addr, &post_head(auth.as_deref(), framing));
            assert_eq!(code, Some(401), "{auth:?} {framing}: {text}");
            assert!(!text.contains(TOKEN), "{text}");
        }
    }
    // The same through the client: without the token, or with a wrong one.
    let (code, _) = Api::new(&addr.to_string(), Some("wrong".into()))
        .unwrap()
        .call("POST", "/v1/savepoints", Some("{}"))
        .unwrap();
    assert_eq!(code, 401);
    let (code, _) = Api::new(&addr.to_string(), None)
        .unwrap()
        .call("POST", "/v1/savepoints", Some("{}"))
        .unwrap();
    assert_eq!(code, 401);
    let (code, _) =
        Api::new(&addr.to_string(), None).unwrap().call("POST", "/v1/checkpoints", None).unwrap();
    assert_eq!(code, 401);
    // With the token the request gets to the job (which is not running).
    let (code, text) = call(addr, "POST", "/v1/savepoints", Some("{\"stop\": false}"));
    assert_eq!(code, 409, "{text}");
    // A coordinator without a token takes no changes at all.
    let closed = start(None);
    let (code, text) = call(closed, "POST", "/v1/savepoints", Some("{}"));
    assert_eq!(code, 403, "{text}");
    still_answers(addr);
}

#[test]
fn bodies_beyond_the_limit_are_refused_without_being_read() {
    let addr = start(Some(TOKEN));
    let auth = format!("Bearer {TOKEN}");
    // Announced: refused on the head alone.
    let (code, text) = answer_to_head(addr, &post_head(Some(&auth), "Content-Length: 1073741824"));
    assert_eq!(code, Some(413), "{text}");
    let (code, text) =
        answer_to_head(addr, &post_head(Some(&auth), &format!("Content-Length: {}", MAX_BODY + 1)));
    assert_eq!(code, Some(413), "{text}");
    // Chunked, without end: the server stops reading past the limit. What it does not read
    // stays in the sockets' buffers (a few MiB on loopback), so the client cannot send much
    // more than that before its writes fail or block.
    let mut s = connect(addr);
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(post_head(Some(&auth), "Transfer-Encoding: chunked").as_bytes()).unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
    let budget = 256 << 20;
    let mut sent = 0usize;
    while sent < budget {
        match s.write(chunk.as_bytes()) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break, // blocked past the timeout, or reset: the server stopped reading
        }
    }
    assert!(sent < budget, "the server read {sent} bytes of a body it must refuse");
    let got = wait_closed(&mut s, Instant::now() + CLOSED_WITHIN, "chunked body");
    // The answer, unless the connection was reset over the bytes left unread.
    assert!(matches!(status_of(&got), None | Some(413)), "{}", String::from_utf8_lossy(&got));
    // A body within the limit is read.
    let (code, text) = call(
        addr,
        "POST",
        "/v1/savepoints",
        Some(&format!("{{\"directory\": \"{}\"}}", "x".repeat(100))),
    );
    assert!(matches!(code, 400 | 409), "{code} {text}");
    still_answers(addr);
}

#[test]
fn a_body_that_trickles_in_is_cut_off() {
    let addr = start(Some(TOKEN));
    let mut s = connect(addr);
    let t = Instant::now();
    s.write_all(post_head(Some(&format!("Bearer {TOKEN}")), "Content-Length: 100").as_bytes())
        .unwrap();
    s.write_all(b"{\"stop\":").unwrap();
    let got = wait_closed(&mut s, t + REQUEST_TIMEOUT + CLOSED_WITHIN, "trickling body");
    assert_eq!(status_of(&got), Some(408), "{}", String::from_utf8_lossy(&got));
    still_answers(addr);
}

/// Set in the child process of [`out_of_file_descriptors_the_api_waits_and_goes_on`].
const CHILD: &str = "WEIR_TEST_API_OUT_OF_FDS";

#[test]
fn out_of_file_descriptors_the_api_waits_and_goes_on() {
    // In a process of its own, with few descriptors, so that no other test runs out.
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 256 && exec \"$0\" \"$@\"")
        .arg(exe)
        .args(["--exact", "child_out_of_file_descriptors", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("1 passed"), "{stdout}");
    assert!(stderr.contains("HTTP API: accepting a connection"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The API's process out of descriptors: accepting fails (EMFILE), and once descriptors are
/// free again the connection that waited is served. Does nothing unless run by
/// [`out_of_file_descriptors_the_api_waits_and_goes_on`].
#[test]
fn child_out_of_file_descriptors() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let addr = start(Some(TOKEN));
    still_answers(addr);
    // The server's ends of those connections closed too.
    std::thread::sleep(Duration::from_millis(500));
    let mut files = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => files.push(f),
            Err(e) if e.raw_os_error() == Some(24) => break,
            Err(e) => panic!("opening /dev/null: {e}"),
        }
        assert!(files.len() < 100_000, "no descriptor limit");
    }
    // One descriptor for the client's socket; none left for the server to accept it with.
    files.pop();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    files.truncate(files.len().saturating_sub(32));
    let got = wait_closed(&mut s, Instant::now() + CLOSED_WITHIN, "the connection that waited");
    assert_eq!(status_of(&got), Some(200), "{}", String::from_utf8_lossy(&got));
    drop(files);
    still_answers(addr);
}

/// A coordinator whose savepoints never complete: `POST /v1/savepoints` answers id `sp-1`,
/// `GET /v1/savepoints/sp-1` says it is in progress.
fn endless_savepoints() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let (mut raw, mut buf) = (Vec::new(), [0u8; 4096]);
                // The head and the body (the client sends a Content-Length).
                let post = loop {
                    let text = String::from_utf8_lossy(&raw).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .and_then(|v| v.trim().parse().ok())
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break head.starts_with("POST");
                        }
                    }
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => raw.extend_from_slice(&buf[..n]),
                    }
                };
                let (code, body) = if post {
                    ("202 Accepted", r#"{"id":"sp-1"}"#.to_string())
                } else {
                    let sp = weir_crds::api::SavepointInfo {
                        id: "sp-1".into(),
                        status: weir_crds::api::SavepointStatus::InProgress,
                        stop: true,
                        checkpoint_id: Some(3),
                        requested_at: 0,
                        duration_ms: 0,
                        size_bytes: 0,
                        path: None,
                        failure: None,
                        request_id: None,
                    };
                    ("200 OK", serde_json::to_string(&sp).unwrap())
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {code}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

#[test]
fn weir_savepoint_stops_waiting_at_sigterm_with_exit_code_130() {
    let addr = endless_savepoints();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["savepoint", "--api", &addr.to_string(), "--stop"])
        .env("WEIR_API_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    // Waiting for the savepoint.
    while !said.contains("savepoint sp-1 requested") {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(n > 0, "weir savepoint ended before waiting: {said}");
        said.push_str(&line);
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > CLOSED_WITHIN {
            let _ = child.kill();
            panic!("weir savepoint still waits {CLOSED_WITHIN:?} after SIGTERM: {said}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stderr.read_to_string(&mut said).unwrap();
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert_eq!(status.code(), Some(130), "{said}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        said.contains(&format!(
            "weir: interrupted: savepoint sp-1 may still complete and then stop the job; see GET http://{addr}/v1/savepoints/sp-1"
        )),
        "{said}"
    );
    assert!(!said.contains(TOKEN), "{said}");
}
