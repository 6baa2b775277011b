//! Checkpoint barriers at the inputs of a subtask: when it takes its part of a checkpoint,
//! and which in-flight records an unaligned checkpoint stores.
//!
//! - **Aligned** (exactly-once): a channel that delivers barrier `n` is held back until every
//!   live channel has; then the subtask takes its snapshot. Its state then holds exactly the
//!   records before the barriers.
//! - **At-least-once**: the same moment, without holding channels back.
//! - **Unaligned**: the subtask takes its snapshot as soon as the first barrier `n` arrives
//!   (the consumer receives messages as they come, so it sees a barrier however many
//!   batches are ahead of it). The records it has received but not processed, and those
//!   that arrive on each channel before that channel's barrier `n`, are *in flight*: they
//!   go into the checkpoint beside the state, and a restored subtask processes them before
//!   anything else. They are still processed now, after the snapshot.
//! - **Alignment timeout**: a checkpoint starts aligned; once `alignmentTimeout` has passed
//!   since it was triggered (a barrier carries the trigger time), the subtask switches to
//!   unaligned, as do the outlets that hold the barrier behind queued batches.
//!
//! The [`Aligner`] only decides; the subtask carries out its [`Action`]s in order.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::exchange::wire::Barrier;
use crate::exchange::{Inbox, Msg};
use crate::record::Record;

/// Records in flight at a subtask, with the input each came on.
pub type InFlightRecords = Vec<(u32, Vec<Record>)>;

/// The first bytes of a file of in-flight records.
const IN_FLIGHT_MAGIC: &[u8] = b"WEIR-INFLIGHT 1\n";

/// In-flight records as stored with a checkpoint: the magic, then per batch its input
/// (u32), its length (u32) and the batch in the exchange's encoding.
pub fn encode_in_flight(records: &[(u32, Vec<Record>)]) -> Vec<u8> {
    let mut out = IN_FLIGHT_MAGIC.to_vec();
    let mut batch = Vec::new();
    for (input, b) in records {
        batch.clear();
        crate::exchange::wire::encode_batch(b, &mut batch);
        out.extend_from_slice(&input.to_le_bytes());
        out.extend_from_slice(&(batch.len() as u32).to_le_bytes());
        out.extend_from_slice(&batch);
    }
    out
}

/// Reads what [`encode_in_flight`] wrote.
pub fn decode_in_flight(bytes: &[u8]) -> Result<InFlightRecords, String> {
    let mut rest = bytes
        .strip_prefix(IN_FLIGHT_MAGIC)
        .ok_or("not a file of in-flight records of this version of Weir")?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        if rest.len() < 8 {
            return Err("in-flight records cut short".into());
        }
        let input = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes")) as usize;
        if rest.len() < 8 + len {
            return Err("in-flight records cut short".into());
        }
        out.push((input, crate::exchange::wire::decode_batch(&rest[8..8 + len])?));
        rest = &rest[8 + len..];
    }
    Ok(out)
}

/// What the subtask must do.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Take this subtask's part of the checkpoint of `barrier` now and forward the barrier.
    Take { barrier: Barrier, alignment_ms: u64 },
    /// Every record overtaken by unaligned checkpoint `id` is known: these, per input.
    InFlight { id: u64, records: InFlightRecords },
}

#[derive(Debug)]
struct Aligning {
    /// Channels that delivered the barrier.
    channels: Vec<usize>,
    first: Instant,
    barrier: Barrier,
}

#[derive(Debug)]
struct Collecting {
    /// Per channel: its barrier (or its end) has not arrived yet.
    waiting: Vec<bool>,
    records: Vec<(u32, Vec<Record>)>,
}

/// The barriers of a subtask with inputs.
#[derive(Debug)]
pub struct Aligner {
    exactly_once: bool,
    /// Unaligned checkpoints allowed, after this many milliseconds of alignment (0: at once).
    unaligned_after: Option<u64>,
    aligning: BTreeMap<u64, Aligning>,
    collecting: BTreeMap<u64, Collecting>,
    /// The highest checkpoint taken here.
    taken: u64,
}

