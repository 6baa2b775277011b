//! Lines to records and records to lines: the sources' `format: text | json` (a
//! [`Decoder`] built once from the plan's spec, with what a line that does not parse does:
//! [`SourceDecoder`]), the bounded reading of lines they share ([`LineBuffer`]), and the
//! sinks' `format: csv | json` ([`Encoder`]).
//!
//! ```text
//!   bytes ─► LineBuffer (≤ 16 MiB a line) ─► Decoder ─► Record ─► ... ─► Encoder ─► line
//!                                               └─ error ─► SourceDecoder: fail | skip
//! ```
//!
//! What a source reads is untrusted: a line is at most [`MAX_LINE_BYTES`] in memory (the rest
//! of a longer one is read past, not kept), JSON is parsed without building a tree of it (only
//! the fields the spec names are kept; the rest is skipped by serde_json's iterative skipper,
//! and nesting is bounded by its recursion limit), and every failure is an error naming the
//! field, never a panic.

use std::collections::BTreeMap;
use std::fmt;
use std::io::BufRead;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use weir_crds::plan::{JsonType, LineFormat, OnError, SinkFormat, SourceFormat};

use crate::error::RuntimeError;
use crate::record::{Record, Value};

/// The longest line a source keeps: a longer one does not parse.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Lines skipped with `onError: skip` that a subtask logs; the rest are only counted.
pub const LOGGED_SKIPS: u32 = 5;

/// Bytes of a skipped line that its log shows.
const LOGGED_LINE_BYTES: usize = 120;

// ---------------------------------------------------------------------------------------------
// Reading lines

/// One line read by a [`LineBuffer`].
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// Its bytes without the line end (`\n`, and any `\r` before it); the first
    /// [`MAX_LINE_BYTES`] when it is longer.
    pub bytes: &'a [u8],
    /// The bytes it took from the reader, its end included (how far a file's offset moves).
    pub consumed: u64,
    /// It was longer than [`MAX_LINE_BYTES`].
    pub too_long: bool,
}

/// Reads lines from a reader, at most [`MAX_LINE_BYTES`] of each in memory. A line cut by a
/// reader's timeout (a socket) is kept, and read on at the next call.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// Bytes of the line being read taken from the reader (past the buffer when too long).
    consumed: u64,
    too_long: bool,
    /// The last call returned a line: the next one starts a new line.
    returned: bool,
}

impl LineBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next line, or `None` at the end of the reader (a last line without its `\n` is a
    /// line). An error of the reader (a timeout: `WouldBlock`, `TimedOut`) keeps what was
    /// read of the line so far.
    pub fn read<R: BufRead + ?Sized>(&mut self, r: &mut R) -> std::io::Result<Option<Line<'_>>> {
        if std::mem::take(&mut self.returned) {
            self.buf.clear();
            // A long line's room is given back.
            if self.buf.capacity() > 1 << 20 {
                self.buf.shrink_to(64 << 10);
            }
            self.consumed = 0;
            self.too_long = false;
        }
        loop {
            let available = match r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                if self.consumed == 0 {
                    return Ok(None);
                }
                return Ok(Some(self.line()));
            }
            let (n, ended) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            let room = MAX_LINE_BYTES.saturating_sub(self.buf.len());
            if n - usize::from(ended) > room {
                self.too_long = true;
            }
            self.buf.extend_from_slice(&available[..n.min(room)]);
            self.consumed += n as u64;
            r.consume(n);
            if ended {
                return Ok(Some(self.line()));
            }
        }
    }

    fn line(&mut self) -> Line<'_> {
        self.returned = true;
        let mut end = self.buf.len();
        if !self.too_long {
            while end > 0 && matches!(self.buf[end - 1], b'\n' | b'\r') {
                end -= 1;
            }
        }
        Line { bytes: &self.buf[..end], consumed: self.consumed, too_long: self.too_long }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Turns a line into a record, as a source's `format` and `fields` say. Built once per
/// subtask from the plan's spec.
#[derive(Debug, Clone)]
pub struct Decoder {
    json: Option<Json>,
}

/// The fields a JSON decoder reads: a tree of the dotted names, each leaf a field's place in
/// the record.
#[derive(Debug, Clone)]
struct Json {
    root: Node,
    /// The field names, in the record's order.
    names: Vec<String>,
    types: Vec<JsonType>,
}

#[derive(Debug, Clone, Default)]
struct Node {
    children: BTreeMap<String, Child>,
}

#[derive(Debug, Clone)]
enum Child {
    /// The field at this place of the record.
    Leaf(usize),
    /// An object holding fields further down their paths.
    Object(Node),
}

impl Decoder {
    /// `format: text`: the line as the one field `line`.
    pub fn text() -> Self {
        Self { json: None }
    }

