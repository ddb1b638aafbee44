//! [`VaeTrainer`]: trains an [`AutoencoderKL`] from scratch (or fine-tunes one) with a
//! reconstruction loss and a KL penalty, as the KL-regularised autoencoder of latent
//! diffusion (Rombach et al. 2022, §3 and appendix G), without the perceptual and
//! adversarial terms:
//!
//! `loss = mean |decode(z) - x|  (or mean squared)  +  kl_weight * KL`, with
//! `z = mean + std * eps` sampled from the encoder's posterior and
//! `KL = 0.5 * sum_{c,h,w}(mean^2 + var - 1 - logvar)` averaged over the batch (diffusers'
//! `DiagonalGaussianDistribution.kl()`).
//!
//! The posterior noise comes from a seeded host generator saved in checkpoints, so resumed
//! runs are bit-identical on the CPU backend. Optimisation (accumulation, clipping, AdamW,
//! learning-rate schedule, EMA) is shared with [`crate::train::denoiser`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use diffusion_core::{Error, NoiseSource, Result, SeededNoise};
use diffusion_models::vae::AutoencoderKL;
use serde::{Deserialize, Serialize};

use crate::train::checkpoint::{
    CheckpointData, CheckpointManifest, FileProducer, write_checkpoint,
};
use crate::train::ema::materialize;
use crate::train::optim::{
    OptimizerConfig, OptimizerStep, Stepper, module_bytes, module_from_bytes,
};
use crate::train::rng::{capture_chacha20, restore_chacha20};

/// The `kind` of VAE checkpoints.
pub const VAE_KIND: &str = "vae";

/// The reconstruction term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReconstructionLoss {
    /// Mean absolute error (latent diffusion's choice: sharper reconstructions).
    #[default]
    L1,
    /// Mean squared error.
    Mse,
}

/// Settings of a [`VaeTrainer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeTrainingConfig {
    /// The reconstruction term.
    pub reconstruction: ReconstructionLoss,
    /// Weight of the KL term (latent diffusion uses 1e-6 with its perceptual loss; a
    /// larger weight gives smoother, better-behaved latents).
    pub kl_weight: f64,
    /// Images per micro-batch.
    pub batch_size: usize,
    /// Seed of the posterior-noise generator.
    pub seed: u64,
    /// Optimiser, learning-rate schedule, accumulation, clipping and EMA.
    pub optimizer: OptimizerConfig,
}

impl Default for VaeTrainingConfig {
    fn default() -> Self {
        Self {
            reconstruction: ReconstructionLoss::L1,
            kl_weight: 1e-6,
            batch_size: 16,
            seed: 0,
            optimizer: OptimizerConfig {
                learning_rate: 4.5e-6 * 16.0,
                ema_decay: None,
                ..OptimizerConfig::default()
            },
        }
    }
}

impl VaeTrainingConfig {
    /// Checks every value.
    pub fn validate(&self) -> Result<()> {
        self.optimizer.validate()?;
        if !(self.kl_weight.is_finite() && self.kl_weight >= 0.0) {
            return Err(Error::config("kl_weight", "must be non-negative"));
        }
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        Ok(())
    }
}

/// What one [`VaeTrainer::step`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeStepReport {
    /// `reconstruction + kl_weight * kl`.
    pub loss: f64,
    /// The reconstruction term.
    pub reconstruction: f64,
    /// The KL term (unweighted).
    pub kl: f64,
    /// Set when this micro-batch completed an optimizer step.
    pub optimizer_step: Option<OptimizerStep>,
}

/// Trains an [`AutoencoderKL`] (see the [module documentation](self)).
pub struct VaeTrainer<B: AutodiffBackend> {
    config: VaeTrainingConfig,
    model: Option<AutoencoderKL<B>>,
    stepper: Stepper<B, AutoencoderKL<B>>,
    noise: SeededNoise,
}

