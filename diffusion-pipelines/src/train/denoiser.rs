//! [`DenoiserTrainer`]: trains a [`TextToImageModel`] (U-Net + CLIP text encoder) on VAE
//! latents with the denoising objective, as diffusers' `train_text_to_image.py` does.
//!
//! One [`step`](DenoiserTrainer::step) takes a micro-batch of clean latents `x0` (already
//! scaled by the VAE's `scaling_factor`) and the token ids of their captions, and
//!
//! 1. draws one training timestep per example ([`TimestepSampling`]), then for each example
//!    whether its caption is dropped (probability `condition_dropout`; a dropped caption's
//!    ids are replaced by the empty prompt's, which is what classifier-free guidance needs at
//!    inference), then Gaussian noise `eps` (plus `noise_offset * N(0, 1)` per example and
//!    channel when set) — in this order, from seeded host generators;
//! 2. forms `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps` in closed form from the model's
//!    [`NoiseSchedule`] and the target (`eps`, `v` or `x0`, see [`target_coefficients`](super::objective::target_coefficients));
//! 3. computes the per-example mean squared error, weighted by min-SNR-gamma when set, and
//!    averages it over the batch;
//! 4. back-propagates; every `gradient_accumulation_steps` micro-batches the summed gradients
//!    are clipped to `max_grad_norm`, AdamW steps with the scheduled learning rate, and the
//!    EMA is updated.
//!
//! Every random number comes from the trainer's own ChaCha generators (noise: ChaCha20 as
//! [`SeededNoise`]; timesteps and dropout: ChaCha8), whose states are saved in checkpoints:
//! a resumed run continues with bit-identical losses on the CPU backend.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use diffusion_core::{Error, NoiseSource, Result, SeededNoise};
use diffusion_schedulers::{NoiseSchedule, PredictionType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::train::checkpoint::{
    CheckpointData, CheckpointManifest, FileProducer, write_checkpoint,
};
use crate::train::ema::materialize;
use crate::train::model::TextToImageModel;
use crate::train::objective::{StepCoefficients, TimestepSampling};
use crate::train::optim::{
    OptimizerConfig, OptimizerStep, Stepper, module_bytes, module_from_bytes,
};
use crate::train::rng::{capture_chacha8, capture_chacha20, restore_chacha8, restore_chacha20};

/// The `kind` of denoiser checkpoints.
pub const DENOISER_KIND: &str = "denoiser";

/// Settings of a [`DenoiserTrainer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DenoiserTrainingConfig {
    /// What the U-Net learns to predict (`epsilon`, `v_prediction`, `sample`); must match
    /// the `prediction_type` of the scheduler config the model is exported with.
    pub objective: PredictionType,
    /// How training timesteps are drawn.
    pub timestep_sampling: TimestepSampling,
    /// Min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is the paper's choice); `None`:
    /// plain MSE.
    pub min_snr_gamma: Option<f64>,
    /// Offset noise strength (`noise += offset * N(0, 1)` per example and channel); 0: off.
    pub noise_offset: f64,
    /// Probability that an example's caption is replaced by the empty prompt.
    pub condition_dropout: f64,
    /// Train the text encoder jointly (otherwise it is frozen).
    pub train_text_encoder: bool,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Seed of the trainer's generators.
    pub seed: u64,
    /// Optimiser, learning-rate schedule, accumulation, clipping and EMA.
    pub optimizer: OptimizerConfig,
}

impl Default for DenoiserTrainingConfig {
    fn default() -> Self {
        Self {
            objective: PredictionType::Epsilon,
            timestep_sampling: TimestepSampling::Uniform,
            min_snr_gamma: None,
            noise_offset: 0.0,
            condition_dropout: 0.1,
            train_text_encoder: true,
            batch_size: 16,
            seed: 0,
            optimizer: OptimizerConfig::default(),
        }
    }
}

impl DenoiserTrainingConfig {
    /// Checks every value.
    pub fn validate(&self) -> Result<()> {
        self.optimizer.validate()?;
        if !(0.0..=1.0).contains(&self.condition_dropout) {
            return Err(Error::config("condition_dropout", "must be in [0, 1]"));
        }
        if !(self.noise_offset.is_finite() && self.noise_offset >= 0.0) {
            return Err(Error::config("noise_offset", "must be non-negative"));
        }
        if self
            .min_snr_gamma
            .is_some_and(|g| !(g.is_finite() && g > 0.0))
        {
            return Err(Error::config("min_snr_gamma", "must be positive"));
        }
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        Ok(())
    }
}

