//! S3 tests against a real S3 server (Garage, started by `tests/env/up.sh`; `make e2e` runs
//! them with its `env.sh` sourced): the word count over objects under a prefix gives exactly
//! the counts the test computes on its own, at parallelism 1, 2 and 3 through the `weir`
//! command, with committed output only; bad S3 settings stop the job with a message that
//! names what to fix and never the secret key; `spec.s3` wins over the environment; the
//! client's calls, ranged reads of large objects and rolling sink parts, round-trip; and the
//! controller's calls delete a directory and nothing beside it, with credentials it gives.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use weir_crds::StorageUri;
use weir_crds::streamjob::S3Spec;
use weir_runtime::connectors::{FileSink, FileSource, list_source_files};
use weir_runtime::error::Whose;
use weir_runtime::objstore::{Credentials, S3Client};
use weir_runtime::operator::{Operator, Source};
use weir_runtime::record::Value;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: source the env.sh that tests/env/up.sh writes (make e2e does)")
    })
}

fn bucket() -> String {
    env("WEIR_TEST_BUCKET")
}

fn client() -> S3Client {
    S3Client::new(None).expect("an S3 client from the environment")
}

/// A prefix no other test or run uses.
fn unique_prefix(test: &str) -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("weir-tests/{test}-{nanos}-{}", std::process::id())
}

/// Writes `files` objects of text under `prefix` and returns the true count of every word.
fn write_input(
    s3: &S3Client,
    prefix: &str,
    files: usize,
    lines: usize,
    seed: u64,
) -> BTreeMap<String, u64> {
    // Some files end with CRLF lines, one without a final newline.
    let (texts, counts) = common::word_texts(files, lines, seed, Some(3), Some(5));
    for (f, text) in texts.into_iter().enumerate() {
        s3.put(&bucket(), &format!("{prefix}/input-{f:02}.txt"), text.into_bytes()).unwrap();
    }
    // Objects the source must skip, and one it must not read because it is outside the
    // "directory" (a sibling whose name starts with the same letters).
    for key in [".hidden", "_SUCCESS", "_tmp/ghost.txt", "sub/.inprogress"] {
        s3.put(&bucket(), &format!("{prefix}/{key}"), b"ghost ghost\n".to_vec()).unwrap();
    }
    s3.put(&bucket(), &format!("{prefix}-sibling/x.txt"), b"ghost\n".to_vec()).unwrap();
    counts
}

fn manifest(input: &str, output: &str, parallelism: u32, s3: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {{name: wc}}\nspec:\n  parallelism: {parallelism}\n  maxParallelism: 128\n  checkpointing: {{interval: 1s, storage: /var/tmp/weir/checkpoints}}\n  restartStrategy: {{type: none}}\n{s3}  pipeline:\n    operators:\n      - {{uid: lines,  type: file_source, path: {input}}}\n      - {{uid: words,  type: split, inputs: [lines]}}\n      - {{uid: counts, type: count, inputs: [words], key: word}}\n      - {{uid: out,    type: file_sink, inputs: [counts], path: {output}}}\n"
    )
}

/// The `weir` command under test: `WEIR_BIN` when set (an installed or copied build), else
/// the one cargo built for this test.
fn weir_bin() -> std::path::PathBuf {
    std::env::var_os("WEIR_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_weir").into())
}

/// An environment variable to set (`Some`) or remove (`None`).
type EnvChange<'a> = (&'a str, Option<&'a str>);

