//! Runtime errors say whose they are and whether a retry can help.

use std::fmt;

/// Who has to act on an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    /// The job's definition or its data: the user fixes it; a restart does not help.
    User,
    /// A system outside Weir (S3, a socket, the disk).
    External,
    /// Weir itself.
    Internal,
    /// State read back from storage is damaged (a checksum that does not match, a file cut
    /// short or missing, a corrupt SST): a restart would read the same bytes, so the job
    /// fails instead; it is restored from a savepoint or an older checkpoint.
    Damaged,
}

/// An error of a running job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeError {
    pub whose: Whose,
    /// Whether restarting (from the last checkpoint) may succeed.
    pub retryable: bool,
    pub message: String,
}

impl RuntimeError {
    pub fn user(message: impl Into<String>) -> Self {
        Self { whose: Whose::User, retryable: false, message: message.into() }
    }
    pub fn external(message: impl Into<String>) -> Self {
        Self { whose: Whose::External, retryable: false, message: message.into() }
    }
    pub fn damaged(message: impl Into<String>) -> Self {
        Self { whose: Whose::Damaged, retryable: false, message: message.into() }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self { whose: Whose::Internal, retryable: true, message: message.into() }
    }
    pub fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }
}

impl fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RuntimeError {}
