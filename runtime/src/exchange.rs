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
//! Barriers and ends need no credit. An aligned barrier waits in the queue behind the
//! batches before it. An unaligned one overtakes them: they go out at once without credit
//! (an *overdraft*, bounded by what one input batch produces), then the barrier, so that
//! it reaches the consumer without waiting for the consumer to catch up. The consumer
//! returns a credit for those batches too, and the producer pays its debt back from them
//! before it sends anything else: what a consumer holds stays bounded by the credits. The consumer takes
//! every message off its channels as it arrives (holding the credit of a batch until it has
//! processed it), so it sees a barrier however many batches are ahead of it, and stores
//! those batches with the checkpoint ([`crate::align`]).
//!
//! Workers connect in a full mesh: worker `a` opens one connection to every worker `b`,
//! carrying the batches from `a`'s subtasks to `b`'s and the credits back.

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, unbounded};

use crate::error::RuntimeError;
use crate::record::Record;
use crate::wire::{self, Barrier, HEADER_LEN, Header, Kind};

/// Batches a producer may have in flight on one channel to another worker.
pub const CREDITS: usize = 8;
const MAGIC: &[u8; 8] = b"WEIRXCH3";

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
}

impl Conn {
    fn write(&self, frame: &[u8]) -> std::io::Result<()> {
        let mut s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        s.write_all(frame)
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
                Some(Msg::Batch { .. }) if !batches => continue,
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
    Local { tx: Sender<Msg>, credit: Sender<()> },
    Remote { conn: Arc<Conn>, edge: u32, from: u32, to: u32, buf: Vec<u8> },
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
            Link::Remote { conn, .. } => lost(conn.peer),
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
                    Queued::End => Msg::End,
                };
                tx.send(m).map_err(|_| cancelled())
            }
            Link::Remote { conn, edge, from, to, buf } => {
                let (edge, from, to) = (*edge, *from, *to);
                buf.clear();
                buf.resize(HEADER_LEN, 0);
                let kind = match q {
                    Queued::Batch(_, records) => {
                        wire::encode_batch(&records, buf);
                        Kind::Batch
                    }
                    Queued::Barrier(b) => {
                        buf.extend_from_slice(&wire::encode_barrier(b));
                        Kind::Barrier
                    }
                    Queued::End => Kind::End,
                };
                let n = (buf.len() - HEADER_LEN) as u32;
                buf[..HEADER_LEN].copy_from_slice(&Header { kind, edge, from, to, n }.to_bytes());
                conn.write(buf).map_err(|_| lost(conn.peer))
            }
        }
    }
}

pub fn cancelled() -> RuntimeError {
    RuntimeError::internal("cancelled: another subtask of the job failed")
}

fn lost(peer: u32) -> RuntimeError {
    RuntimeError::external(format!("the connection to worker {peer} was lost")).retryable()
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

/// The credit senders of the channels to one peer, by (edge, from, to).
type Credits = HashMap<(u32, u32, u32), Sender<()>>;

/// Where a batch that arrives over the network goes, by (exchange, from, to): the queue of
/// that channel at the consuming subtask, and the consumer's input number.
pub type Route = HashMap<(u32, u32, u32), (Sender<Msg>, u32)>;

fn handshake(run_id: &str, me: u32) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&(run_id.len() as u32).to_le_bytes());
    b.extend_from_slice(run_id.as_bytes());
    b.extend_from_slice(&me.to_le_bytes());
    b
}

/// Reads the opening of a connection and returns the index of the worker that opened it.
fn read_handshake(s: &mut TcpStream, run_id: &str) -> Result<u32, String> {
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).map_err(|e| e.to_string())?;
    if &magic != MAGIC {
        return Err("not a Weir exchange connection".into());
    }
    let mut n = [0u8; 4];
    s.read_exact(&mut n).map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes(n) as usize;
    if len > 256 {
        return Err("a run id over 256 bytes".into());
    }
    let mut id = vec![0u8; len];
    s.read_exact(&mut id).map_err(|e| e.to_string())?;
    if id != run_id.as_bytes() {
        return Err(format!(
            "a connection for run {:?}, not {run_id:?}",
            String::from_utf8_lossy(&id)
        ));
    }
    s.read_exact(&mut n).map_err(|e| e.to_string())?;
    Ok(u32::from_le_bytes(n))
}