/// What one [`DenoiserTrainer::step`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct DenoiserStepReport {
    /// The micro-batch's (weighted) loss, before division by the accumulation count.
    pub loss: f64,
    /// The timesteps drawn.
    pub timesteps: Vec<usize>,
    /// Which examples had their caption dropped.
    pub dropped: Vec<bool>,
    /// Set when this micro-batch completed an optimizer step.
    pub optimizer_step: Option<OptimizerStep>,
}

/// Trains a [`TextToImageModel`] with the denoising objective (see the
/// [module documentation](self)).
pub struct DenoiserTrainer<B: AutodiffBackend> {
    config: DenoiserTrainingConfig,
    model: Option<TextToImageModel<B>>,
    stepper: Stepper<B, TextToImageModel<B>>,
    schedule: NoiseSchedule,
    empty_ids: Vec<u32>,
    noise: SeededNoise,
    rng: ChaCha8Rng,
    device: B::Device,
}

fn freeze<B: AutodiffBackend>(
    mut model: TextToImageModel<B>,
    train_text_encoder: bool,
) -> TextToImageModel<B> {
    if !train_text_encoder {
        model.text_encoder = model.text_encoder.no_grad();
    }
    model
}

impl<B: AutodiffBackend> DenoiserTrainer<B> {
    /// A trainer starting from `model` (fresh or pretrained). `empty_ids` are the token ids
    /// of the empty prompt (`tokenizer.encode("")`), used for condition dropout.
    pub fn new(
        model: TextToImageModel<B>,
        schedule: NoiseSchedule,
        empty_ids: Vec<u32>,
        config: DenoiserTrainingConfig,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        if empty_ids.is_empty() {
            return Err(Error::InvalidArgument(
                "the empty prompt's ids are empty".into(),
            ));
        }
        let model = freeze(materialize(model), config.train_text_encoder);
        let stepper = Stepper::new(config.optimizer.clone(), &model)?;
        Ok(Self {
            noise: SeededNoise::new(config.seed),
            rng: ChaCha8Rng::seed_from_u64(config.seed ^ 0x5DEE_CE66_D1CE_5EED),
            config,
            model: Some(model),
            stepper,
            schedule,
            empty_ids,
            device: device.clone(),
        })
    }

    /// Continues the run saved in `checkpoint` (see [`crate::train::checkpoint`]): `model`
    /// must have the checkpoint's architecture (its weights are replaced); the configuration,
    /// optimizer state, EMA, step count and generator states come from the checkpoint.
    pub fn resume(
        model: TextToImageModel<B>,
        schedule: NoiseSchedule,
        empty_ids: Vec<u32>,
        checkpoint: &CheckpointData,
        device: &B::Device,
    ) -> Result<Self> {
        let m = &checkpoint.manifest;
        if m.kind != DENOISER_KIND {
            return Err(Error::InvalidArgument(format!(
                "{} is a `{}` checkpoint, not a `{DENOISER_KIND}` one",
                checkpoint.path.display(),
                m.kind
            )));
        }
        let config: DenoiserTrainingConfig = serde_json::from_value(m.training_config.clone())
            .map_err(|e| Error::Json {
                context: format!("{} training_config", checkpoint.path.display()),
                message: e.to_string(),
            })?;
        let model = materialize(model);
        let mut trainer = Self::new(model, schedule, empty_ids, config, device)?;
        let model = trainer.model.take().expect("model present between steps");
        let model = module_from_bytes(model, checkpoint.file("model.mpk")?, device)?;
        trainer.model = Some(freeze(model, trainer.config.train_text_encoder));
        let ema = match m.ema_updates {
            Some(n) => Some((checkpoint.file("ema.mpk")?, n)),
            None => None,
        };
        trainer
            .stepper
            .restore(checkpoint.file("optimizer.mpk")?, ema, m.step, device)?;
        let rng = |name: &str| {
            m.rng.get(name).ok_or_else(|| {
                Error::Weights(format!(
                    "checkpoint {} has no `{name}` generator state",
                    checkpoint.path.display()
                ))
            })
        };
        *trainer.noise.rng_mut() = restore_chacha20(rng("noise")?)?;
        trainer.rng = restore_chacha8(rng("sampling")?)?;
        Ok(trainer)
    }

