//! Operator types by name: the planner asks the registry about every type that is not built
//! in, and the engine makes each subtask of every operator through the factory registered
//! under its type (the built-in ones too, [`super::builtin`]).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use weir_crds::OperatorSpec;
use weir_crds::plan::{Extensions, InputFields, Planned};

use super::builtin::{Build, SourceBuild};
use super::timers::{TimeDomain, Timers};
use super::{Context, FieldType, Info, Process};
use crate::error::RuntimeError;
use crate::keygroup::key_group_of;
use crate::operator::{Operator, Source};
use crate::record::Record;
use crate::state::KeyedStore;

type PlanFn = dyn Fn(&serde_json::Map<String, serde_json::Value>, InputFields<'_>) -> Result<Planned, String>
    + Send
    + Sync;
/// Makes one subtask of an operator.
pub(crate) type MakeFn =
    dyn Fn(&Build<'_>) -> Result<Box<dyn Operator>, RuntimeError> + Send + Sync;
/// Makes one subtask of a source.
pub(crate) type MakeSourceFn =
    dyn Fn(SourceBuild<'_>) -> Result<Box<dyn Source>, RuntimeError> + Send + Sync;

enum Factory {
    Operator(Box<MakeFn>),
    Source(Box<MakeSourceFn>),
}

/// A user's type: how it is planned, and its parameters' schema.
struct Kind {
    plan: Box<PlanFn>,
    schema: fn() -> serde_json::Value,
}

/// The operator types a `weir` binary runs: the built-in ones, and those it registers.
#[derive(Default)]
pub struct Registry {
    /// The types a user registered (the catalogue plans the built-in ones).
    kinds: BTreeMap<String, Kind>,
    /// How each type's subtasks are made, built-in or not.
    factories: BTreeMap<String, Factory>,
    /// What was wrong with a registration (a name taken twice, a name no manifest can give):
    /// the binary refuses to start with it.
    errors: Vec<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds.keys())
            .field("factories", &self.factories.keys())
            .finish()
    }
}

fn params_of<T: serde::de::DeserializeOwned>(
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::Object(params.clone())).map_err(|e| e.to_string())
}

impl Registry {
    /// The built-in operator types (the catalogue of `weir-crds`) and no others.
    pub fn builtin() -> Self {
        super::builtin::register(Self::default())
    }

    /// Registers how the subtasks of operator type `name` are made.
    pub(crate) fn factory(mut self, name: &str, make: Box<MakeFn>) -> Self {
        self.factories.insert(name.to_string(), Factory::Operator(make));
        self
    }

    /// Registers how the subtasks of source type `name` are made.
    pub(crate) fn source_factory(mut self, name: &str, make: Box<MakeSourceFn>) -> Self {
        self.factories.insert(name.to_string(), Factory::Source(make));
        self
    }

    /// Every type it can make subtasks of.
    pub fn factories(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }

    /// Adds operator type `name` (what a manifest's `type` says), made by `T`.
    pub fn with<T: Process>(mut self, name: &str) -> Self {
        // (The rule of metric names too.)
        if !super::metrics::valid_name(name) {
            self.errors.push(format!(
                "operator type {name:?} cannot be registered: a type is a lowercase letter, then lowercase letters, digits and _, at most 63 in all"
            ));
            return self;
        }
        if weir_crds::plan::OPERATOR_TYPES.contains(&name) || self.factories.contains_key(name) {
            self.errors.push(format!(
                "operator type {name:?} is registered twice (or is built in): give it another name"
            ));
            return self;
        }
        let plan = Box::new(
            |params: &serde_json::Map<String, serde_json::Value>, input: InputFields<'_>| {
                let p: T::Params = params_of(params)?;
                let out = T::plan(&p, input)?;
                if let Some(k) = &out.key {
                    input.position(k, "key")?;
                }
                Ok(Planned { output: Some(out.fields), key: out.key })
            },
        );
        let make = Box::new(|b: &Build<'_>| {
            let op = b.op();
            let weir_crds::plan::OpKind::Custom(c) = &op.kind else {
                return Err(RuntimeError::internal(format!(
                    "operator {:?}: the plan does not give it as a type of this binary's",
                    op.uid
                )));
            };
            let info = b.info();
            let p: T::Params = params_of(&c.params)
                .map_err(|e| RuntimeError::user(format!("operator {:?}: {e}", info.uid)))?;
            let f = T::open(p, &info)?;
            let (key, store) = (op.key_positions.first().copied(), b.store());
            Ok(Box::new(Adapter::new(f, info, key, store, op.types.clone())?) as Box<dyn Operator>)
        });
        let schema = || serde_json::to_value(schemars::schema_for!(T::Params)).unwrap_or_default();
        self.kinds.insert(name.to_string(), Kind { plan, schema });
        self.factory(name, make)
    }

    /// The types it adds to the built-in ones.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    /// The JSON schema of the parameters of type `name`.
    pub fn schema(&self, name: &str) -> Option<serde_json::Value> {
        self.kinds.get(name).map(|k| (k.schema)())
    }

    /// A subtask of an operator that is not a source, by the factory of its type.
    pub(crate) fn make(&self, b: &Build<'_>) -> Result<Box<dyn Operator>, RuntimeError> {
        match self.factories.get(&b.op().type_name) {
            Some(Factory::Operator(make)) => make(b),
            _ => Err(not_registered(b.op())),
        }
    }

    /// A subtask of a source, by the factory of its type.
    pub(crate) fn make_source(&self, b: SourceBuild<'_>) -> Result<Box<dyn Source>, RuntimeError> {
        match self.factories.get(&b.op.type_name) {
            Some(Factory::Source(make)) => make(b),
            _ => Err(not_registered(b.op)),
        }
    }
}

fn not_registered(op: &crate::plan::PlanOp) -> RuntimeError {
    RuntimeError::user(format!(
        "operator {:?}: type {:?} is not registered in this binary (as the kind it is given)",
        op.uid, op.type_name
    ))
}

impl Extensions for Registry {
    fn names(&self) -> Vec<String> {
        self.kinds.keys().cloned().collect()
    }

