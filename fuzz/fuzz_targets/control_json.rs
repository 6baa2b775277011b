//! The control protocol's messages (`control::ToCoordinator`, `control::ToWorker`) parsed
//! from arbitrary bytes with `serde_json::from_slice`, as `control::Reader::recv` does with
//! each line: never a panic. A message that parses serializes (as `control::Writer::send`
//! does) into JSON that parses again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_runtime::control::{ToCoordinator, ToWorker};

fn again<T: serde::Serialize + for<'de> serde::Deserialize<'de>>(m: &T) {
    let Ok(json) = serde_json::to_vec(m) else { return };
    if let Err(e) = serde_json::from_slice::<T>(&json) {
        panic!("{} does not parse again: {e}", String::from_utf8_lossy(&json));
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = serde_json::from_slice::<ToCoordinator>(data) {
        again(&m);
    }
    if let Ok(m) = serde_json::from_slice::<ToWorker>(data) {
        again(&m);
    }
});
