//! Attacks on the data port: what someone in the cluster who knows the run id (it is public in
//! `GET /v1/job`) but not the job's secret can do to the exchange connections between
//! workers, driving the real `Network::connect` on real sockets; and what a peer that breaks
//! the protocol after a valid handshake does to the worker (the batch decoder, credits).
//!
//! The handshake is written out by hand here, byte for byte as `runtime/src/exchange.rs`
//! documents it: a change to it has to change these tests too.

#[allow(dead_code)]
mod process;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;
use weir_runtime::auth::{self, JobSecret};
use weir_runtime::error::RuntimeError;
use weir_runtime::exchange::wire::{self, Header, Kind};
use weir_runtime::exchange::{MAX_HANDSHAKES, Msg, Network};
use weir_runtime::record::Value;

const MAGIC: &[u8; 8] = b"WEIRXCH4";
const ACCEPTOR: &[u8] = b"weir exchange acceptor";
const OPENER: &[u8] = b"weir exchange opener";
const RUN: &str = "run-1-a0";
/// Bytes of an acceptor's answer: magic, nonce, proof.
const ANSWER: usize = 8 + 32 + 32;

fn secret() -> JobSecret {
    JobSecret::new("0123456789abcdef0123456789abcdef").unwrap()
}

fn wrong_secret() -> JobSecret {
    JobSecret::new("fedcba9876543210fedcba9876543210").unwrap()
}

fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

fn addr(l: &TcpListener) -> SocketAddr {
    l.local_addr().unwrap()
}

/// Worker `me` connecting to `peers` on its listener `l`, on a thread of its own.
fn spawn_worker(
    me: u32,
    peers: Vec<(u32, SocketAddr)>,
    l: &TcpListener,
    timeout: Duration,
) -> JoinHandle<Result<Network, RuntimeError>> {
    let l = l.try_clone().unwrap();
    std::thread::spawn(move || {
        let peers: HashMap<u32, String> =
            peers.into_iter().map(|(i, a)| (i, a.to_string())).collect();
        Network::connect(me, &peers, &l, RUN, &secret(), timeout, &AtomicBool::new(false))
    })
}

/// Sends one batch each way between two connected workers and finishes both.
fn exchange(mut n0: Network, mut n1: Network) {
    let mut o0 = n0.outlet(1, 0, 0, 1);
    let mut o1 = n1.outlet(0, 0, 1, 0);
    let (tx0, rx0) = unbounded();
    let (tx1, rx1) = unbounded();
    let r0 = n0.start(HashMap::from([((0, 1, 0), (tx0, 0))]), HashMap::from([(1, 1)]));
    let r1 = n1.start(HashMap::from([((0, 0, 1), (tx1, 0))]), HashMap::from([(0, 1)]));
    let never = AtomicBool::new(false);
    o0.send(0, vec![vec![Value::str("from 0")]], &never).unwrap();
    o1.send(0, vec![vec![Value::str("from 1")]], &never).unwrap();
    o0.end().unwrap();
    o1.end().unwrap();
    for (rx, want) in [(rx0, "from 1"), (rx1, "from 0")] {
        match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
            Msg::Batch { records, credit, .. } => {
                assert_eq!(records, vec![vec![Value::str(want)]]);
                credit.unwrap().give();
            }
            other => panic!("expected a batch, got {other:?}"),
        }
        assert!(matches!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), Msg::End));
    }
    let t = std::thread::spawn(move || r1.finish());
    r0.finish();
    t.join().unwrap();
}

/// An opener's first message.
fn hello(run: &str, me: u32, nonce: &[u8; 32]) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&(run.len() as u32).to_le_bytes());
    b.extend_from_slice(run.as_bytes());
    b.extend_from_slice(&me.to_le_bytes());
    b.extend_from_slice(nonce);
    b
}

/// A proof as the exchange makes it: the label, the run, the opener's and the acceptor's
/// indexes, the other side's nonce and the prover's own.
fn proof(
    k: &JobSecret,
    label: &[u8],
    opener: u32,
    acceptor: u32,
    theirs: &[u8],
    mine: &[u8],
) -> [u8; 32] {
    proof_in(RUN, k, label, opener, acceptor, theirs, mine)
}

