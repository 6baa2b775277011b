//! Exchanges: how batches of records travel from a producing subtask to a consuming one.
//!
//! Inside a worker a batch goes over a bounded channel: when a consumer falls behind, its
//! channel fills and its producers block. Between workers it goes over TCP with credit-based
//! flow control: every channel (exchange, producing subtask, consuming subtask) starts with
//! [`CREDITS`] credits on the producing side; sending a batch spends one, and the consumer
//! returns it when it takes the batch off its queue. A producer without credit waits, so a
//! slow consumer back-pressures its producers across the network without a queue that grows
//! and without one busy channel blocking the others on the same connection (the reader of
//! a connection never waits for a consumer).
//!
//! Workers connect in a full mesh: worker `a` opens one connection to every worker `b`,
//! carrying the batches from `a`'s subtasks to `b`'s and the credits back.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};

use crate::error::RuntimeError;
use crate::record::Record;
use crate::wire::{self, HEADER_LEN, Header, Kind};

/// Batches a producer may have in flight on one channel to another worker.
pub const CREDITS: usize = 8;
const MAGIC: &[u8; 8] = b"WEIRXCH1";

/// What a consumer receives.
#[derive(Debug)]
pub enum Msg {
    Batch {
        input: u32,
        records: Vec<Record>,
        credit: Option<CreditReturn>,
    },
    /// Checkpoint barrier `id`: every batch before it on this channel belongs to the
    /// checkpoint, every batch after it does not.
    Barrier {
        id: u64,
        unaligned: bool,
    },
    End,
    /// The exchange broke (a peer went away); the consumer fails with this error.
    Failed(RuntimeError),
}

/// Gives a credit back to the producer of a batch that came over the network.
#[derive(Debug)]
pub struct CreditReturn {
    conn: Arc<Conn>,
    header: Header,
}

impl CreditReturn {
    pub fn give(self) {
        // A peer that went away needs no credit; its loss is reported elsewhere.
        let _ = self.conn.write(&self.header.to_bytes());
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
    pub ended: bool,
    /// Not read for now (a checkpoint barrier is being aligned).
    pub blocked: bool,
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
    fn readable(&self, i: usize) -> bool {
        !self.channels[i].ended && !self.channels[i].blocked
    }

    /// The next message of a channel that has not ended and is not blocked, with the
    /// channel's index. A channel whose producer went away without its `End` yields a
    /// failure.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<(usize, Msg), RecvTimeoutError> {
        use crossbeam_channel::TryRecvError;
        // While batches flow, one is usually waiting: take it without building a Select.
        let n = self.channels.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            if !self.readable(i) {
                continue;
            }
            match self.channels[i].rx.try_recv() {
                Ok(m) => return Ok(self.took(i, Ok(m))),
                Err(TryRecvError::Disconnected) => return Ok(self.took(i, Err(()))),
                Err(TryRecvError::Empty) => {}
            }
        }
        let live: Vec<usize> = (0..n).filter(|&i| self.readable(i)).collect();
        if live.is_empty() {
            if self.all_ended() {
                return Err(RecvTimeoutError::Disconnected);
            }
            std::thread::sleep(timeout);
            return Err(RecvTimeoutError::Timeout);
        }
        let mut sel = crossbeam_channel::Select::new();
        for &i in &live {
            sel.recv(&self.channels[i].rx);
        }
        let op = sel.select_timeout(timeout).map_err(|_| RecvTimeoutError::Timeout)?;
        let i = live[op.index()];
        let got = op.recv(&self.channels[i].rx).map_err(|_| ());
        drop(sel);
        Ok(self.took(i, got))
    }

    /// Marks what a receive from channel `i` means for it.
    fn took(&mut self, i: usize, got: Result<Msg, ()>) -> (usize, Msg) {
        self.next = i + 1;
        let ch = &mut self.channels[i];
        match got {
            Ok(m) => {
                if matches!(m, Msg::End) {
                    ch.ended = true;
                }
                (i, m)
            }
            Err(()) => {
                ch.ended = true;
                (i, Msg::Failed(cancelled()))
            }
        }
    }

    pub fn all_ended(&self) -> bool {
        self.channels.iter().all(|c| c.ended)
    }

    pub fn is_empty(&self) -> bool {
        self.channels.iter().all(|c| c.ended || c.rx.is_empty())
    }
}