impl Network {
    /// Connects worker `me` with every other worker: opens a connection to each address in
    /// `peers` (index → address, without `me`) and accepts one from each on `listener`.
    pub fn connect(
        me: u32,
        peers: &HashMap<u32, String>,
        listener: &TcpListener,
        run_id: &str,
        timeout: Duration,
        cancel: &AtomicBool,
    ) -> Result<Network, RuntimeError> {
        let deadline = Instant::now() + timeout;
        let fail = |what: String| RuntimeError::external(what).retryable();
        let check = || if cancel.load(Ordering::Relaxed) { Err(cancelled()) } else { Ok(()) };
        let mut outgoing = HashMap::new();
        for (&peer, addr) in peers {
            let mut s = loop {
                match TcpStream::connect(addr.as_str()) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(fail(format!("connecting to worker {peer} at {addr}: {e}")));
                    }
                    Err(_) => {
                        check()?;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            };
            s.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
            s.write_all(&handshake(run_id, me))
                .map_err(|e| fail(format!("connecting to worker {peer} at {addr}: {e}")))?;
            let w = s.try_clone().map_err(|e| fail(e.to_string()))?;
            outgoing.insert(peer, (Arc::new(Conn { stream: Mutex::new(w), peer }), s));
        }
        let mut incoming = HashMap::new();
        listener.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
        while incoming.len() < peers.len() {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false).map_err(|e| fail(e.to_string()))?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))
                        .map_err(|e| fail(e.to_string()))?;
                    let peer = match read_handshake(&mut s, run_id) {
                        Ok(p) if peers.contains_key(&p) && !incoming.contains_key(&p) => p,
                        Ok(p) => {
                            eprintln!(
                                "weir: worker {me}: refused a second or unknown worker {p} from {from}"
                            );
                            continue;
                        }
                        Err(e) => {
                            eprintln!("weir: worker {me}: refused a connection from {from}: {e}");
                            continue;
                        }
                    };
                    s.set_read_timeout(None).map_err(|e| fail(e.to_string()))?;
                    s.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
                    incoming.insert(peer, s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    check()?;
                    if Instant::now() >= deadline {
                        let mut missing: Vec<u32> =
                            peers.keys().filter(|p| !incoming.contains_key(p)).copied().collect();
                        missing.sort_unstable();
                        return Err(fail(format!(
                            "worker {me}: workers {missing:?} did not connect within {timeout:?}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(fail(format!("accepting exchange connections: {e}"))),
            }
        }
        Ok(Network { me, outgoing, incoming, credit_senders: HashMap::new() })
    }

    /// The outlet for channel (edge, from, to) where subtask `to` runs on worker `peer`.
    pub fn outlet(&mut self, peer: u32, edge: u32, from: u32, to: u32) -> Outlet {
        let conn = self.outgoing[&peer].0.clone();
        let (tx, rx) = unbounded();
        for _ in 0..CREDITS {
            let _ = tx.send(());
        }
        self.credit_senders.entry(peer).or_default().insert((edge, from, to), tx);
        Outlet::new(Link::Remote { conn, edge, from, to, buf: Vec::new() }, rx)
    }

    /// Starts the threads that read the connections, once every outlet and inbox exists.
    /// `route` maps (edge, to) to the consumer's remote queue; `ends` is how many channels
    /// each peer sends into this worker (each ends with an `End`).
    pub fn start(self, route: Route, ends: HashMap<u32, usize>) -> Running {
        let mut threads = Vec::new();
        let me = self.me;
        let route = Arc::new(route);
        let mut credits = self.credit_senders;
        for (&peer, (_, s)) in &self.outgoing {
            let Ok(s) = s.try_clone() else { continue };
            let credits = credits.remove(&peer).unwrap_or_default();
            threads.push(std::thread::spawn(move || read_credits(s, credits)));
        }
        for (peer, s) in self.incoming {
            let Ok(w) = s.try_clone() else { continue };
            let conn = Arc::new(Conn { stream: Mutex::new(w), peer });
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
fn read_credits(s: TcpStream, credits: Credits) {
    let mut r = BufReader::new(s);
    let mut h = [0u8; HEADER_LEN];
    while r.read_exact(&mut h).is_ok() {
        let Ok(h) = Header::decode(&h) else { return };
        if h.kind != Kind::Credit {
            return;
        }
        if let Some(tx) = credits.get(&(h.edge, h.from, h.to)) {
            for _ in 0..h.n {
                let _ = tx.send(());
            }
        }
    }
    // Dropping the senders tells a producer still waiting for credit that the peer is gone.
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
                let mut payload = vec![0u8; h.n as usize];
                if let Err(e) = r.read_exact(&mut payload) {
                    return fail(e.to_string());
                }
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
            Kind::Barrier => {
                let mut payload = [0u8; wire::BARRIER_LEN as usize];
                if let Err(e) = r.read_exact(&mut payload) {
                    return fail(e.to_string());
                }
                match wire::decode_barrier(&payload) {
                    Ok(b) => {
                        let _ = tx.send(Msg::Barrier(b));
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

    /// Two workers in one process: 0 sends to 1 over real TCP.
    fn pair() -> (Network, Network) {
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let a0 = l0.local_addr().unwrap().to_string();
        let a1 = l1.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || {
            Network::connect(
                1,
                &HashMap::from([(0, a0)]),
                &l1,
                "run",
                Duration::from_secs(10),
                &AtomicBool::new(false),
            )
            .unwrap()
        });
        let n0 = Network::connect(
            0,
            &HashMap::from([(1, a1)]),
            &l0,
            "run",
            Duration::from_secs(10),
            &AtomicBool::new(false),
        )
        .unwrap();
        (n0, t.join().unwrap())
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
                Msg::End => "end".into(),
                Msg::Failed(e) => format!("{e}"),
            });
        }
        out
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

    #[test]
    fn a_connection_for_another_run_is_refused() {
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let (a0, a1) = (l0.local_addr().unwrap(), l1.local_addr().unwrap().to_string());
        // Something that says it is worker 1 of another run connects to worker 0.
        let t = std::thread::spawn(move || {
            let mut s = TcpStream::connect(a0).unwrap();
            s.write_all(&handshake("other-run", 1)).unwrap();
            s
        });
        let peers = HashMap::from([(1, a1)]);
        let never = AtomicBool::new(false);
        let err = Network::connect(0, &peers, &l0, "run", Duration::from_millis(500), &never)
            .unwrap_err();
        drop(t.join().unwrap());
        assert!(err.message.contains("workers [1] did not connect"), "{err}");
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
