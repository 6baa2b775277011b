//! What the engine runs: an [`Operator`] takes batches from its inputs and appends what it
//! emits; a [`Source`] produces records from its splits. Every type, built-in or a user's
//! ([`super::Process`] through its adapter), is one of these behind a trait object.

use crate::error::RuntimeError;
use crate::record::Record;

/// An operator that is not a source.
pub trait Operator: Send {
    /// Processes a batch from input number `input` (records in the input's field order),
    /// appending what it emits to `out`.
    fn process(
        &mut self,
        input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError>;

    /// Every input has ended: emit what is left and make state durable.
    fn finish(&mut self, _out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Records dropped since the last call because the operator could not use them (a
    /// `sum` of a field that is not a number); counted in
    /// `weir_operator_records_dropped_total`.
    fn take_dropped(&mut self) -> u64 {
        0
    }

    /// Records dropped since the last call because they came after the event time had
    /// passed them (a window's record after its allowed lateness); counted in
    /// `weir_operator_late_records_total`.
    fn take_late(&mut self) -> u64 {
        0
    }

    /// The late records since the last call, for the operator's late output (a window's
    /// `lateOutput`), in the fields of its input.
    fn take_late_records(&mut self) -> Vec<Record> {
        Vec::new()
    }

    /// Called once before the first batch, with the state [`Operator::snapshot`] returned in
    /// the checkpoint the job restores from (`None` when it starts afresh or the operator
    /// had none).
    fn restore(&mut self, _state: Option<serde_json::Value>) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// The job restores at another parallelism: `states` holds this operator's state of
    /// every old subtask (with its index); the operator keeps its share. The default accepts
    /// only operators without state.
    fn rescale(
        &mut self,
        states: Vec<(u32, serde_json::Value)>,
        at: &Rescale,
    ) -> Result<(), RuntimeError> {
        no_rescale(states, at)
    }

    /// Checkpoint barrier `id` has reached this operator: everything it processed before
    /// belongs to the checkpoint. Returns the operator's non-keyed state to store with it
    /// (keyed state in RocksDB is snapshotted by the engine once this returns).
    fn snapshot(&mut self, _id: u64) -> Result<Option<serde_json::Value>, RuntimeError> {
        Ok(None)
    }

    /// Called right after [`Operator::snapshot`]: the keyed state writes it held back for
    /// the checkpoint's thread to apply before that thread takes the backend's snapshot
    /// ([`crate::state::CachedValueState::detach`]). None: the state is in the backend
    /// already, and the snapshot is taken at once.
    fn deferred_write(&mut self) -> Option<crate::state::DeferredWrite> {
        None
    }

    /// Checkpoint `id` is complete (its metadata is written): a sink makes the output that
    /// it covers visible.
    fn checkpoint_complete(&mut self, _id: u64) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// The operator holds records back to emit later (a throttle): while it does, its
    /// subtask takes no more input batches (barriers still come in, so the held records
    /// must be in [`Operator::snapshot`]), and [`Operator::release`] is called every few
    /// milliseconds.
    fn holding(&self) -> bool {
        false
    }

    /// Emits the held records that may go now.
    fn release(&mut self, _out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Called every few milliseconds, whether records come or not (and between batches):
    /// processing-time timers that are due fire.
    fn tick(&mut self, _out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// The event time of its inputs has reached `watermark` (the lowest over its input
    /// channels, [`crate::event_time`]): the event-time timers it passes fire, and what they
    /// emit goes out before the watermark is forwarded. Called only when it moves on.
    fn watermark(&mut self, _watermark: i64, _out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// One subtask of a source, reading the splits dealt to it.
pub trait Source: Send {
    /// Appends up to `max` records; false once every split is exhausted.
    fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> Result<bool, RuntimeError>;

    /// The event time this subtask has reached over its splits, when the source declares
    /// one (`eventTime`): asked after every poll, and every few milliseconds while it waits.
    fn watermark(&mut self) -> Option<crate::event_time::Watermark> {
        None
    }

    /// The position to resume from at checkpoint `id`: the state of every split this
    /// subtask still reads. `None` for a source that cannot be replayed (its records after
    /// the last checkpoint are lost on a failure).
    fn snapshot(&mut self, _id: u64) -> Result<Option<serde_json::Value>, RuntimeError> {
        Ok(None)
    }

    /// Checkpoint `id` is complete (a Kafka source commits its offsets to its group, for lag
    /// tools).
    fn checkpoint_complete(&mut self, _id: u64) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Records dropped since the last call because they could not be read (a line that does
    /// not parse, with `onError: skip`); counted in `weir_operator_records_dropped_total`.
    fn take_dropped(&mut self) -> u64 {
        0
    }

    /// Takes over the position [`Source::snapshot`] returned, before the first poll.
    fn restore(&mut self, _state: serde_json::Value) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// The job restores at another parallelism: `states` holds the positions of every old
    /// subtask; the source keeps its share of the splits.
    fn rescale(
        &mut self,
        states: Vec<(u32, serde_json::Value)>,
        at: &Rescale,
    ) -> Result<(), RuntimeError> {
        no_rescale(states, at)
    }
}

/// Where a subtask stands in a job restored at another parallelism.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rescale {
    /// The operator, for messages.
    pub uid: String,
    pub subtask: u32,
    pub parallelism: u32,
    pub old_parallelism: u32,
    /// The key groups this subtask owns, first and last.
    pub key_groups: (u16, u16),
}

/// An operator that keeps no state rescales to anything; one that does must say how.
pub(crate) fn no_rescale(
    states: Vec<(u32, serde_json::Value)>,
    at: &Rescale,
) -> Result<(), RuntimeError> {
    if states.iter().all(|(_, v)| v.is_null()) {
        return Ok(());
    }
    Err(RuntimeError::user(format!(
        "operator {:?} cannot be restored at parallelism {} from state taken at {}: restore it at {}",
        at.uid, at.parallelism, at.old_parallelism, at.old_parallelism
    )))
}

/// A state that does not parse: the checkpoint was not written by this operator.
pub(crate) fn bad_state(what: &str, e: serde_json::Error) -> RuntimeError {
    RuntimeError::user(format!("restoring {what}: the checkpoint's state does not fit: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Sources
