//! Weir's storage layer, shared by the engine (`weir-runtime`) and the controller, and kept
//! free of RocksDB so that the controller can delete savepoint data on S3 itself:
//!
//! - [`error`]: errors that say whose they are and whether a retry can help;
//! - [`objstore`]: a blocking S3 client;
//! - [`storage`]: where checkpoints and savepoints go: one trait, a local directory and S3
//!   behind it, and wrappers for tests (injected faults) and sub-directories.

pub mod error;
pub mod objstore;
pub mod storage;
