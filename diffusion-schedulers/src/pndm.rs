//! PNDM: Pseudo Numerical Methods for Diffusion Models (Liu, Ren, Lin & Zhao 2022), as
//! diffusers' `PNDMScheduler`: the pseudo linear multistep method (PLMS) and, unless
//! `skip_prk_steps` is set, its pseudo Runge-Kutta (PRK) warm-up.

use std::fmt;

use diffusion_core::config::lenient_f64;
use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};
use serde::Deserialize;

use crate::common::{
    PredictionType, TimestepSchedule, TimestepSpacing, check_steps_offset, config_struct,
    spaced_timesteps, step_count,
};
use crate::schedule::{BetaSchedule, NoiseSchedule, check_not_sigmoid, check_same_shape};
use crate::scheduler::{Scheduler, StepOutput};

config_struct! {
    /// The keys of a `PNDMScheduler` `scheduler_config.json`, with diffusers' defaults.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    pub struct PndmConfig {
        /// Training timesteps.
        pub num_train_timesteps: usize = 1000,
        /// First beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_start: f64 = 0.0001,
        /// Last beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_end: f64 = 0.02,
        /// Beta schedule (`sigmoid` is not accepted by diffusers' PNDM).
        pub beta_schedule: BetaSchedule = BetaSchedule::Linear,
        /// Explicit betas, overriding the schedule.
        pub trained_betas: Option<Vec<f64>> = None,
        /// Skip the Runge-Kutta warm-up and start linear multistep right away (PLMS, as Stable
        /// Diffusion configs do).
        pub skip_prk_steps: bool = false,
        /// Use `alpha_bar = 1` after the last step (otherwise `alphas_cumprod[0]`).
        pub set_alpha_to_one: bool = false,
        /// What the model predicts (`epsilon` or `v_prediction`).
        pub prediction_type: PredictionType = PredictionType::Epsilon,
        /// How inference timesteps are placed.
        pub timestep_spacing: TimestepSpacing = TimestepSpacing::Leading,
        /// Added to every timestep with `leading` spacing.
        pub steps_offset: usize = 0,
    }
}

/// The PNDM sampler.
///
/// Every update is the transfer `phi` of Liu et al. 2022, eq. 9 (DDIM with `eta = 0`,
/// rewritten in terms of `eps`):
/// `x_{t-d} = sqrt(abar_{t-d} / abar_t) x_t - (abar_{t-d} - abar_t) eps /
///            (abar_t sqrt(1 - abar_{t-d}) + sqrt(abar_t (1 - abar_t) abar_{t-d}))`.
///
/// `eps` is a pseudo Runge-Kutta combination of four model evaluations (eq. 13; three
/// warm-up steps of four evaluations each) or a linear multistep combination of the last
/// four (eq. 12, `(55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24`, with lower orders while fewer
/// are known). [`Scheduler::timesteps`] lists every model evaluation, so timesteps repeat.
#[derive(Clone)]
pub struct PndmScheduler<T> {
    config: PndmConfig,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f64,
    num_inference_steps: Option<usize>,
    prk_timesteps: Vec<f64>,
    timesteps: Vec<f64>,
    counter: usize,
    ets: Vec<T>,
    cur_model_output: Option<T>,
    cur_sample: Option<T>,
}

impl<T> fmt::Debug for PndmScheduler<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PndmScheduler")
            .field("config", &self.config)
            .field("timesteps", &self.timesteps)
            .field("counter", &self.counter)
            .field("stored_outputs", &self.ets.len())
            .finish_non_exhaustive()
    }
}

/// Number of model evaluations in one pseudo Runge-Kutta step.
const PNDM_ORDER: usize = 4;

impl<T: SchedulerTensor> PndmScheduler<T> {
    /// Builds the sampler from its config, validating it.
    pub fn new(config: PndmConfig) -> Result<Self> {
        check_not_sigmoid(
            "PNDMScheduler",
            config.beta_schedule,
            config.trained_betas.as_deref(),
        )?;
        if config.prediction_type == PredictionType::Sample {
            return Err(Error::config(
                "prediction_type",
                "PNDMScheduler supports epsilon and v_prediction, not sample",
            ));
        }
        let schedule = NoiseSchedule::new(
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.beta_schedule,
            config.trained_betas.as_deref(),
            false,
        )?;
        let final_alpha_cumprod = schedule.final_alpha_cumprod(config.set_alpha_to_one);
        Ok(Self {
            config,
            schedule,
            final_alpha_cumprod,
            num_inference_steps: None,
            prk_timesteps: Vec::new(),
            timesteps: Vec::new(),
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        })
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(map.deserialize("PNDMScheduler config")?)
    }

