//! The built-in operator types, registered by name in [`Registry::builtin`] through the same
//! factories as a user's types ([`Registry::with`]): each makes one subtask of its type from
//! what [`Build`] gives (its typed parameters in the plan, which the catalogue's planner in
//! `weir-crds` checked, and the subtask's place, state and storage).

use super::Registry;
use super::metrics::Metrics;
use super::{Operator, Source};
use crate::aggregate::KeyedAggregate;
use crate::connectors::format::{Encoder, SourceDecoder};
use crate::connectors::{
    Blackhole, FileSink, FileSource, GeneratorSource, SocketSource, SourceFile, Stdout,
};
use crate::error::RuntimeError;
use crate::exec::{JobMetrics, STATE_CACHE_ENTRIES};
use crate::objstore::S3Client;
use crate::plan::{LineFormat, OpKind, Plan, PlanOp};
use crate::state::{KeyedStore, StateBackend};
use crate::transforms::{Filter, Map, Split, Throttle};

/// What a factory makes one subtask of an operator from.
pub struct Build<'a> {
    pub(crate) plan: &'a Plan,
    /// The operator, in the plan's order.
    pub(crate) index: usize,
    pub(crate) subtask: u32,
    /// The subtask's state backend, for a keyed operator.
    pub(crate) backend: Option<&'a StateBackend>,
    pub(crate) metrics: &'a JobMetrics,
    pub(crate) s3: Option<&'a S3Client>,
    pub(crate) job_id: &'a str,
    /// Whether the job takes checkpoints (a sink commits on them, or at the end).
    pub(crate) checkpointed: bool,
    /// Checkpoint ids of this run start above this one.
    pub(crate) after_id: u64,
}

impl Build<'_> {
    /// The operator.
    pub(crate) fn op(&self) -> &PlanOp {
        &self.plan.ops[self.index]
    }

    /// The fields of its (first) input.
    pub(crate) fn input_fields(&self) -> &[String] {
        &self.plan.ops[self.op().inputs[0]].fields
    }

    /// The position of input field `name` (which the plan checked is there).
    fn input_field(&self, name: &str) -> Result<usize, RuntimeError> {
        self.input_fields().iter().position(|f| f == name).ok_or_else(|| {
            RuntimeError::internal(format!(
                "operator {:?}: its input has no field {name:?}, which its plan names",
                self.op().uid
            ))
        })
    }

    /// Where the subtask stands, as the SDK tells an operator.
    pub(crate) fn info(&self) -> super::Info {
        let (plan, op) = (self.plan, self.op());
        let r = crate::keygroup::KeyGroupRange::of_subtask(
            plan.max_parallelism,
            plan.parallelism,
            self.subtask,
        );
        super::Info {
            uid: op.uid.clone(),
            subtask: self.subtask,
            parallelism: plan.parallelism,
            max_parallelism: plan.max_parallelism,
            key_groups: (r.start, r.end),
            input_fields: self.input_fields().to_vec(),
            metrics: Metrics::new(self.metrics.user.clone(), self.index, self.subtask, &op.uid),
        }
    }

    /// The keyed state of the subtask, for a keyed operator.
    pub(crate) fn store(&self) -> Option<KeyedStore> {
        self.backend.map(|b| b.keyed_store(&self.op().uid, self.plan.max_parallelism))
    }

    fn backend(&self) -> Result<&StateBackend, RuntimeError> {
        self.backend.ok_or_else(|| {
            RuntimeError::internal(format!(
                "operator {:?} is keyed and has no state",
                self.op().uid
            ))
        })
    }

    /// Where the subtask keeps what it tells of the system it writes.
    fn connector_metrics(&self) -> crate::connectors::stats::ConnectorMetrics {
        crate::connectors::stats::register(&self.metrics.connectors, self.index, self.subtask)
    }

    /// The operator's parameters are not of its type (a plan this build did not make).
    fn mismatch(&self) -> RuntimeError {
        RuntimeError::internal(format!(
            "operator {:?}: the plan's parameters are not those of type {:?}",
            self.op().uid,
            self.op().type_name
        ))
    }
}

/// What a source's factory makes one subtask from.
pub struct SourceBuild<'a> {
    pub(crate) op: &'a PlanOp,
    /// The operator, in the plan's order.
    pub(crate) index: usize,
    pub(crate) subtask: u32,
    pub(crate) parallelism: u32,
    /// A file source's files, listed before the job started.
    pub(crate) files: &'a [SourceFile],
    pub(crate) s3: Option<S3Client>,
    pub(crate) metrics: &'a JobMetrics,
}

impl SourceBuild<'_> {
    /// Where the subtask keeps what it tells of the system it reads.
    fn connector_metrics(&self) -> crate::connectors::stats::ConnectorMetrics {
        crate::connectors::stats::register(&self.metrics.connectors, self.index, self.subtask)
    }

    /// The decoder of its lines, with its `onError`.
    fn decoder(&self, format: &LineFormat<'_>) -> Result<SourceDecoder, RuntimeError> {
        SourceDecoder::new(format, &self.op.uid, &self.op.type_name, self.subtask)
    }

    fn mismatch(&self) -> RuntimeError {
        RuntimeError::internal(format!(
            "operator {:?}: the plan's parameters are not those of type {:?}",
            self.op.uid, self.op.type_name
        ))
    }
}

