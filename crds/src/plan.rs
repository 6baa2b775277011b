//! From a StreamJob's spec to a checked plan (shared by the runtime, which runs it, and the
//! controller, which refuses a plan that cannot run before it deploys anything): every operator's parameters parsed into the
//! typed form of its type, the fields each operator emits, and the checks that must pass
//! before anything starts (unknown types and parameters, key fields that do not exist,
//! parallelism above maxParallelism). Every error names the operator and the field.

use std::collections::BTreeMap;

use crate::streamjob::S3Spec;
use crate::{OperatorSpec, StorageUri, StreamJobSpec};
use schemars::JsonSchema;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A plan that cannot run; the message names the operator and the field. `weir run` exits 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PlanError {
    pub message: String,
    /// The uid of the operator at fault, when one is (the controller names its place in
    /// `spec.pipeline.operators`).
    pub uid: Option<String>,
}

impl PlanError {
    /// An error of the job as a whole.
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), uid: None }
    }

    fn of(uid: &str, message: String) -> Self {
        Self { message, uid: Some(uid.to_string()) }
    }
}

fn err(op: &OperatorSpec, msg: impl std::fmt::Display) -> PlanError {
    PlanError::of(&op.uid, format!("operator {:?} ({}): {msg}", op.uid, op.kind))
}

/// The operator types `weir` knows (the list lives in `weir-crds`, so that the controller
/// refuses an unknown type before it deploys anything).
pub use crate::pipeline::OPERATOR_TYPES;

/// Key distribution of the generator.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Distribution {
    #[default]
    Uniform,
    Zipf,
}

/// What the generator emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum GeneratorFormat {
    /// Text lines (field `line`) of `wordsPerLine` words `w<key>`.
    #[default]
    Text,
    /// Key/value records (fields `key`, `value`, `ts`).
    Kv,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GeneratorSpec {
    /// Seed of the deterministic sequence.
    #[serde(default)]
    pub seed: u64,
    /// Records in all (bounded); absent: unbounded.
    #[serde(default)]
    pub count: Option<u64>,
    /// Records per second for the whole source; absent: as fast as possible.
    #[serde(default)]
    pub rate_per_second: Option<f64>,
    /// Number of distinct keys (words).
    #[serde(default = "default_keys")]
    #[schemars(range(min = 1))]
    pub keys: u64,
    /// How keys are drawn: `uniform`, or `zipf` (a few keys take most records).
    #[serde(default)]
    pub distribution: Distribution,
    /// With `distribution: zipf`: its exponent, above 0 (1 is the classic Zipf law; higher is
    /// more skewed).
    #[serde(default = "default_zipf")]
    pub zipf_exponent: f64,
    /// `text` (lines of words) or `kv` (key/value records).
    #[serde(default)]
    pub format: GeneratorFormat,
    /// With `format: text`: words per line.
    #[serde(default = "default_words_per_line")]
    #[schemars(range(min = 1))]
    pub words_per_line: u32,
    /// Independent deterministic streams the records are spread over; each is one split,
    /// dealt round-robin to the subtasks. Fixed, so the data does not depend on parallelism.
    #[serde(default = "default_splits")]
    #[schemars(range(min = 1))]
    pub splits: u32,
    /// The records' event time and their watermark (absent: the source emits no watermark,
    /// and event-time timers and windows after it fire only at the end of the input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<EventTimeSpec>,
}

fn default_keys() -> u64 {
    1000
}
fn default_zipf() -> f64 {
    1.0
}
fn default_words_per_line() -> u32 {
    8
}
fn default_splits() -> u32 {
    8
}

/// A source's event time (`eventTime`): which field holds it, and how its watermark follows
/// it. Each split (a generator's stream, a file, a partition) keeps its own watermark, the
/// highest event time it has given less `maxOutOfOrderness`; the source emits the lowest over
/// its splits that are not idle.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventTimeSpec {
    /// The field holding each record's event time, in milliseconds since the epoch: an
    /// integer field (a JSON field of type `timestamp` reads RFC 3339 strings into one).
    pub field: String,
    /// How far behind the highest event time a record may come and still be on time: the
    /// watermark trails the highest event time a split has given by this much (and a
    /// millisecond).
    #[serde(default)]
    pub max_out_of_orderness: crate::Duration,
    /// A split that gives no record for this long stops holding the watermark back, until it
    /// gives one again; a subtask whose splits are all idle tells the operators after it to
    /// go on without it. Absent: a split holds the watermark back however long it is quiet.
    #[serde(default)]
    pub idle_timeout: Option<crate::Duration>,
}

/// How a source reads a line into a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// The line as it is, in the one text field `line`.
    #[default]
    Text,
    /// A JSON object per line, read into the fields `fields` names.
    Json,
    /// A `kafka_source`'s records as they are: fields `key`, `value` (text), `topic`,
    /// `partition`, `offset` and `timestamp` (epoch milliseconds).
    Raw,
}

/// The type of a field a source reads from a JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JsonType {
    /// A JSON string (a number is not one).
    String,
    /// A JSON integer within 64 bits (a number with a fraction is not one).
    Int,
    /// Any JSON number.
    Float,
    /// `true` or `false`.
    Bool,
    /// Epoch milliseconds (an integer) or an RFC 3339 string; the field holds the integer of
    /// epoch milliseconds.
    Timestamp,
}

impl JsonType {
    /// Every type, as a manifest names them.
    pub const NAMES: &'static [&'static str] = &["string", "int", "float", "bool", "timestamp"];

    /// What the field it reads holds.
    pub fn field_type(self) -> FieldType {
        match self {
            JsonType::String => FieldType::Text,
            JsonType::Int | JsonType::Timestamp => FieldType::Integer,
            JsonType::Float => FieldType::Float,
            JsonType::Bool => FieldType::Bool,
        }
    }
}

/// What a source does with a line that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The job fails, naming the operator, where the line is and what is wrong with it.
    #[default]
    Fail,
    /// The line is dropped and counted in `weir_operator_records_dropped_total`; the first
    /// few are logged with where they are.
    Skip,
    /// (`kafka_source` only.) The record goes, as it came, to `deadLetterTopic`, with what is
    /// wrong in its header `weir.error` and where it was in `weir.topic`, `weir.partition` and
    /// `weir.offset`; it is counted in `weir_operator_records_dropped_total`. The dead letters
    /// are flushed at each checkpoint: after a failure some may be written twice.
    #[serde(rename = "deadLetter")]
    DeadLetter,
}

/// How a sink writes a record as a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum SinkFormat {
    /// The values joined by commas, as they are (no quoting).
    #[default]
    Csv,
    /// A JSON object per line, keyed by the input's field names.
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSourceSpec {
    /// A local directory or an S3 prefix; every file under it, one record per line.
    pub path: StorageUri,
    /// Lines per second for the whole source, above 0; absent: as fast as possible.
    #[serde(default)]
    pub rate_per_second: Option<f64>,
    /// The records' event time and their watermark (absent: the source emits no watermark,
    /// and event-time timers and windows after it fire only at the end of the input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<EventTimeSpec>,
    /// How a line becomes a record: `text` (the line as the one text field `line`) or `json`
    /// (an object per line, read into the fields `fields` names).
    #[serde(default)]
    pub format: SourceFormat,
    /// With `format: json` (and only then): the fields to read, `{name: type}`, each type one
    /// of `string`, `int`, `float`, `bool`, `timestamp` (epoch milliseconds, or an RFC 3339
    /// string, read as an integer of epoch milliseconds). A dotted name in quotes,
    /// `"bid.price": int`, reads `price` in the object `bid` into the field `bid.price`. The
    /// record's fields are in the names' sorted order. A missing field, a `null` or a value
    /// of another type makes the line one that does not parse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<BTreeMap<String, JsonType>>,
    /// A line that does not parse (JSON that is not an object of `fields`, bytes that are not
    /// UTF-8, a line longer than 16 MiB): `fail` the job, naming the file and line, or `skip`
    /// it (counted in `weir_operator_records_dropped_total`, the first 5 of each subtask
    /// logged).
    #[serde(default)]
    pub on_error: OnError,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SocketSpec {
    /// The host to connect to (the source is a TCP client; subtask 0 reads, one line per
    /// record).
    pub host: String,
    /// Its port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// The records' event time and their watermark (absent: the source emits no watermark,
    /// and event-time timers and windows after it fire only at the end of the input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<EventTimeSpec>,
    /// How a line becomes a record: `text` (the line as the one text field `line`) or `json`
    /// (an object per line, read into the fields `fields` names).
    #[serde(default)]
    pub format: SourceFormat,
    /// With `format: json` (and only then): the fields to read, `{name: type}`, as a
    /// `file_source` reads them (types `string`, `int`, `float`, `bool`, `timestamp`; a dotted
    /// name in quotes reads into a nested object; the fields in the names' sorted order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<BTreeMap<String, JsonType>>,
    /// A line that does not parse: `fail` the job, naming the line's number since the
    /// connection opened, or `skip` it (counted in `weir_operator_records_dropped_total`, the
    /// first 5 logged).
    #[serde(default)]
    pub on_error: OnError,
}

/// How a source turns its lines into records: the `format`, `fields` and `onError` of a
/// `file_source` or a `socket`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LineFormat<'a> {
    pub format: SourceFormat,
    pub fields: Option<&'a BTreeMap<String, JsonType>>,
    pub on_error: OnError,
}

impl FileSourceSpec {
    pub fn line_format(&self) -> LineFormat<'_> {
        LineFormat { format: self.format, fields: self.fields.as_ref(), on_error: self.on_error }
    }
}

impl SocketSpec {
    pub fn line_format(&self) -> LineFormat<'_> {
        LineFormat { format: self.format, fields: self.fields.as_ref(), on_error: self.on_error }
    }
}

