//! Joins of two keyed inputs, written against the SDK like a user's operator: records of
//! both inputs come partitioned by their key fields (one per input), [`Context::input`] says
//! which input a record came from, and each side is kept in keyed state with event-time
//! timers, so a join is checkpointed, restored and split by key group like any other state.
//! The watermark is the least over both inputs' channels: one input far ahead only makes
//! the join keep more of it until the other catches up.
//!
//! - `window_join`: a key's records of each window (tumbling or sliding), per side, in a
//!   `MapState` by window start; when the watermark passes the window's last millisecond,
//!   every pair (one of each side) is emitted and the window is gone.
//! - `interval_join`: a record `a` of the first input joins each `b` of the second with
//!   `a.time + lowerBound <= b.time <= a.time + upperBound`. Each side is kept until no record
//!   of the other that is not late can join it: `a` until the watermark reaches
//!   `a.time + upperBound`, `b` until it reaches `b.time - lowerBound`.
//!
//! A record whose time the watermark has passed (a window join: every window it falls in) is
//! late: counted in `weir_operator_late_records_total` and dropped.

use crate::error::RuntimeError;
use crate::operator::{Context, Info, InputFields, MapState, Output, Process, ValueState};
use crate::plan::{IntervalJoinSpec, WindowJoinSpec, WindowKind};
use crate::record::{Record, Value};

/// The event time of `r` (field `at`), or, without one, processing time; `None` when the
/// field holds no integer (the record is dropped and counted).
fn time_of(r: &Record, at: Option<usize>, ctx: &Context<'_>) -> Option<i64> {
    match at {
        Some(i) => match r.get(i) {
            Some(Value::Int(t)) => Some(*t),
            _ => None,
        },
        None => Some(ctx.now_ms()),
    }
}

fn not_planned(what: &str) -> Result<Output, String> {
    Err(format!("{what} is planned by the catalogue"))
}

fn no_open(info: &Info) -> RuntimeError {
    RuntimeError::internal(format!("operator {:?}: a join is made from its plan", info.uid))
}

/// A key's records of one window, per side.
type Sides = (Vec<Record>, Vec<Record>);

#[derive(Debug)]
pub struct WindowJoin {
    size: i64,
    slide: i64,
    /// The time field of each input; none on processing time.
    time: [Option<usize>; 2],
    windows: MapState<i64, Sides>,
}

impl WindowJoin {
    /// `time`: the position of each input's time field (none: processing time).
    pub fn new(spec: &WindowJoinSpec, time: [Option<usize>; 2]) -> Self {
        let size = spec.size.map_or(1, |d| d.as_millis_i64()).max(1);
        let slide = match spec.kind {
            WindowKind::Sliding => spec.slide.map_or(size, |d| d.as_millis_i64()).max(1),
            _ => size,
        };
        Self { size, slide, time, windows: MapState::new("join") }
    }

    fn event_time(&self) -> bool {
        self.time[0].is_some()
    }

    fn register(&self, ctx: &mut Context<'_>, at: i64) -> Result<(), RuntimeError> {
        if self.event_time() {
            ctx.register_event_timer(at)
        } else {
            ctx.register_processing_timer(at)
        }
    }
}

impl Process for WindowJoin {
    type Params = WindowJoinSpec;

    fn plan(_: &WindowJoinSpec, _: InputFields<'_>) -> Result<Output, String> {
        not_planned("window_join")
    }

    fn open(_: WindowJoinSpec, info: &Info) -> Result<Self, RuntimeError> {
        Err(no_open(info))
    }

    fn process(&mut self, r: Record, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        let side = ctx.input().min(1);
        let Some(ts) = time_of(&r, self.time[side], ctx) else {
            ctx.drop_record();
            return Ok(());
        };
        let passed = if self.event_time() { ctx.watermark() } else { None };
        let mut start = ts - ts.rem_euclid(self.slide);
        let mut on_time = false;
        while start > ts - self.size {
            let last = start + self.size - 1;
            if passed.is_none_or(|w| last > w) {
                let mut sides = self.windows.get(ctx, &start)?;
                if sides.is_none() {
                    self.register(ctx, last)?;
                }
                let entry = sides.get_or_insert_with(Default::default);
                if side == 0 {
                    entry.0.push(r.clone());
                } else {
                    entry.1.push(r.clone());
                }
                self.windows.insert(ctx, &start, entry)?;
                on_time = true;
            }
            start -= self.slide;
        }
        if !on_time {
            ctx.late_record();
        }
        Ok(())
    }

