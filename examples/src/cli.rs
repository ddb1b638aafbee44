//! The `diffusion` command's subcommands, kept in the library so they are testable.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::tensor::backend::Backend;
use clap::{Args, ValueEnum};
use diffusion_pipelines::core::{Error, ModelDir, Result, SeededNoise};
use diffusion_pipelines::image_io::{
    DEFAULT_JPEG_QUALITY, ImageFormat, NpyArray, RgbImage, check_output_path,
};
use diffusion_pipelines::models::nn::{
    AttentionKernel, ConvAlgorithm, Kernels, MatmulKernel, set_conv_algorithm, set_kernels,
};
use diffusion_pipelines::models::tokenizer::ClipTokenizer;
use diffusion_pipelines::stable_diffusion::{
    GenerateOptions, Precision, PromptKind, StableDiffusionPipeline,
};
use indicatif::{ProgressBar, ProgressStyle};

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceKind {
    /// The CPU (Burn's ndarray backend).
    Cpu,
    /// A GPU through wgpu (Vulkan, Metal, DX12).
    Wgpu,
    /// An NVIDIA GPU through CUDA.
    Cuda,
}

/// A kernel flag's value: `auto` (chosen for the device, see [`KernelArgs::apply`]) or an
/// explicit choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice<T> {
    /// The measured default for the device.
    Auto,
    /// This choice on every device (explicit CUDA kernels fall back to the backend's
    /// elsewhere).
    Set(T),
}

impl<T: FromStr<Err = Error>> FromStr for KernelChoice<T> {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(KernelChoice::Auto),
            other => other.parse().map(KernelChoice::Set),
        }
    }
}

/// `--conv`, `--attention`, `--matmul`: the kernels the networks run (see
/// [`nn::kernels`](mod@diffusion_pipelines::models::nn::kernels)). Every choice gives the
/// same numbers up to float rounding.
#[derive(Debug, Clone, Args)]
pub struct KernelArgs {
    /// How convolutions are computed: `backend` (the backend's kernels), `gemm` (im2col and
    /// a matrix product; under autodiff the backward pass is matrix products too), or
    /// `igemm[-sync-cmma|-async-cmma|...]` (CUDA: implicit GEMM on tensor cores, f32
    /// accumulation; TF32 products for f32 inputs, as PyTorch's cuDNN default). `auto`:
    /// `gemm` on the CPU, `backend` on wgpu, on CUDA `igemm-async-cmma` for f16/bf16 (the
    /// fastest measured) and `backend` for f32 (exact products; docs/BENCHMARKS.md).
    #[arg(long, default_value = "auto")]
    pub conv: KernelChoice<ConvAlgorithm>,
    /// Attention kernel: `backend`, or on CUDA `flash` (`flash2|flash4|flash8`: warps per
    /// block; tensor cores, f32 softmax; rejects head widths that are not a multiple of 16,
    /// e.g. SD1.5's 40, and then runs `backend`) or `flash-unit`. `auto`: `backend` (the
    /// fastest measured for SD1.5).
    #[arg(long, default_value = "auto")]
    pub attention: KernelChoice<AttentionKernel>,
    /// Matrix-product kernel of linear layers: `backend` or, on CUDA, a cubek strategy
    /// (`simple-cyclic-cmma`, `specialized-tma-mma`, ...). `auto`: `specialized-tma-mma`
    /// for f16/bf16 on CUDA (the fastest measured), `backend` otherwise.
    #[arg(long, default_value = "auto")]
    pub matmul: KernelChoice<MatmulKernel>,
}

impl KernelArgs {
    /// Makes them the process's kernels for work on `device` with a U-Net in `dtype`.
    pub fn apply(&self, device: DeviceKind, dtype: DType) {
        let auto = auto_kernels(device, dtype);
        set_conv_algorithm(match self.conv {
            KernelChoice::Set(c) => c,
            KernelChoice::Auto => auto.0,
        });
        set_kernels(Kernels {
            attention: match self.attention {
                KernelChoice::Set(k) => k,
                KernelChoice::Auto => auto.1.attention,
            },
            matmul: match self.matmul {
                KernelChoice::Set(k) => k,
                KernelChoice::Auto => auto.1.matmul,
            },
        });
    }
}

