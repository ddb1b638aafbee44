//! The optimisation loop shared by the trainers: gradient accumulation, global-norm
//! clipping, AdamW with a warm-up + constant/cosine learning rate, and an EMA of the weights.

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use diffusion_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::train::ema::Ema;
use crate::train::grads::{clip_grad_norm, grad_norm};
use crate::train::lr::{LrSchedule, learning_rate};

/// Optimiser settings (diffusers' `train_text_to_image.py` defaults where it has them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimizerConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Shape of the learning rate after warm-up.
    pub lr_schedule: LrSchedule,
    /// Linear warm-up length in optimizer steps.
    pub lr_warmup_steps: usize,
    /// Planned optimizer steps (the end of the cosine schedule).
    pub total_steps: usize,
    /// AdamW `beta_1`.
    pub adam_beta1: f64,
    /// AdamW `beta_2`.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_epsilon: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (PyTorch's `clip_grad_norm_`); `None`: off.
    pub max_grad_norm: Option<f64>,
    /// Micro-batches whose gradients are summed (each loss divided by this count) per
    /// optimizer step.
    pub gradient_accumulation_steps: usize,
    /// EMA decay of the weights (`None`: no EMA).
    pub ema_decay: Option<f64>,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1e-4,
            lr_schedule: LrSchedule::Constant,
            lr_warmup_steps: 500,
            total_steps: 10_000,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: Some(1.0),
            gradient_accumulation_steps: 1,
            ema_decay: Some(0.9999),
        }
    }
}

impl OptimizerConfig {
    /// Checks every value.
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, m: &str| Err(Error::config(k, m.to_string()));
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("learning_rate", "must be positive");
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            return bad("adam_beta1/adam_beta2", "must be in [0, 1)");
        }
        if !(self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0) {
            return bad("adam_epsilon", "must be positive");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", "must be non-negative");
        }
        if self
            .max_grad_norm
            .is_some_and(|m| !(m.is_finite() && m > 0.0))
        {
            return bad("max_grad_norm", "must be positive");
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps", "must be at least 1");
        }
        if self.ema_decay.is_some_and(|d| !(0.0..1.0).contains(&d)) {
            return bad("ema_decay", "must be in [0, 1)");
        }
        Ok(())
    }

    fn adamw(&self) -> AdamWConfig {
        AdamWConfig::new()
            .with_beta_1(self.adam_beta1 as f32)
            .with_beta_2(self.adam_beta2 as f32)
            .with_epsilon(self.adam_epsilon as f32)
            .with_weight_decay(self.weight_decay as f32)
    }
}

/// What an optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerStep {
    /// The learning rate used.
    pub learning_rate: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
}

type Recorder8 = NamedMpkBytesRecorder<FullPrecisionSettings>;

