//! The timer service of a keyed operator's subtask: its keys' event-time and processing-time
//! timers, each an entry of the keyed state (so that checkpoints, savepoints and rescaling
//! carry them with their key groups), and in memory beside it, in time order, so that firing
//! the due ones does not scan the state.
//!
//! A key group's entries after its values (no key is 4 GiB long, so no value's entry starts
//! with `FF FF FF FF`):
//!
//! - `key group | FF FF FF FF | 0 | time | key`: an event-time timer;
//! - `key group | FF FF FF FF | 1 | time | key`: a processing-time timer;
//! - `key group | FF FF FF FF | 2`: the event time the group had reached at the last
//!   checkpoint (8 bytes), written into every key group a subtask owns, so that a subtask
//!   restored at another parallelism starts from the lowest of its key groups', and knows
//!   each group's own.
//!
//! The time is 8 bytes big-endian with the sign bit flipped, so that a group's timers sort by
//! time.

use std::collections::BTreeSet;

use crate::error::RuntimeError;
use crate::keygroup::KeyGroup;
use crate::state::KeyedStore;

/// Where a key group's timers start: after every value of the group.
const TIMERS: [u8; 4] = [0xFF; 4];

/// The clock a timer follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimeDomain {
    /// The event time: the timer fires once the watermark reaches it.
    Event = 0,
    /// The wall clock (milliseconds since the epoch): the timer fires once it is due,
    /// checked every few milliseconds whether records come or not.
    Processing = 1,
}

/// The byte after [`TIMERS`] of a key group's event-time watermark.
const WATERMARK: u8 = 2;

/// A timer: its time, its key's group and bytes.
pub(crate) type Timer = (i64, KeyGroup, Vec<u8>);

fn flip(ts: i64) -> [u8; 8] {
    ((ts as u64) ^ (1 << 63)).to_be_bytes()
}

