//! Heun's second-order sampling in sigma space (Karras et al. 2022, "Elucidating the Design
//! Space of Diffusion-Based Generative Models", Algorithm 1), as diffusers'
//! `HeunDiscreteScheduler`.

use diffusion_core::config::{lenient_f64, lenient_opt_f64};
use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};
use serde::{Deserialize, Serialize};

use crate::common::{
    PredictionType, SigmaSpacing, StepIndex, TimestepSchedule, TimestepSpacing,
    check_custom_timesteps, check_steps, config_struct, double_after_first, k_add_noise,
    k_init_noise_sigma, k_noise_schedule, k_pred_x0, k_scale_model_input, k_schedule,
    k_spaced_timesteps, sigma_at,
};
use crate::schedule::{BetaSchedule, check_same_shape};
use crate::scheduler::{Scheduler, StepOutput};

/// The `beta_schedule` key of `HeunDiscreteScheduler`, which also offers `exp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HeunBetaSchedule {
    /// Betas linear from `beta_start` to `beta_end`.
    #[default]
    Linear,
    /// `sqrt(beta)` linear (Stable Diffusion).
    ScaledLinear,
    /// The Improved-DDPM cosine schedule.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    /// Betas discretising `alpha_bar(t) = exp(-12 t)` (a constant beta `1 - exp(-12 / N)`).
    Exp,
    /// Not implemented by this class (an error).
    Sigmoid,
}

config_struct! {
    /// The keys of a `HeunDiscreteScheduler` `scheduler_config.json`, with diffusers' defaults.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    pub struct HeunConfig {
        /// Training timesteps.
        pub num_train_timesteps: usize = 1000,
        /// First beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_start: f64 = 0.00085,
        /// Last beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_end: f64 = 0.012,
        /// Beta schedule.
        pub beta_schedule: HeunBetaSchedule = HeunBetaSchedule::Linear,
        /// Explicit betas, overriding the schedule.
        pub trained_betas: Option<Vec<f64>> = None,
        /// What the model predicts.
        pub prediction_type: PredictionType = PredictionType::Epsilon,
        /// Karras et al. 2022 noise levels.
        pub use_karras_sigmas: bool = false,
        /// Noise levels evenly spaced in log sigma.
        pub use_exponential_sigmas: bool = false,
        /// Beta-quantile noise levels (Lee et al. 2024).
        pub use_beta_sigmas: bool = false,
        /// Clip the predicted `x0` to `[-clip_sample_range, clip_sample_range]`.
        pub clip_sample: bool = false,
        /// Clip range for `clip_sample`.
        #[serde(deserialize_with = "lenient_f64")]
        pub clip_sample_range: f64 = 1.0,
        /// How inference timesteps are placed.
        pub timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace,
        /// Added to every timestep with `leading` spacing.
        pub steps_offset: usize = 0,
        /// Smallest sigma of Karras / exponential / beta spacing (default: the smallest
        /// inference sigma). Not an argument of this class, but diffusers honours it when a
        /// loaded config carries it (e.g. one written for `EulerDiscreteScheduler`).
        #[serde(deserialize_with = "lenient_opt_f64")]
        pub sigma_min: Option<f64> = None,
        /// Largest sigma of Karras / exponential / beta spacing (default: the largest inference
        /// sigma); a hidden key like `sigma_min`.
        #[serde(deserialize_with = "lenient_opt_f64")]
        pub sigma_max: Option<f64> = None,
    }
}

/// What the first half of a Heun step leaves for the second.
#[derive(Debug, Clone)]
struct FirstOrder<T> {
    derivative: T,
    dt: f64,
    sample: T,
}

/// Heun sampler: two model evaluations per step, so [`Scheduler::timesteps`] lists every
/// timestep but the first twice.
///
/// Karras et al. 2022, Algorithm 1: `d_i = (x_i - x0(x_i, sigma_i)) / sigma_i`, the Euler
/// predictor `x' = x_i + (sigma_{i+1} - sigma_i) d_i`, then the trapezoidal corrector
/// `x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d') / 2` with
/// `d' = (x' - x0(x', sigma_{i+1})) / sigma_{i+1}`. The last step (to `sigma = 0`) is the
/// Euler predictor alone.
#[derive(Debug, Clone)]
pub struct HeunDiscreteScheduler<T> {
    config: HeunConfig,
    spacing: SigmaSpacing,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: StepIndex,
    first: Option<FirstOrder<T>>,
}

