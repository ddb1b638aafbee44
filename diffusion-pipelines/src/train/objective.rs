//! The denoising objective: training targets, per-sample loss weights and timestep sampling.
//!
//! With `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps` (DDPM eq. 4) the model is trained to
//! predict `eps` (Ho et al. 2020), `v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`
//! (Salimans & Ho 2022) or `x0` itself, with a mean squared error.

use diffusion_core::{Error, Result};
use diffusion_schedulers::{NoiseSchedule, PredictionType};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How training timesteps are drawn.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSampling {
    /// Uniform over `[0, num_train_timesteps)`.
    #[default]
    Uniform,
    /// From explicit (unnormalised, non-negative) weights, one per training timestep.
    Weights(Vec<f64>),
}

impl TimestepSampling {
    /// Draws `n` timesteps.
    pub fn sample(
        &self,
        rng: &mut impl Rng,
        num_train_timesteps: usize,
        n: usize,
    ) -> Result<Vec<usize>> {
        match self {
            TimestepSampling::Uniform => Ok((0..n)
                .map(|_| rng.random_range(0..num_train_timesteps))
                .collect()),
            TimestepSampling::Weights(w) => {
                if w.len() != num_train_timesteps {
                    return Err(Error::InvalidArgument(format!(
                        "{} timestep weights for {num_train_timesteps} training timesteps",
                        w.len()
                    )));
                }
                if w.iter().any(|x| !(x.is_finite() && *x >= 0.0)) || w.iter().sum::<f64>() <= 0.0 {
                    return Err(Error::InvalidArgument(
                        "timestep weights must be finite, non-negative and not all zero".into(),
                    ));
                }
                let total: f64 = w.iter().sum();
                let mut cdf = Vec::with_capacity(w.len());
                let mut acc = 0.0;
                for x in w {
                    acc += x / total;
                    cdf.push(acc);
                }
                Ok((0..n)
                    .map(|_| {
                        let u: f64 = rng.random();
                        cdf.partition_point(|&c| c <= u).min(w.len() - 1)
                    })
                    .collect())
            }
        }
    }
}

/// Per-sample coefficients of the training target, as `target = a * x0 + b * eps`.
pub fn target_coefficients(objective: PredictionType, alpha_bar: f64) -> (f64, f64) {
    let (a, s) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
    match objective {
        PredictionType::Epsilon => (0.0, 1.0),
        PredictionType::VPrediction => (-s, a),
        PredictionType::Sample => (1.0, 0.0),
    }
}

/// Min-SNR-gamma loss weight (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
/// Weighting Strategy", eq. 9 and its epsilon / v forms): with `snr = abar / (1 - abar)`,
/// `min(snr, gamma) / snr` for epsilon, `min(snr, gamma) / (snr + 1)` for v, and
/// `min(snr, gamma)` for x0. Without gamma every weight is 1.
pub fn loss_weight(objective: PredictionType, alpha_bar: f64, min_snr_gamma: Option<f64>) -> f64 {
    let Some(gamma) = min_snr_gamma else {
        return 1.0;
    };
    let snr = alpha_bar / (1.0 - alpha_bar).max(1e-20);
    let clipped = snr.min(gamma);
    match objective {
        PredictionType::Epsilon => clipped / snr,
        PredictionType::VPrediction => clipped / (snr + 1.0),
        PredictionType::Sample => clipped,
    }
}

/// The per-sample values a training step needs for timesteps `t`: `sqrt(abar)`,
/// `sqrt(1 - abar)`, the target coefficients and the loss weight.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCoefficients {
    /// `sqrt(abar_t)` per sample.
    pub signal: Vec<f64>,
    /// `sqrt(1 - abar_t)` per sample.
    pub noise: Vec<f64>,
    /// Target coefficient of `x0` per sample.
    pub target_x0: Vec<f64>,
    /// Target coefficient of `eps` per sample.
    pub target_eps: Vec<f64>,
    /// Loss weight per sample.
    pub weight: Vec<f64>,
}

impl StepCoefficients {
    /// Coefficients for `timesteps` under `schedule`.
    pub fn new(
        schedule: &NoiseSchedule,
        timesteps: &[usize],
        objective: PredictionType,
        min_snr_gamma: Option<f64>,
    ) -> Result<Self> {
        let mut c = StepCoefficients {
            signal: Vec::new(),
            noise: Vec::new(),
            target_x0: Vec::new(),
            target_eps: Vec::new(),
            weight: Vec::new(),
        };
        for &t in timesteps {
            let ab = *schedule.alphas_cumprod.get(t).ok_or_else(|| {
                Error::InvalidArgument(format!("timestep {t} outside the schedule"))
            })?;
            let (a, b) = target_coefficients(objective, ab);
            c.signal.push(ab.sqrt());
            c.noise.push((1.0 - ab).sqrt());
            c.target_x0.push(a);
            c.target_eps.push(b);
            c.weight.push(loss_weight(objective, ab, min_snr_gamma));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_schedulers::BetaSchedule;
    use rand::SeedableRng;

    #[test]
    fn v_target_matches_scheduler_velocity() {
        // v = sqrt(abar) eps - sqrt(1 - abar) x0
        let (a, b) = target_coefficients(PredictionType::VPrediction, 0.64);
        assert!((a + 0.6).abs() < 1e-12 && (b - 0.8).abs() < 1e-12);
    }

    #[test]
    fn min_snr_weights() {
        // snr = 0.8 / 0.2 = 4
        assert!((loss_weight(PredictionType::Epsilon, 0.8, Some(5.0)) - 1.0).abs() < 1e-12);
        assert!((loss_weight(PredictionType::Epsilon, 0.8, Some(2.0)) - 0.5).abs() < 1e-12);
        assert!((loss_weight(PredictionType::VPrediction, 0.8, Some(2.0)) - 0.4).abs() < 1e-12);
        assert!((loss_weight(PredictionType::Sample, 0.8, Some(2.0)) - 2.0).abs() < 1e-12);
        assert_eq!(loss_weight(PredictionType::Sample, 0.8, None), 1.0);
    }

    #[test]
    fn weighted_timestep_sampling_follows_weights() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut w = vec![0.0; 10];
        w[3] = 1.0;
        w[7] = 3.0;
        let ts = TimestepSampling::Weights(w)
            .sample(&mut rng, 10, 4000)
            .unwrap();
        let n7 = ts.iter().filter(|&&t| t == 7).count() as f64;
        assert!(ts.iter().all(|&t| t == 3 || t == 7));
        assert!((n7 / 4000.0 - 0.75).abs() < 0.03, "{n7}");
        assert!(
            TimestepSampling::Weights(vec![1.0; 3])
                .sample(&mut rng, 10, 1)
                .is_err()
        );
        let u = TimestepSampling::Uniform
            .sample(&mut rng, 1000, 1000)
            .unwrap();
        assert!(u.iter().all(|&t| t < 1000));
    }

    #[test]
    fn coefficients_follow_schedule() {
        let s = NoiseSchedule::new(
            1000,
            0.00085,
            0.012,
            BetaSchedule::ScaledLinear,
            None,
            false,
        )
        .unwrap();
        let c = StepCoefficients::new(&s, &[0, 999], PredictionType::Epsilon, None).unwrap();
        assert!((c.signal[0].powi(2) + c.noise[0].powi(2) - 1.0).abs() < 1e-12);
        assert!(StepCoefficients::new(&s, &[1000], PredictionType::Epsilon, None).is_err());
    }
}
