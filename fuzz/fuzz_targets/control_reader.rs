//! Arbitrary bytes sent on a control connection (TCP over loopback) and read with
//! `control::Reader`, as the coordinator reads a worker (the first line limited to
//! `HELLO_LIMIT`, or to a small limit the input picks, then `MESSAGE_LIMIT`) and as a worker
//! reads the coordinator. Never a panic and never a hang: the bytes all arrive and the writer
//! closes, so every read ends, and one with a deadline never times out.
//!
//! The first input byte picks the limit (bit 7: `HELLO_LIMIT`, else `1 + (b & 0x7f) * 4`), a
//! deadline (bit 6, as the handshake reads) and which side reads (bit 5: the worker); the
//! rest is the stream.
#![no_main]
#![feature(tcp_linger)]

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use weir_runtime::control::{HELLO_LIMIT, MESSAGE_LIMIT, Reader, TOO_SLOW, ToCoordinator, ToWorker};

fn listener() -> &'static TcpListener {
    static L: OnceLock<TcpListener> = OnceLock::new();
    L.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("a loopback listener"))
}

/// Reads messages until the end of the stream or the first error; returns how many.
fn read_all<T: for<'de> serde::Deserialize<'de>>(
    r: &mut Reader,
    deadline: Option<Instant>,
) -> usize {
    let mut n = 0;
    loop {
        match r.recv_by::<T>(deadline) {
            Ok(Some(_)) => {
                n += 1;
                // After the opening, as the coordinator does.
                r.set_limit(MESSAGE_LIMIT);
            }
            Ok(None) => return n,
            Err(e) => {
                // (The whole message: a parse error may quote the input, which may say
                // anything, "took too long" too.)
                assert_ne!(e, TOO_SLOW, "a read with every byte there timed out");
                return n;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, stream)) = data.split_first() else { return };
    let limit = if ctl & 0x80 != 0 { HELLO_LIMIT } else { 1 + usize::from(ctl & 0x7f) * 4 };
    let deadline = (ctl & 0x40 != 0).then(|| Instant::now() + Duration::from_secs(5));
    let worker = ctl & 0x20 != 0;
    let l = listener();
    let mut client = TcpStream::connect(l.local_addr().unwrap()).expect("connect over loopback");
    let (server, _) = l.accept().expect("accept over loopback");
    // Closed with a reset: no TIME_WAIT, so that millions of runs do not use up the ports.
    server.set_linger(Some(Duration::ZERO)).unwrap();
    std::thread::scope(|s| {
        let writer = s.spawn(move || {
            let _ = client.write_all(stream);
            let _ = client.shutdown(Shutdown::Write);
            client
        });
        let mut r = Reader::new(server, limit);
        if worker {
            read_all::<ToWorker>(&mut r, deadline);
        } else {
            read_all::<ToCoordinator>(&mut r, deadline);
        }
        drop(r);
        drop(writer.join().expect("the writer"));
    });
});