/// Betas of diffusers' `betas_for_alpha_bar(..., alpha_transform_type="exp")`.
fn exp_betas(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| (t * -12.0).exp();
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

impl<T: SchedulerTensor> HeunDiscreteScheduler<T> {
    /// Builds the sampler from its config, validating it. Like diffusers, it starts with a
    /// schedule of `num_train_timesteps` steps.
    pub fn new(config: HeunConfig) -> Result<Self> {
        let spacing = SigmaSpacing::from_flags(
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_beta_sigmas,
        )?;
        let (schedule, exp) = match config.beta_schedule {
            HeunBetaSchedule::Linear => (BetaSchedule::Linear, None),
            HeunBetaSchedule::ScaledLinear => (BetaSchedule::ScaledLinear, None),
            HeunBetaSchedule::SquaredcosCapV2 => (BetaSchedule::SquaredcosCapV2, None),
            HeunBetaSchedule::Sigmoid => (BetaSchedule::Sigmoid, None),
            HeunBetaSchedule::Exp => (
                BetaSchedule::Linear,
                Some(exp_betas(config.num_train_timesteps)),
            ),
        };
        let betas = config.trained_betas.as_deref().or(exp.as_deref());
        let noise = k_noise_schedule(
            "HeunDiscreteScheduler",
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            schedule,
            betas,
            false,
        )?;
        let mut scheduler = Self {
            spacing,
            train_sigmas: noise.sigmas(),
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            index: StepIndex::default(),
            first: None,
            config,
        };
        scheduler.set_schedule(scheduler.config.num_train_timesteps, None);
        Ok(scheduler)
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(map.deserialize("HeunDiscreteScheduler config")?)
    }

    /// The config in use.
    pub fn config(&self) -> &HeunConfig {
        &self.config
    }

    /// Whether the next `step` is the first (Euler) half of a Heun step.
    pub fn state_in_first_order(&self) -> bool {
        self.first.is_none()
    }

    fn set_schedule(&mut self, n: usize, custom: Option<Vec<f64>>) {
        let c = &self.config;
        let base = custom.unwrap_or_else(|| {
            k_spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset)
        });
        let ks = k_schedule(
            &self.train_sigmas,
            base,
            n,
            self.spacing,
            c.sigma_min,
            c.sigma_max,
            false,
        );
        // sigmas: s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0; timesteps: t0, t1, t1, ..., t_{n-1}
        self.sigmas = double_after_first(&ks.sigmas);
        self.sigmas.push(0.0);
        self.timesteps = double_after_first(&ks.timesteps);
        self.first = None;
        self.index.reset();
    }
}