/// [`proof`] in run `run`.
fn proof_in(
    run: &str,
    k: &JobSecret,
    label: &[u8],
    opener: u32,
    acceptor: u32,
    theirs: &[u8],
    mine: &[u8],
) -> [u8; 32] {
    let (o, a) = (opener.to_le_bytes(), acceptor.to_le_bytes());
    k.prove(&[label, run.as_bytes(), &o, &a, theirs, mine])
}

/// Opens a connection to `to` as worker `me`, proving `k`, to worker `acceptor`; panics if
/// the acceptor's proof is not over `k`.
fn open_as(to: SocketAddr, me: u32, acceptor: u32, k: &JobSecret) -> TcpStream {
    open_as_in(RUN, to, me, acceptor, k)
}

/// [`open_as`] in run `run`.
fn open_as_in(run: &str, to: SocketAddr, me: u32, acceptor: u32, k: &JobSecret) -> TcpStream {
    let mut s = TcpStream::connect(to).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let nonce = auth::nonce();
    s.write_all(&hello(run, me, &nonce)).unwrap();
    let mut answer = [0u8; ANSWER];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer[..8], MAGIC);
    let (nonce_a, proof_a) = answer[8..].split_at(32);
    assert_eq!(proof_in(run, k, ACCEPTOR, me, acceptor, &nonce, nonce_a), proof_a);
    s.write_all(&proof_in(run, k, OPENER, me, acceptor, nonce_a, &nonce)).unwrap();
    s
}

/// Takes one connection on `l` as worker `me`, proving `k`; returns it and the opener.
fn accept_as(l: &TcpListener, me: u32, k: &JobSecret) -> (TcpStream, u32) {
    accept_as_in(RUN, l, me, k)
}

/// [`accept_as`] in run `run`.
fn accept_as_in(run: &str, l: &TcpListener, me: u32, k: &JobSecret) -> (TcpStream, u32) {
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head[..8], MAGIC);
    let mut run_got = vec![0u8; u32::from_le_bytes(head[8..12].try_into().unwrap()) as usize];
    s.read_exact(&mut run_got).unwrap();
    assert_eq!(run_got, run.as_bytes());
    let mut rest = [0u8; 4 + 32];
    s.read_exact(&mut rest).unwrap();
    let opener = u32::from_le_bytes(rest[..4].try_into().unwrap());
    let nonce_o = &rest[4..];
    let nonce = auth::nonce();
    let mut answer = MAGIC.to_vec();
    answer.extend_from_slice(&nonce);
    answer.extend_from_slice(&proof_in(run, k, ACCEPTOR, opener, me, nonce_o, &nonce));
    s.write_all(&answer).unwrap();
    let mut proof_o = [0u8; 32];
    s.read_exact(&mut proof_o).unwrap();
    assert_eq!(proof_in(run, k, OPENER, opener, me, &nonce, nonce_o), proof_o);
    s.set_read_timeout(None).unwrap();
    (s, opener)
}

