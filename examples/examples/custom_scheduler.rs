//! A sampler defined outside the library, plugged into the pipeline.
//!
//! `KarrasEuler` is the Euler method in sigma space (Karras et al. 2022, Alg. 2 without
//! churn) on the Karras noise levels; it implements `Scheduler` for any tensor type, so the
//! pipeline runs it on device tensors like a built-in sampler.
//!
//! ```text
//! cargo run --release -p diffusion-examples --example custom_scheduler -- MODEL_DIR "a prompt" out.png
//! ```

use std::ops::ControlFlow;

use burn::backend::NdArray;
use diffusion_pipelines::core::{ConfigMap, NoiseSource, Result, SchedulerTensor, SeededNoise};
use diffusion_pipelines::schedulers::common::{interp, karras_sigmas};
use diffusion_pipelines::schedulers::{
    BetaSchedule, NoiseSchedule, Scheduler, StepOutput, TimestepSchedule,
};
use diffusion_pipelines::stable_diffusion::{GenerateOptions, StableDiffusionPipeline};

/// Euler steps on Karras sigmas, with timesteps found by interpolating log-sigmas.
struct KarrasEuler {
    schedule: NoiseSchedule,
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    index: usize,
}

impl KarrasEuler {
    fn from_config(config: &ConfigMap) -> Result<Self> {
        let get = |k: &str, d: f64| config.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
        let schedule = NoiseSchedule::new(
            get("num_train_timesteps", 1000.0) as usize,
            get("beta_start", 0.00085),
            get("beta_end", 0.012),
            BetaSchedule::ScaledLinear,
            None,
            false,
        )?;
        Ok(Self {
            schedule,
            sigmas: vec![],
            timesteps: vec![],
            index: 0,
        })
    }
}

impl<T: SchedulerTensor> Scheduler<T> for KarrasEuler {
    fn name(&self) -> &str {
        "KarrasEuler"
    }

    fn num_train_timesteps(&self) -> usize {
        self.schedule.len()
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let TimestepSchedule::Steps(n) = schedule else {
            return Err(diffusion_pipelines::core::Error::Unsupported(
                "step counts only".into(),
            ));
        };
        let train = self.schedule.sigmas();
        let logs: Vec<f64> = train.iter().map(|s| s.ln()).collect();
        let ts: Vec<f64> = (0..train.len()).map(|t| t as f64).collect();
        self.sigmas = karras_sigmas(train[0], train[train.len() - 1], n);
        self.timesteps = self
            .sigmas
            .iter()
            .map(|s| interp(s.ln(), &logs, &ts))
            .collect();
        self.sigmas.push(0.0);
        self.index = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        (self.sigmas[0].powi(2) + 1.0).sqrt()
    }

    fn scale_model_input(&mut self, x: &T, _t: f64) -> Result<T> {
        Ok(x.scale(1.0 / (self.sigmas[self.index].powi(2) + 1.0).sqrt()))
    }

    fn step(
        &mut self,
        eps: &T,
        _t: f64,
        x: &T,
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>> {
        let (s, next) = (self.sigmas[self.index], self.sigmas[self.index + 1]);
        self.index += 1;
        Ok(StepOutput {
            prev_sample: T::lincomb(&[(1.0, x), (next - s, eps)]),
            pred_original_sample: Some(T::lincomb(&[(1.0, x), (-s, eps)])),
        })
    }

    fn add_noise(&self, x0: &T, noise: &T, timesteps: &[f64]) -> Result<T> {
        self.schedule.add_noise(x0, noise, timesteps)
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| "diffusion-models/tests/fixtures/sd1-tiny".into());
    let prompt = args
        .next()
        .unwrap_or_else(|| "a red circle on a blue background".into());
    let output = args.next().unwrap_or_else(|| "custom_scheduler.png".into());

    let device = Default::default();
    let mut pipe = StableDiffusionPipeline::<NdArray<f32>>::from_pretrained(&model, &device)?;
    let config = diffusion_pipelines::core::ModelDir::open(&model)?.config("scheduler")?;
    pipe.set_scheduler(Box::new(KarrasEuler::from_config(&config)?));
    let mut opts = GenerateOptions::prompt(prompt.clone());
    opts.steps = 20;
    let out = pipe.generate(&opts, &mut SeededNoise::new(0), &mut |_, _| {
        ControlFlow::Continue(())
    })?;
    out.images[0].save_png(&output, &[("prompt".into(), prompt)])?;
    println!("wrote {output} with {}", pipe.scheduler().name());
    Ok(())
}