type Made = Result<Box<dyn Operator>, RuntimeError>;

fn split(b: &Build<'_>) -> Made {
    let OpKind::Split(sp) = &b.op().kind else { return Err(b.mismatch()) };
    Ok(Box::new(Split { field: b.input_field(&sp.field)? }))
}

fn map(b: &Build<'_>) -> Made {
    let OpKind::Map(m) = &b.op().kind else { return Err(b.mismatch()) };
    Ok(Box::new(Map::new(m, b.input_fields())))
}

fn filter(b: &Build<'_>) -> Made {
    let OpKind::Filter(f) = &b.op().kind else { return Err(b.mismatch()) };
    Ok(Box::new(Filter::new(f, b.input_fields())))
}

fn throttle(b: &Build<'_>) -> Made {
    let OpKind::Throttle(t) = &b.op().kind else { return Err(b.mismatch()) };
    Ok(Box::new(Throttle::new(t.rate_per_second)))
}

fn aggregate(b: &Build<'_>) -> Made {
    let OpKind::Keyed { aggregate, field, .. } = &b.op().kind else { return Err(b.mismatch()) };
    let field = field.as_deref().map(|f| b.input_field(f)).transpose()?;
    let state = b.backend()?.value_state(&b.op().uid, b.plan.max_parallelism, STATE_CACHE_ENTRIES);
    Ok(Box::new(KeyedAggregate::new(*aggregate, b.op().key_positions[0], field, state)))
}

fn window(b: &Build<'_>) -> Made {
    let OpKind::TumblingWindowCount(w) = &b.op().kind else { return Err(b.mismatch()) };
    let op = b.op();
    let key_type = b.plan.ops[op.inputs[0]].types[op.key_positions[0]];
    let store = b.backend()?.keyed_store(&op.uid, b.plan.max_parallelism);
    Ok(Box::new(crate::window::TumblingWindowCount::new(
        w,
        b.info(),
        key_type,
        store,
        op.types.clone(),
    )?))
}

fn windows(b: &Build<'_>) -> Made {
    use super::Process;
    let OpKind::Window(w) = &b.op().kind else { return Err(b.mismatch()) };
    let op = b.op();
    let info = b.info();
    let store = b.backend()?.keyed_store(&op.uid, b.plan.max_parallelism);
    let f = crate::window::Windows::open(w.clone(), &info)?;
    let key = op.key_positions.first().copied();
    let mut adapter = super::Adapter::new(f, info, key, Some(store), op.types.clone())?;
    if w.late_output.is_some() {
        adapter = adapter.with_late_output();
    }
    Ok(Box::new(if op.kind.is_global() { adapter.global() } else { adapter }))
}

fn top_n(b: &Build<'_>) -> Made {
    use super::Process;
    let OpKind::WindowTopN(t) = &b.op().kind else { return Err(b.mismatch()) };
    let op = b.op();
    let info = b.info();
    let store = b.backend()?.keyed_store(&op.uid, b.plan.max_parallelism);
    // On event time when its window is (the plan makes its input a window).
    let event_time =
        matches!(&b.plan.ops[op.inputs[0]].kind, OpKind::Window(w) if w.time_field.is_some());
    let f = crate::window::TopN::open(t.clone(), &info)?.on_event_time(event_time);
    let key = op.key_positions.first().copied();
    Ok(Box::new(super::Adapter::new(f, info, key, Some(store), op.types.clone())?))
}

/// The position of each input's time field, by name.
fn join_times(
    b: &Build<'_>,
    names: &Option<Vec<String>>,
) -> Result<[Option<usize>; 2], RuntimeError> {
    let op = b.op();
    let mut at = [None, None];
    if let Some(names) = names {
        for (side, name) in names.iter().enumerate().take(2) {
            let fields = &b.plan.ops[op.inputs[side]].fields;
            at[side] = Some(fields.iter().position(|f| f == name).ok_or_else(|| {
                RuntimeError::internal(format!(
                    "operator {:?}: input {side} has no field {name:?}, which its plan names",
                    op.uid
                ))
            })?);
        }
    }
    Ok(at)
}

fn join(b: &Build<'_>) -> Made {
    let op = b.op();
    let info = b.info();
    let store = b.backend()?.keyed_store(&op.uid, b.plan.max_parallelism);
    let keys = op.key_positions.clone();
    let types = op.types.clone();
    match &op.kind {
        OpKind::WindowJoin(j) => {
            let f = crate::window::WindowJoin::new(j, join_times(b, &j.time_fields)?);
            let a = super::Adapter::new(f, info, keys.first().copied(), Some(store), types)?;
            Ok(Box::new(a.keyed_by_input(keys)))
        }
        OpKind::IntervalJoin(j) => {
            let [Some(l), Some(r)] = join_times(b, &j.time_fields)? else {
                return Err(b.mismatch());
            };
            let f = crate::window::IntervalJoin::new(j, [l, r]);
            let a = super::Adapter::new(f, info, keys.first().copied(), Some(store), types)?;
            Ok(Box::new(a.keyed_by_input(keys)))
        }
        _ => Err(b.mismatch()),
    }
}