impl LineFormat<'_> {
    /// The fields of the records it makes, with what each holds.
    pub fn output(&self) -> Vec<(String, FieldType)> {
        match (self.format, self.fields) {
            (SourceFormat::Raw, _) => {
                crate::kafka::RAW_FIELDS.iter().map(|(name, t)| (name.to_string(), *t)).collect()
            }
            (SourceFormat::Json, Some(fields)) => {
                fields.iter().map(|(name, t)| (name.clone(), t.field_type())).collect()
            }
            _ => vec![("line".into(), FieldType::Text)],
        }
    }

    /// `fields` with `format: json` only, each name a field or a dotted path, none inside
    /// another.
    fn check(&self) -> Result<(), String> {
        let fields = match (self.format, self.fields) {
            (SourceFormat::Text | SourceFormat::Raw, None) => return Ok(()),
            (SourceFormat::Raw, Some(_)) => {
                return Err("fields is read only with format: json (format: raw gives key, value, topic, partition, offset and timestamp)".into());
            }
            (SourceFormat::Text, Some(_)) => {
                return Err(
                    "fields is read only with format: json: set format: json, or leave fields out (format: text gives the one field `line`)".into(),
                );
            }
            (SourceFormat::Json, None) => {
                return Err(
                    "format: json needs fields: name the fields to read and their types, e.g. fields: {id: int, name: string}".into(),
                );
            }
            (SourceFormat::Json, Some(f)) => f,
        };
        if fields.is_empty() {
            return Err("fields is empty: name the fields to read and their types".into());
        }
        for name in fields.keys() {
            if name.split('.').any(str::is_empty) {
                return Err(format!(
                    "fields: {name:?} is not a field name or a dotted path (`bid.price`): no part of it may be empty"
                ));
            }
            // `bid` and `bid.price`: `bid` would be an object, which no type reads.
            if let Some(outer) = fields.keys().find(|o| {
                name.len() > o.len()
                    && name.starts_with(o.as_str())
                    && name.as_bytes()[o.len()] == b'.'
            }) {
                return Err(format!(
                    "fields: {outer:?} is on the path of {name:?}, so it would be an object, which none of the types reads: leave one of them out"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SplitSpec {
    /// The text field to split on white space.
    #[serde(default = "default_line")]
    pub field: String,
    /// The field each word goes to.
    #[serde(default = "default_word")]
    pub output: String,
}

fn default_line() -> String {
    "line".into()
}
fn default_word() -> String {
    "word".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MapSpec {
    /// Fields to keep, in this order (absent: all).
    #[serde(default)]
    pub select: Option<Vec<String>>,
    /// Fields to set: a template where `{field}` stands for a field's value.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Fields to upper-case.
    #[serde(default)]
    pub upper: Vec<String>,
    /// Fields to lower-case.
    #[serde(default)]
    pub lower: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterSpec {
    /// The field the conditions test; a record passes when it meets every condition given.
    pub field: String,
    /// Passes a value equal to this text or number.
    #[serde(default)]
    pub equals: Option<serde_json::Value>,
    /// Passes a value other than this text or number.
    #[serde(default)]
    pub not_equals: Option<serde_json::Value>,
    /// Passes text that contains this.
    #[serde(default)]
    pub contains: Option<String>,
    /// Passes a number (or text that reads as one) above this.
    #[serde(default)]
    pub greater_than: Option<f64>,
    /// Passes a number (or text that reads as one) below this.
    #[serde(default)]
    pub less_than: Option<f64>,
    /// Passes text of at least this many characters.
    #[serde(default)]
    pub min_length: Option<usize>,
}

/// Passes records on at no more than `ratePerSecond` per subtask (a deliberately slow
/// stage: to try backpressure and unaligned checkpoints).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ThrottleSpec {
    /// Records per second and subtask, above 0.
    pub rate_per_second: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyedSpec {
    /// The field records are keyed by.
    pub key: String,
    /// The numeric field aggregated (sum, min, max).
    #[serde(default)]
    pub field: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WindowSpec {
    /// The field records are keyed by (kept as text in the output).
    pub key: String,
    /// Field holding the event time in milliseconds.
    #[serde(default = "default_ts")]
    pub time_field: String,
    /// Window length.
    pub size: crate::Duration,
    /// How late (behind the highest event time seen) an event may be.
    #[serde(default)]
    pub allowed_lateness: crate::Duration,
}

/// The kind of a `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// Windows of `size` one after the other.
    Tumbling,
    /// Windows of `size` starting every `slide` (a record is in `size / slide` of them).
    Sliding,
    /// A window per burst of a key's records: it ends `gap` after its last record.
    Session,
}

/// One field, or several.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(untagged)]
pub enum FieldNames {
    One(String),
    Many(Vec<String>),
}

impl FieldNames {
    pub fn names(&self) -> Vec<&str> {
        match self {
            FieldNames::One(f) => vec![f.as_str()],
            FieldNames::Many(fs) => fs.iter().map(String::as_str).collect(),
        }
    }
}

/// An aggregate function of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum AggregateFn {
    Count,
    Sum,
    Min,
    Max,
    Avg,
}

impl AggregateFn {
    pub fn name(self) -> &'static str {
        match self {
            AggregateFn::Count => "count",
            AggregateFn::Sum => "sum",
            AggregateFn::Min => "min",
            AggregateFn::Max => "max",
            AggregateFn::Avg => "avg",
        }
    }
}

/// What a window computes: each function given, over the fields it names. The output has
/// them in this order: `count`, then `sum_<field>`, `min_<field>`, `max_<field>`,
/// `avg_<field>` for each field in the order given.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Aggregates {
    /// `"*"`: the number of records, as the field `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<String>,
    /// The sum of a numeric field (or a list of them): `sum_<field>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sum: Option<FieldNames>,
    /// The smallest value: `min_<field>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<FieldNames>,
    /// The largest value: `max_<field>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<FieldNames>,
    /// The mean, a float: `avg_<field>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avg: Option<FieldNames>,
}

impl Aggregates {
    /// Each aggregate in output order, with its field (`None` for `count`).
    pub fn list(&self) -> Vec<(AggregateFn, Option<&str>)> {
        let mut out = Vec::new();
        if self.count.is_some() {
            out.push((AggregateFn::Count, None));
        }
        for (f, names) in [
            (AggregateFn::Sum, &self.sum),
            (AggregateFn::Min, &self.min),
            (AggregateFn::Max, &self.max),
            (AggregateFn::Avg, &self.avg),
        ] {
            for n in names.iter().flat_map(|n| n.names()) {
                out.push((f, Some(n)));
            }
        }
        out
    }
}

/// A `window`: tumbling, sliding or session windows per key, with aggregates.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WindowOpSpec {
    /// The field records are keyed by: each key has its windows. Absent: one window over
    /// all records (a global window), kept by one subtask whatever the parallelism.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `tumbling`, `sliding` or `session`.
    pub kind: WindowKind,
    /// The length of a tumbling or sliding window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<crate::Duration>,
    /// How often a sliding window starts: at most `size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slide: Option<crate::Duration>,
    /// A session window ends this long after its last record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<crate::Duration>,
    /// What each window emits, e.g. `{count: "*", sum: price, max: price}`.
    pub aggregate: Aggregates,
    /// How long after a window fired records of it are still taken (each updates the window
    /// and emits it again); after that they are late: dropped and counted.
    #[serde(default)]
    pub allowed_lateness: crate::Duration,
    /// The field of the event time, in milliseconds. Absent: the event-time field its source
    /// declares (`eventTime.field`), when the operators between keep it; with neither, the
    /// windows follow processing time (the wall clock when a record arrives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_field: Option<String>,
    /// Where records later than the allowed lateness go, as they came: a name other
    /// operators read in their `inputs` as they would a uid. Absent: they are dropped (and
    /// counted either way, in `weir_operator_late_records_total`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_output: Option<String>,
}

/// A `window_top_n`: the first `n` records of each window of its input (a window's output),
/// by `orderBy`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TopNSpec {
    /// How many records of each window it emits (ties are ordered by the records' other
    /// fields, so the choice is the same at every parallelism and after every restore).
    #[serde(default = "default_n")]
    pub n: u32,
    /// The numeric field it ranks by, e.g. `count`.
    pub order_by: String,
    /// `desc` (the largest first, the default) or `asc`.
    #[serde(default)]
    pub order: SortOrder,
}

fn default_n() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SortOrder {
    #[default]
    Desc,
    Asc,
}

/// A `window_join`: the pairs of records of its two inputs with equal keys in each window.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WindowJoinSpec {
    /// One key field per input, in the order of `inputs`: records whose keys are equal join.
    pub keys: Vec<String>,
    /// `tumbling` or `sliding`.
    pub kind: WindowKind,
    /// The length of a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<crate::Duration>,
    /// How often a sliding window starts: at most `size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slide: Option<crate::Duration>,
    /// The event-time field of each input, in milliseconds. Absent: the ones the inputs'
    /// sources declare (`eventTime.field`); with none, the windows follow processing time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_fields: Option<Vec<String>>,
}

/// An `interval_join`: each record of the first input with the records of the second of the
/// same key whose event time is within `[time + lowerBound, time + upperBound]`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IntervalJoinSpec {
    /// One key field per input, in the order of `inputs`.
    pub keys: Vec<String>,
    /// The earliest a record of the second input may be, relative to one of the first
    /// (`-5s`: up to 5 s before it).
    pub lower_bound: crate::duration::Offset,
    /// The latest, relative to a record of the first input (at least `lowerBound`).
    pub upper_bound: crate::duration::Offset,
    /// The event-time field of each input, in milliseconds. Absent: the ones the inputs'
    /// sources declare (`eventTime.field`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_fields: Option<Vec<String>>,
}

fn default_ts() -> String {
    "ts".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSinkSpec {
    /// A local directory or an S3 prefix: part files are written as records arrive and
    /// committed (renamed into place, or the multipart upload completed) when a checkpoint
    /// completes, so that the committed output holds each record exactly once.
    pub path: StorageUri,
    /// How a record is written: `csv` (its values joined by commas, unquoted) or `json` (an
    /// object per line keyed by the input's field names, a dotted name such as `bid.price`
    /// as that one flat key; a float that is not finite as `null`).
    #[serde(default)]
    pub format: SinkFormat,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StdoutSpec {
    /// How a record is printed: `csv` (its values joined by commas, unquoted) or `json` (an
    /// object per line keyed by the input's field names, a dotted name as that one flat key;
    /// a float that is not finite as `null`).
    #[serde(default)]
    pub format: SinkFormat,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NoParams {}

/// The kind of aggregation of a keyed operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Aggregate {
    Count,
    Sum,
    Min,
    Max,
}

/// An operator's type with its parsed parameters.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub enum OpKind {
    Generator(GeneratorSpec),
    FileSource(FileSourceSpec),
    Socket(SocketSpec),
    KafkaSource(crate::kafka::KafkaSourceSpec),
    Split(SplitSpec),
    Map(MapSpec),
    Filter(FilterSpec),
    Throttle(ThrottleSpec),
    Keyed {
        aggregate: Aggregate,
        key: String,
        field: Option<String>,
    },
    TumblingWindowCount(WindowSpec),
    Window(WindowOpSpec),
    WindowTopN(TopNSpec),
    WindowJoin(WindowJoinSpec),
    IntervalJoin(IntervalJoinSpec),
    Stdout(StdoutSpec),
    Blackhole,
    FileSink(FileSinkSpec),
    KafkaSink(crate::kafka::KafkaSinkSpec),
    /// The records a window (`of`) found later than its allowed lateness, under the name its
    /// `lateOutput` gives: the planner adds it after the window, chained to it.
    LateOutput {
        of: String,
    },
    /// A type of the job's binary's own (registered with the runtime's registry, or, for the
    /// controller, one the image's binary is trusted to know): its parameters as the manifest
    /// gives them, checked by the extension that planned it.
    Custom(Custom),
}

/// An operator of a type that is not built in, as its [`Extensions`] planned it.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct Custom {
    /// The parameters (every key of the operator beside `uid`, `type` and `inputs`).
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The field records are partitioned by on the way in (a keyed operator), if any.
    pub key: Option<String>,
}

/// What an [`Extensions`] says of an operator of one of its types.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// The fields of the records it emits, with what each holds; `None` when they are not
    /// known here (the controller, planning a type of the job's image: the operators after it
    /// are checked when the job starts).
    pub output: Option<Vec<(String, FieldType)>>,
    /// The input field it is keyed by, if it is keyed.
    pub key: Option<String>,
}

/// The fields an operator's input emits, when the planner knows them.
#[derive(Debug, Clone, Copy)]
pub struct InputFields<'a> {
    pub fields: &'a [String],
    pub types: &'a [FieldType],
}

impl InputFields<'_> {
    /// The position of field `name`, or an error that lists the fields there are.
    pub fn position(&self, name: &str, what: &str) -> Result<usize, String> {
        self.fields.iter().position(|f| f == name).ok_or_else(|| {
            format!(
                "{what} {name:?} is not a field of its input (fields: {})",
                self.fields.join(", ")
            )
        })
    }
}

/// Operator types beside the built-in ones: the runtime's registry of a user's own operators.
/// The planner asks it about every type that is not built in.
pub trait Extensions: Sync {
    /// Its types, for the message that lists the known ones.
    fn names(&self) -> Vec<String>;

    /// Whether `kind` is one of its types.
    fn knows(&self, kind: &str) -> bool;

    /// Plans operator `op` of one of its types: parses and checks its parameters against its
    /// input's fields (`None` when they are not known here). `None` when the type is not one
    /// of its own; an error names what is wrong (the planner adds the operator).
    fn plan(
        &self,
        op: &OperatorSpec,
        input: Option<InputFields<'_>>,
    ) -> Option<Result<Planned, String>>;
}

/// No types beside the built-in ones.
#[derive(Debug, Clone, Copy)]
pub struct BuiltinOnly;

