//! Reads a job's coordinator: `GET /v1/job` over plain HTTP/1.1 (the coordinator's API is a
//! versioned JSON contract whose types live in `weir-crds`). A read that fails is an
//! observation ("unreachable"), not an error of the reconcile.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_crds::api::{JobInfo, SavepointInfo, SavepointRequest, SavepointTriggered, Savepoints};

/// How long one read may take.
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// The largest answer read.
const MAX_BODY: usize = 4 << 20;

/// `GET /v1/job` from the coordinator at `addr` (`host:port`).
pub async fn job(addr: &str) -> Result<JobInfo, String> {
    call(addr, "GET", "/v1/job", None, None).await
}

/// `POST /v1/savepoints`: asks for a savepoint (`stop`: and stop the job with it); the
/// coordinator's id for it.
/// `POST /v1/savepoints` with idempotency key `request_id`: asked again with the same key,
/// the coordinator answers the same savepoint.
pub async fn trigger_savepoint(
    addr: &str,
    token: &str,
    stop: bool,
    request_id: &str,
) -> Result<String, String> {
    let body = serde_json::to_vec(&SavepointRequest {
        stop,
        directory: None,
        request_id: Some(request_id.to_string()),
    })
    .map_err(|e| e.to_string())?;
    let t: SavepointTriggered =
        call(addr, "POST", "/v1/savepoints", Some(token), Some(body)).await?;
    Ok(t.id)
}

/// `GET /v1/savepoints/{id}`: `Ok(None)` when the coordinator answers 404, it has no
/// savepoint of that id in its run (it restarted since, and the savepoint is lost).
pub async fn savepoint(addr: &str, id: &str) -> Result<Option<SavepointInfo>, String> {
    let path = format!("/v1/savepoints/{id}");
    let what = format!("GET http://{addr}{path}");
    let answer = tokio::time::timeout(TIMEOUT, fetch(addr, "GET", &path, None, None))
        .await
        .map_err(|_| format!("{what}: no answer within {} s", TIMEOUT.as_secs()))?
        .map_err(|e| format!("{what}: {e}"))?;
    match answer {
        (404, _) => Ok(None),
        (_, body) => {
            let body = body.map_err(|e| format!("{what}: {e}"))?;
            serde_json::from_slice(&body).map(Some).map_err(|e| format!("{what}: {e}"))
        }
    }
}

/// `GET /v1/savepoints`: the newest first.
pub async fn savepoints(addr: &str) -> Result<Savepoints, String> {
    call(addr, "GET", "/v1/savepoints", None, None).await
}

async fn call<T: serde::de::DeserializeOwned>(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<T, String> {
    let what = format!("{method} http://{addr}{path}");
    let answer = tokio::time::timeout(TIMEOUT, request(addr, method, path, token, body))
        .await
        .map_err(|_| format!("{what}: no answer within {} s", TIMEOUT.as_secs()))?
        .map_err(|e| format!("{what}: {e}"))?;
    serde_json::from_slice(&answer).map_err(|e| format!("{what}: {e}"))
}

async fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<Vec<u8>, String> {
    fetch(addr, method, path, token, body).await?.1
}

/// The answer's status code and [`parse_response`] of it.
async fn fetch(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<(u16, Result<Vec<u8>, String>), String> {
    let fail = |e: std::io::Error| e.to_string();
    let mut s = TcpStream::connect(addr).await.map_err(fail)?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or_default();
    if method != "GET" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.map_err(fail)?;
    s.write_all(&body).await.map_err(fail)?;
    let mut buf = Vec::new();
    (&mut s).take(MAX_BODY as u64).read_to_end(&mut buf).await.map_err(fail)?;
    Ok((status_code(&buf), parse_response(&buf)))
}

/// The status code of an HTTP/1.1 response (0 when it has none).
pub fn status_code(buf: &[u8]) -> u16 {
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    String::from_utf8_lossy(line)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The longest part of a coordinator's text (an error answer, a failure) that the controller
/// repeats, in the status or an event: what events already keep.
pub const MAX_TEXT: usize = 1000;

/// `text` cut to [`MAX_TEXT`] bytes, with a mark that it was cut.
pub fn bounded(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_string();
    }
    let mut s = crate::truncate(text.to_string(), MAX_TEXT - 3);
    s.push_str("...");
    s
}

/// The body of a complete HTTP/1.1 response with status 200 (Content-Length or read to the
/// end; the coordinator does not chunk).
pub fn parse_response(buf: &[u8]) -> Result<Vec<u8>, String> {
    let end =
        buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or("the answer has no complete header")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.lines();
    let status = lines.next().unwrap_or("");
    let code = status.split_whitespace().nth(1).unwrap_or("");
    let mut body = buf[end + 4..].to_vec();
    if code != "200" && code != "202" {
        let text = String::from_utf8_lossy(&body);
        return Err(bounded(&format!("answered {status:?}: {}", text.trim())));
    }
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                let n: usize = v.trim().parse().map_err(|_| "a bad Content-Length")?;
                if body.len() < n {
                    return Err(format!("the answer ended after {} of {n} bytes", body.len()));
                }
                body.truncate(n);
            }
            if k.trim().eq_ignore_ascii_case("transfer-encoding") {
                return Err("a chunked answer (not expected from a coordinator)".into());
            }
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_body_of_a_200_and_names_other_answers() {
        let ok =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(ok).unwrap(), b"{}");
        let short = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}";
        assert!(parse_response(short).unwrap_err().contains("2 of 10"));
        let no_len = b"HTTP/1.1 200 OK\r\n\r\nabc";
        assert_eq!(parse_response(no_len).unwrap(), b"abc");
        let err = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nstarting\n";
        assert!(parse_response(err).unwrap_err().contains("503"));
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }

    #[test]
    fn a_404_is_told_apart_and_a_long_answer_is_cut_like_an_event() {
        assert_eq!(status_code(b"HTTP/1.1 404 Not Found\r\n\r\nno savepoint"), 404);
        assert_eq!(status_code(b"garbage"), 0);
        let mut long = b"HTTP/1.1 500 Internal Server Error\r\n\r\n".to_vec();
        long.extend(std::iter::repeat_n(b'e', 100_000));
        let e = parse_response(&long).unwrap_err();
        assert!(e.len() <= MAX_TEXT && e.ends_with("...") && e.contains("500"), "{}", e.len());
        assert_eq!(bounded("short"), "short");
        // Cut at a character boundary.
        let b = bounded(&"é".repeat(1000));
        assert!(b.len() <= MAX_TEXT && b.ends_with("..."));
    }
}