impl<T: SchedulerTensor> Scheduler<T> for HeunDiscreteScheduler<T> {
    fn name(&self) -> &str {
        "HeunDiscreteScheduler"
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let n_train = self.config.num_train_timesteps;
        match schedule {
            TimestepSchedule::Steps(n) => {
                check_steps(n, n_train)?;
                self.set_schedule(n, None);
            }
            TimestepSchedule::Timesteps(t) => {
                if self.spacing != SigmaSpacing::Timesteps {
                    return Err(Error::Unsupported(
                        "custom timesteps cannot be combined with Karras, exponential or beta \
                         sigmas"
                            .into(),
                    ));
                }
                check_custom_timesteps(&t, n_train)?;
                self.set_schedule(t.len(), Some(t));
            }
            TimestepSchedule::Sigmas(_) => {
                return Err(Error::Unsupported(
                    "HeunDiscreteScheduler takes a step count or custom timesteps, not custom \
                     sigmas"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        k_init_noise_sigma(&self.sigmas, self.config.timestep_spacing)
    }

    fn scale_model_input(&mut self, sample: &T, timestep: f64) -> Result<T> {
        let i = self.index.current(timestep, &self.timesteps)?;
        let sigma = sigma_at(&self.sigmas, i)?;
        Ok(k_scale_model_input(sample, sigma))
    }

    fn step(
        &mut self,
        model_output: &T,
        timestep: f64,
        sample: &T,
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>> {
        check_same_shape(model_output, sample)?;
        let i = self.index.current(timestep, &self.timesteps)?;
        let first_order = self.first.is_none();
        let (sigma, sigma_next) = if first_order {
            (sigma_at(&self.sigmas, i)?, sigma_at(&self.sigmas, i + 1)?)
        } else {
            let prev = i.checked_sub(1).ok_or_else(|| {
                Error::InvalidState("second half of a Heun step at index 0".into())
            })?;
            (sigma_at(&self.sigmas, prev)?, sigma_at(&self.sigmas, i)?)
        };
        // x0 at the point just evaluated: sigma_i for the predictor, sigma_{i+1} after it
        let sigma_input = if first_order { sigma } else { sigma_next };
        let mut pred_x0 = k_pred_x0(
            self.config.prediction_type,
            model_output,
            sample,
            sigma_input,
        );
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            pred_x0 = pred_x0.clamp(-r, r);
        }
        let prev_sample = if first_order {
            let derivative = T::lincomb(&[(1.0 / sigma, sample), (-1.0 / sigma, &pred_x0)]);
            let dt = sigma_next - sigma;
            let prev = T::lincomb(&[(1.0, sample), (dt, &derivative)]);
            self.first = Some(FirstOrder {
                derivative,
                dt,
                sample: sample.clone(),
            });
            prev
        } else {
            let FirstOrder {
                derivative: d1,
                dt,
                sample: x,
            } = self.first.take().expect("second-order state");
            // x_{i+1} = x_i + dt (d_i + d') / 2, d' = (x' - x0') / sigma_{i+1}
            let h = 0.5 * dt / sigma_next;
            T::lincomb(&[(1.0, &x), (0.5 * dt, &d1), (h, sample), (-h, &pred_x0)])
        };
        self.index.advance();
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(pred_x0),
        })
    }

    fn add_noise(&self, original_samples: &T, noise: &T, timesteps: &[f64]) -> Result<T> {
        k_add_noise(
            original_samples,
            noise,
            timesteps,
            &self.timesteps,
            &self.sigmas,
            &self.index,
        )
    }

    fn order(&self) -> usize {
        2
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::{HostTensor, NoNoise};

    #[test]
    fn timesteps_are_interleaved() {
        let mut s = HeunDiscreteScheduler::<HostTensor>::new(HeunConfig::default()).unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(
            s.timesteps(),
            &[999.0, 666.0, 666.0, 333.0, 333.0, 0.0, 0.0]
        );
        let sig = s.sigmas().unwrap();
        assert_eq!(sig.len(), 8);
        assert_eq!(sig[1], sig[2]);
        assert_eq!(sig[7], 0.0);
    }

    #[test]
    fn exact_for_a_linear_denoiser() {
        // eps(x, sigma) = x / sigma (x0 = 0): every step maps x to x * sigma_next / sigma
        let mut s = HeunDiscreteScheduler::<HostTensor>::new(HeunConfig::default()).unwrap();
        s.set_timesteps(5).unwrap();
        let sigmas = s.sigmas().unwrap().to_vec();
        let mut x = HostTensor::new(vec![sigmas[0]], vec![1, 1]).unwrap();
        for (k, t) in s.timesteps().to_vec().into_iter().enumerate() {
            // the point evaluated at index k sits at sigmas[k] in both halves of a step
            let eps = x.scale(1.0 / sigmas[k]);
            x = s.step(&eps, t, &x, &mut NoNoise).unwrap().prev_sample;
        }
        assert!(x.data()[0].abs() < 1e-12);
    }

    #[test]
    fn exp_schedule_has_constant_betas() {
        let b = exp_betas(1000);
        assert!(b.iter().all(|v| (v - b[0]).abs() < 1e-12));
        assert!((b[0] - (1.0 - (-0.012f64).exp())).abs() < 1e-12);
        let config = HeunConfig {
            beta_schedule: HeunBetaSchedule::Sigmoid,
            ..HeunConfig::default()
        };
        assert!(HeunDiscreteScheduler::<HostTensor>::new(config).is_err());
    }
}
