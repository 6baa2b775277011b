//! Exchanges: how batches of records travel from a producing subtask to a consuming one.
//!
//! Every channel (exchange, producing subtask, consuming subtask) has credit-based flow
//! control, inside a worker as between workers: the producer starts with a number of
//! credits ([`CREDITS`] over the network; the worker picks it for local channels); sending
//! a batch spends one, and the consumer returns it once it has processed the batch. Batches
//! without credit wait in the producer's [`Outlet`] queue, and a producer with a waiting
//! batch takes no more input: a slow consumer back-pressures its producers without a queue
//! that grows and without one busy channel blocking the others on the same connection (the
//! reader of a connection never waits for a consumer).
//!
//! Barriers, watermarks and ends need no credit. An aligned barrier waits in the queue behind the
//! batches before it. An unaligned one overtakes them: they go out at once without credit
//! (an *overdraft*, bounded by what one input batch produces), then the barrier, so that
//! it reaches the consumer without waiting for the consumer to catch up. The consumer
//! returns a credit for those batches too, and the producer pays its debt back from them
//! before it sends anything else: what a consumer holds stays bounded by the credits. The consumer takes
//! every message off its channels as it arrives (holding the credit of a batch until it has
//! processed it), so it sees a barrier however many batches are ahead of it, and stores
//! those batches with the checkpoint ([`align`]).
//!
//! Workers connect in a full mesh: worker `a` opens one connection to every worker `b`,
//! carrying the batches from `a`'s subtasks to `b`'s and the credits back. A consumer
//! returns one credit per batch it received, so the credits that come back on a channel can
//! never outnumber the batches sent on it: a peer that returns more (or sends anything but
//! credits on that connection) fails the connection, and its producers with the reason, so
//! what a producer may have in flight stays at [`CREDITS`] plus the overdraft it owes.
//!
//! # The handshake
//!
//! Every exchange connection opens with a mutual challenge and response over the job's
//! secret ([`crate::auth`]) before any frame: the *opener* is the worker that connects, the
//! *acceptor* the one it connects to (worker `p`, as the opener knows it from the job).
//! Integers are little-endian; `prove` is [`JobSecret::prove`], over length-prefixed parts.
//!
//! ```text
//!   opener   → MAGIC (8) | run id length u32 (≤ 256) | run id | opener u32 | nonce_o (32)
//!   acceptor → MAGIC (8) | nonce_a (32)
//!              | prove("weir exchange acceptor", run id, opener, p, nonce_o, nonce_a)
//!   opener   → prove("weir exchange opener", run id, opener, p, nonce_a, nonce_o)
//! ```
//!
//! `MAGIC` is the version of the handshake (`WEIRXCH4`); an acceptor that reads another one
//! answers with its own and closes, so that an opener of another version of Weir can say so.
//! An acceptor answers only an opener of its run that is one of its peers; an opener that
//! gets no valid proof back fails (the peer does not hold the job's secret), and one whose
//! connection is closed before the answer tries again until its connect timeout (the peer
//! may still be on another run, or busy with other handshakes). The labels differ, so a
//! proof made in one role is worthless in the other, and both nonces are fresh for every
//! connection, so a proof recorded on one connection opens no other.
//!
//! Accepting runs on its own thread from the start of [`Network::connect`] (each worker
//! waits for the others' answers while it connects to them) and each incoming connection's
//! handshake on a thread of its own, with a deadline of [`HANDSHAKE_TIMEOUT`] for the
//! whole handshake however the bytes are spread out, and at most [`MAX_HANDSHAKES`] at
//! once (beyond that, new connections are closed at once): a slow or silent client delays no
//! one. A refused connection is closed with one line on stderr, and accepting goes on until
//! every peer is in, the connect timeout passes or the job is cancelled; then the acceptor
//! stops and the listener is left for the next attempt.

pub mod align;
pub mod wire;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, unbounded};

use crate::auth::{self, JobSecret, NONCE_LEN, Nonce, PROOF_LEN};
use crate::error::RuntimeError;
use crate::record::Record;
use wire::{Barrier, HEADER_LEN, Header, Kind, Watermark};

/// Batches a producer may have in flight on one channel to another worker.
pub const CREDITS: usize = 8;
/// The version of the exchange handshake: the first bytes each side sends.
const MAGIC: &[u8; 8] = b"WEIRXCH4";
/// The part of [`MAGIC`] every version shares.
const MAGIC_FAMILY: &[u8; 7] = b"WEIRXCH";
/// The label of the acceptor's proof.
const ACCEPTOR: &[u8] = b"weir exchange acceptor";
/// The label of the opener's proof.
const OPENER: &[u8] = b"weir exchange opener";
/// The longest run id in a handshake.
const MAX_RUN_ID: usize = 256;
/// How long an incoming connection has, from when it is accepted, for its whole side of the
/// handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Handshakes of incoming connections in progress at once; a connection beyond them is
/// closed at once (an honest opener tries again).
pub const MAX_HANDSHAKES: usize = 64;
/// How often a thread waiting in a handshake looks whether it should stop.
const TICK: Duration = Duration::from_millis(50);

/// What a consumer receives.
#[derive(Debug)]
pub enum Msg {
    Batch {
        input: u32,
        records: Vec<Record>,
        /// Given back once the batch is processed (`None`: sent without credit).
        credit: Option<CreditReturn>,
    },
    /// A checkpoint barrier: every batch before it on this channel belongs to the
    /// checkpoint, every batch after it does not.
    Barrier(Barrier),
    /// The producer's event time ([`crate::event_time`]): after the batches before it.
    Watermark(Watermark),
    End,
    /// The exchange broke (a peer went away); the consumer fails with this error.
    Failed(RuntimeError),
}

/// Gives a credit back to the producer of a batch.
#[derive(Debug)]
pub enum CreditReturn {
    Remote { conn: Arc<Conn>, header: Header },
    Local(Sender<()>),
}

impl CreditReturn {
    pub fn give(self) {
        // A producer that went away needs no credit; its loss is reported elsewhere.
        match self {
            CreditReturn::Remote { conn, header } => {
                let _ = conn.write(&header.to_bytes());
            }
            CreditReturn::Local(tx) => {
                let _ = tx.send(());
            }
        }
    }
}

/// The writing half of a connection, shared by the threads that write to it.
#[derive(Debug)]
pub struct Conn {
    stream: Mutex<TcpStream>,
    peer: u32,
    /// Why this worker failed the connection, when it did (the peer broke the protocol).
    broken: Mutex<Option<String>>,
}

impl Conn {
    fn new(stream: TcpStream, peer: u32) -> Self {
        Self { stream: Mutex::new(stream), peer, broken: Mutex::new(None) }
    }

    fn write(&self, frame: &[u8]) -> std::io::Result<()> {
        let mut s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        s.write_all(frame)
    }

    /// Fails the connection: notes why for the producers that use it and closes it.
    fn fail(&self, why: String) {
        // The reason first: a producer that finds the connection closed reads it.
        *self.broken.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        let s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let _ = s.shutdown(Shutdown::Both);
    }

    /// The error of a producer whose connection is gone.
    fn lost(&self) -> RuntimeError {
        let why = self.broken.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let peer = self.peer;
        RuntimeError::external(match why {
            Some(why) => format!("the connection to worker {peer} failed: {why}"),
            None => format!("the connection to worker {peer} was lost"),
        })
        .retryable()
    }
}

