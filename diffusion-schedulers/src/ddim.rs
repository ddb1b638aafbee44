//! DDIM: Denoising Diffusion Implicit Models (Song, Meng & Ermon 2021), as diffusers'
//! `DDIMScheduler`.

use diffusion_core::config::lenient_f64;
use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};
use serde::Deserialize;

use crate::common::{
    PredictionType, TimestepSchedule, TimestepSpacing, check_steps_offset, config_struct,
    dynamic_threshold, spaced_timesteps, step_count, vp_pred_eps, vp_pred_x0,
};
use crate::schedule::{BetaSchedule, NoiseSchedule};
use crate::scheduler::{Scheduler, StepOutput};

config_struct! {
    /// The keys of a `DDIMScheduler` `scheduler_config.json`, with diffusers' defaults.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    pub struct DdimConfig {
        /// Training timesteps.
        pub num_train_timesteps: usize = 1000,
        /// First beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_start: f64 = 0.0001,
        /// Last beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_end: f64 = 0.02,
        /// Beta schedule.
        pub beta_schedule: BetaSchedule = BetaSchedule::Linear,
        /// Explicit betas, overriding the schedule.
        pub trained_betas: Option<Vec<f64>> = None,
        /// Clip the predicted `x0` to `[-clip_sample_range, clip_sample_range]`.
        pub clip_sample: bool = true,
        /// Use `alpha_bar = 1` after the last step (otherwise `alphas_cumprod[0]`).
        pub set_alpha_to_one: bool = true,
        /// Added to every timestep with `leading` spacing.
        pub steps_offset: usize = 0,
        /// What the model predicts.
        pub prediction_type: PredictionType = PredictionType::Epsilon,
        /// Imagen-style dynamic thresholding of `x0`.
        pub thresholding: bool = false,
        /// Quantile used by dynamic thresholding.
        #[serde(deserialize_with = "lenient_f64")]
        pub dynamic_thresholding_ratio: f64 = 0.995,
        /// Clip range for `clip_sample`.
        #[serde(deserialize_with = "lenient_f64")]
        pub clip_sample_range: f64 = 1.0,
        /// Upper bound of the dynamic threshold.
        #[serde(deserialize_with = "lenient_f64")]
        pub sample_max_value: f64 = 1.0,
        /// How inference timesteps are placed.
        pub timestep_spacing: TimestepSpacing = TimestepSpacing::Leading,
        /// Rescale betas to zero terminal SNR.
        pub rescale_betas_zero_snr: bool = false,
    }
}

/// DDIM sampler. With `eta = 0` (the default) it is deterministic; `eta = 1` is DDPM-like.
///
/// Update (Song et al. 2021, eq. 12):
/// `x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - s_t^2) eps + s_t z`,
/// `s_t = eta * sqrt((1 - abar_{t-1}) / (1 - abar_t)) * sqrt(1 - abar_t / abar_{t-1})` (eq. 16).
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: DdimConfig,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    num_inference_steps: usize,
    eta: f64,
    use_clipped_model_output: bool,
}

impl DdimScheduler {
    /// Builds the sampler from its config, validating it.
    pub fn new(config: DdimConfig) -> Result<Self> {
        let schedule = NoiseSchedule::new(
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.beta_schedule,
            config.trained_betas.as_deref(),
            config.rescale_betas_zero_snr,
        )?;
        let final_alpha_cumprod = schedule.final_alpha_cumprod(config.set_alpha_to_one);
        Ok(Self {
            config,
            schedule,
            final_alpha_cumprod,
            timesteps: Vec::new(),
            num_inference_steps: 0,
            eta: 0.0,
            use_clipped_model_output: false,
        })
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(map.deserialize("DDIMScheduler config")?)
    }

    /// The config in use.
    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// The training noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Recompute the noise from the clipped `x0` (diffusers' `use_clipped_model_output`).
    pub fn set_use_clipped_model_output(&mut self, value: bool) {
        self.use_clipped_model_output = value;
    }
}

impl<T: SchedulerTensor> Scheduler<T> for DdimScheduler {
    fn name(&self) -> &str {
        "DDIMScheduler"
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let n = step_count("DDIMScheduler", schedule, self.config.num_train_timesteps)?;
        self.timesteps = spaced_timesteps(
            self.config.timestep_spacing,
            self.config.num_train_timesteps,
            n,
            self.config.steps_offset,
        );
        check_steps_offset(&self.timesteps, self.config.num_train_timesteps)?;
        self.num_inference_steps = n;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &T,
        timestep: f64,
        sample: &T,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>> {
        if self.num_inference_steps == 0 {
            return Err(Error::InvalidState("call set_timesteps before step".into()));
        }
        crate::schedule::check_same_shape(model_output, sample)?;
        let c = &self.config;
        let t = timestep.round() as i64;
        if t < 0 || t as usize >= c.num_train_timesteps {
            return Err(Error::InvalidArgument(format!(
                "timestep {timestep} out of range"
            )));
        }
        // 1. previous timestep
        let prev_t = t - (c.num_train_timesteps / self.num_inference_steps) as i64;
        // 2. alphas and betas
        let alpha_prod_t = self.schedule.alpha_bar(t as f64)?;
        let alpha_prod_t_prev = self
            .schedule
            .alpha_bar_or(prev_t as f64, self.final_alpha_cumprod)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (a, s) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        // 3. predicted x0 and eps (eq. 12, "predicted x0")
        let mut pred_x0 = vp_pred_x0(c.prediction_type, model_output, sample, a, s);
        let mut pred_eps = vp_pred_eps(c.prediction_type, model_output, sample, a, s);
        // 4. clip or threshold x0
        if c.thresholding {
            pred_x0 = dynamic_threshold(&pred_x0, c.dynamic_thresholding_ratio, c.sample_max_value);
        } else if c.clip_sample {
            pred_x0 = pred_x0.clamp(-c.clip_sample_range, c.clip_sample_range);
        }
        // 5. sigma_t(eta), eq. 16
        let variance =
            (1.0 - alpha_prod_t_prev) / beta_prod_t * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = self.eta * variance.sqrt();
        if self.use_clipped_model_output {
            pred_eps = vp_pred_eps(PredictionType::Sample, &pred_x0, sample, a, s);
        }
        // 6-7. direction pointing to x_t, and x_{t-1} (eq. 12)
        let dir = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt();
        let mut prev = T::lincomb(&[(alpha_prod_t_prev.sqrt(), &pred_x0), (dir, &pred_eps)]);
        if self.eta > 0.0 {
            let z = model_output.noise_like(noise)?;
            prev = prev.add(&z.scale(std_dev_t));
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: Some(pred_x0),
        })
    }

    fn add_noise(&self, original_samples: &T, noise: &T, timesteps: &[f64]) -> Result<T> {
        self.schedule.add_noise(original_samples, noise, timesteps)
    }

    fn set_eta(&mut self, eta: f64) -> bool {
        self.eta = eta;
        true
    }
}