/// Reads until the other side closes the connection: what it sent before, or `None` when it
/// keeps it open for `wait`.
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
fn an_old_handshake_a_wrong_secret_or_an_unknown_worker_is_refused_and_the_workers_still_connect() {
    let (l0, l1) = (listener(), listener());
    let w0 = spawn_worker(0, vec![(1, addr(&l1))], &l0, Duration::from_secs(30));
    let a0 = addr(&l0);
    let attacks: Vec<(&str, JoinHandle<Option<Vec<u8>>>)> = vec![
        // The handshake of the previous version: the run id alone.
        ("old", {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(a0).unwrap();
                let mut b = b"WEIRXCH3".to_vec();
                b.extend_from_slice(&(RUN.len() as u32).to_le_bytes());
                b.extend_from_slice(RUN.as_bytes());
                b.extend_from_slice(&1u32.to_le_bytes());
                s.write_all(&b).unwrap();
                until_closed(&mut s, Duration::from_secs(10))
            })
        }),
        // The run id alone behind this version's magic: no nonce, no proof.
        ("run id alone", {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(a0).unwrap();
                let b = hello(RUN, 1, &[0; 32]);
                s.write_all(&b[..b.len() - 32]).unwrap();
                until_closed(&mut s, Duration::from_secs(10))
            })
        }),
        // The right run and worker, a proof over another secret.
        ("wrong secret", {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(a0).unwrap();
                let nonce = auth::nonce();
                s.write_all(&hello(RUN, 1, &nonce)).unwrap();
                let mut answer = [0u8; ANSWER];
                s.read_exact(&mut answer).unwrap();
                let (nonce_a, proof_a) = answer[8..].split_at(32);
                // The answer proves the job's secret, which the attacker cannot check.
                assert_ne!(proof(&wrong_secret(), ACCEPTOR, 1, 0, &nonce, nonce_a), proof_a);
                s.write_all(&proof(&wrong_secret(), OPENER, 1, 0, nonce_a, &nonce)).unwrap();
                until_closed(&mut s, Duration::from_secs(10))
            })
        }),
        // A worker the job does not have.
        ("unknown worker", {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(a0).unwrap();
                s.write_all(&hello(RUN, 5, &auth::nonce())).unwrap();
                until_closed(&mut s, Duration::from_secs(10))
            })
        }),
    ];
    for (what, t) in attacks {
        let got = t.join().unwrap().unwrap_or_else(|| panic!("{what}: still open"));
        // An older worker is told the version; nobody is told anything about the job.
        let want: &[u8] = if what == "old" { MAGIC } else { b"" };
        assert_eq!(got, want, "{what}");
    }
    // Worker 1 comes up only now: worker 0 has been accepting all along.
    let w1 = spawn_worker(1, vec![(0, a0)], &l1, Duration::from_secs(30));
    exchange(w0.join().unwrap().unwrap(), w1.join().unwrap().unwrap());
}

/// A relay between a worker and its peer that records what passes each way (an attacker
/// who can read the cluster's traffic).
struct Tap {
    up: Arc<Mutex<Vec<u8>>>,
    down: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    /// Relays the first connection to `l` to `to`.
    fn start(l: TcpListener, to: SocketAddr) -> Tap {
        let (up, down) = (Arc::default(), Arc::default());
        let tap = Tap { up: Arc::clone(&up), down: Arc::clone(&down) };
        std::thread::spawn(move || {
            let (a, _) = l.accept().unwrap();
            let b = TcpStream::connect(to).unwrap();
            let pipe = |mut from: TcpStream, mut to: TcpStream, log: Arc<Mutex<Vec<u8>>>| {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        // Recorded before it is passed on.
                        log.lock().unwrap().extend_from_slice(&buf[..n]);
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                })
            };
            pipe(a.try_clone().unwrap(), b.try_clone().unwrap(), up);
            pipe(b, a, down);
        });
        tap
    }
}

