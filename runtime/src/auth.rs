//! The job's secret, and the proofs that open the job's connections with it.
//!
//! Every connection of a job (a worker's control connection to the coordinator, an exchange
//! connection between two workers) opens with a challenge and a response in both
//! directions: each side sends a fresh random nonce, and each proves that it holds the job's
//! secret with an HMAC-SHA256 over a label naming its role, both nonces and what it claims
//! about itself. Neither side says anything about the job before the other has proven the
//! secret, a recorded proof is worthless for another connection (the other side's nonce is
//! new each time), and proofs are compared in constant time.
//!
//! This authenticates the peers; it does not encrypt. What crosses the connection after the
//! handshake is the job's data, and the secret never does.

use std::fmt;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::RuntimeError;

/// The environment variable that holds the job's secret for `weir coordinator` and
/// `weir worker` (in pods, from the job's Secret).
pub const ENV: &str = "WEIR_JOB_SECRET";
/// The shortest secret accepted, in bytes.
pub const MIN_LEN: usize = 32;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a proof (an HMAC-SHA256 tag).
pub const PROOF_LEN: usize = 32;

/// A nonce: fresh random bytes for one handshake.
pub type Nonce = [u8; NONCE_LEN];

/// The job's secret. Its `Debug` never shows it.
#[derive(Clone)]
pub struct JobSecret {
    key: hmac::Key,
    text: String,
    /// Given (the same for every run of the job), not made up for one run.
    stable: bool,
}

impl fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JobSecret(..)")
    }
}

impl JobSecret {
    /// A secret from its text: at least [`MIN_LEN`] bytes of it.
    pub fn new(text: &str) -> Result<Self, RuntimeError> {
        let text = text.trim();
        if text.len() < MIN_LEN {
            return Err(RuntimeError::user(format!(
                "{ENV} has {} bytes; the job's secret needs at least {MIN_LEN} (make one with `openssl rand -hex 32`)",
                text.len()
            )));
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, text.as_bytes()),
            text: text.into(),
            stable: true,
        })
    }

    /// The secret in [`ENV`]; an error naming it when it is not set.
    pub fn from_env(who: &str) -> Result<Self, RuntimeError> {
        match std::env::var(ENV) {
            Ok(t) => Self::new(&t),
            Err(_) => Err(RuntimeError::user(format!(
                "{ENV} is not set: `weir {who}` needs the job's secret, the same for the coordinator and every worker of the job (in pods the operator sets it from the job's Secret; by hand, for example `export {ENV}=$(openssl rand -hex 32)`)"
            ))),
        }
    }

    /// A new random secret (`weir run` makes one for its own workers).
    pub fn generate() -> Self {
        let text = hex(&nonce());
        Self { stable: false, ..Self::new(&text).expect("64 hex digits are long enough") }
    }

    /// The secret that signs the job's checkpoint metadata: one that later runs of the job
    /// have too (not one made up for this run).
    pub fn for_metadata(&self) -> Option<&JobSecret> {
        self.stable.then_some(self)
    }

    /// The secret as text, to hand to a worker process in [`ENV`].
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The proof over `parts` (each length-prefixed, so that no two lists of parts sign the
    /// same bytes).
    pub fn prove(&self, parts: &[&[u8]]) -> [u8; PROOF_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        for p in parts {
            ctx.update(&(p.len() as u64).to_le_bytes());
            ctx.update(p);
        }
        let tag = ctx.sign();
        let mut out = [0u8; PROOF_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `proof` is the proof over `parts`, compared in constant time.
    pub fn check(&self, parts: &[&[u8]], proof: &[u8]) -> bool {
        let mut msg = Vec::new();
        for p in parts {
            msg.extend_from_slice(&(p.len() as u64).to_le_bytes());
            msg.extend_from_slice(p);
        }
        hmac::verify(&self.key, &msg, proof).is_ok()
    }
}

/// Whether two proofs are the same, in time that does not depend on where they differ.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

/// Fresh random bytes from the system's source.
pub fn nonce() -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    SystemRandom::new().fill(&mut n).expect("the system's random source");
    n
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

/// Reads exactly `N` bytes of hex; `None` for anything else.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    unhex_bytes(s)?.try_into().ok()
}

/// Reads hex of any even length; `None` for anything else (an odd length, a sign, a
/// character that is not a hex digit).
pub fn unhex_bytes(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.chunks_exact(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_short_or_missing_secret_is_refused_naming_the_variable() {
        let e = JobSecret::new("short").unwrap_err();
        assert!(e.message.contains("WEIR_JOB_SECRET has 5 bytes"), "{e}");
        assert!(JobSecret::new(S).is_ok());
    }

    #[test]
    fn proofs_depend_on_the_secret_and_on_every_part_and_its_boundaries() {
        let a = JobSecret::new(S).unwrap();
        let b = JobSecret::new(&format!("{S}x")).unwrap();
        let p = a.prove(&[b"label", b"n1", b"n2"]);
        assert!(a.check(&[b"label", b"n1", b"n2"], &p));
        assert!(!b.check(&[b"label", b"n1", b"n2"], &p));
        assert!(!a.check(&[b"label", b"n1", b"n3"], &p));
        assert!(!a.check(&[b"labeln1", b"n2"], &p));
        assert!(!a.check(&[b"label", b"n1", b"n2"], &p[..31]));
        assert!(same(&p, &a.prove(&[b"label", b"n1", b"n2"])));
        assert!(!same(&p, &b.prove(&[b"label", b"n1", b"n2"])));
        assert!(!same(&p, &p[..31]));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let a = JobSecret::new(S).unwrap();
        assert_eq!(format!("{a:?}"), "JobSecret(..)");
    }

    #[test]
    fn hex_round_trips_and_refuses_anything_else() {
        let n = nonce();
        assert_eq!(unhex::<32>(&hex(&n)), Some(n));
        assert_ne!(nonce(), n);
        assert_eq!(unhex::<2>("0g00"), None);
        assert_eq!(unhex::<2>("000"), None);
        assert_eq!(unhex::<2>("00ff"), Some([0, 255]));
        assert_eq!(unhex_bytes("00fF10"), Some(vec![0, 255, 16]));
        assert_eq!(unhex_bytes(""), Some(vec![]));
        for bad in ["0", "+f", "0x", "é0"] {
            assert_eq!(unhex_bytes(bad), None, "{bad}");
        }
        assert!(JobSecret::generate().text().len() >= MIN_LEN);
    }
}