    /// `format: json` with `fields` (names sorted, as the plan's fields are): an object per
    /// line.
    pub fn json(fields: &BTreeMap<String, JsonType>) -> Result<Self, String> {
        let mut root = Node::default();
        for (i, name) in fields.keys().enumerate() {
            let parts: Vec<&str> = name.split('.').collect();
            let (last, path) = parts.split_last().ok_or("a field without a name")?;
            let mut node = &mut root;
            for p in path {
                let child = node
                    .children
                    .entry(p.to_string())
                    .or_insert_with(|| Child::Object(Node::default()));
                node = match child {
                    Child::Object(n) => n,
                    Child::Leaf(_) => {
                        return Err(format!("field {name:?} is below another field"));
                    }
                };
            }
            if node.children.insert(last.to_string(), Child::Leaf(i)).is_some() {
                return Err(format!("field {name:?} is the path of another field"));
            }
        }
        Ok(Self {
            json: Some(Json {
                root,
                names: fields.keys().cloned().collect(),
                types: fields.values().copied().collect(),
            }),
        })
    }

    /// The decoder of a source's format (which the plan checked).
    pub fn of(format: &LineFormat<'_>) -> Result<Self, String> {
        match (format.format, format.fields) {
            (SourceFormat::Text, _) => Ok(Self::text()),
            (SourceFormat::Json, Some(fields)) => Self::json(fields),
            (SourceFormat::Json, None) => Err("format: json without fields".into()),
            (SourceFormat::Raw, _) => Err("format: raw is read by a kafka_source itself".into()),
        }
    }

    /// The record of `line` (without its line end), or why it has none.
    pub fn decode(&self, line: &[u8]) -> Result<Record, String> {
        let text = std::str::from_utf8(line)
            .map_err(|e| format!("the line is not UTF-8 (at byte {})", e.valid_up_to()))?;
        let Some(json) = &self.json else { return Ok(vec![Value::str(text)]) };
        if text.trim().is_empty() {
            return Err("an empty line, not a JSON object".into());
        }
        let mut st = State { json, out: vec![None; json.names.len()], why: None };
        let mut de = serde_json::Deserializer::from_str(text);
        let parsed = ObjectSeed { node: &json.root, path: "", st: &mut st }
            .deserialize(&mut de)
            .and_then(|()| de.end());
        if let Err(e) = parsed {
            return Err(st.why.take().unwrap_or_else(|| syntax(&e)));
        }
        st.out
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                v.ok_or_else(|| {
                    format!(
                        "field {:?} is missing (expected {})",
                        json.names[i],
                        expected(json.types[i])
                    )
                })
            })
            .collect()
    }
}

/// A JSON syntax error, where it is in the line.
fn syntax(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let at = format!(" at line {} column {}", e.line(), e.column());
    let what = full.strip_suffix(&at).unwrap_or(&full);
    match e.classify() {
        serde_json::error::Category::Eof => {
            format!("not JSON: the line ends inside a value ({what})")
        }
        _ => format!("not JSON: {what} at column {}", e.column()),
    }
}

/// How messages name what a type expects.
fn expected(t: JsonType) -> &'static str {
    match t {
        JsonType::String => "string",
        JsonType::Int => "int",
        JsonType::Float => "float",
        JsonType::Bool => "bool",
        JsonType::Timestamp => "timestamp (epoch milliseconds or an RFC 3339 string)",
    }
}

/// What a decode is making: the fields found so far, and why it failed when it did (the
/// message, which serde_json would otherwise give its own position).
struct State<'a> {
    json: &'a Json,
    out: Vec<Option<Value>>,
    why: Option<String>,
}

impl State<'_> {
    fn fail<E: de::Error>(&mut self, why: String) -> E {
        self.why.get_or_insert(why);
        E::custom("a field of the wrong type")
    }
}

/// A JSON value, for messages: a string cut short, a number, an object, ...
fn got_str(s: &str) -> String {
    const SHOWN: usize = 40;
    match s.char_indices().nth(SHOWN) {
        Some((i, _)) => format!("the string {:?}...", &s[..i]),
        None => format!("the string {s:?}"),
    }
}

/// Reads an object: the fields of `node` (at `path`) into the state, the rest skipped.
struct ObjectSeed<'s, 'a> {
    node: &'a Node,
    path: &'a str,
    st: &'s mut State<'a>,
}

/// What an object seed saw instead of an object.
fn not_object<E: de::Error>(seed: ObjectSeed<'_, '_>, got: String) -> Result<(), E> {
    let why = if seed.path.is_empty() {
        format!("not a JSON object: the line holds {got}")
    } else {
        format!("field {:?}: expected an object (of {}), got {got}", seed.path, seed.inner())
    };
    Err(seed.st.fail(why))
}

