//! `throttle`: passes records at most at a rate, holding the others (in its checkpoint
//! state) rather than sleeping, so that barriers pass while it waits.

use std::time::Instant;

use crate::error::RuntimeError;
use crate::operator::{Operator, Rescale};
use crate::record::Record;

/// Passes records on at no more than a given rate, by a token bucket that fills at the rate
/// and holds at most a second's worth. What comes faster waits in the operator, which is
/// part of its checkpointed state; while it holds records its subtask takes no more input
/// (the pressure goes upstream through credits) but still takes barriers, and the engine
/// calls [`Operator::release`] every few milliseconds. It never sleeps.
#[derive(Debug)]
pub struct Throttle {
    rate: f64,
    tokens: f64,
    filled: Option<Instant>,
    held: std::collections::VecDeque<Record>,
}

impl Throttle {
    pub fn new(rate_per_second: f64) -> Self {
        Self { rate: rate_per_second, tokens: 1.0, filled: None, held: Default::default() }
    }

    /// The held records as the checkpoint keeps them: the wire encoding, in hex.
    fn encode_held(&mut self) -> serde_json::Value {
        let mut bytes = Vec::new();
        crate::exchange::wire::encode_batch(self.held.make_contiguous(), &mut bytes);
        serde_json::json!({ "held": crate::auth::hex(&bytes) })
    }

    fn decode_held(&mut self, state: serde_json::Value) -> Result<(), RuntimeError> {
        let bad = |why: String| {
            RuntimeError::damaged(format!(
                "restoring a throttle: the records it held do not decode ({why}): the checkpoint is damaged"
            ))
        };
        let text = state
            .get("held")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("its state has no \"held\" text".into()))?;
        let bytes = crate::auth::unhex_bytes(text).ok_or_else(|| bad("not hexadecimal".into()))?;
        let records = crate::exchange::wire::decode_batch(&bytes).map_err(bad)?;
        self.held.extend(records);
        Ok(())
    }
}

impl Operator for Throttle {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        self.held.extend(batch);
        self.release(out)
    }

    fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    fn release(&mut self, out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        let now = Instant::now();
        if let Some(then) = self.filled.replace(now) {
            let burst = self.rate.max(1.0);
            self.tokens = (self.tokens + (now - then).as_secs_f64() * self.rate).min(burst);
        }
        let n = (self.tokens.floor() as usize).min(self.held.len());
        self.tokens -= n as f64;
        out.extend(self.held.drain(..n));
        Ok(())
    }

    fn snapshot(&mut self, _id: u64) -> Result<Option<serde_json::Value>, RuntimeError> {
        Ok((!self.held.is_empty()).then(|| self.encode_held()))
    }

    fn restore(&mut self, state: Option<serde_json::Value>) -> Result<(), RuntimeError> {
        match state {
            Some(st) if !st.is_null() => self.decode_held(st),
            _ => Ok(()),
        }
    }

    /// The records each old subtask held go to one new subtask (old index modulo the new
    /// parallelism): they are emitted once, by whichever subtask, before anything new.
    fn rescale(
        &mut self,
        states: Vec<(u32, serde_json::Value)>,
        at: &Rescale,
    ) -> Result<(), RuntimeError> {
        for (old, st) in states {
            if old % at.parallelism == at.subtask && !st.is_null() {
                self.decode_held(st)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Value;
    use std::time::Duration;

    #[test]
    fn a_throttle_holds_what_comes_faster_than_its_rate_and_never_sleeps() {
        let rec = |i: i64| vec![Value::Int(i), Value::str("x"), Value::Float(f64::NAN)];
        let mut t = Throttle::new(100.0);
        let mut out = Vec::new();
        let started = Instant::now();
        t.process(0, (0..500).map(rec).collect(), &mut out).unwrap();
        assert!(started.elapsed() < Duration::from_millis(100), "process slept");
        assert_eq!(out.len(), 1, "the first record goes at once, the others wait");
        assert!(t.holding());
        std::thread::sleep(Duration::from_millis(200));
        t.release(&mut out).unwrap();
        // 200 ms at 100 a second: about 20 more; never more than the time allows.
        let allowed = 1 + (started.elapsed().as_secs_f64() * 100.0) as usize;
        assert!(out.len() > 5 && out.len() <= allowed, "{} of at most {allowed}", out.len());
        // Held records are its state: a checkpoint restores them, in order, after those out.
        let st = t.snapshot(1).unwrap().expect("held records in the state");
        let mut back = Throttle::new(1e9);
        back.restore(Some(st.clone())).unwrap();
        let mut rest = Vec::new();
        back.release(&mut rest).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        back.release(&mut rest).unwrap();
        assert!(!back.holding());
        assert_eq!(out.len() + rest.len(), 500);
        for (i, r) in out.iter().chain(&rest).enumerate() {
            assert_eq!(r[0], Value::Int(i as i64));
            assert!(matches!(r[2], Value::Float(f) if f.is_nan()));
        }
        // Rescaled 1 -> 2: the old subtask's records go to exactly one new subtask.
        let mut got = 0;
        for subtask in 0..2 {
            let at = Rescale {
                uid: "slow".into(),
                subtask,
                parallelism: 2,
                old_parallelism: 1,
                key_groups: (0, 0),
            };
            let mut n = Throttle::new(1e9);
            n.rescale(vec![(0, st.clone())], &at).unwrap();
            got += n.held.len();
        }
        assert_eq!(got, 500 - out.len());
        // A damaged state is an error that says so, not a panic.
        for bad in [
            serde_json::json!({"held": "zz"}),
            serde_json::json!({"held": "0"}),
            serde_json::json!({"held": "ff01"}),
            serde_json::json!({"held": "+f"}),
            serde_json::json!({"other": 1}),
        ] {
            let e = Throttle::new(1.0).restore(Some(bad.clone())).unwrap_err();
            assert!(e.message.contains("throttle") && e.message.contains("damaged"), "{bad}: {e}");
        }
    }
}
