//! The coordinator's control port, attacked as a client inside the cluster would: hellos
//! without the job's secret, with a wrong or a replayed proof, slow and silent clients, a
//! line that never ends, a flood of connections, a forged failure and forged
//! acknowledgements. Each is refused or survived, the honest workers still run the job, and
//! its output stays exact (every count once).

mod common;
mod process;

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use process::{Proc, SECRET, open_control, start, start_with_env};
use weir_runtime::{auth, control};

/// A bounded word count at parallelism 2 with checkpoints every 200 ms; the true counts.
fn word_count(
    dir: &Path,
    extra: &str,
) -> (std::path::PathBuf, std::collections::BTreeMap<String, u64>) {
    let input = dir.join("in");
    let expected = common::write_input(&input, 4, 3000, 11);
    let file = dir.join("wc.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {{name: wc}}\nspec:\n  parallelism: 2\n  maxParallelism: 64\n{extra}  checkpointing: {{interval: 200ms, storage: {}}}\n  pipeline:\n    operators:\n      - {{uid: lines, type: file_source, path: {}}}\n      - {{uid: words, type: split, inputs: [lines]}}\n      - {{uid: counts, type: count, inputs: [words], key: word}}\n      - {{uid: out, type: file_sink, inputs: [counts], path: {}}}\n",
            dir.join("checkpoints").display(),
            input.display(),
            dir.join("out").display()
        ),
    )
    .unwrap();
    (file, expected)
}

fn coordinator(file: &Path) -> Proc {
    start(&["coordinator", file.to_str().unwrap(), "--control-addr", "127.0.0.1:0"])
}

fn worker(control: &str, i: u32, dir: &Path) -> Proc {
    start(&[
        "worker",
        "--coordinator",
        control,
        "--index",
        &i.to_string(),
        "--state-dir",
        dir.join("state").to_str().unwrap(),
        "--data-addr",
        "127.0.0.1:0",
    ])
}

/// Everything the coordinator sends until it closes the connection (or `limit` passes), and
/// how long that took.
fn read_to_close(s: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let t = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    (String::from_utf8_lossy(&got).into_owned(), t.elapsed())
}

fn hello_line(index: u32, nonce: &str) -> String {
    format!(
        r#"{{"type":"hello","protocol":{},"index":{index},"dataAddr":"127.0.0.1:1","nonce":"{nonce}"}}"#,
        control::PROTOCOL
    ) + "\n"
}

