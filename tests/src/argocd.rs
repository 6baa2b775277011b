//! Runs the Argo CD health checks of `manifests/argocd/` the way Argo CD does, with the Lua 5.1
//! interpreter (`lua5.1`, installed by `tests/env/install-build-deps.sh`): the object becomes
//! the global `obj` (a Lua table, as Argo CD builds it from the object's JSON), the script
//! runs with only the libraries Argo CD opens, and what it returns is checked to be a health
//! status Argo CD knows.
//!
//! The committed fixtures (`tests/fixtures/argocd/`) are objects captured from the
//! apiserver by the end-to-end test `tests/tests/argocd.rs`; the tests here run the checks
//! over them, so the checks are covered without the test environment.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// The statuses Argo CD knows.
pub const STATUSES: &[&str] =
    &["Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"];

/// What a health check returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub status: String,
    pub message: String,
}

/// The package's directory, from cargo at run time: a test binary built in another checkout
/// sharing the target directory (CI's) must not read that checkout's files.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())
}

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(&manifest_dir()).parent().unwrap().to_path_buf()
}

/// `manifests/argocd/<name>`.
pub fn script(name: &str) -> PathBuf {
    repo().join("manifests/argocd").join(name)
}

/// The health check of StreamJobs.
pub fn streamjob_script() -> PathBuf {
    script("streamjob-health.lua")
}

/// The health check of StreamSnapshots.
pub fn streamsnapshot_script() -> PathBuf {
    script("streamsnapshot-health.lua")
}

/// The directory of the captured objects.
pub fn fixtures_dir() -> PathBuf {
    repo().join("tests/fixtures/argocd")
}

/// A Lua 5.1 expression that builds `v`: objects become tables keyed by their (escaped)
/// keys, with null members left out (Lua has no null: an absent key reads as nil); arrays
/// become sequences from index 1, a null element as `nil` in its place so that the others
/// keep their indices; strings are quoted with every byte that is not printable ASCII
/// written as a three-digit decimal escape.
pub fn lua_literal(v: &Value) -> String {
    let mut out = String::new();
    write_lua(v, &mut out);
    out
}

fn write_lua(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("nil"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                // serde_json has no NaN or infinity; `{:?}` of an f64 is a Lua number
                // (`0.5`, `1e300`, `-2.5e-7`).
                out.push_str(&format!("{:?}", n.as_f64().unwrap_or(0.0)));
            }
        }
        Value::String(s) => lua_string(s, out),
        Value::Array(items) => {
            out.push('{');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_lua(item, out);
            }
            out.push('}');
        }
        Value::Object(map) => {
            out.push('{');
            let mut first = true;
            for (k, item) in map {
                if item.is_null() {
                    continue;
                }
                if !first {
                    out.push_str(", ");
                }
                first = false;
                out.push('[');
                lua_string(k, out);
                out.push_str("] = ");
                write_lua(item, out);
            }
            out.push('}');
        }
    }
}

/// A quoted Lua string holding the bytes of `s` (UTF-8, as Argo CD passes strings on).
fn lua_string(s: &str, out: &mut String) {
    out.push('"');
    for b in s.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            // Three digits always: `\0` followed by a digit would be read as one escape.
            _ => out.push_str(&format!("\\{b:03}")),
        }
    }
    out.push('"');
}

/// The wrapper that sets `obj` and runs the script in an environment with what Argo CD
/// opens to health checks (the base functions, string, table, math; no io, no os), then
/// writes the status, a newline and the message.
fn wrapper(script: &Path, obj: &Value) -> String {
    let mut path = String::new();
    lua_string(&script.to_string_lossy(), &mut path);
    format!(
        r#"local obj = {obj}
local f, err = loadfile({path})
if f == nil then error("loading the script: " .. tostring(err)) end
local env = {{
  obj = obj, ipairs = ipairs, pairs = pairs, next = next, type = type, tostring = tostring,
  tonumber = tonumber, select = select, unpack = unpack, error = error, assert = assert,
  pcall = pcall, rawget = rawget, rawset = rawset, setmetatable = setmetatable,
  getmetatable = getmetatable, string = string, table = table, math = math,
}}
setfenv(f, env)
local hs = f()
if type(hs) ~= "table" then error("the script returned " .. type(hs) .. ", not a table") end
if type(hs.status) ~= "string" then error("hs.status is " .. type(hs.status) .. ", not a string") end
if hs.message ~= nil and type(hs.message) ~= "string" then
  error("hs.message is " .. type(hs.message) .. ", not a string")
end
io.write(hs.status, "\n", hs.message or "")
"#,
        obj = lua_literal(obj),
    )
}