/// What `auto` means, measured with `sd-bench --sweep` (docs/BENCHMARKS.md, H200,
/// 2026-12-04):
/// - CPU: im2col + matmul convolutions (4.3x faster than the direct ones).
/// - CUDA, f16 / bf16: cubek's asynchronous implicit-GEMM convolution and the warp-specialised
///   TMA matmul (SD1.5 U-Net 703 -> 97 ms, VAE decode 1326 -> 68 ms). The flash attention
///   kernels reject SD's head widths (40, 80, 160; they fell back on every call), so
///   attention stays the backend's.
/// - CUDA, f32: the backend's kernels. The implicit-GEMM convolutions run 5x faster there
///   (U-Net 709 -> 137 ms, VAE decode 1326 -> 103 ms) but multiply in TF32: the tiny CLI
///   parity pipelines moved up to 9.8e-3 from diffusers, against 1.6e-3 with the backend's
///   convolutions (whose remaining gap is Burn's f32 matmul, itself on TF32 tensor cores).
///   f32 is what users pick for exactness; `--conv igemm` trades it for speed.
/// - wgpu: the backend's kernels (the explicit ones are CUDA's).
fn auto_kernels(device: DeviceKind, dtype: DType) -> (ConvAlgorithm, Kernels) {
    use diffusion_pipelines::models::nn::{ConvKernel, MatmulStrategy};
    match (device, dtype) {
        (DeviceKind::Cpu, _) => (ConvAlgorithm::Gemm, Kernels::default()),
        (DeviceKind::Wgpu, _) => (ConvAlgorithm::Backend, Kernels::default()),
        (DeviceKind::Cuda, DType::F16 | DType::Bf16) => (
            ConvAlgorithm::ImplicitGemm(ConvKernel::AsyncCmma),
            Kernels {
                attention: AttentionKernel::Backend,
                matmul: MatmulKernel::Cube(MatmulStrategy::SpecializedTmaMma),
            },
        ),
        (DeviceKind::Cuda, DType::F32) => (ConvAlgorithm::Backend, Kernels::default()),
    }
}

/// Floating-point precision of the weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DType {
    /// 32-bit floats.
    F32,
    /// 16-bit IEEE floats for the U-Net and text encoder (VAE and sampler in f32).
    F16,
    /// bfloat16 for the U-Net and text encoder (VAE and sampler in f32).
    Bf16,
}

impl DType {
    /// The pipeline precision: [`Precision::f32`] or [`Precision::half`] (U-Net and text
    /// encoders in the low dtype; the VAE, the sampler and the attention in f32).
    pub fn precision(self) -> Precision {
        match self {
            DType::F32 => Precision::f32(),
            DType::F16 => Precision::half(burn::tensor::FloatDType::F16),
            DType::Bf16 => Precision::half(burn::tensor::FloatDType::BF16),
        }
    }
}

/// `diffusion generate` arguments.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// A diffusers-format model folder (default: the embedded shapes model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// What to draw.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Sampler: a diffusers class name or a short name (ddim, euler, euler-a, dpm++2m,
    /// dpm++2m-karras, unipc, lcm, ...); default: the model's own.
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Denoising steps (1 to 10000).
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (off at 1; a finite number).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Random seed of the initial noise and any sampler noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image height in pixels (multiple of 8, at most 16384; default: the model's).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels (multiple of 8, at most 16384; default: the model's).
    #[arg(long)]
    pub width: Option<usize>,
    /// Number of images (1 to 1024).
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Initial latents, float32 [batch, 4, H/8, W/8] .npy (diffusers' `latents=`).
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Source image for image-to-image or inpainting (PNG/JPEG/WebP).
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// How much of the source image to re-draw, in (0, 1].
    #[arg(long, default_value_t = 0.8)]
    pub strength: f64,
    /// Inpainting mask (white = repaint), same size as the source image.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Output image, its format from the extension: .png (with the settings as text
    /// chunks), .jpg/.jpeg (see --jpeg-quality), .webp (lossless; the image crate has no
    /// lossy WebP encoder). JPEG and WebP files carry no settings. With several images,
    /// `-N` goes before the extension. The folder must exist and be writable.
    #[arg(long, default_value = "image.png")]
    pub output: PathBuf,
    /// JPEG quality, 1 to 100 (for .jpg/.jpeg outputs).
    #[arg(long, value_name = "N", default_value_t = u32::from(DEFAULT_JPEG_QUALITY))]
    pub jpeg_quality: u32,
    /// Also write the images as float32 [batch, H, W, 3] in [0, 1] (.npy).
    #[arg(long)]
    pub output_npy: Option<PathBuf>,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Precision of the U-Net and text encoder. f16/bf16 need a backend with those types
    /// (cuda; wgpu with shader-f16); the VAE decode, the sampler and normalisation stay in
    /// f32, and convolutions and attention accumulate in f32 (the backend's convolution
    /// runs wholly in f32).
    #[arg(long, value_enum, default_value_t = DType::F32)]
    pub dtype: DType,
    /// Kernel choices.
    #[command(flatten)]
    pub kernels: KernelArgs,
}

