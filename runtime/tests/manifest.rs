//! `weir run FILE` (and `weir coordinator FILE`) take the manifest `kubectl apply` takes and
//! refuse what the apiserver refuses, before anything starts, with exit code 2 and the
//! apiserver's words naming the field: unknown fields (strict field validation), a kind or an
//! apiVersion the CRD does not serve, values outside the CRD schema's ranges, uids and
//! durations that do not match its patterns. The example manifests of the repository (and
//! those of the docs and the controller's fixtures) still pass.
//!
//! The expected words are those of kube-apiserver 1.37.2 (`kubectl create --dry-run=server`)
//! for the same objects.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(&manifest_dir()).join("..")
}

/// A bounded word count over a file source into a file sink, checkpointing to `dir`: were it
/// to start, `dir/checkpoints` or `dir/out` would appear.
fn manifest(dir: &Path) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: wc}}
spec:
  parallelism: 1
  checkpointing: {{interval: 1s, storage: {dir}/checkpoints}}
  restartStrategy: {{type: none}}
  pipeline:
    operators:
      - {{uid: lines, type: file_source, path: {dir}/in}}
      - {{uid: words, type: split, inputs: [lines]}}
      - {{uid: counts, type: count, inputs: [words], key: word}}
      - {{uid: out, type: file_sink, inputs: [counts], path: {dir}/out}}
",
        dir = dir.display()
    )
}

fn weir(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("running weir")
}

/// Runs `weir ARGS FILE` on `text` and checks that it exits 2 before anything starts, saying
/// each of `wants` (and the file, when `names_file`); returns what it said.
fn refused(dir: &Path, args: &[&str], text: &str, wants: &[&str], names_file: bool) -> String {
    std::fs::create_dir_all(dir.join("in")).unwrap();
    std::fs::write(dir.join("in/input.txt"), "a b a\n").unwrap();
    let file = dir.join("job.yaml");
    std::fs::write(&file, text).unwrap();
    let mut all: Vec<&str> = args.to_vec();
    all.push(file.to_str().unwrap());
    let secret = "0123456789abcdef".repeat(4);
    let res = weir(&all, &[("WEIR_JOB_SECRET", &secret)]);
    let err = String::from_utf8_lossy(&res.stderr).to_string();
    assert_eq!(res.status.code(), Some(2), "{args:?} {wants:?}: {err}");
    for w in wants {
        assert!(err.contains(w), "the refusal does not say {w:?}:\n{err}");
    }
    if names_file {
        let file = file.to_str().unwrap();
        assert!(err.contains(file), "the refusal does not name the file:\n{err}");
    }
    assert!(!err.contains("weir: running"), "the job started:\n{err}");
    for started in ["checkpoints", "out"] {
        assert!(!dir.join(started).exists(), "something started: {started} exists\n{err}");
    }
    err
}

