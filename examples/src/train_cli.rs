//! `diffusion train`: trains a small latent text-to-image model with this project's crates
//! alone, in two stages.
//!
//! ```text
//! # 1. the autoencoder (writes RUN/vae/, a diffusers AutoencoderKL folder)
//! diffusion train --stage vae --out runs/vae --steps 20000
//! # 2. the U-Net and the text encoder on the frozen VAE's latents (writes RUN/model/)
//! diffusion train --stage unet --vae runs/vae --out runs/unet --steps 100000 --export models/shapes
//! ```
//!
//! Every run folder gets `loss.csv` (one row per optimizer step), `samples/step-N.png`
//! (reconstructions for the VAE, a grid of generated images for the U-Net),
//! `checkpoint-N/` folders with a `latest` pointer (resume with `--resume`, which
//! continues bit-identically on the CPU), and the exported model.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use clap::{Args, ValueEnum};
use diffusion_pipelines::core::{ConfigMap, Error, NoiseSource, Result, SeededNoise};
use diffusion_pipelines::data::folder::ImageFolder;
use diffusion_pipelines::image_io::RgbImage;
use diffusion_pipelines::models::vae::AutoencoderKL;
use diffusion_pipelines::schedulers::{PredictionType, registry};
use diffusion_pipelines::stable_diffusion::{
    GenerateOptions, PipelineParts, StableDiffusionPipeline,
};
use diffusion_pipelines::train::batches::{
    DataState, TrainingData, image_grid, images_to_signed_chw,
};
use diffusion_pipelines::train::checkpoint::{CheckpointData, read_checkpoint, resolve_checkpoint};
use diffusion_pipelines::train::denoiser::{DenoiserTrainer, DenoiserTrainingConfig};
use diffusion_pipelines::train::export::{PipelineExport, export_pipeline_sharded, export_vae};
use diffusion_pipelines::train::lr::LrSchedule;
use diffusion_pipelines::train::model::{ModelArchitecture, TextToImageModel};
use diffusion_pipelines::train::objective::TimestepSampling;
use diffusion_pipelines::train::optim::OptimizerConfig;
use diffusion_pipelines::train::rng::{RngState, capture_chacha20, restore_chacha20};
use diffusion_pipelines::train::vae::{
    ReconstructionLoss, VaeTrainer, VaeTrainingConfig, latent_std,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::cli::{BackendJob, DeviceKind, KernelArgs, on_device};

/// Which part of the model a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The autoencoder (reconstruction + KL).
    Vae,
    /// The U-Net and the text encoder, on latents of a frozen VAE.
    Unet,
}

/// The built-in architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchitectureName {
    /// The default shapes model: 64x64 images, 4x16x16 latents, ~2.5 M parameters.
    Shapes,
    /// A very small model (16x16 images) for smoke tests.
    Tiny,
}

/// `--objective`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Objective {
    /// Predict the noise.
    Epsilon,
    /// Predict `v`.
    VPrediction,
    /// Predict the clean latents.
    Sample,
}

/// `--lr-schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LrScheduleArg {
    /// Constant after warm-up.
    Constant,
    /// Cosine decay to 0 at `--steps`.
    Cosine,
}

/// `--reconstruction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReconstructionArg {
    /// Mean absolute error.
    L1,
    /// Mean squared error.
    Mse,
}