fn model_dir(model: Option<&Path>) -> Result<PathBuf> {
    match model {
        Some(m) => Ok(m.to_path_buf()),
        None => crate::embedded::default_model_dir(),
    }
}

/// `diffusion tokenize`.
pub fn tokenize(model: Option<&Path>, text: &str) -> Result<()> {
    let dir = ModelDir::open(model_dir(model)?)?;
    let tokenizer = ClipTokenizer::from_model_dir(&dir, "tokenizer")?;
    let ids = tokenizer.encode(text)?;
    println!("{}", serde_json::to_string(&ids).expect("ids serialise"));
    Ok(())
}

/// `diffusion info`.
pub fn info(model: Option<&Path>) -> Result<()> {
    let path = model_dir(model)?;
    let dir = ModelDir::open(&path)?;
    println!("model: {}", path.display());
    if let Some(class) = dir.class_name() {
        println!("pipeline: {class}");
    }
    for (name, spec) in dir.components() {
        let Some(spec) = spec else {
            println!("\n{name}: (none)");
            continue;
        };
        println!("\n{name}: {} ({})", spec.class_name, spec.library);
        if let Ok(config) = dir.config(name) {
            let mut keys: Vec<_> = config
                .0
                .iter()
                .filter(|(k, _)| !k.starts_with('_'))
                .collect();
            keys.sort_by(|a, b| a.0.cmp(b.0));
            for (k, v) in keys {
                println!("  {k}: {v}");
            }
        }
        if let Ok(weights) = dir.weight_files(name, None) {
            let summary = crate::weights::summarize(&weights.files)?;
            println!(
                "  weights: {} file(s), {} tensors, {} parameters, dtypes {}",
                weights.files.len(),
                summary.tensors,
                summary.parameters,
                summary.dtypes.join(", ")
            );
        }
    }
    Ok(())
}

/// `diffusion generate`.
pub fn generate(args: &GenerateArgs) -> Result<()> {
    struct Generate<'a>(&'a GenerateArgs, ImageFormat);
    impl BackendJob for Generate<'_> {
        type Output = ();
        fn run<B: Backend>(self, device: &B::Device) -> Result<()> {
            run::<B>(self.0, self.1, device)
        }
    }
    let format = check_generate_args(args)?;
    args.kernels.apply(args.device, args.dtype);
    on_device(args.device, Generate(args, format))
}

/// Everything about `args` that can be checked without reading a file or loading the
/// model, so that a typo is a one-line error at once rather than after the model has loaded
/// (or after the images are generated, for the output paths): the options'
/// ranges ([`GenerateOptions::check`]), `--strength`, `--mask` without `--init-image`,
/// `--jpeg-quality`, and the output files' formats and folders. Returns the image format.
pub fn check_generate_args(args: &GenerateArgs) -> Result<ImageFormat> {
    options(args).check()?;
    // The library only checks strength where it is used (with an init image); here the
    // flag always has a value, and an out-of-range one is a mistake either way.
    if !(args.strength > 0.0 && args.strength <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "--strength must be in (0, 1], got {}",
            args.strength
        )));
    }
    if args.mask.is_some() && args.init_image.is_none() {
        return Err(Error::InvalidArgument("--mask needs --init-image".into()));
    }
    let flag = |name: &str| {
        let name = name.to_string();
        move |e| match e {
            Error::InvalidArgument(msg) => Error::InvalidArgument(format!("{name} {msg}")),
            other => other,
        }
    };
    let format = ImageFormat::from_path(&args.output).map_err(flag("--output"))?;
    // Checked whatever the format: a bad value is a mistake even for a PNG.
    let format = format
        .with_jpeg_quality(args.jpeg_quality)
        .map_err(flag("--jpeg-quality:"))?;
    check_output_path(&args.output).map_err(flag("--output"))?;
    if let Some(npy) = &args.output_npy {
        if !npy
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
        {
            return Err(Error::InvalidArgument(format!(
                "--output-npy {}: the file name must end in .npy",
                npy.display()
            )));
        }
        check_output_path(npy).map_err(flag("--output-npy"))?;
    }
    Ok(format)
}