#[test]
fn loose_manifests_are_refused_in_the_apiservers_words_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let good = manifest(tmp.path());
    // (what is changed, into what, the apiserver's words)
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "  parallelism: 1\n",
            "  parallelism: 1\n  stateBackends: rocksdb\n",
            &["unknown field \"spec.stateBackends\""],
        ),
        (
            "{type: none}",
            "{type: fixed-delay, dealy: 5s}",
            &["unknown field \"spec.restartStrategy.dealy\""],
        ),
        (
            "metadata: {name: wc}",
            "metadata: {name: wc, namepsace: prod}",
            &["unknown field \"metadata.namepsace\""],
        ),
        (
            "kind: StreamJob",
            "kind: StreamJobs",
            &["no matches for kind \"StreamJobs\" in version \"weir.dev/v1alpha1\"", "StreamJob"],
        ),
        (
            "weir.dev/v1alpha1",
            "weir.dev/v1",
            &["no matches for kind \"StreamJob\" in version \"weir.dev/v1\"", "weir.dev/v1alpha1"],
        ),
        ("kind: StreamJob\n", "", &["kind not set"]),
        (
            "interval: 1s,",
            "interval: 1s, retained: 0,",
            &[
                "spec.checkpointing.retained: Invalid value: 0: spec.checkpointing.retained in body should be greater than or equal to 1",
            ],
        ),
        (
            "interval: 1s,",
            "interval: 1s, maxConcurrent: 0,",
            &[
                "spec.checkpointing.maxConcurrent: Invalid value: 0: spec.checkpointing.maxConcurrent in body should be greater than or equal to 1",
            ],
        ),
        (
            "interval: 1s,",
            "interval: 1s, tolerableFailures: -1,",
            &[
                "spec.checkpointing.tolerableFailures: Invalid value: -1: spec.checkpointing.tolerableFailures in body should be greater than or equal to 0",
            ],
        ),
        (
            "interval: 1s,",
            "interval: 1s, retained: 101,",
            &[
                "spec.checkpointing.retained: Invalid value: 101: spec.checkpointing.retained in body should be less than or equal to 100",
            ],
        ),
        (
            "uid: words, type: split",
            "uid: Words, type: split",
            &[
                "spec.pipeline.operators[1].uid: Invalid value: \"Words\": spec.pipeline.operators[1].uid in body should match '^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$'",
            ],
        ),
        (
            "interval: 1s,",
            "interval: 1 second,",
            &[
                "spec.checkpointing.interval: Invalid value: \"1 second\": spec.checkpointing.interval in body should match '^([0-9]+(ms|s|m|h|d))+$'",
            ],
        ),
        (
            "{type: none}",
            "{type: sometimes}",
            &[
                "spec.restartStrategy.type: Unsupported value: \"sometimes\": supported values: \"exponential-delay\", \"fixed-delay\", \"failure-rate\", \"none\"",
            ],
        ),
        (
            "  parallelism: 1\n",
            "  parallelism: one\n",
            &[
                "spec.parallelism: Invalid value: \"string\": spec.parallelism in body must be of type integer: \"string\"",
            ],
        ),
        (
            "      - {uid: out, type: file_sink,",
            "      - {uid: out,",
            &["spec.pipeline.operators[3].type: Required value"],
        ),
    ];
    for (i, (from, to, wants)) in cases.iter().enumerate() {
        assert!(good.contains(from), "case {i}: {from:?} is not in the manifest");
        let dir = tmp.path().join(format!("case-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let text = manifest(&dir).replace(from, to);
        refused(&dir, &["run"], &text, wants, true);
    }
}

#[test]
fn every_error_is_reported_each_on_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let text = manifest(tmp.path())
        .replace(
            "interval: 1s,",
            "interval: 1s, retained: 0, maxConcurrent: 0, tolerableFailures: -1,",
        )
        .replace("{type: none}", "{type: none, dealy: 5s}")
        .replace("  parallelism: 1\n", "  parallelism: 1\n  stateBackends: rocksdb\n");
    let err = refused(
        tmp.path(),
        &["run"],
        &text,
        &[
            "The StreamJob \"wc\" is invalid:\n",
            "\n* unknown field \"spec.restartStrategy.dealy\"\n",
            "\n* unknown field \"spec.stateBackends\"\n",
            "\n* spec.checkpointing.retained: Invalid value: 0:",
            "\n* spec.checkpointing.maxConcurrent: Invalid value: 0:",
            "\n* spec.checkpointing.tolerableFailures: Invalid value: -1:",
        ],
        true,
    );
    assert_eq!(err.matches("\n* ").count(), 5, "{err}");
}

/// The coordinator of a job in a cluster reads its file the same way (after the apiserver,
/// but the file is the controller's).
#[test]
fn the_coordinator_refuses_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let text = manifest(tmp.path()).replace("interval: 1s,", "interval: 1s, retained: 0,");
    refused(
        tmp.path(),
        &["coordinator", "--control-addr", "127.0.0.1:0"],
        &text,
        &["spec.checkpointing.retained: Invalid value: 0:"],
        true,
    );
}

