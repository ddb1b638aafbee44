//! Trace runner: drives any registered sampler through a fixed toy sampling loop and
//! records every intermediate sample.
//!
//! The same loop is run with diffusers by `scripts/scheduler_reference.py`, which writes
//! the trajectories to `diffusion-schedulers/tests/fixtures/`; the parity tests feed
//! those cases through [`run_trace`] and compare. The `scheduler-trace` program of
//! `diffusion-examples` exposes the runner on the command line (one [`TraceCase`] as JSON on
//! stdin, the [`TraceOutput`] as JSON on stdout).
//!
//! # The loop
//!
//! ```text
//! scheduler = registry::from_config(case.class, case.config)
//! scheduler.set_eta(case.eta)                        (if given)
//! scheduler.set_timestep_schedule(steps | timesteps | sigmas)
//! x = case.sample * init_noise_sigma
//! for t in timesteps:
//!     x_in = scale_model_input(x, t)
//!     model_output = 0.8 * x_in * cos(t / 1000) + 0.1 * sin(x_in)      (elementwise)
//!     x = step(model_output, t, x, noise).prev_sample
//! ```
//!
//! The toy denoiser ([`toy_model_output`]) is smooth and depends on `t`, so every
//! coefficient of a sampler's update shows up in the trajectory. When the config asks for a
//! learned variance (`"variance_type": "learned"` or `"learned_range"`, as DDPM and the
//! DPM-Solvers accept), the model output carries twice the sample's channels, the second
//! half being `0.25 * (1 + tanh(x_in))`: the output is `concat([toy(x_in), 0.25 * (1 +
//! tanh(x_in))], dim = 1)`. The reference script builds the same. The extra half lies in
//! `(0, 0.5)`, so it is a valid variance for `learned` (diffusers takes its square root)
//! and a valid interpolation weight for `learned_range`.
//!
//! Noise comes from the case's recorded draws ([`FixedNoise`], so a stochastic sampler
//! replays diffusers' noise exactly; draws left over are fine, running out is an error) or,
//! when the case records none, from [`SeededNoise`] with seed 0.

use diffusion_core::config::lenient_opt_f64;
use diffusion_core::{
    ConfigMap, Error, FixedNoise, HostTensor, NoiseSource, Result, SchedulerTensor, SeededNoise,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::common::TimestepSchedule;
use crate::registry;

/// One sampling run to trace: the sampler, its config, the schedule and the initial latent.
///
/// Deserialised from JSON; keys it does not know (such as a fixture's `name` and
/// `expected`) are ignored, so a fixture case can be fed to [`run_trace`] as it is. Parse
/// with [`TraceCase::from_json_str`], which accepts Python's `NaN` / `Infinity` /
/// `-Infinity` tokens (e.g. `"lambda_min_clipped": -Infinity` in a DPM-Solver config).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TraceCase {
    /// A diffusers class name (`"DDIMScheduler"`) or a registry short name (`"ddim"`).
    pub class: String,
    /// The keys of a `scheduler_config.json`; bookkeeping keys such as `_class_name` and
    /// `_diffusers_version` and keys the sampler does not know are ignored.
    #[serde(default)]
    pub config: Map<String, Value>,
    /// Number of inference steps. Give exactly one of this, `timesteps` and `sigmas`.
    #[serde(default)]
    pub num_inference_steps: Option<usize>,
    /// Custom timesteps, as diffusers' `set_timesteps(timesteps=...)`.
    #[serde(default)]
    pub timesteps: Option<Vec<f64>>,
    /// Custom noise levels, as diffusers' `set_timesteps(sigmas=...)`.
    #[serde(default)]
    pub sigmas: Option<Vec<f64>>,
    /// Shape of the latent (batch first, then channels).
    pub shape: Vec<usize>,
    /// The initial standard-normal latent, flat and row-major; the run starts from
    /// `sample * init_noise_sigma`.
    pub sample: Vec<f64>,
    /// Stochasticity passed as diffusers' `step(eta=...)` (DDIM, TCD). A sampler that takes
    /// no eta accepts only `0`.
    #[serde(default, deserialize_with = "lenient_opt_f64")]
    pub eta: Option<f64>,
    /// Recorded noise: one flat array per draw, in the order the sampler draws them.
    #[serde(default)]
    pub noise: Option<Vec<Vec<f64>>>,
}

