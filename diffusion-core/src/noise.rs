//! Host-side noise sources for stochastic samplers and pipelines.
//!
//! Noise is always drawn on the host from a seeded Rust RNG and then moved to the device,
//! so one seed gives one image on every backend.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};

/// Something that hands out standard-normal noise, one array per draw.
pub trait NoiseSource {
    /// Draws `shape.iter().product()` standard-normal values, row-major.
    fn sample(&mut self, shape: &[usize]) -> Result<Vec<f64>>;
}

/// Standard-normal noise from a seeded ChaCha20 generator: the same seed gives the same
/// values on every platform.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: ChaCha20Rng,
}

impl SeededNoise {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    /// The generator's full state, for checkpointing.
    pub fn rng(&self) -> &ChaCha20Rng {
        &self.rng
    }

    /// Mutable access to the generator, for callers that draw other random numbers from it.
    pub fn rng_mut(&mut self) -> &mut ChaCha20Rng {
        &mut self.rng
    }
}

impl NoiseSource for SeededNoise {
    fn sample(&mut self, shape: &[usize]) -> Result<Vec<f64>> {
        let n: usize = shape.iter().product();
        Ok((0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect())
    }
}

/// A fixed, pre-recorded list of noise arrays handed out in order (e.g. noise recorded
/// from a reference implementation). Running out, or a draw of the wrong size, is an error.
#[derive(Debug, Clone, Default)]
pub struct FixedNoise {
    draws: std::collections::VecDeque<Vec<f64>>,
}

impl FixedNoise {
    /// Noise that will hand out `draws` in order.
    pub fn new(draws: Vec<Vec<f64>>) -> Self {
        Self {
            draws: draws.into(),
        }
    }

    /// How many draws are left.
    pub fn remaining(&self) -> usize {
        self.draws.len()
    }
}

impl NoiseSource for FixedNoise {
    fn sample(&mut self, shape: &[usize]) -> Result<Vec<f64>> {
        let n: usize = shape.iter().product();
        let draw = self.draws.pop_front().ok_or_else(|| {
            Error::InvalidArgument("the fixed noise list ran out of draws".to_string())
        })?;
        if draw.len() != n {
            return Err(Error::Shape(format!(
                "fixed noise draw has {} values, the sampler asked for {n} ({shape:?})",
                draw.len()
            )));
        }
        Ok(draw)
    }
}

/// A noise source that refuses to draw: for deterministic runs where any draw is a bug.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNoise;

impl NoiseSource for NoNoise {
    fn sample(&mut self, shape: &[usize]) -> Result<Vec<f64>> {
        Err(Error::InvalidState(format!(
            "a noise draw of shape {shape:?} was requested from a deterministic run"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_reproducible_and_standard() {
        let a = SeededNoise::new(7).sample(&[4, 1000]).unwrap();
        let b = SeededNoise::new(7).sample(&[4, 1000]).unwrap();
        assert_eq!(a, b);
        let mean = a.iter().sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }

    #[test]
    fn fixed_noise_checks_sizes_and_count() {
        let mut n = FixedNoise::new(vec![vec![1.0, 2.0]]);
        assert!(n.sample(&[3]).is_err());
        let mut n = FixedNoise::new(vec![vec![1.0, 2.0]]);
        assert_eq!(n.sample(&[2]).unwrap(), vec![1.0, 2.0]);
        assert!(n.sample(&[2]).is_err());
        assert!(NoNoise.sample(&[1]).is_err());
    }
}