impl Aligner {
    /// `unaligned_after`: `Some(alignment timeout in ms)` when unaligned checkpoints are on.
    pub fn new(exactly_once: bool, unaligned_after: Option<u64>, taken: u64) -> Self {
        Self {
            exactly_once,
            unaligned_after: unaligned_after.filter(|_| exactly_once),
            aligning: BTreeMap::new(),
            collecting: BTreeMap::new(),
            taken,
        }
    }

    /// Whether checkpoint `b` goes unaligned now; a savepoint's barrier never does.
    fn timed_out(&self, b: &Barrier, now_ms: u64) -> bool {
        !b.savepoint
            && (b.unaligned
                || self.unaligned_after.is_some_and(|t| now_ms >= b.ts.saturating_add(t)))
    }

    /// `msg` was just taken off channel `i`: it joins the channel's pending messages,
    /// except an unaligned barrier (or one whose alignment has timed out), which acts now.
    pub fn received(
        &mut self,
        inbox: &mut Inbox,
        i: usize,
        msg: Msg,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        match &msg {
            Msg::Batch { input, records, .. } => {
                for c in self.collecting.values_mut().filter(|c| c.waiting[i]) {
                    c.records.push((*input, records.clone()));
                }
            }
            Msg::Barrier(b) => {
                if b.id <= self.taken {
                    // The checkpoint is taken (unaligned): this channel's part is complete.
                    if let Some(c) = self.collecting.get_mut(&b.id) {
                        c.waiting[i] = false;
                    }
                    self.finish_collected(actions);
                    return;
                }
                if self.exactly_once && self.timed_out(b, now_ms) {
                    let b = *b;
                    self.unaligned(inbox, b, Some(i), actions);
                    self.finish_collected(actions);
                    return;
                }
            }
            Msg::End | Msg::Failed(_) => {
                for c in self.collecting.values_mut() {
                    c.waiting[i] = false;
                }
            }
            Msg::Watermark(w) => {
                // One waiting behind nothing else says less than this one: a producer that
                // sends many keeps at most one pending.
                if let Some(Msg::Watermark(last)) = inbox.channels[i].pending.back_mut() {
                    *last = *w;
                    return;
                }
            }
        }
        inbox.channels[i].pending.push_back(msg);
        self.finish_collected(actions);
    }

    /// Channel `i`'s pending barrier came to the front (aligned or at-least-once).
    pub fn barrier(&mut self, inbox: &mut Inbox, i: usize, b: Barrier, actions: &mut Vec<Action>) {
        if b.id <= self.taken {
            return;
        }
        let a = self.aligning.entry(b.id).or_insert_with(|| Aligning {
            channels: Vec::new(),
            first: Instant::now(),
            barrier: b,
        });
        a.channels.push(i);
        if self.exactly_once {
            inbox.channels[i].blocked = true;
        }
        self.check_aligned(inbox, actions);
    }

    /// Channel `i` ended (its `End` was processed).
    pub fn ended(&mut self, inbox: &mut Inbox, actions: &mut Vec<Action>) {
        self.check_aligned(inbox, actions);
    }

    /// Switches checkpoints whose alignment has taken too long to unaligned: those being
    /// aligned and those whose barrier waits behind batches in a pending queue.
    pub fn tick(&mut self, inbox: &mut Inbox, now_ms: u64, actions: &mut Vec<Action>) {
        if self.unaligned_after.is_none() {
            return;
        }
        let mut late: Option<Barrier> = None;
        for a in self.aligning.values() {
            if self.timed_out(&a.barrier, now_ms) {
                late = Some(a.barrier);
            }
        }
        for ch in &inbox.channels {
            for m in &ch.pending {
                if let Msg::Barrier(b) = m
                    && b.id > self.taken
                    && self.timed_out(b, now_ms)
                    && late.is_none_or(|l| l.id < b.id)
                {
                    late = Some(*b);
                }
            }
        }
        if let Some(b) = late {
            self.unaligned(inbox, b, None, actions);
            self.finish_collected(actions);
        }
    }

