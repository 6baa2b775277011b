//! The `stdout` and `blackhole` sinks.

use std::io::Write;

use super::format::Encoder;
use crate::error::RuntimeError;
use crate::operator::Operator;
use crate::record::Record;

/// Prints each record as a line, as its encoder writes it (values joined by commas, or a JSON
/// object).
#[derive(Debug)]
pub struct Stdout {
    encoder: Encoder,
    buf: Vec<u8>,
}

impl Stdout {
    pub fn new(encoder: Encoder) -> Self {
        Self { encoder, buf: Vec::new() }
    }
}

impl Operator for Stdout {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        self.buf.clear();
        self.encoder.write(&batch, &mut self.buf);
        let mut lock = std::io::stdout().lock();
        match lock.write_all(&self.buf) {
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