impl Extensions for BuiltinOnly {
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
    fn knows(&self, _: &str) -> bool {
        false
    }
    fn plan(
        &self,
        _: &OperatorSpec,
        _: Option<InputFields<'_>>,
    ) -> Option<Result<Planned, String>> {
        None
    }
}

/// Every type that is not built in passes, with fields not known: what the controller checks
/// of a job that names its own image (its binary may register types of its own, and checks
/// them, and the operators after them, when the job starts).
#[derive(Debug, Clone, Copy)]
pub struct ImageTypes;

impl Extensions for ImageTypes {
    fn names(&self) -> Vec<String> {
        vec!["a type the job's image registers".into()]
    }
    fn knows(&self, _: &str) -> bool {
        true
    }
    fn plan(
        &self,
        _: &OperatorSpec,
        _: Option<InputFields<'_>>,
    ) -> Option<Result<Planned, String>> {
        Some(Ok(Planned { output: None, key: None }))
    }
}

impl OpKind {
    pub fn is_source(&self) -> bool {
        matches!(
            self,
            OpKind::Generator(_)
                | OpKind::FileSource(_)
                | OpKind::Socket(_)
                | OpKind::KafkaSource(_)
        )
    }
    pub fn is_sink(&self) -> bool {
        matches!(
            self,
            OpKind::Stdout(_) | OpKind::Blackhole | OpKind::FileSink(_) | OpKind::KafkaSink(_)
        )
    }
    /// All its records go to one subtask (a window without a key): the one that owns the
    /// key group of the empty key.
    pub fn is_global(&self) -> bool {
        matches!(self, OpKind::Window(w) if w.key.is_none())
    }

    /// Records are partitioned on the way into it, by a key field or to one subtask: it has
    /// keyed state.
    pub fn is_partitioned(&self) -> bool {
        self.key_field().is_some() || self.is_global()
    }

    /// A join of two inputs, keyed by a field of each.
    pub fn join_keys(&self) -> Option<&[String]> {
        match self {
            OpKind::WindowJoin(j) => Some(&j.keys),
            OpKind::IntervalJoin(j) => Some(&j.keys),
            _ => None,
        }
    }

    /// A source's event time, when it declares one.
    pub fn event_time(&self) -> Option<&EventTimeSpec> {
        match self {
            OpKind::Generator(g) => g.event_time.as_ref(),
            OpKind::FileSource(f) => f.event_time.as_ref(),
            OpKind::Socket(s) => s.event_time.as_ref(),
            OpKind::KafkaSource(k) => k.event_time.as_ref(),
            _ => None,
        }
    }
    /// The field records are partitioned by on the way into this operator.
    pub fn key_field(&self) -> Option<&str> {
        match self {
            OpKind::Keyed { key, .. } => Some(key),
            OpKind::TumblingWindowCount(w) => Some(&w.key),
            OpKind::Window(w) => w.key.as_deref(),
            OpKind::WindowTopN(_) => Some("window_end"),
            OpKind::WindowJoin(j) => j.keys.first().map(String::as_str),
            OpKind::IntervalJoin(j) => j.keys.first().map(String::as_str),
            OpKind::Custom(c) => c.key.as_deref(),
            _ => None,
        }
    }
}

/// What a field of an operator's records holds, as far as the plan can tell from the
/// operators before it. Records that come over the exchange (or back from a checkpoint's
/// in-flight records) are checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum FieldType {
    Text,
    Integer,
    Float,
    /// `true` or `false`.
    Bool,
    /// An integer or a float (a sum of values that may be either).
    Number,
    /// Anything (inputs that disagree).
    Any,
}

/// The kinds of value a record's field can hold (the runtime's values, seen by their kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Text,
    Integer,
    Float,
    Bool,
}

impl ValueKind {
    /// How messages name it.
    pub fn describe(self) -> &'static str {
        match self {
            ValueKind::Text => "text",
            ValueKind::Integer => "an integer",
            ValueKind::Float => "a float",
            ValueKind::Bool => "a boolean",
        }
    }
}

impl FieldType {
    /// Whether a value of kind `v` is of this type.
    pub fn admits(self, v: ValueKind) -> bool {
        matches!(
            (self, v),
            (FieldType::Any, _)
                | (FieldType::Text, ValueKind::Text)
                | (FieldType::Integer, ValueKind::Integer)
                | (FieldType::Float, ValueKind::Float)
                | (FieldType::Bool, ValueKind::Bool)
                | (FieldType::Number, ValueKind::Integer | ValueKind::Float)
        )
    }

    /// The type of a field fed by inputs of types `self` and `other`.
    fn merge(self, other: FieldType) -> FieldType {
        use FieldType::*;
        match (self, other) {
            (a, b) if a == b => a,
            (Integer | Float | Number, Integer | Float | Number) => Number,
            _ => Any,
        }
    }

    /// How messages name it.
    pub fn describe(self) -> &'static str {
        match self {
            FieldType::Text => "text",
            FieldType::Integer => "an integer",
            FieldType::Float => "a float",
            FieldType::Bool => "a boolean",
            FieldType::Number => "a number",
            FieldType::Any => "any value",
        }
    }
}

/// One operator of the plan.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct PlanOp {
    pub uid: String,
    /// The `type` of the manifest, e.g. `count`.
    pub type_name: String,
    pub kind: OpKind,
    /// Indexes (in `Plan::ops`) of the inputs.
    pub inputs: Vec<usize>,
    /// The fields of the records it emits, in order.
    pub fields: Vec<String>,
    /// What each of `fields` holds.
    pub types: Vec<FieldType>,
    /// For each input, the position of the key field in that input's records.
    pub key_positions: Vec<usize>,
    /// Whether `fields` and `types` are known: false after an operator of the job's image
    /// that the controller cannot plan ([`ImageTypes`]); a runtime's plan knows them all.
    pub fields_known: bool,
}

/// A checked job: what the coordinator builds once and hands its workers, which check it
/// ([`verify`]) and run it.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// In topological order: every operator after its inputs.
    pub ops: Vec<PlanOp>,
    pub parallelism: u32,
    pub max_parallelism: u32,
    /// The job's S3 settings (`spec.s3`), for operators that read or write S3.
    pub s3: Option<S3Spec>,
    /// Where its keyed state lives (`spec.stateBackend`).
    pub state_backend: crate::streamjob::StateBackendKind,
}

impl Plan {
    /// Whether an operator reads or writes S3 (the run then needs an S3 client).
    pub fn uses_s3(&self) -> bool {
        self.ops.iter().any(|o| match &o.kind {
            OpKind::FileSource(FileSourceSpec { path, .. })
            | OpKind::FileSink(FileSinkSpec { path, .. }) => matches!(path, StorageUri::S3 { .. }),
            _ => false,
        })
    }
}

fn parse<T: DeserializeOwned>(op: &OperatorSpec) -> Result<T, PlanError> {
    let obj = serde_json::Value::Object(op.params.clone().into_iter().collect());
    serde_json::from_value(obj).map_err(|e| err(op, e))
}

/// The late output of window `op` (planned last, at the end of `ops`), when it has one: the
/// window's input records, read by the operators that name it.
fn push_late_output(
    ops: &mut Vec<PlanOp>,
    op: &OperatorSpec,
    fields: Vec<String>,
    types: Vec<FieldType>,
    fields_known: bool,
) {
    let Some(name) = &op.late_output else { return };
    ops.push(PlanOp {
        uid: name.clone(),
        type_name: LATE_OUTPUT.to_string(),
        kind: OpKind::LateOutput { of: op.uid.clone() },
        inputs: vec![ops.len() - 1],
        fields,
        types,
        key_positions: Vec::new(),
        fields_known,
    });
}

/// The type name of a window's late output in a plan (no type a manifest can name).
pub const LATE_OUTPUT: &str = "late_output";

/// A source's `eventTime.field` is one of its fields, and holds integers (milliseconds).
fn check_event_time(
    op: &OperatorSpec,
    et: &EventTimeSpec,
    fields: &[String],
    types: &[FieldType],
) -> Result<(), PlanError> {
    let Some(i) = fields.iter().position(|f| *f == et.field) else {
        return Err(err(
            op,
            format!(
                "eventTime.field {:?} is not a field of its records (fields: {})",
                et.field,
                fields.join(", ")
            ),
        ));
    };
    if types[i] != FieldType::Integer {
        return Err(err(
            op,
            format!(
                "eventTime.field {:?} holds {}, not milliseconds since the epoch: give it an integer field (with format: json, declare it int, or timestamp for RFC 3339 text)",
                et.field,
                types[i].describe()
            ),
        ));
    }
    if et.idle_timeout.is_some_and(|d| d.is_zero()) {
        return Err(err(
            op,
            "eventTime.idleTimeout must be more than 0s (leave it out for splits that are never idle)",
        ));
    }
    Ok(())
}

/// Parameter `name`, when given, is one of `choices`: said with the parameter's name, which
/// serde's own message leaves out.
fn check_choice(op: &OperatorSpec, name: &str, choices: &[&str]) -> Result<(), PlanError> {
    match op.params.get(name) {
        Some(v) if !v.as_str().is_some_and(|s| choices.contains(&s)) => Err(err(
            op,
            format!("{name} {v} is not one of {}: use one of them", choices.join(", ")),
        )),
        _ => Ok(()),
    }
}

/// The `format`, `fields` and `onError` of a source, as given: each a known value, and each
/// field's type one of [`JsonType::NAMES`], said with the field's name.
fn check_line_format_params(op: &OperatorSpec) -> Result<(), PlanError> {
    check_choice(op, "format", &["text", "json"])?;
    check_choice(op, "onError", &["fail", "skip"])?;
    match op.params.get("fields") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(fields)) => {
            for (name, t) in fields {
                if !t.as_str().is_some_and(|t| JsonType::NAMES.contains(&t)) {
                    return Err(err(
                        op,
                        format!(
                            "fields.{name}: {t} is not a type: use one of {}",
                            JsonType::NAMES.join(", ")
                        ),
                    ));
                }
            }
        }
        Some(other) => {
            return Err(err(
                op,
                format!(
                    "fields {other} is not a map of field names to types, e.g. fields: {{id: int, name: string}}"
                ),
            ));
        }
    }
    Ok(())
}

/// A `window`'s parameters, checked, with its event-time field (`timeField`, or else the one
/// its input carries, `time_of_input`; neither: processing time).
fn plan_window(op: &OperatorSpec, time_of_input: Option<&str>) -> Result<WindowOpSpec, PlanError> {
    let mut w: WindowOpSpec = parse(op)?;
    let given = |d: Option<crate::Duration>, name: &str| match d {
        Some(d) if d.is_zero() => Err(err(op, format!("{name} must be more than 0s"))),
        Some(_) => Ok(true),
        None => Ok(false),
    };
    let (size, slide, gap) =
        (given(w.size, "size")?, given(w.slide, "slide")?, given(w.gap, "gap")?);
    let kind = match w.kind {
        WindowKind::Tumbling => "tumbling",
        WindowKind::Sliding => "sliding",
        WindowKind::Session => "session",
    };
    match w.kind {
        WindowKind::Tumbling | WindowKind::Sliding if !size => {
            return Err(err(op, format!("size is missing: a {kind} window needs its length")));
        }
        WindowKind::Sliding if !slide => {
            return Err(err(op, "slide is missing: a sliding window needs how often one starts"));
        }
        WindowKind::Sliding if w.slide > w.size => {
            return Err(err(
                op,
                format!(
                    "slide {} is larger than size {}: windows would leave gaps (use a slide at most the size)",
                    w.slide.unwrap_or_default(),
                    w.size.unwrap_or_default()
                ),
            ));
        }
        WindowKind::Tumbling if slide => {
            return Err(err(
                op,
                "slide is not a parameter of a tumbling window (use kind: sliding)",
            ));
        }
        WindowKind::Session if !gap => {
            return Err(err(op, "gap is missing: a session window ends gap after its last record"));
        }
        WindowKind::Session if size || slide => {
            return Err(err(
                op,
                "size and slide are not parameters of a session window (it has gap)",
            ));
        }
        WindowKind::Tumbling | WindowKind::Sliding if gap => {
            return Err(err(
                op,
                format!("gap is not a parameter of a {kind} window (use kind: session)"),
            ));
        }
        _ => {}
    }
    if w.aggregate.list().is_empty() {
        return Err(err(op, "aggregate is empty: give at least one of count, sum, min, max, avg"));
    }
    if w.aggregate.count.as_deref().is_some_and(|c| c != "*") {
        return Err(err(op, "aggregate.count counts records: write count: \"*\""));
    }
    if w.time_field.is_none() {
        w.time_field = time_of_input.map(str::to_string);
    }
    w.late_output = op.late_output.clone();
    Ok(w)
}

