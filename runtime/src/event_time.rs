//! Event time: the watermarks that sources derive from their records and that travel through
//! the exchanges beside them.
//!
//! A watermark `t` says that the event time has reached `t`: no record at or before `t` is
//! expected any more (one that comes is late), and event-time timers at or before `t` fire.
//!
//! - **Sources** ([`EventClock`]): each split (a generator's stream, a file, a partition)
//!   keeps the highest event time it has given ([`SplitTime`], in the source's position, so
//!   that a restored or rescaled split goes on from it); its watermark trails that by
//!   `maxOutOfOrderness` and a millisecond. The source's watermark is the lowest over its
//!   splits, leaving out those idle for `idleTimeout`; with every split idle, the source is
//!   [`Watermark::Idle`].
//! - **Channels** ([`InputClock`]): a subtask's watermark is the lowest over its input
//!   channels, leaving out those that are idle or have ended; with every live channel idle,
//!   the subtask is idle too. It is forwarded, through the chained operators and on every
//!   outgoing channel, when it moves.
//! - Both only move forward: what a subtask forwards never goes back, also when a channel
//!   that was idle comes back behind the others (its records may then be late).

use std::time::Instant;

use crate::error::RuntimeError;
use crate::plan::EventTimeSpec;
use crate::record::Record;

/// What a channel says of its event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watermark {
    /// The event time has reached this (milliseconds since the epoch).
    At(i64),
    /// No records for now: the channel holds no one back until it sends a watermark again.
    Idle,
}

/// The event time one split of a source has reached, kept in the source's position.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SplitTime {
    /// The highest event time the split has given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub highest: Option<i64>,
    /// When it last gave a record (not kept: a restored split starts its idle time afresh).
    #[serde(skip)]
    pub last_record: Option<Instant>,
}

impl SplitTime {
    /// Nothing to keep.
    pub fn is_empty(&self) -> bool {
        self.highest.is_none()
    }
}

/// A source subtask's event time: where it reads it from and how its watermark follows it.
#[derive(Debug, Clone)]
pub struct EventClock {
    /// The position of the event-time field in the source's records.
    field: usize,
    uid: String,
    /// `maxOutOfOrderness` in milliseconds.
    delay: i64,
    /// `idleTimeout`, when given.
    idle: Option<std::time::Duration>,
    /// When the subtask started: a split that has given nothing is idle from then on.
    started: Instant,
}

impl EventClock {
    /// The clock of a source whose records have `fields`, as `spec` declares it (the plan
    /// checked the field).
    pub fn new(uid: &str, spec: &EventTimeSpec, fields: &[String]) -> Result<Self, RuntimeError> {
        let field = fields.iter().position(|f| *f == spec.field).ok_or_else(|| {
            RuntimeError::user(format!(
                "operator {uid:?}: eventTime.field {:?} is not a field of its records (fields: {})",
                spec.field,
                fields.join(", ")
            ))
        })?;
        Ok(Self {
            field,
            uid: uid.to_string(),
            delay: spec.max_out_of_orderness.as_millis_i64(),
            idle: spec.idle_timeout.map(|d| d.as_std()),
            started: Instant::now(),
        })
    }

    /// The clock of `op`, when it declares event time.
    pub fn of(op: &crate::plan::PlanOp) -> Result<Option<Self>, RuntimeError> {
        op.kind.event_time().map(|spec| Self::new(&op.uid, spec, &op.fields)).transpose()
    }

    /// `records` came from `split`: its highest event time moves on. A record whose field
    /// holds no integer is an error (the plan gave the field integers).
    pub fn observe(
        &self,
        split: &mut SplitTime,
        records: &[Record],
        now: Instant,
    ) -> Result<(), RuntimeError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut highest = split.highest.unwrap_or(i64::MIN);
        for r in records {
            match r.get(self.field) {
                Some(crate::record::Value::Int(t)) => highest = highest.max(*t),
                other => {
                    return Err(RuntimeError::user(format!(
                        "operator {:?}: a record whose event-time field holds {}, not milliseconds",
                        self.uid,
                        other.map_or("nothing", |v| v.kind().describe())
                    )));
                }
            }
        }
        split.highest = Some(highest);
        split.last_record = Some(now);
        Ok(())
    }

    /// The watermark of a subtask reading `splits`, at `now`: the lowest over the splits that
    /// are not idle; [`Watermark::Idle`] when every split is (or there are none).
    pub fn watermark<'a>(
        &self,
        splits: impl IntoIterator<Item = &'a SplitTime>,
        now: Instant,
    ) -> Watermark {
        let mut lowest: Option<i64> = None;
        for s in splits {
            let quiet_since = s.last_record.unwrap_or(self.started);
            if self.idle.is_some_and(|idle| now.saturating_duration_since(quiet_since) >= idle) {
                continue;
            }
            let w = s.highest.map_or(i64::MIN, |h| h.saturating_sub(self.delay).saturating_sub(1));
            lowest = Some(lowest.map_or(w, |l| l.min(w)));
        }
        lowest.map_or(Watermark::Idle, Watermark::At)
    }
}

