//! What [`super::Process::process`] works with: emitting records, and state handles for the
//! current key.
//!
//! Every state value is one entry of the operator's keyed state:
//! `key group (2 bytes) | key length (4) | key | name length (2) | name | map key`, the value
//! `0 | bytes`, or `1 | expiry (8, milliseconds since the epoch) | bytes` with a TTL; the
//! bytes are the value in postcard. Timers are entries too, after a key group's values
//! ([`super::timers`]). The key group comes first, as for every keyed state, so that
//! checkpoints, savepoints and rescaling need to know nothing of the handles or the timers.

use std::marker::PhantomData;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Info;
use super::timers::{TimeDomain, Timers};
use crate::error::RuntimeError;
use crate::keygroup::KeyGroup;
use crate::record::Record;
use crate::state::KeyedStore;

/// A subtask's view of the job while it processes a record.
#[derive(Debug)]
pub struct Context<'a> {
    pub(crate) out: &'a mut Vec<Record>,
    pub(crate) store: Option<&'a KeyedStore>,
    pub(crate) key: Option<(KeyGroup, &'a [u8])>,
    /// The input the record came from (its index in `inputs`).
    pub(crate) input: usize,
    pub(crate) info: &'a Info,
    pub(crate) now_ms: i64,
    pub(crate) dropped: &'a mut u64,
    pub(crate) late: &'a mut Late,
    /// The event time the operator's input has reached, when known.
    pub(crate) watermark: Option<i64>,
    pub(crate) timers: &'a mut Timers,
    /// The clock of the timer that is firing, in [`super::Process::on_timer`].
    pub(crate) firing: Option<TimeDomain>,
}

/// The late records of an operator since they were last taken: how many, and (with a
/// `lateOutput`) the records.
#[derive(Debug, Default)]
pub(crate) struct Late {
    pub(crate) count: u64,
    pub(crate) records: Option<Vec<Record>>,
}

