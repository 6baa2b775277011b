//! The Grafana dashboard `charts/weir/dashboards/weir.json` against what Weir exports: the
//! PromQL of its panels and template variables, the metric names and labels they use, and a
//! parser of the Prometheus text format to hold them against real scrapes (the end-to-end
//! test `tests/tests/argocd.rs` scrapes a real controller and a real coordinator).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;

/// Labels a metric gets from the scrape rather than from Weir (Prometheus' Kubernetes
/// service discovery, the Prometheus Operator's PodMonitor and ServiceMonitor).
pub const TARGET_LABELS: &[&str] = &["namespace", "pod", "instance", "container", "service"];

/// The dashboard's file.
pub fn path() -> PathBuf {
    crate::argocd::repo().join("charts/weir/dashboards/weir.json")
}

/// The dashboard's JSON model.
pub fn load() -> Value {
    let text = std::fs::read_to_string(path())
        .unwrap_or_else(|e| panic!("reading {}: {e}", path().display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is no JSON: {e}", path().display()))
}

/// Every panel, rows' nested panels included.
pub fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    fn walk<'a>(ps: &'a Value, out: &mut Vec<&'a Value>) {
        for p in ps.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    walk(&d["panels"], &mut out);
    out
}

/// Every PromQL expression of the dashboard: the panels' targets and the template
/// variables' queries, each with where it is (for messages).
pub fn expressions(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((format!("panel {:?}", p["title"].as_str().unwrap_or("")), e.to_string()));
            }
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap_or("");
        out.push((format!("variable {:?}", v["name"].as_str().unwrap_or("")), q.to_string()));
    }
    out
}

fn ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The Weir metric names an expression uses (every name of Weir's starts with `weir_`).
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    let mut before = ' ';
    while let Some(i) = rest.find("weir_") {
        let prev = rest[..i].chars().last().unwrap_or(before);
        let tail = &rest[i..];
        let end = tail.find(|c: char| !ident(c)).unwrap_or(tail.len());
        if !ident(prev) {
            out.insert(tail[..end].to_string());
        }
        before = tail[..end].chars().last().unwrap_or(' ');
        rest = &tail[end..];
    }
    out
}

/// The label names an expression filters or groups on, per metric name (`by`, `without`
/// and `on` lists are listed under every metric of the expression; `label_values(m, l)`
/// under `m`).
pub fn labels_used(expr: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let names = metric_names(expr);
    // Selectors: name{a="..", b=~".."}.
    for name in &names {
        let mut rest = expr;
        while let Some(i) = rest.find(name.as_str()) {
            let tail = &rest[i + name.len()..];
            let whole = !tail.starts_with(ident) && !rest[..i].ends_with(ident);
            if whole && let Some(body) = tail.strip_prefix('{') {
                let body = &body[..body.find('}').unwrap_or(body.len())];
                for m in split_matchers(body) {
                    let l = m.split(['=', '!']).next().unwrap_or("").trim();
                    if !l.is_empty() {
                        out.push((name.clone(), l.to_string()));
                    }
                }
            }
            rest = tail;
        }
    }
    // Grouping: by (...), without (...), on (...), ignoring (...).
    for kw in ["by", "without", "on", "ignoring"] {
        let mut rest = expr;
        while let Some(i) = rest.find(kw) {
            let tail = &rest[i + kw.len()..];
            let whole = !rest[..i].ends_with(ident) && !tail.starts_with(ident);
            if whole && let Some(list) = tail.trim_start().strip_prefix('(') {
                let list = &list[..list.find(')').unwrap_or(list.len())];
                for l in list.split(',').map(str::trim).filter(|l| !l.is_empty()) {
                    for name in &names {
                        out.push((name.clone(), l.to_string()));
                    }
                }
            }
            rest = tail;
        }
    }
    // label_values(metric{...}, label).
    if let Some(args) = expr.trim().strip_prefix("label_values(")
        && let Some((_, label)) = args.trim_end_matches(')').rsplit_once(',')
    {
        for name in &names {
            out.push((name.clone(), label.trim().to_string()));
        }
    }
    out
}

/// The matchers of a selector body, split at commas outside quotes.
fn split_matchers(body: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&body[start..]);
    out
}

/// What a `/metrics` text says: each family's type, and each sample name with the label
/// names it was seen with.
#[derive(Debug, Default, Clone)]
pub struct Scrape {
    pub types: BTreeMap<String, String>,
    pub samples: BTreeMap<String, BTreeSet<String>>,
}

