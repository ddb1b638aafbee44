//! Times the Stable Diffusion 1.5 components (random weights: speed does not depend on
//! them) and the whole text-to-image pipeline, and prints Markdown tables.
//!
//! ```text
//! cargo run --release -p diffusion-benches --bin sd-bench [--features cuda] -- \
//!     [--device cpu|wgpu|cuda] [--size 512] [--batch 2] [--iters 5] [--dtype f32|f16|bf16] \
//!     [--conv backend|gemm|igemm-...] [--attention backend|flash2|flash4|flash8|flash-unit] \
//!     [--matmul backend|simple-cyclic-cmma|...] [--only clip,unet,vae,step] \
//!     [--sweep [--sweep-conv LIST] [--sweep-attention LIST] [--sweep-matmul LIST]] [--model DIR [--steps 20,50] [--pipeline-iters 3]]
//! ```
//!
//! - The components (`--only`, default all four) run in `--dtype` with the kernels chosen by
//!   `--conv`, `--attention` and `--matmul` (`diffusion_models::nn::kernels`).
//! - `--sweep` times the U-Net and the VAE decoder under every kernel choice, one operation
//!   at a time (convolution, then attention with the fastest convolution, then linear layers
//!   with both), and reports each output's distance from the `f32` output of the backend's
//!   own kernels, so a faster kernel that is less exact shows as such.
//! - `--model DIR` times the whole pipeline (text encoding, `--steps` DPM-Solver++ steps at
//!   guidance 7.5, VAE decode) on a diffusers folder (e.g. the random SD1.5 weights that
//!   `scripts/bench_diffusers.py --make-model` writes), after timing its load; the load plus
//!   the first image is the first-image time of a new process.
//!
//! The first call of each component is reported separately: GPU backends compile their
//! kernels on first use.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};
use diffusion_benches::time;
use diffusion_pipelines::core::{ConfigMap, HostTensor, Result, SeededNoise};
use diffusion_pipelines::models::clip::ClipTextConfig;
use diffusion_pipelines::models::nn::kernels::fallbacks;
use diffusion_pipelines::models::nn::{
    AttentionKernel, ConvAlgorithm, Kernels, MatmulKernel, conv_algorithm, kernels,
    set_conv_algorithm, set_kernels,
};
use diffusion_pipelines::models::precision::cast_module;
use diffusion_pipelines::models::tensor::BurnTensor;
use diffusion_pipelines::models::unet::{UNet2DConditionConfig, UNetConditioning};
use diffusion_pipelines::models::vae::AutoencoderKLConfig;
use diffusion_pipelines::schedulers::registry;
use diffusion_pipelines::stable_diffusion::{GenerateOptions, Precision, StableDiffusionPipeline};

struct Args {
    device: String,
    size: usize,
    batch: usize,
    iters: usize,
    dtype: FloatDType,
    conv: ConvAlgorithm,
    kernels: Kernels,
    only: Vec<String>,
    sweep: bool,
    model: Option<PathBuf>,
    steps: Vec<usize>,
    pipeline_iters: usize,
    sweep_conv: Vec<ConvAlgorithm>,
    sweep_attention: Vec<AttentionKernel>,
    sweep_matmul: Vec<MatmulKernel>,
}

/// A comma-separated list of kernel names.
fn list<T: std::str::FromStr>(v: &str, flag: &str) -> std::result::Result<Vec<T>, String>
where
    T::Err: std::fmt::Display,
{
    v.split(',')
        .map(|s| s.parse().map_err(|e| format!("{flag}: {e}")))
        .collect()
}