#[test]
fn a_handshake_recorded_on_one_connection_opens_no_other() {
    let (l0, l1) = (listener(), listener());
    // Worker 0 reaches worker 1 through one tap and worker 1 reaches worker 0 through another.
    let (t01, t10) = (listener(), listener());
    let (via01, via10) = (addr(&t01), addr(&t10));
    let (tap01, tap10) = (Tap::start(t01, addr(&l1)), Tap::start(t10, addr(&l0)));
    let w0 = spawn_worker(0, vec![(1, via01)], &l0, Duration::from_secs(20));
    let w1 = spawn_worker(1, vec![(0, via10)], &l1, Duration::from_secs(20));
    drop((w0.join().unwrap().unwrap(), w1.join().unwrap().unwrap()));
    let hello_len = hello(RUN, 1, &[0; 32]).len();
    // What worker 1 sent opening its connection to worker 0: its hello and its proof.
    let opening = tap10.up.lock().unwrap()[..hello_len + 32].to_vec();
    // What worker 1 answered worker 0's opening with: its nonce and its proof.
    let answer = tap01.down.lock().unwrap()[..ANSWER].to_vec();
    let recorded_nonce = tap10.down.lock().unwrap()[8..40].to_vec();

    // The next connect of worker 0 (the same run, the worst case) to a worker 1 whose address
    // the attacker holds.
    let impostor = listener();
    let (go, wait) = mpsc::channel::<()>();
    let fake1 = {
        let impostor = impostor.try_clone().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = impostor.accept().unwrap();
            let mut hello = vec![0u8; hello_len];
            s.read_exact(&mut hello).unwrap();
            // It answers with worker 1's recorded answer once the other attacks are done.
            wait.recv().unwrap();
            s.write_all(&answer).unwrap();
            until_closed(&mut s, Duration::from_secs(10))
        })
    };
    let w0 = spawn_worker(0, vec![(1, addr(&impostor))], &l0, Duration::from_secs(20));
    // The recorded opening, replayed to worker 0: a fresh nonce comes back, and the recorded
    // proof is not over it.
    let mut s = TcpStream::connect(addr(&l0)).unwrap();
    s.write_all(&opening[..hello_len]).unwrap();
    let mut fresh = [0u8; ANSWER];
    s.read_exact(&mut fresh).unwrap();
    assert_ne!(&fresh[8..40], &recorded_nonce[..], "the acceptor's nonce repeats");
    s.write_all(&opening[hello_len..]).unwrap();
    assert_eq!(until_closed(&mut s, Duration::from_secs(10)), Some(Vec::new()));
    // Worker 0's own proof as an acceptor, sent back to it as an opener's proof.
    let mut s = TcpStream::connect(addr(&l0)).unwrap();
    s.write_all(&hello(RUN, 1, &auth::nonce())).unwrap();
    let mut fresh = [0u8; ANSWER];
    s.read_exact(&mut fresh).unwrap();
    s.write_all(&fresh[40..]).unwrap();
    assert_eq!(until_closed(&mut s, Duration::from_secs(10)), Some(Vec::new()));
    // Worker 0, as an opener, refuses worker 1's recorded answer.
    go.send(()).unwrap();
    let e = w0.join().unwrap().unwrap_err();
    assert!(
        e.message.contains(&format!(
            "worker 1 at {} did not prove the job's secret: do all workers have the same \
             WEIR_JOB_SECRET?",
            addr(&impostor)
        )),
        "{e}"
    );
    assert_eq!(fake1.join().unwrap(), Some(Vec::new()), "worker 0 sent its proof");

    // The honest workers connect on the same listeners and exchange.
    let w0 = spawn_worker(0, vec![(1, addr(&l1))], &l0, Duration::from_secs(20));
    let w1 = spawn_worker(1, vec![(0, addr(&l0))], &l1, Duration::from_secs(20));
    exchange(w0.join().unwrap().unwrap(), w1.join().unwrap().unwrap());
}

#[test]
fn an_acceptor_of_another_version_or_without_the_secret_is_refused_by_the_opener() {
    for (answer, want) in [
        (b"WEIRXCH9".to_vec(), "answered with version \"WEIRXCH9\" of the exchange handshake"),
        ([&MAGIC[..], &[7u8; 64]].concat(), "did not prove the job's secret"),
    ] {
        let (l0, impostor) = (listener(), listener());
        let fake = {
            let impostor = impostor.try_clone().unwrap();
            std::thread::spawn(move || {
                let (mut s, _) = impostor.accept().unwrap();
                let mut hello = vec![0u8; hello(RUN, 0, &[0; 32]).len()];
                s.read_exact(&mut hello).unwrap();
                s.write_all(&answer).unwrap();
                until_closed(&mut s, Duration::from_secs(10))
            })
        };
        let started = Instant::now();
        let w0 = spawn_worker(0, vec![(1, addr(&impostor))], &l0, Duration::from_secs(30));
        let e = w0.join().unwrap().unwrap_err();
        assert!(e.message.contains(want), "{e}");
        // At once, not at the connect timeout.
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        assert_eq!(fake.join().unwrap(), Some(Vec::new()), "the opener proved itself");
    }
}