/// The CEL rules are still checked where they were (the plan), after the schema.
#[test]
fn the_rules_between_fields_still_refuse() {
    let tmp = tempfile::tempdir().unwrap();
    let text = manifest(tmp.path())
        .replace("  parallelism: 1\n", "  parallelism: 8\n  maxParallelism: 4\n");
    refused(
        tmp.path(),
        &["run"],
        &text,
        &["spec.parallelism 8 is above spec.maxParallelism 4"],
        false,
    );
}

/// The StreamJobs of the repository: the examples, the controller's fixtures, and those in
/// the docs.
fn repository_manifests() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let root = repo();
    for dir in ["manifests/examples", "controller/tests/fixtures"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            if text.contains("kind: StreamJob\n") {
                out.push((format!("{dir}/{}", f.file_name().unwrap().to_string_lossy()), text));
            }
        }
    }
    let mut docs = vec![root.join("README.md")];
    let mut stack = vec![root.join("docs")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "md") {
                docs.push(p);
            }
        }
    }
    docs.sort();
    for doc in docs {
        let text = std::fs::read_to_string(&doc).unwrap();
        let name = doc.strip_prefix(&root).unwrap().display().to_string();
        for (i, block) in text.split("```yaml\n").skip(1).enumerate() {
            let block = block.split("```").next().unwrap_or_default();
            if block.contains("kind: StreamJob\n") {
                out.push((format!("{name} (yaml block {i})"), block.to_string()));
            }
        }
    }
    out
}

#[test]
fn the_repositorys_manifests_still_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let manifests = repository_manifests();
    let names: Vec<&str> = manifests.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["manifests/examples/wordcount.yaml", "docs/getting-started.md (yaml block 0)"] {
        assert!(names.contains(&want), "{want} not found among {names:?}");
    }
    for (i, (name, text)) in manifests.iter().enumerate() {
        let file = tmp.path().join(format!("{i}.yaml"));
        std::fs::write(&file, text).unwrap();
        let job = weir_runtime::load_manifest(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
        weir_runtime::plan::build(&job.spec, None, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        // What is admitted is what the file says, read as before.
        let read: weir_crds::StreamJob = serde_saphyr::from_str(text).unwrap();
        assert_eq!(job, read, "{name}");
    }
}

/// `make run` runs the word count example: it is taken and runs to its end.
#[test]
fn make_runs_example_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let example = repo().join("manifests/examples/wordcount.yaml");
    // Its checkpoints go where the example says (the default local storage) unless told
    // otherwise: here, into the test's directory.
    let res = weir(
        &[
            "run",
            example.to_str().unwrap(),
            "--storage",
            tmp.path().join("checkpoints").to_str().unwrap(),
            "--state-dir",
            tmp.path().join("state").to_str().unwrap(),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(err.contains("weir: running"), "{err}");
}

#[test]
fn bad_operator_parameters_are_refused_in_the_words_the_controller_uses() {
    // The same cases as the controller's e2e test (tests/tests/controller.rs), on the same
    // generator: the planner is shared (weir_crds::plan), so the messages are the same.
    let base = "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {name: bad}\nspec:\n  parallelism: 2\n  restartStrategy: {type: none}\n  pipeline:\n    operators:\n      - {uid: src, type: generator, count: 10PARAM}\n      - {uid: out, type: blackhole, inputs: [src]}\n";
    for (param, text) in [
        (
            ", ratePerSecond: -5",
            r#"operator "src" (generator): ratePerSecond -5 is not above 0: give a rate, or leave it out for no limit"#,
        ),
        (", seeed: 3", r#"operator "src" (generator): unknown field `seeed`"#),
        (
            ", keys: many",
            r#"operator "src" (generator): invalid type: string "many", expected u64"#,
        ),
        (", splits: 0", r#"operator "src" (generator): splits must be 1 or more"#),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        refused(tmp.path(), &["run"], &base.replace("PARAM", param), &[text], false);
    }
}

/// The package's directory, from cargo at run time: a test binary built in another checkout
/// sharing the target directory (CI's) must not read that checkout's files.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())
}