fn parse() -> std::result::Result<Args, String> {
    let mut a = Args {
        device: "cpu".into(),
        size: 512,
        batch: 2,
        iters: 5,
        dtype: FloatDType::F32,
        conv: ConvAlgorithm::Backend,
        kernels: Kernels::default(),
        only: ["clip", "unet", "vae", "step"].map(String::from).to_vec(),
        sweep: false,
        model: None,
        steps: vec![20, 50],
        pipeline_iters: 3,
        sweep_conv: [ConvAlgorithm::Gemm]
            .into_iter()
            .chain(
                diffusion_pipelines::models::nn::ConvKernel::ALL.map(ConvAlgorithm::ImplicitGemm),
            )
            .collect(),
        sweep_attention: AttentionKernel::ALL.to_vec(),
        sweep_matmul: MatmulKernel::all().collect(),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let number = |v: &str, flag: &str| {
        v.parse::<usize>()
            .map_err(|_| format!("{flag} takes a whole number, got `{v}`"))
    };
    while i < argv.len() {
        let flag = argv[i].as_str();
        if flag == "--sweep" {
            a.sweep = true;
            i += 1;
            continue;
        }
        let v = argv
            .get(i + 1)
            .ok_or_else(|| format!("{flag} needs a value"))?
            .clone();
        match flag {
            "--device" => a.device = v,
            "--size" => a.size = number(&v, flag)?,
            "--batch" => a.batch = number(&v, flag)?,
            "--iters" => a.iters = number(&v, flag)?,
            "--pipeline-iters" => a.pipeline_iters = number(&v, flag)?,
            "--dtype" => {
                a.dtype = match v.as_str() {
                    "f32" => FloatDType::F32,
                    "f16" => FloatDType::F16,
                    "bf16" => FloatDType::BF16,
                    other => return Err(format!("--dtype f32|f16|bf16, got `{other}`")),
                }
            }
            "--conv" => a.conv = v.parse().map_err(|e| format!("--conv: {e}"))?,
            "--attention" => {
                a.kernels.attention = v.parse().map_err(|e| format!("--attention: {e}"))?
            }
            "--matmul" => a.kernels.matmul = v.parse().map_err(|e| format!("--matmul: {e}"))?,
            "--sweep-conv" => a.sweep_conv = list(&v, flag)?,
            "--sweep-attention" => a.sweep_attention = list(&v, flag)?,
            "--sweep-matmul" => a.sweep_matmul = list(&v, flag)?,
            "--only" => a.only = v.split(',').map(String::from).collect(),
            "--model" => a.model = Some(PathBuf::from(v)),
            "--steps" => {
                a.steps = v
                    .split(',')
                    .map(|s| number(s, flag))
                    .collect::<std::result::Result<_, _>>()?
            }
            other => return Err(format!("unknown argument {other}")),
        }
        i += 2;
    }
    if !a.size.is_multiple_of(8) || a.size == 0 {
        return Err(format!(
            "--size must be a positive multiple of 8, got {}",
            a.size
        ));
    }
    Ok(a)
}

fn dtype_name(dtype: FloatDType) -> &'static str {
    diffusion_pipelines::models::precision::dtype_name(dtype)
}

fn cast<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: FloatDType) -> Tensor<B, D> {
    let dtype = DType::from(dtype);
    if x.dtype() == dtype { x } else { x.cast(dtype) }
}

/// Forces the GPU to finish by reading one element back.
fn sync<B: Backend>(x: Tensor<B, 4>) {
    let _ = x.slice([0..1, 0..1, 0..1, 0..1]).into_data();
}

fn host<B: Backend, const D: usize>(x: Tensor<B, D>) -> Vec<f32> {
    cast(x, FloatDType::F32)
        .into_data()
        .to_vec::<f32>()
        .expect("f32 data")
}

/// `max |a - b| / max |b|`; infinite where `a` has a non-finite value.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    diff / scale.max(1e-30)
}