    /// The config in use.
    pub fn config(&self) -> &PndmConfig {
        &self.config
    }

    /// The training noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// How many model evaluations [`Scheduler::step`] has consumed since `set_timesteps`.
    pub fn counter(&self) -> usize {
        self.counter
    }

    fn steps(&self) -> Result<usize> {
        self.num_inference_steps
            .ok_or_else(|| Error::InvalidState("call set_timesteps before step".into()))
    }

    /// The transfer `phi(x_t, eps, t, t_prev)` of eq. 9 (diffusers' `_get_prev_sample`).
    fn prev_sample(&self, sample: &T, t: f64, prev_t: f64, model_output: &T) -> Result<T> {
        let alpha_prod_t = self.schedule.alpha_bar(t)?;
        let alpha_prod_t_prev = self
            .schedule
            .alpha_bar_or(prev_t, self.final_alpha_cumprod)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let converted;
        let eps = match self.config.prediction_type {
            PredictionType::VPrediction => {
                converted = T::lincomb(&[
                    (alpha_prod_t.sqrt(), model_output),
                    (beta_prod_t.sqrt(), sample),
                ]);
                &converted
            }
            _ => model_output,
        };
        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let denom = alpha_prod_t * beta_prod_t_prev.sqrt()
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        Ok(T::lincomb(&[
            (sample_coeff, sample),
            (-(alpha_prod_t_prev - alpha_prod_t) / denom, eps),
        ]))
    }