impl ObjectSeed<'_, '_> {
    /// The first field inside it, for messages.
    fn inner(&self) -> String {
        let mut node = self.node;
        loop {
            match node.children.values().next() {
                Some(Child::Leaf(i)) => return format!("{:?}", self.st.json.names[*i]),
                Some(Child::Object(n)) => node = n,
                None => return "its fields".into(),
            }
        }
    }
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        let Self { node, st, .. } = self;
        let json = st.json;
        while let Some(child) = map.next_key_seed(KeySeed(node))? {
            match child {
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
                Some(Child::Leaf(i)) => {
                    let (name, t) = (&json.names[*i], json.types[*i]);
                    let v = map.next_value_seed(LeafSeed { name, t, st: &mut *st })?;
                    if st.out[*i].replace(v).is_some() {
                        return Err(st.fail(format!("field {name:?} appears twice")));
                    }
                }
                Some(Child::Object(inner)) => {
                    // The path of the object: the first field's name up to it.
                    let path = object_path(json, inner);
                    map.next_value_seed(ObjectSeed { node: inner, path, st: &mut *st })?;
                }
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        not_object(self, "an array".into())
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
        let got = got_str(s);
        not_object(self, got)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        not_object(self, format!("the number {v}"))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        not_object(self, format!("the number {v}"))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        not_object(self, format!("the number {v}"))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        not_object(self, format!("{v}"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        not_object(self, "null".into())
    }
}

/// The dotted path of object `node` (a node of `json`'s tree): its first field's name, cut
/// where the node's part ends.
fn object_path<'a>(json: &'a Json, node: &Node) -> &'a str {
    let mut n = node;
    let mut below = 0;
    let first = loop {
        match n.children.iter().next() {
            Some((_, Child::Leaf(i))) => break &json.names[*i],
            Some((_, Child::Object(inner))) => {
                below += 1;
                n = inner;
            }
            None => return "",
        }
    };
    // `first` is `<path of node>.<below parts>.<leaf>`: drop the last `below + 1` parts.
    let mut end = first.len();
    for _ in 0..=below {
        end = first[..end].rfind('.').unwrap_or(0);
    }
    &first[..end]
}

/// Finds a key among a node's children without allocating for it.
struct KeySeed<'a>(&'a Node);

impl<'de, 'a> DeserializeSeed<'de> for KeySeed<'a> {
    type Value = Option<&'a Child>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, 'a> Visitor<'de> for KeySeed<'a> {
    type Value = Option<&'a Child>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(self.0.children.get(s))
    }
}

/// Reads the value of field `name` as type `t`.
struct LeafSeed<'s, 'a> {
    name: &'a str,
    t: JsonType,
    st: &'s mut State<'a>,
}

impl LeafSeed<'_, '_> {
    fn wrong<E: de::Error>(self, got: String) -> Result<Value, E> {
        let why = format!("field {:?}: expected {}, got {got}", self.name, expected(self.t));
        Err(self.st.fail(why))
    }

    fn int<E: de::Error>(self, v: i128, shown: &dyn fmt::Display) -> Result<Value, E> {
        match i64::try_from(v) {
            Ok(i) => Ok(Value::Int(i)),
            Err(_) => self.wrong(format!("the number {shown}, which is beyond 64 bits")),
        }
    }
}

/// 2^63, the first float beyond an i64.
const I64_END: f64 = 9_223_372_036_854_775_808.0;

impl<'de> DeserializeSeed<'de> for LeafSeed<'_, '_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for LeafSeed<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(expected(self.t))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        match self.t {
            JsonType::Int | JsonType::Timestamp => Ok(Value::Int(v)),
            JsonType::Float => Ok(Value::Float(v as f64)),
            _ => self.wrong(format!("the number {v}")),
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        match self.t {
            JsonType::Int | JsonType::Timestamp => self.int(i128::from(v), &v),
            JsonType::Float => Ok(Value::Float(v as f64)),
            _ => self.wrong(format!("the number {v}")),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        match self.t {
            JsonType::Float => Ok(Value::Float(v)),
            // A whole number written as a float (`3.0`, `1e3`, or digits beyond 64 bits).
            JsonType::Int | JsonType::Timestamp if v.fract() != 0.0 => {
                self.wrong(format!("the number {v}, which is not a whole number"))
            }
            JsonType::Int | JsonType::Timestamp if (-I64_END..I64_END).contains(&v) => {
                Ok(Value::Int(v as i64))
            }
            JsonType::Int | JsonType::Timestamp => {
                self.wrong(format!("the number {v}, which is beyond 64 bits"))
            }
            _ => self.wrong(format!("the number {v}")),
        }
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        match self.t {
            JsonType::String => Ok(Value::str(s)),
            JsonType::Timestamp => match rfc3339_millis(s) {
                Some(ms) => Ok(Value::Int(ms)),
                None => {
                    let got = got_str(s);
                    self.wrong(format!("{got}, which is not RFC 3339 (2024-06-01T12:00:00Z)"))
                }
            },
            _ => {
                let got = got_str(s);
                self.wrong(got)
            }
        }
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        match self.t {
            JsonType::Bool => Ok(Value::Bool(v)),
            _ => self.wrong(format!("{v}")),
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        let why = format!("field {:?} is null (expected {})", self.name, expected(self.t));
        Err(self.st.fail(why))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Value, A::Error> {
        self.wrong("an array".into())
    }

    fn visit_map<M: MapAccess<'de>>(self, _: M) -> Result<Value, M::Error> {
        self.wrong("an object".into())
    }
}

/// Epoch milliseconds of an RFC 3339 time (`2024-06-01T12:00:00.250+02:00`), rounded down.
fn rfc3339_millis(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok()
}

// ---------------------------------------------------------------------------------------------
// A source's lines, with its onError

/// A source subtask's decoder with what its `onError` does: a line that does not parse fails
/// the job (a user error naming the operator, where the line is and why), or is skipped,
/// counted and, the first [`LOGGED_SKIPS`] times, logged.
#[derive(Debug)]
pub struct SourceDecoder {
    decoder: Decoder,
    on_error: OnError,
    /// `operator "lines" (file_source)`, for messages.
    who: String,
    subtask: u32,
    /// Lines skipped since the last [`SourceDecoder::take_dropped`].
    dropped: u64,
    logged: u32,
}

impl SourceDecoder {
    /// Subtask `subtask` of operator `uid` of type `type_name`, reading `format`.
    pub fn new(
        format: &LineFormat<'_>,
        uid: &str,
        type_name: &str,
        subtask: u32,
    ) -> Result<Self, RuntimeError> {
        let who = format!("operator {uid:?} ({type_name})");
        let decoder = Decoder::of(format)
            .map_err(|e| RuntimeError::internal(format!("{who}: its plan's format: {e}")))?;
        Ok(Self { decoder, on_error: format.on_error, who, subtask, dropped: 0, logged: 0 })
    }

