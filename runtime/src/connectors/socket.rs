//! The `socket` source: lines from a TCP server, read by one subtask (not replayable).

use std::io::BufReader;
use std::time::{Duration, Instant};

use super::format::{LineBuffer, SourceDecoder};
use crate::error::RuntimeError;
use crate::event_time::{EventClock, SplitTime, Watermark};
use crate::operator::Source;
use crate::record::Record;

/// Lines from a TCP server (subtask 0 only), until it closes the connection.
#[derive(Debug)]
pub struct SocketSource {
    reader: Option<BufReader<std::net::TcpStream>>,
    buf: LineBuffer,
    /// Lines to records, with the source's `onError`.
    decoder: SourceDecoder,
    /// Where it reads (for messages) and the lines read so far.
    peer: String,
    lines: u64,
    /// With `eventTime`: its clock, and the event time of its one split.
    clock: Option<(EventClock, SplitTime)>,
}

impl SocketSource {
    pub fn new(host: &str, port: u16, subtask: u32) -> Result<Self, RuntimeError> {
        let mut source = Self {
            reader: None,
            buf: LineBuffer::new(),
            decoder: SourceDecoder::text("socket"),
            peer: format!("{host}:{port}"),
            lines: 0,
            clock: None,
        };
        if subtask != 0 {
            return Ok(source);
        }
        let s = std::net::TcpStream::connect((host, port)).map_err(|e| {
            RuntimeError::external(format!("socket: connecting to {host}:{port}: {e}")).retryable()
        })?;
        s.set_read_timeout(Some(Duration::from_millis(100))).ok();
        source.reader = Some(BufReader::new(s));
        Ok(source)
    }

    /// Reads its lines with `decoder` (the default: text, failing on a line that is not
    /// UTF-8).
    pub fn decode_with(mut self, decoder: SourceDecoder) -> Self {
        self.decoder = decoder;
        self
    }

    /// Its records carry the event time `clock` reads.
    pub fn with_event_time(mut self, clock: Option<EventClock>) -> Self {
        self.clock = clock.map(|c| (c, SplitTime::default()));
        self
    }

    fn read(&mut self, out: &mut Vec<Record>, max: usize) -> Result<bool, RuntimeError> {
        let Some(r) = self.reader.as_mut() else { return Ok(false) };

        for _ in 0..max {
            match self.buf.read(r) {
                Ok(None) => {
                    self.reader = None;
                    return Ok(false);
                }
                Ok(Some(line)) => {
                    self.lines += 1;
                    let (peer, n) = (&self.peer, self.lines);
                    self.decoder.push(line, || format!("{peer} line {n}"), out)?;
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

impl Source for SocketSource {
    fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> Result<bool, RuntimeError> {
        let from = out.len();
        let more = self.read(out, max)?;
        if let Some((clock, time)) = &mut self.clock {
            clock.observe(time, &out[from..], Instant::now())?;
        }
        Ok(more)
    }

    fn watermark(&mut self) -> Option<Watermark> {
        let (clock, time) = self.clock.as_ref()?;
        Some(clock.watermark([time], Instant::now()))
    }

    fn take_dropped(&mut self) -> u64 {
        self.decoder.take_dropped()
    }
}

// ---------------------------------------------------------------------------------------------
// Transforms