/// The fields a `window` emits: its key (as its input has it), `window_start`, `window_end`
/// (milliseconds), then one per aggregate; every field it names checked against its input.
pub fn window_output(
    w: &WindowOpSpec,
    fields: &[String],
    types: &[FieldType],
) -> Result<Vec<(String, FieldType)>, String> {
    let input = InputFields { fields, types };
    if let Some(t) = &w.time_field {
        let i = input.position(t, "timeField")?;
        if !matches!(types[i], FieldType::Integer | FieldType::Any) {
            return Err(format!(
                "timeField {t:?} holds {}, not milliseconds since the epoch",
                types[i].describe()
            ));
        }
    }
    let mut out = Vec::new();
    if let Some(key) = &w.key {
        out.push((key.clone(), types[input.position(key, "key")?]));
    }
    out.push(("window_start".to_string(), FieldType::Integer));
    out.push(("window_end".to_string(), FieldType::Integer));
    for (f, field) in w.aggregate.list() {
        let Some(field) = field else {
            out.push(("count".into(), FieldType::Integer));
            continue;
        };
        let t = types[input.position(field, &format!("aggregate.{}", f.name()))?];
        if !matches!(t, FieldType::Integer | FieldType::Float | FieldType::Number | FieldType::Any)
        {
            return Err(format!(
                "aggregate.{} {field:?}: the field holds {}, not numbers",
                f.name(),
                t.describe()
            ));
        }
        let ty = match f {
            AggregateFn::Avg => FieldType::Float,
            // An integer sum that overflows goes on as a float.
            AggregateFn::Sum if t == FieldType::Integer => FieldType::Number,
            _ => t,
        };
        out.push((format!("{}_{field}", f.name()), ty));
    }
    Ok(out)
}

/// A join's `keys` (one per input) and `timeFields` as given, or else the event-time fields
/// its inputs carry (`times`, one per input; a join on processing time when none does).
fn join_fields(
    op: &OperatorSpec,
    keys: &[String],
    time_fields: &mut Option<Vec<String>>,
    times: &[Option<String>],
) -> Result<(), PlanError> {
    if keys.len() != times.len() {
        return Err(err(
            op,
            format!(
                "keys names {} field(s) for its {} inputs: give one key field per input, in the order of inputs",
                keys.len(),
                times.len()
            ),
        ));
    }
    match time_fields {
        Some(t) if t.len() != times.len() => Err(err(
            op,
            format!(
                "timeFields names {} field(s) for its {} inputs: give one per input, in the order of inputs",
                t.len(),
                times.len()
            ),
        )),
        Some(_) => Ok(()),
        None => match times {
            [Some(a), Some(b)] => {
                *time_fields = Some(vec![a.clone(), b.clone()]);
                Ok(())
            }
            [None, None] => Ok(()),
            _ => Err(err(
                op,
                format!(
                    "input {:?} carries event time and input {:?} does not: declare eventTime on the sources of both, or give timeFields",
                    op.inputs[if times[0].is_some() { 0 } else { 1 }],
                    op.inputs[if times[0].is_some() { 1 } else { 0 }],
                ),
            )),
        },
    }
}

fn plan_window_join(
    op: &OperatorSpec,
    times: &[Option<String>],
) -> Result<WindowJoinSpec, PlanError> {
    let mut j: WindowJoinSpec = parse(op)?;
    join_fields(op, &j.keys, &mut j.time_fields, times)?;
    let size = match j.size {
        None => {
            return Err(err(op, "size is missing: a window join needs the length of its windows"));
        }
        Some(d) if d.is_zero() => return Err(err(op, "size must be more than 0s")),
        Some(d) => d,
    };
    match (j.kind, j.slide) {
        (WindowKind::Session, _) => {
            return Err(err(
                op,
                "kind session is not a kind of window_join: use tumbling or sliding",
            ));
        }
        (WindowKind::Tumbling, Some(_)) => {
            return Err(err(
                op,
                "slide is not a parameter of a tumbling window (use kind: sliding)",
            ));
        }
        (WindowKind::Sliding, None) => {
            return Err(err(op, "slide is missing: a sliding window needs how often one starts"));
        }
        (WindowKind::Sliding, Some(s)) if s.is_zero() => {
            return Err(err(op, "slide must be more than 0s"));
        }
        (WindowKind::Sliding, Some(s)) if s > size => {
            return Err(err(
                op,
                format!(
                    "slide {s} is larger than size {size}: windows would leave gaps (use a slide at most the size)"
                ),
            ));
        }
        _ => {}
    }
    Ok(j)
}

fn plan_interval_join(
    op: &OperatorSpec,
    times: &[Option<String>],
) -> Result<IntervalJoinSpec, PlanError> {
    let mut j: IntervalJoinSpec = parse(op)?;
    join_fields(op, &j.keys, &mut j.time_fields, times)?;
    if j.time_fields.is_none() {
        return Err(err(
            op,
            "an interval join is on event time, and its inputs carry none: declare eventTime on their sources, or give timeFields",
        ));
    }
    if j.lower_bound > j.upper_bound {
        return Err(err(
            op,
            format!(
                "lowerBound {} is above upperBound {}: no record could join",
                j.lower_bound, j.upper_bound
            ),
        ));
    }
    Ok(j)
}

/// The fields a join emits: `window_start` and `window_end` for a window join, then the
/// fields of its first input and of its second; a name both have is given as
/// `<input>.<field>` on both sides. Its keys must hold the same kind of values, and its time
/// fields integers.
fn join_output(
    op: &OperatorSpec,
    kind: &OpKind,
    inputs: &[usize],
    ops: &[PlanOp],
) -> Result<Vec<(String, FieldType)>, PlanError> {
    let (keys, time_fields, windowed) = match kind {
        OpKind::WindowJoin(j) => (&j.keys, &j.time_fields, true),
        OpKind::IntervalJoin(j) => (&j.keys, &j.time_fields, false),
        _ => return Ok(Vec::new()),
    };
    let (l, r) = (&ops[inputs[0]], &ops[inputs[1]]);
    let mut key_types = Vec::new();
    for (side, (input, key)) in [l, r].into_iter().zip(keys).enumerate() {
        let i = field_pos(op, &input.fields, key, &format!("keys[{side}]"))?;
        key_types.push((key, input.types[i]));
        if let Some(t) = time_fields.as_ref().map(|t| &t[side]) {
            let i = field_pos(op, &input.fields, t, &format!("timeFields[{side}]"))?;
            if !matches!(input.types[i], FieldType::Integer | FieldType::Any) {
                return Err(err(
                    op,
                    format!(
                        "timeFields[{side}] {t:?} holds {}, not milliseconds since the epoch",
                        input.types[i].describe()
                    ),
                ));
            }
        }
    }
    let ((ka, ta), (kb, tb)) = (key_types[0], key_types[1]);
    if ta != tb && ta != FieldType::Any && tb != FieldType::Any {
        return Err(err(
            op,
            format!(
                "keys: {ka:?} of {:?} holds {} and {kb:?} of {:?} holds {}: the keys must hold the same kind of values to join",
                l.uid,
                ta.describe(),
                r.uid,
                tb.describe()
            ),
        ));
    }
    let mut out = Vec::new();
    if windowed {
        out.push(("window_start".to_string(), FieldType::Integer));
        out.push(("window_end".to_string(), FieldType::Integer));
    }
    for (input, other) in [(l, r), (r, l)] {
        for (f, t) in input.fields.iter().zip(&input.types) {
            let name = if other.fields.contains(f)
                || (windowed && (f == "window_start" || f == "window_end"))
            {
                format!("{}.{f}", input.uid)
            } else {
                f.clone()
            };
            out.push((name, *t));
        }
    }
    Ok(out)
}

/// The fields a `window_top_n` emits: its input's (a window's output, with `window_start`
/// and `window_end`), then `rank` (1 for the first).
pub fn top_n_output(
    t: &TopNSpec,
    fields: &[String],
    types: &[FieldType],
) -> Result<Vec<(String, FieldType)>, String> {
    let input = InputFields { fields, types };
    for f in ["window_start", "window_end"] {
        let i = input.position(f, "its input's field").map_err(|e| {
            format!("{e}: window_top_n ranks the records of each window, so its input must be a window's output")
        })?;
        if !matches!(types[i], FieldType::Integer | FieldType::Any) {
            return Err(format!("{f:?} holds {}, not milliseconds", types[i].describe()));
        }
    }
    let i = input.position(&t.order_by, "orderBy")?;
    if !matches!(
        types[i],
        FieldType::Integer | FieldType::Float | FieldType::Number | FieldType::Any
    ) {
        return Err(format!(
            "orderBy {:?}: the field holds {}, not numbers",
            t.order_by,
            types[i].describe()
        ));
    }
    if fields.iter().any(|f| f == "rank") {
        return Err(
            "its input has a field \"rank\", the field it adds: rename it with a map".into()
        );
    }
    let mut out: Vec<(String, FieldType)> =
        fields.iter().cloned().zip(types.iter().copied()).collect();
    out.push(("rank".into(), FieldType::Integer));
    Ok(out)
}

/// A `ratePerSecond`, when given, is a number above 0.
fn check_rate(op: &OperatorSpec, rate: Option<f64>) -> Result<(), PlanError> {
    match rate {
        Some(r) if !(r.is_finite() && r > 0.0) => Err(err(
            op,
            format!("ratePerSecond {r} is not above 0: give a rate, or leave it out for no limit"),
        )),
        _ => Ok(()),
    }
}

fn field_pos(
    op: &OperatorSpec,
    fields: &[String],
    name: &str,
    what: &str,
) -> Result<usize, PlanError> {
    fields.iter().position(|f| f == name).ok_or_else(|| {
        err(
            op,
            format!("{what} {name:?} is not a field of its input (fields: {})", fields.join(", ")),
        )
    })
}

/// Checks `spec` (with `parallelism` and `max_parallelism` overrides from the command line)
/// and builds the plan, of built-in operator types only.
pub fn build(
    spec: &StreamJobSpec,
    parallelism: Option<u32>,
    max_parallelism: Option<u32>,
) -> Result<Plan, PlanError> {
    build_with(spec, parallelism, max_parallelism, &BuiltinOnly)
}

/// [`build`], with the types of `ext` beside the built-in ones.
pub fn build_with(
    spec: &StreamJobSpec,
    parallelism: Option<u32>,
    max_parallelism: Option<u32>,
    ext: &dyn Extensions,
) -> Result<Plan, PlanError> {
    let plan = plan_operators(spec, parallelism, max_parallelism, ext)?;
    // What the job's settings ask of its operators (a plan alone does not carry them).
    for op in &plan.ops {
        if let OpKind::KafkaSink(k) = &op.kind {
            k.check_checkpoints(spec.checkpointing.interval, spec.checkpointing.timeout).map_err(
                |e| {
                    PlanError::of(&op.uid, format!("operator {:?} ({}): {e}", op.uid, op.type_name))
                },
            )?;
        }
    }
    Ok(plan)
}

