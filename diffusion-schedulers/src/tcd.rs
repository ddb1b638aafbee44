//! TCD: Trajectory Consistency Distillation (Zheng, Chen, Wang, Zhang & Zhao 2024), as
//! diffusers' `TCDScheduler`: strategic stochastic sampling with stochasticity `gamma`.

use diffusion_core::config::lenient_f64;
use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};
use serde::Deserialize;

use crate::common::{PredictionType, TimestepSchedule, TimestepSpacing, index_for_timestep};
use crate::lcm::{check_strength, consistency_timesteps};
use crate::schedule::{BetaSchedule, NoiseSchedule, check_not_sigmoid, check_same_shape};
use crate::scheduler::{Scheduler, StepOutput};

/// The keys of a `TCDScheduler` `scheduler_config.json`, with diffusers' defaults.
///
/// diffusers' TCD accepts the LCM keys, but its `step` uses neither `clip_sample`,
/// `thresholding` nor `timestep_scaling`; they are kept here for compatibility only.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct TcdConfig {
    /// Training timesteps.
    pub num_train_timesteps: usize,
    /// First beta.
    #[serde(deserialize_with = "lenient_f64")]
    pub beta_start: f64,
    /// Last beta.
    #[serde(deserialize_with = "lenient_f64")]
    pub beta_end: f64,
    /// Beta schedule (`sigmoid` is not accepted by diffusers' TCD).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// Length of the distillation schedule the inference timesteps are taken from.
    pub original_inference_steps: usize,
    /// Accepted for compatibility; TCD's step does not clip.
    pub clip_sample: bool,
    /// Accepted for compatibility.
    #[serde(deserialize_with = "lenient_f64")]
    pub clip_sample_range: f64,
    /// Use `alpha_bar = 1` after the last step (otherwise `alphas_cumprod[0]`).
    pub set_alpha_to_one: bool,
    /// Accepted for compatibility; TCD's timesteps do not use it.
    pub steps_offset: usize,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Accepted for compatibility; TCD's step does not threshold.
    pub thresholding: bool,
    /// Accepted for compatibility.
    #[serde(deserialize_with = "lenient_f64")]
    pub dynamic_thresholding_ratio: f64,
    /// Accepted for compatibility.
    #[serde(deserialize_with = "lenient_f64")]
    pub sample_max_value: f64,
    /// Accepted for compatibility; TCD's timesteps do not use it.
    pub timestep_spacing: TimestepSpacing,
    /// Accepted for compatibility; TCD's step applies no boundary-condition scalings.
    #[serde(deserialize_with = "lenient_f64")]
    pub timestep_scaling: f64,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
}

impl Default for TcdConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            timestep_scaling: 10.0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// The default stochasticity `gamma` (diffusers' `step(eta=0.3)`).
pub const DEFAULT_GAMMA: f64 = 0.3;

/// The TCD sampler.
///
/// From timestep `t` with next timestep `t'`, strategic stochastic sampling (Zheng et al.
/// 2024, §4.4) first jumps deterministically to the earlier `s = floor((1 - gamma) t')`
/// along the predicted trajectory (the DDIM update, Song et al. 2021 eq. 12 with
/// `eta = 0`): `x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps`, then diffuses forward to
/// `t'`: `x_{t'} = sqrt(abar_{t'} / abar_s) x_s + sqrt(1 - abar_{t'} / abar_s) z`.
/// `gamma = 0` is deterministic; `gamma = 1` is multistep consistency sampling. The last
/// step returns `x_s` (with `t' = 0`).
#[derive(Debug, Clone)]
pub struct TcdScheduler {
    config: TcdConfig,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    custom_timesteps: bool,
    step_index: Option<usize>,
    begin_index: Option<usize>,
    gamma: f64,
}

impl TcdScheduler {
    /// Builds the sampler from its config, validating it.
    pub fn new(config: TcdConfig) -> Result<Self> {
        check_not_sigmoid(
            "TCDScheduler",
            config.beta_schedule,
            config.trained_betas.as_deref(),
        )?;
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
        let final_alpha_cumprod = schedule.final_alpha_cumprod(config.set_alpha_to_one);
        Ok(Self {
            timesteps: (0..config.num_train_timesteps)
                .rev()
                .map(|t| t as f64)
                .collect(),
            config,
            schedule,
            final_alpha_cumprod,
            num_inference_steps: None,
            custom_timesteps: false,
            step_index: None,
            begin_index: None,
            gamma: DEFAULT_GAMMA,
        })
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(map.deserialize("TCDScheduler config")?)
    }

    /// The config in use.
    pub fn config(&self) -> &TcdConfig {
        &self.config
    }

