//! The rules the apiserver checks itself, in CEL (`x-kubernetes-validations` in the CRD), and
//! the messages they share with the checks in Rust ([`StreamJobSpec::validate`], the
//! controller's).
//!
//! A rule that needs only the object is refused at `kubectl apply`, with the words the
//! controller would use: each message is one [`Text`], with `{name}` holes that the Rust side
//! fills with values ([`Text::render`]) and the CEL side with expressions
//! ([`Text::cel`], a `messageExpression`), so the two cannot drift apart. The controller keeps
//! its own checks, for objects stored before a rule existed (or by an apiserver that does not
//! run CEL) and for what CEL cannot say (cycles, the cluster's Secrets and snapshots).
//!
//! CEL's cost is bounded by the schema: the apiserver estimates each rule's cost from the
//! largest lists and strings the schema allows, and refuses the CRD when a rule could cost too
//! much. Hence the bounds below, which the schema and [`StreamJobSpec::validate`] both hold.
//!
//! [`StreamJobSpec::validate`]: crate::StreamJobSpec::validate

use std::fmt;

use kube::core::{Message, Reason, Rule};
use schemars::Schema;

use crate::pipeline::{OPERATOR_TYPES, SOURCE_TYPES};

/// Most operators in a pipeline (`maxItems` of `spec.pipeline.operators`).
pub const MAX_OPERATORS: usize = 256;
/// Most inputs of one operator (`maxItems` of `inputs`).
pub const MAX_INPUTS: usize = 64;
/// Longest uid, input and operator type (`maxLength`).
pub const MAX_NAME_LENGTH: usize = 63;
/// Longest duration string (`maxLength`), e.g. `1d2h3m4s5ms`.
pub const MAX_DURATION_LENGTH: usize = 64;

// ---------------------------------------------------------------------------------------------
// The messages

/// A message with `{name}` holes, the same text for a Rust error and a CEL rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Text(pub &'static str);

/// `spec.parallelism` above an explicit `spec.maxParallelism`.
pub const PARALLELISM_ABOVE_MAX: Text = Text(
    "spec.parallelism {parallelism} is above spec.maxParallelism {maxParallelism}: lower parallelism or raise maxParallelism (fixed once the job has state)",
);
/// The number of key groups asked for differs from the one the job's state has.
pub const MAX_PARALLELISM_FIXED: Text = Text(
    "{asked} differs from {fixed}, the number of key groups the job's state is split into: it cannot change once the job has state; set spec.maxParallelism: {fixed}",
);
/// `{asked}` of [`MAX_PARALLELISM_FIXED`] when the spec sets maxParallelism.
pub const MAX_PARALLELISM_SET: Text = Text("spec.maxParallelism {maxParallelism}");
/// `{asked}` of [`MAX_PARALLELISM_FIXED`] when the spec leaves it to the default.
pub const MAX_PARALLELISM_DEFAULT: Text =
    Text("spec.maxParallelism (default {maxParallelism} for this parallelism)");
/// Checkpoints off with an upgrade mode that needs them.
pub const CHECKPOINTS_OFF: Text = Text(
    "spec.checkpointing.interval 0s turns checkpoints off, and spec.upgradeMode {upgradeMode} needs them (upgrades, suspend and deletion go through a savepoint or the last checkpoint): set an interval such as 10s, or spec.upgradeMode: stateless",
);
/// Unaligned checkpoints in at-least-once mode.
pub const UNALIGNED_AT_LEAST_ONCE: Text = Text(
    "spec.checkpointing.unaligned: unaligned checkpoints need mode exactly-once (at-least-once checkpoints never align, so there is nothing to overtake); set mode: exactly-once or unaligned: false",
);
/// `spec.restore` naming two sources.
pub const RESTORE_BOTH: Text = Text("spec.restore: give either snapshot or path, not both");
/// A list longer than its bound, in the apiserver's words for `maxItems`.
pub const TOO_MANY: Text = Text("{field}: Too many: {count}: must have at most {max} items");
/// A pipeline error ([`crate::PipelineError`]) in a StreamJob.
pub const PIPELINE: Text = Text("spec.pipeline: {error}");
/// No operators.
pub const EMPTY: Text =
    Text("pipeline.operators is empty: declare at least one source and one sink");
