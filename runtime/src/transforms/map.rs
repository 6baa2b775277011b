//! `map`: fields set to values or other fields, then a selection of fields.

use crate::error::RuntimeError;
use crate::operator::Operator;
use crate::plan::MapSpec;
use crate::record::{Record, Value};

/// Sets, selects and re-cases fields.
#[derive(Debug)]
pub struct Map {
    /// For each field to set: its position in the output, and the template parts (literal
    /// text, or an input field position).
    set: Vec<(usize, Vec<Part>)>,
    upper: Vec<usize>,
    lower: Vec<usize>,
    select: Option<Vec<usize>>,
    width: usize,
}

#[derive(Debug)]
enum Part {
    Text(String),
    Field(usize),
}

impl Map {
    pub fn new(spec: &MapSpec, in_fields: &[String]) -> Self {
        let pos = |n: &str| in_fields.iter().position(|f| f == n).expect("checked by the plan");
        let mut all: Vec<String> = in_fields.to_vec();
        let mut set = Vec::new();
        for (name, template) in &spec.set {
            let at = match all.iter().position(|f| f == name) {
                Some(i) => i,
                None => {
                    all.push(name.clone());
                    all.len() - 1
                }
            };
            let mut parts = Vec::new();
            let mut rest = template.as_str();
            while let Some(i) = rest.find('{') {
                if i > 0 {
                    parts.push(Part::Text(rest[..i].to_string()));
                }
                let after = &rest[i + 1..];
                let Some(j) = after.find('}') else {
                    parts.push(Part::Text(rest[i..].to_string()));
                    rest = "";
                    break;
                };
                parts.push(Part::Field(pos(&after[..j])));
                rest = &after[j + 1..];
            }
            if !rest.is_empty() {
                parts.push(Part::Text(rest.to_string()));
            }
            set.push((at, parts));
        }
        let out_pos = |n: &str| all.iter().position(|f| f == n).expect("checked by the plan");
        Self {
            upper: spec.upper.iter().map(|f| pos(f)).collect(),
            lower: spec.lower.iter().map(|f| pos(f)).collect(),
            select: spec.select.as_ref().map(|s| s.iter().map(|f| out_pos(f)).collect()),
            width: all.len(),
            set,
        }
    }
}

impl Operator for Map {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        for mut r in batch {
            for &i in &self.upper {
                if let Value::Str(s) = &r[i] {
                    r[i] = Value::Str(s.to_uppercase().into());
                }
            }
            for &i in &self.lower {
                if let Value::Str(s) = &r[i] {
                    r[i] = Value::Str(s.to_lowercase().into());
                }
            }
            let input = r.clone();
            r.resize(self.width, Value::Int(0));
            for (at, parts) in &self.set {
                let mut s = String::new();
                for p in parts {
                    match p {
                        Part::Text(t) => s.push_str(t),
                        Part::Field(f) => s.push_str(&input[*f].to_string()),
                    }
                }
                r[*at] = Value::Str(s.into());
            }
            if let Some(sel) = &self.select {
                r = sel.iter().map(|&i| r[i].clone()).collect();
            }
            out.push(r);
        }
        Ok(())
    }
}
