//! The control connection between the coordinator and a worker: one JSON message per line
//! over TCP, opened by the worker.
//!
//! ```text
//!   worker                          coordinator
//!     ── Hello {index, dataAddr, nonce} ──►
//!     ◄── Challenge {nonce, proof} ──  (the coordinator proves the job's secret)
//!     ── Proof {proof} ──►             (the worker proves it; else Refused, and closed)
//!     ◄── Start {spec, placement} ──   (once every worker said hello; attempt k)
//!     ── Progress {...} ──►            (every half second)
//!     ◄── Trigger {id, savepoint?} ──  (checkpoint id: the sources emit barriers)
//!     ── Ack {id, task} | Decline ──►  (each subtask's part of it)
//!     ◄── Complete {id} ──             (the metadata is written: sinks commit)
//!     ◄── Stop ──                      (Ctrl-C / SIGTERM: end like an exhausted source)
//!     ◄── Cancel ──                    (another worker failed: give up at once)
//!     ── Finished | Failed ──►
//!     ◄── Start {…} | Exit ──          (the next attempt after a failure, or the end)
//! ```
//!
//! A worker keeps its connection across attempts: after a failure the coordinator cancels
//! the attempt, waits for every worker's `Failed`, and starts the next one from the last
//! completed checkpoint.
//!
//! The opening is a challenge and a response in both directions ([`crate::auth`]): each side
//! sends a fresh nonce and proves the job's secret over both nonces and its role (the worker
//! also over the index and exchange address it claims). The coordinator tells a worker
//! nothing about the job before its proof is checked, reads the opening within
//! [`HANDSHAKE_DEADLINE`] in all, and takes lines of at most [`HELLO_LIMIT`] bytes until
//! then ([`MESSAGE_LIMIT`] after).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use weir_crds::StorageUri;

use crate::auth::{JobSecret, Nonce};
use crate::checkpoint::{OperatorState, Settings, TaskAck};

/// Version of this protocol; a worker and a coordinator of different versions refuse each
/// other with a clear error.
pub const PROTOCOL: u32 = 4;

/// How long the whole opening of a control connection may take, from the first byte read
/// to the proof checked: a client that sends slowly, or nothing, is dropped after it.
pub const HANDSHAKE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);
/// The longest line read before the other side proved the job's secret.
pub const HELLO_LIMIT: usize = 4 << 10;
/// The longest message after it (a checkpoint's acknowledgement names every file of the
/// subtask's state; the job's start carries the state of every old subtask to restore).
pub const MESSAGE_LIMIT: usize = 256 << 20;

/// The coordinator's proof: over the worker's nonce and its own.
pub fn coordinator_proof(secret: &JobSecret, worker: &Nonce, coordinator: &Nonce) -> [u8; 32] {
    secret.prove(&[b"weir control coordinator", worker, coordinator])
}

