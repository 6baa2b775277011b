//! The control connection between the coordinator and a worker: one JSON message per line
//! over TCP, opened by the worker.
//!
//! ```text
//!   worker                          coordinator
//!     ── Hello {index, dataAddr} ──►
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

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use weir_crds::{StorageUri, StreamJobSpec};

use crate::checkpoint::{OperatorState, Settings, TaskAck};

/// Version of this protocol; a worker and a coordinator of different versions refuse each
/// other with a clear error.
pub const PROTOCOL: u32 = 3;

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
    },
    #[serde(rename_all = "camelCase")]
    Progress {
        /// Records in and out per operator, in plan order, summed over this worker's subtasks.
        records: Vec<(u64, u64)>,
        state_bytes: u64,
    },
    /// A subtask's part of checkpoint `id` ([`crate::exec::FINAL`]: its final snapshot).
    #[serde(rename_all = "camelCase")]
    Ack { id: u64, ack: Box<TaskAck> },
    /// A subtask could not take its part of checkpoint `id`.
    #[serde(rename_all = "camelCase")]
    Decline { id: u64, message: String },
    #[serde(rename_all = "camelCase")]
    Finished { records: Vec<(u64, u64)> },
    #[serde(rename_all = "camelCase")]
    Failed { message: String, user: bool, retryable: bool },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ToWorker {
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
    pub spec: StreamJobSpec,
    pub parallelism: u32,
    pub max_parallelism: u32,
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

/// Reads messages.
#[derive(Debug)]
pub struct Reader(BufReader<TcpStream>, String);

impl Reader {
    pub fn new(s: TcpStream) -> Self {
        Self(BufReader::new(s), String::new())
    }

    /// The next message; `Ok(None)` when the other side closed the connection.
    pub fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, String> {
        self.1.clear();
        match self.0.read_line(&mut self.1) {
            Ok(0) => Ok(None),
            Ok(_) => serde_json::from_str(&self.1)
                .map(Some)
                .map_err(|e| format!("a message that is not understood ({e})")),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn get_ref(&self) -> &TcpStream {
        self.0.get_ref()
    }
}