fn unflip(b: [u8; 8]) -> i64 {
    (u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

fn prefix(g: KeyGroup, tag: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + TIMERS.len() + 1 + 8);
    k.extend_from_slice(&g.to_be_bytes());
    k.extend_from_slice(&TIMERS);
    k.push(tag);
    k
}

/// A timer's entry in the keyed state.
pub(crate) fn timer_entry(domain: TimeDomain, g: KeyGroup, ts: i64, key: &[u8]) -> Vec<u8> {
    let mut k = prefix(g, domain as u8);
    k.extend_from_slice(&flip(ts));
    k.extend_from_slice(key);
    k
}

fn storage(e: crate::state::StateError) -> RuntimeError {
    RuntimeError::internal(e.to_string())
}

/// A subtask's timers, in time order (then key group and key), per domain.
#[derive(Debug, Default)]
pub struct Timers {
    event: BTreeSet<Timer>,
    processing: BTreeSet<Timer>,
}

impl Timers {
    /// The timers of key groups `lo..=hi` in `store`, as a restore left them, and the event
    /// time each group had reached (`i64::MIN` for one that had none), by group from `lo`.
    pub(crate) fn load(
        store: &KeyedStore,
        (lo, hi): (KeyGroup, KeyGroup),
        uid: &str,
    ) -> Result<(Self, Vec<i64>), RuntimeError> {
        let mut timers = Self::default();
        let mut reached = vec![i64::MIN; usize::from(hi.saturating_sub(lo)) + 1];
        let mut bad = None;
        for g in lo..=hi {
            let p = prefix(g, 0);
            let head = &p[..p.len() - 1];
            store
                .scan_prefix(head, |k, v| {
                    let rest = &k[head.len()..];
                    match rest.split_first() {
                        Some((&WATERMARK, [])) => match <[u8; 8]>::try_from(v) {
                            Ok(b) => reached[usize::from(g - lo)] = i64::from_be_bytes(b),
                            Err(_) => bad = Some(g),
                        },
                        Some((&tag, rest)) if tag <= 1 && rest.len() >= 8 => {
                            let ts = unflip(rest[..8].try_into().expect("8 bytes"));
                            let set =
                                if tag == 0 { &mut timers.event } else { &mut timers.processing };
                            set.insert((ts, g, rest[8..].to_vec()));
                        }
                        _ => bad = Some(g),
                    }
                })
                .map_err(storage)?;
        }
        if let Some(g) = bad {
            return Err(RuntimeError::user(format!(
                "operator {uid:?}: a timer entry of key group {g} is damaged (the state was not written by Weir): restore from another checkpoint"
            )));
        }
        Ok((timers, reached))
    }

    fn set(&mut self, domain: TimeDomain) -> &mut BTreeSet<Timer> {
        match domain {
            TimeDomain::Event => &mut self.event,
            TimeDomain::Processing => &mut self.processing,
        }
    }

    /// Registers a timer (one that is there already stays one).
    pub(crate) fn register(
        &mut self,
        store: &KeyedStore,
        domain: TimeDomain,
        g: KeyGroup,
        ts: i64,
        key: &[u8],
    ) -> Result<(), RuntimeError> {
        if self.set(domain).insert((ts, g, key.to_vec())) {
            store.put(&timer_entry(domain, g, ts, key), &[]).map_err(storage)?;
        }
        Ok(())
    }

    /// Cancels a timer (nothing if there is none).
    pub(crate) fn delete(
        &mut self,
        store: &KeyedStore,
        domain: TimeDomain,
        g: KeyGroup,
        ts: i64,
        key: &[u8],
    ) -> Result<(), RuntimeError> {
        if self.set(domain).remove(&(ts, g, key.to_vec())) {
            store.delete(&timer_entry(domain, g, ts, key)).map_err(storage)?;
        }
        Ok(())
    }

    /// The earliest timer of `domain`, if any.
    pub(crate) fn first(&self, domain: TimeDomain) -> Option<i64> {
        match domain {
            TimeDomain::Event => self.event.first(),
            TimeDomain::Processing => self.processing.first(),
        }
        .map(|t| t.0)
    }

    /// Takes the timers of `domain` due at `upto` (at or before it) out of the service and
    /// the store, in order.
    pub(crate) fn take_due(
        &mut self,
        store: &KeyedStore,
        domain: TimeDomain,
        upto: i64,
    ) -> Result<Vec<Timer>, RuntimeError> {
        let set = self.set(domain);
        let later = match upto.checked_add(1) {
            Some(next) => set.split_off(&(next, 0, Vec::new())),
            None => BTreeSet::new(),
        };
        let due = std::mem::replace(set, later);
        for (ts, g, key) in &due {
            store.delete(&timer_entry(domain, *g, *ts, key)).map_err(storage)?;
        }
        Ok(due.into_iter().collect())
    }

    /// Writes the event time each of key groups `lo..` has reached: the subtask's, or the
    /// group's own where that is ahead (`floors`, by group from `lo`).
    pub(crate) fn save_watermark(
        store: &KeyedStore,
        (lo, hi): (KeyGroup, KeyGroup),
        watermark: i64,
        floors: &[i64],
    ) -> Result<(), RuntimeError> {
        for g in lo..=hi {
            let own = floors.get(usize::from(g - lo)).copied().unwrap_or(i64::MIN);
            store.put(&prefix(g, WATERMARK), &watermark.max(own).to_be_bytes()).map_err(storage)?;
        }
        Ok(())
    }

    /// The number of timers it holds.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.event.len() + self.processing.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateBackend;

    #[test]
    fn timers_are_entries_of_their_key_group_and_load_back_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        let backend = StateBackend::open(dir.path(), &["op".to_string()]).unwrap();
        let store = backend.keyed_store("op", 128);
        let mut t = Timers::default();
        // Negative times sort before positive ones; a timer registered twice is one.
        for (d, g, ts, k) in [
            (TimeDomain::Event, 3, 50, &b"b"[..]),
            (TimeDomain::Event, 1, -7, b"a"),
            (TimeDomain::Event, 1, -7, b"a"),
            (TimeDomain::Processing, 1, 9, b"a"),
            (TimeDomain::Event, 3, 10, b"c"),
            (TimeDomain::Event, 5, 10, b"d"),
        ] {
            t.register(&store, d, g, ts, k).unwrap();
        }
        assert_eq!(t.len(), 5);
        Timers::save_watermark(&store, (0, 3), 40, &[]).unwrap();
        // A group's own event time that is ahead of its subtask's is kept.
        Timers::save_watermark(&store, (4, 127), 30, &[i64::MIN, 35]).unwrap();
        let rows = backend.scan("op").unwrap();
        assert_eq!(rows.len(), 5 + 128, "a row per timer and per key group's watermark");
        assert!(rows.iter().all(|(_, k, _)| k.starts_with(&TIMERS)));
        // Key groups 0..=3 only: d (group 5) and the watermark 30 belong to others.
        let (back, wm) = Timers::load(&store, (0, 3), "op").unwrap();
        assert_eq!(wm, [40; 4]);
        assert_eq!(
            back.event.iter().cloned().collect::<Vec<_>>(),
            vec![(-7, 1, b"a".to_vec()), (10, 3, b"c".to_vec()), (50, 3, b"b".to_vec())]
        );
        assert_eq!(back.first(TimeDomain::Processing), Some(9));
        let (all, wm) = Timers::load(&store, (0, 127), "op").unwrap();
        assert_eq!((all.len(), &wm[3..6]), (5, &[40, 30, 35][..]));
        assert_eq!(wm.iter().min(), Some(&30));
        // Due at 10: the timers at -7 and 10, gone from the store too.
        let mut all = all;
        let due = all.take_due(&store, TimeDomain::Event, 10).unwrap();
        assert_eq!(due.iter().map(|d| d.0).collect::<Vec<_>>(), vec![-7, 10, 10]);
        assert_eq!(all.first(TimeDomain::Event), Some(50));
        let (again, _) = Timers::load(&store, (0, 127), "op").unwrap();
        assert_eq!(again.len(), 2);
        // Everything is due at the end of time.
        assert_eq!(all.take_due(&store, TimeDomain::Event, i64::MAX).unwrap().len(), 1);
        all.delete(&store, TimeDomain::Processing, 1, 9, b"a").unwrap();
        assert!(all.is_empty());
        let (none, _) = Timers::load(&store, (0, 127), "op").unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn a_damaged_timer_entry_is_refused_naming_its_key_group() {
        let dir = tempfile::tempdir().unwrap();
        let backend = StateBackend::open(dir.path(), &["op".to_string()]).unwrap();
        let store = backend.keyed_store("op", 128);
        // A timer entry too short to hold a time, as storage might hand back.
        let mut k = prefix(7, 0);
        k.push(1);
        store.put(&k, &[]).unwrap();
        let e = Timers::load(&store, (0, 127), "op").unwrap_err();
        assert!(e.message.contains("key group 7 is damaged"), "{e}");
        // A watermark of the wrong length.
        store.delete(&k).unwrap();
        store.put(&prefix(9, WATERMARK), &[1, 2]).unwrap();
        let e = Timers::load(&store, (0, 127), "op").unwrap_err();
        assert!(e.message.contains("key group 9 is damaged"), "{e}");
    }
}