impl Context<'_> {
    /// Emits a record (in the fields [`super::Process::plan`] said).
    pub fn emit(&mut self, record: Record) {
        self.out.push(record);
    }

    /// Counts a record the operator could not use in `weir_operator_records_dropped_total`.
    pub fn drop_record(&mut self) {
        *self.dropped += 1;
    }

    /// Counts a record that came after the event time had passed it, too late to use (it
    /// is not emitted), in `weir_operator_late_records_total`.
    pub fn late_record(&mut self) {
        self.late.count += 1;
    }

    /// A record too late to use, as [`Context::late_record`]: it goes on to the operator's
    /// `lateOutput` when it has one.
    pub fn emit_late(&mut self, record: Record) {
        self.late.count += 1;
        if let Some(aside) = &mut self.late.records {
            aside.push(record);
        }
    }

    /// Which of the operator's inputs the record came from: its index in the manifest's
    /// `inputs` (0 with one input, and in timers and at the end).
    pub fn input(&self) -> usize {
        self.input
    }

    /// The subtask and the operator.
    pub fn info(&self) -> &Info {
        self.info
    }

    /// The current key's group, when there is a current key.
    pub(crate) fn key_group(&self) -> Option<KeyGroup> {
        self.key.map(|(g, _)| g)
    }

    /// The current key's bytes (as the exchange hashes them), when there is one.
    pub fn current_key(&self) -> Option<&[u8]> {
        self.key.map(|(_, k)| k)
    }

    /// The processing time, in milliseconds since the epoch (what TTLs count in).
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// The event time (milliseconds) up to which the operator's input is complete, when one
    /// is known: `i64::MAX` once every input has ended (when the timers that are left fire).
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Asks for [`super::Process::on_timer`] with the current key once the event time
    /// reaches `ts` (a timer of the key at the same time is one timer). Timers are keyed
    /// state: checkpointed, restored, and moved with their key groups when the job is
    /// rescaled, so each fires once, on the subtask that owns its key. They fire as the
    /// operator's event time passes them, and those left at the end of the input fire then,
    /// in time order.
    pub fn register_event_timer(&mut self, ts: i64) -> Result<(), RuntimeError> {
        self.timer(TimeDomain::Event, "register_event_timer", ts, true)
    }

    /// Cancels the current key's event-time timer at `ts` (nothing if there is none).
    pub fn delete_event_timer(&mut self, ts: i64) -> Result<(), RuntimeError> {
        self.timer(TimeDomain::Event, "delete_event_timer", ts, false)
    }

    /// Asks for [`super::Process::on_timer`] with the current key once the wall clock
    /// reaches `ts` (milliseconds since the epoch, as [`Context::now_ms`]), whether records
    /// come or not. Kept, restored and rescaled like an event-time timer; one that is due
    /// when the job restores fires at once. Those left when the input ends do not fire (as
    /// in Flink): they stay in the final state.
    pub fn register_processing_timer(&mut self, ts: i64) -> Result<(), RuntimeError> {
        self.timer(TimeDomain::Processing, "register_processing_timer", ts, true)
    }

    /// Cancels the current key's processing-time timer at `ts` (nothing if there is none).
    pub fn delete_processing_timer(&mut self, ts: i64) -> Result<(), RuntimeError> {
        self.timer(TimeDomain::Processing, "delete_processing_timer", ts, false)
    }

    /// In [`super::Process::on_timer`], the clock of the timer that fires.
    pub fn time_domain(&self) -> Option<TimeDomain> {
        self.firing
    }

    fn timer(
        &mut self,
        domain: TimeDomain,
        what: &str,
        ts: i64,
        register: bool,
    ) -> Result<(), RuntimeError> {
        match (self.store, self.key) {
            (Some(store), Some((g, key))) if register => {
                self.timers.register(store, domain, g, ts, key)
            }
            (Some(store), Some((g, key))) => self.timers.delete(store, domain, g, ts, key),
            (None, _) => Err(RuntimeError::user(format!(
                "operator {:?} calls {what} but is not keyed: timers are per key, so its plan must say which field it is keyed by (Output::keyed_by)",
                self.info.uid
            ))),
            (_, None) => Err(RuntimeError::user(format!(
                "operator {:?} calls {what} where there is no current key (timers are per key)",
                self.info.uid
            ))),
        }
    }

    fn state_key(&self, name: &str, sub: &[u8]) -> Result<(&KeyedStore, Vec<u8>), RuntimeError> {
        let Some(store) = self.store else {
            return Err(RuntimeError::user(format!(
                "operator {:?} uses state {name:?} but is not keyed: state is per key, so its plan must say which field it is keyed by (Output::keyed_by)",
                self.info.uid
            )));
        };
        let Some((g, key)) = self.key else {
            return Err(RuntimeError::user(format!(
                "operator {:?} uses state {name:?} where there is no current key (state is per key: use it while processing a record)",
                self.info.uid
            )));
        };
        let (Ok(klen), Ok(nlen)) = (u32::try_from(key.len()), u16::try_from(name.len())) else {
            return Err(RuntimeError::user(format!(
                "operator {:?}: state {name:?} or its key is too long to store",
                self.info.uid
            )));
        };
        let mut k = Vec::with_capacity(8 + key.len() + name.len() + sub.len());
        k.extend_from_slice(&g.to_be_bytes());
        k.extend_from_slice(&klen.to_be_bytes());
        k.extend_from_slice(key);
        k.extend_from_slice(&nlen.to_be_bytes());
        k.extend_from_slice(name.as_bytes());
        k.extend_from_slice(sub);
        Ok((store, k))
    }

    fn read<T: DeserializeOwned>(&self, name: &str, sub: &[u8]) -> Result<Option<T>, RuntimeError> {
        let (store, k) = self.state_key(name, sub)?;
        let decoded = store.get_with(&k, |bytes| decode(bytes, self.now_ms, name, &self.info.uid));
        let Some(value) = decoded.map_err(internal)? else { return Ok(None) };
        match value? {
            Some(v) => Ok(Some(v)),
            None => {
                store.delete(&k).map_err(internal)?; // expired
                Ok(None)
            }
        }
    }

    fn write<T: Serialize + ?Sized>(
        &self,
        name: &str,
        sub: &[u8],
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<(), RuntimeError> {
        let (store, k) = self.state_key(name, sub)?;
        let v = match ttl {
            None => vec![0u8],
            Some(ttl) => {
                let until =
                    self.now_ms.saturating_add(ttl.as_millis().min(i64::MAX as u128) as i64);
                let mut v = vec![1u8];
                v.extend_from_slice(&until.to_be_bytes());
                v
            }
        };
        let v = postcard::to_extend(value, v).map_err(|e| {
            RuntimeError::user(format!(
                "operator {:?}: state {name:?}: its value cannot be stored: {e}",
                self.info.uid
            ))
        })?;
        store.put(&k, &v).map_err(internal)
    }

    fn remove(&self, name: &str, sub: &[u8]) -> Result<(), RuntimeError> {
        let (store, k) = self.state_key(name, sub)?;
        store.delete(&k).map_err(internal)
    }

    /// Every (map key bytes, live value) under `name` for the current key; expired entries
    /// are deleted.
    fn scan<T: DeserializeOwned>(&self, name: &str) -> Result<Vec<(Vec<u8>, T)>, RuntimeError> {
        let (store, prefix) = self.state_key(name, &[])?;
        let mut raw = Vec::new();
        store
            .scan_prefix(&prefix, |k, v| raw.push((k[prefix.len()..].to_vec(), v.to_vec())))
            .map_err(internal)?;
        let mut out = Vec::with_capacity(raw.len());
        for (sub, bytes) in raw {
            match decode(&bytes, self.now_ms, name, &self.info.uid)? {
                Some(v) => out.push((sub, v)),
                None => self.remove(name, &sub)?,
            }
        }
        Ok(out)
    }
}

