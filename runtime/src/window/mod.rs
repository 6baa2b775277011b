//! Windows over event time. `tumbling_window_count` counts the records of each key per
//! window of `size`, through the same SDK a user's operator has ([`Process`]): a count per
//! key and window in a [`MapState`], and an event-time timer per key and window at its end.
//! So its windows are keyed state, checkpointed, restored and split by key group like any
//! other, and a window open across a savepoint fires once, on the subtask that owns its key,
//! at any parallelism.
//!
//! Its event time is the highest it has seen or the watermark of its input, whichever is
//! further, less `allowedLateness`; it is kept in the state of every key group the subtask owns,
//! so that a restored subtask starts from the lowest of its key groups'. A record of a window
//! that has already fired is late: dropped, and counted in
//! `weir_operator_records_dropped_total`, as is one whose time field is not a number.

mod join;
mod top;
mod windows;
pub use join::{IntervalJoin, WindowJoin};
pub use top::TopN;
pub use windows::Windows;

use crate::error::RuntimeError;
use crate::keygroup::{KeyGroup, key_group_of};
use crate::operator::{Adapter, Context, FieldType, Info, InputFields, MapState, Output, Process};
use crate::operator::{Operator, Rescale};
use crate::plan::WindowSpec;
use crate::record::{Record, Value};

/// One subtask's windows, as an SDK operator.
pub(crate) struct TumblingCount {
    key: usize,
    ts: usize,
    size_ms: i64,
    lateness_ms: i64,
    /// The count and the key (as text) per window end, for the current key.
    windows: MapState<i64, (i64, String)>,
    /// The event time it has reached: its highest, less the lateness.
    event_time: i64,
    /// The event time each of its key groups had reached where it was before a restore (by
    /// group from `first_group`): a record of a window that fired there is late here too.
    floors: Vec<i64>,
    first_group: KeyGroup,
}

impl Process for TumblingCount {
    type Params = WindowSpec;

    /// (Planned by the catalogue, as every built-in type.)
    fn plan(p: &WindowSpec, input: InputFields<'_>) -> Result<Output, String> {
        input.position(&p.time_field, "timeField")?;
        Ok(Output::fields([
            (p.key.clone(), FieldType::Text),
            ("window_end".into(), FieldType::Integer),
            ("count".into(), FieldType::Integer),
        ])
        .keyed_by(p.key.clone()))
    }

    fn open(p: WindowSpec, info: &Info) -> Result<Self, RuntimeError> {
        let pos = |n: &str| {
            info.field(n).ok_or_else(|| {
                RuntimeError::user(format!("operator {:?}: its input has no field {n:?}", info.uid))
            })
        };
        Ok(Self {
            key: pos(&p.key)?,
            ts: pos(&p.time_field)?,
            size_ms: p.size.as_millis_i64().max(1),
            lateness_ms: p.allowed_lateness.as_millis_i64(),
            windows: MapState::new("windows"),
            event_time: i64::MIN,
            floors: Vec::new(),
            first_group: info.key_groups.0,
        })
    }

    fn process(&mut self, r: Record, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        let Some(ts) = r[self.ts].as_i64() else {
            ctx.drop_record();
            return Ok(());
        };
        let end =
            ts.div_euclid(self.size_ms).saturating_mul(self.size_ms).saturating_add(self.size_ms);
        let floor = ctx
            .key_group()
            .and_then(|g| self.floors.get(usize::from(g.wrapping_sub(self.first_group))))
            .copied()
            .unwrap_or(i64::MIN);
        if end <= self.event_time.max(floor) {
            ctx.drop_record(); // its window has fired
            return Ok(());
        }
        match self.windows.get(ctx, &end)? {
            Some((n, key)) => self.windows.insert(ctx, &end, &(n + 1, key))?,
            None => {
                self.windows.insert(ctx, &end, &(1, r[self.key].to_string()))?;
                ctx.register_event_timer(end)?;
            }
        }
        self.event_time = self.event_time.max(ts.saturating_sub(self.lateness_ms));
        Ok(())
    }

