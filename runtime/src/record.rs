//! Records: positional lists of values whose field names the plan knows per operator.

use std::fmt;

/// One field's value (serializable, for an operator that keeps records in its state).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Value {
    Str(Box<str>),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// A record: values in the order of its operator's fields.
pub type Record = Vec<Value>;

impl Value {
    /// Its kind, as the plan's field types see it.
    pub fn kind(&self) -> weir_crds::plan::ValueKind {
        use weir_crds::plan::ValueKind;
        match self {
            Value::Str(_) => ValueKind::Text,
            Value::Int(_) => ValueKind::Integer,
            Value::Float(_) => ValueKind::Float,
            Value::Bool(_) => ValueKind::Bool,
        }
    }

    /// The bytes a key is hashed and stored by.
    pub fn key_bytes<'a>(&'a self, scratch: &'a mut [u8; 8]) -> &'a [u8] {
        match self {
            Value::Str(s) => s.as_bytes(),
            Value::Int(i) => {
                *scratch = i.to_be_bytes();
                &scratch[..]
            }
            Value::Float(f) => {
                *scratch = f.to_bits().to_be_bytes();
                &scratch[..]
            }
            Value::Bool(b) => {
                scratch[0] = u8::from(*b);
                &scratch[..1]
            }
        }
    }

    /// The number it holds or reads as (text that parses as one); none for a boolean.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Str(s) => s.parse().ok(),
            Value::Bool(_) => None,
        }
    }

    /// [`Value::as_f64`] as an integer (a float cut towards zero).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Float(f) => Some(*f as i64),
            Value::Str(s) => s.parse().ok(),
            Value::Bool(_) => None,
        }
    }

    pub fn str(s: &str) -> Self {
        Value::Str(s.into())
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => f.write_str(s),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A record as a line: fields joined by commas.
pub fn to_line(r: &Record, out: &mut String) {
    use std::fmt::Write;
    for (i, v) in r.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{v}");
    }
}

/// Records as lines, each ended by a newline, appended to `out`.
pub fn to_lines(records: &[Record], out: &mut String) {
    for r in records {
        to_line(r, out);
        out.push('\n');
    }
}
