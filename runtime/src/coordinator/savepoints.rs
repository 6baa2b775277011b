//! Savepoints: a requested one that fails, and one that completes.

use weir_crds::api::SavepointStatus;

use crate::checkpoint::{self, Metadata};
use crate::error::RuntimeError;

use super::*;

impl Driver<'_> {
    /// A savepoint failed: records why. One that was to stop the job fails the attempt (its
    /// sources took no input after the barrier): the job restarts from its last checkpoint
    /// and goes on running.
    pub(super) fn savepoint_failed(&self, pd: &Pending, why: &str) -> Option<AttemptEnd> {
        let sp = pd.savepoint.as_ref()?;
        eprintln!(
            "weir: coordinator: savepoint {} (checkpoint {}) failed: {why}",
            sp.request, pd.id
        );
        self.c.status.update_savepoint(&sp.request, |s| {
            s.status = SavepointStatus::Failed;
            s.failure = Some(why.to_string());
        });
        sp.target.stop.then(|| {
            AttemptEnd::Failed(
                RuntimeError::external(format!(
                    "savepoint {} was to stop the job and failed: {why}",
                    sp.request
                ))
                .retryable(),
            )
        })
    }

    /// Writes a savepoint's metadata into its directory: it exists from then on, and the
    /// runtime never deletes it.
    pub(super) fn complete_savepoint(
        &self,
        pd: &Pending,
        sp: &PendingSavepoint,
    ) -> Result<Metadata, RuntimeError> {
        let meta =
            self.metadata(pd.id, pd.triggered_at, checkpoint::now_ms(), &pd.acks, false, true);
        let storage = crate::storage::open_uri(&sp.target.dir, self.c.spec.s3.as_ref())?;
        storage.put(checkpoint::METADATA, &meta.to_bytes(self.c.opts.secret.for_metadata()))?;
        let size = meta.size_bytes();
        eprintln!(
            "weir: coordinator: savepoint {} completed: {} ({size} bytes of keyed state)",
            sp.request, sp.target.dir
        );
        self.c.status.update_savepoint(&sp.request, |s| {
            s.status = SavepointStatus::Completed;
            s.path = Some(sp.target.dir.to_string());
            s.size_bytes = size;
        });
        Ok(meta)
    }
}