/// Gradient accumulation, clipping, AdamW, the learning-rate schedule and the EMA, for a
/// module `M` on an autodiff backend.
pub(crate) struct Stepper<B: AutodiffBackend, M: AutodiffModule<B>> {
    pub(crate) config: OptimizerConfig,
    optim: OptimizerAdaptor<AdamW, M, B>,
    accumulator: GradientsAccumulator<M>,
    pub(crate) micro_step: usize,
    pub(crate) step: usize,
    pub(crate) ema: Option<Ema<M::InnerModule>>,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> Stepper<B, M> {
    /// A fresh optimiser; the EMA (when on) starts from `model` (which must be
    /// materialised, see [`crate::train::ema::materialize`]).
    pub(crate) fn new(config: OptimizerConfig, model: &M) -> Result<Self> {
        config.validate()?;
        let ema = config.ema_decay.map(|d| Ema::new(model.valid(), d));
        Ok(Self {
            optim: config.adamw().init(),
            config,
            accumulator: GradientsAccumulator::new(),
            micro_step: 0,
            step: 0,
            ema,
        })
    }

    /// Back-propagates `loss` (divided by the accumulation count) and, at the end of an
    /// accumulation cycle, clips and applies the summed gradients and updates the EMA.
    pub(crate) fn backward(&mut self, model: M, loss: Tensor<B, 1>) -> (M, Option<OptimizerStep>) {
        let accum = self.config.gradient_accumulation_steps;
        let loss = if accum > 1 {
            loss.div_scalar(accum as f64)
        } else {
            loss
        };
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        self.accumulator.accumulate(&model, grads);
        self.micro_step += 1;
        if self.micro_step < accum {
            return (model, None);
        }
        self.micro_step = 0;
        let mut grads = self.accumulator.grads();
        let norm = match self.config.max_grad_norm {
            Some(max) => clip_grad_norm::<B, M>(&model, &mut grads, max),
            None => grad_norm::<B, M>(&model, &mut grads),
        };
        let lr = learning_rate(
            self.config.learning_rate,
            self.config.lr_schedule,
            self.step,
            self.config.lr_warmup_steps,
            self.config.total_steps,
        );
        let model = self.optim.step(lr, model, grads);
        self.step += 1;
        if let Some(ema) = &mut self.ema {
            ema.update(&model.valid());
        }
        (
            model,
            Some(OptimizerStep {
                learning_rate: lr,
                grad_norm: norm,
            }),
        )
    }

    /// Errors unless the accumulator is empty (checkpoints are taken between optimizer
    /// steps only).
    pub(crate) fn check_at_step_boundary(&self) -> Result<()> {
        if self.micro_step != 0 {
            return Err(Error::InvalidState(format!(
                "{} of {} micro-batches of the current optimizer step are accumulated; \
                 checkpoint after the optimizer step",
                self.micro_step, self.config.gradient_accumulation_steps
            )));
        }
        Ok(())
    }

    pub(crate) fn optimizer_bytes(&self) -> Result<Vec<u8>> {
        Recorder8::default()
            .record(self.optim.to_record(), ())
            .map_err(|e| Error::InvalidState(format!("cannot serialise the optimizer: {e}")))
    }

    pub(crate) fn ema_bytes(&self) -> Result<Option<Vec<u8>>> {
        self.ema
            .as_ref()
            .map(|ema| module_bytes::<B::InnerBackend, M::InnerModule>(ema.model()))
            .transpose()
    }

    /// Restores the optimizer state, the EMA and the step counters from a checkpoint.
    pub(crate) fn restore(
        &mut self,
        optimizer: &[u8],
        ema: Option<(&[u8], usize)>,
        step: usize,
        device: &B::Device,
    ) -> Result<()> {
        let record = Recorder8::default()
            .load(optimizer.to_vec(), device)
            .map_err(|e| Error::Weights(format!("optimizer state: {e}")))?;
        self.optim = guarded("optimizer state", || {
            self.config.adamw().init::<B, M>().load_record(record)
        })?;
        self.step = step;
        self.micro_step = 0;
        self.accumulator = GradientsAccumulator::new();
        match (&mut self.ema, ema) {
            (Some(current), Some((bytes, updates))) => {
                let template = current.model().clone();
                let model =
                    module_from_bytes::<B::InnerBackend, M::InnerModule>(template, bytes, device)?;
                *current = Ema::restore(model, current.decay(), updates);
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(Error::Weights(
                    "the checkpoint has no EMA model but EMA is on".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(Error::Weights(
                    "the checkpoint has an EMA model but EMA is off".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Runs `f`, turning a panic inside Burn's record loading (a record that does not fit the
/// module, which the manifest and digests should already have ruled out) into an error.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Error::Weights(format!("{what} does not fit the model: {msg}"))
    })
}

/// A module's parameters as a Burn record (f32, named MessagePack), parameter ids included.
pub fn module_bytes<B: burn::tensor::backend::Backend, M: burn::module::Module<B>>(
    module: &M,
) -> Result<Vec<u8>> {
    Recorder8::default()
        .record(module.clone().into_record(), ())
        .map_err(|e| Error::InvalidState(format!("cannot serialise the model: {e}")))
}

/// Loads [`module_bytes`] into `template` (a module of the same architecture). A record
/// whose parameter shapes differ from the template's is an [`Error::Weights`] (Burn's
/// `load_record` alone would accept it).
pub fn module_from_bytes<B: burn::tensor::backend::Backend, M: burn::module::Module<B>>(
    template: M,
    bytes: &[u8],
    device: &B::Device,
) -> Result<M> {
    let expected = param_shapes::<B, M>(&template);
    let record = Recorder8::default()
        .load(bytes.to_vec(), device)
        .map_err(|e| Error::Weights(format!("model record: {e}")))?;
    let loaded = guarded("model record", || template.load_record(record))?;
    let got = param_shapes::<B, M>(&loaded);
    if got != expected {
        let first = expected
            .iter()
            .zip(&got)
            .position(|(a, b)| a != b)
            .unwrap_or(expected.len().min(got.len()));
        return Err(Error::Weights(format!(
            "the saved model does not fit this architecture: {} parameters saved, {} expected; \
             parameter {first} is {:?}, expected {:?}",
            got.len(),
            expected.len(),
            got.get(first),
            expected.get(first)
        )));
    }
    Ok(loaded)
}

/// The shapes of a module's parameters, in visiting order.
fn param_shapes<B: burn::tensor::backend::Backend, M: burn::module::Module<B>>(
    module: &M,
) -> Vec<Vec<usize>> {
    struct Shapes(Vec<Vec<usize>>);
    impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Shapes {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            self.0.push(param.dims().to_vec());
        }
        fn visit_int<const D: usize>(
            &mut self,
            param: &burn::module::Param<Tensor<B, D, burn::tensor::Int>>,
        ) {
            self.0.push(param.dims().to_vec());
        }
    }
    let mut v = Shapes(Vec::new());
    module.visit(&mut v);
    v.0
}
