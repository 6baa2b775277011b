//! The exchange's wire format: batches of records as bytes, and the frames that carry them
//! between workers.
//!
//! A frame is a fixed header followed by a payload:
//!
//! ```text
//!   kind u8 | edge u32 | from u32 | to u32 | n u32 | payload (n bytes, Batch only)
//! ```
//!
//! `Batch` carries records from subtask `from` to subtask `to` over exchange `edge`; `End` says that channel is finished;
//! `Credit` goes the other way and lets the sender of that channel send `n` more batches;
//! `Barrier` carries a checkpoint barrier (payload: the checkpoint id, u64, the time it was
//! triggered in milliseconds since the epoch, u64, and a flags byte: bit 0 unaligned, bit 1
//! savepoint, bit 2 the savepoint stops the job) and
//! needs no credit; so does `Watermark` (payload: the event time, i64, and a flags byte: bit 0
//! the channel is idle, when the time is 0). Integers are little-endian. A record is a varint
//! field count followed by its values, each a tag byte and its bytes (0 a string: a varint
//! length and UTF-8; 1 an integer: a zigzag varint; 2 a float: 8 bytes; 3 a boolean: one
//! byte, 0 or 1). Decoding checks everything: bytes from a socket never make the worker panic,
//! and never make it allocate more than the bytes that actually arrived call for: a payload
//! is read as its bytes come in ([`read_payload`]), not allocated from the length its header
//! claims, and the record and field counts of a batch are checked against the bytes left and
//! used only as a bounded hint ([`decode_batch`]).

use std::io::Read;

pub use crate::event_time::Watermark;
use crate::record::{Record, Value};

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Batch = 1,
    End = 2,
    Credit = 3,
    Barrier = 4,
    Watermark = 5,
}

/// Payload bytes of a `Barrier` frame.
pub const BARRIER_LEN: u32 = 17;

/// Payload bytes of a `Watermark` frame.
pub const WATERMARK_LEN: u32 = 9;

/// A watermark's payload.
pub fn encode_watermark(w: Watermark) -> [u8; WATERMARK_LEN as usize] {
    let mut out = [0u8; WATERMARK_LEN as usize];
    match w {
        Watermark::At(t) => out[..8].copy_from_slice(&t.to_le_bytes()),
        Watermark::Idle => out[8] = 1,
    }
    out
}

/// Reads a watermark's payload.
pub fn decode_watermark(b: &[u8]) -> Result<Watermark, String> {
    if b.len() != WATERMARK_LEN as usize || b[8] > 1 || (b[8] == 1 && b[..8] != [0; 8]) {
        return Err("a malformed watermark".into());
    }
    if b[8] == 1 {
        return Ok(Watermark::Idle);
    }
    Ok(Watermark::At(i64::from_le_bytes(b[..8].try_into().expect("8 bytes"))))
}

/// A checkpoint barrier: the checkpoint, when it was triggered (milliseconds since the
/// epoch: the alignment timeout counts from then), and whether it overtakes records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Barrier {
    pub id: u64,
    pub ts: u64,
    pub unaligned: bool,
    /// A savepoint's barrier: always aligned (it never times out into an unaligned one).
    pub savepoint: bool,
    /// A savepoint that stops the job: the subtasks take no more input after it.
    pub stop: bool,
}

impl Barrier {
    /// A checkpoint's barrier (aligned unless `unaligned`).
    pub fn checkpoint(id: u64, ts: u64, unaligned: bool) -> Self {
        Self { id, ts, unaligned, savepoint: false, stop: false }
    }
}

/// A barrier's payload.
pub fn encode_barrier(b: Barrier) -> [u8; BARRIER_LEN as usize] {
    let mut out = [0u8; BARRIER_LEN as usize];
    out[..8].copy_from_slice(&b.id.to_le_bytes());
    out[8..16].copy_from_slice(&b.ts.to_le_bytes());
    out[16] = u8::from(b.unaligned) | u8::from(b.savepoint) << 1 | u8::from(b.stop) << 2;
    out
}

/// Reads a barrier's payload.
pub fn decode_barrier(b: &[u8]) -> Result<Barrier, String> {
    // A savepoint is never unaligned, and only a savepoint stops the job.
    if b.len() != BARRIER_LEN as usize || b[16] > 7 || b[16] & 3 == 3 || b[16] & 6 == 4 {
        return Err("a malformed barrier".into());
    }
    let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
    let f = b[16];
    Ok(Barrier {
        id: u(0..8),
        ts: u(8..16),
        unaligned: f & 1 != 0,
        savepoint: f & 2 != 0,
        stop: f & 4 != 0,
    })
}