/// `diffusion train` arguments.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// What to train: `vae` first, then `unet` (U-Net + text encoder, VAE frozen).
    #[arg(long, value_enum)]
    pub stage: Stage,
    /// The run folder (checkpoints, loss.csv, samples, the exported model).
    #[arg(long)]
    pub out: PathBuf,
    /// `shapes` (procedural, endless) or a folder of images with .txt / metadata.jsonl
    /// captions.
    #[arg(long, default_value = "shapes")]
    pub dataset: String,
    /// The model architecture of a fresh run.
    #[arg(long, value_enum, default_value_t = ArchitectureName::Shapes)]
    pub architecture: ArchitectureName,
    /// Total optimizer steps (a resumed run continues up to this count).
    #[arg(long, default_value_t = 10_000)]
    pub steps: usize,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate (default: 2e-4 for the U-Net, 1e-4 for the VAE).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 500)]
    pub warmup: usize,
    /// Learning-rate schedule after warm-up.
    #[arg(long, value_enum, default_value_t = LrScheduleArg::Cosine)]
    pub lr_schedule: LrScheduleArg,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Global gradient-norm clipping (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// EMA decay of the weights (0: no EMA; default 0.999 for the U-Net, off for the VAE).
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Seed of the weights, the data stream and every training draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to train.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Continue a run: from the given checkpoint or run folder, or (without a value) from
    /// `--out`'s latest checkpoint. Training settings come from the checkpoint.
    #[arg(long, num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// Optimizer steps between checkpoints.
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_every: usize,
    /// Checkpoints kept in the run folder.
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Optimizer steps between sample grids (0: only at the end).
    #[arg(long, default_value_t = 1000)]
    pub sample_every: usize,
    /// Denoising steps of the sample grids.
    #[arg(long, default_value_t = 30)]
    pub sample_steps: usize,
    /// Guidance scale of the sample grids.
    #[arg(long, default_value_t = 4.0)]
    pub guidance: f64,
    /// Sampler of the sample grids (default: the model's own).
    #[arg(long)]
    pub sampler: Option<String>,
    /// Also export the result to this folder (a diffusers AutoencoderKL folder for the
    /// VAE stage, a full diffusers pipeline for the U-Net stage).
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// U-Net stage: split each exported weight file larger than this many MB (10^6 bytes)
    /// into diffusers' sharded layout (`...-00001-of-0000N.safetensors` + index), e.g. to
    /// keep committed files small. Default: one file per component.
    #[arg(long)]
    pub max_shard_mb: Option<f64>,
    /// U-Net stage: the VAE to train on (a VAE run folder, a diffusers model folder with
    /// `vae/`, or a `vae` folder itself).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// U-Net stage: what the U-Net predicts.
    #[arg(long, value_enum, default_value_t = Objective::Epsilon)]
    pub objective: Objective,
    /// U-Net stage: min-SNR-gamma loss weighting (e.g. 5).
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// U-Net stage: offset noise strength.
    #[arg(long, default_value_t = 0.0)]
    pub noise_offset: f64,
    /// U-Net stage: probability of training on the empty prompt.
    #[arg(long, default_value_t = 0.1)]
    pub condition_dropout: f64,
    /// U-Net stage: keep the text encoder frozen.
    #[arg(long)]
    pub freeze_text_encoder: bool,
    /// U-Net stage: the VAE latent scaling factor (default: `1 / std` of the VAE's latents,
    /// measured on 256 training images at the start).
    #[arg(long)]
    pub scaling_factor: Option<f64>,
    /// VAE stage: reconstruction loss.
    #[arg(long, value_enum, default_value_t = ReconstructionArg::L1)]
    pub reconstruction: ReconstructionArg,
    /// VAE stage: weight of the KL term.
    #[arg(long, default_value_t = 1e-6)]
    pub kl_weight: f64,
    /// Kernel choices (as `diffusion generate`). Training runs under autodiff, where only
    /// `--conv backend|gemm` apply (`gemm`'s backward pass is matrix products, which avoids
    /// the CubeCL backends' slow direct weight-gradient kernel, at k x k times the
    /// activation memory); the sample grids use all of them.
    #[command(flatten)]
    pub kernels: KernelArgs,
}

/// What a run stores in its checkpoints besides the trainer state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    stage: Stage,
    architecture: ModelArchitecture,
    dataset: String,
    data: DataState,
    /// U-Net stage: the generator of the VAE posterior samples.
    latent_noise: Option<RngState>,
}

/// `diffusion train`.
pub fn train(args: &TrainArgs) -> Result<()> {
    args.kernels.apply(args.device, crate::cli::DType::F32);
    struct Train<'a>(&'a TrainArgs);
    impl BackendJob for Train<'_> {
        type Output = ();
        fn run<B: Backend>(self, device: &B::Device) -> Result<()> {
            run::<burn::backend::Autodiff<B>>(self.0, device)
        }
    }
    on_device(args.device, Train(args))
}

/// `--max-shard-mb` in bytes, checked.
fn max_shard_bytes(args: &TrainArgs) -> Result<Option<usize>> {
    match args.max_shard_mb {
        Some(mb) if !(mb.is_finite() && mb > 0.0) => Err(Error::InvalidArgument(format!(
            "--max-shard-mb must be a positive number, got {mb}"
        ))),
        mb => Ok(mb.map(|mb| (mb * 1e6) as usize)),
    }
}

