//! The `window` operator: tumbling, sliding and session windows per key, with any of count,
//! sum, min, max and avg, over event time (the watermark of its input) or, where its input
//! has no event time, over processing time. Written against the SDK like a user's operator:
//! a key's windows are keyed state, each with a timer at its end (and, with allowed
//! lateness, one at the end of its lateness), so they are checkpointed, restored and split by
//! key group like any other state, and a window open across a savepoint fires once.
//!
//! As in Flink, a window `[start, end)` fires once the watermark reaches `end - 1`; a record
//! that comes after that, but before the watermark reaches `end - 1 + allowedLateness`,
//! updates the window and it is emitted again at once; after that its state is gone and a
//! record of it is late: dropped, and counted. Session windows (`gap`) start at a record and
//! end `gap` after it; windows that touch or overlap merge, also across fired ones within
//! their lateness (the merged window is emitted again).

use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;
use crate::operator::{Context, Info, InputFields, MapState, Output, Process, ValueState};
use crate::plan::{AggregateFn, WindowKind, WindowOpSpec};
use crate::record::{Record, Value};

/// A key's value as the window keeps it, to emit it as it came.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum KeyValue {
    S(String),
    I(i64),
    F(f64),
    B(bool),
}

impl KeyValue {
    fn of(v: &Value) -> Self {
        match v {
            Value::Str(s) => KeyValue::S(s.to_string()),
            Value::Int(i) => KeyValue::I(*i),
            Value::Float(f) => KeyValue::F(*f),
            Value::Bool(b) => KeyValue::B(*b),
        }
    }

    fn value(&self) -> Value {
        match self {
            KeyValue::S(s) => Value::str(s),
            KeyValue::I(i) => Value::Int(*i),
            KeyValue::F(f) => Value::Float(*f),
            KeyValue::B(b) => Value::Bool(*b),
        }
    }
}

/// A number as an aggregate keeps it: an integer while every value was one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Num {
    I(i64),
    F(f64),
}

impl Num {
    fn of(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(Num::I(*i)),
            Value::Float(f) => Some(Num::F(*f)),
            Value::Str(s) => {
                s.parse::<i64>().map(Num::I).ok().or_else(|| s.parse().ok().map(Num::F))
            }
            Value::Bool(_) => None,
        }
    }

    fn f64(self) -> f64 {
        match self {
            Num::I(i) => i as f64,
            Num::F(f) => f,
        }
    }

    fn value(self) -> Value {
        match self {
            Num::I(i) => Value::Int(i),
            Num::F(f) => Value::Float(f),
        }
    }

    fn add(self, other: Num) -> Num {
        match (self, other) {
            (Num::I(a), Num::I(b)) => a.checked_add(b).map_or(Num::F(a as f64 + b as f64), Num::I),
            (a, b) => Num::F(a.f64() + b.f64()),
        }
    }

    fn less(self, other: Num) -> bool {
        match (self, other) {
            (Num::I(a), Num::I(b)) => a < b,
            (a, b) => a.f64() < b.f64(),
        }
    }
}

/// One aggregate's running value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Slot {
    Count(i64),
    Sum(Num),
    Min(Num),
    Max(Num),
    Avg(f64, i64),
}

impl Slot {
    fn merge(&mut self, other: &Slot) {
        *self = match (&*self, other) {
            (Slot::Count(a), Slot::Count(b)) => Slot::Count(a + b),
            (Slot::Sum(a), Slot::Sum(b)) => Slot::Sum(a.add(*b)),
            (Slot::Min(a), Slot::Min(b)) => Slot::Min(if b.less(*a) { *b } else { *a }),
            (Slot::Max(a), Slot::Max(b)) => Slot::Max(if a.less(*b) { *b } else { *a }),
            (Slot::Avg(s, n), Slot::Avg(t, m)) => Slot::Avg(s + t, n + m),
            _ => return,
        };
    }

    fn value(&self) -> Value {
        match self {
            Slot::Count(n) => Value::Int(*n),
            Slot::Sum(x) | Slot::Min(x) | Slot::Max(x) => x.value(),
            Slot::Avg(s, n) => Value::Float(if *n == 0 { 0.0 } else { s / *n as f64 }),
        }
    }
}

/// A window's state: its key, its aggregates, and whether it has fired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pane {
    key: Option<KeyValue>,
    slots: Vec<Slot>,
    fired: bool,
}

/// A session window of a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Session {
    start: i64,
    end: i64,
    pane: Pane,
}

/// One subtask of a `window` operator.
pub struct Windows {
    kind: WindowKind,
    key: Option<usize>,
    /// The position of the event-time field; `None`: processing time.
    time: Option<usize>,
    size: i64,
    slide: i64,
    gap: i64,
    lateness: i64,
    /// What each output aggregate takes: its function and the position of its field.
    aggregates: Vec<(AggregateFn, Option<usize>)>,
    /// Fixed windows (tumbling and sliding) by start.
    panes: MapState<i64, Pane>,
    /// Session windows, per key.
    sessions: ValueState<Vec<Session>>,
}