/// The fixed part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub edge: u32,
    pub from: u32,
    pub to: u32,
    /// Payload length for `Batch`, `Barrier` and `Watermark`, credits for `Credit`, 0 for `End`.
    pub n: u32,
}

/// Bytes of a frame's header.
pub const HEADER_LEN: usize = 17;
/// The largest batch payload a worker accepts (a guard against garbage on the socket).
pub const MAX_PAYLOAD: u32 = 256 << 20;
/// The most [`read_payload`] allocates before the bytes arrive: beyond it, the buffer grows
/// with what the peer actually sends.
pub const PAYLOAD_PREALLOC: usize = 1 << 20;
/// Records [`decode_batch`] makes room for up front, whatever the count says.
const PREALLOC_RECORDS: usize = 1024;
/// Fields per record [`decode_batch`] makes room for up front, whatever the count says.
const PREALLOC_FIELDS: usize = 16;

impl Header {
    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind as u8;
        for (i, v) in [self.edge, self.from, self.to, self.n].into_iter().enumerate() {
            b[1 + 4 * i..5 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Reads a header, refusing an unknown kind, a batch over [`MAX_PAYLOAD`] and a barrier of
    /// the wrong length.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, String> {
        let kind = match b[0] {
            1 => Kind::Batch,
            2 => Kind::End,
            3 => Kind::Credit,
            4 => Kind::Barrier,
            5 => Kind::Watermark,
            k => return Err(format!("unknown frame kind {k}")),
        };
        let u = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let h = Header { kind, edge: u(1), from: u(5), to: u(9), n: u(13) };
        if h.kind == Kind::Batch && h.n > MAX_PAYLOAD {
            return Err(format!("a batch of {} bytes is over the limit of {MAX_PAYLOAD}", h.n));
        }
        if h.kind == Kind::Barrier && h.n != BARRIER_LEN {
            return Err(format!("a barrier of {} bytes, not {BARRIER_LEN}", h.n));
        }
        if h.kind == Kind::Watermark && h.n != WATERMARK_LEN {
            return Err(format!("a watermark of {} bytes, not {WATERMARK_LEN}", h.n));
        }
        Ok(h)
    }
}

/// Reads the `n` payload bytes of a frame from `r`. The buffer starts at no more than
/// [`PAYLOAD_PREALLOC`] bytes and grows as the bytes arrive, so a header that claims a large
/// payload costs memory only once the peer has sent it. A stream that ends first is an
/// `UnexpectedEof` error.
pub fn read_payload<R: Read>(r: &mut R, n: u32) -> std::io::Result<Vec<u8>> {
    let n = n as usize;
    let mut payload = Vec::with_capacity(n.min(PAYLOAD_PREALLOC));
    r.take(n as u64).read_to_end(&mut payload)?;
    if payload.len() < n {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the connection ended {} bytes into a payload of {n}", payload.len()),
        ));
    }
    Ok(payload)
}

/// Appends `v` in 7-bit groups, the lowest first (LEB128).
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a batch of records.
pub fn encode_batch(records: &[Record], out: &mut Vec<u8>) {
    put_varint(out, records.len() as u64);
    for r in records {
        put_varint(out, r.len() as u64);
        for v in r {
            match v {
                Value::Str(s) => {
                    out.push(0);
                    put_varint(out, s.len() as u64);
                    out.extend_from_slice(s.as_bytes());
                }
                Value::Int(i) => {
                    out.push(1);
                    // Zigzag, so small negative numbers stay short.
                    put_varint(out, ((i << 1) ^ (i >> 63)) as u64);
                }
                Value::Float(f) => {
                    out.push(2);
                    out.extend_from_slice(&f.to_le_bytes());
                }
                Value::Bool(b) => {
                    out.push(3);
                    out.push(u8::from(*b));
                }
            }
        }
    }
}

/// Reads a varint [`put_varint`] wrote at `*at`, moving `at` past it. `Err(None)`: the bytes
/// end first; `Err(Some(why))`: it is malformed.
pub(crate) fn get_varint(b: &[u8], at: &mut usize) -> Result<u64, Option<&'static str>> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at).ok_or(None)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(Some("a varint longer than 64 bits"))
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let v = *self.b.get(self.at).ok_or("a batch ends in the middle of a record")?;
        self.at += 1;
        Ok(v)
    }

    fn varint(&mut self) -> Result<u64, String> {
        get_varint(self.b, &mut self.at)
            .map_err(|e| e.unwrap_or("a batch ends in the middle of a record").to_string())
    }

    fn bytes(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or("a batch ends in the middle of a value")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    /// A count that cannot be larger than the bytes left (every item takes at least one).
    fn count(&mut self) -> Result<usize, String> {
        let n = self.varint()?;
        if n > (self.b.len() - self.at) as u64 {
            return Err(format!("a count of {n} is more than the bytes left"));
        }
        Ok(n as usize)
    }
}