fn run<B: AutodiffBackend>(args: &TrainArgs, device: &B::Device) -> Result<()> {
    if args.steps == 0 || args.batch_size == 0 || args.checkpoint_every == 0 {
        return Err(Error::InvalidArgument(
            "--steps, --batch-size and --checkpoint-every must be positive".into(),
        ));
    }
    max_shard_bytes(args)?;
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    let checkpoint = match &args.resume {
        None => {
            if resolve_checkpoint(&args.out)?.is_some() {
                return Err(Error::InvalidArgument(format!(
                    "{} already has checkpoints: pass --resume to continue it, or choose a new --out",
                    args.out.display()
                )));
            }
            None
        }
        Some(path) => {
            let path = path.clone().unwrap_or_else(|| args.out.clone());
            let found = resolve_checkpoint(&path)?.ok_or_else(|| {
                Error::InvalidArgument(format!("{}: no checkpoint to resume from", path.display()))
            })?;
            Some(read_checkpoint(&found)?)
        }
    };
    match args.stage {
        Stage::Vae => train_vae::<B>(args, checkpoint, device),
        Stage::Unet => train_unet::<B>(args, checkpoint, device),
    }
}

fn architecture(name: ArchitectureName) -> ModelArchitecture {
    match name {
        ArchitectureName::Shapes => ModelArchitecture::shapes(),
        ArchitectureName::Tiny => ModelArchitecture::tiny(),
    }
}

fn open_data(dataset: &str, side: usize, seed: u64) -> Result<TrainingData> {
    if dataset == "shapes" {
        Ok(TrainingData::shapes(side as u32, seed))
    } else {
        Ok(TrainingData::folder(
            ImageFolder::open(dataset, side as u32, true)?,
            seed,
        ))
    }
}

fn run_state(checkpoint: &CheckpointData) -> Result<RunState> {
    serde_json::from_value(checkpoint.manifest.extra.clone()).map_err(|e| Error::Json {
        context: format!("{} (run state)", checkpoint.path.display()),
        message: e.to_string(),
    })
}

fn images_tensor<B: Backend>(images: &[&RgbImage], device: &B::Device) -> Result<Tensor<B, 4>> {
    let (data, shape) = images_to_signed_chw(images)?;
    Ok(Tensor::from_data(TensorData::new(data, shape), device))
}

fn optimizer_config(
    args: &TrainArgs,
    default_lr: f64,
    default_ema: Option<f64>,
) -> OptimizerConfig {
    OptimizerConfig {
        learning_rate: args.lr.unwrap_or(default_lr),
        lr_schedule: match args.lr_schedule {
            LrScheduleArg::Constant => LrSchedule::Constant,
            LrScheduleArg::Cosine => LrSchedule::Cosine,
        },
        lr_warmup_steps: args.warmup,
        total_steps: args.steps,
        weight_decay: args.weight_decay,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        gradient_accumulation_steps: args.grad_accum.max(1),
        ema_decay: match args.ema_decay {
            Some(d) if d > 0.0 => Some(d),
            Some(_) => None,
            None => default_ema,
        },
        ..OptimizerConfig::default()
    }
}

/// `loss.csv`, truncated to the rows up to the resumed step.
struct LossLog {
    file: std::fs::File,
}

impl LossLog {
    fn open(path: &Path, header: &str, resume_step: usize) -> Result<Self> {
        let mut kept = vec![header.to_string()];
        if resume_step > 0
            && let Ok(f) = std::fs::File::open(path)
        {
            for line in BufReader::new(f)
                .lines()
                .skip(1)
                .map_while(std::io::Result::ok)
            {
                let step = line.split(',').next().and_then(|s| s.parse::<usize>().ok());
                if step.is_some_and(|s| s <= resume_step) {
                    kept.push(line);
                }
            }
        }
        let mut text = kept.join("\n");
        text.push('\n');
        std::fs::write(path, text).map_err(|e| Error::io(path, e))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self { file })
    }

    fn row(&mut self, fields: &[String]) -> Result<()> {
        writeln!(self.file, "{}", fields.join(",")).map_err(|e| Error::io("loss.csv", e))
    }
}