/// Runs a health check on `obj`: the status and message it returns, or what went wrong
/// (a Lua error, a status Argo CD does not know).
pub fn health(script: &Path, obj: &Value) -> Result<Health, String> {
    let program = wrapper(script, obj);
    let mut child = Command::new("lua5.1")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("running lua5.1: {e} (install it: bash tests/env/install-build-deps.sh)")
        })?;
    child
        .stdin
        .take()
        .expect("a piped stdin")
        .write_all(program.as_bytes())
        .map_err(|e| format!("writing to lua5.1: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("waiting for lua5.1: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{} on {obj}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8(out.stdout).map_err(|e| format!("lua5.1 wrote {e}"))?;
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    if !STATUSES.contains(&status) {
        return Err(format!(
            "{} returned status {status:?}, which Argo CD does not know (one of {STATUSES:?})",
            script.display()
        ));
    }
    Ok(Health { status: status.to_string(), message: message.to_string() })
}

/// An object as a fixture keeps it: what the health checks read and what says where it came
/// from (kind, name, namespace, uid, generation, labels, spec, status); not the
/// managedFields, the resourceVersion or the annotations (the last applied configuration).
pub fn fixture_of(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in ["managedFields", "resourceVersion", "annotations"] {
            m.remove(k);
        }
    }
    o
}

/// The captured objects the end-to-end test writes (`tests/fixtures/argocd/<name>.json`),
/// what each was captured as, and what the health check must say of it: (file name without
/// `.json`, the state it was captured in, the status, a piece of the message).
pub const CAPTURES: &[(&str, &str, &str, &str)] = &[
    ("streamjob-running", "Running, Ready", "Healthy", "the job runs at parallelism 2"),
    (
        "streamjob-upgrading",
        "Upgrading (parallelism 2 to 1)",
        "Progressing",
        "upgrading to generation 2",
    ),
    (
        "streamjob-invalid-spec",
        "Running, Degraded InvalidSpec (a Secret that does not exist)",
        "Degraded",
        "InvalidSpec: spec.s3.credentialsSecret.name",
    ),
    (
        "streamjob-upgrade-refused",
        "Running, Degraded UpgradeRefused (a stateful operator dropped)",
        "Degraded",
        "UpgradeRefused: ",
    ),
    ("streamjob-suspended", "Suspended", "Suspended", "the job is suspended"),
    (
        "streamjob-failed",
        "Failed (a file_source of a missing directory)",
        "Degraded",
        "file_source",
    ),
    ("streamjob-finished", "Finished", "Healthy", "the job finished"),
    (
        "streamjob-rolled-back",
        "Running generation 1, Degraded RolledBack",
        "Degraded",
        "RolledBack: ",
    ),
    ("streamsnapshot-completed", "the upgrade's savepoint, Completed", "Healthy", "bytes at s3://"),
];