fn internal(e: crate::state::StateError) -> RuntimeError {
    RuntimeError::internal(e.to_string())
}

/// A stored value, or `None` when its TTL has passed. Bytes that do not decode were not
/// written by this operator's type (another version of it, or a tampered checkpoint).
fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    now_ms: i64,
    name: &str,
    uid: &str,
) -> Result<Option<T>, RuntimeError> {
    let bad = |why: &dyn std::fmt::Display| {
        RuntimeError::user(format!(
            "operator {uid:?}: state {name:?} holds a value its type does not read ({why}): the state was written by another version of the operator; restore with a savepoint of a version whose state type is the same, or give the operator a new uid"
        ))
    };
    let payload = match bytes.split_first() {
        Some((0, rest)) => rest,
        Some((1, rest)) if rest.len() >= 8 => {
            let until = i64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
            if until <= now_ms {
                return Ok(None);
            }
            &rest[8..]
        }
        _ => return Err(bad(&"no header")),
    };
    postcard::from_bytes(payload).map(Some).map_err(|e| bad(&e))
}

fn encode_key<K: Serialize + ?Sized>(name: &str, key: &K) -> Result<Vec<u8>, RuntimeError> {
    postcard::to_allocvec(key)
        .map_err(|e| RuntimeError::user(format!("state {name:?}: a map key cannot be stored: {e}")))
}

/// One value per key.
#[derive(Debug, Clone)]
pub struct ValueState<T> {
    name: String,
    ttl: Option<Duration>,
    _t: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned> ValueState<T> {
    /// The state named `name` (its place in the operator's state: keep the name to keep the
    /// state across versions of the operator).
    pub fn new(name: &str) -> Self {
        Self { name: name.to_string(), ttl: None, _t: PhantomData }
    }

    /// A value not written for `ttl` (processing time) reads as absent and is deleted.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    pub fn get(&self, ctx: &Context<'_>) -> Result<Option<T>, RuntimeError> {
        ctx.read(&self.name, &[])
    }

    pub fn set(&self, ctx: &mut Context<'_>, value: &T) -> Result<(), RuntimeError> {
        ctx.write(&self.name, &[], value, self.ttl)
    }

    pub fn clear(&self, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        ctx.remove(&self.name, &[])
    }
}

/// A map per key.
#[derive(Debug, Clone)]
pub struct MapState<K, V> {
    name: String,
    ttl: Option<Duration>,
    _t: PhantomData<fn() -> (K, V)>,
}

impl<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned> MapState<K, V> {
    pub fn new(name: &str) -> Self {
        Self { name: name.to_string(), ttl: None, _t: PhantomData }
    }

