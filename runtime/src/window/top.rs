//! `window_top_n`: the first `n` records of each window of a `window`'s output, by a numeric
//! field, as Flink SQL's window Top-N. Its input is partitioned by `window_end`, so one
//! subtask sees all of a window's records (from every key of the window before it); it keeps
//! the best `n` so far per window in keyed state, with a timer at the window's last
//! millisecond (`window_end - 1`, when the window fired), and emits them ranked once its own
//! watermark passes that: every record the window emitted as it fired came before the
//! watermark that fired it. On processing time the timer is on the wall clock, a second
//! after the window's end, to let its records arrive from every subtask.
//!
//! Ties are ordered by the records' other fields, left to right, so the choice does not
//! depend on the order records arrive in (the parallelism, a restore).

use std::cmp::Ordering;

use crate::error::RuntimeError;
use crate::operator::{Context, Info, InputFields, Output, Process, ValueState};
use crate::plan::{SortOrder, TopNSpec};
use crate::record::{Record, Value};

/// How long after a processing-time window's end it is ranked.
const PROCESSING_GRACE_MS: i64 = 1000;

#[derive(Debug)]
pub struct TopN {
    n: usize,
    order_by: usize,
    descending: bool,
    end: usize,
    event_time: bool,
    best: ValueState<Vec<Record>>,
}

/// A total order of values: numbers by value (NaN last), then text, then booleans.
fn cmp_value(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Int(_) | Value::Float(_) => 0,
            Value::Str(_) => 1,
            Value::Bool(_) => 2,
        }
    }
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => x.cmp(y),
        (Value::Str(x), Value::Str(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (x, y) if rank(x) == 0 && rank(y) == 0 => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            x.total_cmp(&y)
        }
        (x, y) => rank(x).cmp(&rank(y)),
    }
}

impl TopN {
    /// Ranks on event time (its window's: the planner makes sure its input is a window),
    /// rather than on the wall clock.
    pub fn on_event_time(mut self, yes: bool) -> Self {
        self.event_time = yes;
        self
    }

    /// Whether `a` ranks before `b`.
    fn order(&self, a: &Record, b: &Record) -> Ordering {
        let by = cmp_value(&a[self.order_by], &b[self.order_by]);
        let by = if self.descending { by.reverse() } else { by };
        by.then_with(|| {
            a.iter()
                .zip(b)
                .map(|(x, y)| cmp_value(x, y))
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        })
    }
}

impl Process for TopN {
    type Params = TopNSpec;

    /// (Planned by the catalogue, as every built-in type.)
    fn plan(_: &TopNSpec, _: InputFields<'_>) -> Result<Output, String> {
        Err("window_top_n is planned by the catalogue".into())
    }

    fn open(p: TopNSpec, info: &Info) -> Result<Self, RuntimeError> {
        let pos = |n: &str| {
            info.field(n).ok_or_else(|| {
                RuntimeError::user(format!("operator {:?}: its input has no field {n:?}", info.uid))
            })
        };
        Ok(Self {
            n: p.n as usize,
            order_by: pos(&p.order_by)?,
            descending: p.order == SortOrder::Desc,
            end: pos("window_end")?,
            event_time: false,
            best: ValueState::new("top"),
        })
    }

    fn process(&mut self, r: Record, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        let Some(Value::Int(end)) = r.get(self.end) else {
            ctx.drop_record();
            return Ok(());
        };
        let last = end.saturating_sub(1);
        if self.event_time && ctx.watermark().is_some_and(|w| w >= last) {
            // Its window was ranked already (a window re-emitted within its lateness).
            ctx.late_record();
            return Ok(());
        }
        let mut best = self.best.get(ctx)?.unwrap_or_default();
        if best.is_empty() {
            if self.event_time {
                ctx.register_event_timer(last)?;
            } else {
                ctx.register_processing_timer(last.saturating_add(PROCESSING_GRACE_MS))?;
            }
        }
        let at = best.partition_point(|b| self.order(b, &r) == Ordering::Less);
        if at >= self.n {
            return Ok(());
        }
        best.insert(at, r);
        best.truncate(self.n);
        self.best.set(ctx, &best)
    }

    fn on_timer(&mut self, _ts: i64, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        let Some(best) = self.best.get(ctx)? else { return Ok(()) };
        self.best.clear(ctx)?;
        for (i, mut r) in best.into_iter().enumerate() {
            r.push(Value::Int(i as i64 + 1));
            ctx.emit(r);
        }
        Ok(())
    }
}