/// The generation options the flags give, without the files (init image, mask, latents)
/// that `run` reads.
fn options(args: &GenerateArgs) -> GenerateOptions {
    let mut opts = GenerateOptions::prompt(args.prompt.clone());
    opts.negative_prompts = args.negative_prompt.clone().map(|n| vec![n]);
    opts.steps = args.steps;
    opts.guidance_scale = args.guidance;
    opts.images_per_prompt = args.num_images;
    opts.height = args.height;
    opts.width = args.width;
    opts.strength = args.strength;
    opts
}

/// Work generic over the Burn backend, run by [`on_device`] on the backend `--device` names.
pub trait BackendJob {
    /// What the work returns.
    type Output;
    /// Runs the work on `device` of backend `B`.
    fn run<B: Backend>(self, device: &B::Device) -> Result<Self::Output>;
}

/// Runs `job` on the default device of `kind`'s backend (`f32`): NdArray for `cpu`, wgpu,
/// CUDA; a backend this binary was built without is an [`Error::Unsupported`] naming the
/// cargo feature that adds it.
pub fn on_device<J: BackendJob>(kind: DeviceKind, job: J) -> Result<J::Output> {
    match kind {
        #[cfg(feature = "ndarray")]
        DeviceKind::Cpu => job.run::<burn::backend::NdArray<f32>>(&Default::default()),
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => job.run::<burn::backend::Wgpu<f32>>(&Default::default()),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => {
            diffusion_pipelines::models::nn::kernels::keep_compiled_kernels(&kernel_cache_dir());
            job.run::<burn::backend::Cuda<f32>>(&Default::default())
        }
        #[allow(unreachable_patterns)]
        other => Err(Error::Unsupported(format!(
            "--device {other:?}: this binary was built without that backend (cargo feature `{}`)",
            match other {
                DeviceKind::Cpu => "ndarray",
                DeviceKind::Wgpu => "wgpu",
                DeviceKind::Cuda => "cuda",
            }
        ))),
    }
}

/// Where the CUDA backend keeps the kernels it compiles, across runs:
/// `$DIFFUSION_KERNEL_CACHE`, else `$XDG_CACHE_HOME/diffusion-rs/cuda-kernels`, else
/// `~/.cache/diffusion-rs/cuda-kernels` (a `cubecl.toml` naming a compilation cache wins).
pub fn kernel_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DIFFUSION_KERNEL_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("diffusion-rs").join("cuda-kernels")
}

fn load_mask(path: &Path, width: u32, height: u32) -> Result<Vec<f32>> {
    let img = RgbImage::open(path)?;
    if (img.width, img.height) != (width, height) {
        return Err(Error::InvalidArgument(format!(
            "the mask {} is {}x{}, the image is {width}x{height}",
            path.display(),
            img.width,
            img.height
        )));
    }
    Ok(img
        .pixels
        .chunks_exact(3)
        .map(|p| (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32) / 255.0)
        .collect())
}