/// A worker's proof: over the coordinator's nonce, its own, and what it says in its hello.
pub fn worker_proof(
    secret: &JobSecret,
    coordinator: &Nonce,
    worker: &Nonce,
    index: Option<u32>,
    data_addr: &str,
) -> [u8; 32] {
    let index = index.map(|i| i.to_string()).unwrap_or_default();
    secret.prove(&[
        b"weir control worker",
        coordinator,
        worker,
        index.as_bytes(),
        data_addr.as_bytes(),
    ])
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ToCoordinator {
    #[serde(rename_all = "camelCase")]
    Hello {
        protocol: u32,
        /// The subtask index this worker runs; `None` for a worker that runs them all.
        index: Option<u32>,
        /// Where the other workers reach this one's exchange.
        data_addr: String,
        /// This worker's challenge to the coordinator (hex).
        #[serde(default)]
        nonce: String,
    },
    /// The worker's answer to the coordinator's challenge (hex).
    #[serde(rename_all = "camelCase")]
    Proof { proof: String },
    #[serde(rename_all = "camelCase")]
    Progress {
        /// Records in and out per operator, in plan order, summed over this worker's subtasks.
        records: Vec<(u64, u64)>,
        state_bytes: u64,
        /// Records dropped per operator, in plan order.
        #[serde(default)]
        dropped: Vec<u64>,
        /// Late records per operator, in plan order.
        #[serde(default)]
        late: Vec<u64>,
        /// Bytes of keyed state per subtask of this worker that has any: (subtask, bytes).
        #[serde(default)]
        subtask_state_bytes: Vec<(u32, u64)>,
        /// The watermark each of its subtasks of each operator has taken in: (operator
        /// index, subtask, milliseconds).
        #[serde(default)]
        watermarks: Vec<(u32, u32, i64)>,
        /// The metrics its operators' code registered: (operator index, metric).
        #[serde(default)]
        user_metrics: Vec<(u32, crate::operator::metrics::UserMetric)>,
        /// What its connectors tell of the systems they read and write: (operator index,
        /// subtask, figures).
        #[serde(default)]
        connectors: Vec<(u32, u32, crate::connectors::stats::ConnectorStats)>,
    },
    /// A subtask's part of checkpoint `id` ([`crate::exec::FINAL`]: its final snapshot).
    #[serde(rename_all = "camelCase")]
    Ack {
        id: u64,
        ack: Box<TaskAck>,
        /// The attempt it belongs to: one from an attempt that is over is ignored.
        #[serde(default)]
        attempt: u32,
    },
    /// A subtask could not take its part of checkpoint `id`.
    #[serde(rename_all = "camelCase")]
    Decline {
        id: u64,
        message: String,
        #[serde(default)]
        attempt: u32,
    },
    #[serde(rename_all = "camelCase")]
    Finished {
        records: Vec<(u64, u64)>,
        #[serde(default)]
        dropped: Vec<u64>,
        #[serde(default)]
        late: Vec<u64>,
        #[serde(default)]
        user_metrics: Vec<(u32, crate::operator::metrics::UserMetric)>,
        #[serde(default)]
        connectors: Vec<(u32, u32, crate::connectors::stats::ConnectorStats)>,
        #[serde(default)]
        attempt: u32,
    },
    #[serde(rename_all = "camelCase")]
    Failed {
        message: String,
        user: bool,
        retryable: bool,
        /// Stored state read back is damaged: no restart heals it.
        #[serde(default)]
        damaged: bool,
        #[serde(default)]
        attempt: u32,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ToWorker {
    /// The coordinator's proof of the job's secret, and its challenge to the worker (hex).
    Challenge {
        nonce: String,
        proof: String,
    },
    Start(Box<Assignment>),
    /// The coordinator will not take this worker; it exits with the reason.
    Refused {
        reason: String,
    },
    Stop,
    Cancel,
    #[serde(rename_all = "camelCase")]
    Trigger {
        id: u64,
        /// Checkpoint `id` is a savepoint, written there.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        savepoint: Option<SavepointTarget>,
    },
    /// Checkpoint `id` completed (the sinks commit what came before it); `final_`: the
    /// final checkpoint, after which the sinks commit the rest and the workers report
    /// `Finished`. A savepoint that does not stop the job commits nothing and is not sent.
    #[serde(rename_all = "camelCase")]
    Complete {
        id: u64,
        final_: bool,
    },
    /// The job is over: the worker exits.
    Exit,
}

/// Where a savepoint goes, and whether it stops the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavepointTarget {
    /// The savepoint's own directory (`…/sp-<id>`): every file it has is below it.
    pub dir: StorageUri,
    pub stop: bool,
}

/// How a worker takes part in checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssignedCheckpoints {
    pub settings: Settings,
    pub storage: StorageUri,
    /// The job's directory in the storage.
    pub job_dir: String,
    /// Checkpoint ids of this attempt start above this one.
    pub after_id: u64,
    /// The state of this worker's subtasks in the checkpoint restored from (of every subtask
    /// when the job restores at another parallelism).
    pub restore: Vec<OperatorState>,
    /// The parallelism of the checkpoint restored from.
    #[serde(default)]
    pub restored_parallelism: Option<u32>,
    /// The directory the snapshot restored from refers to its files in, when it is not this
    /// job's (`--from-savepoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_storage: Option<StorageUri>,
    /// The job was stopped into the savepoint it restores from, and failed before every
    /// worker ended: the subtasks restore (the sinks commit what it holds) and end at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stop_at_start: bool,
}

/// The job as the coordinator hands it to a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// The job as the coordinator planned it (its parallelism and number of key groups
    /// included): the worker checks it ([`crate::plan::verify`]) and runs it.
    pub plan: crate::plan::Plan,
    pub run_id: String,
    /// The worker of every subtask index.
    pub worker_of: Vec<u32>,
    /// The exchange address of every worker.
    pub data_addrs: Vec<String>,
    pub keep_state: bool,
    /// The same in every attempt of the job (names the sinks' files).
    pub job_id: String,
    /// Counts the attempts of this run from 0.
    pub attempt: u32,
    /// `None`: the job takes no checkpoints.
    pub checkpoints: Option<AssignedCheckpoints>,
}