/// A uid that an earlier operator has: `{index}` is the later one.
pub const DUPLICATE_UID: Text = Text(
    "pipeline.operators[{index}].uid \"{uid}\" is used by more than one operator: uids must be unique",
);
/// A `lateOutput` that an operator's uid or another `lateOutput` already names.
pub const LATE_OUTPUT_TAKEN: Text = Text(
    "operator \"{uid}\": lateOutput \"{name}\" is already the name of an operator or of another lateOutput: give it a name of its own",
);
/// An input that names no operator.
pub const UNKNOWN_INPUT: Text =
    Text("operator \"{uid}\": inputs names \"{input}\", which is no operator of this pipeline");
/// An operator among its own inputs.
pub const SELF_INPUT: Text = Text("operator \"{uid}\": inputs names the operator itself");
/// An operator type that is not built in.
pub const UNKNOWN_TYPE: Text =
    Text("pipeline.operators[{index}] (\"{uid}\"): type \"{type}\" is unknown: use one of {known}");
/// A source with inputs.
pub const SOURCE_WITH_INPUTS: Text = Text("operator \"{uid}\" ({type}): a source takes no inputs");
/// An operator that is no source, without inputs.
pub const NO_INPUTS: Text =
    Text("operator \"{uid}\" ({type}): inputs is empty: name the operators it reads");

/// A StreamSnapshot's `spec.path` changed (a transition rule of the StreamSnapshot CRD; the
/// controller refuses a snapshot whose path differs from the one it recorded with the same
/// words).
pub const SNAPSHOT_PATH_IMMUTABLE: Text = Text(
    "spec.path of a StreamSnapshot is immutable: it names the savepoint the snapshot was recorded with, which a job may restore from and retention deletes; create another StreamSnapshot for another path",
);