fn components<B: Backend>(args: &Args, device: &B::Device, name: &str) -> Result<()> {
    let lat = args.size / 8;
    let b = args.batch;
    let dt = args.dtype;
    let dn = dtype_name(dt);
    let on = |c: &str| args.only.iter().any(|o| o == c);
    println!(
        "\nconvolutions {}, attention {}, linear layers {}, dtype {dn}\n",
        conv_algorithm(),
        kernels().attention,
        kernels().matmul
    );
    println!("| component | input | dtype | first call (ms) | mean (ms) | std (ms) | device |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");

    let ids: Vec<i64> = (0..b * 77).map(|i| (i % 1000) as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, 77]), device);
    let clip = cast_module(ClipTextConfig::sd15().init::<B>(device)?, dt);
    if on("clip") {
        let (f, m, s) = time(args.iters, || {
            let out = clip.forward(ids.clone()).expect("clip");
            let _ = out.last_hidden_state.into_data();
        });
        println!(
            "| CLIP ViT-L/14 text encoder | {b}x77 tokens | {dn} | {f:.1} | {m:.1} | {s:.1} | {name} |"
        );
    }
    let context = clip.forward(ids)?.last_hidden_state;
    drop(clip);

    if on("unet") {
        let unet = cast_module(UNet2DConditionConfig::sd_v1_5().init::<B>(device)?, dt);
        let x = cast(
            Tensor::<B, 4>::random(
                [b, 4, lat, lat],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                device,
            ),
            dt,
        );
        let t = Tensor::<B, 1>::from_floats([500.0], device);
        let cond = UNetConditioning::default();
        let (f, m, s) = time(args.iters, || {
            let out = unet
                .forward(x.clone(), t.clone(), context.clone(), &cond)
                .expect("unet");
            sync(out);
        });
        println!(
            "| SD1.5 U-Net (859.5M) | {b}x4x{lat}x{lat} | {dn} | {f:.1} | {m:.1} | {s:.1} | {name} |"
        );
    }

    if on("vae") {
        let vae = cast_module(AutoencoderKLConfig::sd_v1_5().init::<B>(device)?, dt);
        let z = cast(
            Tensor::<B, 4>::random(
                [1, 4, lat, lat],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                device,
            ),
            dt,
        );
        let (f, m, s) = time(args.iters.min(5), || {
            sync(vae.decode(z.clone()).expect("vae"))
        });
        println!(
            "| SD1.5 VAE decode | 1x4x{lat}x{lat} -> {0}x{0} | {dn} | {f:.1} | {m:.1} | {s:.1} | {name} |",
            args.size
        );
    }

    if on("step") {
        let mut sched = registry::from_config::<BurnTensor<B, 4>>("dpm++2m", &ConfigMap::new())?;
        sched.set_timesteps(1000)?;
        let host = HostTensor::zeros(vec![1, 4, lat, lat]);
        let lat_t = BurnTensor::<B, 4>::from_host(&host, device)?;
        let ts = sched.timesteps().to_vec();
        let mut k = 0;
        let (f, m, s) = time(args.iters.max(20), || {
            let out = sched
                .step(
                    &lat_t,
                    ts[k],
                    &lat_t,
                    &mut diffusion_pipelines::core::NoNoise,
                )
                .expect("step");
            k += 1;
            sync(out.prev_sample.0);
        });
        println!(
            "| DPM-Solver++(2M) step | 1x4x{lat}x{lat} | f32 | {f:.2} | {m:.2} | {s:.2} | {name} |"
        );
    }
    Ok(())
}

/// One kernel configuration of the sweep.
#[derive(Clone, Copy, PartialEq)]
struct Choice {
    conv: ConvAlgorithm,
    kernels: Kernels,
}

impl Choice {
    fn apply(self) {
        set_conv_algorithm(self.conv);
        set_kernels(self.kernels);
    }
}

struct Measured {
    mean: f64,
    err: f64,
}

/// Times `forward` under each choice in turn and prints a row per choice; returns the
/// fastest choice whose error is within twice the first choice's (the backend's kernels in
/// the same dtype) plus 1e-4.
fn sweep_stage(
    stage: &str,
    choices: &[Choice],
    iters: usize,
    reference: &[f32],
    forward: &mut dyn FnMut() -> Vec<f32>,
    sync_forward: &mut dyn FnMut(),
) -> Choice {
    let mut best: Option<(Choice, Measured)> = None;
    let mut limit = f64::INFINITY;
    for (i, &choice) in choices.iter().enumerate() {
        choice.apply();
        let before = fallbacks();
        // A kernel that panics while it is set up (rather than answering with an error) is
        // reported and skipped, so one bad choice does not end the sweep.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let timing = time(iters, &mut *sync_forward);
            (timing, rel_err(&forward(), reference))
        }));
        let Ok(((first, mean, std), err)) = run else {
            println!(
                "| {stage} | {} | {} | {} | panicked | | | | |",
                choice.conv, choice.kernels.attention, choice.kernels.matmul
            );
            continue;
        };
        let fell_back = fallbacks() - before;
        if i == 0 {
            limit = 2.0 * err + 1e-4;
        }
        println!(
            "| {stage} | {} | {} | {} | {first:.1} | {mean:.2} | {std:.2} | {err:.2e} | {fell_back} |",
            choice.conv, choice.kernels.attention, choice.kernels.matmul
        );
        let ok = err <= limit && err.is_finite();
        if ok && best.as_ref().is_none_or(|(_, m)| mean < m.mean) {
            best = Some((choice, Measured { mean, err }));
        }
    }
    let (choice, m) = best.expect("the first choice is always within its own limit");
    println!(
        "| {stage}: fastest | {} | {} | {} | | {:.2} | | {:.2e} | |",
        choice.conv, choice.kernels.attention, choice.kernels.matmul, m.mean, m.err
    );
    choice
}

