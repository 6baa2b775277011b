//! The SDK: a user's own operator types, written against [`Process`] and registered by name
//! in a [`Registry`] beside the built-in ones, in a `weir` binary of the user's own:
//!
//! ```no_run
//! use weir_runtime::operator::Registry;
//! # struct Enrich;
//! # impl weir_runtime::operator::Process for Enrich {
//! #     type Params = weir_runtime::operator::NoParams;
//! #     fn plan(_: &Self::Params, input: weir_runtime::operator::InputFields<'_>) -> Result<weir_runtime::operator::Output, String> { Ok(weir_runtime::operator::Output::like(input)) }
//! #     fn open(_: Self::Params, _: &weir_runtime::operator::Info) -> Result<Self, weir_runtime::error::RuntimeError> { Ok(Enrich) }
//! #     fn process(&mut self, r: weir_runtime::record::Record, ctx: &mut weir_runtime::operator::Context<'_>) -> Result<(), weir_runtime::error::RuntimeError> { ctx.emit(r); Ok(()) }
//! # }
//! fn main() -> std::process::ExitCode {
//!     weir_runtime::main(Registry::builtin().with::<Enrich>("enrich"))
//! }
//! ```
//!
//! A manifest then names the type like any other (`{uid: e, type: enrich, inputs: [events],
//! ...}`); its parameters are the operator's other keys, parsed into [`Process::Params`]
//! (derive `Deserialize` with `deny_unknown_fields` so that a misspelt key is refused).
//!
//! A keyed operator ([`Output::keyed_by`]) gets its input partitioned by the key field and
//! keeps state per key through handles ([`ValueState`], [`MapState`], [`ListState`]) that
//! read and write the current key's values in the job's state backend: checkpointed,
//! restored after a failure, carried by savepoints and split by key group when the job is
//! rescaled, exactly as the built-in operators' state. Its timers, in event time
//! ([`Context::register_event_timer`]) and in processing time
//! ([`Context::register_processing_timer`]), call [`Process::on_timer`] and are keyed state
//! too.

pub(crate) mod builtin;
mod context;
mod engine;
pub mod metrics;
mod registry;
mod timers;

use serde::de::DeserializeOwned;

pub use context::{Context, ListState, MapState, ValueState};
pub(crate) use engine::bad_state;
pub use engine::{Operator, Rescale, Source};
pub(crate) use registry::Adapter;
pub use registry::{Registry, install, registry};
pub use timers::TimeDomain;
pub use weir_crds::Duration;
pub use weir_crds::plan::{FieldType, InputFields};

use crate::error::RuntimeError;
use crate::record::Record;

/// A user's operator type: how its parameters are checked before the job starts, and what
/// each of its subtasks does with a record.
pub trait Process: Send + Sized + 'static {
    /// Its parameters: every key of the operator in the manifest beside `uid`, `type` and
    /// `inputs`.
    type Params: DeserializeOwned + schemars::JsonSchema;

    /// Checks `params` against the fields of its input, before anything starts (an error
    /// names what is wrong; the job is refused with it, naming the operator), and says what
    /// it emits and whether it is keyed.
    fn plan(params: &Self::Params, input: InputFields<'_>) -> Result<Output, String>;

    /// One subtask of it, before its first record (its state, if any, is already restored).
    fn open(params: Self::Params, info: &Info) -> Result<Self, RuntimeError>;

    /// One record of its input, in the input's field order ([`Info::field`]). For a keyed
    /// operator, the context's state handles read and write this record's key.
    fn process(&mut self, record: Record, ctx: &mut Context<'_>) -> Result<(), RuntimeError>;

    /// A timer of the current key is due: an event-time timer that
    /// [`Context::register_event_timer`] asked for at `ts` (the event time has reached it),
    /// or a processing-time one of [`Context::register_processing_timer`] (the wall clock
    /// has); [`Context::time_domain`] says which.
    fn on_timer(&mut self, _ts: i64, _ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Every input has ended (after the timers that were left fired): emit what is left.
    /// There is no current key here.
    fn finish(&mut self, _ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// Parameters of an operator that takes none.
#[derive(Debug, Clone, Default, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// What an operator emits, and by which input field it is keyed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    pub(crate) fields: Vec<(String, FieldType)>,
    pub(crate) key: Option<String>,
}

impl Output {
    /// Records of these fields, in this order.
    pub fn fields<S: Into<String>>(fields: impl IntoIterator<Item = (S, FieldType)>) -> Self {
        Self { fields: fields.into_iter().map(|(n, t)| (n.into(), t)).collect(), key: None }
    }

    /// Records of the input's fields.
    pub fn like(input: InputFields<'_>) -> Self {
        Self::fields(input.fields.iter().cloned().zip(input.types.iter().copied()))
    }

    /// Keyed by input field `key` (which [`Process::plan`] checks exists): records of one key
    /// go to one subtask, and state handles are per key.
    pub fn keyed_by(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

/// Where a subtask of an operator stands.
#[derive(Debug, Clone)]
pub struct Info {
    /// The operator's uid.
    pub uid: String,
    pub subtask: u32,
    pub parallelism: u32,
    /// The number of key groups.
    pub max_parallelism: u32,
    /// The key groups this subtask owns, first and last.
    pub key_groups: (u16, u16),
    /// The fields of its input, in order.
    pub input_fields: Vec<String>,
    /// Where it registers metrics of its own ([`metrics::Metrics::counter`],
    /// [`metrics::Metrics::gauge`]), in [`Process::open`].
    pub metrics: metrics::Metrics,
}

impl Info {
    /// Subtask 0 of 1 of operator `uid`, with 128 key groups, over `fields`.
    #[cfg(test)]
    pub(crate) fn sole(uid: &str, fields: &[&str]) -> Self {
        Self {
            uid: uid.into(),
            subtask: 0,
            parallelism: 1,
            max_parallelism: 128,
            key_groups: (0, 127),
            input_fields: fields.iter().map(|f| f.to_string()).collect(),
            metrics: Default::default(),
        }
    }

    /// The position of input field `name` in a record.
    pub fn field(&self, name: &str) -> Option<usize> {
        self.input_fields.iter().position(|f| f == name)
    }
}
