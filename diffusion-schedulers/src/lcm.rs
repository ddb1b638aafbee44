//! LCM: Latent Consistency Models (Luo, Tan, Huang, Li & Zhao 2023), as diffusers'
//! `LCMScheduler`: multistep consistency sampling over the distillation schedule.

use diffusion_core::config::lenient_f64;
use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};
use serde::Deserialize;

use crate::common::{
    PredictionType, StepIndex, TimestepSchedule, TimestepSpacing, check_integer_timesteps,
    check_steps, config_struct, dynamic_threshold, index_for_timestep, vp_pred_x0,
};
use crate::schedule::{BetaSchedule, NoiseSchedule, check_not_sigmoid, check_same_shape};
use crate::scheduler::{Scheduler, StepOutput};

config_struct! {
    /// The keys of an `LCMScheduler` `scheduler_config.json`, with diffusers' defaults.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    pub struct LcmConfig {
        /// Training timesteps.
        pub num_train_timesteps: usize = 1000,
        /// First beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_start: f64 = 0.00085,
        /// Last beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_end: f64 = 0.012,
        /// Beta schedule (`sigmoid` is not accepted by diffusers' LCM).
        pub beta_schedule: BetaSchedule = BetaSchedule::ScaledLinear,
        /// Explicit betas, overriding the schedule.
        pub trained_betas: Option<Vec<f64>> = None,
        /// Length of the distillation schedule the inference timesteps are taken from.
        pub original_inference_steps: usize = 50,
        /// Clip the predicted `x0` to `[-clip_sample_range, clip_sample_range]`.
        pub clip_sample: bool = false,
        /// Clip range for `clip_sample`.
        #[serde(deserialize_with = "lenient_f64")]
        pub clip_sample_range: f64 = 1.0,
        /// Use `alpha_bar = 1` after the last step (otherwise `alphas_cumprod[0]`).
        pub set_alpha_to_one: bool = true,
        /// Accepted for compatibility; LCM's timesteps do not use it.
        pub steps_offset: usize = 0,
        /// What the model predicts.
        pub prediction_type: PredictionType = PredictionType::Epsilon,
        /// Imagen-style dynamic thresholding of `x0`.
        pub thresholding: bool = false,
        /// Quantile used by dynamic thresholding.
        #[serde(deserialize_with = "lenient_f64")]
        pub dynamic_thresholding_ratio: f64 = 0.995,
        /// Upper bound of the dynamic threshold.
        #[serde(deserialize_with = "lenient_f64")]
        pub sample_max_value: f64 = 1.0,
        /// Accepted for compatibility; LCM's timesteps do not use it.
        pub timestep_spacing: TimestepSpacing = TimestepSpacing::Leading,
        /// Factor applied to the timestep in the boundary-condition scalings.
        #[serde(deserialize_with = "lenient_f64")]
        pub timestep_scaling: f64 = 10.0,
        /// Rescale betas to zero terminal SNR.
        pub rescale_betas_zero_snr: bool = false,
    }
}

// ---------------------------------------------------------------------------------------
// Shared with TCD (tcd.rs), which takes the same config and timesteps.
// ---------------------------------------------------------------------------------------

/// The run state LCM and TCD share: the training schedule, the inference timesteps and the
/// position in them.
#[derive(Debug, Clone)]
pub(crate) struct ConsistencyRun {
    pub schedule: NoiseSchedule,
    pub final_alpha_cumprod: f64,
    pub timesteps: Vec<f64>,
    /// What diffusers stores as `num_inference_steps` (`None` before `set_timesteps`).
    pub num_inference_steps: Option<usize>,
    pub custom_timesteps: bool,
    pub index: StepIndex,
}

impl ConsistencyRun {
    /// Validates the schedule keys of `config` and builds the training schedule; like
    /// diffusers, the run starts with every training timestep.
    pub fn new(class: &str, config: &LcmConfig) -> Result<Self> {
        check_not_sigmoid(class, config.beta_schedule, config.trained_betas.as_deref())?;
        let schedule = NoiseSchedule::new(
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.beta_schedule,
            config.trained_betas.as_deref(),
            config.rescale_betas_zero_snr,
        )?;
        if config.original_inference_steps == 0 {
            return Err(Error::config(
                "original_inference_steps",
                "must be at least 1",
            ));
        }
        Ok(Self {
            final_alpha_cumprod: schedule.final_alpha_cumprod(config.set_alpha_to_one),
            schedule,
            timesteps: (0..config.num_train_timesteps)
                .rev()
                .map(|t| t as f64)
                .collect(),
            num_inference_steps: None,
            custom_timesteps: false,
            index: StepIndex::default(),
        })
    }

