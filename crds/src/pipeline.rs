//! The pipeline: a directed acyclic graph of operators, each with a stable `uid` under which
//! its state is stored and restored. Declared in `spec.pipeline` of a StreamJob and read the
//! same way by `weir run`.
//!
//! This module holds the shape and the graph rules (unique uids, built-in types, sources
//! without inputs and the other operators with some, inputs that exist, no cycles); what each
//! operator type accepts as parameters is the runtime's to check. The apiserver checks the
//! same rules but cycles itself ([`crate::rules`]), with the same messages.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rules::{
    self, DUPLICATE_UID, EMPTY, LATE_OUTPUT_TAKEN, MAX_INPUTS, MAX_NAME_LENGTH, MAX_OPERATORS,
    NO_INPUTS, SELF_INPUT, SOURCE_WITH_INPUTS, UNKNOWN_INPUT, UNKNOWN_TYPE,
};

/// The operators of a job. Each operator reads the outputs of the operators named in its
/// `inputs`; an operator without inputs is a source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::pipeline)]
pub struct Pipeline {
    /// The operators, in any order, at most 256. State is kept by `uid`, so keep a uid when
    /// you change an operator's parameters and want it to keep its state.
    #[schemars(length(min = 1, max = MAX_OPERATORS))]
    pub operators: Vec<OperatorSpec>,
}

/// One operator: its uid, its type, its inputs, and the parameters of its type beside them,
/// for example `{uid: counts, type: count, inputs: [words], key: word}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::operator)]
pub struct OperatorSpec {
    /// Stable identity of the operator and of its state: lowercase letters, digits, `-` and
    /// `_`, at most 63 characters, unique within the pipeline.
    #[schemars(
        length(min = 1, max = MAX_NAME_LENGTH),
        regex(pattern = r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$")
    )]
    pub uid: String,
    /// The operator type, for example `generator`, `file_source`, `split`, `count`,
    /// `file_sink`.
    #[serde(rename = "type")]
    #[schemars(length(max = MAX_NAME_LENGTH), regex(pattern = r"^[a-z][a-z0-9_]*$"))]
    pub kind: String,
    /// The uids of the operators whose output this one reads, at most 64: empty for a source
    /// (`generator`, `file_source`, `socket`), at least one for every other type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_INPUTS), inner(length(max = MAX_NAME_LENGTH)))]
    pub inputs: Vec<String>,
    /// Where a `window` sends the records that come after its allowed lateness: a name that
    /// other operators give in `inputs` as they would a uid (without it, such records are
    /// dropped and counted in `weir_operator_late_records_total`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = MAX_NAME_LENGTH),
        regex(pattern = r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$")
    )]
    pub late_output: Option<String>,
    /// The parameters of the operator type (every other field of the operator).
    #[serde(flatten)]
    pub params: BTreeMap<String, serde_json::Value>,
}

/// A pipeline that breaks a graph rule; the message names the operator and the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipelineError {
    Empty,
    DuplicateUid { index: usize, uid: String },
    LateOutputTaken { uid: String, name: String },
    UnknownInput { uid: String, input: String },
    SelfInput { uid: String },
    UnknownType { index: usize, uid: String, kind: String },
    SourceWithInputs { uid: String, kind: String },
    NoInputs { uid: String, kind: String },
    Cycle { cycle: Vec<String> },
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            PipelineError::Empty => EMPTY.0.to_string(),
            PipelineError::DuplicateUid { index, uid } => {
                DUPLICATE_UID.render(&[("index", index), ("uid", uid)])
            }
            PipelineError::LateOutputTaken { uid, name } => {
                LATE_OUTPUT_TAKEN.render(&[("uid", uid), ("name", name)])
            }
            PipelineError::UnknownInput { uid, input } => {
                UNKNOWN_INPUT.render(&[("uid", uid), ("input", input)])
            }
            PipelineError::SelfInput { uid } => SELF_INPUT.render(&[("uid", uid)]),
            PipelineError::UnknownType { index, uid, kind } => UNKNOWN_TYPE.render(&[
                ("index", index),
                ("uid", uid),
                ("type", kind),
                ("known", &OPERATOR_TYPES.join(", ")),
            ]),
            PipelineError::SourceWithInputs { uid, kind } => {
                SOURCE_WITH_INPUTS.render(&[("uid", uid), ("type", kind)])
            }
            PipelineError::NoInputs { uid, kind } => {
                NO_INPUTS.render(&[("uid", uid), ("type", kind)])
            }
            PipelineError::Cycle { cycle } => format!(
                "operators {cycle:?} form a cycle through their inputs: a pipeline must be acyclic"
            ),
        };
        f.write_str(&text)
    }
}