/// One piece of a [`Text`]: literal text or a hole.
enum Piece<'a> {
    Literal(&'a str),
    Hole(&'a str),
}

impl Text {
    fn pieces(self) -> Vec<Piece<'static>> {
        let mut out = Vec::new();
        let mut rest = self.0;
        while let Some(open) = rest.find('{') {
            let close = rest[open..].find('}').map(|c| open + c).unwrap_or_else(|| {
                panic!("message {:?}: a `{{` without its `}}`", self.0);
            });
            if open > 0 {
                out.push(Piece::Literal(&rest[..open]));
            }
            out.push(Piece::Hole(&rest[open + 1..close]));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            out.push(Piece::Literal(rest));
        }
        out
    }

    /// The names of the holes, in order (a name may come more than once).
    pub fn holes(self) -> Vec<&'static str> {
        self.pieces()
            .into_iter()
            .filter_map(|p| match p {
                Piece::Hole(h) => Some(h),
                Piece::Literal(_) => None,
            })
            .collect()
    }

    /// The message with its holes filled with `args` (each hole must have one).
    pub fn render(self, args: &[(&str, &dyn fmt::Display)]) -> String {
        let mut out = String::new();
        for p in self.pieces() {
            match p {
                Piece::Literal(s) => out.push_str(s),
                Piece::Hole(h) => {
                    let (_, v) = args.iter().find(|(name, _)| *name == h).unwrap_or_else(|| {
                        panic!("message {:?}: no value for {{{h}}}", self.0);
                    });
                    out.push_str(&v.to_string());
                }
            }
        }
        out
    }

    /// The message as a CEL expression of type string, its holes filled with `args` (CEL
    /// expressions of type string, each hole must have one). It is a `format` of the text
    /// rather than a concatenation, whose cost the apiserver could not bound: it takes the
    /// size of a value turned into a string (`string(self.parallelism)`) as unknown.
    pub fn cel(self, args: &[(&str, &str)]) -> String {
        let mut format = String::new();
        let mut values = Vec::new();
        for p in self.pieces() {
            match p {
                Piece::Literal(s) => format.push_str(&s.replace('%', "%%")),
                Piece::Hole(h) => {
                    let (_, e) = args.iter().find(|(name, _)| *name == h).unwrap_or_else(|| {
                        panic!("message {:?}: no expression for {{{h}}}", self.0);
                    });
                    format.push_str("%s");
                    values.push(*e);
                }
            }
        }
        if values.is_empty() {
            return cel_string(&format.replace("%%", "%"));
        }
        format!("{}.format([{}])", cel_string(&format), values.join(", "))
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// [`MAX_PARALLELISM_FIXED`] for a spec that asks for `effective` key groups (`set`: its
/// `maxParallelism`, if it sets one) when the job's state has `fixed`.
pub fn max_parallelism_fixed(set: Option<i32>, effective: i32, fixed: i32) -> String {
    let asked = match set {
        Some(m) => MAX_PARALLELISM_SET.render(&[("maxParallelism", &m)]),
        None => MAX_PARALLELISM_DEFAULT.render(&[("maxParallelism", &effective)]),
    };
    MAX_PARALLELISM_FIXED.render(&[("asked", &asked), ("fixed", &fixed)])
}

/// [`CHECKPOINTS_OFF`] for an upgrade mode (as written in the spec: `savepoint`, `last-state`).
pub fn checkpoints_off(upgrade_mode: &str) -> String {
    CHECKPOINTS_OFF.render(&[("upgradeMode", &upgrade_mode)])
}

/// A CEL string literal.
pub fn cel_string(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A CEL list literal of strings.
fn cel_list(items: &[&str]) -> String {
    format!("[{}]", items.iter().map(|s| cel_string(s)).collect::<Vec<_>>().join(", "))
}

// ---------------------------------------------------------------------------------------------
// The rules

/// Where in the StreamJob's schema a rule sits: `self` is the object at that place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// The whole StreamJob (`self.spec`, `self.status`).
    Root,
    /// `spec`.
    Spec,
    /// `spec.checkpointing`.
    Checkpointing,
    /// `spec.restore`.
    Restore,
    /// `spec.pipeline`.
    Pipeline,
    /// Each of `spec.pipeline.operators`.
    Operator,
    /// `spec.path` of a StreamSnapshot.
    SnapshotPath,
}

impl At {
    /// The path of the place, as the apiserver names it in its errors.
    pub fn path(self) -> &'static str {
        match self {
            At::Root => "",
            At::Spec => "spec",
            At::Checkpointing => "spec.checkpointing",
            At::Restore => "spec.restore",
            At::Pipeline => "spec.pipeline",
            At::Operator => "spec.pipeline.operators[*]",
            At::SnapshotPath => "StreamSnapshot spec.path",
        }
    }
}

/// One rule, with where it sits and the message it shares with the Rust check.
#[derive(Debug, Clone)]
pub struct Checked {
    pub at: At,
    /// What is refused, in a few words (the CRD reference lists them).
    pub what: &'static str,
    /// The message, as the controller writes it too.
    pub text: Text,
    pub rule: Rule,
}

/// The smallest default maxParallelism steps: the default for a parallelism `p` is the first
/// `m` of these with `2m >= 3p` (so `m >= 1.5p`), or 32768 after them.
const DEFAULT_STEPS: [i64; 8] = [128, 256, 512, 1024, 2048, 4096, 8192, 16384];

/// The default maxParallelism of `parallelism`, as the CEL expression [`effective`] computes
/// it (a test holds it to [`crate::default_max_parallelism`]).
pub fn default_max_parallelism_by_steps(parallelism: i64) -> i64 {
    DEFAULT_STEPS.iter().copied().find(|m| 3 * parallelism <= 2 * m).unwrap_or(32768)
}

/// CEL: the number of key groups the spec at `spec` asks for: its maxParallelism, or the
/// default for its parallelism (which the schema defaults to 1, so it is always there).
fn effective(spec: &str) -> String {
    let steps: Vec<String> = DEFAULT_STEPS.iter().map(|m| m.to_string()).collect();
    format!(
        "(has({spec}.maxParallelism) ? {spec}.maxParallelism : ([{}].filter(m, 2 * m >= 3 * {spec}.parallelism) + [32768])[0])",
        steps.join(", ")
    )
}

fn rule(rule: String, message: String) -> Rule {
    Rule::new(rule).message(Message::Expression(message))
}