fn progress(total: usize, start: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {per_sec}  [{elapsed_precise}<{eta_precise}]  {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(start as u64);
    bar.reset_eta();
    bar
}

/// A flag set by Ctrl-C (the handler is installed once per process).
pub fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    // Only one handler per process; a second install just leaves the first in place.
    let _ = ctrlc::set_handler(move || f.store(true, Ordering::SeqCst));
    flag
}

/// Writes `images` as one PNG grid of `columns` columns (creating the parent folder).
pub fn save_grid(
    images: &[RgbImage],
    columns: usize,
    path: &Path,
    meta: &[(String, String)],
) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    image_grid(images, columns)?.save_png(path, meta)
}

/// A batch prepared by the [`Prefetcher`]'s thread: images in `[-1, 1]` as `[n, 3, H, W]`,
/// their captions, and the data stream's position after it.
struct Batch {
    images: Vec<f32>,
    shape: [usize; 4],
    captions: Vec<String>,
    state: DataState,
}

/// Draws and decodes batches on a background thread (in stream order, so runs stay
/// deterministic), while the device trains on the previous one.
struct Prefetcher {
    rx: std::sync::mpsc::Receiver<Result<Batch>>,
    state: DataState,
}

impl Prefetcher {
    fn new(mut data: TrainingData, batch: usize) -> Self {
        let state = data.state();
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        std::thread::spawn(move || {
            loop {
                let next = data.next_batch(batch).and_then(|examples| {
                    let refs: Vec<&RgbImage> = examples.iter().map(|e| &e.0).collect();
                    let (images, shape) = images_to_signed_chw(&refs)?;
                    Ok(Batch {
                        images,
                        shape,
                        captions: examples.into_iter().map(|e| e.1).collect(),
                        state: data.state(),
                    })
                });
                let failed = next.is_err();
                if tx.send(next).is_err() || failed {
                    break;
                }
            }
        });
        Self { rx, state }
    }

    /// The next batch (its images on `device`) and its captions.
    fn next<Bk: Backend>(&mut self, device: &Bk::Device) -> Result<(Tensor<Bk, 4>, Vec<String>)> {
        let b = self
            .rx
            .recv()
            .map_err(|_| Error::InvalidState("the data thread stopped".into()))??;
        self.state = b.state;
        Ok((
            Tensor::from_data(TensorData::new(b.images, b.shape), device),
            b.captions,
        ))
    }

    /// The stream position after the last batch handed out.
    fn state(&self) -> DataState {
        self.state.clone()
    }
}

/// A running mean for the progress bar.
struct Smooth(Option<f64>);

impl Smooth {
    fn push(&mut self, x: f64) -> f64 {
        let v = match self.0 {
            Some(s) => 0.98 * s + 0.02 * x,
            None => x,
        };
        self.0 = Some(v);
        v
    }
}

// ---------------------------------------------------------------------------------------
// VAE stage