impl Scrape {
    /// Parses the Prometheus text format (version 0.0.4).
    pub fn parse(text: &str) -> Self {
        let mut s = Scrape::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(n), Some(t)) = (it.next(), it.next()) {
                    s.types.insert(n.to_string(), t.to_string());
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let end = line.find(|c: char| !ident(c)).unwrap_or(line.len());
            let name = &line[..end];
            let labels = s.samples.entry(name.to_string()).or_default();
            if let Some(body) = line[end..].strip_prefix('{') {
                let body = &body[..body.rfind('}').unwrap_or(body.len())];
                for m in split_matchers(body) {
                    if let Some((l, _)) = m.split_once('=') {
                        labels.insert(l.trim().to_string());
                    }
                }
            }
        }
        s
    }

    /// Adds another scrape's families and samples.
    pub fn merge(&mut self, other: Scrape) {
        self.types.extend(other.types);
        for (n, ls) in other.samples {
            self.samples.entry(n).or_default().extend(ls);
        }
    }

    /// Why `name` cannot be queried: absent, or a histogram's series named wrongly. A
    /// histogram `h` exposes `h_bucket`, `h_sum` and `h_count` (never `h` itself); the
    /// suffix is only taken off when the family of that name is a histogram or summary.
    pub fn missing(&self, name: &str) -> Option<String> {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && let Some(t) = self.types.get(base)
            {
                return match (t.as_str(), suffix) {
                    ("histogram", _) | ("summary", "_sum" | "_count") => {
                        (!self.samples.contains_key(name))
                            .then(|| format!("{name}: the {t} {base} has no such series"))
                    }
                    _ => Some(format!("{name}: {base} is a {t}, which has no {suffix} series")),
                };
            }
        }
        match self.types.get(name).map(String::as_str) {
            Some("histogram" | "summary") => {
                Some(format!("{name} is a histogram: query {name}_bucket, _sum or _count"))
            }
            _ if self.samples.contains_key(name) => None,
            _ => Some(format!("{name} is not exported (no sample in the scrapes)")),
        }
    }
}

/// Everything in the dashboard's queries that the scrapes do not hold: metric names, and
/// labels that neither the metric has nor the scrape adds ([`TARGET_LABELS`]).
pub fn problems(d: &Value, scrape: &Scrape) -> Vec<String> {
    let mut out = Vec::new();
    for (at, expr) in expressions(d) {
        for name in metric_names(&expr) {
            if let Some(why) = scrape.missing(&name) {
                out.push(format!("{at}: {why}; in {expr}"));
            }
        }
        for (name, label) in labels_used(&expr) {
            if TARGET_LABELS.contains(&label.as_str()) || label == "le" {
                continue;
            }
            if let Some(have) = scrape.samples.get(&name)
                && !have.contains(&label)
            {
                out.push(format!(
                    "{at}: {name} has no label {label:?} (it has {have:?}); in {expr}"
                ));
            }
        }
    }
    out
}

