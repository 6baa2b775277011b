//! Sources and sinks: where a job's records come from (a generator, files local or on S3, a
//! socket) and where they go (files with a two-phase commit, stdout, nowhere). Each is a
//! file of its own; what they share is here (pacing a source to a rate) and in `format`
//! (lines to records and back: text, JSON, CSV).

mod file_sink;
mod file_source;
pub mod format;
mod generator;
mod kafka;
mod print;
mod socket;
pub mod stats;

pub use file_sink::{FileSink, S3_PART_BYTES};
pub use file_source::{FileSource, S3_READ_CHUNK, SourceFile, list_files, list_source_files};
pub use generator::{GeneratorSource, SplitMix64, Zipf};
pub use kafka::{KafkaSink, KafkaSource, partition_owner};
pub use print::{Blackhole, Stdout};
pub use socket::SocketSource;

use std::time::{Duration, Instant};

/// Paces a subtask to a rate (records per second). When it is ahead it sleeps at most a few
/// milliseconds and lets nothing go, so that the source's loop takes barriers and stop
/// requests while it waits.
#[derive(Debug)]
pub struct Pacer {
    rate: Option<f64>,
    start: Instant,
    emitted: u64,
}

impl Pacer {
    pub fn new(rate: Option<f64>) -> Self {
        Self { rate: rate.filter(|r| *r > 0.0), start: Instant::now(), emitted: 0 }
    }
    /// How many records may go now (at most `max`); 0 after a wait of at most
    /// [`Pacer::MAX_WAIT`] when none may yet.
    pub fn allow(&mut self, max: usize) -> usize {
        let Some(rate) = self.rate else { return max };
        let due = |p: &Self| (p.start.elapsed().as_secs_f64() * rate) as u64;
        if due(self) <= self.emitted {
            let wait = (self.emitted + 1) as f64 / rate - self.start.elapsed().as_secs_f64();
            std::thread::sleep(Duration::from_secs_f64(
                wait.clamp(0.0005, Self::MAX_WAIT.as_secs_f64()),
            ));
        }
        let due = due(self);
        if due <= self.emitted {
            return 0;
        }
        let n = ((due - self.emitted) as usize).min(max);
        self.emitted += n as u64;
        n
    }

    /// The longest a poll waits for its next record to be due.
    pub const MAX_WAIT: Duration = Duration::from_millis(10);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pacer_that_is_ahead_waits_briefly_and_lets_nothing_go() {
        let mut p = Pacer::new(Some(1.0));
        let t = Instant::now();
        let first = p.allow(100);
        let second = p.allow(100);
        assert!(first + second <= 1, "{first} + {second} at 1 a second");
        assert!(t.elapsed() < Duration::from_millis(500), "allow waited {:?}", t.elapsed());
    }
}