fn train_vae<B: AutodiffBackend>(
    args: &TrainArgs,
    checkpoint: Option<CheckpointData>,
    device: &B::Device,
) -> Result<()> {
    let (mut trainer, mut state) = match &checkpoint {
        Some(ckpt) => {
            let state = run_state(ckpt)?;
            if state.stage != Stage::Vae {
                return Err(Error::InvalidArgument(format!(
                    "{} is a {:?}-stage checkpoint",
                    ckpt.path.display(),
                    state.stage
                )));
            }
            let model = state.architecture.vae.init::<B>(device)?;
            let mut trainer = VaeTrainer::resume(model, ckpt, device)?;
            trainer.set_total_steps(args.steps);
            (trainer, state)
        }
        None => {
            let arch = architecture(args.architecture);
            B::seed(device, args.seed);
            let model = arch.vae.init::<B>(device)?;
            let config = VaeTrainingConfig {
                reconstruction: match args.reconstruction {
                    ReconstructionArg::L1 => ReconstructionLoss::L1,
                    ReconstructionArg::Mse => ReconstructionLoss::Mse,
                },
                kl_weight: args.kl_weight,
                batch_size: args.batch_size,
                seed: args.seed,
                optimizer: optimizer_config(args, 1e-4, None),
            };
            let data = open_data(&args.dataset, arch.image_size(), args.seed)?;
            let state = RunState {
                stage: Stage::Vae,
                dataset: args.dataset.clone(),
                data: data.state(),
                architecture: arch,
                latent_noise: None,
            };
            (VaeTrainer::new(model, config)?, state)
        }
    };
    let arch = state.architecture.clone();
    let side = arch.image_size();
    let mut data = open_data(&state.dataset, side, trainer.config().seed)?;
    data.restore(&state.data)?;
    let start = trainer.step_count();
    let batch = trainer.config().batch_size;
    let accum = trainer.config().optimizer.gradient_accumulation_steps;
    let mut data = Prefetcher::new(data, batch);
    eprintln!(
        "VAE stage: {} parameters, {side}x{side} images, batch {batch} x {accum}, steps {start}..{}",
        burn::module::Module::num_params(trainer.model()),
        args.steps
    );
    let mut log = LossLog::open(
        &args.out.join("loss.csv"),
        "step,loss,reconstruction,kl,lr,grad_norm,seconds",
        start,
    )?;
    // Fixed validation images for the reconstruction grids.
    let mut val_data = open_data(&state.dataset, side, 999)?;
    let val: Vec<RgbImage> = val_data.next_batch(8)?.into_iter().map(|x| x.0).collect();

    let interrupted = interrupt_flag();
    let bar = progress(args.steps, start);
    let t0 = Instant::now();
    let mut smooth = Smooth(None);
    let mut step = start;
    while step < args.steps {
        let (mut loss, mut rec, mut kl) = (0.0, 0.0, 0.0);
        let mut done = None;
        for _ in 0..accum {
            let (images, _) = data.next::<B::InnerBackend>(device)?;
            let report = trainer.step(images)?;
            loss += report.loss / accum as f64;
            rec += report.reconstruction / accum as f64;
            kl += report.kl / accum as f64;
            done = report.optimizer_step;
        }
        let opt = done.ok_or_else(|| Error::InvalidState("accumulation out of step".into()))?;
        step = trainer.step_count();
        log.row(&[
            step.to_string(),
            format!("{loss:.6}"),
            format!("{rec:.6}"),
            format!("{kl:.4}"),
            format!("{:.6e}", opt.learning_rate),
            format!("{:.4}", opt.grad_norm),
            format!("{:.2}", t0.elapsed().as_secs_f64()),
        ])?;
        bar.set_position(step as u64);
        bar.set_message(format!(
            "loss {:.4}  rec {rec:.4}  kl {kl:.1}",
            smooth.push(loss)
        ));
        let stop = interrupted.load(Ordering::SeqCst);
        let last = step >= args.steps;
        if step % args.checkpoint_every == 0 || last || stop {
            state.data = data.state();
            save_vae_checkpoint(&trainer, &state, args)?;
        }
        if (args.sample_every > 0 && step % args.sample_every == 0) || last {
            vae_samples::<B>(&trainer, &val, step, args, device)?;
        }
        if stop {
            bar.abandon_with_message("interrupted; checkpoint saved");
            return Err(Error::Interrupted);
        }
    }
    bar.finish();
    report_speed(step - start, t0);
    let vae = trainer.inference_model();
    if let Some(dir) = &args.export {
        export_vae(dir, &arch.vae, &vae)?;
        eprintln!("exported the VAE to {}", dir.display());
    }
    Ok(())
}

fn save_vae_checkpoint<B: AutodiffBackend>(
    trainer: &VaeTrainer<B>,
    state: &RunState,
    args: &TrainArgs,
) -> Result<()> {
    let extra = serde_json::to_value(state).map_err(|e| Error::Json {
        context: "run state".into(),
        message: e.to_string(),
    })?;
    trainer.save_checkpoint(&args.out, extra, args.keep_checkpoints)?;
    // The current VAE as a diffusers folder, for the U-Net stage's --vae.
    export_vae(
        &args.out.join("vae"),
        &state.architecture.vae,
        &trainer.inference_model(),
    )
}

fn vae_samples<B: AutodiffBackend>(
    trainer: &VaeTrainer<B>,
    val: &[RgbImage],
    step: usize,
    args: &TrainArgs,
    device: &B::Device,
) -> Result<()> {
    let vae = trainer.inference_model();
    let refs: Vec<&RgbImage> = val.iter().collect();
    let x = images_tensor::<B::InnerBackend>(&refs, device)?;
    let recon = vae.decode(vae.encode(x)?.mode())?;
    let mut grid = val.to_vec();
    grid.extend(tensor_images(recon)?);
    save_grid(
        &grid,
        val.len(),
        &args.out.join(format!("samples/step-{step:08}.png")),
        &[
            ("step".into(), step.to_string()),
            ("rows".into(), "originals, reconstructions".into()),
        ],
    )
}