    fn on_timer(&mut self, ts: i64, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        let start = ts + 1 - self.size;
        let Some((left, right)) = self.windows.get(ctx, &start)? else { return Ok(()) };
        self.windows.remove(ctx, &start)?;
        for a in &left {
            for b in &right {
                let mut out = Vec::with_capacity(2 + a.len() + b.len());
                out.push(Value::Int(start));
                out.push(Value::Int(start + self.size));
                out.extend(a.iter().cloned());
                out.extend(b.iter().cloned());
                ctx.emit(out);
            }
        }
        Ok(())
    }
}

/// A side's records, with their times.
type Kept = Vec<(i64, Record)>;

#[derive(Debug)]
pub struct IntervalJoin {
    lower: i64,
    upper: i64,
    time: [usize; 2],
    left: ValueState<Kept>,
    right: ValueState<Kept>,
}

impl IntervalJoin {
    pub fn new(spec: &IntervalJoinSpec, time: [usize; 2]) -> Self {
        Self {
            lower: spec.lower_bound.millis(),
            upper: spec.upper_bound.millis(),
            time,
            left: ValueState::new("left"),
            right: ValueState::new("right"),
        }
    }
}

fn pair(a: &Record, b: &Record) -> Record {
    let mut out = Vec::with_capacity(a.len() + b.len());
    out.extend(a.iter().cloned());
    out.extend(b.iter().cloned());
    out
}

impl Process for IntervalJoin {
    type Params = IntervalJoinSpec;

    fn plan(_: &IntervalJoinSpec, _: InputFields<'_>) -> Result<Output, String> {
        not_planned("interval_join")
    }

    fn open(_: IntervalJoinSpec, info: &Info) -> Result<Self, RuntimeError> {
        Err(no_open(info))
    }

    fn process(&mut self, r: Record, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        let side = ctx.input().min(1);
        let Some(ts) = time_of(&r, Some(self.time[side]), ctx) else {
            ctx.drop_record();
            return Ok(());
        };
        if ctx.watermark().is_some_and(|w| ts <= w) {
            ctx.late_record();
            return Ok(());
        }
        let (lower, upper) = (self.lower, self.upper);
        if side == 0 {
            for (bt, b) in self.right.get(ctx)?.unwrap_or_default() {
                if ts.saturating_add(lower) <= bt && bt <= ts.saturating_add(upper) {
                    ctx.emit(pair(&r, &b));
                }
            }
            let mut kept = self.left.get(ctx)?.unwrap_or_default();
            kept.push((ts, r));
            self.left.set(ctx, &kept)?;
            ctx.register_event_timer(ts.saturating_add(upper))
        } else {
            for (at, a) in self.left.get(ctx)?.unwrap_or_default() {
                if at.saturating_add(lower) <= ts && ts <= at.saturating_add(upper) {
                    ctx.emit(pair(&a, &r));
                }
            }
            let mut kept = self.right.get(ctx)?.unwrap_or_default();
            kept.push((ts, r));
            self.right.set(ctx, &kept)?;
            ctx.register_event_timer(ts.saturating_sub(lower))
        }
    }

    /// What no record to come can join goes.
    fn on_timer(&mut self, ts: i64, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        let (lower, upper) = (self.lower, self.upper);
        prune(&self.left, ctx, |t| t.saturating_add(upper) <= ts)?;
        prune(&self.right, ctx, |t| t.saturating_sub(lower) <= ts)
    }
}

/// Drops the records of `state` whose time is `gone`.
fn prune(
    state: &ValueState<Kept>,
    ctx: &mut Context<'_>,
    gone: impl Fn(i64) -> bool,
) -> Result<(), RuntimeError> {
    let Some(mut kept) = state.get(ctx)? else { return Ok(()) };
    let before = kept.len();
    kept.retain(|(t, _)| !gone(*t));
    if kept.is_empty() {
        state.clear(ctx)
    } else if kept.len() != before {
        state.set(ctx, &kept)
    } else {
        Ok(())
    }
}