/// The loss terms of `vae` on images `x` with posterior noise `eps`:
/// `(total, reconstruction, kl)`, each `[1]`.
///
/// # Shapes
///
/// - x: `[batch, channels, height, width]` in `[-1, 1]`
/// - eps: `batch * latent_channels * height/f * width/f` values
pub fn vae_loss<B: Backend>(
    vae: &AutoencoderKL<B>,
    x: Tensor<B, 4>,
    eps: Vec<f32>,
    reconstruction: ReconstructionLoss,
    kl_weight: f64,
) -> Result<(Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>)> {
    let device = x.device();
    let n = x.dims()[0];
    let posterior = vae.encode(x.clone())?;
    let shape = posterior.mean.dims();
    if eps.len() != shape.iter().product::<usize>() {
        return Err(Error::Shape(format!(
            "{} posterior noise values for latents {shape:?}",
            eps.len()
        )));
    }
    let eps = Tensor::<B, 4>::from_data(TensorData::new(eps, shape), &device);
    let z = posterior.sample(eps)?;
    let recon = vae.decode(z)?;
    let diff = recon - x;
    let rec = match reconstruction {
        ReconstructionLoss::L1 => diff.abs().mean(),
        ReconstructionLoss::Mse => diff.powf_scalar(2.0).mean(),
    };
    let var = posterior.logvar.clone().exp();
    let kl = (posterior.mean.powf_scalar(2.0) + var - posterior.logvar)
        .sub_scalar(1.0)
        .sum()
        .mul_scalar(0.5 / n as f64);
    let total = rec.clone() + kl.clone().mul_scalar(kl_weight);
    Ok((total, rec, kl))
}

impl<B: AutodiffBackend> VaeTrainer<B> {
    /// A trainer starting from `model`.
    pub fn new(model: AutoencoderKL<B>, config: VaeTrainingConfig) -> Result<Self> {
        config.validate()?;
        let model = materialize(model);
        let stepper = Stepper::new(config.optimizer.clone(), &model)?;
        Ok(Self {
            noise: SeededNoise::new(config.seed),
            config,
            model: Some(model),
            stepper,
        })
    }

    /// Continues the run saved in `checkpoint`; `model` must have its architecture.
    pub fn resume(
        model: AutoencoderKL<B>,
        checkpoint: &CheckpointData,
        device: &B::Device,
    ) -> Result<Self> {
        let m = &checkpoint.manifest;
        if m.kind != VAE_KIND {
            return Err(Error::InvalidArgument(format!(
                "{} is a `{}` checkpoint, not a `{VAE_KIND}` one",
                checkpoint.path.display(),
                m.kind
            )));
        }
        let config: VaeTrainingConfig =
            serde_json::from_value(m.training_config.clone()).map_err(|e| Error::Json {
                context: format!("{} training_config", checkpoint.path.display()),
                message: e.to_string(),
            })?;
        let mut trainer = Self::new(model, config)?;
        let model = trainer.model.take().expect("model present between steps");
        trainer.model = Some(module_from_bytes(
            model,
            checkpoint.file("model.mpk")?,
            device,
        )?);
        let ema = match m.ema_updates {
            Some(n) => Some((checkpoint.file("ema.mpk")?, n)),
            None => None,
        };
        trainer
            .stepper
            .restore(checkpoint.file("optimizer.mpk")?, ema, m.step, device)?;
        let state = m.rng.get("noise").ok_or_else(|| {
            Error::Weights(format!(
                "checkpoint {} has no `noise` generator state",
                checkpoint.path.display()
            ))
        })?;
        *trainer.noise.rng_mut() = restore_chacha20(state)?;
        Ok(trainer)
    }

    /// The configuration.
    pub fn config(&self) -> &VaeTrainingConfig {
        &self.config
    }