    /// The configuration.
    pub fn config(&self) -> &DenoiserTrainingConfig {
        &self.config
    }

    /// Changes the planned number of optimizer steps (the end of a cosine schedule), e.g.
    /// to extend a resumed run.
    pub fn set_total_steps(&mut self, total_steps: usize) {
        self.config.optimizer.total_steps = total_steps;
        self.stepper.config.total_steps = total_steps;
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> usize {
        self.stepper.step
    }

    /// Micro-batches accumulated towards the next optimizer step.
    pub fn pending_micro_batches(&self) -> usize {
        self.stepper.micro_step
    }

    /// The model being trained.
    pub fn model(&self) -> &TextToImageModel<B> {
        self.model.as_ref().expect("model present between steps")
    }

    /// The EMA of the weights, when EMA is on.
    pub fn ema_model(&self) -> Option<&TextToImageModel<B::InnerBackend>> {
        self.stepper.ema.as_ref().map(|e| e.model())
    }

    /// The weights to sample or export with: the EMA when on, else the trained weights.
    pub fn inference_model(&self) -> TextToImageModel<B::InnerBackend> {
        match self.ema_model() {
            Some(m) => m.clone(),
            None => self.model().valid(),
        }
    }

    /// The training noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// One micro-batch (see the [module documentation](self)).
    ///
    /// # Shapes
    ///
    /// - latents: `[batch_size, channels, height, width]`, scaled clean latents
    /// - input_ids: `batch_size` token id lists of equal length
    pub fn step(
        &mut self,
        latents: Tensor<B::InnerBackend, 4>,
        input_ids: &[Vec<u32>],
    ) -> Result<DenoiserStepReport> {
        let [n, c, h, w] = latents.dims();
        if n != self.config.batch_size || input_ids.len() != n {
            return Err(Error::Shape(format!(
                "a micro-batch of {n} latents and {} captions, the batch size is {}",
                input_ids.len(),
                self.config.batch_size
            )));
        }
        let num_train = self.schedule.len();
        let timesteps = self
            .config
            .timestep_sampling
            .sample(&mut self.rng, num_train, n)?;
        let p = self.config.condition_dropout;
        let dropped = draw_condition_dropout(&mut self.rng, n, p);
        let noise = draw_noise(&mut self.noise, [n, c, h, w], self.config.noise_offset)?;
        let ids: Vec<&[u32]> = input_ids
            .iter()
            .zip(&dropped)
            .map(|(ids, &drop)| if drop { &self.empty_ids[..] } else { &ids[..] })
            .collect();

        let model = self.model.take().expect("model present between steps");
        let result = denoising_loss(
            &model,
            Tensor::from_inner(latents),
            noise,
            &timesteps,
            &ids,
            &self.schedule,
            self.config.objective,
            self.config.min_snr_gamma,
            &self.device,
        );
        let loss = match result {
            Ok(l) => l,
            Err(e) => {
                self.model = Some(model);
                return Err(e);
            }
        };
        let loss_value = loss.clone().into_scalar().elem::<f64>();
        let (model, optimizer_step) = self.stepper.backward(model, loss);
        self.model = Some(model);
        Ok(DenoiserStepReport {
            loss: loss_value,
            timesteps,
            dropped,
            optimizer_step,
        })
    }

    /// The loss of `model_weights` (the trained weights, or the EMA with `use_ema`) on a
    /// batch with timesteps, noise drawn from `seed` (the trainer's own generators are not
    /// touched) and no caption dropout: a reproducible validation loss.
    pub fn validation_loss(
        &self,
        latents: Tensor<B::InnerBackend, 4>,
        input_ids: &[Vec<u32>],
        seed: u64,
        use_ema: bool,
    ) -> Result<f64> {
        let [n, c, h, w] = latents.dims();
        if input_ids.len() != n {
            return Err(Error::Shape(format!(
                "{n} latents and {} captions",
                input_ids.len()
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let timesteps = TimestepSampling::Uniform.sample(&mut rng, self.schedule.len(), n)?;
        let noise = draw_noise(
            &mut SeededNoise::new(seed),
            [n, c, h, w],
            self.config.noise_offset,
        )?;
        let ids: Vec<&[u32]> = input_ids.iter().map(|v| &v[..]).collect();
        let model = match (use_ema, self.ema_model()) {
            (true, Some(m)) => m.clone(),
            _ => self.model().valid(),
        };
        let loss = denoising_loss(
            &model,
            latents,
            noise,
            &timesteps,
            &ids,
            &self.schedule,
            self.config.objective,
            self.config.min_snr_gamma,
            &self.device,
        )?;
        Ok(loss.into_scalar().elem::<f64>())
    }

    /// Saves a checkpoint into `run_dir` (see [`crate::train::checkpoint`]) with `extra`
    /// caller data; keeps the newest `keep_last` checkpoints. Only between optimizer steps.
    pub fn save_checkpoint(
        &self,
        run_dir: &Path,
        extra: serde_json::Value,
        keep_last: usize,
    ) -> Result<PathBuf> {
        self.stepper.check_at_step_boundary()?;
        let manifest = CheckpointManifest {
            format: String::new(),
            version: 0,
            kind: DENOISER_KIND.into(),
            step: self.stepper.step,
            training_config: serde_json::to_value(&self.config).map_err(|e| Error::Json {
                context: "training config".into(),
                message: e.to_string(),
            })?,
            rng: BTreeMap::from([
                ("noise".to_string(), capture_chacha20(self.noise.rng())),
                ("sampling".to_string(), capture_chacha8(&self.rng)),
            ]),
            ema_updates: self.stepper.ema.as_ref().map(|e| e.updates()),
            extra,
            files: BTreeMap::new(),
        };
        let mut files: Vec<FileProducer<'_>> = vec![
            ("model.mpk", Box::new(|| module_bytes(self.model()))),
            ("optimizer.mpk", Box::new(|| self.stepper.optimizer_bytes())),
        ];
        if self.stepper.ema.is_some() {
            files.push((
                "ema.mpk",
                Box::new(|| self.stepper.ema_bytes().map(|b| b.expect("EMA is on"))),
            ));
        }
        write_checkpoint(run_dir, manifest, files, keep_last)
    }
}

/// Which of `n` captions are dropped: one uniform draw per example, dropped when below `p`
/// (the trainer's rule).
pub fn draw_condition_dropout(rng: &mut impl Rng, n: usize, p: f64) -> Vec<bool> {
    (0..n).map(|_| rng.random::<f64>() < p).collect()
}

/// Standard-normal noise of `shape` from `noise` (as f32), plus `offset * N(0, 1)` per
/// example and channel when `offset` is not 0 (drawn after the main noise).
fn draw_noise(noise: &mut SeededNoise, shape: [usize; 4], offset: f64) -> Result<Vec<f32>> {
    let [n, c, h, w] = shape;
    let mut values = noise.sample(&shape)?;
    if offset != 0.0 {
        let per_channel = noise.sample(&[n, c])?;
        for (plane, chunk) in values.chunks_mut(h * w).enumerate() {
            let o = offset * per_channel[plane];
            chunk.iter_mut().for_each(|x| *x += o);
        }
    }
    Ok(values.into_iter().map(|x| x as f32).collect())
}

fn column<B: Backend>(values: &[f64], device: &B::Device) -> Tensor<B, 4> {
    let n = values.len();
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::<B, 1>::from_data(TensorData::new(v, [n]), device).reshape([n, 1, 1, 1])
}

/// The denoising loss of `model` on clean latents `x0` with host `noise` at `timesteps`:
/// the per-example MSE between the prediction and the objective's target, weighted by
/// min-SNR-gamma when set, averaged over the batch.
///
/// # Shapes
///
/// - x0: `[batch, channels, height, width]`
/// - noise: `batch * channels * height * width` values, row-major
/// - timesteps, ids: one per example
/// - output: `[1]`
#[allow(clippy::too_many_arguments)]
pub fn denoising_loss<B: Backend>(
    model: &TextToImageModel<B>,
    x0: Tensor<B, 4>,
    noise: Vec<f32>,
    timesteps: &[usize],
    ids: &[&[u32]],
    schedule: &NoiseSchedule,
    objective: PredictionType,
    min_snr_gamma: Option<f64>,
    device: &B::Device,
) -> Result<Tensor<B, 1>> {
    let [n, c, h, w] = x0.dims();
    if noise.len() != n * c * h * w || timesteps.len() != n || ids.len() != n {
        return Err(Error::Shape(format!(
            "{} noise values, {} timesteps and {} captions for latents {:?}",
            noise.len(),
            timesteps.len(),
            ids.len(),
            x0.dims()
        )));
    }
    let len = ids[0].len();
    if len == 0 || ids.iter().any(|i| i.len() != len) {
        return Err(Error::Shape(
            "token id lists must be non-empty and of equal length (pad them)".into(),
        ));
    }
    let coeffs = StepCoefficients::new(schedule, timesteps, objective, min_snr_gamma)?;
    let eps = Tensor::<B, 4>::from_data(TensorData::new(noise, [n, c, h, w]), device);
    let noisy = x0.clone() * column::<B>(&coeffs.signal, device)
        + eps.clone() * column::<B>(&coeffs.noise, device);
    let target = match objective {
        PredictionType::Epsilon => eps,
        PredictionType::Sample => x0,
        PredictionType::VPrediction => {
            x0 * column::<B>(&coeffs.target_x0, device)
                + eps * column::<B>(&coeffs.target_eps, device)
        }
    };
    let flat: Vec<i64> = ids
        .iter()
        .flat_map(|i| i.iter().map(|&x| x as i64))
        .collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [n, len]), device);
    let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
    let t = Tensor::<B, 1>::from_data(TensorData::new(t, [n]), device);
    let pred = model.forward(noisy, t, ids)?;
    let per_example = (pred - target)
        .powf_scalar(2.0)
        .reshape([n, c * h * w])
        .mean_dim(1)
        .reshape([n]);
    let loss = if coeffs.weight.iter().all(|&w| w == 1.0) {
        per_example.mean()
    } else {
        let wts: Vec<f32> = coeffs.weight.iter().map(|&x| x as f32).collect();
        (per_example * Tensor::<B, 1>::from_data(TensorData::new(wts, [n]), device)).mean()
    };
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_dropout_draws_follow_the_rate() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for p in [0.0, 0.1, 0.5, 1.0] {
            let n = 20_000;
            let k = draw_condition_dropout(&mut rng, n, p)
                .iter()
                .filter(|&&d| d)
                .count();
            let rate = k as f64 / n as f64;
            // Standard deviation of the rate: sqrt(p (1 - p) / n) <= 0.0036.
            assert!((rate - p).abs() <= 0.011, "p {p}: rate {rate}");
        }
    }

    #[test]
    fn offset_noise_shifts_whole_planes() {
        let a = draw_noise(&mut SeededNoise::new(3), [2, 3, 4, 4], 0.0).unwrap();
        let b = draw_noise(&mut SeededNoise::new(3), [2, 3, 4, 4], 0.5).unwrap();
        for plane in 0..6 {
            let d: Vec<f32> = (0..16)
                .map(|i| b[plane * 16 + i] - a[plane * 16 + i])
                .collect();
            assert!(
                d.iter().all(|x| (x - d[0]).abs() < 1e-5),
                "plane {plane}: {d:?}"
            );
            assert!(d[0] != 0.0);
        }
    }

    #[test]
    fn invalid_settings_are_config_errors() {
        let bad = [
            DenoiserTrainingConfig {
                condition_dropout: 1.5,
                ..Default::default()
            },
            DenoiserTrainingConfig {
                noise_offset: -1.0,
                ..Default::default()
            },
            DenoiserTrainingConfig {
                min_snr_gamma: Some(0.0),
                ..Default::default()
            },
            DenoiserTrainingConfig {
                batch_size: 0,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(
                matches!(c.validate(), Err(Error::InvalidConfig { .. })),
                "{c:?}"
            );
        }
        let mut c = DenoiserTrainingConfig::default();
        c.optimizer.gradient_accumulation_steps = 0;
        assert!(c.validate().is_err());
        DenoiserTrainingConfig::default().validate().unwrap();
    }
}