impl std::error::Error for PipelineError {}

impl Pipeline {
    /// Checks the graph rules and returns the operators in a topological order (every operator
    /// after its inputs; ties in declaration order). With `open_types` (a job that names its
    /// own image, [`crate::StreamJobSpec::image`]), a type that is not built in passes: it may
    /// be one the image's binary registers, which checks it when the job starts.
    pub fn validate_graph(&self, open_types: bool) -> Result<Vec<&OperatorSpec>, PipelineError> {
        if self.operators.is_empty() {
            return Err(PipelineError::Empty);
        }
        let mut index = BTreeMap::new();
        for (i, op) in self.operators.iter().enumerate() {
            if index.insert(op.uid.as_str(), i).is_some() {
                return Err(PipelineError::DuplicateUid { index: i, uid: op.uid.clone() });
            }
        }
        // A late output is read like an operator's output: by its name, after its window.
        for (i, op) in self.operators.iter().enumerate() {
            if let Some(name) = &op.late_output
                && index.insert(name.as_str(), i).is_some()
            {
                return Err(PipelineError::LateOutputTaken {
                    uid: op.uid.clone(),
                    name: name.clone(),
                });
            }
        }
        for (i, op) in self.operators.iter().enumerate() {
            if !open_types && !OPERATOR_TYPES.contains(&op.kind.as_str()) {
                return Err(PipelineError::UnknownType {
                    index: i,
                    uid: op.uid.clone(),
                    kind: op.kind.clone(),
                });
            }
        }
        for op in &self.operators {
            let (uid, kind) = (op.uid.clone(), op.kind.clone());
            match (SOURCE_TYPES.contains(&op.kind.as_str()), op.inputs.is_empty()) {
                (true, false) => return Err(PipelineError::SourceWithInputs { uid, kind }),
                (false, true) => return Err(PipelineError::NoInputs { uid, kind }),
                _ => {}
            }
        }
        for op in &self.operators {
            for input in &op.inputs {
                if input == &op.uid || op.late_output.as_ref() == Some(input) {
                    return Err(PipelineError::SelfInput { uid: op.uid.clone() });
                }
                if !index.contains_key(input.as_str()) {
                    return Err(PipelineError::UnknownInput {
                        uid: op.uid.clone(),
                        input: input.clone(),
                    });
                }
            }
        }
        // Kahn's algorithm, picking the lowest declaration index first so the order is stable.
        let mut pending: Vec<usize> = self.operators.iter().map(|op| op.inputs.len()).collect();
        let mut ready: BTreeSet<usize> =
            (0..self.operators.len()).filter(|&i| pending[i] == 0).collect();
        let mut order = Vec::with_capacity(self.operators.len());
        while let Some(i) = ready.pop_first() {
            order.push(&self.operators[i]);
            for (j, op) in self.operators.iter().enumerate() {
                for input in &op.inputs {
                    if index[input.as_str()] == i {
                        pending[j] -= 1;
                        if pending[j] == 0 {
                            ready.insert(j);
                        }
                    }
                }
            }
        }
        if order.len() < self.operators.len() {
            let cycle = self
                .operators
                .iter()
                .enumerate()
                .filter(|(i, _)| pending[*i] > 0)
                .map(|(_, op)| op.uid.clone())
                .collect();
            return Err(PipelineError::Cycle { cycle });
        }
        Ok(order)
    }
}

/// The default number of key groups for a parallelism when `maxParallelism` is not given:
/// the next power of two of `1.5 * parallelism`, at least 128 and at most 32768.
pub fn default_max_parallelism(parallelism: u32) -> u32 {
    let wanted = (u64::from(parallelism) * 3).div_ceil(2);
    (wanted.next_power_of_two()).clamp(128, 32768) as u32
}

/// The largest maxParallelism (number of key groups) a job can have.
/// The built-in operator types. The runtime checks each type's parameters; the type itself is
/// checked here, so that the controller refuses an unknown one before it deploys anything.
pub const OPERATOR_TYPES: &[&str] = &[
    "generator",
    "file_source",
    "socket",
    "kafka_source",
    "split",
    "map",
    "filter",
    "throttle",
    "count",
    "sum",
    "min",
    "max",
    "tumbling_window_count",
    "window",
    "window_top_n",
    "window_join",
    "interval_join",
    "stdout",
    "blackhole",
    "file_sink",
    "kafka_sink",
];