/// Reads a batch written by [`encode_batch`].
///
/// The batch's record count and each record's field count are checked against the bytes
/// left, and room is made up front for at most 1024 records and 16 fields a record: past
/// that the vectors grow as records decode, so a count that lies costs nothing.
pub fn decode_batch(b: &[u8]) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    decode_into(b, &mut out)?;
    Ok(out)
}

/// [`decode_batch`] into `out`, which holds the records decoded so far when it fails.
fn decode_into(b: &[u8], out: &mut Vec<Record>) -> Result<(), String> {
    let mut r = Reader { b, at: 0 };
    let n = r.count()?;
    out.reserve(n.min(PREALLOC_RECORDS));
    for _ in 0..n {
        let fields = r.count()?;
        let mut rec = Vec::with_capacity(fields.min(PREALLOC_FIELDS));
        for _ in 0..fields {
            rec.push(match r.byte()? {
                0 => {
                    let len = r.count()?;
                    let s = std::str::from_utf8(r.bytes(len)?)
                        .map_err(|_| "a string that is not UTF-8".to_string())?;
                    Value::Str(s.into())
                }
                1 => {
                    let z = r.varint()?;
                    Value::Int(((z >> 1) as i64) ^ -((z & 1) as i64))
                }
                2 => {
                    let b = r.bytes(8)?;
                    Value::Float(f64::from_le_bytes(b.try_into().expect("8 bytes")))
                }
                3 => match r.byte()? {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => return Err(format!("a boolean of byte {b}, not 0 or 1")),
                },
                t => return Err(format!("unknown value tag {t}")),
            });
        }
        out.push(rec);
    }
    if r.at != b.len() {
        return Err(format!("{} bytes after the last record", b.len() - r.at));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            ".{0,40}".prop_map(|s| Value::Str(s.into())),
            any::<i64>().prop_map(Value::Int),
            any::<f64>()
                .prop_filter("NaN never equals itself", |f| !f.is_nan())
                .prop_map(Value::Float),
            any::<bool>().prop_map(Value::Bool),
        ]
    }

    proptest! {
        #[test]
        fn batches_round_trip(batch in prop::collection::vec(prop::collection::vec(value(), 0..5), 0..50)) {
            let mut b = Vec::new();
            encode_batch(&batch, &mut b);
            prop_assert_eq!(decode_batch(&b).unwrap(), batch);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(b in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_batch(&b);
        }

        #[test]
        fn truncated_batches_are_refused(batch in prop::collection::vec(prop::collection::vec(value(), 1..4), 1..10), cut in 1usize..20) {
            let mut b = Vec::new();
            encode_batch(&batch, &mut b);
            let cut = cut.min(b.len());
            prop_assert!(decode_batch(&b[..b.len() - cut]).is_err());
        }
    }

    /// A peer that sends `left` bytes a few at a time, then closes; it notes the largest
    /// buffer it was offered.
    struct Trickle {
        left: usize,
        biggest: usize,
    }

    impl std::io::Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.biggest = self.biggest.max(buf.len());
            let k = buf.len().min(self.left).min(7);
            buf[..k].fill(0xab);
            self.left -= k;
            Ok(k)
        }
    }

    #[test]
    fn a_payload_is_allocated_as_its_bytes_arrive_not_from_its_header() {
        // The header claims the largest payload; the peer sends 100 bytes and closes.
        let mut peer = Trickle { left: 100, biggest: 0 };
        let e = read_payload(&mut peer, MAX_PAYLOAD).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("100 bytes into a payload of 268435456"), "{e}");
        assert!(peer.biggest <= PAYLOAD_PREALLOC, "offered a buffer of {}", peer.biggest);
        // A payload larger than the first allocation still arrives whole, and nothing past it
        // is read.
        let mut peer = Trickle { left: 3 * PAYLOAD_PREALLOC + 5, biggest: 0 };
        let p = read_payload(&mut peer, 3 * PAYLOAD_PREALLOC as u32).unwrap();
        assert_eq!(p.len(), 3 * PAYLOAD_PREALLOC);
        assert!(p.iter().all(|&b| b == 0xab));
        assert_eq!(peer.left, 5);
        assert_eq!(read_payload(&mut peer, 0).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn a_batch_whose_counts_lie_fails_without_allocating_for_them() {
        let real = vec![vec![Value::Int(1)], vec![Value::str("two")], vec![]];
        let mut records = Vec::new();
        encode_batch(&real, &mut records);
        // A count of 5 million records, the three real ones, a fourth that claims 2 million
        // fields, and 5 MiB of garbage, so that both counts are within the bytes left.
        let mut b = Vec::new();
        put_varint(&mut b, 5_000_000);
        b.extend_from_slice(&records[1..]);
        put_varint(&mut b, 2_000_000);
        b.resize(b.len() + (5 << 20), 0xff);
        let mut out = Vec::new();
        let e = decode_into(&b, &mut out).unwrap_err();
        assert!(e.contains("unknown value tag 255"), "{e}");
        assert_eq!(out, real);
        assert!(out.capacity() <= PREALLOC_RECORDS, "room for {} records", out.capacity());
        // A count beyond the bytes left is refused before anything is decoded.
        let mut b = Vec::new();
        put_varint(&mut b, 10_000_000);
        b.extend_from_slice(&records[1..]);
        let e = decode_batch(&b).unwrap_err();
        assert!(e.contains("a count of 10000000 is more than the bytes left"), "{e}");
        // A string's length is checked against the bytes before the string is made.
        let mut b = Vec::new();
        put_varint(&mut b, 1);
        put_varint(&mut b, 1);
        b.push(0);
        put_varint(&mut b, u64::MAX);
        assert!(decode_batch(&b).unwrap_err().contains("more than the bytes left"));
    }

    #[test]
    fn booleans_round_trip_and_a_boolean_byte_other_than_0_or_1_is_refused() {
        let batch = vec![vec![Value::Bool(true), Value::Int(-1), Value::Bool(false)]];
        let mut b = Vec::new();
        encode_batch(&batch, &mut b);
        // One record of three fields: the tag and the byte of each boolean.
        assert_eq!(&b[..4], &[1, 3, 3, 1]);
        assert_eq!(&b[b.len() - 2..], &[3, 0]);
        assert_eq!(decode_batch(&b).unwrap(), batch);
        for bad in [2u8, 0x80, 0xff] {
            let mut forged = b.clone();
            forged[3] = bad;
            let e = decode_batch(&forged).unwrap_err();
            assert!(e.contains(&format!("a boolean of byte {bad}, not 0 or 1")), "{e}");
        }
        // Cut after its tag.
        assert!(decode_batch(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn headers_round_trip_and_bad_ones_are_refused() {
        let h = Header { kind: Kind::Credit, edge: 3, from: 1, to: 2, n: 16 };
        let mut b = h.to_bytes();
        assert_eq!(Header::decode(&b).unwrap(), h);
        b[0] = 9;
        assert!(Header::decode(&b).unwrap_err().contains("kind 9"));
        let big = Header { kind: Kind::Batch, edge: 0, from: 0, to: 0, n: MAX_PAYLOAD + 1 };
        assert!(Header::decode(&big.to_bytes()).is_err());
        let bad = Header { kind: Kind::Barrier, edge: 0, from: 0, to: 0, n: 3 };
        assert!(Header::decode(&bad.to_bytes()).is_err());
        let barrier = Barrier::checkpoint(u64::MAX - 1, 1_790_000_000_000, true);
        assert_eq!(decode_barrier(&encode_barrier(barrier)).unwrap(), barrier);
        let sp = Barrier { id: 7, ts: 9, unaligned: false, savepoint: true, stop: true };
        assert_eq!(decode_barrier(&encode_barrier(sp)).unwrap(), sp);
        assert!(decode_barrier(&[0; 5]).is_err());
        for w in [
            Watermark::At(i64::MIN),
            Watermark::At(-3),
            Watermark::At(1_790_000_000_000),
            Watermark::Idle,
        ] {
            assert_eq!(decode_watermark(&encode_watermark(w)).unwrap(), w);
        }
        // A flags byte beyond idle, an idle one with a time, a short one: all refused.
        let mut b = encode_watermark(Watermark::At(5));
        b[8] = 2;
        assert!(decode_watermark(&b).is_err());
        b[8] = 1;
        assert!(decode_watermark(&b).is_err());
        assert!(decode_watermark(&b[..8]).is_err());
        let bad = Header { kind: Kind::Watermark, edge: 0, from: 0, to: 0, n: 17 };
        assert!(Header::decode(&bad.to_bytes()).unwrap_err().contains("a watermark of 17 bytes"));
        for flags in [3u8, 4, 8] {
            let mut b = encode_barrier(sp);
            b[16] = flags;
            assert!(decode_barrier(&b).is_err(), "flags {flags}");
        }
    }
}