fn run<B: Backend>(args: &GenerateArgs, format: ImageFormat, device: &B::Device) -> Result<()> {
    // Before anything is read: a backend without the dtype is a typed error, not a panic.
    let precision = args.dtype.precision();
    precision.check::<B>(device).map_err(|e| match e {
        Error::Unsupported(msg) => Error::Unsupported(format!(
            "--dtype {} on --device {}: {msg}",
            format!("{:?}", args.dtype).to_lowercase(),
            format!("{:?}", args.device).to_lowercase()
        )),
        other => other,
    })?;
    let dir = model_dir(args.model.as_deref())?;
    let mut opts = options(args);
    if let Some(path) = &args.init_image {
        let img = RgbImage::open(path)?;
        let (w, h) = (img.width as usize, img.height as usize);
        if opts.height.is_some_and(|x| x != h) || opts.width.is_some_and(|x| x != w) {
            return Err(Error::InvalidArgument(format!(
                "the init image {} is {w}x{h}, but --width/--height ask for {}x{}",
                path.display(),
                opts.width.unwrap_or(w),
                opts.height.unwrap_or(h)
            )));
        }
        if w % 8 != 0 || h % 8 != 0 {
            return Err(Error::InvalidArgument(format!(
                "the init image {} is {w}x{h}; both sides must be multiples of 8",
                path.display()
            )));
        }
        opts.height = Some(h);
        opts.width = Some(w);
        if let Some(mask) = &args.mask {
            opts.mask = Some(load_mask(mask, img.width, img.height)?);
        }
        opts.init_image = Some(img.to_chw_unit());
    }
    if let Some(path) = &args.latents {
        let arr = NpyArray::read(path)?;
        if arr.shape.len() != 4 || arr.shape[0] != args.num_images {
            return Err(Error::InvalidArgument(format!(
                "{}: latents must be float32 [{}, 4, H/8, W/8], got {:?}",
                path.display(),
                args.num_images,
                arr.shape
            )));
        }
        opts.latents = Some(arr.data);
    }

    // Again with the files read: a strength that leaves no step of the init image's run, or
    // a non-finite latent, is refused before the model loads.
    opts.check()?;
    let load_start = Instant::now();
    let mut pipe =
        StableDiffusionPipeline::<B>::from_pretrained_with_precision(&dir, device, precision)?;
    if let Some(name) = &args.scheduler {
        pipe.set_scheduler_by_name(name)?;
    }
    if let Some(arr) = &args.latents {
        // Checked here, where the model's latent size is known.
        let (h, w) = (
            opts.height.unwrap_or(pipe.default_size().0),
            opts.width.unwrap_or(pipe.default_size().1),
        );
        let f = pipe.vae_scale_factor();
        let expected = args.num_images * 4 * (h / f) * (w / f);
        if opts.latents.as_ref().map(Vec::len) != Some(expected) {
            return Err(Error::InvalidArgument(format!(
                "{}: latents do not fit a {w}x{h} image ([{}, 4, {}, {}])",
                arr.display(),
                args.num_images,
                h / f,
                w / f
            )));
        }
    }
    eprintln!(
        "loaded {} in {:.2}s; sampler {}",
        dir.display(),
        load_start.elapsed().as_secs_f64(),
        pipe.scheduler().name()
    );

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second Ctrl-C while the handler is installed just sets the flag again.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    let start = Instant::now();
    let mut noise = SeededNoise::new(args.seed);
    let result = pipe.generate(&opts, &mut noise, &mut |info, _| {
        bar.set_length(info.total as u64);
        bar.set_position(info.step as u64 + 1);
        if interrupted.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    bar.finish_and_clear();
    let out = result?;
    for t in &out.truncated {
        // One prompt each: the index is always 0.
        let flag = match t.kind {
            PromptKind::Prompt => "--prompt",
            PromptKind::NegativePrompt => "--negative-prompt",
        };
        eprintln!(
            "warning: {flag} is longer than the text encoder's {} tokens; dropped: \"{}\"",
            t.max_tokens,
            t.dropped.replace(char::is_control, " ")
        );
    }
    let total = start.elapsed().as_secs_f64();
    let steps_run = args.steps.max(1);
    eprintln!(
        "{steps_run} steps in {total:.2}s ({:.3}s per step, VAE decode included)",
        total / steps_run as f64
    );

    let metadata = vec![
        ("prompt".to_string(), args.prompt.clone()),
        (
            "negative_prompt".to_string(),
            args.negative_prompt.clone().unwrap_or_default(),
        ),
        ("seed".to_string(), args.seed.to_string()),
        ("steps".to_string(), args.steps.to_string()),
        ("guidance".to_string(), args.guidance.to_string()),
        ("scheduler".to_string(), pipe.scheduler().name().to_string()),
        (
            "dtype".to_string(),
            format!("{:?}", args.dtype).to_lowercase(),
        ),
        ("model".to_string(), dir.display().to_string()),
    ];
    for (i, img) in out.images.iter().enumerate() {
        let path = if out.images.len() == 1 {
            args.output.clone()
        } else {
            numbered(&args.output, i)
        };
        img.save_as(&path, format, &metadata)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.output_npy {
        NpyArray {
            shape: out.shape.to_vec(),
            data: out.array,
        }
        .write(path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn numbered(path: &Path, i: usize) -> PathBuf {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let ext = path.extension().and_then(|s| s.to_str()).unwrap_or("png");
    path.with_file_name(format!("{stem}-{i}.{ext}"))
}
