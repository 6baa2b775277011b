//! The `generator` source: records from a seeded sequence, split by index over the subtasks.

use super::Pacer;
use std::time::Instant;

use crate::error::RuntimeError;
use crate::event_time::{EventClock, SplitTime, Watermark};
use crate::operator::{Rescale, Source, bad_state};
use crate::plan::{GeneratorFormat, GeneratorSpec};
use crate::record::{Record, Value};

/// SplitMix64: small, fast, and the same everywhere.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Zipf-distributed integers in `1..=n` by rejection-inversion (Hörmann and Derflinger).
#[derive(Debug, Clone)]
pub struct Zipf {
    n: f64,
    s: f64,
    h_x1: f64,
    h_n: f64,
    s_val: f64,
}

impl Zipf {
    pub fn new(n: u64, s: f64) -> Self {
        let mut z = Self { n: n as f64, s, h_x1: 0.0, h_n: 0.0, s_val: 0.0 };
        z.h_x1 = z.h_integral(1.5) - 1.0;
        z.h_n = z.h_integral(z.n + 0.5);
        z.s_val = 2.0 - z.h_integral_inv(z.h_integral(2.5) - z.h(2.0));
        z
    }
    fn helper1(x: f64) -> f64 {
        if x.abs() > 1e-8 { x.ln_1p() / x } else { 1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x)) }
    }
    fn helper2(x: f64) -> f64 {
        if x.abs() > 1e-8 {
            x.exp_m1() / x
        } else {
            1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x))
        }
    }
    fn h_integral(&self, x: f64) -> f64 {
        let lx = x.ln();
        Self::helper2((1.0 - self.s) * lx) * lx
    }
    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }
    fn h_integral_inv(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.s)).max(-1.0);
        (Self::helper1(t) * x).exp()
    }
    pub fn sample(&self, rng: &mut SplitMix64) -> u64 {
        loop {
            let u = self.h_n + rng.next_f64() * (self.h_x1 - self.h_n);
            let x = self.h_integral_inv(u);
            let k = x.round().clamp(1.0, self.n);
            if k - x <= self.s_val || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64;
            }
        }
    }
}

/// The position of one generator split: how many records it has emitted, and its random
/// stream.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct GenSplit {
    split: u32,
    emitted: u64,
    #[serde(skip)]
    total: Option<u64>,
    rng: SplitMix64,
    /// Its event time, with `eventTime`.
    #[serde(default, skip_serializing_if = "SplitTime::is_empty")]
    time: SplitTime,
}

/// The deterministic generator: split `s` of `S` is its own stream, seeded from the seed and
/// `s`, holding `count / S` records (the first `count % S` splits one more).
pub struct GeneratorSource {
    spec: GeneratorSpec,
    zipf: Option<Zipf>,
    splits: Vec<GenSplit>,
    next: usize,
    pacer: Pacer,
    line: String,
    clock: Option<EventClock>,
}

impl std::fmt::Debug for GeneratorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratorSource").field("splits", &self.splits.len()).finish()
    }
}

impl GeneratorSource {
    pub fn new(spec: GeneratorSpec, subtask: u32, parallelism: u32) -> Self {
        let total_splits = spec.splits.max(1);
        let splits: Vec<GenSplit> = (0..total_splits)
            .filter(|s| s % parallelism == subtask)
            .map(|s| GenSplit {
                split: s,
                emitted: 0,
                total: split_total(&spec, s),
                rng: SplitMix64::new(
                    spec.seed ^ (u64::from(s) + 1).wrapping_mul(0x2545_f491_4f6c_dd1d),
                ),
                time: SplitTime::default(),
            })
            .collect();
        let share = splits.len() as f64 / f64::from(total_splits);
        let pacer = Pacer::new(spec.rate_per_second.map(|r| r * share));
        let zipf = (spec.distribution == crate::plan::Distribution::Zipf)
            .then(|| Zipf::new(spec.keys.max(1), spec.zipf_exponent));
        Self { spec, zipf, splits, next: 0, pacer, line: String::new(), clock: None }
    }

    /// Its records carry the event time `clock` reads, per split.
    pub fn with_event_time(mut self, clock: Option<EventClock>) -> Self {
        self.clock = clock;
        self
    }