fn plan_operators(
    spec: &StreamJobSpec,
    parallelism: Option<u32>,
    max_parallelism: Option<u32>,
    ext: &dyn Extensions,
) -> Result<Plan, PlanError> {
    // A type neither built in nor the extension's, in the words of the graph rule (which
    // lets other types pass here).
    for (index, op) in spec.pipeline.operators.iter().enumerate() {
        if !OPERATOR_TYPES.contains(&op.kind.as_str()) && !ext.knows(&op.kind) {
            let known: Vec<String> =
                OPERATOR_TYPES.iter().map(|t| t.to_string()).chain(ext.names()).collect();
            return Err(PlanError::of(
                &op.uid,
                crate::rules::PIPELINE.render(&[(
                    "error",
                    &crate::rules::UNKNOWN_TYPE.render(&[
                        ("index", &index),
                        ("uid", &op.uid),
                        ("type", &op.kind),
                        ("known", &known.join(", ")),
                    ]),
                )]),
            ));
        }
    }
    let mut spec = spec.clone();
    if let Some(p) = parallelism {
        spec.parallelism = i32::try_from(p)
            .map_err(|_| PlanError::new(format!("parallelism {p} is too large")))?;
    }
    if let Some(m) = max_parallelism {
        spec.max_parallelism = Some(
            i32::try_from(m)
                .map_err(|_| PlanError::new(format!("maxParallelism {m} is too large")))?,
        );
    }
    spec.validate_types(true).map_err(|e| PlanError::new(e.to_string()))?;
    let order = spec
        .pipeline
        .validate_graph(true)
        .map_err(|e| PlanError::new(format!("spec.pipeline: {e}")))?;
    // Where each operator (and late output) is in `ops`, as they are planned.
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    let mut ops: Vec<PlanOp> = Vec::with_capacity(order.len());
    // For each operator planned: the field of its records that holds their event time, when
    // one does (from its source's `eventTime`, through the operators that keep the field).
    let mut times: Vec<Option<String>> = Vec::with_capacity(order.len());
    for op in &order {
        if op.late_output.is_some() && op.kind != "window" {
            return Err(err(
                op,
                "lateOutput is a parameter of a window only (the records later than its allowed lateness)",
            ));
        }
        let inputs: Vec<usize> = op.inputs.iter().map(|u| index[u.as_str()]).collect();
        // The fields of its inputs, unless an operator before it emits fields not known here.
        let open = inputs.iter().any(|&i| !ops[i].fields_known);
        // The fields of each input must agree when there are several.
        let input_fields: Vec<&Vec<String>> = inputs.iter().map(|&i| &ops[i].fields).collect();
        let is_join = matches!(op.kind.as_str(), "window_join" | "interval_join");
        if !open
            && !is_join
            && let Some(first) = input_fields.first()
            && input_fields.iter().any(|f| f != first)
        {
            return Err(err(
                op,
                "its inputs emit different fields; they must emit the same fields",
            ));
        }
        let in_fields: Vec<String> = input_fields.first().map(|f| (*f).clone()).unwrap_or_default();
        let in_types: Vec<FieldType> = inputs
            .iter()
            .map(|&i| ops[i].types.clone())
            .reduce(|a, b| a.iter().zip(&b).map(|(x, y)| x.merge(*y)).collect())
            .unwrap_or_default();
        let mut custom_output = None;
        // The event-time field its inputs carry, when they all carry the same.
        let time_of_input: Option<String> = match inputs.split_first() {
            Some((first, rest)) => {
                times[*first].clone().filter(|t| rest.iter().all(|&i| times[i].as_ref() == Some(t)))
            }
            None => None,
        };
        let kind = match op.kind.as_str() {
            "generator" => {
                let g: GeneratorSpec = parse(op)?;
                check_rate(op, g.rate_per_second)?;
                for (name, v) in [
                    ("keys", g.keys),
                    ("splits", g.splits.into()),
                    ("wordsPerLine", g.words_per_line.into()),
                ] {
                    if v == 0 {
                        return Err(err(op, format!("{name} must be 1 or more")));
                    }
                }
                if !(g.zipf_exponent.is_finite() && g.zipf_exponent > 0.0) {
                    return Err(err(op, "zipfExponent must be a number above 0"));
                }
                OpKind::Generator(g)
            }
            "file_source" => {
                check_line_format_params(op)?;
                let f: FileSourceSpec = parse(op)?;
                check_rate(op, f.rate_per_second)?;
                f.line_format().check().map_err(|e| err(op, e))?;
                OpKind::FileSource(f)
            }
            "socket" => {
                check_line_format_params(op)?;
                let s: SocketSpec = parse(op)?;
                s.line_format().check().map_err(|e| err(op, e))?;
                if s.host.is_empty() {
                    return Err(err(op, "host is empty: name the host to connect to"));
                }
                if s.port == 0 {
                    return Err(err(op, "port 0 is not a port to connect to: use 1 to 65535"));
                }
                OpKind::Socket(s)
            }
            "kafka_source" => {
                check_choice(op, "format", &["text", "json", "raw"])?;
                check_choice(op, "onError", &["fail", "skip", "deadLetter"])?;
                check_choice(op, "startFrom", &["earliest", "latest", "timestamp", "group"])?;
                check_choice(op, "isolation", &["read_committed", "read_uncommitted"])?;
                check_choice(op, "stopAt", &["latest"])?;
                let k: crate::kafka::KafkaSourceSpec = parse(op)?;
                k.check().map_err(|e| err(op, e))?;
                k.line_format().check().map_err(|e| err(op, e))?;
                OpKind::KafkaSource(k)
            }
            "kafka_sink" => {
                check_choice(op, "format", &["csv", "json"])?;
                check_choice(op, "delivery", &["exactly-once", "at-least-once", "none"])?;
                let k: crate::kafka::KafkaSinkSpec = parse(op)?;
                k.check().map_err(|e| err(op, e))?;
                if !open {
                    if let Some(f) = &k.key {
                        field_pos(op, &in_fields, f, "key")?;
                    }
                    if let Some(f) = &k.topic_field {
                        let i = field_pos(op, &in_fields, f, "topicField")?;
                        if !matches!(in_types[i], FieldType::Text | FieldType::Any) {
                            return Err(err(
                                op,
                                format!(
                                    "topicField {f:?} holds {}, not text: name a text field",
                                    in_types[i].describe()
                                ),
                            ));
                        }
                    }
                }
                OpKind::KafkaSink(k)
            }
            "split" => OpKind::Split(parse(op)?),
            "map" => OpKind::Map(parse(op)?),
            "filter" => OpKind::Filter(parse(op)?),
            "throttle" => {
                let t: ThrottleSpec = parse(op)?;
                if !(t.rate_per_second.is_finite() && t.rate_per_second > 0.0) {
                    return Err(err(op, "ratePerSecond must be a number above 0"));
                }
                OpKind::Throttle(t)
            }
            "count" | "sum" | "min" | "max" => {
                let k: KeyedSpec = parse(op)?;
                let aggregate = match op.kind.as_str() {
                    "count" => Aggregate::Count,
                    "sum" => Aggregate::Sum,
                    "min" => Aggregate::Min,
                    _ => Aggregate::Max,
                };
                if aggregate != Aggregate::Count && k.field.is_none() {
                    return Err(err(op, "field is missing: name the numeric field to aggregate"));
                }
                if aggregate == Aggregate::Count && k.field.is_some() {
                    return Err(err(op, "field is not a parameter of count (it counts records)"));
                }
                OpKind::Keyed { aggregate, key: k.key, field: k.field }
            }
            "window" => OpKind::Window(plan_window(op, time_of_input.as_deref())?),
            "window_top_n" => {
                check_choice(op, "order", &["desc", "asc"])?;
                let t: TopNSpec = parse(op)?;
                if t.n == 0 {
                    return Err(err(op, "n must be 1 or more"));
                }
                match inputs.as_slice() {
                    [i] => match &ops[*i].kind {
                        OpKind::Window(_) => {}
                        _ => {
                            return Err(err(
                                op,
                                format!(
                                    "its input {:?} is a {}, not a window: window_top_n ranks the records of each window, so it reads a window's output",
                                    ops[*i].uid, ops[*i].type_name
                                ),
                            ));
                        }
                    },
                    _ => {
                        return Err(err(
                            op,
                            "it reads one input, the output of a window (give one in inputs)",
                        ));
                    }
                }
                OpKind::WindowTopN(t)
            }
            "window_join" | "interval_join" => {
                if inputs.len() != 2 {
                    return Err(err(
                        op,
                        format!(
                            "a join reads two inputs, and inputs names {}: give the two operators to join",
                            inputs.len()
                        ),
                    ));
                }
                if inputs[0] == inputs[1] {
                    return Err(err(
                        op,
                        format!(
                            "inputs names {:?} twice: a join reads two different operators",
                            op.inputs[0]
                        ),
                    ));
                }
                let times_of: Vec<Option<String>> =
                    inputs.iter().map(|&i| times[i].clone()).collect();
                if op.kind == "window_join" {
                    OpKind::WindowJoin(plan_window_join(op, &times_of)?)
                } else {
                    OpKind::IntervalJoin(plan_interval_join(op, &times_of)?)
                }
            }
            "tumbling_window_count" => {
                let w: WindowSpec = parse(op)?;
                if w.size.is_zero() {
                    return Err(err(op, "size must be more than 0s"));
                }
                OpKind::TumblingWindowCount(w)
            }
            "stdout" => {
                check_choice(op, "format", &["csv", "json"])?;
                OpKind::Stdout(parse(op)?)
            }
            "blackhole" => {
                parse::<NoParams>(op)?;
                OpKind::Blackhole
            }
            "file_sink" => {
                check_choice(op, "format", &["csv", "json"])?;
                OpKind::FileSink(parse(op)?)
            }
            other => {
                let input = (!open).then_some(InputFields { fields: &in_fields, types: &in_types });
                match ext.plan(op, input) {
                    Some(Ok(planned)) => {
                        custom_output = Some(planned.output);
                        OpKind::Custom(Custom {
                            params: op.params.clone().into_iter().collect(),
                            key: planned.key,
                        })
                    }
                    Some(Err(e)) => return Err(err(op, e)),
                    None => {
                        return Err(err(op, format!("type {other:?} is unknown")));
                    }
                }
            }
        };
        if kind.is_source() && !inputs.is_empty() {
            return Err(err(op, "a source takes no inputs"));
        }
        if !kind.is_source() && inputs.is_empty() {
            return Err(err(op, "inputs is empty: name the operators it reads"));
        }
        let type_of = |name: &str| {
            in_fields.iter().position(|f| f == name).map_or(FieldType::Any, |i| in_types[i])
        };
        // What it emits is not known here after an operator whose fields are not, or for a
        // type of the job's image (the job checks it when it starts).
        let fields_known = !open && !matches!(custom_output, Some(None));
        if !fields_known {
            index.insert(&op.uid, ops.len());
            times.push(None);
            if let Some(name) = &op.late_output {
                index.insert(name, ops.len() + 1);
                times.push(None);
            }
            ops.push(PlanOp {
                uid: op.uid.clone(),
                type_name: op.kind.clone(),
                kind,
                inputs,
                fields: Vec::new(),
                types: Vec::new(),
                key_positions: Vec::new(),
                fields_known,
            });
            push_late_output(&mut ops, op, Vec::new(), Vec::new(), false);
            continue;
        }
        let custom_output = custom_output.flatten();
        let fields: Vec<String> = match &kind {
            OpKind::Custom(_) => custom_output.iter().flatten().map(|(f, _)| f.clone()).collect(),
            OpKind::Generator(g) => match g.format {
                GeneratorFormat::Text => vec!["line".into()],
                GeneratorFormat::Kv => vec!["key".into(), "value".into(), "ts".into()],
            },
            OpKind::FileSource(f) => f.line_format().output().into_iter().map(|(f, _)| f).collect(),
            OpKind::Socket(s) => s.line_format().output().into_iter().map(|(f, _)| f).collect(),
            OpKind::KafkaSource(k) => {
                k.line_format().output().into_iter().map(|(f, _)| f).collect()
            }
            OpKind::Split(s) => {
                field_pos(op, &in_fields, &s.field, "field")?;
                vec![s.output.clone()]
            }
            OpKind::Map(m) => {
                for f in m.upper.iter().chain(&m.lower) {
                    field_pos(op, &in_fields, f, "upper/lower field")?;
                }
                let mut out = in_fields.clone();
                for (name, template) in &m.set {
                    for r in template_refs(template) {
                        field_pos(op, &in_fields, r, &format!("set.{name} refers to"))?;
                    }
                    if !out.contains(name) {
                        out.push(name.clone());
                    }
                }
                if let Some(sel) = &m.select {
                    for f in sel {
                        field_pos(op, &out, f, "select names")?;
                    }
                    out = sel.clone();
                }
                out
            }
            OpKind::Filter(f) => {
                field_pos(op, &in_fields, &f.field, "field")?;
                in_fields.clone()
            }
            OpKind::Throttle(_) => in_fields.clone(),
            OpKind::Keyed { aggregate, key, field } => {
                field_pos(op, &in_fields, key, "key")?;
                if let Some(f) = field {
                    field_pos(op, &in_fields, f, "field")?;
                }
                let value = match aggregate {
                    Aggregate::Count => "count".to_string(),
                    _ => field.clone().unwrap_or_default(),
                };
                vec![key.clone(), value]
            }
            OpKind::TumblingWindowCount(w) => {
                field_pos(op, &in_fields, &w.key, "key")?;
                field_pos(op, &in_fields, &w.time_field, "timeField")?;
                vec![w.key.clone(), "window_end".into(), "count".into()]
            }
            OpKind::Window(w) => window_output(w, &in_fields, &in_types)
                .map_err(|e| err(op, e))?
                .into_iter()
                .map(|(f, _)| f)
                .collect(),
            OpKind::WindowTopN(t) => top_n_output(t, &in_fields, &in_types)
                .map_err(|e| err(op, e))?
                .into_iter()
                .map(|(f, _)| f)
                .collect(),
            OpKind::WindowJoin(_) | OpKind::IntervalJoin(_) => {
                join_output(op, &kind, &inputs, &ops)?.into_iter().map(|(f, _)| f).collect()
            }
            OpKind::Stdout(_)
            | OpKind::Blackhole
            | OpKind::FileSink(_)
            | OpKind::KafkaSink(_)
            | OpKind::LateOutput { .. } => in_fields.clone(),
        };
        let types: Vec<FieldType> = match &kind {
            OpKind::Custom(_) => custom_output.iter().flatten().map(|(_, t)| *t).collect(),
            OpKind::Generator(g) => match g.format {
                GeneratorFormat::Text => vec![FieldType::Text],
                GeneratorFormat::Kv => {
                    vec![FieldType::Text, FieldType::Integer, FieldType::Integer]
                }
            },
            OpKind::FileSource(f) => f.line_format().output().into_iter().map(|(_, t)| t).collect(),
            OpKind::Socket(s) => s.line_format().output().into_iter().map(|(_, t)| t).collect(),
            OpKind::KafkaSource(k) => {
                k.line_format().output().into_iter().map(|(_, t)| t).collect()
            }
            OpKind::Split(_) => vec![FieldType::Text],
            OpKind::Map(m) => {
                // `set` writes text (a template filled in); `select` picks from the result.
                let mut names = in_fields.clone();
                let mut types: Vec<FieldType> = in_types.clone();
                for name in m.set.keys() {
                    match names.iter().position(|f| f == name) {
                        Some(i) => types[i] = FieldType::Text,
                        None => {
                            names.push(name.clone());
                            types.push(FieldType::Text);
                        }
                    }
                }
                fields
                    .iter()
                    .map(|f| names.iter().position(|n| n == f).map_or(FieldType::Any, |i| types[i]))
                    .collect()
            }
            OpKind::Keyed { aggregate, key, .. } => vec![
                type_of(key),
                // A sum, min or max is a number: an integer while every value was one (kept
                // state included, which may come from another version of the job).
                match aggregate {
                    Aggregate::Count => FieldType::Integer,
                    _ => FieldType::Number,
                },
            ],
            // Window keys are kept as text.
            OpKind::TumblingWindowCount(_) => {
                vec![FieldType::Text, FieldType::Integer, FieldType::Integer]
            }
            OpKind::Window(w) => window_output(w, &in_fields, &in_types)
                .map_err(|e| err(op, e))?
                .into_iter()
                .map(|(_, t)| t)
                .collect(),
            OpKind::WindowTopN(t) => top_n_output(t, &in_fields, &in_types)
                .map_err(|e| err(op, e))?
                .into_iter()
                .map(|(_, t)| t)
                .collect(),
            OpKind::WindowJoin(_) | OpKind::IntervalJoin(_) => {
                join_output(op, &kind, &inputs, &ops)?.into_iter().map(|(_, t)| t).collect()
            }
            OpKind::Filter(_)
            | OpKind::Throttle(_)
            | OpKind::Stdout(_)
            | OpKind::Blackhole
            | OpKind::FileSink(_)
            | OpKind::KafkaSink(_)
            | OpKind::LateOutput { .. } => in_types.clone(),
        };
        debug_assert_eq!(types.len(), fields.len());
        if let Some(et) = kind.event_time() {
            check_event_time(op, et, &fields, &types)?;
        }
        let keeps = |t: &String| {
            fields.iter().position(|f| f == t).is_some_and(|i| types[i] == FieldType::Integer)
        };
        times.push(match &kind {
            k if k.is_source() => k.event_time().map(|et| et.field.clone()),
            OpKind::Filter(_) | OpKind::Throttle(_) | OpKind::Custom(_) => {
                time_of_input.clone().filter(keeps)
            }
            OpKind::Map(m) => time_of_input.clone().filter(|t| !m.set.contains_key(t) && keeps(t)),
            _ => None,
        });
        let key_positions = match (kind.join_keys(), kind.key_field()) {
            (Some(keys), _) => inputs
                .iter()
                .zip(keys)
                .map(|(&i, k)| field_pos(op, &ops[i].fields, k, "keys names"))
                .collect::<Result<Vec<_>, _>>()?,
            (None, Some(k)) => vec![field_pos(op, &in_fields, k, "key")?; inputs.len()],
            (None, None) => Vec::new(),
        };
        index.insert(&op.uid, ops.len());
        ops.push(PlanOp {
            uid: op.uid.clone(),
            type_name: op.kind.clone(),
            kind,
            inputs,
            fields,
            types,
            key_positions,
            fields_known,
        });
        if let Some(name) = &op.late_output {
            index.insert(name, ops.len());
            times.push(time_of_input.clone());
            push_late_output(&mut ops, op, in_fields, in_types, true);
        }
    }
    // Every path must end in a sink, and sinks feed nothing.
    for (i, op) in ops.iter().enumerate() {
        let consumers = ops.iter().filter(|o| o.inputs.contains(&i)).count();
        if op.kind.is_sink() && consumers > 0 {
            return Err(PlanError::of(
                &op.uid,
                format!("operator {:?}: a sink cannot be the input of another operator", op.uid),
            ));
        }
        if let OpKind::LateOutput { of } = &op.kind
            && consumers == 0
        {
            return Err(PlanError::of(
                of,
                format!(
                    "operator {of:?}: its lateOutput {:?} goes nowhere: add an operator that reads it (inputs: [{}]), or leave lateOutput out to drop and count late records",
                    op.uid, op.uid
                ),
            ));
        }
        if !op.kind.is_sink() && consumers == 0 {
            return Err(PlanError::of(
                &op.uid,
                format!(
                    "operator {:?}: its output goes nowhere: add a sink (stdout, blackhole, file_sink) that reads it",
                    op.uid
                ),
            ));
        }
    }
    Ok(Plan {
        ops,
        parallelism: spec.parallelism as u32,
        max_parallelism: spec.effective_max_parallelism() as u32,
        s3: spec.s3.clone(),
        state_backend: spec.state_backend,
    })
}