/// What a subtask has forwarded, so that it forwards only a watermark that moves on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// The highest it has forwarded.
    at: Option<i64>,
    idle: bool,
}

impl Forwarded {
    /// What to forward when the subtask's own watermark is `w`: nothing when it has not
    /// moved; never one that goes back (a subtask that comes back from idle behind its last
    /// watermark forwards that one, to say it is active again).
    pub fn offer(&mut self, w: Watermark) -> Option<Watermark> {
        match w {
            Watermark::Idle if self.idle => None,
            Watermark::Idle => {
                self.idle = true;
                Some(Watermark::Idle)
            }
            Watermark::At(t) => {
                let was_idle = std::mem::replace(&mut self.idle, false);
                match self.at {
                    Some(a) if t <= a => was_idle.then_some(Watermark::At(a)),
                    _ => {
                        self.at = Some(t);
                        Some(Watermark::At(t))
                    }
                }
            }
        }
    }

    /// The highest watermark forwarded, if any.
    pub fn current(&self) -> Option<i64> {
        self.at
    }
}

/// Where one input channel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    At(i64),
    Idle(i64),
    Ended,
}

/// The watermark of a subtask over its input channels.
#[derive(Debug, Clone)]
pub struct InputClock {
    channels: Vec<Channel>,
    forwarded: Forwarded,
}

impl InputClock {
    /// A subtask with `n` input channels, none of which has said anything yet (each holds
    /// the watermark at the beginning of time until it does).
    pub fn new(n: usize) -> Self {
        Self { channels: vec![Channel::At(i64::MIN); n], forwarded: Forwarded::default() }
    }

    /// Channel `i` sent `w`; returns what the subtask forwards, if anything.
    pub fn update(&mut self, i: usize, w: Watermark) -> Option<Watermark> {
        let ch = self.channels.get_mut(i)?;
        *ch = match (*ch, w) {
            (Channel::Ended, _) => Channel::Ended,
            (Channel::At(a) | Channel::Idle(a), Watermark::At(t)) => Channel::At(a.max(t)),
            (Channel::At(a) | Channel::Idle(a), Watermark::Idle) => Channel::Idle(a),
        };
        self.combined()
    }

    /// Channel `i` ended: it holds no one back any more.
    pub fn ended(&mut self, i: usize) -> Option<Watermark> {
        *self.channels.get_mut(i)? = Channel::Ended;
        self.combined()
    }

    fn combined(&mut self) -> Option<Watermark> {
        let mut lowest: Option<i64> = None;
        let (mut idle, mut ended) = (false, false);
        for c in &self.channels {
            match *c {
                Channel::At(t) => lowest = Some(lowest.map_or(t, |l| l.min(t))),
                Channel::Idle(_) => idle = true,
                Channel::Ended => ended = true,
            }
        }
        let w = match lowest {
            Some(t) if t > i64::MIN => Watermark::At(t),
            // Nothing said yet on some channel: no watermark to forward.
            Some(_) => return None,
            // The channels that are not idle ended: their input is complete, to the end of
            // time (as an ended input's last watermark is in Flink), and the idle ones hold
            // no one back.
            None if idle && ended => Watermark::At(i64::MAX),
            None if idle => Watermark::Idle,
            // Every channel ended: the end of the input says the rest.
            None => return None,
        };
        self.forwarded.offer(w)
    }