    /// Takes over restored splits (checked against the spec), dropping finished ones.
    fn take_splits(&mut self, splits: Vec<GenSplit>) -> Result<(), RuntimeError> {
        let n = self.spec.splits.max(1);
        self.splits = splits;
        for sp in &mut self.splits {
            if sp.split >= n {
                return Err(RuntimeError::user(format!(
                    "restoring a generator: split {} is not below its {n} splits (spec.splits changed?)",
                    sp.split
                )));
            }
            sp.total = split_total(&self.spec, sp.split);
        }
        self.splits.retain(|sp| sp.total.is_none_or(|t| sp.emitted < t));
        Ok(())
    }

    #[inline]
    fn key(&self, rng: &mut SplitMix64) -> u64 {
        match &self.zipf {
            Some(z) => z.sample(rng) - 1,
            None => rng.next_u64() % self.spec.keys.max(1),
        }
    }
}

/// The splits in a generator's snapshot.
fn gen_splits(state: serde_json::Value) -> Result<Vec<GenSplit>, RuntimeError> {
    #[derive(serde::Deserialize)]
    struct State {
        splits: Vec<GenSplit>,
    }
    let st: State = serde_json::from_value(state).map_err(|e| bad_state("a generator", e))?;
    Ok(st.splits)
}

/// Records split `s` of a generator holds (`None`: unbounded).
fn split_total(spec: &GeneratorSpec, s: u32) -> Option<u64> {
    let n = u64::from(spec.splits.max(1));
    spec.count.map(|c| c / n + u64::from(u64::from(s) < c % n))
}

impl Source for GeneratorSource {
    fn snapshot(&mut self, _id: u64) -> Result<Option<serde_json::Value>, RuntimeError> {
        Ok(Some(serde_json::json!({ "splits": self.splits })))
    }

    fn restore(&mut self, state: serde_json::Value) -> Result<(), RuntimeError> {
        self.take_splits(gen_splits(state)?)
    }

    fn rescale(
        &mut self,
        states: Vec<(u32, serde_json::Value)>,
        at: &Rescale,
    ) -> Result<(), RuntimeError> {
        let mut all = Vec::new();
        for (_, v) in states {
            all.extend(gen_splits(v)?);
        }
        // Splits are dealt round-robin, as at the start.
        all.retain(|sp| sp.split % at.parallelism == at.subtask);
        all.sort_by_key(|sp| sp.split);
        self.take_splits(all)
    }

    fn watermark(&mut self) -> Option<Watermark> {
        let clock = self.clock.as_ref()?;
        Some(clock.watermark(self.splits.iter().map(|s| &s.time), Instant::now()))
    }

    fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> Result<bool, RuntimeError> {
        use std::fmt::Write;
        if self.splits.is_empty() {
            return Ok(false);
        }
        let n = self.pacer.allow(max);
        let i = self.next % self.splits.len();
        self.next = self.next.wrapping_add(1);
        let mut split = self.splits[i].clone();
        let from = out.len();
        let n = match split.total {
            Some(t) => n.min((t - split.emitted) as usize),
            None => n,
        };
        for _ in 0..n {
            match self.spec.format {
                GeneratorFormat::Text => {
                    self.line.clear();
                    for w in 0..self.spec.words_per_line {
                        if w > 0 {
                            self.line.push(' ');
                        }
                        let k = self.key(&mut split.rng);
                        let _ = write!(self.line, "w{k}");
                    }
                    out.push(vec![Value::str(&self.line)]);
                }
                GeneratorFormat::Kv => {
                    let k = self.key(&mut split.rng);
                    let v = (split.rng.next_u64() % 100) as i64;
                    out.push(vec![
                        Value::Str(format!("k{k}").into()),
                        Value::Int(v),
                        Value::Int(split.emitted as i64),
                    ]);
                }
            }
            split.emitted += 1;
        }
        if let Some(clock) = &self.clock {
            clock.observe(&mut split.time, &out[from..], Instant::now())?;
        }
        let done = split.total.is_some_and(|t| split.emitted >= t);
        if done {
            self.splits.remove(i);
        } else {
            self.splits[i] = split;
        }
        Ok(!self.splits.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_samples_are_in_range_and_skewed() {
        let z = Zipf::new(1000, 1.0);
        let mut rng = SplitMix64::new(1);
        let mut counts = vec![0u32; 1001];
        for _ in 0..100_000 {
            let k = z.sample(&mut rng);
            assert!((1..=1000).contains(&k));
            counts[k as usize] += 1;
        }
        // Rank 1 is about twice rank 2 and ten times rank 10 under exponent 1.
        let r = |a: usize, b: usize| f64::from(counts[a]) / f64::from(counts[b]);
        assert!((1.7..2.3).contains(&r(1, 2)), "{}", r(1, 2));
        assert!((7.0..13.0).contains(&r(1, 10)), "{}", r(1, 10));
    }

    #[test]
    fn generator_splits_do_not_depend_on_parallelism() {
        let spec: GeneratorSpec = serde_json::from_value(serde_json::json!({"seed": 3, "count": 1001, "keys": 50, "splits": 5, "format": "text", "wordsPerLine": 2})).unwrap();
        let run = |p: u32| {
            let mut lines: Vec<String> = Vec::new();
            for s in 0..p {
                let mut g = GeneratorSource::new(spec.clone(), s, p);
                let mut out = Vec::new();
                while g.poll(&mut out, 64).unwrap() {}
                lines.extend(out.iter().map(|r| r[0].to_string()));
            }
            lines.sort();
            lines
        };
        let one = run(1);
        assert_eq!(one.len(), 1001);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
    }

    #[test]
    fn a_generators_watermark_is_its_lowest_split_and_survives_a_rescale() {
        let spec: GeneratorSpec = serde_json::from_value(serde_json::json!({"count": 1000, "splits": 3, "format": "kv", "eventTime": {"field": "ts", "maxOutOfOrderness": "10ms"}})).unwrap();
        let fields = ["key".to_string(), "value".into(), "ts".into()];
        let clock =
            || Some(EventClock::new("gen", spec.event_time.as_ref().unwrap(), &fields).unwrap());
        let mut g = GeneratorSource::new(spec.clone(), 0, 1).with_event_time(clock());
        let mut out = Vec::new();
        // A split that has given nothing holds the watermark back.
        g.poll(&mut out, 100).unwrap();
        g.poll(&mut out, 50).unwrap();
        assert_eq!(g.watermark(), Some(Watermark::At(i64::MIN)));
        g.poll(&mut out, 70).unwrap();
        // Splits at 99, 49 and 69 (their records' places): the lowest less 10 ms and 1.
        assert_eq!(g.watermark(), Some(Watermark::At(49 - 11)));
        let state = g.snapshot(1).unwrap().unwrap();
        // Rescaled to two subtasks: each starts where its splits stood.
        let at = |s| Rescale {
            uid: "gen".into(),
            subtask: s,
            parallelism: 2,
            old_parallelism: 1,
            key_groups: (0, 0),
        };
        let mut g0 = GeneratorSource::new(spec.clone(), 0, 2).with_event_time(clock());
        g0.rescale(vec![(0, state.clone())], &at(0)).unwrap();
        assert_eq!(g0.watermark(), Some(Watermark::At(69 - 11)), "splits 0 and 2");
        let mut g1 = GeneratorSource::new(spec.clone(), 1, 2).with_event_time(clock());
        g1.rescale(vec![(0, state)], &at(1)).unwrap();
        assert_eq!(g1.watermark(), Some(Watermark::At(49 - 11)), "split 1");
        // Without event time, no watermark.
        assert_eq!(GeneratorSource::new(spec, 0, 1).watermark(), None);
    }

    #[test]
    fn a_generator_rescaled_part_way_emits_every_record_once() {
        let spec: GeneratorSpec = serde_json::from_value(serde_json::json!({"seed": 4, "count": 1003, "keys": 50, "splits": 7, "format": "text", "wordsPerLine": 2})).unwrap();
        let mut whole = Vec::new();
        let mut g = GeneratorSource::new(spec.clone(), 0, 1);
        while g.poll(&mut whole, 64).unwrap() {}
        // Two subtasks emit a little, snapshot, and three take over.
        let mut lines = Vec::new();
        let mut states = Vec::new();
        for s in 0..2 {
            let mut g = GeneratorSource::new(spec.clone(), s, 2);
            g.poll(&mut lines, 50 + 30 * s as usize).unwrap();
            states.push((s, g.snapshot(1).unwrap().unwrap()));
        }
        for s in 0..3 {
            let mut g = GeneratorSource::new(spec.clone(), s, 3);
            let at = Rescale {
                uid: "gen".into(),
                subtask: s,
                parallelism: 3,
                old_parallelism: 2,
                key_groups: (0, 0),
            };
            g.rescale(states.clone(), &at).unwrap();
            while g.poll(&mut lines, 64).unwrap() {}
        }
        let key = |v: &Vec<Record>| {
            let mut l: Vec<String> = v.iter().map(|r| r[0].to_string()).collect();
            l.sort();
            l
        };
        assert_eq!(key(&lines), key(&whole));
    }
}
