//! `kubectl-weir`, the real binary, against the real control plane, node agent, S3 server and
//! controller: every command on a word count, checked by what it prints and by what the
//! cluster then holds; the bad inputs; and `weir jobs` handed over to it. The binary finds
//! the cluster through `KUBECONFIG`, which the test environment sets.

use std::process::Command;

use weir_crds::streamjob::{JobPhase, SavepointReason};
use weir_e2e::jobs::{Controller, apply, s3_keys, status, wait_job, wordcount};
use weir_e2e::testenv::{TestEnv, setting};

/// What a run of a command printed and how it exited.
#[derive(Debug)]
struct Run {
    code: i32,
    out: String,
    err: String,
}

/// Runs `binary` (`kubectl-weir` or `weir`) with `args`, showing the output in the log.
fn run(env: &TestEnv, binary: &str, args: &[&str]) -> Run {
    let out = Command::new(env.binary(binary)).args(args).output().unwrap_or_else(|e| {
        panic!("running {binary}: {e} (cargo build --workspace --bins builds it)")
    });
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!("$ {binary} {}\n{}{}[exit {}]\n", args.join(" "), r.out, r.err, r.code);
    r
}

fn weir(env: &TestEnv, args: &[&str]) -> Run {
    run(env, "kubectl-weir", args)
}

/// Runs a command that must succeed.
fn ok(env: &TestEnv, args: &[&str]) -> Run {
    let r = weir(env, args);
    assert_eq!(r.code, 0, "kubectl-weir {args:?}: {r:?}");
    r
}

/// The line of `table` that starts with `first`.
fn row<'a>(table: &'a str, first: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{table}"))
}

/// The savepoint's `_metadata` is in the test bucket.
fn assert_savepoint_exists(path: &str) {
    let bucket = setting("WEIR_TEST_BUCKET");
    let key = path
        .strip_prefix(&format!("s3://{bucket}/"))
        .unwrap_or_else(|| panic!("{path:?} is not in s3://{bucket}/"));
    let keys = s3_keys(&format!("{}/", key.trim_end_matches('/')));
    assert!(keys.iter().any(|k| k.ends_with("/_metadata")), "no _metadata under {path}: {keys:?}");
}