/// `base`, then `base` with each of `values` put in by `set`.
fn choices<T: Copy>(base: Choice, values: &[T], set: impl Fn(&mut Choice, T)) -> Vec<Choice> {
    let mut all = vec![base];
    for &v in values {
        let mut c = base;
        set(&mut c, v);
        if c != base {
            all.push(c);
        }
    }
    all
}

fn conv_choices(args: &Args, base: Choice) -> Vec<Choice> {
    choices(base, &args.sweep_conv, |c, v| c.conv = v)
}

fn attention_choices(args: &Args, base: Choice) -> Vec<Choice> {
    choices(base, &args.sweep_attention, |c, v| c.kernels.attention = v)
}

fn matmul_choices(args: &Args, base: Choice) -> Vec<Choice> {
    choices(base, &args.sweep_matmul, |c, v| c.kernels.matmul = v)
}

fn sweep<B: Backend>(args: &Args, device: &B::Device) -> Result<()> {
    let lat = args.size / 8;
    let b = args.batch;
    let dt = args.dtype;
    let backend = Choice {
        conv: ConvAlgorithm::Backend,
        kernels: Kernels::default(),
    };
    println!(
        "\nkernel sweep, dtype {}, {b}x4x{lat}x{lat} U-Net, 1x4x{lat}x{lat} VAE decode; error: max |out - out_f32| / max |out_f32|, against the backend's kernels in f32\n",
        dtype_name(dt)
    );
    println!(
        "| stage | conv | attention | matmul | first call (ms) | mean (ms) | std (ms) | rel. error | fallbacks |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");

    // U-Net.
    backend.apply();
    B::seed(device, 0);
    let unet = UNet2DConditionConfig::sd_v1_5().init::<B>(device)?;
    let x = Tensor::<B, 4>::random(
        [b, 4, lat, lat],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        device,
    );
    let context = Tensor::<B, 3>::random(
        [b, 77, 768],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        device,
    );
    let t = Tensor::<B, 1>::from_floats([500.0], device);
    let cond = UNetConditioning::default();
    let reference = host(unet.forward(x.clone(), t.clone(), context.clone(), &cond)?);
    let unet = cast_module(unet, dt);
    let (x, context) = (cast(x, dt), cast(context, dt));
    let forward = || {
        unet.forward(x.clone(), t.clone(), context.clone(), &cond)
            .expect("unet")
    };
    let mut to_host = || host(forward());
    let mut timed = || sync(forward());
    let stages: [fn(&Args, Choice) -> Vec<Choice>; 3] =
        [conv_choices, attention_choices, matmul_choices];
    let unet_best = stages.iter().fold(backend, |best, stage| {
        sweep_stage(
            "U-Net",
            &stage(args, best),
            args.iters,
            &reference,
            &mut to_host,
            &mut timed,
        )
    });
    drop(unet);

    // VAE decoder.
    backend.apply();
    let vae = AutoencoderKLConfig::sd_v1_5().init::<B>(device)?;
    let z = Tensor::<B, 4>::random(
        [1, 4, lat, lat],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        device,
    );
    let reference = host(vae.decode(z.clone())?);
    let vae = cast_module(vae, dt);
    let z = cast(z, dt);
    let decode = || vae.decode(z.clone()).expect("vae");
    let mut to_host = || host(decode());
    let mut timed = || sync(decode());
    let iters = args.iters.min(5);
    let vae_best = stages[..2].iter().fold(backend, |best, stage| {
        sweep_stage(
            "VAE decode",
            &stage(args, best),
            iters,
            &reference,
            &mut to_host,
            &mut timed,
        )
    });
    println!(
        "\nfastest within the error limit: U-Net --conv {} --attention {} --matmul {}; VAE --conv {} --attention {}",
        unet_best.conv,
        unet_best.kernels.attention,
        unet_best.kernels.matmul,
        vae_best.conv,
        vae_best.kernels.attention
    );
    Ok(())
}