impl std::fmt::Debug for Windows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Windows").field("kind", &self.kind).finish_non_exhaustive()
    }
}

fn millis(d: Option<weir_crds::Duration>) -> i64 {
    d.map_or(0, |d| d.as_millis_i64())
}

impl Windows {
    /// The windows a record at `ts` belongs to, as `(start, end)`.
    fn assign(&self, ts: i64) -> Vec<(i64, i64)> {
        match self.kind {
            WindowKind::Tumbling => {
                let start = ts - ts.rem_euclid(self.size);
                vec![(start, start.saturating_add(self.size))]
            }
            WindowKind::Sliding => {
                let mut out = Vec::new();
                let mut start = ts - ts.rem_euclid(self.slide);
                while start > ts - self.size {
                    out.push((start, start.saturating_add(self.size)));
                    start -= self.slide;
                }
                out
            }
            WindowKind::Session => vec![(ts, ts.saturating_add(self.gap))],
        }
    }

    /// A pane of one record, or `None` when a value it aggregates is not a number.
    fn pane_of(&self, r: &Record) -> Option<Pane> {
        let mut slots = Vec::with_capacity(self.aggregates.len());
        for &(f, field) in &self.aggregates {
            let num = || field.and_then(|i| r.get(i)).and_then(Num::of);
            slots.push(match f {
                AggregateFn::Count => Slot::Count(1),
                AggregateFn::Sum => Slot::Sum(num()?),
                AggregateFn::Min => Slot::Min(num()?),
                AggregateFn::Max => Slot::Max(num()?),
                AggregateFn::Avg => Slot::Avg(num()?.f64(), 1),
            });
        }
        let key = self.key.and_then(|k| r.get(k)).map(KeyValue::of);
        Some(Pane { key, slots, fired: false })
    }

    fn emit(&self, ctx: &mut Context<'_>, start: i64, end: i64, pane: &Pane) {
        let mut r = Vec::with_capacity(3 + pane.slots.len());
        if self.key.is_some() {
            r.push(pane.key.as_ref().map_or(Value::str(""), KeyValue::value));
        }
        r.push(Value::Int(start));
        r.push(Value::Int(end));
        r.extend(pane.slots.iter().map(Slot::value));
        ctx.emit(r);
    }

    /// The time it has reached: the watermark, or the wall clock.
    fn now(&self, ctx: &Context<'_>) -> i64 {
        match self.time {
            Some(_) => ctx.watermark().unwrap_or(i64::MIN),
            None => ctx.now_ms(),
        }
    }

    fn timer(&self, ctx: &mut Context<'_>, ts: i64) -> Result<(), RuntimeError> {
        match self.time {
            Some(_) => ctx.register_event_timer(ts),
            None => ctx.register_processing_timer(ts),
        }
    }

    /// `pane` joins window `(start, end)`: a new one gets its timer; one that fired already
    /// (a record within the lateness) is emitted again at once.
    fn add_fixed(
        &self,
        ctx: &mut Context<'_>,
        (start, end): (i64, i64),
        pane: &Pane,
        now: i64,
    ) -> Result<(), RuntimeError> {
        let mut p = match self.panes.get(ctx, &start)? {
            Some(mut p) => {
                for (a, b) in p.slots.iter_mut().zip(&pane.slots) {
                    a.merge(b);
                }
                p
            }
            None => {
                let p = pane.clone();
                self.timer(ctx, end - 1)?;
                p
            }
        };
        if end - 1 <= now {
            self.emit(ctx, start, end, &p);
            if !p.fired {
                p.fired = true;
                self.timer(ctx, (end - 1).saturating_add(self.lateness))?;
            }
        }
        if p.fired && (end - 1).saturating_add(self.lateness) <= now {
            self.panes.remove(ctx, &start)?;
        } else {
            self.panes.insert(ctx, &start, &p)?;
        }
        Ok(())
    }

    fn add_session(
        &self,
        ctx: &mut Context<'_>,
        (start, end): (i64, i64),
        pane: Pane,
        now: i64,
    ) -> Result<bool, RuntimeError> {
        let mut sessions = self.sessions.get(ctx)?.unwrap_or_default();
        let (mut lo, mut hi) = (start, end);
        let touching = |s: &Session, lo: i64, hi: i64| s.start <= hi && s.end >= lo;
        // Grow the new window over every session it touches, transitively.
        loop {
            let (l, h) = sessions
                .iter()
                .filter(|s| touching(s, lo, hi))
                .fold((lo, hi), |(l, h), s| (l.min(s.start), h.max(s.end)));
            if (l, h) == (lo, hi) {
                break;
            }
            (lo, hi) = (l, h);
        }
        if (hi - 1).saturating_add(self.lateness) <= now {
            return Ok(false); // late
        }
        let mut merged = Session { start: lo, end: hi, pane };
        let mut kept = Vec::with_capacity(sessions.len());
        for s in sessions.drain(..) {
            if touching(&s, lo, hi) {
                for (a, b) in merged.pane.slots.iter_mut().zip(&s.pane.slots) {
                    a.merge(b);
                }
            } else {
                kept.push(s);
            }
        }
        // Its timers: at its end, and at the end of its lateness once it has fired (those of
        // the sessions it merged stay, and find nothing to do).
        if hi - 1 <= now {
            self.emit(ctx, lo, hi, &merged.pane);
            merged.pane.fired = true;
            self.timer(ctx, (hi - 1).saturating_add(self.lateness))?;
        } else {
            merged.pane.fired = false;
            self.timer(ctx, hi - 1)?;
        }
        kept.push(merged);
        kept.sort_by_key(|s| s.start);
        self.sessions.set(ctx, &kept)?;
        Ok(true)
    }
}