fn static_rule(rule: &str, text: Text) -> Rule {
    assert!(text.holes().is_empty(), "{text}: a static message has no holes");
    Rule::new(rule).message(Message::Message(text.0.to_string()))
}

/// Every rule of the StreamJob CRD.
pub fn all() -> Vec<Checked> {
    let known = cel_string(&OPERATOR_TYPES.join(", "));
    let types = cel_list(OPERATOR_TYPES);
    let sources = cel_list(SOURCE_TYPES);
    let others: Vec<&str> =
        OPERATOR_TYPES.iter().copied().filter(|t| !SOURCE_TYPES.contains(t)).collect();
    let others = cel_list(&others);
    let pipeline = |inner: String| PIPELINE.cel(&[("error", &inner)]);

    // The maxParallelism in force once the job has state is status.maxParallelism (the
    // controller writes it from the running job). A change of the spec that changes the
    // number of key groups it asks for must ask for that one.
    let new = effective("self.spec");
    let old = effective("oldSelf.spec");
    let asked = format!(
        "has(self.spec.maxParallelism) ? {} : {}",
        MAX_PARALLELISM_SET.cel(&[("maxParallelism", "string(self.spec.maxParallelism)")]),
        MAX_PARALLELISM_DEFAULT.cel(&[("maxParallelism", &format!("string({new})"))]),
    );
    let max_parallelism_fixed = Rule::new(format!(
        "!has(oldSelf.status) || !has(oldSelf.status.maxParallelism) || {new} == {old} || {new} == oldSelf.status.maxParallelism"
    ))
    .message(Message::Expression(MAX_PARALLELISM_FIXED.cel(&[
        ("asked", &asked),
        ("fixed", "string(oldSelf.status.maxParallelism)"),
    ])))
    .field_path(".spec.maxParallelism")
    .reason(Reason::FieldValueForbidden);

    // Whether operator `j` (`b`) has the uid of an earlier one; the first such index.
    let earlier = "self.operators.exists(i, a, i < j && a.uid == b.uid)";
    let first_duplicate = format!("self.operators.transformList(j, b, {earlier}, j)[0]");
    // The uids, each once (an operator whose uid an earlier one has adds nothing), as a map
    // so that looking an input up costs one step, not one per operator; bound to `m` by
    // iterating over a list of it, once.
    let uids = "self.operators.transformMapEntry(i, o, !self.operators.exists(j, p, j < i && p.uid == o.uid), {o.uid: true})";
    // The late outputs, each once, as a map as the uids are.
    let lates = "self.operators.transformMapEntry(i, o, has(o.lateOutput) && !self.operators.exists(j, p, j < i && has(p.lateOutput) && p.lateOutput == o.lateOutput), {o.lateOutput: true})";
    // Whether operator `j` (`b`) has a late output that a uid or an earlier late output has.
    let taken = "has(b.lateOutput) && self.operators.exists(i, a, a.uid == b.lateOutput || (i < j && has(a.lateOutput) && a.lateOutput == b.lateOutput))";
    let first_bad_type =
        format!("self.pipeline.operators.transformList(i, o, !(o.type in {types}), i)[0]");

    vec![
        Checked {
            at: At::Root,
            what: "a change of the number of key groups (maxParallelism, or the default for the parallelism) once the job has state (status.maxParallelism)",
            text: MAX_PARALLELISM_FIXED,
            rule: max_parallelism_fixed,
        },
        Checked {
            at: At::Spec,
            what: "parallelism above maxParallelism",
            text: PARALLELISM_ABOVE_MAX,
            rule: rule(
                "!has(self.maxParallelism) || !has(self.parallelism) || self.parallelism <= self.maxParallelism".into(),
                PARALLELISM_ABOVE_MAX.cel(&[
                    ("parallelism", "string(self.parallelism)"),
                    ("maxParallelism", "string(self.maxParallelism)"),
                ]),
            )
            .field_path(".parallelism"),
        },
        Checked {
            at: At::Spec,
            what: "checkpoints off (interval 0s) with an upgradeMode other than stateless",
            text: CHECKPOINTS_OFF,
            rule: rule(
                "(has(self.upgradeMode) && self.upgradeMode == 'stateless') || !has(self.checkpointing) || !has(self.checkpointing.interval) || !self.checkpointing.interval.matches('^(0+(ms|s|m|h|d))+$')".into(),
                CHECKPOINTS_OFF.cel(&[(
                    "upgradeMode",
                    "has(self.upgradeMode) ? self.upgradeMode : 'savepoint'",
                )]),
            )
            .field_path(".checkpointing.interval"),
        },
        Checked {
            at: At::Checkpointing,
            what: "unaligned checkpoints with mode at-least-once",
            text: UNALIGNED_AT_LEAST_ONCE,
            rule: static_rule(
                "!(has(self.unaligned) && self.unaligned && has(self.mode) && self.mode == 'at-least-once')",
                UNALIGNED_AT_LEAST_ONCE,
            )
            .field_path(".unaligned"),
        },
        Checked {
            at: At::Restore,
            what: "both snapshot and path",
            text: RESTORE_BOTH,
            rule: static_rule("!(has(self.snapshot) && has(self.path))", RESTORE_BOTH),
        },
        Checked {
            at: At::Pipeline,
            what: "a uid that another operator has",
            text: DUPLICATE_UID,
            rule: rule(
                format!("self.operators.all(j, b, !{earlier})"),
                format!(
                    "[{first_duplicate}].map(k, {})[0]",
                    pipeline(DUPLICATE_UID.cel(&[
                        ("index", "string(k)"),
                        ("uid", "self.operators[k].uid"),
                    ]))
                ),
            )
            .field_path(".operators"),
        },
        // A job that names its own image may use types its binary registers (the job checks
        // them when it starts).
        Checked {
            at: At::Spec,
            what: "an operator type that is not built in, in a job without an image of its own",
            text: UNKNOWN_TYPE,
            rule: rule(
                format!("has(self.image) || self.pipeline.operators.all(o, o.type in {types})"),
                format!(
                    "[{first_bad_type}].map(k, {})[0]",
                    pipeline(UNKNOWN_TYPE.cel(&[
                        ("index", "string(k)"),
                        ("uid", "self.pipeline.operators[k].uid"),
                        ("type", "self.pipeline.operators[k].type"),
                        ("known", &known),
                    ]))
                ),
            )
            .field_path(".pipeline.operators"),
        },
        Checked {
            at: At::Pipeline,
            what: "a lateOutput that names an operator or another lateOutput",
            text: LATE_OUTPUT_TAKEN,
            rule: rule(
                format!("self.operators.all(j, b, !({taken}))"),
                format!(
                    "[self.operators.transformList(j, b, {taken}, j)[0]].map(k, {})[0]",
                    pipeline(LATE_OUTPUT_TAKEN.cel(&[
                        ("uid", "self.operators[k].uid"),
                        ("name", "self.operators[k].lateOutput"),
                    ]))
                ),
            )
            .field_path(".operators"),
        },
        Checked {
            at: At::Pipeline,
            what: "an input that names no operator",
            text: UNKNOWN_INPUT,
            rule: rule(
                format!(
                    "[{uids}].all(m, [{lates}].all(l, self.operators.all(o, !has(o.inputs) || o.inputs.all(x, x in m || x in l))))"
                ),
                // (The operator by its index: an element taken out of a list loses the
                // bounds the schema gives its fields, and the cost estimate with them.)
                format!(
                    "[{uids}].map(m, [{lates}].map(l, [self.operators.transformList(i, o, has(o.inputs) && o.inputs.exists(x, !(x in m || x in l)), i)[0]].map(k, {})[0])[0])[0]",
                    pipeline(UNKNOWN_INPUT.cel(&[
                        ("uid", "self.operators[k].uid"),
                        ("input", "self.operators[k].inputs.filter(x, !(x in m || x in l))[0]"),
                    ]))
                ),
            )
            .field_path(".operators"),
        },
        Checked {
            at: At::Operator,
            what: "an operator among its own inputs",
            text: SELF_INPUT,
            rule: rule(
                "!has(self.inputs) || !(self.uid in self.inputs || (has(self.lateOutput) && self.lateOutput in self.inputs))".into(),
                pipeline(SELF_INPUT.cel(&[("uid", "self.uid")])),
            )
            .field_path(".inputs"),
        },
        Checked {
            at: At::Operator,
            what: "a source with inputs",
            text: SOURCE_WITH_INPUTS,
            rule: rule(
                format!("!(self.type in {sources}) || !has(self.inputs) || size(self.inputs) == 0"),
                pipeline(SOURCE_WITH_INPUTS.cel(&[("uid", "self.uid"), ("type", "self.type")])),
            )
            .field_path(".inputs")
            .reason(Reason::FieldValueForbidden),
        },
        Checked {
            at: At::Operator,
            what: "an operator other than a source without inputs",
            text: NO_INPUTS,
            rule: rule(
                format!("!(self.type in {others}) || (has(self.inputs) && size(self.inputs) > 0)"),
                pipeline(NO_INPUTS.cel(&[("uid", "self.uid"), ("type", "self.type")])),
            )
            .field_path(".inputs")
            .reason(Reason::FieldValueRequired),
        },
        Checked {
            at: At::SnapshotPath,
            what: "a change of a StreamSnapshot's path",
            text: SNAPSHOT_PATH_IMMUTABLE,
            rule: static_rule("self == oldSelf", SNAPSHOT_PATH_IMMUTABLE)
                .reason(Reason::FieldValueForbidden),
        },
    ]
}