    fn knows(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    fn plan(
        &self,
        op: &OperatorSpec,
        input: Option<InputFields<'_>>,
    ) -> Option<Result<Planned, String>> {
        let kind = self.kinds.get(&op.kind)?;
        let params: serde_json::Map<String, serde_json::Value> =
            op.params.clone().into_iter().collect();
        Some(match input {
            Some(input) => (kind.plan)(&params, input),
            // (Only after an operator whose fields are not known, which a runtime's plan has
            // none of.)
            None => Ok(Planned { output: None, key: None }),
        })
    }
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// Makes `registry` the one this process plans and runs with; refuses one whose
/// registrations went wrong. Called once, by [`crate::main`], before anything else.
pub fn install(registry: Registry) -> Result<(), String> {
    if !registry.errors.is_empty() {
        return Err(registry.errors.join("; "));
    }
    REGISTRY.set(registry).map_err(|_| "the operator registry is installed twice".to_string())
}

/// The registry this process runs with (the built-in types only, unless [`install`] gave
/// another).
pub fn registry() -> &'static Registry {
    REGISTRY.get_or_init(Registry::builtin)
}

/// A [`Process`] as the engine runs operators: record by record, with its key's state and
/// timers.
pub(crate) struct Adapter<T> {
    pub(crate) f: T,
    info: Info,
    /// The position of the key field, for a keyed operator.
    key: Option<usize>,
    /// For an operator of several inputs keyed by a field of each (a join): the position of
    /// the key in each input's records, by input.
    keys_by_input: Vec<usize>,
    /// Every record has the empty key (a global window's): one subtask has them all.
    global: bool,
    store: Option<KeyedStore>,
    /// What each field of its records holds, as its plan said.
    output: Vec<FieldType>,
    key_buf: Vec<u8>,
    dropped: u64,
    late: super::context::Late,
    timers: Timers,
    /// The event time the operator has reached, once it has one (restored with its state).
    pub(crate) watermark: Option<i64>,
    /// The event time each of its key groups had reached when it was restored (by group
    /// from its first; `i64::MIN` for none).
    pub(crate) floors: Vec<i64>,
}

/// Rounds of event-time timers registered by timers due at once before that is an error.
const MAX_TIMER_ROUNDS: usize = 1000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl<T: Process> Adapter<T> {
    /// A subtask of `f`, whose timers and event time are what its store holds for its key
    /// groups (a restore has filled it).
    pub(crate) fn new(
        f: T,
        info: Info,
        key: Option<usize>,
        store: Option<KeyedStore>,
        output: Vec<FieldType>,
    ) -> Result<Self, RuntimeError> {
        let (timers, floors) = match &store {
            Some(s) => Timers::load(s, info.key_groups, &info.uid)?,
            None => Default::default(),
        };
        // The lowest of its groups' (a group of an old subtask that had none holds none back).
        let watermark = floors.iter().copied().filter(|&w| w > i64::MIN).min();
        Ok(Self {
            f,
            info,
            key,
            keys_by_input: Vec::new(),
            global: false,
            store,
            output,
            key_buf: Vec::new(),
            dropped: 0,
            late: Default::default(),
            timers,
            watermark,
            floors,
        })
    }

    /// Every record it takes has the empty key: a global operator, whose records all go to
    /// the subtask that owns that key's group.
    pub(crate) fn global(mut self) -> Self {
        self.global = true;
        self
    }

    /// Keyed by a field of each input (`keys[input]`), as a join is.
    pub(crate) fn keyed_by_input(mut self, keys: Vec<usize>) -> Self {
        self.keys_by_input = keys;
        self
    }

    /// The records too late to use go on to the operator's late output
    /// ([`Operator::take_late_records`]).
    pub(crate) fn with_late_output(mut self) -> Self {
        self.late.records = Some(Vec::new());
        self
    }

    /// Runs `f` with the operator and a context whose current key is `key` (of group `g`),
    /// appending what it emits to `out`.
    pub(crate) fn with_key<R>(
        &mut self,
        g: crate::keygroup::KeyGroup,
        key: &[u8],
        out: &mut Vec<Record>,
        f: impl FnOnce(&mut T, &mut Context<'_>) -> R,
    ) -> R {
        let mut ctx = Context {
            out,
            store: self.store.as_ref(),
            key: Some((g, key)),
            input: 0,

            info: &self.info,
            now_ms: now_ms(),
            dropped: &mut self.dropped,
            late: &mut self.late,
            watermark: self.watermark,
            timers: &mut self.timers,
            firing: None,
        };
        f(&mut self.f, &mut ctx)
    }

    /// Fires the timers of `domain` due at `upto`, in time order. Event-time timers that
    /// the firing ones register at or before `upto` fire too, round after round; a
    /// processing-time timer registered as due waits for the next tick.
    fn fire(
        &mut self,
        domain: TimeDomain,
        upto: i64,
        watermark: Option<i64>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        let Some(store) = &self.store else { return Ok(()) };
        let now_ms = now_ms();
        for round in 0.. {
            if self.timers.first(domain).is_none_or(|t| t > upto) {
                break;
            }
            if domain == TimeDomain::Processing && round == 1 {
                break;
            }
            if round == MAX_TIMER_ROUNDS {
                return Err(RuntimeError::user(format!(
                    "operator {:?}: its timers registered new timers {MAX_TIMER_ROUNDS} times over without the event time moving: an on_timer that always registers another that is already due never ends",
                    self.info.uid
                )));
            }
            for (ts, g, key) in self.timers.take_due(store, domain, upto)? {
                let mut ctx = Context {
                    out,
                    store: Some(store),
                    key: Some((g, &key)),
                    input: 0,

                    info: &self.info,
                    now_ms,
                    dropped: &mut self.dropped,
                    late: &mut self.late,
                    watermark,
                    timers: &mut self.timers,
                    firing: Some(domain),
                };
                self.f.on_timer(ts, &mut ctx)?;
            }
        }
        Ok(())
    }

    /// The operator's event time reaches `watermark`: the event-time timers it passes fire
    /// (a watermark at or behind the one it has reached changes nothing).
    pub(crate) fn advance_watermark(
        &mut self,
        watermark: i64,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        if self.watermark.is_some_and(|w| w >= watermark) {
            return Ok(());
        }
        self.watermark = Some(watermark);
        let from = out.len();
        self.fire(TimeDomain::Event, watermark, Some(watermark), out)?;
        self.check(out, from)
    }

    /// The records emitted from `from` on must be what the operator's plan said: the
    /// operators after it rely on their fields.
    fn check(&self, out: &[Record], from: usize) -> Result<(), RuntimeError> {
        for r in &out[from..] {
            let fits = r.len() == self.output.len()
                && r.iter().zip(&self.output).all(|(v, t)| t.admits(v.kind()));
            if !fits {
                let kinds: Vec<&str> = r.iter().map(|v| v.kind().describe()).collect();
                let said: Vec<&str> = self.output.iter().map(|t| t.describe()).collect();
                return Err(RuntimeError::user(format!(
                    "operator {:?} emitted a record of {} fields ({}) where its plan says {} ({})",
                    self.info.uid,
                    r.len(),
                    kinds.join(", "),
                    self.output.len(),
                    said.join(", ")
                )));
            }
        }
        Ok(())
    }
}

impl<T: Process> Operator for Adapter<T> {
    fn process(
        &mut self,
        input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        let now_ms = now_ms();
        let max_parallelism = self.info.max_parallelism;
        let from = out.len();
        let key_at = self.keys_by_input.get(input).copied().or(self.key);
        for record in batch {
            let key = match key_at {
                Some(k) => {
                    let mut scratch = [0u8; 8];
                    self.key_buf.clear();
                    self.key_buf.extend_from_slice(record[k].key_bytes(&mut scratch));
                    Some((key_group_of(&self.key_buf, max_parallelism), &self.key_buf[..]))
                }
                None if self.global => Some((key_group_of(&[], max_parallelism), &[][..])),
                None => None,
            };
            let mut ctx = Context {
                out,
                store: self.store.as_ref(),
                key,
                input,
                info: &self.info,
                now_ms,
                dropped: &mut self.dropped,
                late: &mut self.late,
                watermark: self.watermark,
                timers: &mut self.timers,
                firing: None,
            };
            self.f.process(record, &mut ctx)?;
        }
        self.check(out, from)
    }

    /// The processing-time timers that are due fire.
    fn tick(&mut self, out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        let Some(first) = self.timers.first(TimeDomain::Processing) else { return Ok(()) };
        let now = now_ms();
        if first > now {
            return Ok(());
        }
        let from = out.len();
        self.fire(TimeDomain::Processing, now, self.watermark, out)?;
        self.check(out, from)
    }

    /// The end of the input is the end of event time: every event-time timer left fires, in
    /// time order (and those they register, round after round), then the operator finishes.
    fn finish(&mut self, out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        let from = out.len();
        self.fire(TimeDomain::Event, i64::MAX, Some(i64::MAX), out)?;
        let mut ctx = Context {
            out,
            store: self.store.as_ref(),
            key: None,
            input: 0,

            info: &self.info,
            now_ms: now_ms(),
            dropped: &mut self.dropped,
            late: &mut self.late,
            watermark: Some(i64::MAX),
            timers: &mut self.timers,
            firing: None,
        };
        self.f.finish(&mut ctx)?;
        self.check(out, from)
    }

    /// The event time it has reached goes into each of its key groups.
    fn snapshot(&mut self, _id: u64) -> Result<Option<serde_json::Value>, RuntimeError> {
        if let (Some(store), Some(wm)) = (&self.store, self.watermark) {
            Timers::save_watermark(store, self.info.key_groups, wm, &self.floors)?;
        }
        Ok(None)
    }

    fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    fn take_late(&mut self) -> u64 {
        std::mem::take(&mut self.late.count)
    }

    fn take_late_records(&mut self) -> Vec<Record> {
        self.late.records.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn watermark(&mut self, watermark: i64, out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        self.advance_watermark(watermark, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::{NoParams, Output, ValueState};
    use crate::record::Value;
    use crate::state::StateBackend;

    /// Keyed by its only field; a timer per record at the record's number, which fires as
    /// `key,ts`; with `again`, each timer registers another (which never ends).
    struct Timed {
        again: bool,
        n: ValueState<i64>,
    }

    impl Process for Timed {
        type Params = NoParams;
        fn plan(_: &NoParams, input: InputFields<'_>) -> Result<Output, String> {
            Ok(Output::fields([("k", FieldType::Text), ("ts", FieldType::Integer)])
                .keyed_by(input.fields[0].clone()))
        }
        fn open(_: NoParams, info: &Info) -> Result<Self, RuntimeError> {
            Ok(Self { again: info.uid == "again", n: ValueState::new("n") })
        }
        fn process(&mut self, _: Record, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
            assert_eq!(ctx.watermark(), None);
            let n = self.n.get(ctx)?.unwrap_or(0) + 1;
            self.n.set(ctx, &n)?;
            ctx.register_event_timer(100 - n)
        }
        fn on_timer(&mut self, ts: i64, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
            assert_eq!(ctx.watermark(), Some(i64::MAX));
            let key = String::from_utf8_lossy(ctx.current_key().unwrap()).into_owned();
            ctx.emit(vec![Value::str(&key), Value::Int(ts)]);
            if self.again {
                ctx.register_event_timer(ts + 1)?;
            }
            Ok(())
        }
    }

    fn subtask(uid: &str, dir: &std::path::Path) -> (Box<dyn Operator>, StateBackend) {
        let backend = StateBackend::open(dir, &[uid.to_string()]).unwrap();
        let info = Info::sole(uid, &["word"]);
        let store = backend.keyed_store(uid, 128);
        let types = vec![FieldType::Text, FieldType::Integer];
        let f = Timed::open(NoParams {}, &info).unwrap();
        let op = Adapter::new(f, info, Some(0), Some(store), types).unwrap();
        (Box::new(op), backend)
    }

    #[test]
    fn timers_left_at_the_end_fire_once_each_in_time_order_and_leave_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (mut op, backend) = subtask("timed", dir.path());
        let words = ["a", "b", "a", "c", "a", "b"];
        let mut out = Vec::new();
        op.process(0, words.iter().map(|w| vec![Value::str(w)]).collect(), &mut out).unwrap();
        assert!(out.is_empty());
        op.finish(&mut out).unwrap();
        let fired: Vec<(i64, String)> =
            out.iter().map(|r| (r[1].as_i64().unwrap(), r[0].to_string())).collect();
        assert!(fired.windows(2).all(|w| w[0].0 <= w[1].0), "not in time order: {fired:?}");
        let mut each = fired.clone();
        each.sort();
        // a: 97, 98, 99; b: 98, 99; c: 99.
        let expected = [(97, "a"), (98, "a"), (98, "b"), (99, "a"), (99, "b"), (99, "c")];
        assert_eq!(each, expected.map(|(t, k)| (t, k.to_string())));
        let left: Vec<_> = backend.scan("timed").unwrap();
        assert_eq!(left.len(), 3, "only the counts are left: {left:?}");
    }

    #[test]
    fn timers_that_always_register_another_are_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let (mut op, _backend) = subtask("again", dir.path());
        let mut out = Vec::new();
        op.process(0, vec![vec![Value::str("a")]], &mut out).unwrap();
        let e = op.finish(&mut out).unwrap_err();
        assert!(e.message.contains("\"again\"") && e.message.contains("never ends"), "{e}");
    }

    /// Keyed by its only field; a processing-time timer 40 ms after each record, which
    /// fires as `key,domain`.
    struct Reminder;

    impl Process for Reminder {
        type Params = NoParams;
        fn plan(_: &NoParams, input: InputFields<'_>) -> Result<Output, String> {
            Ok(Output::fields([("k", FieldType::Text), ("domain", FieldType::Text)])
                .keyed_by(input.fields[0].clone()))
        }
        fn open(_: NoParams, _: &Info) -> Result<Self, RuntimeError> {
            Ok(Reminder)
        }
        fn process(&mut self, _: Record, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
            let at = ctx.now_ms() + 40;
            ctx.register_processing_timer(at)
        }
        fn on_timer(&mut self, _: i64, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
            let key = String::from_utf8_lossy(ctx.current_key().unwrap()).into_owned();
            let domain = format!("{:?}", ctx.time_domain().unwrap());
            ctx.emit(vec![Value::str(&key), Value::str(&domain)]);
            Ok(())
        }
    }

    #[test]
    fn processing_time_timers_fire_on_the_tick_once_due_and_survive_a_restore() {
        let dir = tempfile::tempdir().unwrap();
        let backend = StateBackend::open(dir.path(), &["r".to_string()]).unwrap();
        let make = || {
            let info = Info::sole("r", &["word"]);
            let store = Some(backend.keyed_store("r", 128));
            let types = vec![FieldType::Text, FieldType::Text];
            Adapter::new(Reminder, info, Some(0), store, types).unwrap()
        };
        let mut op = make();
        let mut out = Vec::new();
        op.process(0, vec![vec![Value::str("a")], vec![Value::str("b")]], &mut out).unwrap();
        op.tick(&mut out).unwrap();
        assert!(out.is_empty(), "not due yet: {out:?}");
        // The subtask goes away before they are due; one on the same state has them.
        drop(op);
        let mut op = make();
        std::thread::sleep(std::time::Duration::from_millis(60));
        op.tick(&mut out).unwrap();
        let mut fired: Vec<String> = out.iter().map(|r| format!("{},{}", r[0], r[1])).collect();
        fired.sort();
        assert_eq!(fired, ["a,Processing", "b,Processing"]);
        // Each fired once, and left the store; none fires at the end of the input.
        out.clear();
        op.tick(&mut out).unwrap();
        op.process(0, vec![vec![Value::str("c")]], &mut out).unwrap();
        op.finish(&mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(backend.scan("r").unwrap().len(), 1, "c's timer stays in the state");
    }

    #[test]
    fn a_record_unlike_its_plan_and_a_bad_registration_are_errors() {
        let r = Registry::builtin()
            .with::<Timed>("timed")
            .with::<Timed>("timed")
            .with::<Timed>("count")
            .with::<Timed>("Bad-Name");
        let e = install(r).unwrap_err();
        assert!(e.contains("\"timed\" is registered twice"), "{e}");
        assert!(e.contains("\"count\" is registered twice (or is built in)"), "{e}");
        assert!(e.contains("\"Bad-Name\" cannot be registered"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let backend = StateBackend::open(dir.path(), &["t".to_string()]).unwrap();
        let info = Info::sole("t", &["word"]);
        // The plan said one text field; the operator emits two.
        let f = Timed::open(NoParams {}, &info).unwrap();
        let store = Some(backend.keyed_store("t", 128));
        let mut op = Adapter::new(f, info, Some(0), store, vec![FieldType::Text]).unwrap();
        let mut out = Vec::new();
        op.process(0, vec![vec![Value::str("a")]], &mut out).unwrap();
        let e = op.finish(&mut out).unwrap_err();
        assert!(e.message.contains("operator \"t\" emitted a record of 2 fields (text, an integer) where its plan says 1 (text)"), "{e}");
    }
}
