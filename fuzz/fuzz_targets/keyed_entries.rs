//! `savepoint::read_entries` (the entries of a byte range of a savepoint's keyed state file of
//! format 1, as a restore reads them) on arbitrary bytes: never a panic. The entries it gives
//! are slices of the input, in order, and together with their length prefixes they are no
//! longer than the input. The first byte, when odd, makes the visitor refuse the third entry
//! (a failed write of the restore), which must end the read with that error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_runtime::error::RuntimeError;
use weir_runtime::savepoint;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, bytes)) = data.split_first() else { return };
    let refuse = ctl & 1 == 1;
    let mut seen = 0usize;
    let mut used = 0usize;
    let r = savepoint::read_entries(bytes, |k, v| {
        seen += 1;
        // Each length prefix takes a byte at least.
        used += k.len() + v.len() + 2;
        assert!(used <= bytes.len(), "entries of {used} bytes in {}", bytes.len());
        if refuse && seen == 3 {
            return Err(RuntimeError::internal("refused by the fuzz target"));
        }
        Ok(())
    });
    if refuse && seen >= 3 {
        assert!(r.unwrap_err().contains("refused by the fuzz target"));
    }
});
