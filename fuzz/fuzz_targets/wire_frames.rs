//! A stream of exchange frames as a worker reads them from a peer's connection
//! (`exchange::read_batches`): a header (`wire::Header::decode`), then for a batch its payload
//! (`wire::read_payload`, which must not allocate what the header claims before the bytes
//! arrive) and `wire::decode_batch`, for a barrier `wire::decode_barrier`. Also
//! `decode_barrier` on the whole input. Whatever decodes encodes back to the same bytes.
#![no_main]

use std::io::{Cursor, Read};

use libfuzzer_sys::fuzz_target;
use weir_runtime::exchange::wire::{self, HEADER_LEN, Header, Kind};

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = wire::decode_barrier(data) {
        assert_eq!(&wire::encode_barrier(b)[..], data);
    }
    let mut r = Cursor::new(data);
    let mut h = [0u8; HEADER_LEN];
    loop {
        if r.read_exact(&mut h).is_err() {
            return;
        }
        let Ok(header) = Header::decode(&h) else { return };
        assert_eq!(header.to_bytes(), h);
        match header.kind {
            Kind::Batch => {
                assert!(header.n <= wire::MAX_PAYLOAD);
                let Ok(payload) = wire::read_payload(&mut r, header.n) else { return };
                assert_eq!(payload.len(), header.n as usize);
                if wire::decode_batch(&payload).is_err() {
                    return;
                }
            }
            Kind::Barrier => {
                let mut p = [0u8; wire::BARRIER_LEN as usize];
                if r.read_exact(&mut p).is_err() {
                    return;
                }
                let Ok(b) = wire::decode_barrier(&p) else { return };
                assert_eq!(wire::encode_barrier(b), p);
                assert!(!(b.unaligned && b.savepoint) && (!b.stop || b.savepoint));
            }
            Kind::End | Kind::Credit => {}
        }
    }
});