    /// Takes checkpoint `b` unaligned now (and every earlier one not taken yet), `via` the
    /// channel whose barrier was just received.
    fn unaligned(
        &mut self,
        inbox: &mut Inbox,
        b: Barrier,
        via: Option<usize>,
        actions: &mut Vec<Action>,
    ) {
        let mut earlier: BTreeMap<u64, Barrier> = self
            .aligning
            .iter()
            .filter(|(id, _)| **id < b.id)
            .map(|(id, a)| (*id, a.barrier))
            .collect();
        for ch in &inbox.channels {
            for m in &ch.pending {
                if let Msg::Barrier(e) = m
                    && e.id > self.taken
                    && e.id < b.id
                {
                    earlier.insert(e.id, *e);
                }
            }
        }
        // (The coordinator triggers no checkpoint while a savepoint is in flight, so no
        // savepoint is among them.)
        for (_, e) in earlier {
            self.unaligned_one(inbox, Barrier { unaligned: true, ..e }, None, actions);
        }
        self.unaligned_one(inbox, Barrier { unaligned: true, ..b }, via, actions);
    }

    fn unaligned_one(
        &mut self,
        inbox: &mut Inbox,
        b: Barrier,
        via: Option<usize>,
        actions: &mut Vec<Action>,
    ) {
        let aligning = self.aligning.remove(&b.id);
        let delivered = aligning.as_ref().map(|a| a.channels.clone()).unwrap_or_default();
        let mut c = Collecting { waiting: vec![false; inbox.channels.len()], records: Vec::new() };
        for (j, ch) in inbox.channels.iter_mut().enumerate() {
            if ch.ended {
                continue;
            }
            if delivered.contains(&j) {
                // Aligned already: what follows its barrier is after the checkpoint.
                ch.blocked = false;
                continue;
            }
            let mut waiting = Some(j) != via;
            let mut k = 0;
            while k < ch.pending.len() {
                match &ch.pending[k] {
                    Msg::Batch { input, records, .. } => {
                        c.records.push((*input, records.clone()));
                    }
                    Msg::Barrier(x) if x.id == b.id => {
                        ch.pending.remove(k);
                        waiting = false;
                        break;
                    }
                    Msg::End | Msg::Failed(_) => {
                        waiting = false;
                        break;
                    }
                    Msg::Barrier(_) | Msg::Watermark(_) => {}
                }
                k += 1;
            }
            c.waiting[j] = waiting;
        }
        self.taken = b.id;
        let alignment_ms = aligning.map_or(0, |a| a.first.elapsed().as_millis() as u64);
        actions.push(Action::Take { barrier: b, alignment_ms });
        self.collecting.insert(b.id, c);
    }

    /// Takes every aligned checkpoint whose barrier all live channels have delivered.
    fn check_aligned(&mut self, inbox: &mut Inbox, actions: &mut Vec<Action>) {
        while let Some((&id, a)) = self.aligning.first_key_value() {
            let all =
                inbox.channels.iter().enumerate().all(|(i, c)| c.ended || a.channels.contains(&i));
            if !all {
                break;
            }
            let a = self.aligning.remove(&id).expect("the first");
            self.taken = id;
            for c in &mut inbox.channels {
                c.blocked = false;
            }
            actions.push(Action::Take {
                barrier: Barrier { unaligned: false, ..a.barrier },
                alignment_ms: a.first.elapsed().as_millis() as u64,
            });
        }
    }