    fn on_timer(&mut self, end: i64, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        if let Some((n, key)) = self.windows.get(ctx, &end)? {
            self.windows.remove(ctx, &end)?;
            ctx.emit(vec![Value::Str(key.into()), Value::Int(end), Value::Int(n)]);
        }
        Ok(())
    }
}

/// The built-in operator: the SDK operator, and the event time it derives from its input.
pub struct TumblingWindowCount {
    inner: Adapter<TumblingCount>,
    /// What the key field holds, to find a key's bytes in the state of an older Weir.
    key_type: FieldType,
    key_groups: (KeyGroup, KeyGroup),
    max_parallelism: u32,
    uid: String,
}

impl std::fmt::Debug for TumblingWindowCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TumblingWindowCount").field("uid", &self.uid).finish()
    }
}

/// What a window operator of an older Weir stored in a checkpoint's metadata (its windows
/// in memory, and the key group of each key), which a restore moves into keyed state.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct OldState {
    watermark: i64,
    windows: std::collections::BTreeMap<i64, std::collections::HashMap<String, i64>>,
    #[serde(default)]
    key_groups: std::collections::HashMap<String, u16>,
}

impl TumblingWindowCount {
    /// A subtask of it, keyed by its spec's key (of `key_type`), its state in `store`.
    pub fn new(
        spec: &WindowSpec,
        info: Info,
        key_type: FieldType,
        store: crate::state::KeyedStore,
        output: Vec<FieldType>,
    ) -> Result<Self, RuntimeError> {
        let (key_groups, max_parallelism, uid) =
            (info.key_groups, info.max_parallelism, info.uid.clone());
        let f = TumblingCount::open(spec.clone(), &info)?;
        let key = Some(f.key);
        let mut inner = Adapter::new(f, info, key, Some(store), output)?;
        if let Some(wm) = inner.watermark {
            inner.f.event_time = wm;
        }
        inner.f.floors = inner.floors.clone();
        Ok(Self { inner, key_type, key_groups, max_parallelism, uid })
    }

    /// The bytes a key of an old state was hashed by: it kept keys as text, whatever the
    /// field held.
    fn key_bytes(&self, key: &str, group: Option<u16>) -> Vec<u8> {
        let text = key.as_bytes().to_vec();
        let int = key.parse::<i64>().ok().map(|i| i.to_be_bytes().to_vec());
        let float = key.parse::<f64>().ok().map(|f| f.to_bits().to_be_bytes().to_vec());
        let by_type = match self.key_type {
            FieldType::Integer => int.clone(),
            FieldType::Float => float.clone(),
            _ => None,
        };
        let fits = |b: &Vec<u8>| group.is_none_or(|g| key_group_of(b, self.max_parallelism) == g);
        by_type
            .into_iter()
            .chain([Some(text.clone()), int, float].into_iter().flatten())
            .find(fits)
            .unwrap_or(text)
    }

    /// Moves the windows of old states into keyed state (those of its own key groups), and
    /// starts from the lowest of their event times; restored at another parallelism
    /// (`old_parallelism`), each of its key groups keeps the event time of the old subtask
    /// that had it.
    fn migrate(
        &mut self,
        states: Vec<(u32, serde_json::Value)>,
        old_parallelism: Option<u32>,
    ) -> Result<(), RuntimeError> {
        let (lo, hi) = self.key_groups;
        if self.inner.floors.len() != usize::from(hi - lo) + 1 {
            self.inner.floors = vec![i64::MIN; usize::from(hi - lo) + 1];
        }
        let mut event_time: Option<i64> = None;
        let mut scratch = Vec::new();
        for (old, v) in states {
            if v.is_null() {
                continue;
            }
            let st: OldState = serde_json::from_value(v).map_err(|e| {
                RuntimeError::user(format!(
                    "operator {:?}: the window state of its old subtask {old} does not read ({e}): the checkpoint was not written by Weir",
                    self.uid
                ))
            })?;
            event_time = Some(event_time.map_or(st.watermark, |w| w.min(st.watermark)));
            if let Some(old_p) = old_parallelism.filter(|&p| old < p && p <= self.max_parallelism) {
                let r =
                    crate::keygroup::KeyGroupRange::of_subtask(self.max_parallelism, old_p, old);
                for g in r.start.max(lo)..=r.end.min(hi) {
                    let f = &mut self.inner.floors[usize::from(g - lo)];
                    *f = (*f).max(st.watermark);
                }
            }
            for (end, counts) in st.windows {
                for (key, n) in counts {
                    let stored = st.key_groups.get(&key).copied();
                    let bytes = self.key_bytes(&key, stored);
                    let g = stored.unwrap_or_else(|| key_group_of(&bytes, self.max_parallelism));
                    if g < lo || g > hi {
                        continue;
                    }
                    let windows = self.inner.f.windows.clone();
                    self.inner.with_key(g, &bytes, &mut scratch, |_, ctx| {
                        let before = windows.get(ctx, &end)?.map_or(0, |(c, _)| c);
                        windows.insert(ctx, &end, &(before + n, key.clone()))?;
                        ctx.register_event_timer(end)
                    })?;
                }
            }
        }
        if let Some(wm) = event_time {
            self.inner.watermark = Some(wm);
            self.inner.f.event_time = wm;
        }
        self.inner.f.floors = self.inner.floors.clone();
        Ok(())
    }
}