    /// One evaluation of the pseudo Runge-Kutta warm-up (eq. 13): evaluations at `t`,
    /// `t - d/2` (twice) and `t - d` are combined with weights 1/6, 1/3, 1/3, 1/6.
    fn step_prk(&mut self, model_output: &T, timestep: f64, sample: &T) -> Result<T> {
        let n = self.steps()?;
        let half = (self.config.num_train_timesteps / n / 2) as f64;
        let diff_to_prev = if self.counter % 2 == 1 { 0.0 } else { half };
        let prev_timestep = timestep - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let add = |acc: Option<T>, c: f64| match acc {
            Some(acc) => acc.add(&model_output.scale(c)),
            None => model_output.scale(c),
        };
        let mut eps = model_output.clone();
        match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(add(self.cur_model_output.take(), 1.0 / 6.0));
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
            }
            1 | 2 => self.cur_model_output = Some(add(self.cur_model_output.take(), 1.0 / 3.0)),
            _ => eps = add(self.cur_model_output.take(), 1.0 / 6.0),
        }
        let cur_sample = self.cur_sample.as_ref().unwrap_or(sample);
        let prev = self.prev_sample(cur_sample, t, prev_timestep, &eps)?;
        self.counter += 1;
        Ok(prev)
    }

    /// One pseudo linear multistep step (eq. 12). Without the warm-up, the first step is a
    /// pseudo improved Euler (Heun) step taking two evaluations, as in diffusers.
    fn step_plms(&mut self, model_output: &T, timestep: f64, sample: &T) -> Result<T> {
        let n = self.steps()?;
        if !self.config.skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::InvalidState(
                "PLMS steps need the 12 Runge-Kutta warm-up evaluations first".into(),
            ));
        }
        let ratio = (self.config.num_train_timesteps / n) as f64;
        let (mut t, mut prev_timestep) = (timestep, timestep - ratio);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.clone());
        } else {
            prev_timestep = timestep;
            t = timestep + ratio;
        }
        let ets = &self.ets;
        let k = ets.len();
        let mut x = sample.clone();
        let eps = match (k, self.counter) {
            (1, 0) => {
                self.cur_sample = Some(sample.clone());
                model_output.clone()
            }
            (1, 1) => {
                x = self.cur_sample.take().ok_or_else(|| {
                    Error::InvalidState("PLMS lost the sample of its first step".into())
                })?;
                T::lincomb(&[(0.5, model_output), (0.5, &ets[0])])
            }
            (2, _) => T::lincomb(&[(1.5, &ets[1]), (-0.5, &ets[0])]),
            (3, _) => T::lincomb(&[
                (23.0 / 12.0, &ets[2]),
                (-16.0 / 12.0, &ets[1]),
                (5.0 / 12.0, &ets[0]),
            ]),
            (4, _) => T::lincomb(&[
                (55.0 / 24.0, &ets[3]),
                (-59.0 / 24.0, &ets[2]),
                (37.0 / 24.0, &ets[1]),
                (-9.0 / 24.0, &ets[0]),
            ]),
            _ => {
                return Err(Error::InvalidState(format!(
                    "PLMS has {k} stored outputs at evaluation {}",
                    self.counter
                )));
            }
        };
        let prev = self.prev_sample(&x, t, prev_timestep, &eps)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl<T: SchedulerTensor> Scheduler<T> for PndmScheduler<T> {
    fn name(&self) -> &str {
        "PNDMScheduler"
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let n = step_count("PNDMScheduler", schedule, self.config.num_train_timesteps)?;
        let c = &self.config;
        let n_train = c.num_train_timesteps;
        // increasing, as diffusers' `_timesteps`
        let mut base = spaced_timesteps(c.timestep_spacing, n_train, n, c.steps_offset);
        base.reverse();
        check_steps_offset(&base, n_train)?;
        let len = base.len();
        let (prk, plms): (Vec<f64>, Vec<f64>) = if c.skip_prk_steps {
            // [t_{n-1}, t_{n-2}, t_{n-2}, t_{n-3}, ..., t_0]: the first PLMS step evaluates
            // the model twice.
            let mut plms: Vec<f64> = base[..len - 1].to_vec();
            if len >= 2 {
                plms.push(base[len - 2]);
            }
            plms.push(base[len - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if len < PNDM_ORDER {
                return Err(Error::InvalidArgument(format!(
                    "PNDM's Runge-Kutta warm-up needs at least {PNDM_ORDER} steps, got {n} (set skip_prk_steps for fewer)"
                )));
            }
            let half = (n_train / n / 2) as f64;
            // the last four timesteps, each followed by its midpoint t + d/2
            let points: Vec<f64> = base[len - PNDM_ORDER..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            // drop the last midpoint, repeat every point, drop the first and last copies
            let repeated: Vec<f64> = points[..points.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let mut prk = repeated[1..repeated.len() - 1].to_vec();
            prk.reverse();
            let plms = base[..len - 3].iter().rev().copied().collect();
            (prk, plms)
        };
        self.timesteps = prk.iter().chain(&plms).copied().collect();
        self.prk_timesteps = prk;
        self.num_inference_steps = Some(n);
        self.counter = 0;
        self.ets.clear();
        self.cur_model_output = None;
        self.cur_sample = None;
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>> {
        check_same_shape(model_output, sample)?;
        let prev_sample = if self.counter < self.prk_timesteps.len() && !self.config.skip_prk_steps
        {
            self.step_prk(model_output, timestep, sample)?
        } else {
            self.step_plms(model_output, timestep, sample)?
        };
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: None,
        })
    }

    fn add_noise(&self, original_samples: &T, noise: &T, timesteps: &[f64]) -> Result<T> {
        self.schedule.add_noise(original_samples, noise, timesteps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test_util::ts;
    use diffusion_core::{HostTensor, NoNoise};

    fn scheduler(
        skip_prk_steps: bool,
        spacing: TimestepSpacing,
        offset: usize,
    ) -> PndmScheduler<HostTensor> {
        PndmScheduler::new(PndmConfig {
            skip_prk_steps,
            timestep_spacing: spacing,
            steps_offset: offset,
            ..PndmConfig::default()
        })
        .unwrap()
    }

    /// `scheduler.timesteps` printed by diffusers 0.42.1 for 10 steps.
    #[test]
    fn timesteps_match_diffusers() {
        let cases: [(bool, TimestepSpacing, usize, &[i64]); 6] = [
            (
                false,
                TimestepSpacing::Leading,
                1,
                &[
                    901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601, 601, 501, 401, 301,
                    201, 101, 1,
                ],
            ),
            (
                false,
                TimestepSpacing::Linspace,
                0,
                &[
                    999, 938, 938, 888, 888, 827, 827, 777, 777, 716, 716, 666, 666, 555, 444, 333,
                    222, 111, 0,
                ],
            ),
            (
                false,
                TimestepSpacing::Trailing,
                0,
                &[
                    999, 949, 949, 899, 899, 849, 849, 799, 799, 749, 749, 699, 699, 599, 499, 399,
                    299, 199, 99,
                ],
            ),
            (
                true,
                TimestepSpacing::Leading,
                1,
                &[901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1],
            ),
            (
                true,
                TimestepSpacing::Linspace,
                0,
                &[999, 888, 888, 777, 666, 555, 444, 333, 222, 111, 0],
            ),
            (
                true,
                TimestepSpacing::Trailing,
                0,
                &[999, 899, 899, 799, 699, 599, 499, 399, 299, 199, 99],
            ),
        ];
        for (skip, spacing, offset, expect) in cases {
            let mut s = scheduler(skip, spacing, offset);
            s.set_timesteps(10).unwrap();
            assert_eq!(s.timesteps(), &ts(expect)[..], "{skip} {spacing:?}");
        }
        let mut s = scheduler(false, TimestepSpacing::Leading, 0);
        s.set_timesteps(4).unwrap();
        assert_eq!(
            s.timesteps(),
            &ts(&[750, 625, 625, 500, 500, 375, 375, 250, 250, 125, 125, 0, 0])[..]
        );
        assert!(s.set_timesteps(3).is_err());
        let mut s = scheduler(true, TimestepSpacing::Leading, 0);
        for (n, expect) in [
            (1, &[0][..]),
            (2, &[500, 0, 0][..]),
            (3, &[666, 333, 333, 0][..]),
        ] {
            s.set_timesteps(n).unwrap();
            assert_eq!(s.timesteps(), &ts(expect)[..]);
        }
    }

    /// With a constant eps, every PRK combination and every PLMS combination is that same
    /// eps, so a run equals DDIM (eta = 0) over the same timestep pairs.
    #[test]
    fn constant_eps_reduces_to_ddim() {
        for skip in [false, true] {
            let mut s = scheduler(skip, TimestepSpacing::Leading, 1);
            s.set_timesteps(10).unwrap();
            let eps = HostTensor::new(vec![0.3, -0.1], vec![1, 2]).unwrap();
            let mut x = HostTensor::new(vec![1.0, 0.5], vec![1, 2]).unwrap();
            for t in s.timesteps().to_vec() {
                x = s.step(&eps, t, &x, &mut NoNoise).unwrap().prev_sample;
            }
            // DDIM from 901 down to 1 then to the final alpha, in one chain
            let abar = &s.schedule().alphas_cumprod;
            let mut y = [1.0, 0.5];
            let mut chain: Vec<f64> = (0..10).rev().map(|i| abar[i * 100 + 1]).collect();
            chain.push(abar[0]);
            for w in chain.windows(2) {
                let (a, ap) = (w[0], w[1]);
                for (yi, e) in y.iter_mut().zip([0.3, -0.1]) {
                    let x0 = (*yi - (1.0 - a).sqrt() * e) / a.sqrt();
                    *yi = ap.sqrt() * x0 + (1.0 - ap).sqrt() * e;
                }
            }
            for (a, b) in x.data().iter().zip(y) {
                assert!((a - b).abs() < 1e-10, "skip={skip}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn invalid_configs_are_errors() {
        let bad = PndmConfig {
            prediction_type: PredictionType::Sample,
            ..PndmConfig::default()
        };
        assert!(PndmScheduler::<HostTensor>::new(bad).is_err());
        let bad = PndmConfig {
            beta_schedule: BetaSchedule::Sigmoid,
            ..PndmConfig::default()
        };
        assert!(PndmScheduler::<HostTensor>::new(bad).is_err());
        let mut s = scheduler(true, TimestepSpacing::Leading, 0);
        let x = HostTensor::zeros(vec![1, 2]);
        assert!(s.step(&x, 999.0, &x, &mut NoNoise).is_err());
        assert!(
            s.set_timestep_schedule(TimestepSchedule::Timesteps(vec![5.0]))
                .is_err()
        );
    }
}