impl Process for Windows {
    type Params = WindowOpSpec;

    /// (Planned by the catalogue, as every built-in type.)
    fn plan(_: &WindowOpSpec, _: InputFields<'_>) -> Result<Output, String> {
        Err("the window operator is planned by the catalogue".into())
    }

    fn open(p: WindowOpSpec, info: &Info) -> Result<Self, RuntimeError> {
        let pos = |n: &str| {
            info.field(n).ok_or_else(|| {
                RuntimeError::user(format!("operator {:?}: its input has no field {n:?}", info.uid))
            })
        };
        let key = p.key.as_deref().map(pos).transpose()?;
        let time = p.time_field.as_deref().map(pos).transpose()?;
        let mut aggregates = Vec::new();
        for (f, field) in p.aggregate.list() {
            aggregates.push((f, field.map(pos).transpose()?));
        }
        let size = millis(p.size).max(1);
        Ok(Self {
            kind: p.kind,
            key,
            time,
            size,
            slide: millis(p.slide.or(p.size)).max(1),
            gap: millis(p.gap).max(1),
            // Processing time has no late records.
            lateness: if time.is_some() { millis(Some(p.allowed_lateness)) } else { 0 },
            aggregates,
            panes: MapState::new("windows"),
            sessions: ValueState::new("sessions"),
        })
    }

    fn process(&mut self, r: Record, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        let ts = match self.time {
            Some(i) => match r.get(i) {
                Some(Value::Int(t)) => *t,
                _ => {
                    ctx.drop_record();
                    return Ok(());
                }
            },
            None => ctx.now_ms(),
        };
        let Some(pane) = self.pane_of(&r) else {
            ctx.drop_record();
            return Ok(());
        };
        let now = self.now(ctx);
        let on_time = match self.kind {
            WindowKind::Session => self.add_session(ctx, self.assign(ts)[0], pane, now)?,
            _ => {
                let mut any = false;
                for w in self.assign(ts) {
                    // A window whose lateness has passed is gone.
                    if (w.1 - 1).saturating_add(self.lateness) <= now {
                        continue;
                    }
                    self.add_fixed(ctx, w, &pane, now)?;
                    any = true;
                }
                any
            }
        };
        if !on_time {
            ctx.emit_late(r);
        }
        Ok(())
    }

    fn on_timer(&mut self, ts: i64, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        match self.kind {
            WindowKind::Session => {
                let Some(mut sessions) = self.sessions.get(ctx)? else { return Ok(()) };
                let mut changed = false;
                let mut i = 0;
                while i < sessions.len() {
                    let s = &mut sessions[i];
                    if !s.pane.fired && s.end - 1 == ts {
                        let s = s.clone();
                        self.emit(ctx, s.start, s.end, &s.pane);
                        changed = true;
                        if self.lateness == 0 {
                            sessions.remove(i);
                            continue;
                        }
                        sessions[i].pane.fired = true;
                        self.timer(ctx, ts.saturating_add(self.lateness))?;
                    } else if s.pane.fired && (s.end - 1).saturating_add(self.lateness) == ts {
                        sessions.remove(i);
                        changed = true;
                        continue;
                    }
                    i += 1;
                }
                if changed {
                    if sessions.is_empty() {
                        self.sessions.clear(ctx)?;
                    } else {
                        self.sessions.set(ctx, &sessions)?;
                    }
                }
            }
            _ => {
                // The window ending here fires; the one whose lateness ends here goes.
                let start = ts + 1 - self.size;
                if let Some(mut p) = self.panes.get(ctx, &start)?
                    && !p.fired
                {
                    self.emit(ctx, start, ts + 1, &p);
                    if self.lateness == 0 {
                        self.panes.remove(ctx, &start)?;
                    } else {
                        p.fired = true;
                        self.panes.insert(ctx, &start, &p)?;
                        self.timer(ctx, ts.saturating_add(self.lateness))?;
                    }
                }
                if self.lateness > 0 {
                    let start = ts.saturating_sub(self.lateness) + 1 - self.size;
                    if self.panes.get(ctx, &start)?.is_some_and(|p| p.fired) {
                        self.panes.remove(ctx, &start)?;
                    }
                }
            }
        }
        Ok(())
    }
}
