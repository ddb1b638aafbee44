//! Beta schedules, `alphas_cumprod` and the closed-form forward process.
//!
//! All tables are `f64`. Formulas follow diffusers' `scheduling_*` modules; references:
//! linear betas — Ho et al. 2020 (DDPM) §4; scaled_linear — the Stable Diffusion
//! (LDM) schedule, linear in `sqrt(beta)`; squaredcos_cap_v2 — Nichol & Dhariwal 2021
//! ("Improved DDPM") eq. 17; zero terminal SNR — Lin et al. 2023, Algorithm 1.

use diffusion_core::{Error, Result, SchedulerTensor};
use serde::{Deserialize, Serialize};

/// The `beta_schedule` key of a scheduler config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Betas linear from `beta_start` to `beta_end` (DDPM).
    #[default]
    Linear,
    /// `sqrt(beta)` linear from `sqrt(beta_start)` to `sqrt(beta_end)` (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule of Improved DDPM, betas capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    /// `sigmoid(linspace(-6, 6))` rescaled into `[beta_start, beta_end]` (DDPM only in diffusers).
    Sigmoid,
}

/// `numpy.linspace(start, end, n)`: `n` evenly spaced values, both ends included.
pub fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
            v[n - 1] = end;
            v
        }
    }
}

