//! The control port: accepting workers' connections and their handshake.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::auth::{self, JobSecret};
use crate::control::{self, PROTOCOL, Reader, ToCoordinator, ToWorker, Writer};
use crate::error::RuntimeError;

use super::*;

/// Restarts in a row that fail while the job is restarting and are not counted as new
/// failures; the next one counts.
pub(super) const MAX_UNCOUNTED: u32 = 10;

/// Control connections whose opening is read at the same time; more are closed at once
/// (a flood of connections cannot make the coordinator run out of threads).
pub(super) const MAX_OPENING: usize = 64;

/// Accepts workers on the control listener: reads each opening on a thread of its own
/// (within [`control::HANDSHAKE_DEADLINE`]) and reports the worker, then every message it
/// sends.
pub(super) fn spawn_acceptor(
    listener: &TcpListener,
    tx: Sender<Event>,
    expected: usize,
    parallelism: u32,
    secret: JobSecret,
) -> Result<(), RuntimeError> {
    let listener = listener.try_clone().map_err(|e| RuntimeError::internal(e.to_string()))?;
    listener.set_nonblocking(false).map_err(|e| RuntimeError::internal(e.to_string()))?;
    let opening = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control-accept".into())
        .spawn(move || {
            let mut next_conn = 0u64;
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors, say: try again in a moment.
                        eprintln!("weir: coordinator: accepting a control connection: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if opening.fetch_add(1, Ordering::AcqRel) >= MAX_OPENING {
                    opening.fetch_sub(1, Ordering::AcqRel);
                    drop(stream);
                    continue;
                }
                next_conn += 1;
                let (tx, conn, secret, opening) =
                    (tx.clone(), next_conn, secret.clone(), opening.clone());
                let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                let spawned =
                    std::thread::Builder::new().name("control-conn".into()).spawn(move || {
                        let opened = hello(stream, expected, parallelism, &secret);
                        opening.fetch_sub(1, Ordering::AcqRel);
                        match opened {
                            Ok((slot, writer, mut reader, data_addr)) => {
                                if tx.send(Event::Joined { slot, conn, writer, data_addr }).is_err()
                                {
                                    return;
                                }
                                loop {
                                    let msg = reader.recv::<ToCoordinator>();
                                    let end = !matches!(msg, Ok(Some(_)));
                                    if tx.send(Event::Msg { conn, msg }).is_err() || end {
                                        return;
                                    }
                                }
                            }
                            Err(why) => eprintln!(
                                "weir: coordinator: refused a connection from {peer}: {why}"
                            ),
                        }
                    });
                if let Err(e) = spawned {
                    eprintln!("weir: coordinator: starting a thread for a control connection: {e}");
                }
            }
        })
        .map_err(|e| RuntimeError::internal(format!("starting a thread: {e}")))?;
    Ok(())
}

/// Reads a worker's opening (its hello, the challenge and its proof) and says which slot it
/// takes. Nothing about the job is sent before the worker's proof is checked.
pub(super) fn hello(
    s: TcpStream,
    expected: usize,
    parallelism: u32,
    secret: &JobSecret,
) -> Result<(usize, Arc<Writer>, Reader, String), String> {
    let deadline = Some(Instant::now() + control::HANDSHAKE_DEADLINE);
    s.set_write_timeout(Some(control::HANDSHAKE_DEADLINE)).map_err(|e| e.to_string())?;
    let writer = Arc::new(Writer::new(s.try_clone().map_err(|e| e.to_string())?));
    let mut reader = Reader::new(s, control::HELLO_LIMIT);
    let refuse = |why: String| {
        let _ = writer.send(&ToWorker::Refused { reason: why.clone() });
        writer.shutdown();
        why
    };
    let Some(ToCoordinator::Hello { protocol, index, data_addr, nonce }) =
        reader.recv_by(deadline)?
    else {
        return Err(refuse("the first message must be a hello".into()));
    };
    if protocol != PROTOCOL {
        return Err(refuse(format!(
            "protocol {protocol}; this coordinator speaks {PROTOCOL}: run the same weir version"
        )));
    }
    let Some(theirs) = auth::unhex::<{ auth::NONCE_LEN }>(&nonce) else {
        return Err(refuse("a hello without a nonce of 32 bytes in hex".into()));
    };
    let ours = auth::nonce();
    writer
        .send(&ToWorker::Challenge {
            nonce: auth::hex(&ours),
            proof: auth::hex(&control::coordinator_proof(secret, &theirs, &ours)),
        })
        .map_err(|e| e.to_string())?;
    let proven = match reader.recv_by::<ToCoordinator>(deadline)? {
        Some(ToCoordinator::Proof { proof }) => auth::unhex::<{ auth::PROOF_LEN }>(&proof)
            .is_some_and(|p| {
                let want = control::worker_proof(secret, &ours, &theirs, index, &data_addr);
                auth::same(&want, &p)
            }),
        _ => false,
    };
    if !proven {
        return Err(refuse(format!(
            "the worker did not prove the job's secret: give it the coordinator's {}",
            auth::ENV
        )));
    }
    let slot = match (index, expected) {
        (None, 1) => 0,
        (Some(i), _) if (i as usize) < expected && expected > 1 => i as usize,
        (Some(0), 1) => 0,
        (Some(i), _) => {
            return Err(refuse(format!(
                "--index {i} is not below the job's parallelism {parallelism}"
            )));
        }
        (None, _) => {
            return Err(refuse(
                "a worker without --index, but the job needs one per subtask".into(),
            ));
        }
    };
    reader.set_limit(control::MESSAGE_LIMIT);
    reader.get_ref().set_write_timeout(None).map_err(|e| e.to_string())?;
    Ok((slot, writer, reader, data_addr))
}
