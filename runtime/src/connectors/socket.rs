//! The `socket` source: lines from a TCP server, read by one subtask (not replayable).

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use crate::error::RuntimeError;
use crate::event_time::{EventClock, SplitTime, Watermark};
use crate::operator::Source;
use crate::record::{Record, Value};

/// Text lines from a TCP server (subtask 0 only), until it closes the connection.
#[derive(Debug)]
pub struct SocketSource {
    reader: Option<BufReader<std::net::TcpStream>>,
    buf: String,
    /// With `eventTime`: its clock, and the event time of its one split.
    clock: Option<(EventClock, SplitTime)>,
}

impl SocketSource {
    pub fn new(host: &str, port: u16, subtask: u32) -> Result<Self, RuntimeError> {
        if subtask != 0 {
            return Ok(Self { reader: None, buf: String::new(), clock: None });
        }
        let s = std::net::TcpStream::connect((host, port)).map_err(|e| {
            RuntimeError::external(format!("socket: connecting to {host}:{port}: {e}")).retryable()
        })?;
        s.set_read_timeout(Some(Duration::from_millis(100))).ok();
        Ok(Self { reader: Some(BufReader::new(s)), buf: String::new(), clock: None })
    }

    /// Its records carry the event time `clock` reads.
    pub fn with_event_time(mut self, clock: Option<EventClock>) -> Self {
        self.clock = clock.map(|c| (c, SplitTime::default()));
        self
    }
}

impl Source for SocketSource {
    fn watermark(&mut self) -> Option<Watermark> {
        let (clock, time) = self.clock.as_ref()?;
        Some(clock.watermark([time], Instant::now()))
    }

    fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> Result<bool, RuntimeError> {
        let from = out.len();
        let more = self.read(out, max)?;
        if let Some((clock, time)) = &mut self.clock {
            clock.observe(time, &out[from..], Instant::now())?;
        }
        Ok(more)
    }
}

impl SocketSource {
    fn read(&mut self, out: &mut Vec<Record>, max: usize) -> Result<bool, RuntimeError> {
        let Some(r) = self.reader.as_mut() else { return Ok(false) };
        for _ in 0..max {
            match r.read_line(&mut self.buf) {
                Ok(0) => {
                    self.reader = None;
                    return Ok(false);
                }
                Ok(_) => {
                    if self.buf.ends_with('\n') {
                        out.push(vec![Value::str(self.buf.trim_end_matches(['\n', '\r']))]);
                        self.buf.clear();
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(RuntimeError::external(format!("socket: {e}")).retryable()),
            }
        }
        Ok(true)
    }
}

// ---------------------------------------------------------------------------------------------
// Transforms
