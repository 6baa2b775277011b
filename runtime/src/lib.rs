//! Weir's streaming engine, in layers from the bottom up:
//!
//! - [`keygroup`]: key groups and their assignment to subtasks;
//! - [`error`], [`objstore`], [`storage`]: errors that say whose they are, a blocking S3
//!   client, and where checkpoints and savepoints go (from `weir-storage`);
//! - [`state`]: keyed state in RocksDB with a write-back cache;
//! - [`record`]: records and their values;
//! - [`connectors`], [`transforms`], [`aggregate`], [`window`]: the built-in sources and
//!   sinks, stateless transformations, keyed aggregates and windows;
//! - [`plan`]: a StreamJob's pipeline checked and typed;
//! - [`exchange`]: batches on the wire ([`exchange::wire`]); exchanges over channels and over TCP
//!   with credit-based flow control;
//! - [`exec`]: running a plan's subtasks as threads, chained into tasks;
//! - [`auth`]: the job's secret and the handshakes it opens connections with;
//! - [`control`], [`worker`], [`coordinator`], [`api`]: the coordinator hands the job to the
//!   workers, follows it, and serves it over HTTP;
//! - [`operator`]: the SDK, a user's own operator types registered beside the built-in ones;
//! - the `weir` command ([`main`], which a user's binary calls with its registry).
//!
//! Checkpoints and savepoints build on these layers.

pub mod aggregate;
pub mod api;
pub mod auth;
pub mod checkpoint;
mod cli;
pub mod client;
pub mod connectors;
pub mod control;
pub mod coordinator;
pub mod event_time;
pub mod exchange;
pub mod exec;
pub mod keygroup;
pub mod operator;
pub mod plan;
pub mod record;
pub mod savepoint;
pub mod schema;
pub mod snapshot;
pub mod state;
pub mod transforms;
pub mod window;
pub mod worker;

pub use cli::main;

// The storage layer lives in `weir-storage` (no RocksDB there, so the controller can link
// it); its modules keep their paths here.
pub use weir_storage::{error, objstore, storage};

use std::path::Path;

use weir_crds::StreamJob;

/// Reads a StreamJob manifest (the same file `kubectl apply` takes) and admits it as the
/// apiserver would: `apiVersion` and `kind` first, then the CRD's schema ([`schema::admit`]:
/// unknown fields, types, ranges, patterns, every error in the apiserver's words). The CEL
/// rules are checked where the plan is built ([`plan::build`]).
pub fn load_manifest(path: &Path) -> Result<StreamJob, plan::PlanError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| plan::PlanError::new(format!("reading {}: {e}", path.display())))?;
    let not_valid = |e: &dyn std::fmt::Display| {
        plan::PlanError::new(format!("{}: not a valid StreamJob manifest: {e}", path.display()))
    };
    let mut manifest: serde_json::Value =
        serde_saphyr::from_str(&text).map_err(|e| not_valid(&e))?;
    schema::admit(&mut manifest)
        .map_err(|e| plan::PlanError::new(format!("{}: {e}", path.display())))?;
    serde_json::from_value(manifest).map_err(|e| not_valid(&e))
}
