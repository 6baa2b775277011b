//! Weir's streaming engine, in layers from the bottom up:
//!
//! - [`keygroup`]: key groups and their assignment to subtasks;
//! - [`objstore`]: a blocking S3 client for the operators' files;
//! - [`state`]: keyed state in RocksDB with a write-back cache;
//! - [`record`], [`operators`]: records and the built-in operators;
//! - [`plan`]: a StreamJob's pipeline checked and typed;
//! - [`exec`]: running a plan, subtasks as threads with bounded exchanges;
//! - the `weir` command (`src/main.rs`).
//!
//! Checkpoints, savepoints, the coordinator's HTTP API and the worker processes build on
//! these layers.

pub mod error;
pub mod exec;
pub mod keygroup;
pub mod objstore;
pub mod operators;
pub mod plan;
pub mod record;
pub mod state;

use std::path::Path;

use weir_crds::StreamJob;

/// Reads a StreamJob manifest (the same file `kubectl apply` takes).
pub fn load_manifest(path: &Path) -> Result<StreamJob, plan::PlanError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| plan::PlanError(format!("reading {}: {e}", path.display())))?;
    serde_saphyr::from_str(&text).map_err(|e| {
        plan::PlanError(format!("{}: not a valid StreamJob manifest: {e}", path.display()))
    })
}
