//! `checkpoint::Metadata::parse` on arbitrary bytes, without a secret (a savepoint of another
//! job) and with the job's secret: never a panic. Metadata that parses with the secret parses
//! without it too. Then what a restore does first with parsed metadata: each savepoint keyed
//! file's index checked (`savepoint::KeyedFile::check`) and, when it is sound, the byte
//! ranges of key groups looked up in it (`KeyedFile::byte_range`), which must then stay
//! within the file.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use weir_runtime::auth::JobSecret;
use weir_runtime::checkpoint::Metadata;

fn secret() -> &'static JobSecret {
    static S: OnceLock<JobSecret> = OnceLock::new();
    S.get_or_init(|| JobSecret::new("0123456789abcdef0123456789abcdef").expect("a secret"))
}

fn restore_lookups(m: &Metadata) {
    let _ = m.describe();
    for o in &m.operators {
        let _ = m.state_of(&o.uid, o.subtask);
        let Some(f) = &o.keyed_file else { continue };
        if f.check().is_err() {
            continue;
        }
        let (a, b) = f.key_groups;
        let len = *f.offsets.last().expect("a checked index has offsets");
        let mid = a + (b - a) / 2;
        for range in [(0, u16::MAX), (a, a), (b, b), (a, mid), (mid, b), (mid, mid), (0, a), (b, u16::MAX)]
        {
            if let Some((start, end)) = f.byte_range(range) {
                assert!(start < end && end <= len, "{range:?}: {start}..{end} of {len}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let plain = Metadata::parse(data, "fuzz/_metadata", None);
    if let Ok(m) = Metadata::parse(data, "fuzz/_metadata", Some(secret())) {
        assert_eq!(plain.as_ref().ok(), Some(&m), "parses with the secret, not without");
    }
    if let Ok(m) = &plain {
        restore_lookups(m);
    }
});