fn pipeline<B: Backend>(args: &Args, device: &B::Device, dir: &PathBuf, name: &str) -> Result<()> {
    let precision = match args.dtype {
        FloatDType::F32 => Precision::f32(),
        dt => Precision::half(dt),
    };
    let t0 = Instant::now();
    let mut pipe =
        StableDiffusionPipeline::<B>::from_pretrained_with_precision(dir, device, precision)?;
    let load = t0.elapsed().as_secs_f64() * 1e3;
    println!(
        "\nwhole text-to-image pipeline, {0}x{0}, DPM-Solver++ (the folder's scheduler), guidance 7.5, one image, dtype {1}; load {load:.0} ms\n",
        args.size,
        dtype_name(args.dtype)
    );
    println!(
        "| steps | first image (ms) | mean (ms) | std (ms) | load + first image (s) | device |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (i, &steps) in args.steps.iter().enumerate() {
        let opts = GenerateOptions {
            prompts: vec!["a photograph of an astronaut riding a horse".into()],
            steps,
            guidance_scale: 7.5,
            height: Some(args.size),
            width: Some(args.size),
            ..Default::default()
        };
        let (f, m, s) = time(args.pipeline_iters, || {
            let out = pipe
                .generate(&opts, &mut SeededNoise::new(0), &mut |_, _| {
                    ControlFlow::Continue(())
                })
                .expect("generate");
            assert_eq!(out.images.len(), 1);
        });
        let first = if i == 0 {
            format!("{:.1}", (load + f) / 1e3)
        } else {
            String::new()
        };
        println!("| {steps} | {f:.1} | {m:.1} | {s:.1} | {first} | {name} |");
    }
    Ok(())
}

fn run<B: Backend>(args: &Args, device: &B::Device, name: &str) -> Result<()> {
    if args.sweep {
        sweep::<B>(args, device)?;
    }
    set_conv_algorithm(args.conv);
    set_kernels(args.kernels);
    if let Some(dir) = &args.model {
        pipeline::<B>(args, device, dir, name)?;
    }
    if !args.sweep && args.model.is_none() {
        components::<B>(args, device, name)?;
    }
    Ok(())
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sd-bench: {e}");
            std::process::exit(2);
        }
    };
    let result = match args.device.as_str() {
        #[cfg(feature = "ndarray")]
        "cpu" => run::<burn::backend::NdArray<f32>>(&args, &Default::default(), "CPU (ndarray)"),
        #[cfg(feature = "wgpu")]
        "wgpu" => run::<burn::backend::Wgpu<f32>>(&args, &Default::default(), "wgpu"),
        #[cfg(feature = "cuda")]
        "cuda" => {
            // Compiled kernels are kept between runs, as `diffusion` keeps them
            // (`DIFFUSION_KERNEL_CACHE`, default under the system's temporary folder here).
            let dir = std::env::var_os("DIFFUSION_KERNEL_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| std::env::temp_dir().join("diffusion-rs-cuda-kernels"));
            diffusion_pipelines::models::nn::kernels::keep_compiled_kernels(&dir);
            run::<burn::backend::Cuda<f32>>(&args, &Default::default(), "CUDA")
        }
        other => {
            eprintln!("sd-bench: device {other} not built in (features: ndarray, wgpu, cuda)");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("sd-bench: {e}");
        std::process::exit(1);
    }
}