/// What a traced run produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceOutput {
    /// The sampler's timesteps after `set_timesteps`, one per model evaluation.
    pub timesteps: Vec<f64>,
    /// The sampler's noise levels after `set_timesteps`, where it has them.
    pub sigmas: Option<Vec<f64>>,
    /// The standard deviation the initial latent was scaled by.
    pub init_noise_sigma: f64,
    /// The sample after each step, flat and row-major.
    pub samples: Vec<Vec<f64>>,
    /// The sample after the last step.
    #[serde(rename = "final")]
    pub final_sample: Vec<f64>,
    /// How many noise draws the sampler made.
    pub noise_draws: usize,
}

impl TraceCase {
    /// Parses one case from JSON text, accepting Python's non-finite number tokens.
    pub fn from_json_str(text: &str) -> Result<Self> {
        ConfigMap::parse(text, "trace case")?.deserialize("trace case")
    }

    /// Deserialises one case from a JSON value whose non-finite numbers have already been
    /// rewritten to marker strings (as [`ConfigMap::parse`] and
    /// [`diffusion_core::config::replace_non_finite_tokens`] do).
    pub fn from_value(value: Value) -> Result<Self> {
        ConfigMap::from_value(value, "trace case")?.deserialize("trace case")
    }

    /// The config as a [`ConfigMap`].
    pub fn config_map(&self) -> ConfigMap {
        ConfigMap(self.config.clone())
    }

    /// The schedule to pass to `set_timestep_schedule`.
    pub fn schedule(&self) -> Result<TimestepSchedule> {
        match (self.num_inference_steps, &self.timesteps, &self.sigmas) {
            (Some(n), None, None) => Ok(TimestepSchedule::Steps(n)),
            (None, Some(t), None) => Ok(TimestepSchedule::Timesteps(t.clone())),
            (None, None, Some(s)) => Ok(TimestepSchedule::Sigmas(s.clone())),
            _ => Err(Error::InvalidArgument(
                "give exactly one of num_inference_steps, timesteps and sigmas".into(),
            )),
        }
    }

    /// Whether the config asks for a learned variance, so the model output carries twice
    /// the sample's channels.
    pub fn learned_variance(&self) -> bool {
        matches!(
            self.config.get("variance_type").and_then(Value::as_str),
            Some("learned" | "learned_range")
        )
    }

    fn initial_sample(&self) -> Result<HostTensor> {
        if self.shape.len() < 2 || self.shape.contains(&0) {
            return Err(Error::Shape(format!(
                "the latent shape must have a batch and a channel dimension and no empty one, got {:?}",
                self.shape
            )));
        }
        HostTensor::new(self.sample.clone(), self.shape.clone())
    }
}

/// The toy denoiser of the trace loop: `0.8 * x_in * cos(t / 1000) + 0.1 * sin(x_in)`,
/// elementwise; with `learned_variance`, `0.25 * (1 + tanh(x_in))` is appended along the channel
/// dimension (dimension 1), doubling the channels.
pub fn toy_model_output(x_in: &HostTensor, t: f64, learned_variance: bool) -> Result<HostTensor> {
    let c = (t / 1000.0).cos();
    let out = x_in.map(|x| 0.8 * x * c + 0.1 * x.sin());
    if !learned_variance {
        return Ok(out);
    }
    let shape = x_in.shape();
    if shape.len() < 2 || shape[0] == 0 {
        return Err(Error::Shape(format!(
            "a learned-variance model output needs batch and channel dimensions, got {shape:?}"
        )));
    }
    let var = x_in.map(|x| 0.25 * (1.0 + x.tanh()));
    let per_batch = out.data().len() / shape[0];
    let mut data = Vec::with_capacity(2 * out.data().len());
    for (a, b) in out
        .data()
        .chunks(per_batch)
        .zip(var.data().chunks(per_batch))
    {
        data.extend_from_slice(a);
        data.extend_from_slice(b);
    }
    let mut doubled = shape;
    doubled[1] *= 2;
    HostTensor::new(data, doubled)
}