impl PlanOp {
    /// Its parameters as a manifest gives them (every key beside `uid`, `type` and `inputs`).
    pub fn params(&self) -> serde_json::Map<String, serde_json::Value> {
        let value = match &self.kind {
            OpKind::Generator(g) => serde_json::to_value(g),
            OpKind::FileSource(f) => serde_json::to_value(f),
            OpKind::Socket(s) => serde_json::to_value(s),
            OpKind::KafkaSource(k) => serde_json::to_value(k),
            OpKind::Split(s) => serde_json::to_value(s),
            OpKind::Map(m) => serde_json::to_value(m),
            OpKind::Filter(f) => serde_json::to_value(f),
            OpKind::Throttle(t) => serde_json::to_value(t),
            OpKind::Keyed { key, field, .. } => {
                let mut m = serde_json::Map::new();
                m.insert("key".into(), key.clone().into());
                if let Some(f) = field {
                    m.insert("field".into(), f.clone().into());
                }
                Ok(m.into())
            }
            OpKind::TumblingWindowCount(w) => serde_json::to_value(w),
            OpKind::Window(w) => serde_json::to_value(w),
            OpKind::WindowTopN(t) => serde_json::to_value(t),
            OpKind::WindowJoin(j) => serde_json::to_value(j),
            OpKind::IntervalJoin(j) => serde_json::to_value(j),
            OpKind::Stdout(s) => serde_json::to_value(s),
            OpKind::Blackhole => Ok(serde_json::Value::Object(Default::default())),
            OpKind::FileSink(f) => serde_json::to_value(f),
            OpKind::KafkaSink(k) => serde_json::to_value(k),
            OpKind::LateOutput { .. } => Ok(serde_json::Value::Object(Default::default())),
            OpKind::Custom(c) => Ok(serde_json::Value::Object(c.params.clone())),
        };
        match value {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        }
    }
}

