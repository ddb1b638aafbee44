//! TCD: Trajectory Consistency Distillation (Zheng, Chen, Wang, Zhang & Zhao 2024), as
//! diffusers' `TCDScheduler`: strategic stochastic sampling with stochasticity `gamma`.

use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};

use crate::common::{TimestepSchedule, vp_pred_eps, vp_pred_x0};
use crate::lcm::{ConsistencyRun, check_strength, distillation_timesteps};
use crate::schedule::{NoiseSchedule, check_same_shape};
use crate::scheduler::{Scheduler, StepOutput};

/// The keys of a `TCDScheduler` `scheduler_config.json`: the same keys and defaults as
/// `LCMScheduler`'s.
///
/// TCD's step uses neither `clip_sample` / `clip_sample_range`, `thresholding` /
/// `dynamic_thresholding_ratio` / `sample_max_value` nor `timestep_scaling` (it applies no
/// boundary-condition scalings); diffusers accepts them for compatibility, and so does this
/// crate.
pub type TcdConfig = crate::lcm::LcmConfig;

/// The default stochasticity `gamma` (diffusers' `step(eta=0.3)`).
pub const DEFAULT_GAMMA: f64 = 0.3;

const CLASS: &str = "TCDScheduler";

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
    run: ConsistencyRun,
    gamma: f64,
}

impl TcdScheduler {
    /// Builds the sampler from its config, validating it.
    pub fn new(config: TcdConfig) -> Result<Self> {
        Ok(Self {
            run: ConsistencyRun::new(CLASS, &config)?,
            config,
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
        &self.run.schedule
    }

    /// The stochasticity `gamma` (diffusers' `eta`), set by [`Scheduler::set_eta`].
    pub fn gamma(&self) -> f64 {
        self.gamma
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
    /// Without `original_inference_steps` the distillation schedule is LCM's
    /// (`distillation_timesteps` of the config's `original_inference_steps`). When it is
    /// given, diffusers uses every training timestep `0, ..., floor(num_train_timesteps *
    /// strength) - 1` instead and the argument only bounds the step count; this is
    /// reproduced.
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
                (
                    distillation_timesteps(n_train, original_steps, strength),
                    original_steps,
                )
            }
            Some(original_steps) => {
                let count = (n_train as f64 * strength) as usize;
                ((0..count).map(|t| t as f64).collect(), original_steps)
            }
        };
        self.run
            .set_timesteps(CLASS, schedule, &origin, limit, strength)
    }
}

impl<T: SchedulerTensor> Scheduler<T> for TcdScheduler {
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
        let gamma = self.gamma;
        if !(0.0..=1.0).contains(&gamma) {
            return Err(Error::InvalidArgument(format!(
                "TCD's gamma (eta) must lie in [0, 1], got {gamma}"
            )));
        }
        let step_index = self.run.step_index(timestep)?;
        // 1. the next timestep t' (0 after the last) and the intermediate s; diffusers
        //    computes (1 - gamma) * t' in float32
        let prev_timestep = self
            .run
            .timesteps
            .get(step_index + 1)
            .copied()
            .unwrap_or(0.0);
        let timestep_s = ((1.0 - gamma) as f32 * prev_timestep as f32).floor() as f64;
        // 2. alphas and betas
        let alpha_prod_t = self.run.schedule.alpha_bar(timestep)?;
        let alpha_prod_t_prev = self.run.alpha_bar_or_final(prev_timestep)?;
        let alpha_prod_s = self.run.schedule.alpha_bar(timestep_s)?;
        let (a, s) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
        // 3. x0 and eps, then the deterministic jump to s
        let prediction_type = self.config.prediction_type;
        let pred_x0 = vp_pred_x0(prediction_type, model_output, sample, a, s);
        let pred_eps = vp_pred_eps(prediction_type, model_output, sample, a, s);
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
        self.run.index.step = Some(step_index + 1);
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(pred_x0),
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

    fn set_eta(&mut self, eta: f64) -> bool {
        self.gamma = eta;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test_util::ts;
    use diffusion_core::{FixedNoise, HostTensor, NoNoise};

    fn tcd() -> TcdScheduler {
        TcdScheduler::new(TcdConfig::default()).unwrap()
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
