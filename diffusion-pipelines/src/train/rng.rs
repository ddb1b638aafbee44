//! Saving and restoring the exact state of the trainers' ChaCha generators, so a resumed run
//! draws the same timesteps, noise, dropout decisions and data order as an uninterrupted one.
//!
//! A ChaCha generator is fully described by its 32-byte key (the seed), its stream number
//! and its position in the key stream (in 32-bit words): [`RngState`] stores those three
//! (as hex / decimal strings, so JSON keeps all 128 bits of the position).

use diffusion_core::{Error, Result};
use rand::SeedableRng;
use rand_chacha::{ChaCha8Rng, ChaCha20Rng};
use serde::{Deserialize, Serialize};

/// The complete state of a ChaCha generator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte key, as 64 lowercase hex digits.
    pub seed: String,
    /// The stream number.
    pub stream: u64,
    /// The position in the key stream, in 32-bit words (decimal; up to 2^68).
    pub word_pos: String,
}

macro_rules! chacha_state {
    ($rng:ty, $capture:ident, $restore:ident) => {
        /// Captures the state of the generator.
        pub fn $capture(rng: &$rng) -> RngState {
            RngState {
                seed: hex(&rng.get_seed()),
                stream: rng.get_stream(),
                word_pos: rng.get_word_pos().to_string(),
            }
        }

        /// Rebuilds a generator at exactly the captured state.
        pub fn $restore(state: &RngState) -> Result<$rng> {
            let seed = unhex(&state.seed)?;
            let pos: u128 = state.word_pos.parse().map_err(|_| {
                Error::InvalidArgument(format!(
                    "RNG word position `{}` is not a number",
                    state.word_pos
                ))
            })?;
            let mut rng = <$rng>::from_seed(seed);
            rng.set_stream(state.stream);
            rng.set_word_pos(pos);
            Ok(rng)
        }
    };
}

chacha_state!(ChaCha8Rng, capture_chacha8, restore_chacha8);
chacha_state!(ChaCha20Rng, capture_chacha20, restore_chacha20);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Result<[u8; 32]> {
    let bad = || Error::InvalidArgument(format!("RNG seed `{text}` is not 64 hex digits"));
    if text.len() != 64 || !text.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use rand_distr::{Distribution, StandardNormal};

    #[test]
    fn restored_generators_continue_the_same_stream() {
        let mut a = ChaCha20Rng::seed_from_u64(5);
        // An odd number of normal draws leaves the generator inside a block.
        for _ in 0..7 {
            let _: f64 = StandardNormal.sample(&mut a);
        }
        let state = capture_chacha20(&a);
        let json = serde_json::to_string(&state).unwrap();
        let mut b = restore_chacha20(&serde_json::from_str(&json).unwrap()).unwrap();
        for _ in 0..100 {
            let x: f64 = StandardNormal.sample(&mut a);
            let y: f64 = StandardNormal.sample(&mut b);
            assert_eq!(x.to_bits(), y.to_bits());
        }
        let mut c = ChaCha8Rng::seed_from_u64(9);
        let _: u32 = c.random();
        let mut d = restore_chacha8(&capture_chacha8(&c)).unwrap();
        assert_eq!(c.random::<u64>(), d.random::<u64>());
    }

    #[test]
    fn malformed_states_are_errors() {
        let mut s = capture_chacha8(&ChaCha8Rng::seed_from_u64(1));
        s.seed.pop();
        assert!(restore_chacha8(&s).is_err());
        let mut s = capture_chacha8(&ChaCha8Rng::seed_from_u64(1));
        s.word_pos = "x".into();
        assert!(restore_chacha8(&s).is_err());
    }
}
