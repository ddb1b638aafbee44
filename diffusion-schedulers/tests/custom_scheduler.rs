//! A sampler written outside the crate, as a user would, through the public `Scheduler`
//! trait. It is k-diffusion's Euler method (Karras et al. 2022, Algorithm 2 with no churn)
//! and must agree with the crate's own `EulerDiscreteScheduler`.

use diffusion_core::{ConfigMap, HostTensor, NoNoise, NoiseSource, Result, SchedulerTensor};
use diffusion_schedulers::common::{interp, linspace};
use diffusion_schedulers::{
    BetaSchedule, NoiseSchedule, Scheduler, StepOutput, TimestepSchedule, registry,
};

/// Euler in sigma space: `x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * eps(x_i)`.
struct MyEuler {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: usize,
}

impl MyEuler {
    fn new() -> Result<Self> {
        let schedule = NoiseSchedule::new(
            1000,
            0.00085,
            0.012,
            BetaSchedule::ScaledLinear,
            None,
            false,
        )?;
        Ok(Self {
            schedule,
            timesteps: vec![],
            sigmas: vec![],
            index: 0,
        })
    }
}

impl<T: SchedulerTensor> Scheduler<T> for MyEuler {
    fn name(&self) -> &str {
        "MyEuler"
    }

    fn num_train_timesteps(&self) -> usize {
        self.schedule.len()
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let TimestepSchedule::Steps(n) = schedule else {
            return Err(diffusion_core::Error::Unsupported("steps only".into()));
        };
        let train_sigmas = self.schedule.sigmas();
        let train_t: Vec<f64> = (0..train_sigmas.len()).map(|t| t as f64).collect();
        self.timesteps = linspace(0.0, (self.schedule.len() - 1) as f64, n)
            .into_iter()
            .rev()
            .collect();
        self.sigmas = self
            .timesteps
            .iter()
            .map(|&t| interp(t, &train_t, &train_sigmas))
            .collect();
        self.sigmas.push(0.0);
        self.index = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        // diffusers: sigma_max for linspace / trailing spacing, sqrt(sigma_max^2 + 1) for leading
        self.sigmas[0]
    }

    fn scale_model_input(&mut self, sample: &T, _t: f64) -> Result<T> {
        Ok(sample.scale(1.0 / (self.sigmas[self.index].powi(2) + 1.0).sqrt()))
    }

    fn step(
        &mut self,
        eps: &T,
        _t: f64,
        x: &T,
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>> {
        let (sigma, next) = (self.sigmas[self.index], self.sigmas[self.index + 1]);
        self.index += 1;
        let x0 = T::lincomb(&[(1.0, x), (-sigma, eps)]);
        Ok(StepOutput {
            prev_sample: T::lincomb(&[(1.0, x), (next - sigma, eps)]),
            pred_original_sample: Some(x0),
        })
    }

    fn add_noise(&self, x0: &T, noise: &T, timesteps: &[f64]) -> Result<T> {
        let s: Vec<f64> = timesteps
            .iter()
            .map(|&t| self.schedule.sigmas()[t as usize])
            .collect();
        Ok(x0.add(&noise.scale_batch(&s)))
    }
}

fn run(s: &mut dyn Scheduler<HostTensor>, steps: usize) -> Vec<f64> {
    s.set_timesteps(steps).unwrap();
    let mut x = HostTensor::new(
        (0..8).map(|i| (i as f64 * 0.7).sin()).collect(),
        vec![1, 2, 2, 2],
    )
    .unwrap()
    .scale(s.init_noise_sigma());
    for t in s.timesteps().to_vec() {
        let x_in = s.scale_model_input(&x, t).unwrap();
        let eps = x_in.map(|v| 0.8 * v * (t / 1000.0).cos() + 0.1 * v.sin());
        x = s.step(&eps, t, &x, &mut NoNoise).unwrap().prev_sample;
    }
    x.into_data()
}

#[test]
fn custom_sampler_matches_builtin_euler() {
    let mut config = ConfigMap::new();
    config.set("beta_schedule", "scaled_linear");
    config.set("beta_start", 0.00085);
    config.set("beta_end", 0.012);
    let mut builtin = registry::from_config::<HostTensor>("euler", &config).unwrap();
    let mut mine: Box<dyn Scheduler<HostTensor>> = Box::new(MyEuler::new().unwrap());
    for steps in [1, 7, 30] {
        let a = run(mine.as_mut(), steps);
        let b = run(builtin.as_mut(), steps);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-12, "{steps} steps: {x} vs {y}");
        }
    }
}
