//! Operator types by name: the planner asks the registry about every type that is not built
//! in, and the engine makes each subtask of such an operator through it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use weir_crds::OperatorSpec;
use weir_crds::plan::{Extensions, InputFields, Planned};

use super::context::{TIMERS, parse_timer};
use super::{Context, FieldType, Info, Process};
use crate::error::RuntimeError;
use crate::keygroup::{KeyGroup, key_group_of};
use crate::operators::Operator;
use crate::record::Record;
use crate::state::KeyedStore;

type PlanFn = dyn Fn(&serde_json::Map<String, serde_json::Value>, InputFields<'_>) -> Result<Planned, String>
    + Send
    + Sync;
type MakeFn = dyn Fn(
        &serde_json::Map<String, serde_json::Value>,
        Info,
        Option<usize>,
        Option<KeyedStore>,
        Vec<FieldType>,
    ) -> Result<Box<dyn Operator>, RuntimeError>
    + Send
    + Sync;

struct Kind {
    plan: Box<PlanFn>,
    make: Box<MakeFn>,
    schema: fn() -> serde_json::Value,
}

/// The operator types a `weir` binary runs: the built-in ones, and those it registers.
#[derive(Default)]
pub struct Registry {
    kinds: BTreeMap<String, Kind>,
    /// What was wrong with a registration (a name taken twice, a name no manifest can give):
    /// the binary refuses to start with it.
    errors: Vec<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("kinds", &self.kinds.keys()).finish()
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
        Self::default()
    }

    /// Adds operator type `name` (what a manifest's `type` says), made by `T`.
    pub fn with<T: Process>(mut self, name: &str) -> Self {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            self.errors.push(format!(
                "operator type {name:?} cannot be registered: a type is a lowercase letter, then lowercase letters, digits and _, at most 63 in all"
            ));
            return self;
        }
        if weir_crds::plan::OPERATOR_TYPES.contains(&name) || self.kinds.contains_key(name) {
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
        let make = Box::new(
            |params: &serde_json::Map<String, serde_json::Value>,
             info: Info,
             key: Option<usize>,
             store: Option<KeyedStore>,
             output: Vec<FieldType>| {
                let p: T::Params = params_of(params)
                    .map_err(|e| RuntimeError::user(format!("operator {:?}: {e}", info.uid)))?;
                let f = T::open(p, &info)?;
                Ok(Box::new(Adapter {
                    f,
                    info,
                    key,
                    store,
                    output,
                    key_buf: Vec::new(),
                    dropped: 0,
                }) as Box<dyn Operator>)
            },
        );
        let schema = || serde_json::to_value(schemars::schema_for!(T::Params)).unwrap_or_default();
        self.kinds.insert(name.to_string(), Kind { plan, make, schema });
        self
    }

    /// The types it adds to the built-in ones.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    /// The JSON schema of the parameters of type `name`.
    pub fn schema(&self, name: &str) -> Option<serde_json::Value> {
        self.kinds.get(name).map(|k| (k.schema)())
    }

    /// A subtask of an operator of type `name` (which the plan holds, so it is registered):
    /// keyed by input field `key` with its state in `store`, emitting records of `output`.
    pub fn make(
        &self,
        name: &str,
        params: &serde_json::Map<String, serde_json::Value>,
        info: Info,
        key: Option<usize>,
        store: Option<KeyedStore>,
        output: Vec<FieldType>,
    ) -> Result<Box<dyn Operator>, RuntimeError> {
        let kind = self.kinds.get(name).ok_or_else(|| {
            RuntimeError::user(format!(
                "operator {:?}: type {name:?} is not registered in this binary",
                info.uid
            ))
        })?;
        (kind.make)(params, info, key, store, output)
    }
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

/// A [`Process`] as the engine runs operators: record by record, with its key's state.
struct Adapter<T> {
    f: T,
    info: Info,
    /// The position of the key field, for a keyed operator.
    key: Option<usize>,
    store: Option<KeyedStore>,
    /// What each field of its records holds, as its plan said.
    output: Vec<FieldType>,
    key_buf: Vec<u8>,
    dropped: u64,
}

/// Rounds of timers registered by timers at the end of the input before that is an error.
const MAX_TIMER_ROUNDS: usize = 1000;

/// A due timer: its time, its key's group and bytes, and its entry in the store.
type DueTimer = (i64, KeyGroup, Vec<u8>, Vec<u8>);

impl<T> Adapter<T> {
    /// Every timer in the store of this subtask's key groups, in time order (then key group
    /// and key).
    fn timers_left(&self) -> Result<Vec<DueTimer>, RuntimeError> {
        let Some(store) = &self.store else { return Ok(Vec::new()) };
        let mut due = Vec::new();
        let (lo, hi) = self.info.key_groups;
        let mut bad = None;
        for g in lo..=hi {
            let mut prefix = g.to_be_bytes().to_vec();
            prefix.extend_from_slice(&TIMERS);
            store
                .scan_prefix(&prefix, |k, _| match parse_timer(&k[prefix.len()..]) {
                    Some((ts, key)) => due.push((ts, g, key.to_vec(), k.to_vec())),
                    None => bad = Some(g),
                })
                .map_err(|e| RuntimeError::internal(e.to_string()))?;
        }
        if let Some(g) = bad {
            return Err(RuntimeError::user(format!(
                "operator {:?}: a timer entry of key group {g} is damaged (the state was not written by Weir)",
                self.info.uid
            )));
        }
        due.sort();
        Ok(due)
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl<T: Process> Operator for Adapter<T> {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        let now_ms = now_ms();
        let max_parallelism = self.info.max_parallelism;
        let from = out.len();
        for record in batch {
            let key = match self.key {
                Some(k) => {
                    let mut scratch = [0u8; 8];
                    self.key_buf.clear();
                    self.key_buf.extend_from_slice(record[k].key_bytes(&mut scratch));
                    Some((key_group_of(&self.key_buf, max_parallelism), &self.key_buf[..]))
                }
                None => None,
            };
            let mut ctx = Context {
                out,
                store: self.store.as_ref(),
                key,
                info: &self.info,
                now_ms,
                dropped: &mut self.dropped,
                watermark: None,
            };
            self.f.process(record, &mut ctx)?;
        }
        self.check(out, from)
    }

    /// The end of the input is the end of event time: every timer left fires, in time order
    /// (and those they register, round after round), then the operator finishes.
    fn finish(&mut self, out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        let from = out.len();
        let now_ms = now_ms();
        for round in 0.. {
            let due = self.timers_left()?;
            if due.is_empty() {
                break;
            }
            if round == MAX_TIMER_ROUNDS {
                return Err(RuntimeError::user(format!(
                    "operator {:?}: its timers registered new timers {MAX_TIMER_ROUNDS} times over at the end of the input: an on_timer that always registers another never ends",
                    self.info.uid
                )));
            }
            let store = self.store.as_ref().expect("timers are in the keyed store");
            for (ts, g, key, entry) in due {
                store.delete(&entry).map_err(|e| RuntimeError::internal(e.to_string()))?;
                let mut ctx = Context {
                    out,
                    store: Some(store),
                    key: Some((g, &key)),
                    info: &self.info,
                    now_ms,
                    dropped: &mut self.dropped,
                    watermark: Some(i64::MAX),
                };
                self.f.on_timer(ts, &mut ctx)?;
            }
        }
        let mut ctx = Context {
            out,
            store: self.store.as_ref(),
            key: None,
            info: &self.info,
            now_ms,
            dropped: &mut self.dropped,
            watermark: Some(i64::MAX),
        };
        self.f.finish(&mut ctx)?;
        self.check(out, from)
    }

    fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
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
        let registry = Registry::builtin().with::<Timed>("timed");
        let backend = StateBackend::open(dir, &[uid.to_string()]).unwrap();
        let info = Info {
            uid: uid.into(),
            subtask: 0,
            parallelism: 1,
            max_parallelism: 128,
            key_groups: (0, 127),
            input_fields: vec!["word".into()],
        };
        let store = backend.keyed_store(uid, 128);
        let types = vec![FieldType::Text, FieldType::Integer];
        let op = registry.make("timed", &Default::default(), info, Some(0), Some(store), types);
        (op.unwrap(), backend)
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
        let info = Info {
            uid: "t".into(),
            subtask: 0,
            parallelism: 1,
            max_parallelism: 128,
            key_groups: (0, 127),
            input_fields: vec!["word".into()],
        };
        // The plan said one text field; the operator emits two.
        let mut op = Registry::builtin()
            .with::<Timed>("timed")
            .make(
                "timed",
                &Default::default(),
                info,
                Some(0),
                Some(backend.keyed_store("t", 128)),
                vec![FieldType::Text],
            )
            .unwrap();
        let mut out = Vec::new();
        op.process(0, vec![vec![Value::str("a")]], &mut out).unwrap();
        let e = op.finish(&mut out).unwrap_err();
        assert!(e.message.contains("operator \"t\" emitted a record of 2 fields (text, an integer) where its plan says 1 (text)"), "{e}");
    }
}
