//! Ancestral DPM-Solver-2 in sigma space (k-diffusion's `sample_dpm_2_ancestral`), as
//! diffusers' `KDPM2AncestralDiscreteScheduler`.

use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};

use crate::common::{
    SigmaSpacing, StepIndex, TimestepSchedule, k_add_noise, k_init_noise_sigma, k_pred_x0,
    k_scale_model_input, log_midpoint, repeat_after_first, sigma_at, sigmas_to_timesteps,
    step_count,
};
use crate::kdpm2::{interleave_midpoints, kdpm2_step_schedule, kdpm2_training_sigmas};
use crate::schedule::check_same_shape;
use crate::scheduler::{Scheduler, StepOutput};

/// The keys of a `KDPM2AncestralDiscreteScheduler` `scheduler_config.json`: the same keys
/// and defaults as `KDPM2DiscreteScheduler`'s.
pub type Kdpm2AncestralConfig = crate::kdpm2::Kdpm2Config;

const CLASS: &str = "KDPM2AncestralDiscreteScheduler";

/// Ancestral KDPM2 sampler: two model evaluations and one noise draw per step.
///
/// With `sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)`,
/// `sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)` (the ancestral split of the step's
/// variance), `sigma_mid = sqrt(sigma_i sigma_down)` (the midpoint in log sigma) and
/// `d(x, sigma) = (x - x0(x, sigma)) / sigma` (Karras et al. 2022, eq. 4):
/// `x' = x_i + (sigma_mid - sigma_i) d(x_i, sigma_i)`,
/// `x_{i+1} = x_i + (sigma_down - sigma_i) d(x', sigma_mid) + sigma_up z`. The last step
/// (to `sigma = 0`) is a single Euler step with no noise.
#[derive(Debug, Clone)]
pub struct Kdpm2AncestralDiscreteScheduler<T> {
    config: Kdpm2AncestralConfig,
    spacing: SigmaSpacing,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    sigmas_interpol: Vec<f64>,
    sigmas_up: Vec<f64>,
    sigmas_down: Vec<f64>,
    index: StepIndex,
    sample: Option<T>,
}

impl<T: SchedulerTensor> Kdpm2AncestralDiscreteScheduler<T> {
    /// Builds the sampler from its config, validating it. Like diffusers, it starts with a
    /// schedule of `num_train_timesteps` steps.
    pub fn new(config: Kdpm2AncestralConfig) -> Result<Self> {
        let (spacing, train_sigmas) = kdpm2_training_sigmas(CLASS, &config)?;
        let mut scheduler = Self {
            spacing,
            train_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            sigmas_interpol: Vec::new(),
            sigmas_up: Vec::new(),
            sigmas_down: Vec::new(),
            index: StepIndex::default(),
            sample: None,
            config,
        };
        scheduler.set_steps(scheduler.config.num_train_timesteps);
        Ok(scheduler)
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(map.deserialize(&format!("{CLASS} config"))?)
    }

    /// The config in use.
    pub fn config(&self) -> &Kdpm2AncestralConfig {
        &self.config
    }

    /// Whether the next `step` is the first half of a step.
    pub fn state_in_first_order(&self) -> bool {
        self.sample.is_none()
    }

    /// The midpoint sigmas, one per entry of [`Scheduler::sigmas`].
    pub fn sigmas_interpol(&self) -> &[f64] {
        &self.sigmas_interpol
    }