/// One input channel of a consuming subtask: the batches of one producing subtask over one
/// exchange, ending with one `End`.
#[derive(Debug)]
pub struct InChannel {
    pub rx: Receiver<Msg>,
    /// The consumer's input number.
    pub input: u32,
    /// The producing subtask.
    pub from: u32,
    /// Messages taken off `rx` and not processed yet, in order.
    pub pending: VecDeque<Msg>,
    /// `rx` gave its last message (its `End`, or it broke).
    pub drained: bool,
    /// The consumer processed the `End`.
    pub ended: bool,
    /// Not processed for now (a checkpoint barrier is being aligned).
    pub blocked: bool,
}

impl InChannel {
    pub fn new(rx: Receiver<Msg>, input: u32, from: u32) -> Self {
        Self {
            rx,
            input,
            from,
            pending: VecDeque::new(),
            drained: false,
            ended: false,
            blocked: false,
        }
    }
}

/// Where a consumer subtask takes its batches from: a channel per producing subtask and
/// input, so that one can be held back while the others are read.
#[derive(Debug, Default)]
pub struct Inbox {
    pub channels: Vec<InChannel>,
    /// Where the next look for a ready channel starts, so that busy channels take turns.
    next: usize,
}

impl Inbox {
    /// The next message waiting on channel `i`'s receiver, if any. A channel whose producer
    /// went away without its `End` gives a failure.
    pub fn receive(&mut self, i: usize) -> Option<Msg> {
        let ch = &mut self.channels[i];
        if ch.drained {
            return None;
        }
        match ch.rx.try_recv() {
            Ok(m) => {
                if matches!(m, Msg::End | Msg::Failed(_)) {
                    ch.drained = true;
                }
                Some(m)
            }
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                ch.drained = true;
                Some(Msg::Failed(cancelled()))
            }
        }
    }

    /// The next pending message to process, from a channel that has not ended and is not
    /// blocked, with the channel's index; channels take turns. With `batches` false, only a
    /// message that is not a batch (the subtask's output is full).
    pub fn next(&mut self, batches: bool) -> Option<(usize, Msg)> {
        let n = self.channels.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            let ch = &mut self.channels[i];
            if ch.ended || ch.blocked {
                continue;
            }
            match ch.pending.front() {
                None => continue,
                // A watermark may fire timers that emit as much as a batch.
                Some(Msg::Batch { .. } | Msg::Watermark(_)) if !batches => continue,
                Some(_) => {}
            }
            let m = ch.pending.pop_front().expect("a front");
            if matches!(m, Msg::End) {
                ch.ended = true;
            }
            self.next = i + 1;
            return Some((i, m));
        }
        None
    }

    /// Every channel's `End` processed.
    pub fn all_ended(&self) -> bool {
        self.channels.iter().all(|c| c.ended)
    }

    /// Waits up to `timeout` for a message on any channel, or for one of `credits` (the
    /// credits of outlets with a batch waiting), whichever comes first.
    pub fn wait(&self, credits: &[&Receiver<()>], timeout: Duration) {
        let mut sel = crossbeam_channel::Select::new();
        let mut any = false;
        for c in self.channels.iter().filter(|c| !c.drained) {
            sel.recv(&c.rx);
            any = true;
        }
        for r in credits {
            sel.recv(r);
            any = true;
        }
        if any {
            let _ = sel.ready_timeout(timeout);
        } else {
            std::thread::sleep(timeout);
        }
    }
}

/// What waits in an outlet's queue.
#[derive(Debug)]
enum Queued {
    Batch(u32, Vec<Record>),
    Barrier(Barrier),
    Watermark(Watermark),
    End,
}

/// The sending end of one channel: its link, its credits and the queue of what waits for
/// credit.
#[derive(Debug)]
pub struct Outlet {
    link: Link,
    credits: Receiver<()>,
    /// Credits taken off `credits` and not spent yet.
    spare: usize,
    queue: VecDeque<Queued>,
    /// Batches in `queue`.
    batches: usize,
    /// Batches sent without credit: the next credits pay them back before another batch is
    /// sent.
    debt: usize,
}

#[derive(Debug)]
enum Link {
    Local {
        tx: Sender<Msg>,
        credit: Sender<()>,
    },
    Remote {
        conn: Arc<Conn>,
        edge: u32,
        from: u32,
        to: u32,
        buf: Vec<u8>,
        /// Batches sent so far (counted before each goes out): the most credits the consumer
        /// can return.
        sent: Arc<AtomicU64>,
    },
}

impl Outlet {
    /// An outlet to a consumer in this worker, over `tx`, with `credits` batches in flight.
    pub fn local(tx: Sender<Msg>, credits: usize) -> Self {
        let (credit, rx) = unbounded();
        for _ in 0..credits {
            let _ = credit.send(());
        }
        Self::new(Link::Local { tx, credit }, rx)
    }

    fn new(link: Link, credits: Receiver<()>) -> Self {
        Self { link, credits, spare: 0, queue: VecDeque::new(), batches: 0, debt: 0 }
    }

    /// Queues a batch and sends what credit allows.
    pub fn enqueue(&mut self, input: u32, records: Vec<Record>) -> Result<(), RuntimeError> {
        self.queue.push_back(Queued::Batch(input, records));
        self.batches += 1;
        self.pump()
    }

    /// Sends a batch, waiting for credit (and for the batches queued before it).
    pub fn send(
        &mut self,
        input: u32,
        records: Vec<Record>,
        cancel: &AtomicBool,
    ) -> Result<(), RuntimeError> {
        self.enqueue(input, records)?;
        self.drain(cancel)
    }

    /// Sends checkpoint barrier `b`: behind the queued batches when it is aligned, ahead
    /// of them when it is not (they go out at once, without credit, then the barrier).
    pub fn barrier(&mut self, b: Barrier) -> Result<(), RuntimeError> {
        self.queue.push_back(Queued::Barrier(b));
        if b.unaligned {
            self.overdraft(self.queue.len())?;
        }
        self.pump()
    }

    /// Sends watermark `w` behind the queued batches; one that waits there behind nothing
    /// else is replaced by `w`, which says more.
    pub fn watermark(&mut self, w: Watermark) -> Result<(), RuntimeError> {
        match self.queue.back_mut() {
            Some(Queued::Watermark(last)) => *last = w,
            _ => self.queue.push_back(Queued::Watermark(w)),
        }
        self.pump()
    }

    /// Queues the channel's end.
    pub fn end(&mut self) -> Result<(), RuntimeError> {
        self.queue.push_back(Queued::End);
        self.pump()
    }

    /// Batches waiting for credit, and credits owed.
    pub fn backlog(&self) -> usize {
        self.batches + self.debt
    }

    /// The credits to wait for when the outlet has a batch waiting or owes credit.
    pub fn waiting_credits(&self) -> Option<&Receiver<()>> {
        (self.backlog() > 0).then_some(&self.credits)
    }

    /// Sends from the front of the queue as far as credit allows.
    pub fn pump(&mut self) -> Result<(), RuntimeError> {
        while self.debt > 0 {
            if self.spare > 0 {
                self.spare -= 1;
                self.debt -= 1;
                continue;
            }
            match self.credits.try_recv() {
                Ok(()) => self.debt -= 1,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(self.gone()),
            }
        }
        while let Some(front) = self.queue.front() {
            if matches!(front, Queued::Batch(..)) && self.debt > 0 {
                return Ok(());
            }
            if matches!(front, Queued::Batch(..)) && self.spare == 0 {
                match self.credits.try_recv() {
                    Ok(()) => self.spare += 1,
                    Err(TryRecvError::Empty) => return Ok(()),
                    Err(TryRecvError::Disconnected) => return Err(self.gone()),
                }
            }
            let q = self.queue.pop_front().expect("a front");
            if matches!(q, Queued::Batch(..)) {
                self.spare -= 1;
                self.batches -= 1;
            }
            self.send_now(q)?;
        }
        Ok(())
    }