#[test]
fn a_second_connection_as_the_same_worker_is_refused() {
    // Even with the secret (a worker started twice, say): one connection per peer.
    let (l0, l1) = (listener(), listener());
    let w0 = spawn_worker(0, vec![(1, addr(&l1))], &l0, Duration::from_secs(20));
    let mut first = open_as(addr(&l0), 1, 0, &secret());
    let mut second = open_as(addr(&l0), 1, 0, &secret());
    // Worker 0 is still waiting for its own connection to worker 1 to be answered, and its
    // acceptor has both.
    std::thread::sleep(Duration::from_millis(500));
    let (_out, opener) = accept_as(&l1, 1, &secret());
    assert_eq!(opener, 0);
    let n0 = w0.join().unwrap().unwrap();
    let closed = [&mut first, &mut second].map(|s| until_closed(s, Duration::from_millis(500)));
    assert!(
        matches!(closed, [None, Some(_)] | [Some(_), None]),
        "one connection stays, one is refused: {closed:?}"
    );
    drop(n0);
}

/// An attacker's connection: when it was made, and how long it stayed open.
fn hold(to: SocketAddr, slow: bool) -> JoinHandle<(Duration, usize)> {
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(to).unwrap();
        let started = Instant::now();
        let wait = if slow { Duration::from_millis(1500) } else { Duration::from_secs(20) };
        s.set_read_timeout(Some(wait)).unwrap();
        let bytes = hello(RUN, 1, &auth::nonce());
        let mut sent = 0;
        let mut buf = [0u8; 64];
        loop {
            if slow && sent < bytes.len() {
                // A valid hello, one byte every 1.5 s: no read ever waits long.
                if s.write_all(&bytes[sent..sent + 1]).is_err() {
                    return (started.elapsed(), sent);
                }
                sent += 1;
            }
            match s.read(&mut buf) {
                Ok(0) => return (started.elapsed(), sent),
                Ok(_) => panic!("an answer before the hello was complete"),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return (started.elapsed(), sent);
                }
                Err(_) if started.elapsed() < Duration::from_secs(30) => {}
                Err(e) => panic!("still open after 30 s: {e}"),
            }
        }
    })
}

#[test]
fn slow_and_silent_clients_are_dropped_at_the_handshake_deadline() {
    let (l0, l1) = (listener(), listener());
    let w0 = spawn_worker(0, vec![(1, addr(&l1))], &l0, Duration::from_secs(30));
    let attackers: Vec<_> = [true, false, false, false].map(|slow| hold(addr(&l0), slow)).into();
    for (i, a) in attackers.into_iter().enumerate() {
        let (open, sent) = a.join().unwrap();
        // Dropped by the deadline of the whole handshake (2 s), though the slow one's reads
        // each got a byte well within any timeout per read; not before it, while worker 0 was
        // still waiting for worker 1.
        assert!(open >= Duration::from_secs(1), "attacker {i} closed after {open:?}");
        assert!(open < Duration::from_secs(5), "attacker {i} closed after {open:?}");
        assert!(sent <= 4, "attacker {i} sent {sent} bytes");
    }
    let w1 = spawn_worker(1, vec![(0, addr(&l0))], &l1, Duration::from_secs(30));
    exchange(w0.join().unwrap().unwrap(), w1.join().unwrap().unwrap());
}

#[test]
fn slow_and_silent_clients_do_not_hold_up_the_honest_workers() {
    let (l0, l1) = (listener(), listener());
    let w0 = spawn_worker(0, vec![(1, addr(&l1))], &l0, Duration::from_secs(60));
    let mut attackers = vec![hold(addr(&l0), true)];
    attackers.extend((0..8).map(|_| hold(addr(&l0), false)));
    // Let worker 0's acceptor take them all.
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let w1 = spawn_worker(1, vec![(0, addr(&l0))], &l1, Duration::from_secs(60));
    let (n0, n1) = (w0.join().unwrap().unwrap(), w1.join().unwrap().unwrap());
    // One attacker after the other, 2 s each, would take 18 s.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "connecting took {took:?}");
    for (i, a) in attackers.into_iter().enumerate() {
        let (_, sent) = a.join().unwrap();
        assert!(sent < hello(RUN, 1, &[0; 32]).len(), "attacker {i} finished its hello");
    }
    exchange(n0, n1);
}

