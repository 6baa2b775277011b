//! `split`: a text field into words, a record each.

use crate::error::RuntimeError;
use crate::operator::Operator;
use crate::record::{Record, Value};

/// Splits a text field on white space: one record per word.
#[derive(Debug)]
pub struct Split {
    pub field: usize,
}

impl Operator for Split {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        for r in batch {
            if let Some(Value::Str(s)) = r.get(self.field) {
                out.extend(s.split_whitespace().map(|w| vec![Value::str(w)]));
            }
        }
        Ok(())
    }
}
