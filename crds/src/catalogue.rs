//! The catalogue of built-in operator types: for each its role, whether a checkpoint holds
//! state of it, the fields it emits, the schema of its parameters (from the typed parameters
//! [`crate::plan`] parses them into, so the two cannot disagree) and an example. The CRD
//! reference lists every type from here; the planner, the CRD's CEL rules and the
//! controller's upgrade checks use the lists in [`crate::pipeline`], which a test holds equal
//! to this catalogue.

use schemars::{JsonSchema, generate::SchemaSettings};
use serde_json::Value;

use crate::kafka::{KafkaSinkSpec, KafkaSourceSpec};
use crate::plan::{
    FileSinkSpec, FileSourceSpec, FilterSpec, GeneratorSpec, IntervalJoinSpec, KeyedSpec, MapSpec,
    NoParams, SocketSpec, SplitSpec, StdoutSpec, ThrottleSpec, TopNSpec, WindowJoinSpec,
    WindowOpSpec, WindowSpec,
};

/// Where an operator type stands in a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads from outside the job; takes no inputs.
    Source,
    /// Record by record, no state.
    Transform,
    /// Partitions its input by a key field; keeps state per key.
    Keyed,
    /// Writes out of the job; feeds no operator.
    Sink,
}

impl Role {
    pub fn describe(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Transform => "transform",
            Role::Keyed => "keyed",
            Role::Sink => "sink",
        }
    }
}

/// One operator type.
#[derive(Debug)]
pub struct OperatorKind {
    /// Its `type` in the manifest.
    pub name: &'static str,
    pub role: Role,
    /// Whether a checkpoint or savepoint holds state of it (an upgrade cannot drop it without
    /// `allowNonRestoredState`).
    pub stateful: bool,
    /// What it does.
    pub summary: &'static str,
    /// The fields of the records it emits.
    pub emits: &'static str,
    /// The JSON schema of its parameters (the keys beside `uid`, `type` and `inputs`).
    pub params: fn() -> Value,
    /// An operator of this type, as a line of `spec.pipeline.operators`.
    pub example: &'static str,
}

fn schema_of<T: JsonSchema>() -> Value {
    let generator = SchemaSettings::draft2020_12()
        .with(|s| {
            s.inline_subschemas = true;
        })
        .into_generator();
    let mut v = serde_json::to_value(generator.into_root_schema_for::<T>()).unwrap_or_default();
    structural(&mut v);
    v
}

/// In the form of the CRD's own schemas (what the reference renders): an optional value's
/// `type: [integer, null]` becomes `type: integer`, an enum of documented variants (`oneOf`
/// of `const`s) an `enum`, and `format`, `title` and `$schema` go.
fn structural(v: &mut Value) {
    let Some(o) = v.as_object_mut() else { return };
    // The keywords, not properties of those names (a parameter `format` is an object here).
    for keyword in ["$schema", "title", "format"] {
        if o.get(keyword).is_some_and(Value::is_string) {
            o.remove(keyword);
        }
    }
    if o.get("default") == Some(&Value::Null) {
        o.remove("default");
    }
    if let Some(Value::Array(types)) = o.get("type") {
        let real: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
        if real.len() == 1 {
            o.insert("type".into(), real[0].clone());
        }
    }
    if let Some(Value::Array(variants)) = o.get("oneOf")
        && variants.iter().all(|x| x.get("const").is_some())
    {
        let values: Vec<Value> = variants.iter().map(|x| x["const"].clone()).collect();
        o.remove("oneOf");
        o.insert("type".into(), Value::from("string"));
        o.insert("enum".into(), Value::Array(values));
    }
    for (_, child) in o.iter_mut() {
        match child {
            Value::Object(_) => structural(child),
            Value::Array(items) => items.iter_mut().for_each(structural),
            _ => {}
        }
    }
}

/// `count` takes the keyed parameters without `field`.
fn count_params() -> Value {
    let mut v = schema_of::<KeyedSpec>();
    if let Some(p) = v["properties"].as_object_mut() {
        p.remove("field");
    }
    v
}

fn aggregate_params() -> Value {
    let mut v = schema_of::<KeyedSpec>();
    v["required"] = serde_json::json!(["key", "field"]);
    v
}