/// Betas of the Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17):
/// `beta_i = min(1 - abar((i+1)/N) / abar(i/N), max_beta)` with
/// `abar(t) = cos((t + 0.008) / 1.008 * pi/2)^2`. Computed in floating point throughout
/// (a peer port used integer division here and got all-zero betas).
pub fn betas_for_alpha_bar(num_diffusion_timesteps: usize, max_beta: f64) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    let n = num_diffusion_timesteps as f64;
    (0..num_diffusion_timesteps)
        .map(|i| {
            let t1 = i as f64 / n;
            let t2 = (i + 1) as f64 / n;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta)
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules
/// and Sample Steps are Flawed", Algorithm 1): shift and scale `sqrt(alphas_cumprod)` so the
/// last value is exactly 0 and the first is unchanged.
pub fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    let mut sqrt_bar: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc.sqrt()
        })
        .collect();
    let first = sqrt_bar[0];
    let last = *sqrt_bar.last().expect("non-empty betas");
    for v in &mut sqrt_bar {
        *v = (*v - last) * first / (first - last);
    }
    let bar: Vec<f64> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// The training noise schedule: `betas`, `alphas = 1 - betas` and their cumulative product.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    /// Per-step noise variances `beta_t`.
    pub betas: Vec<f64>,
    /// `alpha_t = 1 - beta_t`.
    pub alphas: Vec<f64>,
    /// `alpha_bar_t = prod_{s<=t} alpha_s`.
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// Builds the schedule from the usual config keys, validating them.
    ///
    /// `trained_betas`, when given, overrides the named schedule (as in diffusers).
    pub fn new(
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
        schedule: BetaSchedule,
        trained_betas: Option<&[f64]>,
        rescale_betas_zero_snr: bool,
    ) -> Result<Self> {
        if num_train_timesteps < 2 {
            return Err(Error::config(
                "num_train_timesteps",
                format!("must be at least 2, got {num_train_timesteps}"),
            ));
        }
        let betas = if let Some(tb) = trained_betas {
            if tb.len() != num_train_timesteps {
                return Err(Error::config(
                    "trained_betas",
                    format!(
                        "has {} values but num_train_timesteps is {num_train_timesteps}",
                        tb.len()
                    ),
                ));
            }
            tb.to_vec()
        } else {
            if schedule != BetaSchedule::SquaredcosCapV2 {
                if !(beta_start.is_finite() && beta_end.is_finite())
                    || beta_start <= 0.0
                    || beta_end >= 1.0
                {
                    return Err(Error::config(
                        "beta_start/beta_end",
                        format!("must lie in (0, 1), got {beta_start} and {beta_end}"),
                    ));
                }
                if beta_end < beta_start {
                    return Err(Error::config(
                        "beta_end",
                        format!("{beta_end} is smaller than beta_start {beta_start}"),
                    ));
                }
            }
            match schedule {
                BetaSchedule::Linear => linspace(beta_start, beta_end, num_train_timesteps),
                BetaSchedule::ScaledLinear => {
                    linspace(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(num_train_timesteps, 0.999),
                BetaSchedule::Sigmoid => linspace(-6.0, 6.0, num_train_timesteps)
                    .into_iter()
                    .map(|x| 1.0 / (1.0 + (-x).exp()) * (beta_end - beta_start) + beta_start)
                    .collect(),
            }
        };
        if let Some((i, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(b.is_finite() && **b >= 0.0 && **b <= 1.0))
        {
            return Err(Error::config(
                "betas",
                format!("beta[{i}] = {b} is outside [0, 1]"),
            ));
        }
        let betas = if rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        Ok(Self::from_betas(betas))
    }

    /// The schedule of explicit betas (not validated).
    pub fn from_betas(betas: Vec<f64>) -> Self {
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let mut acc = 1.0;
        let alphas_cumprod = alphas
            .iter()
            .map(|a| {
                acc *= a;
                acc
            })
            .collect();
        Self {
            betas,
            alphas,
            alphas_cumprod,
        }
    }

    /// Number of training timesteps.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// Whether the schedule is empty (never true for a validated schedule).
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// `alpha_bar` at integer training timestep `t` (rounded from `f64`).
    pub fn alpha_bar(&self, t: f64) -> Result<f64> {
        let i = self.index(t)?;
        Ok(self.alphas_cumprod[i])
    }

    fn index(&self, t: f64) -> Result<usize> {
        let i = t.round();
        if !(i >= 0.0 && (i as usize) < self.len()) {
            return Err(Error::InvalidArgument(format!(
                "timestep {t} is outside [0, {})",
                self.len()
            )));
        }
        Ok(i as usize)
    }

    /// `alpha_bar` at `t`, or `past_end` for a `t` below 0 (the step after the last), as
    /// diffusers' `alphas_cumprod[t] if t >= 0 else final_alpha_cumprod`.
    pub fn alpha_bar_or(&self, t: f64, past_end: f64) -> Result<f64> {
        if t >= 0.0 {
            self.alpha_bar(t)
        } else {
            Ok(past_end)
        }
    }

    /// diffusers' `final_alpha_cumprod`, the `alpha_bar` after the last step: 1 with
    /// `set_alpha_to_one`, else `alphas_cumprod[0]`.
    pub fn final_alpha_cumprod(&self, set_alpha_to_one: bool) -> f64 {
        if set_alpha_to_one {
            1.0
        } else {
            self.alphas_cumprod[0]
        }
    }

    /// Karras-style noise levels `sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`.
    pub fn sigmas(&self) -> Vec<f64> {
        sigmas_from_alphas_cumprod(&self.alphas_cumprod)
    }

    fn per_batch_alpha_bar<T: SchedulerTensor>(
        &self,
        x: &T,
        timesteps: &[f64],
        f: impl Fn(f64) -> f64,
    ) -> Result<Vec<f64>> {
        let values = timesteps
            .iter()
            .map(|&t| self.alpha_bar(t).map(&f))
            .collect::<Result<Vec<_>>>()?;
        per_batch(values, batch_size(x))
    }

    /// The closed-form forward process `q(x_t | x_0)` (DDPM eq. 4):
    /// `x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise`, one timestep per batch
    /// element (or one for the whole batch).
    pub fn add_noise<T: SchedulerTensor>(
        &self,
        original_samples: &T,
        noise: &T,
        timesteps: &[f64],
    ) -> Result<T> {
        check_same_shape(original_samples, noise)?;
        let a = self.per_batch_alpha_bar(original_samples, timesteps, f64::sqrt)?;
        let s = self.per_batch_alpha_bar(original_samples, timesteps, |ab| (1.0 - ab).sqrt())?;
        Ok(original_samples.scale_batch(&a).add(&noise.scale_batch(&s)))
    }

    /// The v-prediction target (Salimans & Ho 2022, §4):
    /// `v = sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * x_0`.
    pub fn get_velocity<T: SchedulerTensor>(
        &self,
        sample: &T,
        noise: &T,
        timesteps: &[f64],
    ) -> Result<T> {
        check_same_shape(sample, noise)?;
        let a = self.per_batch_alpha_bar(sample, timesteps, f64::sqrt)?;
        let s = self.per_batch_alpha_bar(sample, timesteps, |ab| (1.0 - ab).sqrt())?;
        Ok(noise.scale_batch(&a).sub(&sample.scale_batch(&s)))
    }
}

/// Errors for `beta_schedule = "sigmoid"` without `trained_betas`: diffusers implements the
/// sigmoid schedule in `DDPMScheduler` only, and the other classes raise
/// `NotImplementedError` for it.
pub fn check_not_sigmoid(
    class: &str,
    beta_schedule: BetaSchedule,
    trained_betas: Option<&[f64]>,
) -> Result<()> {
    if trained_betas.is_none() && beta_schedule == BetaSchedule::Sigmoid {
        return Err(Error::config(
            "beta_schedule",
            format!("`sigmoid` is not implemented for {class}"),
        ));
    }
    Ok(())
}

/// Karras-style noise levels `sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)` of an
/// `alphas_cumprod` table.
pub fn sigmas_from_alphas_cumprod(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// The batch size of `x`: its first dimension (1 for a scalar).
pub fn batch_size<T: SchedulerTensor>(x: &T) -> usize {
    x.shape().first().copied().unwrap_or(1)
}

/// One value per batch element from `values` given either per element or once for the
/// whole batch, as `add_noise` takes its timesteps.
pub fn per_batch<V: Copy>(values: Vec<V>, batch: usize) -> Result<Vec<V>> {
    match values.len() {
        n if n == batch => Ok(values),
        1 => Ok(vec![values[0]; batch]),
        n => Err(Error::Shape(format!(
            "{n} timesteps for a batch of {batch} (give one per batch element, or one for all)"
        ))),
    }
}

/// Errors unless `a` and `b` have the same shape.
pub fn check_same_shape<T: SchedulerTensor>(a: &T, b: &T) -> Result<()> {
    let (sa, sb) = (a.shape(), b.shape());
    if sa != sb {
        return Err(Error::Shape(format!("{sa:?} vs {sb:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_is_not_all_zero() {
        let s = NoiseSchedule::new(
            1000,
            0.0001,
            0.02,
            BetaSchedule::SquaredcosCapV2,
            None,
            false,
        )
        .unwrap();
        assert!(s.betas.iter().all(|b| *b > 0.0));
        assert!((s.betas[999] - 0.999).abs() < 1e-12);
    }

    #[test]
    fn zero_snr_ends_at_zero() {
        let s = NoiseSchedule::new(1000, 0.00085, 0.012, BetaSchedule::ScaledLinear, None, true)
            .unwrap();
        assert!(s.alphas_cumprod[999].abs() < 1e-15);
        let plain = NoiseSchedule::new(
            1000,
            0.00085,
            0.012,
            BetaSchedule::ScaledLinear,
            None,
            false,
        )
        .unwrap();
        assert!((s.alphas_cumprod[0] - plain.alphas_cumprod[0]).abs() < 1e-12);
    }

    #[test]
    fn invalid_configs_are_errors() {
        assert!(NoiseSchedule::new(1000, 0.02, 0.0001, BetaSchedule::Linear, None, false).is_err());
        assert!(NoiseSchedule::new(0, 0.0001, 0.02, BetaSchedule::Linear, None, false).is_err());
        assert!(
            NoiseSchedule::new(3, 0.0001, 0.02, BetaSchedule::Linear, Some(&[0.1]), false).is_err()
        );
    }
}