    /// Sets the inference timesteps (diffusers' `set_timesteps` of both samplers).
    ///
    /// `origin` is the distillation schedule in increasing order; `limit` is the largest
    /// accepted step count (`original_inference_steps`). Custom timesteps are cut by
    /// `strength` from the front; a step count picks evenly spaced entries
    /// (`floor(i * L / n)`) of the reversed origin schedule. `num_inference_steps` becomes
    /// the length before any `strength` cut, as in diffusers.
    pub fn set_timesteps(
        &mut self,
        class: &str,
        schedule: TimestepSchedule,
        origin: &[f64],
        limit: usize,
        strength: f64,
    ) -> Result<()> {
        let num_train_timesteps = self.schedule.len();
        let custom = matches!(schedule, TimestepSchedule::Timesteps(_));
        let (timesteps, num_inference_steps) = match schedule {
            TimestepSchedule::Timesteps(timesteps) => {
                check_integer_timesteps(&timesteps, num_train_timesteps)?;
                let n = timesteps.len();
                let init = ((n as f64 * strength) as usize).min(n);
                let t_start = n - init;
                (timesteps[t_start..].to_vec(), n)
            }
            TimestepSchedule::Steps(n) => {
                check_steps(n, num_train_timesteps)?;
                if origin.len() / n < 1 {
                    return Err(Error::InvalidArgument(format!(
                        "the distillation schedule scaled by strength {strength} has {} timesteps, fewer than num_inference_steps ({n})",
                        origin.len()
                    )));
                }
                if n > limit {
                    return Err(Error::InvalidArgument(format!(
                        "num_inference_steps ({n}) cannot exceed original_inference_steps ({limit})"
                    )));
                }
                let len = origin.len();
                let step = len as f64 / n as f64;
                let timesteps = (0..n)
                    .map(|i| origin[len - 1 - (i as f64 * step).floor() as usize])
                    .collect();
                (timesteps, n)
            }
            TimestepSchedule::Sigmas(_) => {
                return Err(Error::Unsupported(format!(
                    "{class} takes a step count or custom timesteps, not sigmas"
                )));
            }
        };
        if timesteps.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "strength {strength} leaves no timesteps to run"
            )));
        }
        if let Some(t) = timesteps
            .iter()
            .find(|&&t| !(t >= 0.0 && t < num_train_timesteps as f64))
        {
            return Err(Error::InvalidArgument(format!(
                "strength {strength} puts timestep {t} outside the {num_train_timesteps} training timesteps"
            )));
        }
        self.timesteps = timesteps;
        self.num_inference_steps = Some(num_inference_steps);
        self.custom_timesteps = custom;
        self.index.reset();
        Ok(())
    }

    /// `num_inference_steps`, or an error before `set_timesteps`.
    pub fn num_inference_steps(&self) -> Result<usize> {
        self.num_inference_steps
            .ok_or_else(|| Error::InvalidState("call set_timesteps before step".into()))
    }

    /// The index of the step at `timestep` (the begin index, else its position in the
    /// schedule, until the run has started).
    pub fn step_index(&self, timestep: f64) -> Result<usize> {
        self.index
            .peek(timestep, |t| index_for_timestep(&self.timesteps, t))
    }

    /// `alpha_bar` at timestep `t`, or `final_alpha_cumprod` for `t < 0`.
    pub fn alpha_bar_or_final(&self, t: f64) -> Result<f64> {
        self.schedule.alpha_bar_or(t, self.final_alpha_cumprod)
    }
}

/// The distillation schedule of LCM (and of TCD without an `original_inference_steps`
/// argument): `k - 1, 2k - 1, ..., floor(S * strength) k - 1` with
/// `S = original_inference_steps` and `k = num_train_timesteps // S` (LCM's skipping step).
pub(crate) fn distillation_timesteps(
    num_train_timesteps: usize,
    original_inference_steps: usize,
    strength: f64,
) -> Vec<f64> {
    let k = num_train_timesteps / original_inference_steps;
    let count = (original_inference_steps as f64 * strength) as usize;
    (1..=count).map(|i| (i * k) as f64 - 1.0).collect()
}

/// Checks a `strength` argument (the fraction of the schedule an image-to-image run keeps).
pub(crate) fn check_strength(strength: f64) -> Result<()> {
    if !(strength.is_finite() && strength > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "strength must be a positive number, got {strength}"
        )));
    }
    Ok(())
}