    fn finish_collected(&mut self, actions: &mut Vec<Action>) {
        while let Some((&id, c)) = self.collecting.first_key_value() {
            if c.waiting.iter().any(|w| *w) {
                break;
            }
            let c = self.collecting.remove(&id).expect("the first");
            actions.push(Action::InFlight { id, records: c.records });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::InChannel;
    use crate::record::Value;

    fn inbox(n: usize) -> Inbox {
        let mut inbox = Inbox::default();
        for i in 0..n {
            let (_tx, rx) = crossbeam_channel::unbounded();
            inbox.channels.push(InChannel::new(rx, 0, i as u32));
        }
        inbox
    }

    fn batch(v: i64) -> Msg {
        Msg::Batch { input: 0, records: vec![vec![Value::Int(v)]], credit: None }
    }

    fn barrier(id: u64, ts: u64, unaligned: bool) -> Msg {
        Msg::Barrier(Barrier::checkpoint(id, ts, unaligned))
    }

    fn values(records: &[(u32, Vec<Record>)]) -> Vec<i64> {
        records
            .iter()
            .flat_map(|(_, b)| b.iter().map(|r| if let Value::Int(v) = r[0] { v } else { -1 }))
            .collect()
    }

    /// Processes channel messages the way a subtask does, returning the batches' values.
    fn process(a: &mut Aligner, inbox: &mut Inbox, actions: &mut Vec<Action>) -> Vec<i64> {
        let mut out = Vec::new();
        while let Some((i, m)) = inbox.next(true) {
            match m {
                Msg::Batch { records, .. } => {
                    if let Value::Int(v) = records[0][0] {
                        out.push(v);
                    }
                }
                Msg::Barrier(b) => a.barrier(inbox, i, b, actions),
                Msg::End => a.ended(inbox, actions),
                Msg::Watermark(_) | Msg::Failed(_) => {}
            }
        }
        // Channels take turns: the order across channels is not the point.
        out.sort_unstable();
        out
    }

    #[test]
    fn in_flight_records_round_trip_and_damage_is_an_error() {
        let records = vec![(0, vec![vec![Value::str("a"), Value::Int(1)]]), (1, vec![])];
        let bytes = encode_in_flight(&records);
        assert_eq!(decode_in_flight(&bytes).unwrap(), records);
        assert!(decode_in_flight(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_in_flight(b"garbage").is_err());
    }

    #[test]
    fn aligned_holds_a_channel_back_until_every_channel_has_the_barrier() {
        let (mut inbox, mut a, mut act) = (inbox(2), Aligner::new(true, None, 0), Vec::new());
        for m in [batch(1), barrier(1, 0, false), batch(2)] {
            a.received(&mut inbox, 0, m, 0, &mut act);
        }
        a.received(&mut inbox, 1, batch(10), 0, &mut act);
        // Channel 0 is held back after its barrier: 2 waits; channel 1's 10 is processed.
        assert_eq!(process(&mut a, &mut inbox, &mut act), vec![1, 10]);
        assert!(act.is_empty());
        a.received(&mut inbox, 1, barrier(1, 0, false), 0, &mut act);
        assert_eq!(process(&mut a, &mut inbox, &mut act), vec![2]);
        assert!(matches!(
            act[..],
            [Action::Take { barrier: Barrier { id: 1, unaligned: false, .. }, .. }]
        ));
    }

    #[test]
    fn at_least_once_takes_the_checkpoint_without_holding_channels_back() {
        let (mut inbox, mut a, mut act) = (inbox(2), Aligner::new(false, Some(0), 0), Vec::new());
        for m in [barrier(1, 0, false), batch(2)] {
            a.received(&mut inbox, 0, m, 0, &mut act);
        }
        assert_eq!(process(&mut a, &mut inbox, &mut act), vec![2]);
        a.received(&mut inbox, 1, barrier(1, 0, false), 0, &mut act);
        process(&mut a, &mut inbox, &mut act);
        assert_eq!(act.len(), 1);
    }

    #[test]
    fn unaligned_takes_the_checkpoint_at_the_first_barrier_and_stores_what_it_overtook() {
        let (mut inbox, mut a, mut act) = (inbox(2), Aligner::new(true, Some(0), 0), Vec::new());
        // Channel 0: 1 2 are queued ahead of its barrier, 3 after it; channel 1 has 10 ahead
        // of its barrier, which comes later, after 11.
        for m in [batch(1), batch(2), barrier(1, 5, true), batch(3)] {
            a.received(&mut inbox, 0, m, 0, &mut act);
        }
        a.received(&mut inbox, 1, batch(10), 0, &mut act);
        assert!(matches!(
            act[..],
            [Action::Take { barrier: Barrier { id: 1, ts: 5, unaligned: true, .. }, .. }]
        ));
        // Everything is processed after the snapshot, nothing held back.
        assert_eq!(process(&mut a, &mut inbox, &mut act), vec![1, 2, 3, 10]);
        a.received(&mut inbox, 1, batch(11), 0, &mut act);
        assert_eq!(act.len(), 1, "channel 1's barrier has not come");
        a.received(&mut inbox, 1, barrier(1, 5, true), 0, &mut act);
        a.received(&mut inbox, 1, batch(12), 0, &mut act);
        let Action::InFlight { id: 1, records } = &act[1] else { panic!("{act:?}") };
        assert_eq!(values(records), vec![1, 2, 10, 11]);
        assert_eq!(process(&mut a, &mut inbox, &mut act), vec![11, 12]);
    }

    #[test]
    fn an_aligned_checkpoint_switches_to_unaligned_after_the_alignment_timeout() {
        let (mut inbox, mut a, mut act) = (inbox(2), Aligner::new(true, Some(1000), 0), Vec::new());
        for m in [barrier(1, 100, false), batch(2)] {
            a.received(&mut inbox, 0, m, 200, &mut act);
        }
        a.received(&mut inbox, 1, batch(10), 200, &mut act);
        a.received(&mut inbox, 1, batch(11), 200, &mut act);
        // Channel 0 is aligned and held back; channel 1 is slow.
        let first = inbox.next(true).unwrap();
        assert!(matches!(first, (0, Msg::Barrier(_))));
        let Msg::Barrier(b) = first.1 else { unreachable!() };
        a.barrier(&mut inbox, 0, b, &mut act);
        assert!(inbox.channels[0].blocked);
        assert!(matches!(inbox.next(true), Some((1, Msg::Batch { .. }))));
        a.tick(&mut inbox, 1099, &mut act);
        assert!(act.is_empty(), "not yet");
        a.tick(&mut inbox, 1100, &mut act);
        assert!(matches!(
            act[..],
            [Action::Take { barrier: Barrier { id: 1, unaligned: true, .. }, .. }]
        ));
        assert!(!inbox.channels[0].blocked);
        // 11 was pending on channel 1 before its barrier: in flight; 2 is after channel 0's.
        a.received(&mut inbox, 1, barrier(1, 100, false), 1100, &mut act);
        let Action::InFlight { records, .. } = &act[1] else { panic!("{act:?}") };
        assert_eq!(values(records), vec![11]);
        assert_eq!(process(&mut a, &mut inbox, &mut act), vec![2, 11]);
    }

    #[test]
    fn a_barrier_queued_behind_batches_times_out_there_too() {
        let (mut inbox, mut a, mut act) = (inbox(1), Aligner::new(true, Some(50), 0), Vec::new());
        for m in [batch(1), barrier(1, 0, false), batch(2)] {
            a.received(&mut inbox, 0, m, 10, &mut act);
        }
        a.tick(&mut inbox, 60, &mut act);
        assert!(matches!(act[0], Action::Take { .. }));
        let Action::InFlight { records, .. } = &act[1] else { panic!("{act:?}") };
        assert_eq!(values(records), vec![1]);
        assert_eq!(process(&mut a, &mut inbox, &mut act), vec![1, 2]);
    }

    #[test]
    fn a_channel_that_ends_before_its_barrier_completes_the_in_flight_records() {
        let (mut inbox, mut a, mut act) = (inbox(2), Aligner::new(true, Some(0), 0), Vec::new());
        a.received(&mut inbox, 0, barrier(3, 0, true), 0, &mut act);
        a.received(&mut inbox, 1, batch(7), 0, &mut act);
        a.received(&mut inbox, 1, Msg::End, 0, &mut act);
        let Action::InFlight { id: 3, records } = &act[1] else { panic!("{act:?}") };
        assert_eq!(values(records), vec![7]);
    }

    #[test]
    fn a_savepoint_stays_aligned_when_checkpoints_are_unaligned_and_its_alignment_times_out() {
        let (mut inbox, mut a, mut act) = (inbox(2), Aligner::new(true, Some(0), 0), Vec::new());
        let sp = Barrier { id: 1, ts: 0, unaligned: false, savepoint: true, stop: true };
        for m in [batch(1), Msg::Barrier(sp), batch(2)] {
            a.received(&mut inbox, 0, m, 10_000, &mut act);
        }
        a.received(&mut inbox, 1, batch(10), 10_000, &mut act);
        a.tick(&mut inbox, 20_000, &mut act);
        assert!(act.is_empty(), "taken before it was aligned: {act:?}");
        // Channel 0 is held back after the barrier; channel 1's 10 goes first.
        assert_eq!(process(&mut a, &mut inbox, &mut act), vec![1, 10]);
        assert!(act.is_empty());
        a.received(&mut inbox, 1, Msg::Barrier(sp), 30_000, &mut act);
        assert_eq!(process(&mut a, &mut inbox, &mut act), vec![2]);
        let [Action::Take { barrier, .. }] = &act[..] else { panic!("{act:?}") };
        assert_eq!(*barrier, sp, "taken aligned, as a stopping savepoint");
    }
}
