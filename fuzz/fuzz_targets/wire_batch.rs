//! `wire::decode_batch` on arbitrary bytes: never a panic, and what decodes re-encodes to
//! bytes that decode to the same (checked on the encoding: a NaN never equals itself).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_runtime::exchange::wire;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = wire::decode_batch(data) else { return };
    let mut again = Vec::new();
    wire::encode_batch(&batch, &mut again);
    // The encoding is canonical, the input need not be (a varint may have extra zero groups):
    // it is never longer.
    assert!(again.len() <= data.len(), "{} bytes re-encode to {}", data.len(), again.len());
    let back = wire::decode_batch(&again).expect("an encoded batch decodes");
    let mut third = Vec::new();
    wire::encode_batch(&back, &mut third);
    assert_eq!(again, third);
});