/// Counts the draws made through it.
struct CountingNoise<'a> {
    inner: &'a mut dyn NoiseSource,
    draws: usize,
}

impl NoiseSource for CountingNoise<'_> {
    fn sample(&mut self, shape: &[usize]) -> Result<Vec<f64>> {
        self.draws += 1;
        self.inner.sample(shape)
    }
}

/// Runs the toy sampling loop of the module docs for `case` on host tensors.
///
/// Errors: an unknown sampler or bad config (from the registry), an `eta` other than 0 for
/// a sampler without one, an inconsistent schedule, shape or noise list (including running
/// out of recorded noise), and anything the sampler itself rejects.
pub fn run_trace(case: &TraceCase) -> Result<TraceOutput> {
    let mut scheduler = registry::from_config::<HostTensor>(&case.class, &case.config_map())?;
    let schedule = case.schedule()?;
    let sample = case.initial_sample()?;
    if let Some(eta) = case.eta
        && !scheduler.set_eta(eta)
        && eta != 0.0
    {
        return Err(Error::Unsupported(format!(
            "{} takes no eta (got {eta})",
            scheduler.name()
        )));
    }
    scheduler.set_timestep_schedule(schedule)?;
    let timesteps = scheduler.timesteps().to_vec();
    let sigmas = scheduler.sigmas().map(<[f64]>::to_vec);
    let init_noise_sigma = scheduler.init_noise_sigma();
    let learned = case.learned_variance();

    let mut fixed;
    let mut seeded;
    let source: &mut dyn NoiseSource = match &case.noise {
        Some(draws) => {
            fixed = FixedNoise::new(draws.clone());
            &mut fixed
        }
        None => {
            seeded = SeededNoise::new(0);
            &mut seeded
        }
    };
    let mut noise = CountingNoise {
        inner: source,
        draws: 0,
    };

    let mut x = sample.scale(init_noise_sigma);
    let mut samples = Vec::with_capacity(timesteps.len());
    for &t in &timesteps {
        let x_in = scheduler.scale_model_input(&x, t)?;
        let model_output = toy_model_output(&x_in, t, learned)?;
        x = scheduler
            .step(&model_output, t, &x, &mut noise)?
            .prev_sample;
        samples.push(x.to_host());
    }
    Ok(TraceOutput {
        timesteps,
        sigmas,
        init_noise_sigma,
        samples,
        final_sample: x.into_data(),
        noise_draws: noise.draws,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ddim_case() -> TraceCase {
        TraceCase::from_json_str(
            r#"{"class": "DDIMScheduler",
                "config": {"_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1",
                           "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                           "beta_end": 0.012, "clip_sample": false, "lambda_min_clipped": -Infinity},
                "num_inference_steps": 5, "shape": [1, 2, 1, 2],
                "sample": [0.5, -1.0, 1.5, 0.25], "name": "ignored", "expected": null}"#,
        )
        .unwrap()
    }

    #[test]
    fn toy_model_matches_its_formula() {
        let x = HostTensor::new(vec![0.5, -1.0, 2.0, 0.0], vec![2, 1, 1, 2]).unwrap();
        let out = toy_model_output(&x, 500.0, false).unwrap();
        for (o, xi) in out.data().iter().zip(x.data()) {
            assert!((o - (0.8 * xi * 0.5f64.cos() + 0.1 * xi.sin())).abs() < 1e-15);
        }
        let doubled = toy_model_output(&x, 500.0, true).unwrap();
        assert_eq!(doubled.shape(), vec![2, 2, 1, 2]);
        let d = doubled.data();
        assert_eq!(&d[0..2], &out.data()[0..2]);
        assert!((d[2] - 0.25 * (1.0 + 0.5f64.tanh())).abs() < 1e-15);
        assert_eq!(&d[4..6], &out.data()[2..4]);
        assert!((d[7] - 0.25).abs() < 1e-15);
    }

    #[test]
    fn trace_runs_ddim_and_matches_a_manual_loop() {
        let case = ddim_case();
        let out = run_trace(&case).unwrap();
        assert_eq!(out.timesteps, vec![800.0, 600.0, 400.0, 200.0, 0.0]);
        assert_eq!(out.samples.len(), 5);
        assert_eq!(out.samples.last().unwrap(), &out.final_sample);
        assert_eq!(out.noise_draws, 0);
        assert_eq!(out.init_noise_sigma, 1.0);

        let mut s = registry::from_config::<HostTensor>("ddim", &case.config_map()).unwrap();
        s.set_timesteps(5).unwrap();
        let mut x = HostTensor::new(case.sample.clone(), case.shape.clone()).unwrap();
        for t in s.timesteps().to_vec() {
            let m = x.map(|v| 0.8 * v * (t / 1000.0).cos() + 0.1 * v.sin());
            x = s
                .step(&m, t, &x, &mut diffusion_core::NoNoise)
                .unwrap()
                .prev_sample;
        }
        assert_eq!(x.data(), &out.final_sample[..]);

        let json = serde_json::to_value(&out).unwrap();
        assert!(json.get("final").is_some());
        assert!(json["sigmas"].is_null());
    }

    #[test]
    fn eta_uses_the_recorded_noise_and_running_out_is_an_error() {
        let mut case = ddim_case();
        case.eta = Some(1.0);
        case.noise = Some(vec![vec![0.1, 0.2, 0.3, 0.4]; 5]);
        let with_noise = run_trace(&case).unwrap();
        assert_eq!(with_noise.noise_draws, 5);
        let mut plain = ddim_case();
        plain.eta = Some(0.0);
        assert_ne!(
            run_trace(&plain).unwrap().final_sample,
            with_noise.final_sample
        );

        case.noise = Some(vec![vec![0.1, 0.2, 0.3, 0.4]; 6]);
        assert_eq!(
            run_trace(&case).unwrap(),
            with_noise,
            "leftover draws are fine"
        );
        case.noise = Some(vec![vec![0.1, 0.2, 0.3, 0.4]; 4]);
        assert!(
            run_trace(&case).is_err(),
            "running out of draws is an error"
        );
    }

    #[test]
    fn bad_cases_are_typed_errors() {
        let mut case = ddim_case();
        case.sample.pop();
        assert!(matches!(run_trace(&case), Err(Error::Shape(_))));

        let mut case = ddim_case();
        case.shape = vec![4];
        case.sample = vec![0.0; 4];
        assert!(matches!(run_trace(&case), Err(Error::Shape(_))));

        let mut case = ddim_case();
        case.timesteps = Some(vec![500.0, 100.0]);
        assert!(matches!(run_trace(&case), Err(Error::InvalidArgument(_))));
        case.num_inference_steps = None;
        assert!(matches!(run_trace(&case), Err(Error::Unsupported(_))));

        let mut case = ddim_case();
        case.class = "no-such-sampler".into();
        assert!(matches!(
            run_trace(&case),
            Err(Error::UnknownScheduler { .. })
        ));

        assert!(TraceCase::from_json_str("{\"class\": \"ddim\"}").is_err());
        assert!(TraceCase::from_json_str("[1]").is_err());
        assert!(
            TraceCase::from_json_str(
                "{\"class\": \"ddim\", \"shape\": [1, 1], \"sample\": [NaNx]}"
            )
            .is_err()
        );
    }

    #[test]
    fn learned_variance_is_read_from_the_config() {
        let mut case = ddim_case();
        assert!(!case.learned_variance());
        case.config
            .insert("variance_type".into(), Value::from("learned_range"));
        assert!(case.learned_variance());
        case.config
            .insert("variance_type".into(), Value::from("fixed_small"));
        assert!(!case.learned_variance());
    }
}