    /// An entry not written for `ttl` (processing time) reads as absent and is deleted.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    pub fn get(&self, ctx: &Context<'_>, key: &K) -> Result<Option<V>, RuntimeError> {
        ctx.read(&self.name, &encode_key(&self.name, key)?)
    }

    pub fn insert(&self, ctx: &mut Context<'_>, key: &K, value: &V) -> Result<(), RuntimeError> {
        ctx.write(&self.name, &encode_key(&self.name, key)?, value, self.ttl)
    }

    pub fn remove(&self, ctx: &mut Context<'_>, key: &K) -> Result<(), RuntimeError> {
        ctx.remove(&self.name, &encode_key(&self.name, key)?)
    }

    /// Every entry of the current key's map, in the order of their keys' encoded bytes.
    pub fn entries(&self, ctx: &Context<'_>) -> Result<Vec<(K, V)>, RuntimeError> {
        let mut out = Vec::new();
        for (sub, v) in ctx.scan::<V>(&self.name)? {
            let k = postcard::from_bytes(&sub).map_err(|e| {
                RuntimeError::user(format!(
                    "operator {:?}: state {:?} holds a map key its type does not read ({e})",
                    ctx.info.uid, self.name
                ))
            })?;
            out.push((k, v));
        }
        Ok(out)
    }

    /// Removes every entry of the current key's map.
    pub fn clear(&self, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        let (store, prefix) = ctx.state_key(&self.name, &[])?;
        let mut keys = Vec::new();
        store.scan_prefix(&prefix, |k, _| keys.push(k.to_vec())).map_err(internal)?;
        keys.iter().try_for_each(|k| store.delete(k).map_err(internal))
    }
}

/// A list per key.
#[derive(Debug, Clone)]
pub struct ListState<T> {
    value: ValueState<Vec<T>>,
}

impl<T: Serialize + DeserializeOwned> ListState<T> {
    pub fn new(name: &str) -> Self {
        Self { value: ValueState::new(name) }
    }

    /// A list not added to for `ttl` (processing time) reads as empty and is deleted.
    pub fn with_ttl(self, ttl: Duration) -> Self {
        Self { value: self.value.with_ttl(ttl) }
    }

    pub fn get(&self, ctx: &Context<'_>) -> Result<Vec<T>, RuntimeError> {
        Ok(self.value.get(ctx)?.unwrap_or_default())
    }

    pub fn add(&self, ctx: &mut Context<'_>, item: T) -> Result<(), RuntimeError> {
        let mut list = self.get(ctx)?;
        list.push(item);
        self.value.set(ctx, &list)
    }