/// Every built-in operator type.
pub const KINDS: &[OperatorKind] = &[
    OperatorKind {
        name: "generator",
        role: Role::Source,
        stateful: true,
        summary: "Deterministic records from a seed, for tests and benchmarks: text lines of words `w<key>`, or key/value records. The records are spread over `splits` independent streams, dealt round-robin to the subtasks, so the data does not depend on the parallelism; its position is checkpointed.",
        emits: "`line` (text) with `format: text`; `key` (text `k<n>`), `value` (integer), `ts` (integer, the record's place in its split) with `format: kv`",
        params: schema_of::<GeneratorSpec>,
        example: "{uid: events, type: generator, format: kv, keys: 10000, count: 1000000, ratePerSecond: 50000}",
    },
    OperatorKind {
        name: "file_source",
        role: Role::Source,
        stateful: true,
        summary: "Every file under a directory or S3 prefix, one record per line: the line as text, or with `format: json` a JSON object per line read into the fields `fields` names, with their types. The files are dealt to the subtasks, and the position in each is checkpointed. A line that does not parse fails the job, naming the file and line, or with `onError: skip` is dropped and counted. Ends when every file is read.",
        emits: "`line` (text) with `format: text`; with `format: json` the names of `fields` in sorted order, each holding its type (`string` text, `int` and `timestamp` integers, `float` a float, `bool` a boolean)",
        params: schema_of::<FileSourceSpec>,
        example: "{uid: bids, type: file_source, path: s3://weir-data/bids, format: json, fields: {auction: int, price: float, ts: timestamp, \"bidder.name\": string}, onError: skip}",
    },
    OperatorKind {
        name: "socket",
        role: Role::Source,
        stateful: false,
        summary: "Lines read from a TCP server (as `nc -lk 9999` serves them), by subtask 0, as text or, with `format: json`, as JSON objects read into `fields` as a `file_source` reads them; a restarted job connects again and reads on. What the server sent before a failure is not read again: at most once.",
        emits: "`line` (text) with `format: text`; with `format: json` the names of `fields` in sorted order, as a `file_source`",
        params: schema_of::<SocketSpec>,
        example: "{uid: lines, type: socket, host: localhost, port: 9999}",
    },
    OperatorKind {
        name: "kafka_source",
        role: Role::Source,
        stateful: true,
        summary: "The records of Kafka topics (`topics`, or every topic matching `topicPattern`): each partition a split, dealt to the subtasks (again when the job is rescaled), read from where `startFrom` says the first time and from the checkpoint's offsets after that. Reads committed records only unless `isolation: read_uncommitted`. With `stopAt: latest` it is bounded: each partition ends where it ended when the job first started. Partitions and topics created while it runs are found every `partitionDiscoveryInterval` and read from their start. The offsets of each completed checkpoint are committed to `groupId`, for lag tools.",
        emits: "`line` (the value as text) with `format: text`; the names of `fields` in sorted order with `format: json`, as a `file_source`; `key`, `value`, `topic` (text), `partition`, `offset`, `timestamp` (integers) with `format: raw`",
        params: schema_of::<KafkaSourceSpec>,
        example: "{uid: orders, type: kafka_source, topics: [orders], bootstrapServers: \"kafka:9092\", startFrom: earliest, format: json, fields: {key: string, value: int, ts: timestamp}, eventTime: {field: ts, maxOutOfOrderness: 5s}}",
    },
    OperatorKind {
        name: "split",
        role: Role::Transform,
        stateful: false,
        summary: "Splits a text field on white space: one record per word.",
        emits: "`output` (text)",
        params: schema_of::<SplitSpec>,
        example: "{uid: words, type: split, inputs: [lines]}",
    },
    OperatorKind {
        name: "map",
        role: Role::Transform,
        stateful: false,
        summary: "Changes fields: `upper` and `lower` change the case of text fields, `set` writes a field from a template (`{name}` stands for a field's value; a new field goes at the end), then `select` keeps the fields it names, in its order.",
        emits: "its input's fields with those of `set` added, or those of `select`; a field `set` writes is text",
        params: schema_of::<MapSpec>,
        example: "{uid: tagged, type: map, inputs: [events], set: {label: 'key {key}'}, select: [label, value]}",
    },
    OperatorKind {
        name: "filter",
        role: Role::Transform,
        stateful: false,
        summary: "Keeps the records whose field meets every condition given.",
        emits: "its input's fields",
        params: schema_of::<FilterSpec>,
        example: "{uid: long, type: filter, inputs: [words], field: word, minLength: 5}",
    },
    OperatorKind {
        name: "throttle",
        role: Role::Transform,
        stateful: true,
        summary: "Passes records on at no more than `ratePerSecond` per subtask (bursts of at most a second's worth): a deliberately slow stage, to try backpressure and unaligned checkpoints. Records that come faster wait in it, in its checkpointed state; meanwhile its subtask takes no more input but still takes barriers.",
        emits: "its input's fields",
        params: schema_of::<ThrottleSpec>,
        example: "{uid: slow, type: throttle, inputs: [counts], ratePerSecond: 1000}",
    },
    OperatorKind {
        name: "count",
        role: Role::Keyed,
        stateful: true,
        summary: "Counts the records of each key, and emits the new count at each record (an update stream: the last record of a key holds its total).",
        emits: "the key field (as its input holds it), `count` (integer)",
        params: count_params,
        example: "{uid: counts, type: count, inputs: [words], key: word}",
    },
    OperatorKind {
        name: "sum",
        role: Role::Keyed,
        stateful: true,
        summary: "Sums a numeric field per key (text that reads as a number counts; anything else is dropped and counted in `weir_operator_records_dropped_total`), and emits the new sum at each record. Integers stay integers until a float is added.",
        emits: "the key field, then `field` (a number)",
        params: aggregate_params,
        example: "{uid: totals, type: sum, inputs: [events], key: key, field: value}",
    },
    OperatorKind {
        name: "min",
        role: Role::Keyed,
        stateful: true,
        summary: "The smallest value of a numeric field per key, emitted at each record (as `sum` reads numbers).",
        emits: "the key field, then `field` (a number)",
        params: aggregate_params,
        example: "{uid: lowest, type: min, inputs: [events], key: key, field: value}",
    },
    OperatorKind {
        name: "max",
        role: Role::Keyed,
        stateful: true,
        summary: "The largest value of a numeric field per key, emitted at each record (as `sum` reads numbers).",
        emits: "the key field, then `field` (a number)",
        params: aggregate_params,
        example: "{uid: highest, type: max, inputs: [events], key: key, field: value}",
    },
    OperatorKind {
        name: "tumbling_window_count",
        role: Role::Keyed,
        stateful: true,
        summary: "Counts records per key in tumbling event-time windows of `size`, by the time in `timeField` (milliseconds). A window is emitted once the highest event time seen, less `allowedLateness`, passes its end, and at the end of the input; later events for an emitted window are dropped (counted in `weir_operator_records_dropped_total`). Its windows are keyed state with an event-time timer each, so they are checkpointed and split by key group when the job is rescaled.",
        emits: "the key field (text), `window_end` (integer, milliseconds), `count` (integer)",
        params: schema_of::<WindowSpec>,
        example: "{uid: per-minute, type: tumbling_window_count, inputs: [events], key: key, size: 1m}",
    },
    OperatorKind {
        name: "window",
        role: Role::Keyed,
        stateful: true,
        summary: "Tumbling, sliding or session windows per key, with any of count, sum, min, max and avg at once. Over event time (the watermark of its input, from its source's `eventTime`, or `timeField`): a window fires once the watermark passes its end; a record within `allowedLateness` after that updates it and it is emitted again; a later one is counted in `weir_operator_late_records_total` and dropped, or, with `lateOutput: <name>`, sent on as it came under that name, which other operators read as they would an operator's uid (`inputs: [<name>]`). Without `key`, one global window over every record, on one subtask. Without event time, over processing time. Its windows are keyed state with a timer each: checkpointed, restored and split by key group when the job is rescaled, so a window open across a savepoint fires once.",
        emits: "the key field (as its input holds it), `window_start` and `window_end` (integers, milliseconds), then `count` for `count: \"*\"` and `<function>_<field>` for the others (`sum_price`; avg a float)",
        params: schema_of::<WindowOpSpec>,
        example: "{uid: per-key, type: window, inputs: [events], key: key, kind: sliding, size: 10s, slide: 2s, aggregate: {count: '*', sum: value, max: value}, timeField: ts}",
    },
    OperatorKind {
        name: "window_top_n",
        role: Role::Keyed,
        stateful: true,
        summary: "The first `n` records of each window by `orderBy` (`order: desc`, the largest first, or `asc`), over the output of a `window` (as Flink SQL's window Top-N): records are partitioned by `window_end`, and a window's are emitted, ranked, once the watermark passes its end. Ties go by the records' other fields, so the result is the same at any parallelism. A record of a window it has emitted is late: counted in `weir_operator_late_records_total` and dropped.",
        emits: "its input's fields, then `rank` (1 for the first)",
        params: schema_of::<TopNSpec>,
        example: "{uid: top, type: window_top_n, inputs: [windows], orderBy: count, n: 3}",
    },
    OperatorKind {
        name: "window_join",
        role: Role::Keyed,
        stateful: true,
        summary: "Joins its two inputs in tumbling or sliding windows: each pair of records, one of each input, whose `keys` (one field per input) are equal and whose event times fall in the same window is emitted once the watermark (the least of both inputs') passes the window's end. Event time comes from `timeFields`, or the sources' `eventTime`; without either, processing time. A record of a window already joined is late: counted in `weir_operator_late_records_total` and dropped. Its windows are keyed state with a timer each, checkpointed and split by key group.",
        emits: "`window_start`, `window_end`, then the fields of the first input and of the second (a name both have as `<input>.<field>`)",
        params: schema_of::<WindowJoinSpec>,
        example: "{uid: j, type: window_join, inputs: [events, more], keys: [key, key], kind: tumbling, size: 10s}",
    },
    OperatorKind {
        name: "interval_join",
        role: Role::Keyed,
        stateful: true,
        summary: "Joins each record of its first input with the records of its second whose `keys` are equal and whose event time is within `[time + lowerBound, time + upperBound]` (as Flink's interval join). Each side is kept in keyed state until the watermark passes the last time a record of the other could join it. A record whose time the watermark has passed is late: counted in `weir_operator_late_records_total` and dropped.",
        emits: "the fields of the first input, then those of the second (a name both have as `<input>.<field>`)",
        params: schema_of::<IntervalJoinSpec>,
        example: "{uid: ij, type: interval_join, inputs: [events, more], keys: [key, key], lowerBound: -5s, upperBound: 5s}",
    },
    OperatorKind {
        name: "stdout",
        role: Role::Sink,
        stateful: false,
        summary: "Prints each record as a line of comma-separated values, or with `format: json` as a JSON object keyed by its field names (not exactly once: a restarted job prints again what followed its last checkpoint).",
        emits: "nothing",
        params: schema_of::<StdoutSpec>,
        example: "{uid: print, type: stdout, inputs: [counts], format: json}",
    },
    OperatorKind {
        name: "blackhole",
        role: Role::Sink,
        stateful: false,
        summary: "Drops every record (for benchmarks: the job's cost without a sink's).",
        emits: "nothing",
        params: schema_of::<NoParams>,
        example: "{uid: drop, type: blackhole, inputs: [counts]}",
    },
    OperatorKind {
        name: "file_sink",
        role: Role::Sink,
        stateful: true,
        summary: "Writes records as lines of comma-separated values, or with `format: json` as JSON objects keyed by the field names, into part files, committed when a checkpoint completes: the committed output holds each record exactly once.",
        emits: "nothing",
        params: schema_of::<FileSinkSpec>,
        example: "{uid: out, type: file_sink, inputs: [counts], path: s3://weir-data/out, format: json}",
    },
    OperatorKind {
        name: "kafka_sink",
        role: Role::Sink,
        stateful: true,
        summary: "Writes records to a Kafka topic (or the topic a field names), as JSON objects or comma-separated values, keyed by `key`. With `delivery: exactly-once` (the default) each subtask writes in a Kafka transaction per checkpoint, flushed at the barrier and committed when the checkpoint completes; a restored job commits what its checkpoint covered and aborts the rest. `at-least-once` flushes at each checkpoint; `none` waits for nothing.",
        emits: "nothing",
        params: schema_of::<KafkaSinkSpec>,
        example: "{uid: out, type: kafka_sink, inputs: [counts], topic: counts, key: word, bootstrapServers: \"kafka:9092\"}",
    },
];