#[test]
fn a_flood_of_connections_beyond_the_handshake_limit_does_not_keep_the_workers_apart() {
    let (l0, l1) = (listener(), listener());
    let w0 = spawn_worker(0, vec![(1, addr(&l1))], &l0, Duration::from_secs(60));
    let silent: Vec<_> = (0..MAX_HANDSHAKES + 6).map(|_| hold(addr(&l0), false)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let w1 = spawn_worker(1, vec![(0, addr(&l0))], &l1, Duration::from_secs(60));
    let (n0, n1) = (w0.join().unwrap().unwrap(), w1.join().unwrap().unwrap());
    let open: Vec<Duration> = silent.into_iter().map(|a| a.join().unwrap().0).collect();
    // Those beyond the limit were closed at once, the others at their deadline.
    let at_once = open.iter().filter(|d| **d < Duration::from_millis(1000)).count();
    assert!(at_once >= 6, "{at_once} closed at once: {open:?}");
    exchange(n0, n1);
}

#[test]
fn a_batch_that_claims_millions_of_records_fails_without_allocating_for_them() {
    let mut records = Vec::new();
    let real = vec![vec![Value::Int(1)], vec![Value::str("two")], vec![Value::Float(3.0)]];
    wire::encode_batch(&real, &mut records);
    // A count of 10 million that holds 3 records.
    let mut b = vec![0x80, 0xad, 0xe2, 0x04];
    b.extend_from_slice(&records[1..]);
    let e = wire::decode_batch(&b).unwrap_err();
    assert!(e.contains("a count of 10000000 is more than the bytes left"), "{e}");
    // An 8 MiB frame: a count of 8 million, the 3 records, a record that claims 4 million
    // fields and garbage, so that both counts fit in the bytes. (That it allocates for no
    // more than it decoded is checked in `wire`'s own tests.)
    let mut b = vec![0x80, 0xa4, 0xe8, 0x03];
    b.extend_from_slice(&records[1..]);
    b.extend_from_slice(&[0x80, 0x92, 0xf4, 0x01]);
    b.resize(8 << 20, 0xff);
    let started = Instant::now();
    let e = wire::decode_batch(&b).unwrap_err();
    assert!(e.contains("unknown value tag 255"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    // A frame header that claims the largest payload and sends 100 bytes.
    let header = Header { kind: Kind::Batch, edge: 0, from: 0, to: 1, n: wire::MAX_PAYLOAD };
    let mut frame = header.to_bytes().to_vec();
    frame.resize(frame.len() + 100, 0);
    let mut r = &frame[..];
    let mut h = [0u8; wire::HEADER_LEN];
    r.read_exact(&mut h).unwrap();
    let h = Header::decode(&h).unwrap();
    let e = wire::read_payload(&mut r, h.n).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
}

#[test]
fn a_credit_frame_of_u32_max_fails_the_connection_with_a_message() {
    // A peer with the secret that breaks the protocol: worker 1, written by hand.
    let (l0, l1) = (listener(), listener());
    let w0 = spawn_worker(0, vec![(1, addr(&l1))], &l0, Duration::from_secs(20));
    let (mut out0, _) = accept_as(&l1, 1, &secret());
    let in0 = open_as(addr(&l0), 1, 0, &secret());
    let mut n0 = w0.join().unwrap().unwrap();
    let mut outlet = n0.outlet(1, 0, 0, 1);
    let r0 = n0.start(HashMap::new(), HashMap::from([(1, 0)]));
    let started = Instant::now();
    let credit = Header { kind: Kind::Credit, edge: 0, from: 0, to: 1, n: u32::MAX };
    out0.write_all(&credit.to_bytes()).unwrap();
    // Worker 0 closes the connection at once, without handing out 4 billion credits.
    assert!(until_closed(&mut out0, Duration::from_secs(10)).is_some(), "still open");
    let e = outlet.send(0, vec![vec![Value::Int(1)]], &AtomicBool::new(false)).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert!(e.retryable, "{e:?}");
    assert!(
        e.message.contains(
            "the connection to worker 1 failed: 4294967295 credits returned on exchange 0 from \
             subtask 0 to subtask 1 for 0 batches sent"
        ),
        "{e}"
    );
    drop((outlet, in0));
    r0.finish();
}

#[test]
fn a_record_without_its_fields_from_a_peer_fails_the_job_with_a_message_not_a_panic() {
    a_bad_record_from_a_peer(
        vec![],
        r#"a record with 0 fields arrived at "counts" from "events", whose records have 3"#,
    );
}

#[test]
fn a_record_with_a_field_of_another_type_from_a_peer_fails_the_job_with_a_message() {
    // The generator's key is text: an integer there is not one of its records.
    a_bad_record_from_a_peer(
        vec![Value::Int(7), Value::Int(1), Value::Int(2)],
        r#"a record arrived at "counts" from "events" with an integer in field "key", which holds text"#,
    );
}

/// Worker 1 of a real job, written by hand and holding the secret, sends worker 0's keyed
/// count `record`; the job must fail with `expected`, without a panic.
#[test]
fn a_malformed_watermark_from_a_peer_fails_the_job_with_a_message() {
    // The idle flag with a time beside it.
    let mut payload = 7i64.to_le_bytes().to_vec();
    payload.push(1);
    let h = Header { kind: Kind::Watermark, edge: 0, from: 1, to: 0, n: payload.len() as u32 };
    let mut frame = h.to_bytes().to_vec();
    frame.extend_from_slice(&payload);
    a_bad_frame_from_a_peer(frame, "the exchange from worker 1 broke: a malformed watermark");
    // A watermark frame of another length.
    let h = Header { kind: Kind::Watermark, edge: 0, from: 1, to: 0, n: 4096 };
    a_bad_frame_from_a_peer(h.to_bytes().to_vec(), "a watermark of 4096 bytes, not 9");
}

fn a_bad_record_from_a_peer(record: Vec<Value>, expected: &str) {
    let mut payload = Vec::new();
    wire::encode_batch(&[record], &mut payload);
    let h = Header { kind: Kind::Batch, edge: 0, from: 1, to: 0, n: payload.len() as u32 };
    let mut frame = h.to_bytes().to_vec();
    frame.extend_from_slice(&payload);
    a_bad_frame_from_a_peer(frame, expected);
}

/// Worker 1, written by hand, sends `frame` to worker 0 of a word count: the job fails with
/// `expected`, not a panic.
fn a_bad_frame_from_a_peer(frame: Vec<u8>, expected: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("job.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {{name: bad-records}}\nspec:\n  parallelism: 2\n  restartStrategy: {{type: none}}\n  checkpointing: {{interval: 0s}}\n  pipeline:\n    operators:\n      - {{uid: events, type: generator, format: kv, ratePerSecond: 100}}\n      - {{uid: counts, type: count, inputs: [events], key: key}}\n      - {{uid: out, type: file_sink, inputs: [counts], path: {}}}\n",
            tmp.path().join("out").display()
        ),
    )
    .unwrap();
    let coord =
        process::start(&["coordinator", file.to_str().unwrap(), "--control-addr", "127.0.0.1:0"]);
    let control = coord.addr("control");
    let l1 = listener();
    let (_w, mut r) = process::open_control(&control, 1, &addr(&l1).to_string(), process::SECRET);
    let w0 = process::start(&[
        "worker",
        "--coordinator",
        &control,
        "--index",
        "0",
        "--state-dir",
        tmp.path().join("state").to_str().unwrap(),
        "--data-addr",
        "127.0.0.1:0",
    ]);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut r, &mut line).unwrap();
    let start: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(start["type"], "start", "{line}");
    let run = format!("{}-a0", start["runId"].as_str().unwrap());
    let to0: SocketAddr = start["dataAddrs"][0].as_str().unwrap().parse().unwrap();
    let k = JobSecret::new(process::SECRET).unwrap();
    let incoming = {
        let (run, k, l1) = (run.clone(), k.clone(), l1.try_clone().unwrap());
        std::thread::spawn(move || accept_as_in(&run, &l1, 1, &k))
    };
    let mut out = open_as_in(&run, to0, 1, 0, &k);
    let _in = incoming.join().unwrap();
    out.write_all(&frame).unwrap();
    let (code, err) = coord.finish(Duration::from_secs(60));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(expected), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let _ = w0.finish(Duration::from_secs(30));
}