/// What a refused client may learn: nothing about the job (no start, no spec, no run id).
fn assert_learns_nothing(got: &str, input_dir: &Path) {
    assert!(!got.contains(r#""type":"start""#), "{got}");
    assert!(!got.contains("runId"), "{got}");
    assert!(!got.contains(input_dir.to_str().unwrap()), "{got}");
}

#[test]
fn control_port_attacks_are_refused_and_the_job_still_counts_every_word_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, expected) = word_count(tmp.path(), "");
    let coord = coordinator(&file);
    let control = coord.addr("control");
    let input = tmp.path().join("in");
    let limit = Duration::from_secs(20);

    // A hello without a nonce (the old protocol's, with the run id alone in reach).
    let mut s = TcpStream::connect(&control).unwrap();
    let old = format!(
        r#"{{"type":"hello","protocol":{},"index":1,"dataAddr":"127.0.0.1:1"}}"#,
        control::PROTOCOL
    );
    writeln!(s, "{old}").unwrap();
    let (got, _) = read_to_close(&mut s, limit);
    assert!(got.contains(r#""type":"refused""#) && got.contains("nonce"), "{got}");
    assert_learns_nothing(&got, &input);

    // A hello answered with a proof by the wrong secret.
    let (mut w, mut r) =
        open_control(&control, 1, "127.0.0.1:1", "the-wrong-secret-0123456789abcdef0");
    let mut got = String::new();
    let _ = r.read_to_string(&mut got);
    assert!(got.contains("did not prove the job's secret"), "{got}");
    assert_learns_nothing(&got, &input);
    let _ = writeln!(w, r#"{{"type":"progress","records":[],"stateBytes":0}}"#);

    // A proof recorded from another connection (made for another challenge) is worthless.
    let secret = auth::JobSecret::new(SECRET).unwrap();
    let ours = auth::nonce();
    let recorded = control::worker_proof(&secret, &auth::nonce(), &ours, Some(1), "127.0.0.1:1");
    let mut s = TcpStream::connect(&control).unwrap();
    s.write_all(hello_line(1, &auth::hex(&ours)).as_bytes()).unwrap();
    writeln!(s, r#"{{"type":"proof","proof":"{}"}}"#, auth::hex(&recorded)).unwrap();
    let (got, _) = read_to_close(&mut s, limit);
    assert!(got.contains(r#""type":"challenge""#), "{got}");
    assert!(got.contains("did not prove the job's secret"), "{got}");
    assert_learns_nothing(&got, &input);

    // A forged failure from a client that cannot prove the secret ends nothing.
    let mut s = TcpStream::connect(&control).unwrap();
    s.write_all(hello_line(0, &auth::hex(&auth::nonce())).as_bytes()).unwrap();
    writeln!(s, r#"{{"type":"failed","message":"forged","user":true,"retryable":false}}"#).unwrap();
    let (got, _) = read_to_close(&mut s, limit);
    assert!(got.contains("did not prove the job's secret"), "{got}");

    // A silent client, a slow one (a byte every 300 ms), and a line that never ends are each
    // dropped after the opening's deadline, not held.
    let mut silent = TcpStream::connect(&control).unwrap();
    let slow = {
        let control = control.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(&control).unwrap();
            let t = Instant::now();
            for b in hello_line(1, &auth::hex(&auth::nonce())).bytes() {
                if s.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            t.elapsed()
        })
    };
    let mut endless = TcpStream::connect(&control).unwrap();
    let _ = endless.write_all(&vec![b'x'; 8 << 10]);
    let (got, took) = read_to_close(&mut silent, limit);
    assert!(took < limit, "the silent client was held {took:?}");
    assert!(!got.contains("challenge"), "{got}");
    let (got, took) = read_to_close(&mut endless, limit);
    assert!(took < limit, "the endless line was held {took:?}");
    assert!(got.is_empty() || got.contains("refused"), "{got}");
    // The hello takes 30 s at that pace; the coordinator closes long before.
    let slow_took = slow.join().unwrap();
    assert!(slow_took < Duration::from_secs(25), "the slow client was held {slow_took:?}");

    // A flood of connections that say nothing, held while the honest workers join: they
    // are dropped, and the workers get in.
    let flood: Vec<TcpStream> =
        (0..100).filter_map(|_| TcpStream::connect(&control).ok()).collect();
    let w0 = worker(&control, 0, tmp.path());
    let w1 = worker(&control, 1, tmp.path());
    let (code, err) = coord.finish(Duration::from_secs(180));
    drop(flood);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("refused a connection"), "{err}");
    assert!(!err.contains(SECRET), "the secret is in the log: {err}");
    for w in [w0, w1] {
        let (code, err) = w.finish(Duration::from_secs(60));
        assert_eq!(code, Some(0), "{err}");
    }
    let texts = common::committed_texts(&tmp.path().join("out"));
    common::check_counts(texts.iter().map(String::as_str), &expected);
}

#[test]
fn the_job_secret_is_required_and_a_wrong_one_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, _) = word_count(tmp.path(), "");
    // Without the secret neither part starts.
    let c = start_with_env(
        &["coordinator", file.to_str().unwrap(), "--control-addr", "127.0.0.1:0"],
        &[("WEIR_JOB_SECRET", "")],
    );
    let (code, err) = c.finish(Duration::from_secs(30));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("WEIR_JOB_SECRET has 0 bytes"), "{err}");
    let w = std::process::Command::new(process::WEIR)
        .args(["worker", "--coordinator", "127.0.0.1:1", "--index", "0"])
        .env_remove("WEIR_JOB_SECRET")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&w.stderr);
    assert_eq!(w.status.code(), Some(2), "{err}");
    assert!(err.contains("WEIR_JOB_SECRET is not set"), "{err}");

    // A worker with another secret: the coordinator cannot prove it, so the worker stops
    // there and says what to fix; the coordinator learns nothing from it either.
    let coord = coordinator(&file);
    let control = coord.addr("control");
    let w = start_with_env(
        &[
            "worker",
            "--coordinator",
            &control,
            "--index",
            "0",
            "--state-dir",
            tmp.path().join("state").to_str().unwrap(),
        ],
        &[("WEIR_JOB_SECRET", "another-secret-of-this-job-0123456789")],
    );
    let (code, err) = w.finish(Duration::from_secs(30));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("did not prove the job's secret: give the coordinator and every worker the same WEIR_JOB_SECRET"),
        "{err}"
    );
    assert!(!err.contains(SECRET), "{err}");
    coord.signal("-TERM");
    let (_, err) = coord.finish(Duration::from_secs(30));
    assert!(err.contains("refused a connection"), "{err}");
}

#[test]
fn forged_acknowledgements_fail_the_attempt_with_a_message() {
    // An acknowledgement from an authenticated worker that names a task the job does not
    // have, a subtask placed on another worker, or state of an operator outside its task.
    let cases = [
        (
            r#""task":"nope","subtask":1,"operators":[]"#,
            r#"names task "nope", which the job does not have"#,
        ),
        (
            r#""task":"counts","subtask":0,"operators":[]"#,
            r#"names subtask 0 of "counts", which runs on worker 0"#,
        ),
        (
            r#""task":"counts","subtask":1,"operators":[{"uid":"lines","subtask":1}]"#,
            r#"holds state of operator "lines", which is not in task "counts""#,
        ),
    ];
    for (fields, why) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let (file, _) = word_count(tmp.path(), "  restartStrategy: {type: none}\n");
        let coord = coordinator(&file);
        let control = coord.addr("control");
        let w0 = worker(&control, 0, tmp.path());
        let (mut w, mut r) = open_control(&control, 1, "127.0.0.1:1", SECRET);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains(r#""type":"start""#), "{line}");
        writeln!(
            w,
            r#"{{"type":"ack","id":1,"ack":{{{fields},"stateBytes":0,"uploadedBytes":0,"alignmentMs":0,"syncMs":0,"asyncMs":0}}}}"#
        )
        .unwrap();
        let (code, err) = coord.finish(Duration::from_secs(60));
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains("worker 1 sent an acknowledgement that does not fit the job"),
            "{err}"
        );
        assert!(err.contains(why), "{why} in {err}");
        let _ = w0.finish(Duration::from_secs(30));
    }
}