/// The catalogue entry of `name`.
pub fn kind(name: &str) -> Option<&'static OperatorKind> {
    KINDS.iter().find(|k| k.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{OPERATOR_TYPES, SOURCE_TYPES, STATELESS_TYPES};

    #[test]
    fn the_lists_the_planner_and_the_rules_use_are_the_catalogues() {
        let names: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
        assert_eq!(names, OPERATOR_TYPES);
        let sources: Vec<&str> =
            KINDS.iter().filter(|k| k.role == Role::Source).map(|k| k.name).collect();
        assert_eq!(sources, SOURCE_TYPES);
        let stateless: Vec<&str> = KINDS.iter().filter(|k| !k.stateful).map(|k| k.name).collect();
        assert_eq!(stateless, STATELESS_TYPES);
    }

    #[test]
    fn a_parameter_named_like_a_schema_keyword_is_kept() {
        for (kind, param) in [
            ("generator", "format"),
            ("file_source", "format"),
            ("socket", "format"),
            ("stdout", "format"),
            ("file_sink", "format"),
            ("kafka_source", "format"),
            ("kafka_sink", "delivery"),
        ] {
            let schema = (super::kind(kind).unwrap().params)();
            let p = &schema["properties"][param];
            assert!(p["enum"].is_array() && p["description"].is_string(), "{kind}.{param}: {p}");
        }
    }

    #[test]
    fn every_example_plans_and_every_parameter_is_described() {
        for k in KINDS {
            let schema = (k.params)();
            let props = schema["properties"].as_object().cloned().unwrap_or_default();
            for (name, p) in &props {
                assert!(
                    p["description"].as_str().is_some_and(|d| !d.is_empty()),
                    "{}.{name} has no description: {p}",
                    k.name
                );
            }
            // The example, in a pipeline that feeds it (what the examples read: `lines`,
            // `words`, `counts`, `events` and `more` with event time, `windows`) and drains
            // whatever nobody reads.
            let uid = uid_of(k.example);
            let mut yaml = "pipeline:\n  operators:\n".to_string();
            if k.role != Role::Source {
                for (u, line) in [
                    (
                        "events",
                        "{uid: events, type: generator, format: kv, count: 10, eventTime: {field: ts, maxOutOfOrderness: 1s}}",
                    ),
                    (
                        "more",
                        "{uid: more, type: generator, format: kv, count: 10, seed: 2, eventTime: {field: ts, maxOutOfOrderness: 1s}}",
                    ),
                    ("lines", "{uid: lines, type: generator, count: 10}"),
                    ("words", "{uid: words, type: split, inputs: [lines]}"),
                    ("counts", "{uid: counts, type: count, inputs: [words], key: word}"),
                    (
                        "windows",
                        "{uid: windows, type: window, inputs: [events], key: key, kind: tumbling, size: 1s, aggregate: {count: '*'}}",
                    ),
                ] {
                    if u != uid {
                        yaml.push_str(&format!("    - {line}\n"));
                    }
                }
                for u in ["events", "more", "counts", "windows"] {
                    yaml.push_str(&format!(
                        "    - {{uid: drain-{u}, type: blackhole, inputs: [{u}]}}\n"
                    ));
                }
            }
            yaml.push_str(&format!("    - {}\n", k.example));
            if k.role != Role::Sink {
                yaml.push_str(&format!(
                    "    - {{uid: drained, type: blackhole, inputs: [{uid}]}}\n"
                ));
            }
            let spec: crate::StreamJobSpec = serde_saphyr::from_str(&yaml).unwrap();
            if let Err(e) = crate::plan::build(&spec, None, None) {
                panic!("the example of {} does not plan: {e}\n{yaml}", k.name);
            }
        }
    }

    fn uid_of(example: &str) -> &str {
        let rest = &example[example.find("uid: ").expect("a uid") + 5..];
        &rest[..rest.find(',').expect("a comma")]
    }
}