    /// The training noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The stochasticity `gamma` (diffusers' `eta`), set by [`Scheduler::set_eta`].
    pub fn gamma(&self) -> f64 {
        self.gamma
    }

    /// Whether the current timesteps were given explicitly.
    pub fn custom_timesteps(&self) -> bool {
        self.custom_timesteps
    }

    /// The index of the next step, once the first step has run.
    pub fn step_index(&self) -> Option<usize> {
        self.step_index
    }

    /// The v-prediction training target at `timesteps` (Salimans & Ho 2022, §4).
    pub fn get_velocity<T: SchedulerTensor>(
        &self,
        sample: &T,
        noise: &T,
        timesteps: &[f64],
    ) -> Result<T> {
        self.schedule.get_velocity(sample, noise, timesteps)
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
    /// Without `original_inference_steps` the distillation schedule is `k - 1, 2k - 1, ...,
    /// floor(S * strength) k - 1` with `S` the config's `original_inference_steps` and
    /// `k = num_train_timesteps // S`. When it is given, diffusers uses every training
    /// timestep `0, ..., floor(num_train_timesteps * strength) - 1` instead and the argument
    /// only bounds the step count; this is reproduced.
    pub fn set_timesteps_with(
        &mut self,
        schedule: TimestepSchedule,
        original_inference_steps: Option<usize>,
        strength: f64,
    ) -> Result<()> {
        check_strength(strength)?;
        let n_train = self.config.num_train_timesteps;
        let (origin, limit): (Vec<f64>, usize) = match original_inference_steps {
            None => {
                let original_steps = self.config.original_inference_steps;
                if original_steps > n_train {
                    return Err(Error::InvalidArgument(format!(
                        "original_inference_steps ({original_steps}) cannot exceed num_train_timesteps ({n_train})"
                    )));
                }
                let k = n_train / original_steps;
                let count = (original_steps as f64 * strength) as usize;
                (
                    (1..=count).map(|i| (i * k) as f64 - 1.0).collect(),
                    original_steps,
                )
            }
            Some(original_steps) => {
                let count = (n_train as f64 * strength) as usize;
                ((0..count).map(|t| t as f64).collect(), original_steps)
            }
        };
        let custom = matches!(schedule, TimestepSchedule::Timesteps(_));
        let (timesteps, n) =
            consistency_timesteps(schedule, &origin, limit, strength, n_train, "TCDScheduler")?;
        self.timesteps = timesteps;
        self.num_inference_steps = Some(n);
        self.custom_timesteps = custom;
        self.step_index = None;
        self.begin_index = None;
        Ok(())
    }
}

impl<T: SchedulerTensor> Scheduler<T> for TcdScheduler {
    fn name(&self) -> &str {
        "TCDScheduler"
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        self.set_timesteps_with(schedule, None, 1.0)
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
        let num_inference_steps = self
            .num_inference_steps
            .ok_or_else(|| Error::InvalidState("call set_timesteps before step".into()))?;
        check_same_shape(model_output, sample)?;
        let gamma = self.gamma;
        if !(0.0..=1.0).contains(&gamma) {
            return Err(Error::InvalidArgument(format!(
                "TCD's gamma (eta) must lie in [0, 1], got {gamma}"
            )));
        }
        let step_index = match self.step_index {
            Some(i) => i,
            None => self
                .begin_index
                .map_or_else(|| index_for_timestep(&self.timesteps, timestep), Ok)?,
        };
        // 1. the next timestep t' (0 after the last) and the intermediate s; diffusers
        //    computes (1 - gamma) * t' in float32
        let prev_timestep = self.timesteps.get(step_index + 1).copied().unwrap_or(0.0);
        let timestep_s = ((1.0 - gamma) as f32 * prev_timestep as f32).floor() as f64;
        // 2. alphas and betas
        let alpha_prod_t = self.schedule.alpha_bar(timestep)?;
        let alpha_prod_t_prev = self
            .schedule
            .alpha_bar_or(prev_timestep, self.final_alpha_cumprod)?;
        let alpha_prod_s = self.schedule.alpha_bar(timestep_s)?;
        let (a, s) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
        // 3. x0 and eps, then the deterministic jump to s
        let (pred_x0, pred_eps) = match self.config.prediction_type {
            PredictionType::Epsilon => (
                T::lincomb(&[(1.0 / a, sample), (-s / a, model_output)]),
                model_output.clone(),
            ),
            PredictionType::Sample => (
                model_output.clone(),
                T::lincomb(&[(1.0 / s, sample), (-a / s, model_output)]),
            ),
            PredictionType::VPrediction => (
                T::lincomb(&[(a, sample), (-s, model_output)]),
                T::lincomb(&[(a, model_output), (s, sample)]),
            ),
        };
        let pred_noised = T::lincomb(&[
            (alpha_prod_s.sqrt(), &pred_x0),
            ((1.0 - alpha_prod_s).sqrt(), &pred_eps),
        ]);
        // 4. diffuse forward from s to t', except on the last step or with gamma = 0
        let prev_sample = if gamma > 0.0 && step_index + 1 != num_inference_steps {
            let z = model_output.noise_like(noise)?;
            let ratio = alpha_prod_t_prev / alpha_prod_s;
            T::lincomb(&[(ratio.sqrt(), &pred_noised), ((1.0 - ratio).sqrt(), &z)])
        } else {
            pred_noised
        };
        self.step_index = Some(step_index + 1);
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(pred_x0),
        })
    }

    fn add_noise(&self, original_samples: &T, noise: &T, timesteps: &[f64]) -> Result<T> {
        self.schedule.add_noise(original_samples, noise, timesteps)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = Some(begin_index);
    }

    fn set_eta(&mut self, eta: f64) -> bool {
        self.gamma = eta;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::{FixedNoise, HostTensor, NoNoise};

    fn tcd() -> TcdScheduler {
        TcdScheduler::new(TcdConfig::default()).unwrap()
    }

    fn ts(v: &[i64]) -> Vec<f64> {
        v.iter().map(|&t| t as f64).collect()
    }

    /// `scheduler.timesteps` printed by diffusers 0.42.1.
    #[test]
    fn timesteps_match_diffusers() {
        let mut s = tcd();
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
            &ts(&[999, 666, 333])[..]
        );
        s.set_timesteps_with(TimestepSchedule::Steps(7), Some(20), 0.3)
            .unwrap();
        assert_eq!(
            Scheduler::<HostTensor>::timesteps(&s),
            &ts(&[299, 257, 214, 171, 128, 85, 42])[..]
        );
        let custom = TimestepSchedule::Timesteps(ts(&[999, 499, 259, 19]));
        s.set_timesteps_with(custom, None, 0.5).unwrap();
        assert_eq!(Scheduler::<HostTensor>::timesteps(&s), &ts(&[259, 19])[..]);
    }

    #[test]
    fn gamma_controls_noise() {
        let x = HostTensor::new(vec![0.5, -0.5], vec![1, 2]).unwrap();
        let eps = x.scale(0.1);
        // gamma = 0: deterministic, no draws at all
        let mut s = tcd();
        Scheduler::<HostTensor>::set_eta(&mut s, 0.0);
        Scheduler::<HostTensor>::set_timesteps(&mut s, 3).unwrap();
        for t in Scheduler::<HostTensor>::timesteps(&s).to_vec() {
            s.step(&eps, t, &x, &mut NoNoise).unwrap();
        }
        // default gamma 0.3: one draw per step but the last
        let mut s = tcd();
        Scheduler::<HostTensor>::set_timesteps(&mut s, 3).unwrap();
        let mut noise = FixedNoise::new(vec![vec![0.0; 2], vec![0.0; 2]]);
        for t in Scheduler::<HostTensor>::timesteps(&s).to_vec() {
            s.step(&eps, t, &x, &mut noise).unwrap();
        }
        assert_eq!(noise.remaining(), 0);
        // gamma out of range is a typed error
        Scheduler::<HostTensor>::set_eta(&mut s, 1.5);
        Scheduler::<HostTensor>::set_timesteps(&mut s, 3).unwrap();
        assert!(s.step(&eps, 999.0, &x, &mut NoNoise).is_err());
    }

    /// With gamma = 0 each step is a DDIM step from t to floor(t'), the last one to 0.
    #[test]
    fn gamma_zero_is_ddim() {
        let mut s = tcd();
        Scheduler::<HostTensor>::set_eta(&mut s, 0.0);
        Scheduler::<HostTensor>::set_timesteps(&mut s, 2).unwrap();
        let x = HostTensor::new(vec![0.5], vec![1, 1]).unwrap();
        let eps = HostTensor::new(vec![0.2], vec![1, 1]).unwrap();
        let out = s.step(&eps, 999.0, &x, &mut NoNoise).unwrap();
        let ab = &s.schedule().alphas_cumprod;
        let (a, b) = (ab[999], ab[499]);
        let x0 = (0.5 - (1.0 - a).sqrt() * 0.2) / a.sqrt();
        let expect = b.sqrt() * x0 + (1.0 - b).sqrt() * 0.2;
        assert!((out.prev_sample.data()[0] - expect).abs() < 1e-12);
    }
}