/// The sending end of one channel.
#[derive(Debug)]
pub enum Outlet {
    Local(Sender<Msg>),
    Remote(RemoteOutlet),
}

#[derive(Debug)]
pub struct RemoteOutlet {
    conn: Arc<Conn>,
    credits: Receiver<()>,
    edge: u32,
    from: u32,
    to: u32,
    buf: Vec<u8>,
}

impl Outlet {
    /// Sends a batch, waiting for room (a local channel) or credit (a remote one).
    pub fn send(
        &mut self,
        input: u32,
        records: Vec<Record>,
        cancel: &AtomicBool,
    ) -> Result<(), RuntimeError> {
        match self {
            Outlet::Local(tx) => {
                tx.send(Msg::Batch { input, records, credit: None }).map_err(|_| cancelled())
            }
            Outlet::Remote(r) => {
                loop {
                    match r.credits.recv_timeout(Duration::from_millis(50)) {
                        Ok(()) => break,
                        Err(RecvTimeoutError::Timeout) if !cancel.load(Ordering::Relaxed) => {}
                        Err(RecvTimeoutError::Timeout) => return Err(cancelled()),
                        Err(RecvTimeoutError::Disconnected) => return Err(lost(r.conn.peer)),
                    }
                }
                r.buf.clear();
                r.buf.resize(HEADER_LEN, 0);
                wire::encode_batch(&records, &mut r.buf);
                let n = (r.buf.len() - HEADER_LEN) as u32;
                let h = Header { kind: Kind::Batch, edge: r.edge, from: r.from, to: r.to, n };
                r.buf[..HEADER_LEN].copy_from_slice(&h.to_bytes());
                r.conn.write(&r.buf).map_err(|_| lost(r.conn.peer))
            }
        }
    }

    /// Sends a checkpoint barrier after the batches sent so far (it needs no credit).
    pub fn barrier(&mut self, id: u64, unaligned: bool) -> Result<(), RuntimeError> {
        match self {
            Outlet::Local(tx) => tx.send(Msg::Barrier { id, unaligned }).map_err(|_| cancelled()),
            Outlet::Remote(r) => {
                let h = Header {
                    kind: Kind::Barrier,
                    edge: r.edge,
                    from: r.from,
                    to: r.to,
                    n: wire::BARRIER_LEN,
                };
                let mut frame = [0u8; HEADER_LEN + wire::BARRIER_LEN as usize];
                frame[..HEADER_LEN].copy_from_slice(&h.to_bytes());
                frame[HEADER_LEN..].copy_from_slice(&wire::encode_barrier(id, unaligned));
                r.conn.write(&frame).map_err(|_| lost(r.conn.peer))
            }
        }
    }

    pub fn end(&mut self) -> Result<(), RuntimeError> {
        match self {
            Outlet::Local(tx) => tx.send(Msg::End).map_err(|_| cancelled()),
            Outlet::Remote(r) => {
                let h = Header { kind: Kind::End, edge: r.edge, from: r.from, to: r.to, n: 0 };
                r.conn.write(&h.to_bytes()).map_err(|_| lost(r.conn.peer))
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
        Outlet::Remote(RemoteOutlet { conn, credits: rx, edge, from, to, buf: Vec::new() })
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
                let credit = Header { kind: Kind::Credit, n: 1, ..h };
                let _ = tx.send(Msg::Batch {
                    input: *input,
                    records,
                    credit: Some(CreditReturn { conn: conn.clone(), header: credit }),
                });
            }
            Kind::Barrier => {
                let mut payload = [0u8; wire::BARRIER_LEN as usize];
                if let Err(e) = r.read_exact(&mut payload) {
                    return fail(e.to_string());
                }
                match wire::decode_barrier(&payload) {
                    Ok((id, unaligned)) => {
                        let _ = tx.send(Msg::Barrier { id, unaligned });
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
}