/// Writes messages; shared by the threads that send.
#[derive(Debug)]
pub struct Writer(Mutex<TcpStream>);

impl Writer {
    pub fn new(s: TcpStream) -> Self {
        Self(Mutex::new(s))
    }

    pub fn send<T: Serialize>(&self, msg: &T) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.write_all(&line)
    }

    pub fn shutdown(&self) {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}

/// Reads messages, one line each, of at most a limit.
#[derive(Debug)]
pub struct Reader {
    r: BufReader<TcpStream>,
    line: Vec<u8>,
    limit: usize,
}

/// What [`Reader::recv_by`] says when its deadline passed.
pub const TOO_SLOW: &str = "the other side took too long to send its message";

impl Reader {
    /// A reader of lines of at most `limit` bytes.
    pub fn new(s: TcpStream, limit: usize) -> Self {
        Self { r: BufReader::new(s), line: Vec::new(), limit }
    }

    /// Lines after this are of at most `limit` bytes.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// The next message; `Ok(None)` when the other side closed the connection.
    pub fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, String> {
        self.recv_by(None)
    }

    /// The next message, read by `deadline` (in all, however slowly it comes).
    pub fn recv_by<T: for<'de> Deserialize<'de>>(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<T>, String> {
        if !self.read_line(deadline)? {
            return Ok(None);
        }
        serde_json::from_slice(&self.line)
            .map(Some)
            .map_err(|e| format!("a message that is not understood ({e})"))
    }

    /// Reads up to and with the next newline into `self.line`; `false` at the end of the
    /// stream before any byte.
    fn read_line(&mut self, deadline: Option<Instant>) -> Result<bool, String> {
        self.line.clear();
        loop {
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(TOO_SLOW.into());
                }
                self.r.get_ref().set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            }
            let buf = match self.r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if deadline.is_some()
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                {
                    return Err(TOO_SLOW.into());
                }
                Err(e) => return Err(e.to_string()),
            };
            if buf.is_empty() {
                return if self.line.is_empty() {
                    Ok(false)
                } else {
                    Err("the connection closed in the middle of a message".into())
                };
            }
            let (n, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if self.line.len() + n > self.limit {
                return Err(format!("a message over {} bytes", self.limit));
            }
            self.line.extend_from_slice(&buf[..n]);
            self.r.consume(n);
            if done {
                if deadline.is_some() {
                    self.r.get_ref().set_read_timeout(None).map_err(|e| e.to_string())?;
                }
                return Ok(true);
            }
        }
    }

    pub fn get_ref(&self) -> &TcpStream {
        self.r.get_ref()
    }
}