/// `GET http://<addr><path>`: the body (HTTP/1.1, `Connection: close`), or why not.
pub fn http_get(addr: &str, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(addr).map_err(|e| format!("connecting {addr}: {e}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).ok();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("writing to {addr}: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| format!("reading from {addr}: {e}"))?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or(format!("{addr}: no HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {addr}{path}: {}", head.lines().next().unwrap_or("")));
    }
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(dechunk(body));
    }
    Ok(body.to_string())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> String {
        let repo = crate::argocd::repo();
        ["controller/src/metrics.rs", "runtime/src/api.rs"]
            .iter()
            .map(|p| std::fs::read_to_string(repo.join(p)).unwrap())
            .collect()
    }

    #[test]
    fn the_dashboard_is_a_grafana_model_with_its_variables() {
        let d = load();
        let v = d["schemaVersion"].as_i64().expect("a schemaVersion");
        assert!((36..=41).contains(&v), "schemaVersion {v}");
        assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40), "a uid");
        let vars: BTreeMap<&str, &Value> = d["templating"]["list"]
            .as_array()
            .expect("templating.list")
            .iter()
            .map(|v| (v["name"].as_str().unwrap_or(""), v))
            .collect();
        let ds = vars.get("datasource").expect("a datasource variable");
        assert_eq!(ds["type"], "datasource");
        assert_eq!(ds["query"], "prometheus");
        for name in ["namespace", "job"] {
            let v = vars.get(name).unwrap_or_else(|| panic!("a {name} variable"));
            assert_eq!(v["type"], "query", "{name}");
            assert_eq!(v["datasource"]["uid"], "${datasource}", "{name}");
        }
    }

    #[test]
    fn panel_ids_are_unique_and_every_query_uses_the_datasource_variable() {
        let d = load();
        let ps = panels(&d);
        assert!(ps.len() >= 10, "{} panels", ps.len());
        let mut ids = BTreeSet::new();
        for p in &ps {
            let id = p["id"].as_i64().unwrap_or_else(|| panic!("panel {p} has no id"));
            assert!(ids.insert(id), "panel id {id} twice");
            if p["type"] == "row" {
                continue;
            }
            let title = p["title"].as_str().unwrap_or("");
            assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title:?}");
            assert_eq!(p["datasource"]["type"], "prometheus", "panel {title:?}");
            let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title:?}: targets"));
            assert!(!targets.is_empty(), "panel {title:?} has no query");
            for t in targets {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "a query of {title:?}");
                assert!(
                    t["expr"].as_str().is_some_and(|e| !metric_names(e).is_empty()),
                    "a query of {title:?} uses no Weir metric: {t}"
                );
            }
        }
    }

    #[test]
    fn the_job_queries_follow_the_namespace_and_job_variables() {
        for (at, e) in expressions(&load()) {
            if at.starts_with("variable") {
                continue;
            }
            let runtime = metric_names(&e).iter().any(|n| !n.starts_with("weir_controller_"));
            if runtime {
                assert!(e.contains(r#"namespace=~"$namespace""#), "{at}: {e}");
                assert!(e.contains(r#"job_name=~"$job""#), "{at}: {e}");
            }
        }
    }

    /// Without the environment: every name the dashboard uses is registered in the source
    /// (`weir_` and `weir_controller_` are the registries' prefixes; a histogram's series
    /// carry a suffix). The end-to-end test holds them against real scrapes.
    #[test]
    fn every_metric_name_is_registered_in_the_source() {
        let src = sources();
        for (at, e) in expressions(&load()) {
            for name in metric_names(&e) {
                let short = name
                    .strip_prefix("weir_controller_")
                    .or(name.strip_prefix("weir_"))
                    .unwrap_or(&name);
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        short.strip_suffix(s).filter(|b| src.contains(&format!("\"{b}\"")))
                    })
                    .unwrap_or(short);
                assert!(src.contains(&format!("\"{base}\"")), "{at}: {name} is registered nowhere");
            }
        }
    }

    #[test]
    fn names_and_labels_are_read_from_promql() {
        let e = r#"histogram_quantile(0.9, sum by (le) (rate(weir_controller_reconcile_duration_seconds_bucket[5m]))) + on (job_name) group_left sum without (operator) (weir_operator_records_in_total{namespace=~"$namespace", job_name=~"a,b\"}"})"#;
        assert_eq!(
            metric_names(e).into_iter().collect::<Vec<_>>(),
            ["weir_controller_reconcile_duration_seconds_bucket", "weir_operator_records_in_total"]
        );
        let ls = labels_used(e);
        assert!(ls.contains(&("weir_operator_records_in_total".into(), "job_name".into())));
        assert!(ls.contains(&("weir_operator_records_in_total".into(), "operator".into())));
        assert!(
            ls.contains(&("weir_controller_reconcile_duration_seconds_bucket".into(), "le".into()))
        );
        assert!(!ls.iter().any(|(_, l)| l.contains('"') || l == "b"), "{ls:?}");
        assert_eq!(metric_names("notweir_x + my_weir_y"), BTreeSet::new());
        let v = labels_used(r#"label_values(weir_job_state{namespace=~"$namespace"}, job_name)"#);
        assert!(v.contains(&("weir_job_state".into(), "job_name".into())), "{v:?}");
    }

    #[test]
    fn a_scrape_knows_histograms_and_missing_names() {
        let s = Scrape::parse(
            "# HELP h a histogram\n# TYPE h histogram\nh_bucket{le=\"1\"} 0\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n# TYPE c_total counter\nc_total{reason=\"x\",b=\"q,{}\"} 3\n# TYPE g gauge\ng 1\n",
        );
        assert_eq!(s.missing("h_bucket"), None);
        assert_eq!(s.missing("h_count"), None);
        assert!(s.missing("h").is_some_and(|m| m.contains("histogram")));
        assert!(s.missing("g_count").is_some_and(|m| m.contains("gauge")));
        assert!(s.missing("nope").is_some_and(|m| m.contains("not exported")));
        assert_eq!(s.missing("c_total"), None);
        assert_eq!(s.samples["c_total"], BTreeSet::from(["reason".into(), "b".into()]));
        let d = serde_json::json!({"panels": [{"title": "t", "targets": [{"expr": "sum by (job) (c_total{reason=\"x\"}) + weir_x"}]}]});
        let mut s2 = s.clone();
        s2.samples.insert("weir_x".into(), BTreeSet::from(["job_name".into()]));
        let p = problems(&d, &s2);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("no label \"job\""), "{p:?}");
    }
}