/// Runs `weir run` on `manifest` with the environment changed by `env`.
fn weir(dir: &Path, manifest: &str, parallelism: u32, env: &[EnvChange<'_>]) -> Output {
    let file = dir.join("job.yaml");
    std::fs::write(&file, manifest).unwrap();
    let mut cmd = Command::new(weir_bin());
    cmd.args(["run", file.to_str().unwrap(), "--parallelism", &parallelism.to_string()])
        .arg("--state-dir")
        .arg(dir.join("state"));
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.output().unwrap()
}

/// The committed objects under `prefix/`; fails on an in-progress (dot-named) one.
fn committed(s3: &S3Client, prefix: &str) -> Vec<String> {
    let keys: Vec<String> =
        s3.list(&bucket(), &format!("{prefix}/")).unwrap().into_iter().map(|o| o.key).collect();
    for k in &keys {
        let name = k.rsplit('/').next().unwrap();
        assert!(!name.starts_with('.'), "an uncommitted object was left behind: {k}");
    }
    keys
}

/// Reads the committed output and checks it against the true counts: for every word, each
/// count from 1 to its final value exactly once.
fn check_output(s3: &S3Client, out: &str, expected: &BTreeMap<String, u64>) {
    let keys = committed(s3, out);
    assert!(!keys.is_empty(), "no committed output under {out}/");
    let texts: Vec<String> =
        keys.iter().map(|k| String::from_utf8(s3.get(&bucket(), k).unwrap()).unwrap()).collect();
    common::check_counts(texts.iter().map(String::as_str), expected);
}

#[test]
#[ignore = "needs S3: run by make e2e"]
fn word_count_on_s3_is_exact_at_parallelism_1_2_and_3() {
    let s3 = client();
    let base = unique_prefix("wordcount");
    let expected = write_input(&s3, &format!("{base}/in"), 7, 300, 11);
    let tmp = tempfile::tempdir().unwrap();
    let input = format!("s3://{}/{base}/in", bucket());
    for p in [1, 2, 3] {
        let out = format!("{base}/out-{p}");
        let m = manifest(&input, &format!("s3://{}/{out}", bucket()), 2, "");
        let res = weir(tmp.path(), &m, p, &[]);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(res.status.success(), "weir run failed at p={p}: {err}");
        assert!(err.contains(&format!("parallelism {p}")), "{err}");
        check_output(&s3, &out, &expected);
    }
    // Runs never overwrite each other's objects: a second run into the same prefix adds.
    let out = format!("{base}/out-1");
    let before = committed(&s3, &out);
    let m = manifest(&input, &format!("s3://{}/{out}", bucket()), 1, "");
    let res = weir(tmp.path(), &m, 1, &[]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let after = committed(&s3, &out);
    assert_eq!(after.len(), before.len() * 2, "{after:?}");
    assert!(before.iter().all(|k| after.contains(k)), "{before:?} {after:?}");
}

#[test]
#[ignore = "needs S3: run by make e2e"]
fn bad_s3_settings_fail_clearly_without_printing_the_secret() {
    let s3 = client();
    let secret = env("AWS_SECRET_ACCESS_KEY");
    let base = unique_prefix("bad-settings");
    write_input(&s3, &format!("{base}/in"), 1, 10, 1);
    let tmp = tempfile::tempdir().unwrap();
    let input = format!("s3://{}/{base}/in", bucket());
    let output = format!("s3://{}/{base}/out", bucket());
    let good = manifest(&input, &output, 1, "");
    let missing = format!("weir-no-such-bucket-{}", std::process::id());
    // No AWS configuration from files or the instance metadata service.
    let isolated: &[EnvChange<'_>] = &[
        ("AWS_CONFIG_FILE", Some("/nonexistent/weir-test")),
        ("AWS_SHARED_CREDENTIALS_FILE", Some("/nonexistent/weir-test")),
        ("AWS_EC2_METADATA_DISABLED", Some("true")),
        ("AWS_PROFILE", None),
        ("AWS_DEFAULT_REGION", None),
    ];
    let wrong_secret = "0123456789abcdef-wrong-secret-key";
    let cases: Vec<(&str, String, Vec<EnvChange<'_>>, Vec<&str>)> = vec![
        (
            "nothing listens at the endpoint",
            good.clone(),
            vec![("AWS_ENDPOINT_URL", Some("http://127.0.0.1:1"))],
            vec!["127.0.0.1:1", input.as_str()],
        ),
        (
            "the source's bucket does not exist",
            manifest(&format!("s3://{missing}/in"), &output, 1, ""),
            vec![],
            vec![&missing, "NoSuchBucket", "does not exist"],
        ),
        (
            "the sink's bucket does not exist",
            manifest(&input, &format!("s3://{missing}/out"), 1, ""),
            vec![],
            vec!["file_sink", &missing, "does not exist"],
        ),
        (
            "the secret key is wrong",
            good.clone(),
            vec![("AWS_SECRET_ACCESS_KEY", Some(wrong_secret))],
            vec!["AWS_SECRET_ACCESS_KEY", "refused"],
        ),
        (
            "no region",
            good.clone(),
            [isolated, &[("AWS_REGION", None)]].concat(),
            vec!["spec.s3.region", "AWS_REGION"],
        ),
        (
            "no credentials",
            good.clone(),
            [
                isolated,
                &[
                    ("AWS_ACCESS_KEY_ID", None),
                    ("AWS_SECRET_ACCESS_KEY", None),
                    ("AWS_SESSION_TOKEN", None),
                ],
            ]
            .concat(),
            vec!["no credentials", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
        ),
        (
            "an endpoint that is not a URL",
            manifest(&input, &output, 1, "  s3: {endpoint: 'minio:9000'}\n"),
            vec![],
            vec!["spec.s3.endpoint", "minio:9000"],
        ),
    ];
    for (what, m, env, wants) in cases {
        let res = weir(tmp.path(), &m, 1, &env);
        let err = String::from_utf8_lossy(&res.stderr);
        let out = String::from_utf8_lossy(&res.stdout);
        assert_ne!(res.status.code(), Some(0), "{what}: the job succeeded: {err}");
        for w in wants {
            assert!(err.contains(w), "{what}: the error does not say {w:?}: {err}");
        }
        for s in [secret.as_str(), wrong_secret] {
            assert!(!err.contains(s) && !out.contains(s), "{what}: a secret key was printed");
        }
    }
    // Nothing was written by the failed runs.
    assert!(committed(&s3, &format!("{base}/out")).is_empty());
}

#[test]
#[ignore = "needs S3: run by make e2e"]
fn spec_s3_wins_over_the_environment() {
    let s3 = client();
    let base = unique_prefix("spec-s3");
    let expected = write_input(&s3, &format!("{base}/in"), 2, 50, 3);
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = env("AWS_ENDPOINT_URL");
    let region = env("AWS_REGION");
    let spec = format!(
        "  s3: {{endpoint: '{endpoint}', region: {region}, forcePathStyle: true, requestChecksums: when-required}}\n"
    );
    let input = format!("s3://{}/{base}/in", bucket());
    for (i, env) in [
        // Unset in the environment.
        vec![("AWS_ENDPOINT_URL", None), ("AWS_REGION", None), ("AWS_DEFAULT_REGION", None)],
        // Wrong in the environment.
        vec![("AWS_ENDPOINT_URL", Some("http://127.0.0.1:1")), ("AWS_REGION", Some("eu-north-1"))],
    ]
    .into_iter()
    .enumerate()
    {
        let out = format!("{base}/out-{i}");
        let m = manifest(&input, &format!("s3://{}/{out}", bucket()), 1, &spec);
        let res = weir(tmp.path(), &m, 2, &env);
        assert!(res.status.success(), "case {i}: {}", String::from_utf8_lossy(&res.stderr));
        check_output(&s3, &out, &expected);
    }
    // And the environment alone points nowhere: the job above used spec.s3.
    let m = manifest(&input, &format!("s3://{}/{base}/out-x", bucket()), 1, "");
    let res = weir(tmp.path(), &m, 1, &[("AWS_ENDPOINT_URL", Some("http://127.0.0.1:1"))]);
    assert!(!res.status.success());
}

#[test]
#[ignore = "needs S3: run by make e2e"]
fn the_client_round_trips_and_lists_every_page() {
    let s3 = client();
    let b = bucket();
    let base = unique_prefix("client");
    let debug = format!("{s3:?}");
    assert!(!debug.contains(&env("AWS_SECRET_ACCESS_KEY")), "{debug}");
    assert!(!debug.contains(&env("AWS_ACCESS_KEY_ID")), "{debug}");

    let key = format!("{base}/dir with space/ü+x.txt");
    s3.put(&b, &key, b"hello, world\n".to_vec()).unwrap();
    assert_eq!(s3.get(&b, &key).unwrap(), b"hello, world\n");
    assert_eq!(s3.get_range(&b, &key, 7, 11, None).unwrap(), b"world");
    let copy = format!("{base}/copy.txt");
    s3.copy(&b, &key, &copy).unwrap();
    assert_eq!(s3.get(&b, &copy).unwrap(), b"hello, world\n");
    s3.delete(&b, &copy).unwrap();
    s3.delete(&b, &copy).unwrap(); // already gone: not an error
    let e = s3.get(&b, &copy).unwrap_err();
    assert!(e.message.contains(&copy) && e.message.contains("NoSuchKey"), "{e}");

    // Made, used and dropped inside an async context, it neither nests runtimes nor panics.
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let inside = format!("{base}/from-async.txt");
    rt.block_on(async {
        let c = client();
        c.put(&b, &inside, b"async\n".to_vec()).unwrap();
        assert_eq!(c.get(&b, &inside).unwrap(), b"async\n");
        drop(c);
    });

    // More keys than one page of a listing (1000), written from a few threads.
    let keys: Vec<String> = (0..1010).map(|i| format!("{base}/many/k{i:05}")).collect();
    std::thread::scope(|scope| {
        for chunk in keys.chunks(keys.len().div_ceil(4)) {
            let (s3, b) = (s3.clone(), b.clone());
            scope.spawn(move || {
                for k in chunk {
                    s3.put(&b, k, k.as_bytes().to_vec()).unwrap();
                }
            });
        }
    });
    let listed: Vec<String> =
        s3.list(&b, &format!("{base}/many/")).unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(listed, keys);

    // A file larger than one upload part goes up in parts and comes back whole.
    let tmp = tempfile::tempdir().unwrap();
    let data: Vec<u8> =
        (0..(2 * weir_runtime::objstore::UPLOAD_PART + 12345)).map(|i| (i % 251) as u8).collect();
    std::fs::write(tmp.path().join("big"), &data).unwrap();
    let big = format!("{base}/big.bin");
    s3.put_file(&b, &big, &tmp.path().join("big")).unwrap();
    assert!(s3.get(&b, &big).unwrap() == data, "the object differs from the file");
}

/// The keys under `prefix`, in order.
fn keys_under(s3: &S3Client, prefix: &str) -> Vec<String> {
    s3.list(&bucket(), prefix).unwrap().into_iter().map(|o| o.key).collect()
}

#[test]
#[ignore = "needs S3: run by make e2e"]
fn delete_prefix_takes_a_directory_and_nothing_beside_it() {
    let s3 = client();
    let b = bucket();
    let base = unique_prefix("delete-prefix");
    // More keys than one DeleteObjects request takes, and one a level down.
    let mut doomed: Vec<String> = (0..1003).map(|i| format!("{base}/p/a/k{i:05}")).collect();
    doomed.push(format!("{base}/p/a/sub/deep.txt"));
    // Beside the directory: names that start as it does, and the key `p/a` itself.
    let kept: Vec<String> = ["p/a", "p/ab", "p/ab/x", "p/a-b/y", "p/b/z"]
        .iter()
        .map(|k| format!("{base}/{k}"))
        .collect();
    std::thread::scope(|scope| {
        for chunk in doomed.chunks(doomed.len().div_ceil(4)).chain([&kept[..]]) {
            let (s3, b) = (s3.clone(), b.clone());
            scope.spawn(move || {
                for k in chunk {
                    s3.put(&b, k, k.as_bytes().to_vec()).unwrap();
                }
            });
        }
    });
    let dir = format!("{base}/p/a/");
    assert_eq!(keys_under(&s3, &dir).len(), doomed.len());

    assert_eq!(s3.delete_prefix(&b, &dir).unwrap(), doomed.len() as u64);
    assert!(keys_under(&s3, &dir).is_empty());
    let mut expected = kept.clone();
    expected.sort();
    assert_eq!(keys_under(&s3, &format!("{base}/")), expected);

    // Again: nothing is there, and that is not an error.
    assert_eq!(s3.delete_prefix(&b, &dir).unwrap(), 0);
    // Neither the whole bucket nor a prefix without its `/` (it would take `p/ab`).
    let e = s3.delete_prefix(&b, "").unwrap_err();
    assert_eq!(e.whose, Whose::User, "{e}");
    assert!(e.message.contains("whole bucket"), "{e}");
    let e = s3.delete_prefix(&b, &format!("{base}/p/a")).unwrap_err();
    assert!(e.message.contains("not a directory prefix"), "{e}");
    assert_eq!(keys_under(&s3, &format!("{base}/")), expected);

    // A missing bucket is an error, not 0.
    let missing = format!("weir-no-such-bucket-{}", std::process::id());
    let e = s3.delete_prefix(&missing, "x/").unwrap_err();
    assert!(e.message.contains("NoSuchBucket"), "{e}");

    assert_eq!(s3.delete_prefix(&b, &format!("{base}/")).unwrap(), kept.len() as u64);
}

#[test]
#[ignore = "needs S3: run by make e2e"]
fn given_credentials_are_used_instead_of_the_environment() {
    let b = bucket();
    let base = unique_prefix("given-credentials");
    let spec = S3Spec {
        endpoint: Some(env("AWS_ENDPOINT_URL")),
        region: Some(env("AWS_REGION")),
        ..S3Spec::default()
    };
    // The environment's keys, given explicitly, as the controller gives a Secret's.
    let keys = Credentials::new(env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"));
    let s3 = S3Client::with_credentials(Some(&spec), Some(keys.clone())).unwrap();
    let key = format!("{base}/sp-1/_metadata");
    s3.put(&b, &key, b"metadata".to_vec()).unwrap();
    assert_eq!(s3.get(&b, &key).unwrap(), b"metadata");
    let debug = format!("{s3:?} {keys:?}");
    assert!(!debug.contains(&env("AWS_SECRET_ACCESS_KEY")), "{debug}");

    // Wrong keys fail though the environment's are right: the environment is not asked.
    let wrong_secret = "0123456789abcdef-wrong-secret-key";
    let unknown_key = "GK0000000000000000000000";
    for (what, creds) in [
        ("a wrong secret key", Credentials { secret_access_key: wrong_secret.into(), ..keys }),
        ("an unknown key id", Credentials::new(unknown_key, wrong_secret)),
    ] {
        let wrong = S3Client::with_credentials(Some(&spec), Some(creds)).unwrap();
        for e in [
            wrong.check_bucket(&b, &format!("{base}/")).unwrap_err(),
            wrong.delete_prefix(&b, &format!("{base}/")).unwrap_err(),
        ] {
            assert_eq!(e.whose, Whose::User, "{what}: {e}");
            assert!(
                ["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"]
                    .iter()
                    .any(|c| e.message.contains(c)),
                "{what}: {e}"
            );
            assert!(e.message.contains("spec.s3.credentialsSecret"), "{what}: {e}");
            assert!(!e.message.contains(wrong_secret), "{what}: {e}");
        }
    }
    // Nothing was deleted by the refused calls.
    assert_eq!(s3.get(&b, &key).unwrap(), b"metadata");
    assert_eq!(s3.delete_prefix(&b, &format!("{base}/")).unwrap(), 1);
}

#[test]
#[ignore = "needs S3: run by make e2e"]
fn large_objects_are_read_in_ranges_and_sink_parts_roll() {
    let s3 = client();
    let b = bucket();
    let base = unique_prefix("large");
    // Lines of different lengths across several read chunks.
    let chunk = weir_runtime::connectors::S3_READ_CHUNK as usize;
    let mut text = String::new();
    let mut lines = Vec::new();
    let mut i = 0u64;
    while text.len() < 2 * chunk + 100_000 {
        let line = format!("line {i} {}", "x".repeat((i % 97) as usize));
        text.push_str(&line);
        text.push('\n');
        lines.push(line);
        i += 1;
    }
    s3.put(&b, &format!("{base}/in/big.txt"), text.into_bytes()).unwrap();
    let uri: StorageUri = format!("s3://{b}/{base}/in").parse().unwrap();
    let files = list_source_files(&uri, Some(&s3)).unwrap();
    assert_eq!(files.len(), 1);
    let mut source = FileSource::new(&files, Some(s3.clone()), None, 0, 1);
    let mut records = Vec::new();
    while source.poll(&mut records, 4096).unwrap() {}
    assert_eq!(records.len(), lines.len());
    for (r, l) in records.iter().zip(&lines) {
        assert_eq!(r[0].to_string(), *l);
    }

    // An object replaced between the listing and the read is not read half old, half new.
    s3.put(&b, &format!("{base}/in/big.txt"), b"replaced\n".to_vec()).unwrap();
    let mut source = FileSource::new(&files, Some(s3.clone()), None, 0, 1);
    let e = loop {
        match source.poll(&mut Vec::new(), 4096) {
            Ok(true) => continue,
            Ok(false) => panic!("a replaced object was read to the end"),
            Err(e) => break e,
        }
    };
    assert!(e.message.contains(&format!("{base}/in/big.txt")), "{e}");

    // A sink whose output passes the part size commits several parts, each whole.
    let out: StorageUri = format!("s3://{b}/{base}/out").parse().unwrap();
    // Parts above one upload part, so that each goes up as a multipart upload.
    let part_bytes = weir_runtime::objstore::UPLOAD_PART + 1000;
    let mut sink = FileSink::new(&out, Some(&s3), "run1", 0, false)
        .unwrap()
        .with_part_bytes(part_bytes as u64);
    let mut written = 0usize;
    let mut n = 0u64;
    // Two full parts (each ends within a batch of its limit) and a third, smaller one.
    while written < 2 * part_bytes + 100_000 {
        let batch: Vec<Vec<Value>> = (0..1000)
            .map(|k| vec![Value::str(&format!("record-{}", n + k)), Value::Int((n + k) as i64)])
            .collect();
        written += batch
            .iter()
            .map(|r| r[0].to_string().len() + 2 + r[1].to_string().len())
            .sum::<usize>();
        n += 1000;
        sink.process(0, batch, &mut Vec::new()).unwrap();
    }
    // Before the commit, only in-progress objects: the two full parts.
    let pending: Vec<String> =
        s3.list(&b, &format!("{base}/out/")).unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(
        pending,
        (0..2).map(|p| format!("{base}/out/.part-run1-0-{p}.inprogress")).collect::<Vec<_>>()
    );
    sink.finish(&mut Vec::new()).unwrap();
    let keys = committed(&s3, &format!("{base}/out"));
    assert_eq!(
        keys,
        (0..3).map(|p| format!("{base}/out/part-run1-0-{p}")).collect::<Vec<_>>(),
        "parts"
    );
    let mut got = 0u64;
    for k in keys {
        for line in String::from_utf8(s3.get(&b, &k).unwrap()).unwrap().lines() {
            assert_eq!(line, format!("record-{got},{got}"));
            got += 1;
        }
    }
    assert_eq!(got, n);
}

/// A TLS-terminating proxy in front of the S3 server (Python's `ssl`, a certificate from a
/// throwaway CA made with `openssl`), so that the job talks HTTPS to a real S3 server.
struct TlsProxy {
    child: std::process::Child,
    port: u16,
    ca: std::path::PathBuf,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TLS_PROXY: &str = r#"
import socket, ssl, sys, threading
cert, key, upstream = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(64)
print(srv.getsockname()[1], flush=True)
def pipe(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
def serve(c):
    try:
        t = ctx.wrap_socket(c, server_side=True)
    except (ssl.SSLError, OSError):
        c.close()
        return
    u = socket.create_connection(("127.0.0.1", upstream))
    threading.Thread(target=pipe, args=(t, u), daemon=True).start()
    pipe(u, t)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

fn tls_proxy(dir: &Path, upstream_port: u16) -> TlsProxy {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=weir-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "s.key",
        "-out",
        "s.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "s.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "s.crt",
    ]);
    std::fs::write(dir.join("proxy.py"), TLS_PROXY).unwrap();
    let mut child = Command::new("python3")
        .args(["proxy.py", "s.crt", "s.key", &upstream_port.to_string()])
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port = line.trim().parse().unwrap_or_else(|_| panic!("the TLS proxy said {line:?}"));
    TlsProxy { child, port, ca: dir.join("ca.crt") }
}

#[test]
#[ignore = "needs S3: run by make e2e"]
fn https_endpoints_work() {
    let s3 = client();
    let base = unique_prefix("https");
    let expected = write_input(&s3, &format!("{base}/in"), 2, 50, 9);
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = env("AWS_ENDPOINT_URL");
    let upstream: u16 = endpoint.rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap();
    let proxy = tls_proxy(tmp.path(), upstream);
    let https = format!("https://127.0.0.1:{}", proxy.port);
    let ca = proxy.ca.to_str().unwrap().to_string();
    let input = format!("s3://{}/{base}/in", bucket());
    let out = format!("{base}/out");
    let m = manifest(&input, &format!("s3://{}/{out}", bucket()), 1, "");
    // The server's certificate is trusted through SSL_CERT_FILE.
    let res = weir(
        tmp.path(),
        &m,
        2,
        &[("AWS_ENDPOINT_URL", Some(&https)), ("SSL_CERT_FILE", Some(&ca))],
    );
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    check_output(&s3, &out, &expected);
    // Without trusting it, the job stops with a TLS error.
    let m = manifest(&input, &format!("s3://{}/{base}/out-untrusted", bucket()), 1, "");
    let res =
        weir(tmp.path(), &m, 1, &[("AWS_ENDPOINT_URL", Some(&https)), ("SSL_CERT_FILE", None)]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(err.contains(&https) && err.to_lowercase().contains("certificate"), "{err}");
}

#[test]
#[ignore = "needs S3: run by make e2e"]
fn the_example_manifest_runs_against_the_test_server() {
    let s3 = client();
    let base = unique_prefix("example");
    let expected = write_input(&s3, &format!("{base}/in"), 3, 40, 21);
    let example = Path::new(&manifest_dir()).join("../manifests/examples/wordcount-s3.yaml");
    let text = std::fs::read_to_string(&example).unwrap();
    // The example's server and bucket, pointed at the test server and a fresh prefix.
    for needle in [
        "endpoint: http://minio.storage:9000",
        "region: us-east-1",
        "s3://weir-data/in",
        "s3://weir-data/out",
    ] {
        assert!(text.contains(needle), "the example no longer says {needle:?}");
    }
    let m = text
        .replace(
            "endpoint: http://minio.storage:9000",
            &format!("endpoint: '{}'", env("AWS_ENDPOINT_URL")),
        )
        .replace("region: us-east-1", &format!("region: {}", env("AWS_REGION")))
        .replace("s3://weir-data/", &format!("s3://{}/{base}/", bucket()));
    let tmp = tempfile::tempdir().unwrap();
    let res = weir(tmp.path(), &m, 3, &[("AWS_ENDPOINT_URL", None)]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    check_output(&s3, &format!("{base}/out"), &expected);
}

/// What the fault proxy does to connections.
const PASS: u8 = 0;
/// Closes every connection, new and open ones.
const REFUSE: u8 = 1;
/// Forwards up to 4 KiB of what a connection sends, then drops it (mid-upload).
const DROP: u8 = 2;
/// Waits 300 ms before forwarding each chunk.
const SLOW: u8 = 3;
/// Answers every upload (PUT or POST) with an S3 error the client does not retry, so the
/// upload fails at once and deterministically (a decline, not an expiry).
const FAIL: u8 = 4;

/// In FAIL mode: takes the rest of the request that `first` starts (headers and a body of
/// Content-Length bytes), then answers 400 and closes.
fn refuse_upload(client: &mut std::net::TcpStream, first: &[u8]) {
    use std::io::{Read, Write};
    let mut req = first.to_vec();
    let mut buf = [0u8; 16 << 10];
    let head_end = loop {
        if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&req[..head_end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut have = req.len() - head_end;
    while have < len {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
    }
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InvalidRequest</Code>\
                <Message>refused by the test's fault proxy</Message></Error>";
    let _ = write!(
        client,
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A TCP proxy in front of the S3 server whose behaviour the test switches.
struct FaultProxy {
    port: u16,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
}

impl FaultProxy {
    fn start(upstream: String) -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(PASS));
        let m = mode.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if m.load(Ordering::Relaxed) == REFUSE {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
                let pump = |mut from: std::net::TcpStream,
                            mut to: std::net::TcpStream,
                            m: std::sync::Arc<std::sync::atomic::AtomicU8>,
                            limit: bool| {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 << 10];
                        let mut sent = 0usize;
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            match m.load(Ordering::Relaxed) {
                                REFUSE => break,
                                FAIL if limit
                                    && (buf[..n].starts_with(b"PUT ")
                                        || buf[..n].starts_with(b"POST ")) =>
                                {
                                    refuse_upload(&mut from, &buf[..n]);
                                    break;
                                }
                                DROP if limit && sent + n > 4 << 10 => break,
                                SLOW => std::thread::sleep(std::time::Duration::from_millis(300)),
                                _ => {}
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            sent += n;
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                pump(client, server, m.clone(), true);
                pump(s2, c2, m.clone(), false);
            }
        });
        Self { port, mode }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
#[ignore = "needs S3: run by make e2e"]
fn s3_faults_fail_checkpoints_within_the_tolerance_and_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let (texts, expected) = common::word_texts(8, 1500, 31, None, None);
    for (f, t) in texts.iter().enumerate() {
        std::fs::write(input.join(format!("input-{f:02}.txt")), t).unwrap();
    }
    let upstream = env("AWS_ENDPOINT_URL");
    let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_string();
    let proxy = FaultProxy::start(upstream);
    let base = unique_prefix("faults");
    let out = tmp.path().join("out");
    let file = tmp.path().join("job.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: faults}}
spec:
  parallelism: 2
  checkpointing: {{interval: 1s, timeout: 4s, tolerableFailures: 2, storage: s3://{bucket}/{base}/checkpoints}}
  restartStrategy: {{type: fixed-delay, delay: 300ms, attempts: 1000}}
  s3: {{endpoint: 'http://127.0.0.1:{port}', region: {region}, forcePathStyle: true}}
  pipeline:
    operators:
      - {{uid: lines,  type: file_source, path: {input}, ratePerSecond: 300}}
      - {{uid: words,  type: split, inputs: [lines]}}
      - {{uid: counts, type: count, inputs: [words], key: word}}
      - {{uid: out,    type: file_sink, inputs: [counts], path: {out}}}
",
            bucket = bucket(),
            port = proxy.port,
            region = env("AWS_REGION"),
            input = input.display(),
            out = out.display(),
        ),
    )
    .unwrap();
    let mut child = Command::new(weir_bin())
        .args(["run", file.to_str().unwrap(), "--processes", "--state-dir"])
        .arg(tmp.path().join("state"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let err_pipe = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::BufReader::new(err_pipe), &mut s).unwrap();
        s
    });
    let phase = |mode: u8, secs: u64| {
        proxy.set(mode);
        std::thread::sleep(std::time::Duration::from_secs(secs));
    };
    phase(PASS, 3);
    phase(DROP, 4); // uploads cut off in the middle
    phase(PASS, 2);
    phase(FAIL, 3); // uploads refused: workers decline their checkpoints
    phase(PASS, 2);
    phase(SLOW, 6); // slower than the checkpoint timeout
    phase(PASS, 2);
    phase(REFUSE, 12); // the server is gone: failures beyond the tolerance, failed restores
    proxy.set(PASS);
    let status = child.wait().unwrap();
    let err = stderr.join().unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("declined by worker"), "no checkpoint was declined: {err}");
    assert!(err.contains("checkpoints failed in a row"), "the tolerance was never passed: {err}");
    assert!(err.contains("from checkpoint"), "no restore from a checkpoint: {err}");
    let texts = common::committed_texts(&out);
    common::check_counts(texts.iter().map(String::as_str), &expected);
    // Every checkpoint left in the storage is complete: metadata and every file it names.
    let s3 = client();
    let keys: Vec<String> = s3
        .list(&bucket(), &format!("{base}/checkpoints/"))
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    let metas: Vec<&String> = keys.iter().filter(|k| k.ends_with("/_metadata")).collect();
    assert!(!metas.is_empty(), "{keys:?}");
    for m in metas {
        let meta =
            weir_runtime::checkpoint::Metadata::parse(&s3.get(&bucket(), m).unwrap(), m, None)
                .unwrap();
        let job_dir = m.rsplitn(3, '/').nth(2).unwrap();
        for o in meta.operators.iter().filter_map(|o| o.keyed.as_ref()) {
            for f in &o.files {
                let k = format!("{job_dir}/{}", f.key);
                assert!(keys.contains(&k), "{m} names {k}, which is missing");
            }
        }
    }
}

/// The package's directory, from cargo at run time: a test binary built in another checkout
/// sharing the target directory (CI's) must not read that checkout's files.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())
}