const CLASS: &str = "LCMScheduler";

/// The LCM sampler.
///
/// Each step forms the consistency function `f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t)`
/// with the boundary-condition scalings of Consistency Models (Song et al. 2023, §3 and
/// Appendix C; `sigma_data = 0.5`, timestep scaled by `timestep_scaling`):
/// `c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2)`, `c_out = s t / sqrt((s t)^2 + sigma_data^2)`,
/// then re-noises the result to the next timestep, `x_{t'} = sqrt(abar_{t'}) f + sqrt(1 -
/// abar_{t'}) z`, as in multistep consistency sampling (Song et al. 2023, Algorithm 1).
/// The final step returns `f` itself.
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    config: LcmConfig,
    run: ConsistencyRun,
}

impl LcmScheduler {
    /// Builds the sampler from its config, validating it.
    pub fn new(config: LcmConfig) -> Result<Self> {
        Ok(Self {
            run: ConsistencyRun::new(CLASS, &config)?,
            config,
        })
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(map.deserialize("LCMScheduler config")?)
    }

    /// The config in use.
    pub fn config(&self) -> &LcmConfig {
        &self.config
    }

    /// The training noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.run.schedule
    }

    /// Whether the current timesteps were given explicitly.
    pub fn custom_timesteps(&self) -> bool {
        self.run.custom_timesteps
    }

    /// The index of the next step, once the first step has run.
    pub fn step_index(&self) -> Option<usize> {
        self.run.index.step
    }

    /// The v-prediction training target at `timesteps` (Salimans & Ho 2022, §4).
    pub fn get_velocity<T: SchedulerTensor>(
        &self,
        sample: &T,
        noise: &T,
        timesteps: &[f64],
    ) -> Result<T> {
        self.run.schedule.get_velocity(sample, noise, timesteps)
    }

    /// `set_timesteps(n)` of an image-to-image run: the distillation schedule is shortened
    /// to its first `original_inference_steps * strength` entries before `n` are picked.
    pub fn set_timesteps_with_strength(
        &mut self,
        num_inference_steps: usize,
        strength: f64,
    ) -> Result<()> {
        self.set_timesteps_with(TimestepSchedule::Steps(num_inference_steps), None, strength)
    }

    /// diffusers' full `set_timesteps(num_inference_steps | timesteps,
    /// original_inference_steps, strength)`.
    ///
    /// The distillation schedule is `distillation_timesteps` of `original_inference_steps`
    /// (the argument, else the config's).
    pub fn set_timesteps_with(
        &mut self,
        schedule: TimestepSchedule,
        original_inference_steps: Option<usize>,
        strength: f64,
    ) -> Result<()> {
        check_strength(strength)?;
        let n_train = self.config.num_train_timesteps;
        let original_steps =
            original_inference_steps.unwrap_or(self.config.original_inference_steps);
        if original_steps == 0 || original_steps > n_train {
            return Err(Error::InvalidArgument(format!(
                "original_inference_steps ({original_steps}) must lie in [1, {n_train}]"
            )));
        }
        let origin = distillation_timesteps(n_train, original_steps, strength);
        self.run
            .set_timesteps(CLASS, schedule, &origin, original_steps, strength)
    }

    /// The boundary-condition scalings `(c_skip, c_out)` at timestep `t`.
    pub fn scalings_for_boundary_condition(&self, t: f64) -> (f64, f64) {
        let sigma_data: f64 = 0.5;
        let scaled = t * self.config.timestep_scaling;
        let denom = scaled * scaled + sigma_data * sigma_data;
        (sigma_data * sigma_data / denom, scaled / denom.sqrt())
    }
}

impl<T: SchedulerTensor> Scheduler<T> for LcmScheduler {
    fn name(&self) -> &str {
        CLASS
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        self.set_timesteps_with(schedule, None, 1.0)
    }

    fn timesteps(&self) -> &[f64] {
        &self.run.timesteps
    }

