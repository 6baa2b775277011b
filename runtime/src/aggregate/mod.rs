//! The keyed aggregates `count`, `sum`, `min` and `max`: a value per key in a write-back
//! cache over the state backend, emitted at each record.

use crate::error::RuntimeError;
use crate::operator::Operator;
use crate::plan::Aggregate;
use crate::record::{Record, Value};
use crate::state::{CachedValueState, Num};

/// count, sum, min, max keyed by a field: emits `key,value` with the key's new value on every
/// update. State is a [`CachedValueState`]: no RocksDB read per record.
pub struct KeyedAggregate {
    aggregate: Aggregate,
    key: usize,
    field: Option<usize>,
    state: CachedValueState,
    scratch: [u8; 8],
    /// Records whose field is not a number, since the last [`Operator::take_dropped`].
    dropped: u64,
    /// What the last snapshot detached, until the engine takes it.
    deferred: Option<crate::state::DeferredWrite>,
}

impl std::fmt::Debug for KeyedAggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedAggregate").field("aggregate", &self.aggregate).finish()
    }
}

impl KeyedAggregate {
    pub fn new(
        aggregate: Aggregate,
        key: usize,
        field: Option<usize>,
        state: CachedValueState,
    ) -> Self {
        Self { aggregate, key, field, state, scratch: [0; 8], dropped: 0, deferred: None }
    }
}

fn num_value(v: &Value) -> Option<Num> {
    match v {
        Value::Int(i) => Some(Num::Int(*i)),
        Value::Float(f) => Some(Num::Float(*f)),
        Value::Str(s) => {
            s.parse::<i64>().map(Num::Int).ok().or_else(|| s.parse::<f64>().map(Num::Float).ok())
        }
        Value::Bool(_) => None,
    }
}

fn combine(a: Aggregate, old: Option<Num>, new: Num) -> Num {
    let Some(old) = old else { return new };
    match (a, old, new) {
        (Aggregate::Sum, Num::Int(x), Num::Int(y)) => Num::Int(x.wrapping_add(y)),
        (Aggregate::Min, Num::Int(x), Num::Int(y)) => Num::Int(x.min(y)),
        (Aggregate::Max, Num::Int(x), Num::Int(y)) => Num::Int(x.max(y)),
        (agg, x, y) => {
            let (x, y) = (as_f(x), as_f(y));
            Num::Float(match agg {
                Aggregate::Sum | Aggregate::Count => x + y,
                Aggregate::Min => x.min(y),
                Aggregate::Max => x.max(y),
            })
        }
    }
}

fn as_f(n: Num) -> f64 {
    match n {
        Num::Int(i) => i as f64,
        Num::Float(f) => f,
    }
}

impl Operator for KeyedAggregate {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        out.reserve(batch.len());
        for mut r in batch {
            let new = match self.aggregate {
                Aggregate::Count => {
                    let kb = r[self.key].key_bytes(&mut self.scratch);
                    self.state.update(kb, |v| match v {
                        Some(Num::Int(n)) => Num::Int(n + 1),
                        _ => Num::Int(1),
                    })
                }
                agg => {
                    let Some(x) = self.field.and_then(|f| num_value(&r[f])) else {
                        self.dropped += 1;
                        continue;
                    };
                    let kb = r[self.key].key_bytes(&mut self.scratch);
                    self.state.update(kb, |old| combine(agg, old, x))
                }
            }
            .map_err(|e| RuntimeError::internal(e.to_string()))?;
            let key = r.swap_remove(self.key);
            out.push(vec![
                key,
                match new {
                    Num::Int(i) => Value::Int(i),
                    Num::Float(f) => Value::Float(f),
                },
            ]);
        }
        Ok(())
    }

    fn finish(&mut self, _out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        self.state.write_back().map_err(|e| RuntimeError::internal(e.to_string()))
    }

    fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// The changed values are copied out, not written: the checkpoint's thread writes them
    /// and takes the backend's snapshot while this goes on with the next records.
    fn snapshot(&mut self, _id: u64) -> Result<Option<serde_json::Value>, RuntimeError> {
        let deferred = self.state.detach().map_err(|e| RuntimeError::internal(e.to_string()))?;
        self.deferred = Some(deferred);
        Ok(None)
    }

    fn deferred_write(&mut self) -> Option<crate::state::DeferredWrite> {
        self.deferred.take()
    }
}

// ---------------------------------------------------------------------------------------------
// Sinks