/// `[n, 3, H, W]` images in `[-1, 1]` to RGB8.
fn tensor_images<Bk: Backend>(x: Tensor<Bk, 4>) -> Result<Vec<RgbImage>> {
    let [n, c, h, w] = x.dims();
    let data: Vec<f32> = x
        .div_scalar(2.0)
        .add_scalar(0.5)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| Error::InvalidState(format!("reading images: {e:?}")))?;
    (0..n)
        .map(|i| RgbImage::from_chw_unit(&data[i * c * h * w..(i + 1) * c * h * w], h, w))
        .collect()
}

fn report_speed(steps: usize, t0: Instant) {
    let secs = t0.elapsed().as_secs_f64();
    if steps > 0 {
        eprintln!(
            "{steps} optimizer steps in {secs:.1}s ({:.3} steps/s)",
            steps as f64 / secs
        );
    }
}

// ---------------------------------------------------------------------------------------
// U-Net stage

/// Finds the VAE folder (`config.json` + weights) a `--vae` path names.
fn vae_folder(path: &Path) -> Result<PathBuf> {
    for candidate in [path.join("vae"), path.to_path_buf()] {
        if candidate.join("config.json").is_file() {
            return Ok(candidate);
        }
    }
    Err(Error::InvalidArgument(format!(
        "{}: neither a VAE folder (config.json) nor a folder with vae/ (a VAE run or a diffusers model)",
        path.display()
    )))
}