    fn step(
        &mut self,
        model_output: &T,
        timestep: f64,
        sample: &T,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>> {
        let num_inference_steps = self.run.num_inference_steps()?;
        check_same_shape(model_output, sample)?;
        let step_index = self.run.step_index(timestep)?;
        let c = &self.config;
        // 1. the next timestep (the current one again after the last)
        let prev_timestep = self
            .run
            .timesteps
            .get(step_index + 1)
            .copied()
            .unwrap_or(timestep);
        // 2. alphas and betas
        let alpha_prod_t = self.run.schedule.alpha_bar(timestep)?;
        let alpha_prod_t_prev = self.run.alpha_bar_or_final(prev_timestep)?;
        let (a, s) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
        // 3. boundary-condition scalings
        let (c_skip, c_out) = self.scalings_for_boundary_condition(timestep.round());
        // 4. predicted x0
        let mut pred_x0 = vp_pred_x0(c.prediction_type, model_output, sample, a, s);
        // 5. clip or threshold x0
        if c.thresholding {
            pred_x0 = dynamic_threshold(&pred_x0, c.dynamic_thresholding_ratio, c.sample_max_value);
        } else if c.clip_sample {
            pred_x0 = pred_x0.clamp(-c.clip_sample_range, c.clip_sample_range);
        }
        // 6. the consistency function f(x_t, t)
        let denoised = T::lincomb(&[(c_out, &pred_x0), (c_skip, sample)]);
        // 7. re-noise to the next timestep, except on the last step
        let prev_sample = if step_index + 1 != num_inference_steps {
            let z = model_output.noise_like(noise)?;
            T::lincomb(&[
                (alpha_prod_t_prev.sqrt(), &denoised),
                ((1.0 - alpha_prod_t_prev).sqrt(), &z),
            ])
        } else {
            denoised.clone()
        };
        self.run.index.step = Some(step_index + 1);
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(denoised),
        })
    }

    fn add_noise(&self, original_samples: &T, noise: &T, timesteps: &[f64]) -> Result<T> {
        self.run
            .schedule
            .add_noise(original_samples, noise, timesteps)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.run.index.begin = Some(begin_index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test_util::ts;
    use diffusion_core::{FixedNoise, HostTensor, NoNoise};

    fn lcm() -> LcmScheduler {
        LcmScheduler::new(LcmConfig::default()).unwrap()
    }

    /// `scheduler.timesteps` printed by diffusers 0.42.1.
    #[test]
    fn timesteps_match_diffusers() {
        let mut s = lcm();
        Scheduler::<HostTensor>::set_timesteps(&mut s, 4).unwrap();
        assert_eq!(
            Scheduler::<HostTensor>::timesteps(&s),
            &ts(&[999, 759, 499, 259])[..]
        );
        s.set_timesteps_with_strength(4, 0.5).unwrap();
        assert_eq!(
            Scheduler::<HostTensor>::timesteps(&s),
            &ts(&[499, 379, 259, 139])[..]
        );
        s.set_timesteps_with(TimestepSchedule::Steps(3), Some(20), 1.0)
            .unwrap();
        assert_eq!(
            Scheduler::<HostTensor>::timesteps(&s),
            &ts(&[999, 699, 349])[..]
        );
        let custom = TimestepSchedule::Timesteps(ts(&[999, 499, 259, 19]));
        s.set_timesteps_with(custom, None, 0.5).unwrap();
        assert_eq!(Scheduler::<HostTensor>::timesteps(&s), &ts(&[259, 19])[..]);
        assert!(Scheduler::<HostTensor>::set_timesteps(&mut s, 51).is_err());
        assert!(s.set_timesteps_with_strength(30, 0.5).is_err());
        assert!(s.set_timesteps_with_strength(4, 0.0).is_err());
    }

    #[test]
    fn noise_is_drawn_on_every_step_but_the_last() {
        let mut s = lcm();
        Scheduler::<HostTensor>::set_timesteps(&mut s, 2).unwrap();
        let x = HostTensor::new(vec![0.5, -0.5], vec![1, 2]).unwrap();
        let eps = x.scale(0.1);
        let mut noise = FixedNoise::new(vec![vec![1.0, 1.0]]);
        let t = Scheduler::<HostTensor>::timesteps(&s).to_vec();
        let out = s.step(&eps, t[0], &x, &mut noise).unwrap();
        assert_eq!(noise.remaining(), 0);
        let last = s.step(&eps, t[1], &out.prev_sample, &mut NoNoise).unwrap();
        assert_eq!(Some(last.prev_sample), last.pred_original_sample);
    }

    #[test]
    fn boundary_condition_at_zero_is_identity() {
        let s = lcm();
        assert_eq!(s.scalings_for_boundary_condition(0.0), (1.0, 0.0));
        let (c_skip, c_out) = s.scalings_for_boundary_condition(999.0);
        assert!(c_skip < 1e-7 && (c_out - 1.0).abs() < 1e-7);
    }
}
