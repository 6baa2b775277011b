//! The `stdout` and `blackhole` sinks.

use std::io::Write;

use crate::error::RuntimeError;
use crate::operator::Operator;
use crate::record::{Record, to_lines};

/// Prints each record as a line (fields joined by commas).
#[derive(Debug, Default)]
pub struct Stdout {
    buf: String,
}

impl Operator for Stdout {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        self.buf.clear();
        to_lines(&batch, &mut self.buf);
        let mut lock = std::io::stdout().lock();
        match lock.write_all(self.buf.as_bytes()) {
            // A closed pipe (`weir run ... | head`) is the reader's choice, not a failure.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            r => r.map_err(|e| RuntimeError::external(format!("stdout: {e}"))),
        }
    }
}

/// Discards records (counts them in the metrics).
#[derive(Debug, Default)]
pub struct Blackhole;

impl Operator for Blackhole {
    fn process(
        &mut self,
        _input: usize,
        _batch: Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        Ok(())
    }
}