/// Adds the rules that sit at `at` to `schema`.
fn add(schema: &mut Schema, at: At) {
    for c in all().into_iter().filter(|c| c.at == at) {
        kube::core::validate(schema, c.rule).expect("a rule always serializes");
    }
}

/// The root rule (one: `#[kube(validation = ...)]` takes it).
pub fn root_rule() -> Rule {
    let mut root: Vec<Rule> =
        all().into_iter().filter(|c| c.at == At::Root).map(|c| c.rule).collect();
    assert_eq!(root.len(), 1, "one root rule");
    root.remove(0)
}

pub(crate) fn spec(schema: &mut Schema) {
    add(schema, At::Spec);
}
pub(crate) fn checkpointing(schema: &mut Schema) {
    add(schema, At::Checkpointing);
}
pub(crate) fn restore(schema: &mut Schema) {
    add(schema, At::Restore);
}
pub(crate) fn pipeline(schema: &mut Schema) {
    add(schema, At::Pipeline);
}
pub(crate) fn operator(schema: &mut Schema) {
    add(schema, At::Operator);
}
pub(crate) fn snapshot_path(schema: &mut Schema) {
    add(schema, At::SnapshotPath);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::{DURATION_PATTERN, Duration};
    use crate::{StreamJob, StreamJobSpec, crd_values, default_max_parallelism};
    use serde_json::Value;

    /// Every `x-kubernetes-validations` entry under `v`, with the path to it.
    fn rules_in(v: &Value, path: &str, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::Array(rules)) = map.get("x-kubernetes-validations") {
                    out.extend(rules.iter().map(|r| (path.to_string(), r.clone())));
                }
                for (k, v) in map {
                    rules_in(v, &format!("{path}/{k}"), out);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| rules_in(v, path, out)),
            _ => {}
        }
    }

    fn generated() -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for crd in crd_values() {
            rules_in(&crd, "", &mut out);
        }
        out
    }

    #[test]
    fn every_rule_in_the_crds_has_a_message_and_is_one_of_these() {
        let rules = generated();
        // The conditions list's map keys are no rule; the only rules are these.
        assert_eq!(rules.len(), all().len(), "{rules:#?}");
        for (path, r) in &rules {
            let message = r.get("message").or_else(|| r.get("messageExpression"));
            assert!(
                message.and_then(Value::as_str).is_some_and(|m| !m.is_empty()),
                "a rule without a message at {path}: {r}"
            );
            assert!(r["rule"].as_str().is_some_and(|s| !s.is_empty()), "{path}: {r}");
        }
        for c in all() {
            let want = serde_json::to_value(&c.rule).unwrap();
            assert!(rules.iter().any(|(_, r)| *r == want), "{}: not in the CRD", c.what);
        }
    }

    /// The words of each rule's message are those of its text, the one the Rust checks
    /// render: every literal piece of the text is in the message (escaped for CEL).
    #[test]
    fn each_rule_says_what_its_text_says() {
        for c in all() {
            let r = serde_json::to_value(&c.rule).unwrap();
            let message = r
                .get("message")
                .or_else(|| r.get("messageExpression"))
                .and_then(Value::as_str)
                .unwrap()
                .to_string();
            if r.get("message").is_some() {
                assert_eq!(message, c.text.0, "{}", c.what);
                continue;
            }
            let mut texts = vec![c.text];
            if matches!(c.at, At::Pipeline | At::Operator) {
                texts.push(PIPELINE);
            }
            if c.text == MAX_PARALLELISM_FIXED {
                texts.extend([MAX_PARALLELISM_SET, MAX_PARALLELISM_DEFAULT]);
            }
            for t in texts {
                for p in t.pieces() {
                    if let Piece::Literal(s) = p {
                        let escaped = cel_string(&s.replace('%', "%%"));
                        let escaped = &escaped[1..escaped.len() - 1];
                        assert!(
                            message.contains(escaped),
                            "{}: {escaped:?} not in {message}",
                            c.what
                        );
                    }
                }
            }
        }
    }

    fn spec(yaml: &str) -> StreamJobSpec {
        let job: StreamJob = serde_saphyr::from_str(&format!(
            "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {{name: j}}\nspec:\n{yaml}"
        ))
        .unwrap();
        job.spec
    }

    /// The Rust checks write the texts of the rules, with the values filled in.
    #[test]
    fn the_rust_checks_write_the_rules_texts() {
        let ops = "  pipeline:\n    operators:\n";
        let cases: Vec<(&str, String)> = vec![
            (
                "  parallelism: 8\n  maxParallelism: 4\n",
                PARALLELISM_ABOVE_MAX.render(&[("parallelism", &8), ("maxParallelism", &4)]),
            ),
            (
                "  checkpointing: {unaligned: true, mode: at-least-once}\n",
                UNALIGNED_AT_LEAST_ONCE.0.into(),
            ),
            ("  restore: {snapshot: a, path: s3://bucket/sp}\n", RESTORE_BOTH.0.into()),
        ];
        let pipeline = |e: String| PIPELINE.render(&[("error", &e)]);
        let graph: Vec<(&str, String)> = vec![
            (
                "      - {uid: a, type: generator}\n      - {uid: a, type: stdout, inputs: [a]}\n",
                pipeline(DUPLICATE_UID.render(&[("index", &1), ("uid", &"a")])),
            ),
            (
                "      - {uid: a, type: generator}\n      - {uid: b, type: stdout, inputs: [x]}\n",
                pipeline(UNKNOWN_INPUT.render(&[("uid", &"b"), ("input", &"x")])),
            ),
            (
                "      - {uid: a, type: generator}\n      - {uid: b, type: map, inputs: [a, b]}\n",
                pipeline(SELF_INPUT.render(&[("uid", &"b")])),
            ),
            (
                "      - {uid: a, type: generator}\n      - {uid: b, type: stdot, inputs: [a]}\n",
                pipeline(UNKNOWN_TYPE.render(&[
                    ("index", &1),
                    ("uid", &"b"),
                    ("type", &"stdot"),
                    ("known", &OPERATOR_TYPES.join(", ")),
                ])),
            ),
            (
                "      - {uid: a, type: generator}\n      - {uid: b, type: socket, inputs: [a]}\n",
                pipeline(SOURCE_WITH_INPUTS.render(&[("uid", &"b"), ("type", &"socket")])),
            ),
            (
                "      - {uid: a, type: generator}\n      - {uid: b, type: stdout}\n",
                pipeline(NO_INPUTS.render(&[("uid", &"b"), ("type", &"stdout")])),
            ),
        ];
        let good =
            "      - {uid: s, type: generator}\n      - {uid: o, type: stdout, inputs: [s]}\n";
        for (extra, want) in cases {
            assert_eq!(
                spec(&format!("{extra}{ops}{good}")).validate().unwrap_err().to_string(),
                want
            );
        }
        for (operators, want) in graph {
            assert_eq!(
                spec(&format!("{ops}{operators}")).validate().unwrap_err().to_string(),
                want
            );
        }
        assert!(spec(&format!("{ops}{good}")).validate().is_ok());

        // The bounds of the lists, in the apiserver's words for maxItems.
        let mut s = spec(&format!("{ops}{good}"));
        let sink = s.pipeline.operators[1].clone();
        s.pipeline.operators[1].inputs = vec!["s".into(); MAX_INPUTS + 1];
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            format!(
                "spec.pipeline.operators[1].inputs: Too many: 65: must have at most {MAX_INPUTS} items"
            )
        );
        s.pipeline.operators[1] = sink.clone();
        s.pipeline.operators.extend((0..MAX_OPERATORS - 2).map(|i| {
            let mut o = sink.clone();
            o.uid = format!("o{i}");
            o
        }));
        assert!(s.validate().is_ok(), "{MAX_OPERATORS} operators");
        s.pipeline.operators.push(sink);
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            format!(
                "spec.pipeline.operators: Too many: 257: must have at most {MAX_OPERATORS} items"
            )
        );
        // And the schema says the same bounds.
        let crd = &crd_values()[0];
        let pipeline = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["pipeline"];
        let operators = &pipeline["properties"]["operators"];
        assert_eq!(operators["maxItems"], MAX_OPERATORS);
        let inputs = &operators["items"]["properties"]["inputs"];
        assert_eq!(inputs["maxItems"], MAX_INPUTS);
        assert_eq!(inputs["items"]["maxLength"], MAX_NAME_LENGTH);
    }

    #[test]
    fn the_controllers_texts_fill_their_holes() {
        assert_eq!(
            max_parallelism_fixed(Some(256), 256, 128),
            "spec.maxParallelism 256 differs from 128, the number of key groups the job's state is split into: it cannot change once the job has state; set spec.maxParallelism: 128"
        );
        assert!(max_parallelism_fixed(None, 256, 128).starts_with(
            "spec.maxParallelism (default 256 for this parallelism) differs from 128,"
        ));
        assert!(checkpoints_off("last-state")
            .starts_with("spec.checkpointing.interval 0s turns checkpoints off, and spec.upgradeMode last-state needs them"));
    }

    #[test]
    fn the_default_by_steps_is_the_default() {
        for p in 1..=32768 {
            assert_eq!(
                default_max_parallelism_by_steps(p),
                i64::from(default_max_parallelism(p as u32)),
                "parallelism {p}"
            );
        }
        let e = effective("self.spec");
        assert!(e.contains("[128, 256, 512, 1024, 2048, 4096, 8192, 16384]"), "{e}");
        assert!(
            e.contains("2 * m >= 3 * self.spec.parallelism") && e.contains("+ [32768])[0]"),
            "{e}"
        );
    }

    /// The rule that finds checkpoints off takes the durations that are zero, exactly.
    #[test]
    fn the_zero_interval_pattern_is_a_zero_duration() {
        let zero = regex::Regex::new("^(0+(ms|s|m|h|d))+$").unwrap();
        let valid = regex::Regex::new(DURATION_PATTERN).unwrap();
        for s in [
            "0s",
            "0ms",
            "00s",
            "0m0s",
            "0d0h0m0s0ms",
            "1s",
            "10s",
            "0s1ms",
            "100ms",
            "1m0s",
            "01s",
            "0h1m",
        ] {
            assert!(valid.is_match(s));
            let d: Duration = s.parse().unwrap();
            assert_eq!(zero.is_match(s), d.is_zero(), "{s}");
        }
        let all: Vec<Checked> = all();
        let off = all.iter().find(|c| c.text == CHECKPOINTS_OFF).unwrap();
        assert!(off.rule.rule.contains("'^(0+(ms|s|m|h|d))+$'"));
    }

    #[test]
    fn texts_render_and_become_cel() {
        let t = Text("a {x} b's {y}% {x}");
        assert_eq!(t.render(&[("x", &1), ("y", &"two")]), "a 1 b's two% 1");
        assert_eq!(t.holes(), ["x", "y", "x"]);
        assert_eq!(
            t.cel(&[("x", "string(self.x)"), ("y", "self.y")]),
            r"'a %s b\'s %s%% %s'.format([string(self.x), self.y, string(self.x)])"
        );
        assert_eq!(Text("100% sure").cel(&[]), "'100% sure'");
    }
}