/// Checks a plan handed over from elsewhere (a worker's, from its coordinator): its operators,
/// with their parameters, planned again with `ext` must give the same plan. A plan that
/// refers outside itself, has parameters the planner refuses, or was built by a planner that
/// knows other types or decides otherwise (another build of `weir`) is refused.
pub fn verify(plan: &Plan, ext: &dyn Extensions) -> Result<(), PlanError> {
    let mut operators = Vec::with_capacity(plan.ops.len());
    for (i, op) in plan.ops.iter().enumerate() {
        // (Planned again from its window's lateOutput.)
        if matches!(op.kind, OpKind::LateOutput { .. }) {
            continue;
        }
        let mut m = op.params();
        m.insert("uid".into(), op.uid.clone().into());
        m.insert("type".into(), op.type_name.clone().into());
        let inputs = op
            .inputs
            .iter()
            .map(|&j| match plan.ops.get(j) {
                Some(input) if j < i => Ok(serde_json::Value::from(input.uid.clone())),
                _ => Err(PlanError::of(
                    &op.uid,
                    format!("operator {:?}: input {j} is not an operator before it", op.uid),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !inputs.is_empty() {
            m.insert("inputs".into(), inputs.into());
        }
        operators.push(serde_json::Value::Object(m));
    }
    let spec = serde_json::json!({
        "parallelism": plan.parallelism,
        "maxParallelism": plan.max_parallelism,
        "stateBackend": plan.state_backend,
        "s3": plan.s3,
        "pipeline": {"operators": operators},
    });
    let spec: StreamJobSpec = serde_json::from_value(spec)
        .map_err(|e| PlanError::new(format!("the plan does not read as a job: {e}")))?;
    let again = plan_operators(&spec, None, None, ext)?;
    if again != *plan {
        return Err(PlanError::new(
            "planned again here, its operators give another plan: the coordinator and its workers must run the same build of weir, with the same operator types",
        ));
    }
    Ok(())
}

/// The field names a `set` template refers to (`{name}`).
pub fn template_refs(t: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = t;
    while let Some(i) = rest.find('{') {
        let after = &rest[i + 1..];
        match after.find('}') {
            Some(j) => {
                out.push(&after[..j]);
                rest = &after[j + 1..];
            }
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> StreamJobSpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    const WORDCOUNT: &str = "parallelism: 2\nmaxParallelism: 128\npipeline:\n  operators:\n    - {uid: lines, type: file_source, path: /data/in}\n    - {uid: words, type: split, inputs: [lines]}\n    - {uid: counts, type: count, inputs: [words], key: word}\n    - {uid: out, type: file_sink, inputs: [counts], path: /data/out}\n";

    #[test]
    fn the_issue_example_plans() {
        let p = build(&spec(WORDCOUNT), None, None).unwrap();
        assert_eq!(p.parallelism, 2);
        assert_eq!(p.max_parallelism, 128);
        let fields: Vec<_> = p.ops.iter().map(|o| o.fields.join(",")).collect();
        assert_eq!(fields, ["line", "word", "word,count", "word,count"]);
        assert_eq!(p.ops[2].key_positions, vec![0]);
        assert!(!p.uses_s3());
        assert_eq!(p.s3, None);
    }

    #[test]
    fn the_plan_carries_the_s3_settings() {
        let yaml = WORDCOUNT.replace("path: /data/out", "path: s3://bkt/out")
            + "s3: {endpoint: http://127.0.0.1:9000, region: garage, requestChecksums: when-required}\n";
        let p = build(&spec(&yaml), None, None).unwrap();
        assert!(p.uses_s3());
        let s3 = p.s3.unwrap();
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.region.as_deref(), Some("garage"));
    }

    fn plan_err(yaml: &str) -> String {
        build(&spec(yaml), None, None).unwrap_err().to_string()
    }

    #[test]
    fn a_sources_event_time_names_an_integer_field_of_its_records() {
        let job = |et: &str| {
            format!(
                "pipeline:\n  operators:\n    - {{uid: kv, type: generator, format: kv, eventTime: {et}}}\n    - {{uid: out, type: blackhole, inputs: [kv]}}\n"
            )
        };
        let p =
            build(&spec(&job("{field: ts, maxOutOfOrderness: 2s, idleTimeout: 30s}")), None, None)
                .unwrap();
        let et = p.ops[0].kind.event_time().unwrap();
        assert_eq!(et.max_out_of_orderness, crate::Duration::from_secs(2));
        assert_eq!(et.idle_timeout, Some(crate::Duration::from_secs(30)));
        // Its parameters round-trip through the plan the coordinator hands the workers.
        assert_eq!(p.ops[0].params()["eventTime"]["field"], "ts");
        for (et, says) in [
            (
                "{field: time}",
                "eventTime.field \"time\" is not a field of its records (fields: key, value, ts)",
            ),
            (
                "{field: key}",
                "eventTime.field \"key\" holds text, not milliseconds since the epoch",
            ),
            ("{field: ts, idleTimeout: 0s}", "eventTime.idleTimeout must be more than 0s"),
            ("{field: ts, maxOutOfOrder: 2s}", "unknown field `maxOutOfOrder`"),
            ("{field: ts, maxOutOfOrderness: soon}", "invalid duration \"soon\""),
        ] {
            let e = plan_err(&job(et));
            assert!(e.contains("operator \"kv\" (generator)") && e.contains(says), "{et}: {e}");
        }
        // A text source has no integer field.
        let e = plan_err(
            &WORDCOUNT.replace("path: /data/in}", "path: /data/in, eventTime: {field: line}}"),
        );
        assert!(e.contains("eventTime.field \"line\" holds text"), "{e}");
    }

    #[test]
    fn bad_pipelines_name_the_operator_and_field() {
        let e = plan_err(&WORDCOUNT.replace("type: split", "type: splitt"));
        assert!(e.contains("\"words\"") && e.contains("type \"splitt\" is unknown"), "{e}");
        let e = plan_err(&WORDCOUNT.replace("key: word", "key: wrd"));
        assert!(e.contains("\"counts\"") && e.contains("key \"wrd\" is not a field"), "{e}");
        let e = plan_err(&WORDCOUNT.replace("inputs: [words]", "inputs: [nope]"));
        assert!(e.contains("\"counts\"") && e.contains("\"nope\""), "{e}");
        let e = plan_err(&WORDCOUNT.replace("uid: words", "uid: lines"));
        assert!(e.contains("\"lines\"") && e.contains("unique"), "{e}");
        let e = plan_err(&WORDCOUNT.replace("inputs: [lines]", "inputs: [counts]"));
        assert!(e.contains("cycle"), "{e}");
        let e = plan_err(&WORDCOUNT.replace("parallelism: 2", "parallelism: 200"));
        assert!(e.contains("spec.parallelism 200") && e.contains("maxParallelism 128"), "{e}");
        let e = plan_err(&WORDCOUNT.replace("path: /data/in}", "path: /data/in, cout: 3}"));
        assert!(e.contains("\"lines\"") && e.contains("unknown field `cout`"), "{e}");
        let e = plan_err(&WORDCOUNT.replace("path: /data/out", "path: relative/out"));
        assert!(e.contains("\"out\"") && e.contains("relative/out"), "{e}");
        let e = plan_err(&WORDCOUNT.replace(
            "type: count, inputs: [words], key: word",
            "type: sum, inputs: [words], key: word",
        ));
        assert!(e.contains("\"counts\"") && e.contains("field is missing"), "{e}");
        let e =
            plan_err(&WORDCOUNT.replace(
                "    - {uid: out, type: file_sink, inputs: [counts], path: /data/out}\n",
                "",
            ));
        assert!(e.contains("\"counts\"") && e.contains("goes nowhere"), "{e}");
    }

    #[test]
    fn the_plan_knows_what_each_field_holds() {
        use FieldType::*;
        let yaml = [
            "pipeline:",
            "  operators:",
            "    - {uid: kv, type: generator, format: kv}",
            "    - {uid: m, type: map, inputs: [kv], set: {label: 'k={key}'}, select: [value, label, key]}",
            "    - {uid: m2, type: map, inputs: [kv], set: {value: 'v{value}'}}",
            "    - {uid: c, type: count, inputs: [m], key: value}",
            "    - {uid: c2, type: count, inputs: [m2], key: value}",
            "    - {uid: s, type: sum, inputs: [kv], key: key, field: value}",
            "    - {uid: w, type: tumbling_window_count, inputs: [kv], key: value, size: 1s}",
            "    - {uid: both, type: blackhole, inputs: [c, c2]}",
            "    - {uid: o1, type: blackhole, inputs: [s]}",
            "    - {uid: o2, type: stdout, inputs: [w]}",
        ]
        .join("\n");
        let p = build(&spec(&yaml), None, None).unwrap();
        let types = |uid: &str| p.ops.iter().find(|o| o.uid == uid).unwrap().types.clone();
        assert_eq!(types("kv"), [Text, Integer, Integer]);
        assert_eq!(types("m"), [Integer, Text, Text]);
        assert_eq!(types("m2"), [Text, Text, Integer]);
        assert_eq!(types("c"), [Integer, Integer]);
        assert_eq!(types("c2"), [Text, Integer]);
        assert_eq!(types("s"), [Text, Number]);
        assert_eq!(types("w"), [Text, Integer, Integer]);
        // Inputs that disagree: anything goes in that field.
        assert_eq!(types("both"), [Any, Integer]);
        for o in &p.ops {
            assert_eq!(o.types.len(), o.fields.len(), "{}", o.uid);
        }
        use ValueKind as V;
        assert!(Number.admits(V::Integer) && Number.admits(V::Float));
        assert!(!Number.admits(V::Text) && !Text.admits(V::Integer));
        assert!(Any.admits(V::Text) && !Integer.admits(V::Float));
    }

    const JSON_BIDS: &str = "pipeline:\n  operators:\n    - {uid: bids, type: file_source, path: /data/bids, format: json, fields: {url: string, price: float, auction: int, ts: timestamp, \"bid.ok\": bool, \"bid.price\": int}, onError: skip}\n    - {uid: c, type: count, inputs: [bids], key: auction}\n    - {uid: out, type: file_sink, inputs: [c], path: /data/out, format: json}\n";

    #[test]
    fn a_json_source_emits_its_fields_in_sorted_order_with_their_types() {
        use FieldType::*;
        let p = build(&spec(JSON_BIDS), None, None).unwrap();
        let bids = &p.ops[0];
        assert_eq!(bids.fields, ["auction", "bid.ok", "bid.price", "price", "ts", "url"]);
        assert_eq!(bids.types, [Integer, Bool, Integer, Float, Integer, Text]);
        let OpKind::FileSource(f) = &bids.kind else { panic!("{:?}", bids.kind) };
        assert_eq!((f.format, f.on_error), (SourceFormat::Json, OnError::Skip));
        assert_eq!(p.ops[1].key_positions, vec![0]);
        assert!(matches!(&p.ops[2].kind, OpKind::FileSink(s) if s.format == SinkFormat::Json));
        verify(&p, &BuiltinOnly).unwrap();
        // The defaults: text, one field `line`, fail; csv.
        let p = build(&spec(WORDCOUNT), None, None).unwrap();
        let OpKind::FileSource(f) = &p.ops[0].kind else { panic!() };
        assert_eq!(
            (f.format, f.fields.as_ref(), f.on_error),
            (SourceFormat::Text, None, OnError::Fail)
        );
        assert!(matches!(&p.ops[3].kind, OpKind::FileSink(s) if s.format == SinkFormat::Csv));
        // A socket reads JSON the same way; stdout writes it.
        let yaml = "pipeline:\n  operators:\n    - {uid: s, type: socket, host: localhost, port: 9, format: json, fields: {active: bool, qty: int}}\n    - {uid: o, type: stdout, inputs: [s], format: json}\n";
        let p = build(&spec(yaml), None, None).unwrap();
        assert_eq!(p.ops[0].fields, ["active", "qty"]);
        assert_eq!(p.ops[0].types, [Bool, Integer]);
        assert!(matches!(&p.ops[1].kind, OpKind::Stdout(s) if s.format == SinkFormat::Json));
        verify(&p, &BuiltinOnly).unwrap();
        // A boolean merges with nothing but a boolean.
        assert_eq!(Bool.merge(Bool), Bool);
        assert_eq!(Bool.merge(Integer), Any);
        assert!(Bool.admits(ValueKind::Bool) && !Bool.admits(ValueKind::Text));
        assert!(!Integer.admits(ValueKind::Bool) && !Number.admits(ValueKind::Bool));
    }

    #[test]
    fn bad_json_sources_and_sinks_are_refused_naming_the_operator_and_field() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "format: json, fields: {url: string, price: float, auction: int, ts: timestamp, \"bid.ok\": bool, \"bid.price\": int}, ",
                "format: json, ",
                &["\"bids\" (file_source)", "format: json needs fields"],
            ),
            ("format: json, ", "", &["\"bids\"", "fields is read only with format: json"]),
            ("format: json, ", "format: text, ", &["fields is read only with format: json"]),
            (
                "price: float",
                "price: integer",
                &[
                    "\"bids\"",
                    "fields.price: \"integer\" is not a type: use one of string, int, float, bool, timestamp",
                ],
            ),
            ("price: float", "price: 3", &["fields.price: 3 is not a type"]),
            (
                "onError: skip",
                "onError: maybe",
                &["\"bids\"", "onError \"maybe\" is not one of fail, skip"],
            ),
            (
                "format: json, fields",
                "format: xml, fields",
                &["\"bids\"", "format \"xml\" is not one of text, json"],
            ),
            (
                "path: /data/out, format: json",
                "path: /data/out, format: xml",
                &["\"out\" (file_sink)", "format \"xml\" is not one of csv, json"],
            ),
            (
                "fields: {url: string, price: float, auction: int, ts: timestamp, \"bid.ok\": bool, \"bid.price\": int}",
                "fields: {}",
                &["fields is empty"],
            ),
            (
                "fields: {url: string, price: float, auction: int, ts: timestamp, \"bid.ok\": bool, \"bid.price\": int}",
                "fields: [auction]",
                &["is not a map of field names to types"],
            ),
            (
                "\"bid.ok\": bool",
                "\"bid..ok\": bool",
                &["fields: \"bid..ok\" is not a field name or a dotted path"],
            ),
            ("\"bid.ok\": bool", "\".ok\": bool", &["\".ok\" is not a field name"]),
            (
                "\"bid.ok\": bool",
                "bid: string",
                &["fields: \"bid\" is on the path of \"bid.price\""],
            ),
            (
                "key: auction",
                "key: bid",
                &[
                    "\"c\"",
                    "key \"bid\" is not a field of its input (fields: auction, bid.ok, bid.price, price, ts, url)",
                ],
            ),
        ];
        for (from, to, wants) in cases {
            assert!(JSON_BIDS.contains(from), "{from}");
            let e = plan_err(&JSON_BIDS.replace(from, to));
            for w in *wants {
                assert!(e.contains(w), "{to}: the error does not say {w}: {e}");
            }
        }
        let socket = "pipeline:\n  operators:\n    - {uid: s, type: socket, host: localhost, port: 9, format: json}\n    - {uid: o, type: stdout, inputs: [s], format: yaml}\n";
        let e = plan_err(socket);
        assert!(e.contains("\"s\" (socket): format: json needs fields"), "{e}");
        let e = plan_err(&socket.replace("format: json}", "fields: {a: int}}"));
        assert!(e.contains("\"s\" (socket): fields is read only with format: json"), "{e}");
        let e = plan_err(&socket.replace("format: json}", "onError: later}"));
        assert!(e.contains("onError \"later\" is not one of fail, skip"), "{e}");
        let e = plan_err(&socket.replace("format: json}", "format: text}"));
        assert!(e.contains("\"o\" (stdout): format \"yaml\" is not one of csv, json"), "{e}");
    }

    /// A keyed type of a user's own: emits its key and `hits`; `limit` must be above 0.
    struct Detector;

    impl Extensions for Detector {
        fn names(&self) -> Vec<String> {
            vec!["detector".into()]
        }
        fn knows(&self, kind: &str) -> bool {
            kind == "detector"
        }
        fn plan(
            &self,
            op: &OperatorSpec,
            input: Option<InputFields<'_>>,
        ) -> Option<Result<Planned, String>> {
            if op.kind != "detector" {
                return None;
            }
            let input = input?;
            Some((|| {
                let limit = op.params.get("limit").and_then(|v| v.as_i64()).unwrap_or(0);
                if limit <= 0 {
                    return Err(format!("limit {limit} must be above 0"));
                }
                let key = op.params.get("key").and_then(|v| v.as_str()).unwrap_or("key");
                let t = input.types[input.position(key, "key")?];
                Ok(Planned {
                    output: Some(vec![(key.to_string(), t), ("hits".into(), FieldType::Integer)]),
                    key: Some(key.to_string()),
                })
            })())
        }
    }

    const DETECTING: &str = "pipeline:\n  operators:\n    - {uid: kv, type: generator, format: kv}\n    - {uid: d, type: detector, inputs: [kv], limit: 3}\n    - {uid: c, type: count, inputs: [d], key: hits}\n    - {uid: o, type: blackhole, inputs: [c]}\n";

    #[test]
    fn a_type_of_an_extension_is_planned_by_it_and_checked_like_a_built_in_one() {
        let p = build_with(&spec(DETECTING), None, None, &Detector).unwrap();
        let d = &p.ops[1];
        assert_eq!(d.fields, ["key", "hits"]);
        assert_eq!(d.types, [FieldType::Text, FieldType::Integer]);
        assert_eq!((d.kind.key_field(), d.key_positions.clone()), (Some("key"), vec![0]));
        assert!(matches!(&d.kind, OpKind::Custom(c) if c.params["limit"] == 3));
        assert_eq!(p.ops[2].key_positions, vec![1], "the operators after it see its fields");
        // Its own checks, and the planner's after it, name the operator.
        let e =
            build_with(&spec(&DETECTING.replace("limit: 3", "limit: -1")), None, None, &Detector)
                .unwrap_err();
        assert_eq!(e.uid.as_deref(), Some("d"));
        assert!(e.message.contains("operator \"d\" (detector): limit -1 must be above 0"), "{e}");
        let e = build_with(&spec(&DETECTING.replace("key: hits", "key: m")), None, None, &Detector)
            .unwrap_err();
        assert!(
            e.message.contains("key \"m\" is not a field of its input (fields: key, hits)"),
            "{e}"
        );
        // Without the extension the type is unknown, in the words of the graph rule.
        let e = build(&spec(DETECTING), None, None).unwrap_err();
        assert!(
            e.message.contains(
                "pipeline.operators[1] (\"d\"): type \"detector\" is unknown: use one of generator,"
            ),
            "{e}"
        );
        let e = build_with(
            &spec(&DETECTING.replace("detector, inputs", "detectr, inputs")),
            None,
            None,
            &Detector,
        )
        .unwrap_err();
        assert!(e.message.ends_with("file_sink, kafka_sink, detector"), "{e}");
    }

    /// Every built-in type with parameters, and a user's type.
    const EVERY_KIND: &str = "parallelism: 3\nmaxParallelism: 64\nstateBackend: heap\npipeline:\n  operators:\n    - {uid: kv, type: generator, format: kv, count: 10, keys: 5, ratePerSecond: 100}\n    - {uid: t, type: throttle, inputs: [kv], ratePerSecond: 50}\n    - {uid: f, type: filter, inputs: [t], field: value, greaterThan: 1, equals: 3}\n    - {uid: m, type: map, inputs: [f], set: {k2: 'x{key}'}, upper: [key], select: [key, k2, ts]}\n    - {uid: w, type: tumbling_window_count, inputs: [m], key: k2, size: 5s, allowedLateness: 1s}\n    - {uid: d, type: detector, inputs: [kv], limit: 3}\n    - {uid: s, type: sum, inputs: [d], key: key, field: hits}\n    - {uid: lines, type: file_source, path: s3://bucket-a/in}\n    - {uid: sock, type: socket, host: example.com, port: 9000}\n    - {uid: words, type: split, inputs: [lines, sock]}\n    - {uid: c, type: count, inputs: [words], key: word}\n    - {uid: o1, type: file_sink, inputs: [w], path: /out}\n    - {uid: o2, type: blackhole, inputs: [s]}\n    - {uid: o3, type: stdout, inputs: [c]}\n    - {uid: j, type: file_source, path: /in, format: json, fields: {a: int, \"b.c\": bool}, onError: skip}\n    - {uid: js, type: socket, host: example.com, port: 9001, format: json, fields: {a: int, \"b.c\": bool}}\n    - {uid: o4, type: file_sink, inputs: [j, js], path: /out2, format: json}\n    - {uid: o5, type: stdout, inputs: [js], format: json}\n    - {uid: ks, type: kafka_source, topics: [a, b], bootstrapServers: \"k:9092\", format: raw, startFrom: timestamp, startTimestamp: 5, stopAt: latest, properties: {fetch.max.bytes: \"1000\"}}\n    - {uid: o6, type: kafka_sink, inputs: [ks], topic: c, key: key, bootstrapServers: \"k:9092\", delivery: at-least-once}\n";

    #[test]
    fn a_plan_handed_over_is_checked_by_planning_it_again() {
        let plan = build_with(&spec(EVERY_KIND), None, None, &Detector).unwrap();
        // Over the wire and back, it is the same plan, and it checks.
        let wire = serde_json::to_string(&plan).unwrap();
        let back: Plan = serde_json::from_str(&wire).unwrap();
        assert_eq!(back, plan);
        verify(&back, &Detector).unwrap();
        let word_count = build(&spec(WORDCOUNT), Some(3), Some(256)).unwrap();
        verify(&word_count, &BuiltinOnly).unwrap();
        // Tampered with, or planned by another build, it is refused (never a panic).
        let refused = |f: &dyn Fn(&mut Plan), ext: &dyn Extensions| {
            let mut p = plan.clone();
            f(&mut p);
            verify(&p, ext).unwrap_err().to_string()
        };
        let by = |i: usize| plan.ops.iter().position(|o| o.uid == ["c", "t", "d", "m"][i]).unwrap();
        let another = "planned again here, its operators give another plan";
        let e = refused(&|p| p.ops[by(0)].key_positions = vec![7], &Detector);
        assert!(e.contains(another), "{e}");
        let e = refused(&|p| p.ops[by(3)].fields.push("extra".into()), &Detector);
        assert!(e.contains(another), "{e}");
        let e = refused(&|p| p.max_parallelism = 2, &Detector);
        assert!(e.contains("maxParallelism"), "{e}");
        let e = refused(
            &|p| {
                if let OpKind::Throttle(t) = &mut p.ops[by(1)].kind {
                    t.rate_per_second = -5.0;
                }
            },
            &Detector,
        );
        assert!(
            e.contains("operator \"t\" (throttle): ratePerSecond must be a number above 0"),
            "{e}"
        );
        let e = refused(&|p| p.ops[by(0)].inputs = vec![999], &Detector);
        assert!(e.contains("operator \"c\": input 999 is not an operator before it"), "{e}");
        let e = refused(&|p| p.ops[0].inputs = vec![1], &Detector);
        assert!(e.contains("input 1 is not an operator before it"), "{e}");
        let e = refused(&|p| p.ops[by(2)].type_name = "count".into(), &Detector);
        assert!(e.contains("operator \"d\" (count)"), "{e}");
        // A worker whose build does not know the user's type.
        let e = refused(&|_| {}, &BuiltinOnly);
        assert!(e.contains("type \"detector\" is unknown"), "{e}");
        // A plan that is not one does not read.
        assert!(serde_json::from_str::<Plan>(&wire.replacen("\"ops\"", "\"opz\"", 1)).is_err());
    }

    #[test]
    fn the_controller_passes_an_image_s_own_types_and_checks_the_built_in_ones_around_them() {
        // (The controller, for a job with spec.image: the type's fields are not known there.)
        let with_image = |yaml: &str| spec(&format!("image: ghcr.io/x/mine:1\n{yaml}"));
        let p = build_with(&with_image(DETECTING), None, None, &ImageTypes).unwrap();
        assert!(p.ops[0].fields_known && !p.ops[1].fields_known && !p.ops[2].fields_known);
        // After it, fields cannot be checked; the parameters of built-in types still are.
        assert!(
            build_with(
                &with_image(&DETECTING.replace("key: hits", "key: m")),
                None,
                None,
                &ImageTypes
            )
            .is_ok()
        );
        let e = build_with(
            &with_image(&DETECTING.replace("key: hits}", "key: hits, field: x}")),
            None,
            None,
            &ImageTypes,
        )
        .unwrap_err();
        assert!(e.message.contains("field is not a parameter of count"), "{e}");
        // Without an image, the spec's own rules refuse the type.
        assert!(
            spec(DETECTING)
                .validate()
                .unwrap_err()
                .to_string()
                .contains("type \"detector\" is unknown")
        );
        assert!(with_image(DETECTING).validate().is_ok());
    }

    #[test]
    fn parallelism_overrides_are_checked() {
        assert_eq!(build(&spec(WORDCOUNT), Some(3), None).unwrap().parallelism, 3);
        let e = build(&spec(WORDCOUNT), Some(129), None).unwrap_err().to_string();
        assert!(e.contains("spec.parallelism 129"), "{e}");
        assert_eq!(build(&spec(WORDCOUNT), Some(129), Some(256)).unwrap().max_parallelism, 256);
    }
}