fn train_unet<B: AutodiffBackend>(
    args: &TrainArgs,
    checkpoint: Option<CheckpointData>,
    device: &B::Device,
) -> Result<()> {
    let run_vae = args.out.join("vae");
    let (mut state, vae) = match &checkpoint {
        Some(ckpt) => {
            let state = run_state(ckpt)?;
            if state.stage != Stage::Unet {
                return Err(Error::InvalidArgument(format!(
                    "{} is a {:?}-stage checkpoint",
                    ckpt.path.display(),
                    state.stage
                )));
            }
            let vae = AutoencoderKL::<B::InnerBackend>::from_dir(&run_vae, device)?;
            (state, vae)
        }
        None => {
            let source = args.vae.as_ref().ok_or_else(|| {
                Error::InvalidArgument(
                    "the unet stage needs --vae (a VAE run folder or a diffusers VAE)".into(),
                )
            })?;
            let folder = vae_folder(source)?;
            let mut vae = AutoencoderKL::<B::InnerBackend>::from_dir(&folder, device)?;
            let mut arch = architecture(args.architecture);
            arch.vae = diffusion_pipelines::models::vae::AutoencoderKLConfig::from_config_map(
                &ConfigMap::from_file(folder.join("config.json"))?,
            )?;
            arch.set_prediction_type(match args.objective {
                Objective::Epsilon => PredictionType::Epsilon,
                Objective::VPrediction => PredictionType::VPrediction,
                Objective::Sample => PredictionType::Sample,
            });
            arch.validate()?;
            let data = open_data(&args.dataset, arch.image_size(), args.seed)?;
            let factor = match args.scaling_factor {
                Some(f) => f,
                None => {
                    // 1 / std of posterior samples over 256 training-distribution images.
                    let mut probe =
                        open_data(&args.dataset, arch.image_size(), args.seed ^ 0xABCD)?;
                    let mut sum_sq = 0.0;
                    for i in 0..8 {
                        let ex = probe.next_batch(32)?;
                        let refs: Vec<&RgbImage> = ex.iter().map(|e| &e.0).collect();
                        let s =
                            latent_std(&vae, images_tensor::<B::InnerBackend>(&refs, device)?, i)?;
                        sum_sq += s * s;
                    }
                    1.0 / (sum_sq / 8.0).sqrt()
                }
            };
            vae.scaling_factor = factor;
            arch.vae.scaling_factor = factor;
            eprintln!(
                "VAE from {} with scaling factor {factor:.5}",
                folder.display()
            );
            // The run keeps its own copy of the frozen VAE (resumes read it back).
            export_vae(&run_vae, &arch.vae, &vae)?;
            let state = RunState {
                stage: Stage::Unet,
                dataset: args.dataset.clone(),
                data: data.state(),
                architecture: arch,
                latent_noise: Some(capture_chacha20(SeededNoise::new(args.seed ^ 0x1A7E).rng())),
            };
            (state, vae)
        }
    };
    let arch = state.architecture.clone();
    let tokenizer = arch.tokenizer.tokenizer()?;
    let empty = tokenizer.encode("")?;
    let schedule = arch.noise_schedule()?;
    let mut trainer = match &checkpoint {
        Some(ckpt) => {
            let model = TextToImageModel::<B>::init(&arch.unet, &arch.text_encoder, device)?;
            let mut t = DenoiserTrainer::resume(model, schedule, empty, ckpt, device)?;
            t.set_total_steps(args.steps);
            t
        }
        None => {
            B::seed(device, args.seed);
            let model = TextToImageModel::<B>::init(&arch.unet, &arch.text_encoder, device)?;
            let config = DenoiserTrainingConfig {
                objective: arch.prediction_type()?,
                timestep_sampling: TimestepSampling::Uniform,
                min_snr_gamma: args.min_snr_gamma,
                noise_offset: args.noise_offset,
                condition_dropout: args.condition_dropout,
                train_text_encoder: !args.freeze_text_encoder,
                batch_size: args.batch_size,
                seed: args.seed,
                optimizer: optimizer_config(args, 2e-4, Some(0.999)),
            };
            DenoiserTrainer::new(model, schedule, empty, config, device)?
        }
    };
    let side = arch.image_size();
    let mut data = open_data(&state.dataset, side, trainer.config().seed)?;
    data.restore(&state.data)?;
    let mut data = Prefetcher::new(data, trainer.config().batch_size);
    let mut latent_noise = SeededNoise::new(0);
    *latent_noise.rng_mut() = restore_chacha20(state.latent_noise.as_ref().ok_or_else(|| {
        Error::InvalidState("the run state has no latent noise generator".into())
    })?)?;
    let start = trainer.step_count();
    let batch = trainer.config().batch_size;
    let accum = trainer.config().optimizer.gradient_accumulation_steps;
    eprintln!(
        "U-Net stage: U-Net {} + text encoder {} parameters ({}), {side}x{side} images, batch {batch} x {accum}, steps {start}..{}",
        burn::module::Module::num_params(&trainer.model().unet),
        burn::module::Module::num_params(&trainer.model().text_encoder),
        if trainer.config().train_text_encoder {
            "trained"
        } else {
            "frozen"
        },
        args.steps
    );
    let mut log = LossLog::open(
        &args.out.join("loss.csv"),
        "step,loss,lr,grad_norm,seconds",
        start,
    )?;
    let prompts = sample_prompts(&state.dataset, side)?;

    let interrupted = interrupt_flag();
    let bar = progress(args.steps, start);
    let t0 = Instant::now();
    let mut smooth = Smooth(None);
    let mut step = start;
    while step < args.steps {
        let mut loss = 0.0;
        let mut done = None;
        for _ in 0..accum {
            let (images, captions) = data.next::<B::InnerBackend>(device)?;
            let ids = captions
                .iter()
                .map(|c| tokenizer.encode(c))
                .collect::<Result<Vec<_>>>()?;
            let posterior = vae.encode(images)?;
            let shape = posterior.mean.dims();
            let eps: Vec<f32> = latent_noise
                .sample(&shape)?
                .into_iter()
                .map(|v| v as f32)
                .collect();
            let z = posterior.sample(Tensor::from_data(TensorData::new(eps, shape), device))?;
            let report = trainer.step(vae.scale_latents(z), &ids)?;
            loss += report.loss / accum as f64;
            done = report.optimizer_step;
        }
        let opt = done.ok_or_else(|| Error::InvalidState("accumulation out of step".into()))?;
        step = trainer.step_count();
        log.row(&[
            step.to_string(),
            format!("{loss:.6}"),
            format!("{:.6e}", opt.learning_rate),
            format!("{:.4}", opt.grad_norm),
            format!("{:.2}", t0.elapsed().as_secs_f64()),
        ])?;
        bar.set_position(step as u64);
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}",
            smooth.push(loss),
            opt.learning_rate
        ));
        let stop = interrupted.load(Ordering::SeqCst);
        let last = step >= args.steps;
        if step % args.checkpoint_every == 0 || last || stop {
            state.data = data.state();
            state.latent_noise = Some(capture_chacha20(latent_noise.rng()));
            let extra = serde_json::to_value(&state).map_err(|e| Error::Json {
                context: "run state".into(),
                message: e.to_string(),
            })?;
            trainer.save_checkpoint(&args.out, extra, args.keep_checkpoints)?;
        }
        if (args.sample_every > 0 && step % args.sample_every == 0) || last {
            bar.suspend(|| unet_samples::<B>(&trainer, &vae, &arch, &prompts, step, args, device))?;
        }
        if stop {
            bar.abandon_with_message("interrupted; checkpoint saved");
            return Err(Error::Interrupted);
        }
    }
    bar.finish();
    report_speed(step - start, t0);
    let model = trainer.inference_model();
    let parts = PipelineExport {
        architecture: &arch,
        unet: &model.unet,
        vae: &vae,
        text_encoder: &model.text_encoder,
    };
    let shard = max_shard_bytes(args)?;
    let run_model = args.out.join("model");
    export_pipeline_sharded(&run_model, parts, shard)?;
    eprintln!("exported the pipeline to {}", run_model.display());
    if let Some(dir) = &args.export {
        export_pipeline_sharded(dir, parts, shard)?;
        eprintln!("exported the pipeline to {}", dir.display());
    }
    Ok(())
}