    pub fn clear(&self, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        self.value.clear(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keygroup::key_group_of;
    use crate::state::StateBackend;

    struct Fixture {
        _dir: tempfile::TempDir,
        backend: StateBackend,
        info: Info,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let backend = StateBackend::open(dir.path(), &["op".to_string()]).unwrap();
        let info = Info::sole("op", &["k"]);
        Fixture { _dir: dir, backend, info }
    }

    /// Runs `f` with a context whose current key is `key` at time `now_ms`.
    fn with_key<R>(
        fx: &Fixture,
        key: Option<&[u8]>,
        now_ms: i64,
        f: impl FnOnce(&mut Context<'_>) -> R,
    ) -> R {
        let store = fx.backend.keyed_store("op", 128);
        let mut out = Vec::new();
        let (mut dropped, mut late) = (0, Late::default());
        let mut timers = Timers::default();
        let mut ctx = Context {
            out: &mut out,
            store: Some(&store),
            key: key.map(|k| (key_group_of(k, 128), k)),
            input: 0,

            info: &fx.info,
            now_ms,
            dropped: &mut dropped,
            late: &mut late,
            watermark: None,
            timers: &mut timers,
            firing: None,
        };
        f(&mut ctx)
    }

    #[test]
    fn value_map_and_list_state_are_per_key_and_survive_a_reopen_of_the_store() {
        let fx = fixture();
        let v = ValueState::<(u64, String)>::new("v");
        let m = MapState::<String, i64>::new("m");
        let l = ListState::<u32>::new("l");
        // Keys where one is a prefix of the other must not see each other's entries.
        for (key, n) in [(&b"a"[..], 1), (&b"ab"[..], 2)] {
            with_key(&fx, Some(key), 0, |ctx| {
                assert_eq!(v.get(ctx).unwrap(), None);
                v.set(ctx, &(n, format!("k{n}"))).unwrap();
                for i in 0..n {
                    m.insert(ctx, &format!("x{i}"), &(i as i64 * 10)).unwrap();
                    l.add(ctx, i as u32).unwrap();
                }
            });
        }
        with_key(&fx, Some(b"a"), 0, |ctx| {
            assert_eq!(v.get(ctx).unwrap(), Some((1, "k1".into())));
            assert_eq!(m.entries(ctx).unwrap(), vec![("x0".to_string(), 0)]);
            assert_eq!(l.get(ctx).unwrap(), vec![0]);
        });
        with_key(&fx, Some(b"ab"), 0, |ctx| {
            assert_eq!(m.get(ctx, &"x1".to_string()).unwrap(), Some(10));
            assert_eq!(m.entries(ctx).unwrap().len(), 2);
            m.remove(ctx, &"x0".to_string()).unwrap();
            assert_eq!(m.entries(ctx).unwrap(), vec![("x1".to_string(), 10)]);
            m.clear(ctx).unwrap();
            assert!(m.entries(ctx).unwrap().is_empty());
            l.clear(ctx).unwrap();
            v.clear(ctx).unwrap();
            assert_eq!((v.get(ctx).unwrap(), l.get(ctx).unwrap()), (None, vec![]));
        });
        // Every entry is stored under its key's key group.
        for (g, k, _) in fx.backend.scan("op").unwrap() {
            let klen = u32::from_be_bytes(k[..4].try_into().unwrap()) as usize;
            assert_eq!(g, key_group_of(&k[4..4 + klen], 128));
        }
        // Key "a" still has its state.
        with_key(&fx, Some(b"a"), 0, |ctx| assert!(v.get(ctx).unwrap().is_some()));
    }

    #[test]
    fn a_value_past_its_ttl_reads_as_absent_and_is_deleted() {
        let fx = fixture();
        let v = ValueState::<u8>::new("v").with_ttl(Duration::from_secs(10));
        let m = MapState::<u8, u8>::new("m").with_ttl(Duration::from_secs(10));
        with_key(&fx, Some(b"k"), 1_000, |ctx| {
            v.set(ctx, &7).unwrap();
            m.insert(ctx, &1, &2).unwrap();
        });
        with_key(&fx, Some(b"k"), 10_999, |ctx| {
            assert_eq!(v.get(ctx).unwrap(), Some(7));
            assert_eq!(m.entries(ctx).unwrap(), vec![(1, 2)]);
        });
        with_key(&fx, Some(b"k"), 11_000, |ctx| {
            assert_eq!(v.get(ctx).unwrap(), None);
            assert!(m.entries(ctx).unwrap().is_empty());
        });
        assert!(fx.backend.scan("op").unwrap().is_empty(), "expired entries are deleted");
    }

    #[test]
    fn state_without_a_key_or_of_another_type_is_an_error_that_names_it() {
        let fx = fixture();
        let e = with_key(&fx, None, 0, |ctx| ValueState::<u8>::new("seen").get(ctx).unwrap_err());
        assert!(e.message.contains("\"op\"") && e.message.contains("no current key"), "{e}");
        with_key(&fx, Some(b"k"), 0, |ctx| {
            ValueState::<String>::new("s").set(ctx, &"not a number".to_string()).unwrap()
        });
        // Bytes no operator wrote (a header that is neither 0 nor 1), as storage may hand
        // back.
        let store = fx.backend.keyed_store("op", 128);
        let (g, k, _) = fx.backend.scan("op").unwrap().remove(0);
        let mut key = g.to_be_bytes().to_vec();
        key.extend_from_slice(&k);
        store.put(&key, &[9, 9]).unwrap();
        let e = with_key(&fx, Some(b"k"), 0, |ctx| {
            ValueState::<String>::new("s").get(ctx).unwrap_err()
        });
        assert!(e.message.contains("state \"s\" holds a value its type does not read"), "{e}");
        let mut out = Vec::new();
        let (mut dropped, mut late) = (0, Late::default());
        let mut timers = Timers::default();
        let mut ctx = Context {
            out: &mut out,
            store: None,
            key: Some((0, b"k")),
            input: 0,

            info: &fx.info,
            now_ms: 0,
            dropped: &mut dropped,
            late: &mut late,
            watermark: None,
            timers: &mut timers,
            firing: None,
        };
        let e = ValueState::<u8>::new("x").set(&mut ctx, &1).unwrap_err();
        assert!(e.message.contains("is not keyed"), "{e}");
    }
}