    /// Aligned barriers triggered `timeout_ms` or longer before `now_ms` overtake the
    /// batches ahead of them and go on as unaligned ones.
    pub fn overtake(&mut self, now_ms: u64, timeout_ms: u64) -> Result<(), RuntimeError> {
        let last = self.queue.iter().rposition(|q| {
            matches!(q, Queued::Barrier(b) if !b.unaligned && !b.savepoint && now_ms >= b.ts.saturating_add(timeout_ms))
        });
        if let Some(k) = last {
            self.overdraft(k + 1)?;
        }
        Ok(())
    }

    /// Sends the first `n` queued messages at once: batches without credit, checkpoint
    /// barriers as unaligned ones (a savepoint's stays aligned: the order is kept, so the
    /// consumer still aligns it).
    fn overdraft(&mut self, n: usize) -> Result<(), RuntimeError> {
        for _ in 0..n {
            let Some(q) = self.queue.pop_front() else { break };
            let q = match q {
                Queued::Batch(..) => {
                    self.batches -= 1;
                    self.debt += 1;
                    q
                }
                Queued::Barrier(b) if !b.savepoint => {
                    Queued::Barrier(Barrier { unaligned: true, ..b })
                }
                other => other,
            };
            self.send_now(q)?;
        }
        Ok(())
    }

    /// Sends everything queued, waiting for credit as needed.
    pub fn drain(&mut self, cancel: &AtomicBool) -> Result<(), RuntimeError> {
        loop {
            self.pump()?;
            if self.queue.is_empty() {
                return Ok(());
            }
            match self.credits.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => self.spare += 1,
                Err(RecvTimeoutError::Timeout) if !cancel.load(Ordering::Relaxed) => {}
                Err(RecvTimeoutError::Timeout) => return Err(cancelled()),
                Err(RecvTimeoutError::Disconnected) => return Err(self.gone()),
            }
        }
    }

    fn gone(&self) -> RuntimeError {
        match &self.link {
            Link::Local { .. } => cancelled(),
            Link::Remote { conn, .. } => conn.lost(),
        }
    }

    /// Sends one message (the credit of a batch is taken or owed).
    fn send_now(&mut self, q: Queued) -> Result<(), RuntimeError> {
        match &mut self.link {
            Link::Local { tx, credit } => {
                let m = match q {
                    Queued::Batch(input, records) => Msg::Batch {
                        input,
                        records,
                        credit: Some(CreditReturn::Local(credit.clone())),
                    },
                    Queued::Barrier(b) => Msg::Barrier(b),
                    Queued::Watermark(w) => Msg::Watermark(w),
                    Queued::End => Msg::End,
                };
                tx.send(m).map_err(|_| cancelled())
            }
            Link::Remote { conn, edge, from, to, buf, sent } => {
                let (edge, from, to) = (*edge, *from, *to);
                buf.clear();
                buf.resize(HEADER_LEN, 0);
                let kind = match q {
                    Queued::Batch(_, records) => {
                        wire::encode_batch(&records, buf);
                        // Before the batch goes out, so that its credit never comes back
                        // before it is counted.
                        sent.fetch_add(1, Ordering::SeqCst);
                        Kind::Batch
                    }
                    Queued::Barrier(b) => {
                        buf.extend_from_slice(&wire::encode_barrier(b));
                        Kind::Barrier
                    }
                    Queued::Watermark(w) => {
                        buf.extend_from_slice(&wire::encode_watermark(w));
                        Kind::Watermark
                    }
                    Queued::End => Kind::End,
                };
                let n = (buf.len() - HEADER_LEN) as u32;
                buf[..HEADER_LEN].copy_from_slice(&Header { kind, edge, from, to, n }.to_bytes());
                conn.write(buf).map_err(|_| conn.lost())
            }
        }
    }
}

pub fn cancelled() -> RuntimeError {
    RuntimeError::internal("cancelled: another subtask of the job failed")
}

/// A worker's connections to the other workers of the job.
#[derive(Debug)]
pub struct Network {
    me: u32,
    /// Connections this worker opened: batches out, credits in.
    outgoing: HashMap<u32, (Arc<Conn>, TcpStream)>,
    /// Connections the others opened: batches in, credits out.
    incoming: HashMap<u32, TcpStream>,
    /// Credit senders of the remote outlets made so far, by peer and (edge, from, to).
    credit_senders: HashMap<u32, Credits>,
}

/// The credit lines of the channels to one peer, by (edge, from, to).
type Credits = HashMap<(u32, u32, u32), CreditLine>;

/// Where the credits of one channel to another worker go, and how many may still come.
#[derive(Debug)]
struct CreditLine {
    tx: Sender<()>,
    /// Batches the channel's outlet has sent.
    sent: Arc<AtomicU64>,
    /// Credits the consumer has returned.
    returned: u64,
}

/// Where a batch that arrives over the network goes, by (exchange, from, to): the queue of
/// that channel at the consuming subtask, and the consumer's input number.
pub type Route = HashMap<(u32, u32, u32), (Sender<Msg>, u32)>;

/// Bytes from the other side, shown in a message.
fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The opener's first message: [`MAGIC`], the run id, the opener's index and its nonce.
fn hello(run_id: &str, me: u32, nonce: &Nonce) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&(run_id.len() as u32).to_le_bytes());
    b.extend_from_slice(run_id.as_bytes());
    b.extend_from_slice(&me.to_le_bytes());
    b.extend_from_slice(nonce);
    b
}

/// The parts a proof of `label` is over: the run, the opener's and the acceptor's indexes
/// (`ids`, little-endian), then the other side's nonce and the prover's own.
fn parts<'a>(
    label: &'a [u8],
    run_id: &'a str,
    ids: &'a [[u8; 4]; 2],
    theirs: &'a [u8],
    mine: &'a [u8],
) -> [&'a [u8]; 6] {
    [label, run_id.as_bytes(), &ids[0], &ids[1], theirs, mine]
}

/// Why a read or a write of a handshake stopped before its end.
#[derive(Debug)]
enum Cut {
    /// The other side closed the connection.
    Closed,
    /// The deadline passed.
    Late,
    /// This side stopped waiting (the job was cancelled, or connecting is over).
    Stopped,
    Io(std::io::Error),
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cut::Closed => f.write_str("it closed the connection in the middle of the handshake"),
            Cut::Late => {
                write!(f, "it did not complete the handshake within {HANDSHAKE_TIMEOUT:?}")
            }
            Cut::Stopped => f.write_str("this worker stopped waiting for it"),
            Cut::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Reads exactly `buf.len()` bytes before `deadline`, however the other side spreads them out
/// (each read waits only for the time left), looking at `stop` at least every [`TICK`].
fn read_by(
    s: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<(), Cut> {
    let mut at = 0;
    while at < buf.len() {
        if stop.load(Ordering::Relaxed) {
            return Err(Cut::Stopped);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Cut::Late);
        }
        s.set_read_timeout(Some(left.min(TICK))).map_err(Cut::Io)?;
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err(Cut::Closed),
            Ok(k) => at += k,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Err(Cut::Closed),
            Err(e) => return Err(Cut::Io(e)),
        }
    }
    Ok(())
}

