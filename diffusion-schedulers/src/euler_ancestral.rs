//! Ancestral Euler sampling in sigma space (k-diffusion's `sample_euler_ancestral`, after
//! Karras et al. 2022 and Song et al. 2021's ancestral sampling), as diffusers'
//! `EulerAncestralDiscreteScheduler`.

use diffusion_core::config::lenient_f64;
use diffusion_core::{ConfigMap, NoiseSource, Result, SchedulerTensor};
use serde::Deserialize;

use crate::common::{
    PredictionType, StepIndex, TimestepSchedule, TimestepSpacing, check_not_sample_prediction,
    config_struct, finite_terminal_alphas_cumprod, k_add_noise, k_init_noise_sigma,
    k_noise_schedule, k_pred_x0, k_scale_model_input, k_spaced_timesteps, sigma_at,
    sigmas_at_timesteps, step_count,
};
use crate::euler::full_schedule;
use crate::schedule::{BetaSchedule, check_same_shape, sigmas_from_alphas_cumprod};
use crate::scheduler::{Scheduler, StepOutput};

config_struct! {
    /// The keys of an `EulerAncestralDiscreteScheduler` `scheduler_config.json`, with
    /// diffusers' defaults.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    pub struct EulerAncestralConfig {
        /// Training timesteps.
        pub num_train_timesteps: usize = 1000,
        /// First beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_start: f64 = 0.0001,
        /// Last beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_end: f64 = 0.02,
        /// Beta schedule (`sigmoid` is not implemented by this class).
        pub beta_schedule: BetaSchedule = BetaSchedule::Linear,
        /// Explicit betas, overriding the schedule.
        pub trained_betas: Option<Vec<f64>> = None,
        /// What the model predicts (`sample` is not implemented by this class).
        pub prediction_type: PredictionType = PredictionType::Epsilon,
        /// How inference timesteps are placed.
        pub timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace,
        /// Added to every timestep with `leading` spacing.
        pub steps_offset: usize = 0,
        /// Rescale betas to zero terminal SNR (the last `alphas_cumprod` is then set to
        /// `2^-24`, as diffusers does).
        pub rescale_betas_zero_snr: bool = false,
    }
}

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// Ancestral Euler sampler: one noise draw per step.
///
/// From `sigma_i` to `sigma_{i+1}` the step splits the target variance into a
/// deterministic part and fresh noise: `sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 -
/// sigma_{i+1}^2) / sigma_i^2)`, `sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)`; then an
/// Euler step of the probability-flow ODE (Karras et al. 2022, eq. 4) to `sigma_down`,
/// `x' = x + (sigma_down - sigma_i) (x - x0) / sigma_i`, and `x_{i+1} = x' + sigma_up z`.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    config: EulerAncestralConfig,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: StepIndex,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the sampler from its config, validating it.
    pub fn new(config: EulerAncestralConfig) -> Result<Self> {
        check_not_sample_prediction(CLASS, config.prediction_type)?;
        let alphas_cumprod = k_noise_schedule(
            CLASS,
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.beta_schedule,
            config.trained_betas.as_deref(),
            config.rescale_betas_zero_snr,
        )?
        .alphas_cumprod;
        let alphas_cumprod =
            finite_terminal_alphas_cumprod(alphas_cumprod, config.rescale_betas_zero_snr);
        let train_sigmas = sigmas_from_alphas_cumprod(&alphas_cumprod);
        let (timesteps, sigmas) = full_schedule(&train_sigmas);
        Ok(Self {
            config,
            train_sigmas,
            timesteps,
            sigmas,
            index: StepIndex::default(),
        })
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(map.deserialize(&format!("{CLASS} config"))?)
    }

    /// The config in use.
    pub fn config(&self) -> &EulerAncestralConfig {
        &self.config
    }
}

impl<T: SchedulerTensor> Scheduler<T> for EulerAncestralDiscreteScheduler {
    fn name(&self) -> &str {
        CLASS
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let n = step_count(CLASS, schedule, self.config.num_train_timesteps)?;
        let c = &self.config;
        self.timesteps =
            k_spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset);
        self.sigmas = sigmas_at_timesteps(&self.train_sigmas, &self.timesteps);
        self.sigmas.push(0.0);
        self.index.reset();
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
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>> {
        check_same_shape(model_output, sample)?;
        let i = self.index.current(timestep, &self.timesteps)?;
        let sigma = sigma_at(&self.sigmas, i)?;
        let sigma_to = sigma_at(&self.sigmas, i + 1)?;
        let pred_x0 = k_pred_x0(self.config.prediction_type, model_output, sample, sigma);
        let sigma_up =
            (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        // Euler step to sigma_down, then fresh noise of standard deviation sigma_up
        let ratio = (sigma_down - sigma) / sigma;
        let z = model_output.noise_like(noise)?;
        let prev_sample = T::lincomb(&[(1.0 + ratio, sample), (-ratio, &pred_x0), (sigma_up, &z)]);
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

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::{Error, FixedNoise, HostTensor};

    #[test]
    fn one_noise_draw_per_step() {
        let mut s = EulerAncestralDiscreteScheduler::new(EulerAncestralConfig::default()).unwrap();
        Scheduler::<HostTensor>::set_timesteps(&mut s, 3).unwrap();
        let mut noise = FixedNoise::new(vec![vec![0.5, -0.5]; 3]);
        let mut x = HostTensor::new(vec![1.0, 2.0], vec![1, 2]).unwrap();
        for t in Scheduler::<HostTensor>::timesteps(&s).to_vec() {
            let eps = x.scale(0.1);
            x = s.step(&eps, t, &x, &mut noise).unwrap().prev_sample;
        }
        assert_eq!(noise.remaining(), 0);
        // the last step lands on sigma = 0 exactly: x = x0, no noise
        assert!(x.data().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn sample_prediction_is_unsupported() {
        let config = EulerAncestralConfig {
            prediction_type: PredictionType::Sample,
            ..EulerAncestralConfig::default()
        };
        assert!(matches!(
            EulerAncestralDiscreteScheduler::new(config),
            Err(Error::Unsupported(_))
        ));
    }
}