    fn set_steps(&mut self, n: usize) {
        let ks = kdpm2_step_schedule(&self.config, &self.train_sigmas, self.spacing, n);
        let sigmas = ks.sigmas;
        let m = sigmas.len();
        let next = |i: usize| if i + 1 < m { sigmas[i + 1] } else { 0.0 };
        // the last entry divides 0 by 0 (NaN), as diffusers' table does; it is never used
        let up: Vec<f64> = (0..m)
            .map(|i| {
                let (s, sn) = (sigmas[i], next(i));
                (sn * sn * (s * s - sn * sn) / (s * s)).sqrt()
            })
            .collect();
        let mut down: Vec<f64> = (0..m)
            .map(|i| (next(i) * next(i) - up[i] * up[i]).sqrt())
            .collect();
        down[m - 1] = 0.0;
        let mut interpol: Vec<f64> = (0..m).map(|i| log_midpoint(sigmas[i], down[i])).collect();
        for v in interpol.iter_mut().skip(m.saturating_sub(2)) {
            *v = 0.0;
        }
        let log_sigmas: Vec<f64> = self.train_sigmas.iter().map(|s| s.ln()).collect();
        let t_interpol = sigmas_to_timesteps(&interpol, &log_sigmas);
        // the midpoint of step k - 1 leads to timestep k: sigma_mid = sqrt(sigma_{k-1}
        // sigma_k^2 / sigma_{k-1}) is sigma_k itself in exact arithmetic; where only rounding
        // separates the two timesteps, list one value
        self.timesteps = interleave_midpoints(&ks.timesteps, |k, t| {
            let mid = t_interpol[k - 1];
            let same = (mid - t).abs() <= 1e-9 * (1.0 + t.abs());
            if same { t } else { mid }
        });
        self.sigmas = repeat_after_first(&sigmas);
        self.sigmas_interpol = repeat_after_first(&interpol);
        self.sigmas_up = repeat_after_first(&up);
        self.sigmas_down = repeat_after_first(&down);
        self.sample = None;
        self.index.reset();
    }
}

impl<T: SchedulerTensor> Scheduler<T> for Kdpm2AncestralDiscreteScheduler<T> {
    fn name(&self) -> &str {
        CLASS
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let n = step_count(CLASS, schedule, self.config.num_train_timesteps)?;
        self.set_steps(n);
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
        let sigma = if self.sample.is_none() {
            sigma_at(&self.sigmas, i)?
        } else {
            let prev = i.checked_sub(1).ok_or_else(|| {
                Error::InvalidState("second half of a KDPM2 step at index 0".into())
            })?;
            sigma_at(&self.sigmas_interpol, prev)?
        };
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
        let first_order = self.sample.is_none();
        // the first half reads this step's tables at i, the second half at i - 1
        let j = if first_order {
            i
        } else {
            i.checked_sub(1).ok_or_else(|| {
                Error::InvalidState("second half of a KDPM2 step at index 0".into())
            })?
        };
        let sigma = sigma_at(&self.sigmas, j)?;
        let sigma_mid = sigma_at(&self.sigmas_interpol, j)?;
        let sigma_up = sigma_at(&self.sigmas_up, j)?;
        let sigma_down = sigma_at(&self.sigmas_down, j)?;
        let sigma_input = if first_order { sigma } else { sigma_mid };
        let pred_x0 = k_pred_x0(
            self.config.prediction_type,
            model_output,
            sample,
            sigma_input,
        );
        let prev_sample = if first_order {
            // x' = x + (sigma_mid - sigma) (x - x0) / sigma
            let r = (sigma_mid - sigma) / sigma;
            self.sample = Some(sample.clone());
            T::lincomb(&[(1.0 + r, sample), (-r, &pred_x0)])
        } else {
            // x_{i+1} = x_i + (sigma_down - sigma) (x' - x0') / sigma_mid + sigma_up z
            let r = (sigma_down - sigma) / sigma_mid;
            let x = self.sample.take().expect("second-order state");
            let z = model_output.noise_like(noise)?;
            T::lincomb(&[(1.0, &x), (r, sample), (-r, &pred_x0), (sigma_up, &z)])
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
    use diffusion_core::{FixedNoise, HostTensor};

    #[test]
    fn noise_only_in_second_halves() {
        let mut s =
            Kdpm2AncestralDiscreteScheduler::<HostTensor>::new(Kdpm2AncestralConfig::default())
                .unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps().len(), 7);
        let mut noise = FixedNoise::new(vec![vec![0.3]; 3]);
        let mut x = HostTensor::new(vec![1.0], vec![1, 1]).unwrap();
        for t in s.timesteps().to_vec() {
            let x_in = s.scale_model_input(&x, t).unwrap();
            let eps = x_in.scale(0.5);
            x = s.step(&eps, t, &x, &mut noise).unwrap().prev_sample;
        }
        assert_eq!(noise.remaining(), 0);
        assert!(x.data()[0].is_finite());
    }
}