/// The fixture `name` (see [`CAPTURES`]).
pub fn fixture(name: &str) -> Value {
    let p = fixtures_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (captured by the end-to-end test: WEIR_ARGOCD_WRITE_FIXTURES=1 cargo test -p weir-e2e --test argocd)",
            p.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The script for an object's kind.
pub fn script_for(obj: &Value) -> PathBuf {
    match obj["kind"].as_str() {
        Some("StreamJob") => streamjob_script(),
        Some("StreamSnapshot") => streamsnapshot_script(),
        k => panic!("no health check for kind {k:?}"),
    }
}

/// Asserts that the health check says `status` with `message_part` in its message.
pub fn assert_health(what: &str, obj: &Value, status: &str, message_part: &str) -> Health {
    let h = health(&script_for(obj), obj).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        h.status == status && h.message.contains(message_part),
        "{what}: the health check says {h:?}, expected {status} with {message_part:?} in the message; the status was {}",
        serde_json::to_string_pretty(&obj["status"]).unwrap_or_default()
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_committed_captures_get_their_health() {
        for (name, captured_as, status, part) in CAPTURES {
            let obj = fixture(name);
            let what = format!("fixture {name} (captured {captured_as})");
            assert!(obj["status"].is_object(), "{what}: no status");
            assert_health(&what, &obj, status, part);
        }
    }

    #[test]
    fn every_fixture_file_is_checked() {
        let mut listed: Vec<String> = CAPTURES.iter().map(|c| format!("{}.json", c.0)).collect();
        listed.sort();
        let mut files: Vec<String> = std::fs::read_dir(fixtures_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        files.sort();
        assert_eq!(files, listed, "the fixtures in {} and CAPTURES", fixtures_dir().display());
    }

    /// The captured running job's metadata with `status` as given: edge cases written here,
    /// by hand, from a real object.
    fn handwritten(status: Option<Value>, generation: i64) -> Value {
        let mut o = fixture("streamjob-running");
        o["metadata"]["generation"] = json!(generation);
        match status {
            Some(s) => o["status"] = s,
            None => {
                o.as_object_mut().unwrap().remove("status");
            }
        }
        o
    }

    #[test]
    fn handwritten_a_streamjob_without_status_waits_for_the_controller() {
        let o = handwritten(None, 1);
        assert_health("no status", &o, "Progressing", "waiting for the controller");
        let o = handwritten(Some(json!({"replicas": 0})), 1);
        assert_health("a status without phase", &o, "Progressing", "waiting for the controller");
    }

    #[test]
    fn handwritten_a_generation_ahead_of_the_status_waits_for_the_controller() {
        let running = fixture("streamjob-running");
        let observed = running["status"]["observedGeneration"].as_i64().unwrap();
        let o = handwritten(Some(running["status"].clone()), observed + 1);
        let h = assert_health("generation ahead", &o, "Progressing", "waiting for the controller");
        assert!(h.message.contains(&(observed + 1).to_string()), "{h:?}");
        // Even a failed job: what the status says is about an older spec.
        let failed = fixture("streamjob-failed");
        let mut o = failed.clone();
        o["metadata"]["generation"] =
            json!(failed["status"]["observedGeneration"].as_i64().unwrap() + 1);
        assert_health("failed, generation ahead", &o, "Progressing", "waiting for the controller");
    }

    #[test]
    fn handwritten_degraded_wins_over_the_phase_and_unknown_phases_are_unknown() {
        // A savepoint that failed while the job goes on running (lifecycle.rs `retrying`).
        let mut s = fixture("streamjob-running")["status"].clone();
        for c in s["conditions"].as_array_mut().unwrap() {
            if c["type"] == "Degraded" {
                c["status"] = json!("True");
                c["reason"] = json!("SavepointFailed");
                c["message"] = json!("the savepoint failed (attempt 1): \"s3\" said \u{1F980}\nno");
            }
        }
        let o = handwritten(Some(s.clone()), s["observedGeneration"].as_i64().unwrap());
        let h = assert_health(
            "savepoint failed",
            &o,
            "Degraded",
            "SavepointFailed: the savepoint failed",
        );
        assert!(h.message.contains("\"s3\" said \u{1F980}\nno"), "{h:?}");
        let mut s2 = s.clone();
        s2["phase"] = json!("Hibernating");
        s2["conditions"] = json!([]);
        let o = handwritten(Some(s2), s["observedGeneration"].as_i64().unwrap());
        assert_health("unknown phase", &o, "Unknown", "Hibernating");
    }

    #[test]
    fn handwritten_streamsnapshot_phases() {
        let snap = fixture("streamsnapshot-completed");
        let with = |status: Option<Value>| {
            let mut o = snap.clone();
            match status {
                Some(s) => o["status"] = s,
                None => {
                    o.as_object_mut().unwrap().remove("status");
                }
            }
            o
        };
        assert_health(
            "snapshot without status",
            &with(None),
            "Progressing",
            "waiting for the controller",
        );
        assert_health(
            "failed snapshot",
            &with(Some(json!({"phase": "Failed", "message": "S3 said no"}))),
            "Degraded",
            "S3 said no",
        );
        assert_health(
            "failed snapshot without message",
            &with(Some(json!({"phase": "Failed"}))),
            "Degraded",
            "failed",
        );
        assert_health(
            "disposing snapshot",
            &with(Some(json!({"phase": "Disposing", "completedAt": "2024-01-01T00:00:00Z"}))),
            "Progressing",
            "deleting",
        );
    }

    /// The argocd-cm snippet holds the same Lua as the .lua files.
    #[test]
    fn the_argocd_cm_snippet_holds_the_scripts() {
        let p = script("argocd-cm.yaml");
        let text = std::fs::read_to_string(&p).unwrap();
        let cm: Value =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(cm["kind"], "ConfigMap");
        assert_eq!(cm["metadata"]["name"], "argocd-cm");
        let data = cm["data"].as_object().expect("data");
        for (key, file) in [
            ("resource.customizations.health.weir.dev_StreamJob", "streamjob-health.lua"),
            ("resource.customizations.health.weir.dev_StreamSnapshot", "streamsnapshot-health.lua"),
        ] {
            let lua = std::fs::read_to_string(script(file)).unwrap();
            let got =
                data.get(key).and_then(Value::as_str).unwrap_or_else(|| panic!("{key} missing"));
            assert!(
                got == lua,
                "{key} in {} differs from {file}: copy the file into the snippet (indented by 4)",
                p.display()
            );
        }
        assert_eq!(data.len(), 2, "{:?}", data.keys().collect::<Vec<_>>());
    }

    /// Runs `lua5.1` on a chunk and returns what it printed.
    fn lua(chunk: &str) -> String {
        let mut child = Command::new("lua5.1")
            .arg("-")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("lua5.1 (bash tests/env/install-build-deps.sh)");
        child.stdin.take().unwrap().write_all(chunk.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{chunk}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Reads `v` back in Lua through the path `expr` (e.g. `v.a[2]`).
    fn read_back(v: &Value, expr: &str) -> String {
        lua(&format!("local v = {}\nio.write(tostring({expr}))", lua_literal(v)))
    }

    #[test]
    fn strings_come_back_byte_for_byte() {
        for s in [
            "plain",
            "a \"quoted\" word",
            "back\\slash and \\\" both",
            "two\nlines\r\nand a\ttab",
            "a NUL \u{0} then 1 digit \u{1}2",
            "unicode: größe, 日本語, 🦀",
            "]] and [[ long brackets",
            "",
        ] {
            let v = json!({ "s": s });
            assert_eq!(read_back(&v, "v.s"), s, "the string {s:?} through {}", lua_literal(&v));
        }
    }

    #[test]
    fn keys_that_are_not_identifiers_and_escaped_keys() {
        let v = json!({"weir.dev/job": "wc", "a\"b": 1, "end": "keyword", "x\ny": true});
        assert_eq!(read_back(&v, r#"v["weir.dev/job"]"#), "wc");
        assert_eq!(read_back(&v, r#"v["a\"b"]"#), "1");
        assert_eq!(read_back(&v, r#"v["end"]"#), "keyword");
        assert_eq!(read_back(&v, r#"v["x\ny"]"#), "true");
    }

    #[test]
    fn arrays_are_one_based_and_nested() {
        let v = json!({"a": [[1, 2], [3, [4, 5]], {"b": ["x"]}], "e": [], "o": {}});
        assert_eq!(read_back(&v, "v.a[1][1]"), "1");
        assert_eq!(read_back(&v, "v.a[2][2][2]"), "5");
        assert_eq!(read_back(&v, "v.a[3].b[1]"), "x");
        assert_eq!(read_back(&v, "#v.a"), "3");
        assert_eq!(read_back(&v, "v.a[0]"), "nil");
        assert_eq!(read_back(&v, "#v.e"), "0");
        assert_eq!(read_back(&v, "next(v.o)"), "nil");
    }

    #[test]
    fn nulls_are_dropped_and_keep_array_positions() {
        let v = json!({"gone": null, "kept": 1, "a": [1, null, 3]});
        assert_eq!(read_back(&v, "v.gone"), "nil");
        assert_eq!(read_back(&v, "v.kept"), "1");
        assert_eq!(read_back(&v, "v.a[3]"), "3");
        assert_eq!(read_back(&v, "v.a[2]"), "nil");
        assert!(!lua_literal(&v).contains("gone"), "{}", lua_literal(&v));
    }

    #[test]
    fn numbers_and_booleans() {
        let v = json!({"i": -42, "big": 9_007_199_254_740_993_u64, "f": 0.25, "e": 1e300, "t": true, "n": false});
        assert_eq!(read_back(&v, "v.i + 1"), "-41");
        assert_eq!(read_back(&v, "v.f * 4"), "1");
        assert_eq!(read_back(&v, "v.e > 1e299"), "true");
        assert_eq!(read_back(&v, "v.big > 9e15"), "true");
        assert_eq!(read_back(&v, "v.t"), "true");
        assert_eq!(read_back(&v, "v.n"), "false");
    }

    #[test]
    fn a_script_error_and_an_unknown_status_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.lua");
        std::fs::write(&bad, "return {status = obj.status.phase}").unwrap();
        let err = health(&bad, &json!({"status": {"phase": "Fine"}})).unwrap_err();
        assert!(err.contains("\"Fine\"") && err.contains("does not know"), "{err}");
        let err = health(&bad, &json!({})).unwrap_err();
        assert!(err.contains("attempt to index"), "{err}");
        // Argo CD opens no io or os to health checks: neither does the harness.
        std::fs::write(&bad, "os.exit(0)").unwrap();
        let err = health(&bad, &json!({})).unwrap_err();
        assert!(err.contains("os"), "{err}");
    }
}