fn stdout(b: &Build<'_>) -> Made {
    let OpKind::Stdout(s) = &b.op().kind else { return Err(b.mismatch()) };
    Ok(Box::new(Stdout::new(Encoder::new(s.format, b.input_fields()))))
}

fn blackhole(_: &Build<'_>) -> Made {
    Ok(Box::new(Blackhole))
}

fn file_sink(b: &Build<'_>) -> Made {
    let OpKind::FileSink(f) = &b.op().kind else { return Err(b.mismatch()) };
    let encoder = Encoder::new(f.format, b.input_fields());
    let sink = FileSink::new(&f.path, b.s3, b.job_id, b.subtask, b.checkpointed)?;
    Ok(Box::new(sink.encode_with(encoder)))
}

fn kafka_sink(b: &Build<'_>) -> Made {
    let OpKind::KafkaSink(k) = &b.op().kind else { return Err(b.mismatch()) };
    let sink = crate::connectors::KafkaSink::new(
        k,
        &b.op().uid,
        b.job_id,
        b.subtask,
        b.input_fields(),
        b.checkpointed,
        b.after_id,
    )?
    .with_metrics(b.connector_metrics());
    Ok(Box::new(sink))
}

type MadeSource = Result<Box<dyn Source>, RuntimeError>;
type MakeOne = fn(&Build<'_>) -> Made;
type MakeOneSource = fn(SourceBuild<'_>) -> MadeSource;

fn generator(b: SourceBuild<'_>) -> MadeSource {
    let OpKind::Generator(g) = &b.op.kind else { return Err(b.mismatch()) };
    let clock = crate::event_time::EventClock::of(b.op)?;
    Ok(Box::new(GeneratorSource::new(g.clone(), b.subtask, b.parallelism).with_event_time(clock)))
}

fn file_source(b: SourceBuild<'_>) -> MadeSource {
    let OpKind::FileSource(f) = &b.op.kind else { return Err(b.mismatch()) };
    let decoder = b.decoder(&f.line_format())?;
    let clock = crate::event_time::EventClock::of(b.op)?;
    let source = FileSource::new(b.files, b.s3, f.rate_per_second, b.subtask, b.parallelism);
    Ok(Box::new(source.decode_with(decoder).with_event_time(clock)))
}

fn socket(b: SourceBuild<'_>) -> MadeSource {
    let OpKind::Socket(so) = &b.op.kind else { return Err(b.mismatch()) };
    let decoder = b.decoder(&so.line_format())?;
    let clock = crate::event_time::EventClock::of(b.op)?;
    let source = SocketSource::new(&so.host, so.port, b.subtask)?.decode_with(decoder);
    Ok(Box::new(source.with_event_time(clock)))
}

fn kafka_source(b: SourceBuild<'_>) -> MadeSource {
    let OpKind::KafkaSource(k) = &b.op.kind else { return Err(b.mismatch()) };
    let decoder = match k.format {
        weir_crds::plan::SourceFormat::Raw => None,
        _ => Some(b.decoder(&k.line_format())?),
    };
    let clock = crate::event_time::EventClock::of(b.op)?;
    let source = crate::connectors::KafkaSource::new(
        k,
        &b.op.uid,
        b.subtask,
        b.parallelism,
        decoder,
        clock,
    )?
    .with_metrics(b.connector_metrics());
    Ok(Box::new(source))
}

/// `registry` with every built-in type.
pub(crate) fn register(registry: Registry) -> Registry {
    let operators: [(&str, MakeOne); 17] = [
        ("split", split),
        ("map", map),
        ("filter", filter),
        ("throttle", throttle),
        ("count", aggregate),
        ("sum", aggregate),
        ("min", aggregate),
        ("max", aggregate),
        ("tumbling_window_count", window),
        ("window", windows),
        ("window_top_n", top_n),
        ("window_join", join),
        ("interval_join", join),
        ("stdout", stdout),
        ("blackhole", blackhole),
        ("file_sink", file_sink),
        ("kafka_sink", kafka_sink),
    ];
    let sources: [(&str, MakeOneSource); 4] = [
        ("generator", generator),
        ("file_source", file_source),
        ("socket", socket),
        ("kafka_source", kafka_source),
    ];
    let mut r = registry;
    for (name, make) in operators {
        r = r.factory(name, Box::new(make));
    }
    for (name, make) in sources {
        r = r.source_factory(name, Box::new(make));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_of_the_catalogue_has_a_factory_and_no_other_is_built_in() {
        let r = Registry::builtin();
        let mut made: Vec<&str> = r.factories().collect();
        made.sort();
        let mut catalogue: Vec<&str> = weir_crds::plan::OPERATOR_TYPES.to_vec();
        catalogue.sort();
        assert_eq!(made, catalogue);
        assert_eq!(r.types().count(), 0, "no type of a user's");
    }
}