    /// Changes the planned number of optimizer steps.
    pub fn set_total_steps(&mut self, total_steps: usize) {
        self.config.optimizer.total_steps = total_steps;
        self.stepper.config.total_steps = total_steps;
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> usize {
        self.stepper.step
    }

    /// The model being trained.
    pub fn model(&self) -> &AutoencoderKL<B> {
        self.model.as_ref().expect("model present between steps")
    }

    /// The EMA of the weights, when EMA is on.
    pub fn ema_model(&self) -> Option<&AutoencoderKL<B::InnerBackend>> {
        self.stepper.ema.as_ref().map(|e| e.model())
    }

    /// The weights to use downstream: the EMA when on, else the trained weights.
    pub fn inference_model(&self) -> AutoencoderKL<B::InnerBackend> {
        match self.ema_model() {
            Some(m) => m.clone(),
            None => self.model().valid(),
        }
    }

    fn latent_len(&self, dims: [usize; 4]) -> Result<usize> {
        let model = self.model();
        let f = model.downsampling_factor;
        let [n, _, h, w] = dims;
        if h % f != 0 || w % f != 0 {
            return Err(Error::Shape(format!(
                "images of {h}x{w} are not a multiple of the VAE's factor {f}"
            )));
        }
        Ok(n * model.latent_channels * (h / f) * (w / f))
    }

    /// One micro-batch of images in `[-1, 1]`.
    ///
    /// # Shapes
    ///
    /// - images: `[batch_size, channels, height, width]`
    pub fn step(&mut self, images: Tensor<B::InnerBackend, 4>) -> Result<VaeStepReport> {
        let dims = images.dims();
        if dims[0] != self.config.batch_size {
            return Err(Error::Shape(format!(
                "a micro-batch of {} images, the batch size is {}",
                dims[0], self.config.batch_size
            )));
        }
        let len = self.latent_len(dims)?;
        let eps: Vec<f32> = self
            .noise
            .sample(&[len])?
            .into_iter()
            .map(|x| x as f32)
            .collect();
        let model = self.model.take().expect("model present between steps");
        let terms = vae_loss(
            &model,
            Tensor::from_inner(images),
            eps,
            self.config.reconstruction,
            self.config.kl_weight,
        );
        let (total, rec, kl) = match terms {
            Ok(t) => t,
            Err(e) => {
                self.model = Some(model);
                return Err(e);
            }
        };
        let report_loss = total.clone().into_scalar().elem::<f64>();
        let reconstruction = rec.into_scalar().elem::<f64>();
        let kl = kl.into_scalar().elem::<f64>();
        let (model, optimizer_step) = self.stepper.backward(model, total);
        self.model = Some(model);
        Ok(VaeStepReport {
            loss: report_loss,
            reconstruction,
            kl,
            optimizer_step,
        })
    }

    /// The loss terms `(total, reconstruction, kl)` of the current weights (or the EMA)
    /// on `images`, with posterior noise from `seed` (the trainer's generator is untouched).
    pub fn validation_loss(
        &self,
        images: Tensor<B::InnerBackend, 4>,
        seed: u64,
        use_ema: bool,
    ) -> Result<(f64, f64, f64)> {
        let len = self.latent_len(images.dims())?;
        let eps: Vec<f32> = SeededNoise::new(seed)
            .sample(&[len])?
            .into_iter()
            .map(|x| x as f32)
            .collect();
        let model = match (use_ema, self.ema_model()) {
            (true, Some(m)) => m.clone(),
            _ => self.model().valid(),
        };
        let (t, r, k) = vae_loss(
            &model,
            images,
            eps,
            self.config.reconstruction,
            self.config.kl_weight,
        )?;
        Ok((
            t.into_scalar().elem::<f64>(),
            r.into_scalar().elem::<f64>(),
            k.into_scalar().elem::<f64>(),
        ))
    }

    /// Saves a checkpoint into `run_dir` with `extra` caller data.
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
            kind: VAE_KIND.into(),
            step: self.stepper.step,
            training_config: serde_json::to_value(&self.config).map_err(|e| Error::Json {
                context: "training config".into(),
                message: e.to_string(),
            })?,
            rng: BTreeMap::from([("noise".to_string(), capture_chacha20(self.noise.rng()))]),
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

/// The standard deviation of posterior samples of `vae` over `images` (in `[-1, 1]`), with
/// noise from `seed`: `1 / std` is the `scaling_factor` that gives the U-Net unit-variance
/// latents (how Stable Diffusion's 0.18215 was chosen).
pub fn latent_std<B: Backend>(
    vae: &AutoencoderKL<B>,
    images: Tensor<B, 4>,
    seed: u64,
) -> Result<f64> {
    let posterior = vae.encode(images)?;
    let shape = posterior.mean.dims();
    let eps: Vec<f32> = SeededNoise::new(seed)
        .sample(&shape)?
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let device = posterior.mean.device();
    let z = posterior.sample(Tensor::from_data(TensorData::new(eps, shape), &device))?;
    let n = shape.iter().product::<usize>() as f64;
    let mean = z.clone().mean().into_scalar().elem::<f64>();
    let sq = z.powf_scalar(2.0).sum().into_scalar().elem::<f64>() / n;
    Ok((sq - mean * mean).max(0.0).sqrt())
}
