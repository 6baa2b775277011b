//! `filter`: records whose field compares to a value as the operator says.

use crate::error::RuntimeError;
use crate::operator::Operator;
use crate::plan::FilterSpec;
use crate::record::{Record, Value};

/// Keeps the records whose field meets every condition given.
#[derive(Debug)]
pub struct Filter {
    field: usize,
    spec: FilterSpec,
}

impl Filter {
    pub fn new(spec: &FilterSpec, in_fields: &[String]) -> Self {
        Self {
            field: in_fields.iter().position(|f| f == &spec.field).expect("checked by the plan"),
            spec: spec.clone(),
        }
    }

    fn keep(&self, v: &Value) -> bool {
        let eq = |j: &serde_json::Value| match (v, j) {
            (Value::Str(s), serde_json::Value::String(t)) => &**s == t.as_str(),
            (Value::Bool(b), serde_json::Value::Bool(t)) => b == t,
            (_, serde_json::Value::Number(n)) => v.as_f64() == n.as_f64(),
            _ => v.to_string() == *j,
        };
        self.spec.equals.as_ref().is_none_or(eq)
            && self.spec.not_equals.as_ref().is_none_or(|j| !eq(j))
            && self.spec.contains.as_ref().is_none_or(|c| v.to_string().contains(c.as_str()))
            && self.spec.greater_than.is_none_or(|g| v.as_f64().is_some_and(|x| x > g))
            && self.spec.less_than.is_none_or(|l| v.as_f64().is_some_and(|x| x < l))
            && self.spec.min_length.is_none_or(|m| v.to_string().chars().count() >= m)
    }
}

impl Operator for Filter {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        out.extend(batch.into_iter().filter(|r| self.keep(&r[self.field])));
        Ok(())
    }
}