/// Writes all of `b` before `deadline`.
fn write_by(s: &mut TcpStream, b: &[u8], deadline: Instant) -> Result<(), Cut> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Cut::Late);
    }
    s.set_write_timeout(Some(left)).map_err(Cut::Io)?;
    s.write_all(b).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Cut::Late,
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => Cut::Closed,
        _ => Cut::Io(e),
    })
}

/// What ended one try at opening a connection.
enum Refused {
    /// Worth another try (the peer may still be on another run, or busy): why not this time.
    Again(String),
    /// Final.
    Fail(RuntimeError),
}

/// Opens the connection to worker `peer` at `addr` and makes the opener's side of the
/// handshake, trying again while the peer cannot be reached or closes the connection before
/// answering, until `deadline`.
#[allow(clippy::too_many_arguments)]
fn open(
    me: u32,
    peer: u32,
    addr: &str,
    run_id: &str,
    secret: &JobSecret,
    deadline: Instant,
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<TcpStream, RuntimeError> {
    let mut pause = Duration::from_millis(50);
    loop {
        let why = match open_once(me, peer, addr, run_id, secret, deadline, cancel) {
            Ok(s) => return Ok(s),
            Err(Refused::Fail(e)) => return Err(e),
            Err(Refused::Again(why)) => why,
        };
        if cancel.load(Ordering::Relaxed) {
            return Err(cancelled());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RuntimeError::external(format!(
                "worker {me}: could not connect to worker {peer} at {addr} within \
                 {timeout:?}: {why}"
            ))
            .retryable());
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// One try of [`open`].
fn open_once(
    me: u32,
    peer: u32,
    addr: &str,
    run_id: &str,
    secret: &JobSecret,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<TcpStream, Refused> {
    let again = |e: std::io::Error| Refused::Again(e.to_string());
    let mut last = None;
    let mut stream = None;
    for a in addr.to_socket_addrs().map_err(again)? {
        // Not much longer than a handshake at a time, so that a cancel is seen.
        let left = deadline.saturating_duration_since(Instant::now()).min(HANDSHAKE_TIMEOUT);
        match TcpStream::connect_timeout(&a, left.max(Duration::from_millis(1))) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let Some(mut s) = stream else {
        return Err(last.map_or_else(|| Refused::Again("it has no address".into()), again));
    };
    s.set_nodelay(true).map_err(again)?;
    let cut = |c: Cut| match c {
        Cut::Stopped => Refused::Fail(cancelled()),
        Cut::Closed => Refused::Again(
            "it closed the connection before answering the handshake (is it on another run of \
             the job, or a worker of an older version of Weir?)"
                .into(),
        ),
        Cut::Late => Refused::Again(
            "it took the connection but did not answer the handshake (is it still busy with \
             another run of the job?)"
                .into(),
        ),
        Cut::Io(e) => Refused::Again(e.to_string()),
    };
    let nonce_o = auth::nonce();
    write_by(&mut s, &hello(run_id, me, &nonce_o), deadline).map_err(cut)?;
    let mut answer = [0u8; MAGIC.len() + NONCE_LEN + PROOF_LEN];
    let (magic, rest) = answer.split_at_mut(MAGIC.len());
    read_by(&mut s, magic, deadline, cancel).map_err(cut)?;
    if magic != MAGIC {
        if magic.starts_with(MAGIC_FAMILY) {
            return Err(Refused::Fail(
                RuntimeError::external(format!(
                    "worker {me}: worker {peer} at {addr} answered with version {:?} of the \
                     exchange handshake, this worker speaks {:?}: every worker of a job needs \
                     the same version of Weir",
                    lossy(magic),
                    lossy(MAGIC)
                ))
                .retryable(),
            ));
        }
        return Err(Refused::Again(format!(
            "it answered {:?}, not a Weir exchange handshake: is {addr} the data port of a \
             Weir worker?",
            lossy(magic)
        )));
    }
    read_by(&mut s, rest, deadline, cancel).map_err(cut)?;
    let (nonce_a, proof_a) = rest.split_at(NONCE_LEN);
    let ids = [me.to_le_bytes(), peer.to_le_bytes()];
    if !secret.check(&parts(ACCEPTOR, run_id, &ids, &nonce_o, nonce_a), proof_a) {
        return Err(Refused::Fail(
            RuntimeError::external(format!(
                "worker {me}: worker {peer} at {addr} did not prove the job's secret: do all \
                 workers have the same {}?",
                auth::ENV
            ))
            .retryable(),
        ));
    }
    let proof_o = secret.prove(&parts(OPENER, run_id, &ids, nonce_a, &nonce_o));
    write_by(&mut s, &proof_o, deadline).map_err(cut)?;
    s.set_read_timeout(None).map_err(again)?;
    s.set_write_timeout(None).map_err(again)?;
    Ok(s)
}

/// What the acceptor of one [`Network::connect`] needs for its handshakes.
#[derive(Debug)]
struct Acceptance {
    me: u32,
    peers: HashSet<u32>,
    run_id: String,
    secret: JobSecret,
}

/// The acceptor's side of the handshake on an incoming connection, by `deadline`: the
/// opener's index once it has proven the job's secret, or why the connection is refused.
fn answer(
    s: &mut TcpStream,
    a: &Acceptance,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<u32, String> {
    let cut = |c: Cut| c.to_string();
    let mut magic = [0u8; MAGIC.len()];
    read_by(s, &mut magic, deadline, stop).map_err(cut)?;
    if &magic != MAGIC {
        // Says which version this worker speaks, for an opener of another one.
        let _ = write_by(s, MAGIC, deadline);
        return Err(if magic.starts_with(MAGIC_FAMILY) {
            format!(
                "a worker that speaks version {:?} of the exchange handshake, not {:?}: every \
                 worker of a job needs the same version of Weir",
                lossy(&magic),
                lossy(MAGIC)
            )
        } else {
            "not a Weir exchange connection".into()
        });
    }
    let mut n = [0u8; 4];
    read_by(s, &mut n, deadline, stop).map_err(cut)?;
    let len = u32::from_le_bytes(n) as usize;
    if len > MAX_RUN_ID {
        return Err(format!("a run id of {len} bytes, over the limit of {MAX_RUN_ID}"));
    }
    let mut id = vec![0u8; len];
    read_by(s, &mut id, deadline, stop).map_err(cut)?;
    if id != a.run_id.as_bytes() {
        return Err(format!("a connection for run {:?}, not {:?}", lossy(&id), a.run_id));
    }
    read_by(s, &mut n, deadline, stop).map_err(cut)?;
    let opener = u32::from_le_bytes(n);
    if !a.peers.contains(&opener) {
        return Err(format!("a connection from worker {opener}, which is not a peer of this one"));
    }
    let mut nonce_o = [0u8; NONCE_LEN];
    read_by(s, &mut nonce_o, deadline, stop).map_err(cut)?;
    let nonce_a = auth::nonce();
    let ids = [opener.to_le_bytes(), a.me.to_le_bytes()];
    let mut reply = MAGIC.to_vec();
    reply.extend_from_slice(&nonce_a);
    reply.extend_from_slice(&a.secret.prove(&parts(ACCEPTOR, &a.run_id, &ids, &nonce_o, &nonce_a)));
    write_by(s, &reply, deadline).map_err(cut)?;
    let mut proof_o = [0u8; PROOF_LEN];
    read_by(s, &mut proof_o, deadline, stop).map_err(cut)?;
    if !a.secret.check(&parts(OPENER, &a.run_id, &ids, &nonce_a, &nonce_o), &proof_o) {
        return Err(format!(
            "it says it is worker {opener} but did not prove the job's secret (a wrong {}, or \
             not a worker of this job)",
            auth::ENV
        ));
    }
    Ok(opener)
}

/// An incoming connection that completed its handshake: the opener's index, the connection
/// and where it came from.
type Accepted = (u32, TcpStream, SocketAddr);

/// The thread accepting the connections of one [`Network::connect`]. Dropping it stops the
/// thread and waits for it and for the handshakes it started: none outlives the connect.
#[derive(Debug)]
struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// Starts accepting on a clone of `listener`; the connections that complete their
    /// handshake come out of the receiver.
    fn start(
        listener: &TcpListener,
        a: Acceptance,
    ) -> std::io::Result<(Acceptor, Receiver<Accepted>)> {
        let listener = listener.try_clone()?;
        listener.set_nonblocking(true)?;
        let (tx, rx) = unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("weir-accept".into())
                .spawn(move || accept_loop(&listener, &Arc::new(a), &tx, &stop))?
        };
        Ok((Acceptor { stop, thread: Some(thread) }, rx))
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts connections until `stop`, each handshake on a thread of its own with a deadline of
/// [`HANDSHAKE_TIMEOUT`], at most [`MAX_HANDSHAKES`] at once.
fn accept_loop(
    listener: &TcpListener,
    a: &Arc<Acceptance>,
    tx: &Sender<Accepted>,
    stop: &Arc<AtomicBool>,
) {
    let me = a.me;
    let mut handshakes: Vec<JoinHandle<()>> = Vec::new();
    // Connections closed for want of room, and when that was last said (at most once a second).
    let mut turned_away = 0usize;
    let mut said: Option<Instant> = None;
    let mut say = |what: &str| {
        if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            eprintln!("weir: worker {me}: {what}");
            said = Some(Instant::now());
            true
        } else {
            false
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let (s, from) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => {
                // Out of file descriptors, say, under a flood of connections: keep trying.
                say(&format!("accepting exchange connections: {e}"));
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        handshakes.retain(|h| !h.is_finished());
        if handshakes.len() >= MAX_HANDSHAKES {
            drop(s);
            turned_away += 1;
            let what = format!(
                "closed {turned_away} exchange connection(s), the last from {from}: \
                 {MAX_HANDSHAKES} handshakes are already in progress"
            );
            if say(&what) {
                turned_away = 0;
            }
            continue;
        }
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let (a, tx, stop) = (a.clone(), tx.clone(), stop.clone());
        let handshake = move || {
            let mut s = s;
            let shaken = s
                .set_nonblocking(false)
                .and_then(|()| s.set_nodelay(true))
                .map_err(|e| e.to_string())
                .and_then(|()| answer(&mut s, &a, deadline, &stop));
            match shaken {
                Ok(peer) => {
                    let _ = tx.send((peer, s, from));
                }
                // Connecting is over: nobody waits for this one any more.
                Err(_) if stop.load(Ordering::Relaxed) => {}
                Err(why) => eprintln!(
                    "weir: worker {}: refused an exchange connection from {from}: {why}",
                    a.me
                ),
            }
        };
        match std::thread::Builder::new().name("weir-handshake".into()).spawn(handshake) {
            Ok(h) => handshakes.push(h),
            Err(e) => {
                say(&format!("closed an exchange connection from {from}: no thread for it: {e}"));
            }
        }
    }
    for h in handshakes {
        let _ = h.join();
    }
}

impl Network {
    /// Connects worker `me` with every other worker: opens a connection to each address in
    /// `peers` (index → address, without `me`) and accepts one from each on `listener`, each
    /// with the handshake of the module's documentation over `secret`. Connections that fail
    /// the handshake are refused (one line on stderr each) and do not count; honest peers
    /// get in meanwhile.
    pub fn connect(
        me: u32,
        peers: &HashMap<u32, String>,
        listener: &TcpListener,
        run_id: &str,
        secret: &JobSecret,
        timeout: Duration,
        cancel: &AtomicBool,
    ) -> Result<Network, RuntimeError> {
        let deadline = Instant::now() + timeout;
        let fail = |what: String| RuntimeError::external(what).retryable();
        // Accepting first: the peers wait for this worker's answers while it connects to them.
        let acceptance = Acceptance {
            me,
            peers: peers.keys().copied().collect(),
            run_id: run_id.into(),
            secret: secret.clone(),
        };
        let (acceptor, accepted) = Acceptor::start(listener, acceptance)
            .map_err(|e| fail(format!("worker {me}: accepting exchange connections: {e}")))?;
        let mut order: Vec<(&u32, &String)> = peers.iter().collect();
        order.sort_unstable();
        let mut outgoing = HashMap::new();
        for (&peer, addr) in order {
            let s = open(me, peer, addr, run_id, secret, deadline, timeout, cancel)?;
            let w = s.try_clone().map_err(|e| fail(e.to_string()))?;
            outgoing.insert(peer, (Arc::new(Conn::new(w, peer)), s));
        }
        let mut incoming = HashMap::new();
        while incoming.len() < peers.len() {
            if cancel.load(Ordering::Relaxed) {
                return Err(cancelled());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let mut missing: Vec<u32> =
                    peers.keys().filter(|p| !incoming.contains_key(*p)).copied().collect();
                missing.sort_unstable();
                return Err(fail(format!(
                    "worker {me}: workers {missing:?} did not connect within {timeout:?} (the \
                     connections this worker refused are on its stderr)"
                )));
            }
            match accepted.recv_timeout(left.min(TICK)) {
                Ok((peer, s, from)) => {
                    if incoming.contains_key(&peer) {
                        eprintln!(
                            "weir: worker {me}: refused a second exchange connection from worker \
                             {peer} (from {from})"
                        );
                        continue;
                    }
                    s.set_read_timeout(None).map_err(|e| fail(e.to_string()))?;
                    s.set_write_timeout(None).map_err(|e| fail(e.to_string()))?;
                    incoming.insert(peer, s);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(fail(format!(
                        "worker {me}: the thread accepting exchange connections stopped"
                    )));
                }
            }
        }
        drop(acceptor);
        Ok(Network { me, outgoing, incoming, credit_senders: HashMap::new() })
    }

    /// The outlet for channel (edge, from, to) where subtask `to` runs on worker `peer`.
    pub fn outlet(&mut self, peer: u32, edge: u32, from: u32, to: u32) -> Outlet {
        let conn = self.outgoing[&peer].0.clone();
        let (tx, rx) = unbounded();
        for _ in 0..CREDITS {
            let _ = tx.send(());
        }
        let sent = Arc::new(AtomicU64::new(0));
        let line = CreditLine { tx, sent: sent.clone(), returned: 0 };
        self.credit_senders.entry(peer).or_default().insert((edge, from, to), line);
        Outlet::new(Link::Remote { conn, edge, from, to, buf: Vec::new(), sent }, rx)
    }

    /// Starts the threads that read the connections, once every outlet and inbox exists.
    /// `route` maps (edge, to) to the consumer's remote queue; `ends` is how many channels
    /// each peer sends into this worker (each ends with an `End`).
    pub fn start(self, route: Route, ends: HashMap<u32, usize>) -> Running {
        let mut threads = Vec::new();
        let me = self.me;
        let route = Arc::new(route);
        let mut credits = self.credit_senders;
        for (&peer, (conn, s)) in &self.outgoing {
            let Ok(s) = s.try_clone() else { continue };
            let credits = credits.remove(&peer).unwrap_or_default();
            let conn = conn.clone();
            threads.push(std::thread::spawn(move || read_credits(s, &conn, me, credits)));
        }
        for (peer, s) in self.incoming {
            let Ok(w) = s.try_clone() else { continue };
            let conn = Arc::new(Conn::new(w, peer));
            let route = route.clone();
            let expected = ends.get(&peer).copied().unwrap_or(0);
            threads.push(std::thread::spawn(move || {
                read_batches(s, conn, me, peer, &route, expected)
            }));
        }
        Running { outgoing: self.outgoing.into_values().map(|(c, _)| c).collect(), threads }
    }
}

/// Reads credits from a connection this worker opened, until the peer closes it.
///
/// A consumer returns one credit per batch it received, so the credits returned on a
/// channel never outnumber the batches sent on it: the producer's credits in hand and in
/// flight stay at [`CREDITS`] plus what it owes for an overdraft. A frame that is not a
/// credit, a credit for a channel this worker does not send on, or a credit beyond the
/// batches sent (a frame of `u32::MAX` credits, say) is not clamped: the peer breaks the
/// protocol, so the connection fails, and its producers with the reason.
fn read_credits(s: TcpStream, conn: &Conn, me: u32, mut credits: Credits) {
    let peer = conn.peer;
    let mut r = BufReader::new(s);
    let mut h = [0u8; HEADER_LEN];
    let why = loop {
        if let Err(e) = r.read_exact(&mut h) {
            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                conn.fail(e.to_string());
            }
            // Dropping the senders tells a producer still waiting for credit that the peer
            // is gone.
            return;
        }
        let h = match Header::decode(&h) {
            Ok(h) => h,
            Err(e) => break e,
        };
        if h.kind != Kind::Credit {
            break format!("a {:?} frame where only credits come", h.kind);
        }
        let Some(line) = credits.get_mut(&(h.edge, h.from, h.to)) else {
            break format!(
                "a credit for exchange {} from subtask {} to subtask {}, a channel this worker \
                 does not send on",
                h.edge, h.from, h.to
            );
        };
        let sent = line.sent.load(Ordering::SeqCst);
        let returned = line.returned + u64::from(h.n);
        if returned > sent {
            break format!(
                "{returned} credits returned on exchange {} from subtask {} to subtask {} for \
                 {sent} batches sent (a consumer returns one per batch; is worker {peer} running \
                 another version of Weir?)",
                h.edge, h.from, h.to
            );
        }
        line.returned = returned;
        for _ in 0..h.n {
            let _ = line.tx.send(());
        }
    };
    eprintln!("weir: worker {me}: failed the exchange connection to worker {peer}: {why}");
    conn.fail(why);
}

/// Reads batches from a connection another worker opened, until it closes it after the
/// last `End`.
fn read_batches(s: TcpStream, conn: Arc<Conn>, me: u32, peer: u32, route: &Route, expected: usize) {
    let mut r = BufReader::with_capacity(1 << 16, s);
    let mut h = [0u8; HEADER_LEN];
    let mut ended = 0usize;
    let fail = |why: String| {
        let e = RuntimeError::external(format!(
            "worker {me}: the exchange from worker {peer} broke: {why}"
        ))
        .retryable();
        for (tx, _) in route.values() {
            let _ = tx.send(Msg::Failed(e.clone()));
        }
    };
    loop {
        if let Err(e) = r.read_exact(&mut h) {
            if ended < expected {
                fail(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "worker closed the connection before the end of its data".into()
                } else {
                    e.to_string()
                });
            }
            break;
        }
        let h = match Header::decode(&h) {
            Ok(h) => h,
            Err(e) => return fail(e),
        };
        let Some((tx, input)) = route.get(&(h.edge, h.from, h.to)) else {
            return fail(format!(
                "a batch for exchange {} subtask {} that this worker does not run",
                h.edge, h.to
            ));
        };
        match h.kind {
            Kind::Batch => {
                let payload = match wire::read_payload(&mut r, h.n) {
                    Ok(p) => p,
                    Err(e) => return fail(e.to_string()),
                };
                let records = match wire::decode_batch(&payload) {
                    Ok(b) => b,
                    Err(e) => return fail(e),
                };
                let credit = Some(CreditReturn::Remote {
                    conn: conn.clone(),
                    header: Header { kind: Kind::Credit, n: 1, ..h },
                });
                let _ = tx.send(Msg::Batch { input: *input, records, credit });
            }
            Kind::Barrier | Kind::Watermark => {
                // Their lengths are fixed, and checked with the header.
                let mut buf = [0u8; wire::BARRIER_LEN as usize];
                let payload = &mut buf[..(h.n as usize).min(wire::BARRIER_LEN as usize)];
                if let Err(e) = r.read_exact(payload) {
                    return fail(e.to_string());
                }
                let msg = match h.kind {
                    Kind::Barrier => wire::decode_barrier(payload).map(Msg::Barrier),
                    _ => wire::decode_watermark(payload).map(Msg::Watermark),
                };
                match msg {
                    Ok(m) => {
                        let _ = tx.send(m);
                    }
                    Err(e) => return fail(e),
                }
            }
            Kind::End => {
                ended += 1;
                let _ = tx.send(Msg::End);
            }
            Kind::Credit => return fail("a credit on a batch connection".into()),
        }
    }
    // The peer is done sending: close, so that its credit reader ends.
    let _ = r.get_ref().shutdown(Shutdown::Both);
}

/// The network while the job runs.
#[derive(Debug)]
pub struct Running {
    outgoing: Vec<Arc<Conn>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    /// After every local subtask has finished: tells the peers this worker sends nothing
    /// more and waits until they have read everything and closed their side.
    pub fn finish(self) {
        for c in &self.outgoing {
            let s = c.stream.lock().unwrap_or_else(|e| e.into_inner());
            let _ = s.shutdown(Shutdown::Write);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Value;
    use std::sync::atomic::AtomicUsize;

    fn secret() -> JobSecret {
        JobSecret::new("0123456789abcdef0123456789abcdef").unwrap()
    }

    fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").unwrap()
    }

    /// Two workers in one process on listeners `l0` and `l1`, over real TCP.
    fn pair_on(l0: &TcpListener, l1: &TcpListener, run: &str) -> (Network, Network) {
        let a0 = l0.local_addr().unwrap().to_string();
        let a1 = l1.local_addr().unwrap().to_string();
        std::thread::scope(|scope| {
            let t = scope.spawn(|| {
                let never = AtomicBool::new(false);
                let peers = HashMap::from([(0, a0)]);
                Network::connect(1, &peers, l1, run, &secret(), Duration::from_secs(10), &never)
                    .unwrap()
            });
            let never = AtomicBool::new(false);
            let peers = HashMap::from([(1, a1)]);
            let n0 =
                Network::connect(0, &peers, l0, run, &secret(), Duration::from_secs(10), &never)
                    .unwrap();
            (n0, t.join().unwrap())
        })
    }

    /// Two workers in one process: 0 sends to 1 over real TCP.
    fn pair() -> (Network, Network) {
        pair_on(&listener(), &listener(), "run")
    }

    #[test]
    fn a_consumer_that_takes_nothing_stops_its_producer_after_its_credits() {
        let (mut n0, n1) = pair();
        let mut outlet = n0.outlet(1, 7, 0, 1);
        let (tx, rx) = unbounded();
        let r1 = n1.start(HashMap::from([((7, 0, 1), (tx, 3))]), HashMap::from([(0, 1)]));
        let r0 = n0.start(HashMap::new(), HashMap::new());
        let sent = Arc::new(AtomicUsize::new(0));
        let cancel = Arc::new(AtomicBool::new(false));
        let producer = {
            let (sent, cancel) = (sent.clone(), cancel.clone());
            std::thread::spawn(move || {
                for i in 0..CREDITS + 3 {
                    let batch = vec![vec![Value::str("k"), Value::Int(i as i64)]; 100];
                    outlet.send(0, batch, &cancel).unwrap();
                    sent.fetch_add(1, Ordering::SeqCst);
                }
                outlet.end().unwrap();
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(sent.load(Ordering::SeqCst), CREDITS, "sent beyond its credits");
        // Taking one batch and returning its credit lets exactly one more through.
        let Msg::Batch { input, records, credit } = rx.recv().unwrap() else { panic!("a batch") };
        assert_eq!((input, records.len()), (3, 100));
        assert_eq!(records[0], vec![Value::str("k"), Value::Int(0)]);
        credit.expect("a batch from the network carries its credit").give();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(sent.load(Ordering::SeqCst), CREDITS + 1);
        // Draining everything lets the producer finish; the batches arrive in order.
        let mut next = 1;
        loop {
            match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                Msg::Batch { records, credit, .. } => {
                    assert_eq!(records[0][1], Value::Int(next));
                    next += 1;
                    credit.unwrap().give();
                }
                Msg::End => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(next as usize, CREDITS + 3);
        producer.join().unwrap();
        // Each worker finishes once the other has closed its side: at the same time.
        let t = std::thread::spawn(move || r1.finish());
        r0.finish();
        t.join().unwrap();
    }

    fn take(rx: &Receiver<Msg>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(match m {
                Msg::Batch { records, credit, .. } => {
                    assert!(credit.is_some(), "every batch carries a credit back");
                    format!("{:?}", records[0][0])
                }
                Msg::Barrier(b) => format!("barrier {} {}", b.id, b.unaligned),
                Msg::Watermark(w) => format!("{w:?}"),
                Msg::End => "end".into(),
                Msg::Failed(e) => format!("{e}"),
            });
        }
        out
    }

    #[test]
    fn watermarks_wait_behind_the_batches_before_them_and_the_last_replaces_a_waiting_one() {
        let (tx, rx) = unbounded();
        let mut o = Outlet::local(tx, 1);
        o.enqueue(0, int(0)).unwrap();
        o.watermark(Watermark::At(5)).unwrap();
        assert_eq!(take(&rx), ["Int(0)", "At(5)"], "no credit needed");
        o.enqueue(0, int(1)).unwrap();
        o.watermark(Watermark::At(6)).unwrap();
        o.watermark(Watermark::At(9)).unwrap();
        o.watermark(Watermark::Idle).unwrap();
        assert!(take(&rx).is_empty(), "behind a batch waiting for credit");
        let Link::Local { credit, .. } = &o.link else { unreachable!() };
        credit.send(()).unwrap();
        o.pump().unwrap();
        assert_eq!(take(&rx), ["Int(1)", "Idle"], "one watermark, the last");
        // An unaligned barrier takes the waiting watermark along, in order.
        o.enqueue(0, int(2)).unwrap();
        o.watermark(Watermark::At(12)).unwrap();
        o.barrier(Barrier::checkpoint(1, 0, true)).unwrap();
        assert_eq!(take(&rx), ["Int(2)", "At(12)", "barrier 1 true"]);
    }

    #[test]
    fn watermarks_cross_the_network_in_order_with_the_batches() {
        let (mut n0, n1) = pair();
        let mut outlet = n0.outlet(1, 2, 0, 1);
        let (tx, rx) = unbounded();
        let r1 = n1.start(HashMap::from([((2, 0, 1), (tx, 0))]), HashMap::from([(0, 1)]));
        let r0 = n0.start(HashMap::new(), HashMap::new());
        let never = AtomicBool::new(false);
        outlet.send(0, int(1), &never).unwrap();
        outlet.watermark(Watermark::At(i64::MIN + 1)).unwrap();
        outlet.send(0, int(2), &never).unwrap();
        outlet.watermark(Watermark::Idle).unwrap();
        outlet.watermark(Watermark::At(1_790_000_000_000)).unwrap();
        outlet.end().unwrap();
        let mut got = Vec::new();
        loop {
            let m = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            got.push(match m {
                Msg::Batch { records, credit, .. } => {
                    credit.unwrap().give();
                    format!("{:?}", records[0][0])
                }
                Msg::End => break,
                other => format!("{other:?}"),
            });
        }
        assert_eq!(
            got,
            [
                "Int(1)",
                "Watermark(At(-9223372036854775807))",
                "Int(2)",
                "Watermark(Idle)",
                "Watermark(At(1790000000000))"
            ]
        );
        let t = std::thread::spawn(move || r1.finish());
        r0.finish();
        t.join().unwrap();
    }

    fn int(i: i64) -> Vec<Record> {
        vec![vec![Value::Int(i)]]
    }

    #[test]
    fn an_unaligned_barrier_overtakes_the_batches_waiting_for_credit_and_the_debt_is_paid_back() {
        let (tx, rx) = unbounded();
        let mut o = Outlet::local(tx, 2);
        for i in 0..4 {
            o.enqueue(0, int(i)).unwrap();
        }
        assert_eq!(take(&rx), ["Int(0)", "Int(1)"]);
        assert_eq!(o.backlog(), 2);
        // An aligned barrier waits behind them.
        o.barrier(Barrier::checkpoint(1, 0, false)).unwrap();
        assert!(take(&rx).is_empty());
        // An unaligned one sends them at once, the aligned one among them as unaligned.
        o.barrier(Barrier::checkpoint(2, 0, true)).unwrap();
        assert_eq!(take(&rx), ["Int(2)", "Int(3)", "barrier 1 true", "barrier 2 true"]);
        // Two batches went without credit: the next two credits pay them back.
        assert_eq!(o.backlog(), 2);
        o.enqueue(0, int(4)).unwrap();
        let give = |o: &mut Outlet| {
            let Link::Local { credit, .. } = &o.link else { unreachable!() };
            credit.send(()).unwrap();
            o.pump().unwrap();
        };
        give(&mut o);
        give(&mut o);
        assert!(take(&rx).is_empty(), "sent before the debt was paid");
        give(&mut o);
        assert_eq!(take(&rx), ["Int(4)"]);
        assert_eq!(o.backlog(), 0);
    }

    #[test]
    fn an_aligned_barrier_overtakes_once_its_alignment_timeout_has_passed() {
        let (tx, rx) = unbounded();
        let mut o = Outlet::local(tx, 0);
        o.enqueue(0, int(0)).unwrap();
        o.barrier(Barrier::checkpoint(1, 1_000, false)).unwrap();
        o.enqueue(0, int(1)).unwrap();
        o.overtake(1_499, 500).unwrap();
        assert!(take(&rx).is_empty());
        o.overtake(1_500, 500).unwrap();
        // The batch after the barrier stays behind.
        assert_eq!(take(&rx), ["Int(0)", "barrier 1 true"]);
        assert_eq!(o.backlog(), 2, "one batch queued, one owed");
    }

    #[test]
    fn a_peer_that_goes_away_fails_the_consumer_and_the_producer() {
        let (mut n0, n1) = pair();
        let mut outlet = n0.outlet(1, 0, 0, 1);
        let (tx, rx) = unbounded();
        let r1 = n1.start(HashMap::from([((0, 0, 1), (tx, 0))]), HashMap::from([(0, 1)]));
        // Worker 0 sends one batch and vanishes without its End.
        let cancel = AtomicBool::new(false);
        outlet.send(0, vec![vec![Value::Int(1)]], &cancel).unwrap();
        drop(outlet);
        drop(n0);
        assert!(matches!(rx.recv().unwrap(), Msg::Batch { .. }));
        match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
            Msg::Failed(e) => assert!(e.message.contains("worker 0"), "{e}"),
            other => panic!("expected a failure, got {other:?}"),
        }
        r1.finish();
    }

    /// Reads until the other side closes the connection; what it sent before, or `None`
    /// when it keeps the connection open for `wait`.
    fn until_closed(s: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
        s.set_read_timeout(Some(wait)).unwrap();
        let mut got = Vec::new();
        match s.read_to_end(&mut got) {
            Ok(_) => Some(got),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(got),
            Err(_) => None,
        }
    }

    #[test]
    fn a_connection_for_another_run_is_refused_and_the_real_worker_gets_in() {
        let (l0, l1) = (listener(), listener());
        // Something that says it is worker 1 of another run connects to worker 0 first.
        let mut stray = TcpStream::connect(l0.local_addr().unwrap()).unwrap();
        stray.write_all(&hello("other-run", 1, &auth::nonce())).unwrap();
        let (n0, n1) = pair_on(&l0, &l1, "run");
        assert_eq!((n0.incoming.len(), n1.incoming.len()), (1, 1));
        // It was closed without a word: nothing about the job before a proof.
        assert_eq!(until_closed(&mut stray, Duration::from_secs(5)), Some(Vec::new()));
    }

    #[test]
    fn the_listener_is_left_alone_once_connect_returns_and_serves_the_next_attempt() {
        let (l0, l1) = (listener(), listener());
        let (n0, n1) = pair_on(&l0, &l1, "run-a0");
        drop((n0, n1));
        // Nobody accepts on worker 0's listener any more: a connection waits in its backlog.
        let mut late = TcpStream::connect(l0.local_addr().unwrap()).unwrap();
        late.write_all(&hello("run-a0", 1, &auth::nonce())).unwrap();
        assert_eq!(until_closed(&mut late, Duration::from_millis(300)), None);
        // The next attempt refuses it (another run) and connects.
        let (n0, n1) = pair_on(&l0, &l1, "run-a1");
        assert_eq!((n0.incoming.len(), n1.incoming.len()), (1, 1));
        assert_eq!(until_closed(&mut late, Duration::from_secs(5)), Some(Vec::new()));
    }

    #[test]
    fn a_handshake_read_has_one_deadline_for_all_its_bytes() {
        let l = listener();
        let addr = l.local_addr().unwrap();
        let slow = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            // A byte every 300 ms: each read would get one long before a timeout per read.
            for _ in 0..20 {
                if s.write_all(b"W").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        let (mut s, _) = l.accept().unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let deadline = started + Duration::from_secs(1);
        let r = read_by(&mut s, &mut buf, deadline, &AtomicBool::new(false));
        assert!(matches!(r, Err(Cut::Late)), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        drop(s);
        slow.join().unwrap();
        // And a stop is seen while waiting.
        let stop = AtomicBool::new(true);
        let t = std::thread::spawn(move || TcpStream::connect(addr).unwrap());
        let (mut s, _) = l.accept().unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        assert!(matches!(read_by(&mut s, &mut buf, far, &stop), Err(Cut::Stopped)));
        drop(t.join().unwrap());
    }

    #[test]
    fn proofs_are_bound_to_their_role_the_run_and_both_workers() {
        let k = secret();
        let (n1, n2) = (auth::nonce(), auth::nonce());
        let ids = [1u32.to_le_bytes(), 0u32.to_le_bytes()];
        let acceptor = k.prove(&parts(ACCEPTOR, "run", &ids, &n1, &n2));
        // The acceptor's proof over the same nonces, swapped as the opener would, is refused.
        assert!(!k.check(&parts(OPENER, "run", &ids, &n2, &n1), &acceptor));
        assert!(!k.check(&parts(OPENER, "run", &ids, &n1, &n2), &acceptor));
        let swapped = [0u32.to_le_bytes(), 1u32.to_le_bytes()];
        assert!(!k.check(&parts(ACCEPTOR, "run", &swapped, &n1, &n2), &acceptor));
        assert!(!k.check(&parts(ACCEPTOR, "run-a1", &ids, &n1, &n2), &acceptor));
        assert!(k.check(&parts(ACCEPTOR, "run", &ids, &n1, &n2), &acceptor));
    }

    #[test]
    fn more_credits_than_batches_sent_fail_the_connection_with_a_message() {
        let (mut n0, n1) = pair();
        let mut outlet = n0.outlet(1, 7, 0, 1);
        let mut forge = n1.incoming[&0].try_clone().unwrap();
        let (tx, rx) = unbounded();
        let r1 = n1.start(HashMap::from([((7, 0, 1), (tx, 0))]), HashMap::from([(0, 1)]));
        let r0 = n0.start(HashMap::new(), HashMap::new());
        let never = AtomicBool::new(false);
        for i in 0..2 {
            outlet.send(0, int(i), &never).unwrap();
        }
        for _ in 0..2 {
            let m = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert!(matches!(m, Msg::Batch { .. }), "{m:?}");
        }
        let credit = |n| Header { kind: Kind::Credit, edge: 7, from: 0, to: 1, n }.to_bytes();
        // One credit for one of the two batches is fine; u32::MAX more is not, at once.
        forge.write_all(&credit(1)).unwrap();
        forge.write_all(&credit(u32::MAX)).unwrap();
        let Link::Remote { conn, .. } = &outlet.link else { unreachable!() };
        let conn = conn.clone();
        let started = Instant::now();
        while conn.broken.lock().unwrap().is_none() {
            assert!(started.elapsed() < Duration::from_secs(10), "the connection still stands");
            std::thread::sleep(Duration::from_millis(10));
        }
        let e = outlet.send(0, int(2), &never).unwrap_err();
        assert!(e.retryable);
        assert!(e.message.contains("the connection to worker 1 failed"), "{e}");
        assert!(
            e.message.contains(
                "4294967296 credits returned on exchange 7 from subtask 0 to subtask 1 for 2 \
                 batches sent"
            ),
            "{e}"
        );
        // The consumer's side sees the connection end before the channel's End.
        match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
            Msg::Failed(e) => assert!(e.message.contains("worker 0"), "{e}"),
            other => panic!("expected a failure, got {other:?}"),
        }
        drop(outlet);
        let t = std::thread::spawn(move || r1.finish());
        r0.finish();
        t.join().unwrap();
    }

    #[test]
    fn a_savepoint_barrier_never_overtakes_and_stays_aligned_when_overdrawn() {
        let (tx, rx) = unbounded();
        let mut o = Outlet::local(tx, 1);
        o.enqueue(0, int(1)).unwrap();
        o.enqueue(0, int(2)).unwrap();
        let sp = Barrier { id: 1, ts: 0, unaligned: false, savepoint: true, stop: false };
        o.barrier(sp).unwrap();
        // Long past any alignment timeout, it still waits behind the batches.
        o.overtake(1_000_000, 10).unwrap();
        assert_eq!(take(&rx), ["Int(1)"]);
        // An unaligned checkpoint's barrier behind it sends everything at once; the
        // savepoint's barrier goes in its place, still aligned.
        o.barrier(Barrier::checkpoint(2, 0, true)).unwrap();
        assert_eq!(take(&rx), ["Int(2)", "barrier 1 false", "barrier 2 true"]);
    }
}