    /// `format: text`, failing on a line that is not UTF-8 (tests, and sources without a
    /// format of their own).
    pub fn text(who: &str) -> Self {
        Self {
            decoder: Decoder::text(),
            on_error: OnError::Fail,
            who: who.to_string(),
            subtask: 0,
            dropped: 0,
            logged: 0,
        }
    }

    /// Decodes `line` into `out`; `position` says where it is (`in.json line 3`), asked only
    /// when the line does not parse. Skipped, nothing is appended.
    pub fn push(
        &mut self,
        line: Line<'_>,
        position: impl FnOnce() -> String,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        let decoded = if line.too_long {
            Err(format!("the line is longer than {} MiB", MAX_LINE_BYTES >> 20))
        } else {
            self.decoder.decode(line.bytes)
        };
        let why = match decoded {
            Ok(r) => {
                out.push(r);
                return Ok(());
            }
            Err(why) => why,
        };
        match self.on_error {
            // (A dead letter is the source's to write: it decodes with `decode`.)
            OnError::Fail | OnError::DeadLetter => Err(RuntimeError::user(format!(
                "{}: {}: {why}: fix the line, or set onError: skip to drop such lines",
                self.who,
                position()
            ))),
            OnError::Skip => {
                self.dropped += 1;
                if self.logged < LOGGED_SKIPS {
                    self.logged += 1;
                    let more = if self.logged == LOGGED_SKIPS {
                        " (further lines skipped are counted in weir_operator_records_dropped_total, not logged)"
                    } else {
                        ""
                    };
                    eprintln!(
                        "weir: {} subtask {}: skipped {}: {why}: {}{more}",
                        self.who,
                        self.subtask,
                        position(),
                        shown_line(line.bytes)
                    );
                }
                Ok(())
            }
        }
    }

    /// `bytes` decoded, or what is wrong with them (for a source that sends what does not
    /// parse elsewhere).
    pub fn decode(&self, bytes: &[u8]) -> Result<Record, String> {
        self.decoder.decode(bytes)
    }