#[tokio::test]
async fn every_command_of_kubectl_weir_on_a_running_job() {
    // Long enough to run through the whole test (200 lines/s): it never finishes here.
    const LINES: u64 = 200_000;
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("cli").await;
    let n = ns.as_str();
    env.create_s3_credentials(n).await;
    let _ctl = Controller::start(&env, n, &[]);

    // Nothing yet: an empty list, and a job that is not there.
    let r = ok(&env, &["jobs", "-n", n]);
    assert_eq!(r.out, "");
    assert!(r.err.contains(&format!("No StreamJobs found in namespace {n}.")), "{r:?}");
    apply(&env, &wordcount(n, "wc", 2, LINES));
    wait_job(&env, n, "wc", "running with a checkpoint", |j| {
        let s = status(j);
        s.phase == Some(JobPhase::Running) && s.last_checkpoint.is_some()
    })
    .await;

    // jobs: the table, with a NAMESPACE column under -A.
    let r = ok(&env, &["jobs", "-n", n]);
    let header = r.out.lines().next().unwrap();
    for col in ["NAME", "PHASE", "PARALLELISM", "LAST CHECKPOINT", "LAST SAVEPOINT", "AGE"] {
        assert!(header.contains(col), "{header}");
    }
    let wc = row(&r.out, "wc");
    assert!(wc.contains("Running") && wc.contains("2/2") && wc.contains(" ago"), "{wc}");
    let r = ok(&env, &["jobs", "-A"]);
    assert!(r.out.starts_with("NAMESPACE"), "{}", r.out);
    assert!(row(&r.out, n).contains("wc"), "{}", r.out);

    // status: the phase and the last checkpoint, in sections; the object with -o json.
    let r = ok(&env, &["status", "wc", "-n", n]);
    assert!(r.out.contains("Phase:                Running"), "{}", r.out);
    assert!(r.out.contains("Last checkpoint:\n  Id:"), "{}", r.out);
    assert!(r.out.contains("Conditions:") && r.out.contains("Ready"), "{}", r.out);
    let r = ok(&env, &["status", "wc", "-n", n, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(v["metadata"]["name"], "wc");

    // savepoint: its path on stdout, in S3, and listed among the job's snapshots.
    let r = ok(&env, &["savepoint", "wc", "-n", n, "--timeout", "3m"]);
    let path = r.out.trim().to_string();
    assert!(path.starts_with("s3://") && !path.contains('\n'), "{r:?}");
    assert_savepoint_exists(&path);
    let j = wait_job(&env, n, "wc", "the savepoint recorded", |_| true).await;
    let last = status(&j).last_savepoint.unwrap();
    assert_eq!((last.path.as_str(), last.reason), (path.as_str(), SavepointReason::Requested));
    let r = ok(&env, &["snapshots", "wc", "-n", n]);
    let snap = row(&r.out, last.snapshot.as_deref().unwrap());
    assert!(snap.contains(&path) && snap.contains("Requested") && snap.contains("Completed"));
    ok(&env, &["snapshots", "-n", n]);

    // rescale: refused out of range, then 2 -> 1 and running at 1.
    let r = weir(&env, &["rescale", "wc", "0", "-n", n]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.err.contains("parallelism 0 is too small"), "{r:?}");
    let r = weir(&env, &["rescale", "wc", "129", "-n", n]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.err.contains("parallelism 129 is above the job's maxParallelism 128"), "{r:?}");
    let r = ok(&env, &["rescale", "wc", "1", "-n", n, "--wait", "--timeout", "3m"]);
    assert!(r.out.contains("spec.parallelism 2 -> 1"), "{r:?}");
    let j = wait_job(&env, n, "wc", "read", |_| true).await;
    assert_eq!(status(&j).job.map(|r| r.parallelism), Some(1));
    assert_eq!(status(&j).phase, Some(JobPhase::Running));

    // suspend and resume.
    let r = ok(&env, &["suspend", "wc", "-n", n, "--wait", "--timeout", "3m"]);
    assert!(r.out.contains("spec.state running -> suspended"), "{r:?}");
    assert!(r.err.contains("suspended, with a savepoint at s3://"), "{r:?}");
    let j = wait_job(&env, n, "wc", "read", |_| true).await;
    assert_eq!(status(&j).phase, Some(JobPhase::Suspended));
    assert!(row(&ok(&env, &["jobs", "-n", n]).out, "wc").contains("Suspended"));
    let r = weir(&env, &["savepoint", "wc", "-n", n]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.err.contains("is suspended"), "{r:?}");
    let r = ok(&env, &["resume", "wc", "-n", n, "--wait", "--timeout", "3m"]);
    assert!(r.out.contains("spec.state suspended -> running"), "{r:?}");
    let j = wait_job(&env, n, "wc", "read", |_| true).await;
    assert_eq!(status(&j).phase, Some(JobPhase::Running));

    // savepoint --stop: suspended with a savepoint, whose path is printed.
    let r = ok(&env, &["savepoint", "wc", "--stop", "-n", n, "--timeout", "3m"]);
    let stop_path = r.out.trim().to_string();
    assert!(stop_path.starts_with("s3://") && stop_path != path, "{r:?}");
    assert_savepoint_exists(&stop_path);
    let j = wait_job(&env, n, "wc", "read", |_| true).await;
    let s = status(&j);
    assert_eq!(s.phase, Some(JobPhase::Suspended));
    let last = s.last_savepoint.unwrap();
    assert_eq!((last.path.as_str(), last.reason), (stop_path.as_str(), SavepointReason::Suspend));
    let r = ok(&env, &["snapshots", "wc", "-n", n]);
    assert!(row(&r.out, last.snapshot.as_deref().unwrap()).contains("Suspend"), "{}", r.out);

    // Bad inputs: a job or a namespace that is not there.
    let r = weir(&env, &["status", "nope", "-n", n]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.err.contains(&format!("streamjob \"nope\" not found in namespace \"{n}\"")));
    let r = weir(&env, &["rescale", "nope", "1", "-n", n]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.err.contains("streamjob \"nope\" not found"), "{r:?}");
    let r = weir(&env, &["jobs", "-n", "no-such-namespace"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.err.contains("namespace \"no-such-namespace\" not found"), "{r:?}");
    let r = weir(&env, &["status", "wc", "-n", "no-such-namespace"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.err.contains("namespace \"no-such-namespace\" not found"), "{r:?}");
    let r = weir(&env, &["frobnicate"]);
    assert_eq!(r.code, 2, "{r:?}");

    // weir hands the commands for jobs under the operator to kubectl-weir.
    let r = run(&env, "weir", &["jobs", "-n", n]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(row(&r.out, "wc").contains("Suspended"), "{r:?}");

    // The job is suspended: deleting it takes no final savepoint.
    env.delete_namespace(n).await;
}