/// The prompts of the sample grids: a fixed set for the shapes dataset, the first captions
/// of an image folder.
fn sample_prompts(dataset: &str, side: usize) -> Result<Vec<String>> {
    if dataset == "shapes" {
        Ok([
            "a red circle on a white background",
            "a large blue square on a yellow background",
            "a small green triangle in the top left on a black background",
            "a yellow circle in the bottom right on a purple background",
            "a large orange triangle in the center on a blue background",
            "a small white square in the top right on a red background",
            "a purple circle in the left on a green background",
            "a black triangle on an orange background",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect())
    } else {
        let folder = ImageFolder::open(dataset, side as u32, false)?;
        Ok(folder
            .items()
            .iter()
            .take(8)
            .map(|i| i.caption.clone())
            .collect())
    }
}

fn unet_samples<B: AutodiffBackend>(
    trainer: &DenoiserTrainer<B>,
    vae: &AutoencoderKL<B::InnerBackend>,
    arch: &ModelArchitecture,
    prompts: &[String],
    step: usize,
    args: &TrainArgs,
    device: &B::Device,
) -> Result<()> {
    let model = trainer.inference_model();
    let scheduler_config = arch.scheduler_config()?;
    let scheduler = match &args.sampler {
        Some(name) => registry::from_config(name, &scheduler_config)?,
        None => registry::from_class_config(&scheduler_config)?,
    };
    let parts = PipelineParts {
        unet: model.unet,
        unet_config: arch.unet.clone(),
        vae: vae.clone(),
        text_encoder: model.text_encoder,
        tokenizer: arch.tokenizer.tokenizer()?,
        text_encoder_2: None,
        scheduler,
        scheduler_config,
        force_zeros_for_empty_prompt: false,
    };
    let mut pipe = StableDiffusionPipeline::<B::InnerBackend>::from_parts(parts, device)?;
    let name = pipe.scheduler().name().to_string();
    let mut opts = GenerateOptions {
        prompts: prompts.to_vec(),
        guidance_scale: args.guidance,
        steps: args.sample_steps,
        ..GenerateOptions::default()
    };
    opts.negative_prompts = None;
    // The same noise every time, so grids of successive steps are comparable.
    let mut noise = SeededNoise::new(1234);
    let out = pipe.generate(&opts, &mut noise, &mut |_, _| {
        std::ops::ControlFlow::Continue(())
    })?;
    let path = args.out.join(format!("samples/step-{step:08}.png"));
    save_grid(
        &out.images,
        4,
        &path,
        &[
            ("step".into(), step.to_string()),
            ("prompts".into(), prompts.join(" | ")),
            (
                "sampler".into(),
                format!(
                    "{name}, {} steps, guidance {}",
                    args.sample_steps, args.guidance
                ),
            ),
        ],
    )
}