impl Operator for TumblingWindowCount {
    fn process(
        &mut self,
        input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        self.inner.process(input, batch, out)?;
        let wm = self.inner.f.event_time;
        if wm > i64::MIN {
            self.inner.advance_watermark(wm, out)?;
        }
        Ok(())
    }

    /// The input's watermark, less the lateness, moves its event time on too.
    fn watermark(&mut self, watermark: i64, out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        let f = &mut self.inner.f;
        f.event_time = f.event_time.max(watermark.saturating_sub(f.lateness_ms));
        let wm = f.event_time;
        if wm > i64::MIN {
            self.inner.advance_watermark(wm, out)?;
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        self.inner.finish(out)
    }

    fn take_dropped(&mut self) -> u64 {
        self.inner.take_dropped()
    }

    /// The state of a window operator of an older Weir (windows in the checkpoint's
    /// metadata), moved into keyed state.
    fn restore(&mut self, state: Option<serde_json::Value>) -> Result<(), RuntimeError> {
        match state {
            Some(v) => self.migrate(vec![(0, v)], None),
            None => Ok(()),
        }
    }

    fn rescale(
        &mut self,
        states: Vec<(u32, serde_json::Value)>,
        at: &Rescale,
    ) -> Result<(), RuntimeError> {
        self.migrate(states, Some(at.old_parallelism))
    }

    fn snapshot(&mut self, id: u64) -> Result<Option<serde_json::Value>, RuntimeError> {
        self.inner.snapshot(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{StateBackend, StateBackendKind};

    fn spec() -> WindowSpec {
        serde_json::from_value(
            serde_json::json!({"key": "k", "size": "10s", "allowedLateness": "1s"}),
        )
        .unwrap()
    }

    fn subtask(
        backend: &StateBackend,
        key_groups: (u16, u16),
        key_type: FieldType,
    ) -> TumblingWindowCount {
        let info = Info { key_groups, ..Info::sole("w", &["k", "ts"]) };
        let types = vec![FieldType::Text, FieldType::Integer, FieldType::Integer];
        TumblingWindowCount::new(&spec(), info, key_type, backend.keyed_store("w", 128), types)
            .unwrap()
    }

    fn rec(k: &str, ts: i64) -> Record {
        vec![Value::str(k), Value::Int(ts)]
    }

    fn lines(out: &[Record]) -> Vec<String> {
        let mut l: Vec<String> = out
            .iter()
            .map(|r| r.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","))
            .collect();
        l.sort();
        l
    }

    #[test]
    fn windows_fire_as_the_event_time_passes_them_and_late_records_are_dropped() {
        for heap in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let kind = if heap { StateBackendKind::Heap } else { StateBackendKind::Rocksdb };
            let backend = StateBackend::open_kind(kind, dir.path(), &["w".to_string()]).unwrap();
            let mut w = subtask(&backend, (0, 127), FieldType::Text);
            let mut out = Vec::new();
            w.process(0, vec![rec("a", 1_000), rec("b", 9_999), rec("a", 5_000)], &mut out)
                .unwrap();
            assert!(out.is_empty(), "{out:?}");
            // 11 s less 1 s of lateness: the window ending at 10 s is complete.
            w.process(0, vec![rec("a", 11_000)], &mut out).unwrap();
            assert_eq!(lines(&out), ["a,10000,2", "b,10000,1"]);
            // Late for the fired window: dropped and counted; a bad time too.
            out.clear();
            w.process(0, vec![rec("a", 9_000), vec![Value::str("a"), Value::str("x")]], &mut out)
                .unwrap();
            assert!(out.is_empty());
            assert_eq!(w.take_dropped(), 2);
            w.finish(&mut out).unwrap();
            assert_eq!(lines(&out), ["a,20000,1"]);
            assert!(backend.scan("w").unwrap().is_empty(), "fired windows leave no state");
        }
    }

    #[test]
    fn open_windows_and_the_event_time_come_back_from_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let backend = StateBackend::open(dir.path(), &["w".to_string()]).unwrap();
        let mut w = subtask(&backend, (0, 127), FieldType::Text);
        let mut out = Vec::new();
        w.process(0, vec![rec("a", 1_000), rec("b", 12_000), rec("c", 25_000)], &mut out).unwrap();
        assert_eq!(lines(&out), ["a,10000,1", "b,20000,1"]);
        w.snapshot(1).unwrap();
        drop(w);
        // Another subtask on the same state (as a restore gives it): 24 s is where it was.
        let mut w = subtask(&backend, (0, 127), FieldType::Text);
        out.clear();
        w.process(0, vec![rec("b", 15_000), rec("c", 21_000)], &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(w.take_dropped(), 1, "the window of b at 20 s has fired before");
        w.finish(&mut out).unwrap();
        assert_eq!(lines(&out), ["c,30000,2"]);
    }

    #[test]
    fn the_window_state_of_an_older_weir_is_moved_into_keyed_state_by_key_group() {
        // Keys as text, whatever the field held: "7" of an integer field was hashed by its
        // 8 bytes.
        let g = |b: &[u8]| key_group_of(b, 128);
        let g7 = g(&7i64.to_be_bytes());
        let old = serde_json::json!({
            "watermark": 3_000,
            "windows": {"10000": {"7": 2, "x": 1}, "20000": {"7": 1}},
            "keyGroups": {"7": g7, "x": g(b"x")},
        });
        let dir = tempfile::tempdir().unwrap();
        let backend = StateBackend::open(dir.path(), &["w".to_string()]).unwrap();
        // Two new subtasks split the key groups; each keeps its own keys.
        let mut fired = Vec::new();
        for (lo, hi) in [(0u16, 63u16), (64, 127)] {
            let mut w = subtask(&backend, (lo, hi), FieldType::Any);
            let at = Rescale {
                uid: "w".into(),
                subtask: u32::from(lo > 0),
                parallelism: 2,
                old_parallelism: 1,
                key_groups: (lo, hi),
            };
            w.rescale(vec![(0, old.clone()), (1, serde_json::Value::Null)], &at).unwrap();
            let mut out = Vec::new();
            let own7 = (lo..=hi).contains(&g7);
            if own7 {
                // 2.5 s is behind the old event time: its window is still open and counts
                // it, under the bytes the exchange hashes the integer 7 by.
                w.process(0, vec![vec![Value::Int(7), Value::Int(2_500)]], &mut out).unwrap();
            }
            w.finish(&mut out).unwrap();
            let keys: Vec<String> = out.iter().map(|r| r[0].to_string()).collect();
            assert_eq!(keys.contains(&"7".to_string()), own7, "{keys:?}");
            fired.extend(lines(&out));
        }
        fired.sort();
        assert_eq!(fired, ["7,10000,3", "7,20000,1", "x,10000,1"]);
    }

    #[test]
    fn old_window_state_that_does_not_read_is_refused_naming_the_operator() {
        let dir = tempfile::tempdir().unwrap();
        let backend = StateBackend::open(dir.path(), &["w".to_string()]).unwrap();
        let mut w = subtask(&backend, (0, 127), FieldType::Text);
        let e = w.restore(Some(serde_json::json!({"windows": 3}))).unwrap_err();
        assert!(e.message.contains("operator \"w\"") && e.message.contains("does not read"), "{e}");
    }
}