    /// Lines skipped since the last call (counted in `weir_operator_records_dropped_total`).
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

/// A line for a log: quoted and escaped, its first bytes only when it is long.
fn shown_line(bytes: &[u8]) -> String {
    if bytes.len() <= LOGGED_LINE_BYTES {
        return format!("{:?}", String::from_utf8_lossy(bytes));
    }
    format!("{:?}... ({} bytes)", String::from_utf8_lossy(&bytes[..LOGGED_LINE_BYTES]), bytes.len())
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Writes records as lines, as a sink's `format` says: `csv` (the values joined by commas,
/// as they are) or `json` (an object per line keyed by the input's field names, a dotted name
/// as that one flat key; strings escaped by serde_json, a float that is not finite as
/// `null`).
#[derive(Debug, Clone)]
pub struct Encoder {
    /// With `json`: each field's key, quoted and escaped, with its colon (`"word":`).
    keys: Option<Vec<String>>,
    csv: String,
}

impl Encoder {
    /// `format` for records of the fields `names`.
    pub fn new(format: SinkFormat, names: &[String]) -> Self {
        let keys = match format {
            SinkFormat::Csv => None,
            SinkFormat::Json => Some(
                names
                    .iter()
                    .map(|n| {
                        let mut k = serde_json::Value::from(n.as_str()).to_string();
                        k.push(':');
                        k
                    })
                    .collect(),
            ),
        };
        Self { keys, csv: String::new() }
    }

    /// Appends `records` to `out`, each a line ended by `\n`.
    pub fn write(&mut self, records: &[Record], out: &mut Vec<u8>) {
        let Some(keys) = &self.keys else {
            for r in records {
                self.csv.clear();
                crate::record::to_line(r, &mut self.csv);
                out.extend_from_slice(self.csv.as_bytes());
                out.push(b'\n');
            }
            return;
        };
        for r in records {
            out.push(b'{');
            for (i, v) in r.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // A record longer than its fields (never from a checked plan) keeps its
                // values under their places.
                match keys.get(i) {
                    Some(k) => out.extend_from_slice(k.as_bytes()),
                    None => out.extend_from_slice(format!("\"{i}\":").as_bytes()),
                }
                // Writing into a vector does not fail, nor does serializing these.
                let _ = match v {
                    Value::Str(s) => serde_json::to_writer(&mut *out, &**s),
                    Value::Int(n) => serde_json::to_writer(&mut *out, n),
                    Value::Float(f) => serde_json::to_writer(&mut *out, f),
                    Value::Bool(b) => serde_json::to_writer(&mut *out, b),
                };
            }
            out.extend_from_slice(b"}\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder(fields: &[(&str, JsonType)]) -> Decoder {
        Decoder::json(&fields.iter().map(|(n, t)| (n.to_string(), *t)).collect()).unwrap()
    }

    fn bids() -> Decoder {
        use JsonType::*;
        decoder(&[
            ("auction", Int),
            ("bid.ok", Bool),
            ("bid.price", Float),
            ("bid.who.name", String),
            ("ts", Timestamp),
        ])
    }

    fn err(d: &Decoder, line: &str) -> String {
        d.decode(line.as_bytes()).unwrap_err()
    }

    #[test]
    fn every_type_and_nested_paths_decode_in_the_fields_order() {
        let d = bids();
        let r = d
            .decode(br#"{"ts": 1700000000123, "x": [1, {"y": null}], "bid": {"price": 2.5, "ok": true, "who": {"name": "\u00e9va \"e\""}, "more": {}}, "auction": -7}"#)
            .unwrap();
        assert_eq!(
            r,
            vec![
                Value::Int(-7),
                Value::Bool(true),
                Value::Float(2.5),
                Value::str("éva \"e\""),
                Value::Int(1_700_000_000_123),
            ]
        );
        // A float field takes an integer; an int field a whole float; extremes of i64.
        let r = d
            .decode(br#"{"auction": 9223372036854775807, "bid": {"price": 3, "ok": false, "who": {"name": ""}}, "ts": -9223372036854775808}"#)
            .unwrap();
        assert_eq!(r[0], Value::Int(i64::MAX));
        assert_eq!(r[2], Value::Float(3.0));
        assert_eq!(r[4], Value::Int(i64::MIN));
        let r = d
            .decode(br#"{"auction": 1e3, "bid": {"price": -1.5e-3, "ok": false, "who": {"name": "a"}}, "ts": 2.0}"#)
            .unwrap();
        assert_eq!(
            (r[0].clone(), r[2].clone(), r[4].clone()),
            (Value::Int(1000), Value::Float(-0.0015), Value::Int(2))
        );
        // Text: the line as it is.
        assert_eq!(Decoder::text().decode(b" a, b ").unwrap(), vec![Value::str(" a, b ")]);
    }

    #[test]
    fn timestamps_are_epoch_milliseconds_or_rfc3339_strings() {
        let d = decoder(&[("ts", JsonType::Timestamp)]);
        let ts = |line: &str| d.decode(line.as_bytes()).map(|r| r[0].clone());
        assert_eq!(ts(r#"{"ts": 0}"#), Ok(Value::Int(0)));
        assert_eq!(ts(r#"{"ts": "1970-01-01T00:00:00Z"}"#), Ok(Value::Int(0)));
        assert_eq!(ts(r#"{"ts": "2023-11-14T22:13:20.123Z"}"#), Ok(Value::Int(1_700_000_000_123)));
        assert_eq!(
            ts(r#"{"ts": "2023-11-15T00:13:20.1239+02:00"}"#),
            Ok(Value::Int(1_700_000_000_123)),
            "an offset, and a fraction below the millisecond rounded down"
        );
        assert_eq!(ts(r#"{"ts": "1969-12-31T23:59:59.9995Z"}"#), Ok(Value::Int(-1)));
        for bad in ["2023-11-14", "2023-11-14T22:13:20", "yesterday", "2023-13-01T00:00:00Z", ""] {
            let e = ts(&format!(r#"{{"ts": "{bad}"}}"#)).unwrap_err();
            assert!(
                e.starts_with(&format!(
                    "field \"ts\": expected timestamp (epoch milliseconds or an RFC 3339 string), got the string {bad:?}, which is not RFC 3339"
                )),
                "{e}"
            );
        }
        let e = ts(r#"{"ts": 1.5}"#).unwrap_err();
        assert!(
            e.contains("field \"ts\": expected timestamp") && e.contains("not a whole number"),
            "{e}"
        );
        assert!(ts(r#"{"ts": true}"#).unwrap_err().contains("got true"));
    }

    #[test]
    fn every_error_names_the_field_and_the_type_expected() {
        use JsonType::*;
        let d = decoder(&[("b", Bool), ("f", Float), ("i", Int), ("s", String)]);
        let ok = r#"{"b": true, "f": 1.5, "i": 2, "s": "x"}"#;
        assert!(d.decode(ok.as_bytes()).is_ok());
        let cases = [
            (r#"{"b": true, "f": 1.5, "i": 2}"#, r#"field "s" is missing (expected string)"#),
            (
                r#"{"b": true, "f": 1.5, "i": 2, "s": null}"#,
                r#"field "s" is null (expected string)"#,
            ),
            (
                r#"{"b": true, "f": 1.5, "i": 2, "s": 5}"#,
                r#"field "s": expected string, got the number 5"#,
            ),
            (
                r#"{"b": true, "f": 1.5, "i": 2.5, "s": "x"}"#,
                r#"field "i": expected int, got the number 2.5, which is not a whole number"#,
            ),
            (
                r#"{"b": true, "f": 1.5, "i": 9223372036854775808, "s": "x"}"#,
                r#"field "i": expected int, got the number 9223372036854775808, which is beyond 64 bits"#,
            ),
            (
                r#"{"b": true, "f": 1.5, "i": -1e19, "s": "x"}"#,
                r#"field "i": expected int, got the number -10000000000000000000, which is beyond 64 bits"#,
            ),
            (
                r#"{"b": true, "f": 1.5, "i": "2", "s": "x"}"#,
                r#"field "i": expected int, got the string "2""#,
            ),
            (
                r#"{"b": true, "f": "1.5", "i": 2, "s": "x"}"#,
                r#"field "f": expected float, got the string "1.5""#,
            ),
            (
                r#"{"b": 1, "f": 1.5, "i": 2, "s": "x"}"#,
                r#"field "b": expected bool, got the number 1"#,
            ),
            (
                r#"{"b": "true", "f": 1.5, "i": 2, "s": "x"}"#,
                r#"field "b": expected bool, got the string "true""#,
            ),
            (
                r#"{"b": [true], "f": 1.5, "i": 2, "s": "x"}"#,
                r#"field "b": expected bool, got an array"#,
            ),
            (
                r#"{"b": true, "f": {}, "i": 2, "s": "x"}"#,
                r#"field "f": expected float, got an object"#,
            ),
            (r#"{"b": true, "f": 1.5, "i": 2, "s": "x", "i": 3}"#, r#"field "i" appears twice"#),
            (r#"[1, 2]"#, "not a JSON object: the line holds an array"),
            (r#""s""#, r#"not a JSON object: the line holds the string "s""#),
            ("null", "not a JSON object: the line holds null"),
            ("", "an empty line, not a JSON object"),
            (" \t", "an empty line, not a JSON object"),
            (
                r#"{"b": true, "f": 1.5, "i": 2, "s": "x"} x"#,
                "not JSON: trailing characters at column 41",
            ),
            (r#"{"b": true, "f": 1.5, "i": 2, "s": "x""#, "not JSON: the line ends inside a value"),
            (r#"{"b": tru}"#, "not JSON: expected ident at column 10"),
            (
                r#"{"b": true, "f": 1e400, "i": 2, "s": "x"}"#,
                "not JSON: number out of range at column 22",
            ),
            (r#"{'b': true}"#, "not JSON: key must be a string at column 2"),
        ];
        for (line, want) in cases {
            let e = err(&d, line);
            assert!(e.starts_with(want), "{line}: {e} is not {want}");
        }
        let long =
            format!(r#"{{"b": true, "f": 1.5, "i": 2, "s": 7, "x": "{}"}}"#, "y".repeat(100));
        assert_eq!(err(&d, &long), r#"field "s": expected string, got the number 7"#);
        let long = format!(r#"{{"b": true, "f": 1.5, "i": "{}", "s": "x"}}"#, "é".repeat(100));
        let e = err(&d, &long);
        assert!(
            e.chars().count() < 100 && e.ends_with("...") && e.contains("éééé"),
            "a long value is cut: {e}"
        );
        // A nested field whose object is something else, or missing.
        let d = bids();
        let e = err(&d, r#"{"auction": 1, "bid": 5, "ts": 1}"#);
        assert_eq!(e, r#"field "bid": expected an object (of "bid.ok"), got the number 5"#);
        let e = err(&d, r#"{"auction": 1, "bid": {"ok": true, "price": 1, "who": null}, "ts": 1}"#);
        assert_eq!(e, r#"field "bid.who": expected an object (of "bid.who.name"), got null"#);
        let e = err(&d, r#"{"auction": 1, "bid": {"ok": true, "price": 1}, "ts": 1}"#);
        assert_eq!(e, r#"field "bid.who.name" is missing (expected string)"#);
        // A literal dotted key is not a path.
        let e = err(&d, r#"{"auction": 1, "bid.ok": true, "ts": 1}"#);
        assert_eq!(e, r#"field "bid.ok" is missing (expected bool)"#);
    }

    #[test]
    fn attacker_input_gives_errors_not_panics() {
        let d = bids();
        // Deep nesting, in a field that is read and in one that is skipped.
        for deep in [
            format!(r#"{{"bid": {}{}}}"#, "[".repeat(100_000), "]".repeat(100_000)),
            format!(r#"{{"x": {}{}}}"#, "[".repeat(100_000), "]".repeat(100_000)),
            format!(r#"{{"x": {}1{}}}"#, r#"{"a":"#.repeat(100_000), "}".repeat(100_000)),
            "[".repeat(1_000_000),
        ] {
            assert!(d.decode(deep.as_bytes()).is_err());
        }
        // Huge numbers, long numbers, long strings, invalid UTF-8, control bytes, NUL.
        for line in [
            format!(r#"{{"auction": {}}}"#, "9".repeat(10_000)),
            format!(r#"{{"auction": 1.{}e99999999999}}"#, "0".repeat(10_000)),
            format!(r#"{{"auction": "{}"}}"#, "a".repeat(1 << 20)),
            "{\"auction\": \"\x01\"}".to_string(),
            "{\"auction\"\0: 1}".to_string(),
            r#"{"bid": {"who": {"name": "\ud800"}}}"#.to_string(),
        ] {
            assert!(d.decode(line.as_bytes()).is_err(), "{}", &line[..line.len().min(60)]);
        }
        let e = d.decode(b"{\"auction\": \"\xff\xfe\"}").unwrap_err();
        assert_eq!(e, "the line is not UTF-8 (at byte 13)");
        assert_eq!(
            Decoder::text().decode(b"ab\xc3").unwrap_err(),
            "the line is not UTF-8 (at byte 2)"
        );
        // Random bytes.
        let alphabet = b"{}[]\":,0123456789.eE-+truefalsnl \\u";
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let line: Vec<u8> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    alphabet[(x % alphabet.len() as u64) as usize]
                })
                .collect();
            let _ = d.decode(&line);
        }
    }

    #[test]
    fn the_decoder_refuses_fields_that_are_both_a_value_and_an_object() {
        let f = |names: &[&str]| {
            Decoder::json(&names.iter().map(|n| (n.to_string(), JsonType::Int)).collect())
                .map(|_| ())
        };
        assert!(f(&["a", "b.c", "b.d.e"]).is_ok());
        assert!(f(&["b", "b.c"]).unwrap_err().contains("\"b.c\" is below another field"));
    }

    /// A reader that gives its bytes a few at a time, with a timeout between pieces.
    struct Trickle {
        pieces: Vec<Vec<u8>>,
        at: usize,
        timeout_next: bool,
    }

    impl std::io::Read for Trickle {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            unreachable!("read through BufRead")
        }
    }

    impl BufRead for Trickle {
        fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
            if std::mem::take(&mut self.timeout_next) {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Ok(self.pieces.get(self.at).map_or(&[][..], |p| p.as_slice()))
        }
        fn consume(&mut self, n: usize) {
            let p = &mut self.pieces[self.at];
            p.drain(..n);
            if p.is_empty() {
                self.at += 1;
                self.timeout_next = true;
            }
        }
    }

    #[test]
    fn lines_are_read_across_timeouts_and_a_long_one_is_cut_and_read_past() {
        let long = vec![b'x'; MAX_LINE_BYTES + 10];
        let pieces = vec![
            b"ab".to_vec(),
            "c\u{e9}".as_bytes()[..2].to_vec(), // a character cut by a timeout
            "c\u{e9}".as_bytes()[2..].to_vec(),
            b"\r\n\nlast\r\n".to_vec(),
            long[..MAX_LINE_BYTES - 1].to_vec(),
            long[MAX_LINE_BYTES - 1..].to_vec(),
            b"\nend".to_vec(),
        ];
        let mut r = Trickle { pieces, at: 0, timeout_next: false };
        let mut lines = LineBuffer::new();
        let mut got: Vec<(Vec<u8>, u64, bool)> = Vec::new();
        loop {
            match lines.read(&mut r) {
                Ok(Some(l)) => {
                    got.push((l.bytes[..l.bytes.len().min(10)].to_vec(), l.consumed, l.too_long))
                }
                Ok(None) => break,
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
            }
        }
        assert_eq!(
            got,
            vec![
                ("abc\u{e9}".as_bytes().to_vec(), 7, false),
                (b"".to_vec(), 1, false),
                (b"last".to_vec(), 6, false),
                (b"xxxxxxxxxx".to_vec(), MAX_LINE_BYTES as u64 + 11, true),
                (b"end".to_vec(), 3, false),
            ]
        );
        assert!(lines.buf.capacity() <= 2 * MAX_LINE_BYTES, "{}", lines.buf.capacity());
        // A line of exactly the limit is not too long.
        let mut exact = vec![b'y'; MAX_LINE_BYTES];
        exact.push(b'\n');
        let mut lines = LineBuffer::new();
        let l = lines.read(&mut std::io::Cursor::new(exact)).unwrap().unwrap();
        assert_eq!((l.bytes.len(), l.too_long), (MAX_LINE_BYTES, false));
    }

    #[test]
    fn skip_counts_and_fail_names_the_operator_and_the_position() {
        let fields: BTreeMap<String, JsonType> = [("n".to_string(), JsonType::Int)].into();
        let mut format = LineFormat {
            format: SourceFormat::Json,
            fields: Some(&fields),
            on_error: OnError::Skip,
        };
        let line =
            |b: &'static [u8]| Line { bytes: b, consumed: b.len() as u64 + 1, too_long: false };
        let mut d = SourceDecoder::new(&format, "in", "file_source", 1).unwrap();
        let mut out = Vec::new();
        let lines: [&'static [u8]; 5] =
            [br#"{"n": 1}"#, b"{", br#"{"n": 2}"#, b"\xff", br#"{"n": "x"}"#];
        for b in lines {
            d.push(line(b), || "f line 1".into(), &mut out).unwrap();
        }
        let too_long = Line { bytes: b"xx", consumed: 99, too_long: true };
        d.push(too_long, || "f line 9".into(), &mut out).unwrap();
        assert_eq!(out, vec![vec![Value::Int(1)], vec![Value::Int(2)]]);
        assert_eq!((d.take_dropped(), d.take_dropped()), (4, 0));
        format.on_error = OnError::Fail;
        let mut d = SourceDecoder::new(&format, "in", "file_source", 0).unwrap();
        let e =
            d.push(line(br#"{"n": 1.5}"#), || "/data/a.json line 7".into(), &mut out).unwrap_err();
        assert_eq!(e.whose, crate::error::Whose::User);
        assert_eq!(
            e.message,
            "operator \"in\" (file_source): /data/a.json line 7: field \"n\": expected int, got the number 1.5, which is not a whole number: fix the line, or set onError: skip to drop such lines"
        );
        let e = d.push(too_long, || "f line 9".into(), &mut out).unwrap_err();
        assert!(e.message.contains("f line 9: the line is longer than 16 MiB"), "{}", e.message);
        assert_eq!(shown_line(b"a\"b"), r#""a\"b""#);
        let shown = shown_line(&[b'z'; 500]);
        assert!(shown.ends_with("...\u{0020}(500 bytes)") && shown.len() < 150, "{shown}");
    }

    fn json_n(on_error: OnError) -> (BTreeMap<String, JsonType>, OnError) {
        ([("n".to_string(), JsonType::Int)].into(), on_error)
    }

    #[test]
    fn a_socket_reads_json_lines_and_skips_bad_ones_by_their_number() {
        use crate::operator::Source;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            use std::io::Write;
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"n\": 1}\n{\"n\": 2.5}\n{\"n\"").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(150));
            s.write_all(b": 3}\r\n{\"n\": 4}").unwrap();
        });
        let (fields, on_error) = json_n(OnError::Skip);
        let format = LineFormat { format: SourceFormat::Json, fields: Some(&fields), on_error };
        let decoder = SourceDecoder::new(&format, "sock", "socket", 0).unwrap();
        let mut src = crate::connectors::SocketSource::new("127.0.0.1", port, 0)
            .unwrap()
            .decode_with(decoder);
        let mut out = Vec::new();
        let mut dropped = 0;
        let t = std::time::Instant::now();
        while src.poll(&mut out, 100).unwrap() {
            dropped += src.take_dropped();
            assert!(t.elapsed().as_secs() < 20, "the socket never ended");
        }
        server.join().unwrap();
        dropped += src.take_dropped();
        // Line 2 is skipped; a line cut by a pause is read whole; the last needs no newline.
        assert_eq!(out, vec![vec![Value::Int(1)], vec![Value::Int(3)], vec![Value::Int(4)]]);
        assert_eq!(dropped, 1);
    }

    #[test]
    fn a_file_source_names_the_line_or_the_byte_it_resumed_before() {
        use crate::operator::Source;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("in.json");
        std::fs::write(&path, "{\"n\": 1}\n{\"n\": 2}\n{\"n\": true}\n").unwrap();
        let (fields, on_error) = json_n(OnError::Fail);
        let format = LineFormat { format: SourceFormat::Json, fields: Some(&fields), on_error };
        let files = crate::connectors::list_source_files(
            &weir_crds::StorageUri::Local(tmp.path().to_path_buf()),
            None,
        )
        .unwrap();
        let source = || {
            let d = SourceDecoder::new(&format, "in", "file_source", 0).unwrap();
            crate::connectors::FileSource::new(&files, None, None, 0, 1).decode_with(d)
        };
        let mut out = Vec::new();
        let e = source().poll(&mut out, 10).unwrap_err();
        assert_eq!(out, vec![vec![Value::Int(1)], vec![Value::Int(2)]]);
        let want = format!("{} line 3: field \"n\": expected int, got true", path.display());
        assert!(e.message.contains(&want), "{}", e.message);
        // Resumed from a checkpoint after the first line: the line's byte offset.
        let mut resumed = source();
        let file = serde_json::to_value(&files[0]).unwrap();
        resumed.restore(serde_json::json!({"files": [{"file": file, "offset": 9}]})).unwrap();
        let e = resumed.poll(&mut Vec::new(), 10).unwrap_err();
        let want = format!("{} at byte 18: field \"n\"", path.display());
        assert!(e.message.contains(&want), "{}", e.message);
    }

    #[test]
    fn json_output_escapes_strings_and_writes_floats_as_numbers() {
        let names =
            ["word".to_string(), "bid.price".to_string(), "ok".into(), "n".into(), "q\"".into()];
        let mut e = Encoder::new(SinkFormat::Json, &names);
        let mut out = Vec::new();
        e.write(
            &[
                vec![
                    Value::str("a\"b\\\n\u{1}é"),
                    Value::Float(2.5),
                    Value::Bool(true),
                    Value::Int(-3),
                    Value::Float(1.0),
                ],
                vec![
                    Value::str(""),
                    Value::Float(f64::NAN),
                    Value::Bool(false),
                    Value::Int(i64::MIN),
                    Value::Float(f64::INFINITY),
                ],
            ],
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "{\"word\":\"a\\\"b\\\\\\n\\u0001é\",\"bid.price\":2.5,\"ok\":true,\"n\":-3,\"q\\\"\":1.0}\n{\"word\":\"\",\"bid.price\":null,\"ok\":false,\"n\":-9223372036854775808,\"q\\\"\":null}\n"
        );
        // Every line reads back as the object it says.
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v.as_object().unwrap().len(), 5);
        }
        let mut e = Encoder::new(SinkFormat::Csv, &names);
        let mut out = Vec::new();
        e.write(&[vec![Value::str("a"), Value::Float(2.5), Value::Bool(true)]], &mut out);
        assert_eq!(out, b"a,2.5,true\n");
    }
}