pub const MAX_MAX_PARALLELISM: u32 = 32768;

/// The operator types that read from outside the job: they take no inputs, and every other
/// type takes at least one.
pub const SOURCE_TYPES: &[&str] = &["generator", "file_source", "socket", "kafka_source"];

/// Operator types that keep no state in checkpoints: a new version of a job may add or drop
/// them without losing anything.
pub const STATELESS_TYPES: &[&str] = &["socket", "split", "map", "filter", "stdout", "blackhole"];

impl Pipeline {
    /// Uids of the operators whose state a checkpoint or savepoint holds.
    pub fn stateful_uids(&self) -> Vec<String> {
        self.operators
            .iter()
            .filter(|o| !STATELESS_TYPES.contains(&o.kind.as_str()))
            .map(|o| o.uid.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(uid: &str, kind: &str, inputs: &[&str]) -> OperatorSpec {
        OperatorSpec {
            uid: uid.into(),
            kind: kind.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            late_output: None,
            params: BTreeMap::new(),
        }
    }

    #[test]
    fn orders_operators_after_their_inputs() {
        let p = Pipeline {
            operators: vec![
                op("out", "file_sink", &["counts"]),
                op("counts", "count", &["words"]),
                op("lines", "file_source", &[]),
                op("words", "split", &["lines"]),
            ],
        };
        let order: Vec<_> =
            p.validate_graph(false).unwrap().iter().map(|o| o.uid.as_str()).collect();
        assert_eq!(order, ["lines", "words", "counts", "out"]);
    }

    #[test]
    fn names_the_operator_and_field_of_each_graph_error() {
        let dup =
            Pipeline { operators: vec![op("a", "generator", &[]), op("a", "stdout", &["a"])] };
        assert_eq!(
            dup.validate_graph(false).unwrap_err().to_string(),
            "pipeline.operators[1].uid \"a\" is used by more than one operator: uids must be unique"
        );
        let unknown =
            Pipeline { operators: vec![op("a", "generator", &[]), op("b", "stdout", &["x"])] };
        assert_eq!(
            unknown.validate_graph(false).unwrap_err(),
            PipelineError::UnknownInput { uid: "b".into(), input: "x".into() }
        );
        let cyc = Pipeline {
            operators: vec![
                op("s", "generator", &[]),
                op("a", "map", &["s", "b"]),
                op("b", "map", &["a"]),
            ],
        };
        assert_eq!(
            cyc.validate_graph(false).unwrap_err(),
            PipelineError::Cycle { cycle: vec!["a".into(), "b".into()] }
        );
        let selfloop = Pipeline { operators: vec![op("a", "map", &["a"])] };
        assert_eq!(
            selfloop.validate_graph(false).unwrap_err(),
            PipelineError::SelfInput { uid: "a".into() }
        );
        assert_eq!(
            Pipeline { operators: vec![] }.validate_graph(false).unwrap_err(),
            PipelineError::Empty
        );
        let typo =
            Pipeline { operators: vec![op("a", "generator", &[]), op("b", "stdot", &["a"])] };
        let e = typo.validate_graph(false).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "pipeline.operators[1] (\"b\"): type \"stdot\" is unknown: use one of generator,"
            ),
            "{e}"
        );
    }

    #[test]
    fn parameters_sit_beside_uid_type_and_inputs() {
        let yaml = "operators:\n  - {uid: counts, type: count, inputs: [words], key: word}\n";
        let p: Pipeline = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(p.operators[0].kind, "count");
        assert_eq!(p.operators[0].params["key"], serde_json::json!("word"));
        let back = serde_json::to_value(&p).unwrap();
        assert_eq!(back["operators"][0]["key"], "word");
        assert_eq!(back["operators"][0]["type"], "count");
    }

    #[test]
    fn default_max_parallelism_follows_the_rule() {
        assert_eq!(default_max_parallelism(1), 128);
        assert_eq!(default_max_parallelism(85), 128);
        assert_eq!(default_max_parallelism(86), 256); // 1.5 * 86 = 129
        assert_eq!(default_max_parallelism(1000), 2048);
        assert_eq!(default_max_parallelism(30000), 32768);
        for p in 1..=32768 {
            let m = default_max_parallelism(p);
            assert!(m.is_power_of_two() && (128..=32768).contains(&m));
            assert!(m >= p, "maxParallelism {m} below parallelism {p}");
        }
    }
}
