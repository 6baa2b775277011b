//! `align::decode_in_flight` (the records an unaligned checkpoint stored, read back from
//! storage on restore) on arbitrary bytes: never a panic; what decodes re-encodes
//! (`align::encode_in_flight`) to bytes that decode to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_runtime::exchange::align;

fuzz_target!(|data: &[u8]| {
    let Ok(records) = align::decode_in_flight(data) else { return };
    let again = align::encode_in_flight(&records);
    assert!(again.len() <= data.len(), "{} bytes re-encode to {}", data.len(), again.len());
    let back = align::decode_in_flight(&again).expect("encoded in-flight records decode");
    assert_eq!(align::encode_in_flight(&back), again);
});