    /// The watermark the subtask has reached, if any.
    pub fn current(&self) -> Option<i64> {
        self.forwarded.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Value;
    use Watermark::{At, Idle};
    use std::time::Duration;

    fn clock(delay_ms: u64, idle_ms: Option<u64>) -> EventClock {
        let spec = EventTimeSpec {
            field: "ts".into(),
            max_out_of_orderness: weir_crds::Duration::from_millis(delay_ms),
            idle_timeout: idle_ms.map(weir_crds::Duration::from_millis),
        };
        EventClock::new("src", &spec, &["key".into(), "ts".into()]).unwrap()
    }

    fn at(ts: &[i64]) -> Vec<Record> {
        ts.iter().map(|&t| vec![Value::str("k"), Value::Int(t)]).collect()
    }

    #[test]
    fn a_source_watermark_is_its_lowest_split_less_the_out_of_orderness() {
        let c = clock(100, None);
        let now = Instant::now();
        let (mut a, mut b) = (SplitTime::default(), SplitTime::default());
        // A split that has given nothing holds the others back at the beginning of time.
        c.observe(&mut a, &at(&[1_000, 5_000, 3_000]), now).unwrap();
        assert_eq!(c.watermark([&a, &b], now), At(i64::MIN));
        c.observe(&mut b, &at(&[2_000]), now).unwrap();
        assert_eq!(c.watermark([&a, &b], now), At(2_000 - 101));
        assert_eq!(a.highest, Some(5_000), "the highest, not the last");
        // No splits: idle.
        assert_eq!(c.watermark(std::iter::empty(), now), Idle);
    }

    #[test]
    fn a_quiet_split_stops_holding_the_others_back_after_the_idle_timeout() {
        let c = clock(0, Some(50));
        let t0 = Instant::now();
        let (mut a, mut b) = (SplitTime::default(), SplitTime::default());
        c.observe(&mut a, &at(&[10_000]), t0).unwrap();
        c.observe(&mut b, &at(&[1_000]), t0).unwrap();
        assert_eq!(c.watermark([&a, &b], t0), At(999));
        c.observe(&mut a, &at(&[11_000]), t0 + Duration::from_millis(60)).unwrap();
        assert_eq!(c.watermark([&a, &b], t0 + Duration::from_millis(60)), At(10_999));
        assert_eq!(c.watermark([&a, &b], t0 + Duration::from_millis(200)), Idle);
    }

    #[test]
    fn a_record_without_an_integer_time_is_an_error_naming_the_source() {
        let c = clock(0, None);
        let mut s = SplitTime::default();
        let e = c.observe(&mut s, &[vec![Value::str("k"), Value::str("x")]], Instant::now());
        assert!(e.unwrap_err().message.contains("\"src\""));
    }

    #[test]
    fn a_subtask_forwards_the_lowest_of_its_live_channels_and_never_goes_back() {
        let mut c = InputClock::new(3);
        assert_eq!(c.update(0, At(10)), None, "channels 1 and 2 said nothing yet");
        assert_eq!(c.update(1, At(20)), None);
        assert_eq!(c.update(2, At(5)), Some(At(5)));
        assert_eq!(c.update(2, At(30)), Some(At(10)));
        assert_eq!(c.update(0, At(8)), None, "a channel does not go back");
        assert_eq!(c.update(0, At(25)), Some(At(20)));
        // Channel 1 idle: the others go on without it.
        assert_eq!(c.update(1, Idle), Some(At(25)));
        // Channel 0 ends.
        assert_eq!(c.ended(0), Some(At(30)));
        // The others idle: the ended channel's input is complete, to the end of time.
        assert_eq!(c.update(2, Idle), Some(At(i64::MAX)));
        assert_eq!(c.update(1, At(40)), None, "nothing goes back");
        assert_eq!(c.current(), Some(i64::MAX));
    }

    #[test]
    fn idle_channels_hold_no_one_back_and_come_back_at_the_last_watermark() {
        let mut c = InputClock::new(2);
        assert_eq!(c.update(0, At(10)), None);
        assert_eq!(c.update(1, At(20)), Some(At(10)));
        assert_eq!(c.update(0, Idle), Some(At(20)));
        assert_eq!(c.update(1, Idle), Some(Idle), "every channel idle");
        assert_eq!(c.update(1, Idle), None);
        // Back from idle behind the last watermark: active again, at the last one.
        assert_eq!(c.update(0, At(15)), Some(At(20)));
        // Channel 1 is idle: channel 0 alone moves it.
        assert_eq!(c.update(0, At(40)), Some(At(40)));
        assert_eq!(c.update(1, At(35)), None, "channel 1 is back, behind: nothing moves");
        assert_eq!(c.update(1, At(50)), None, "channel 0 is at 40");
        assert_eq!(c.current(), Some(40));
    }

    #[test]
    fn every_channel_ended_forwards_nothing() {
        let mut c = InputClock::new(2);
        assert_eq!(c.update(0, At(3)), None);
        assert_eq!(c.ended(1), Some(At(3)));
        assert_eq!(c.ended(0), None);
        assert_eq!(c.update(7, At(1)), None, "an unknown channel");
    }
}
