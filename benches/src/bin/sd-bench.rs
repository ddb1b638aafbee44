//! Times the Stable Diffusion 1.5 components (random weights: speed does not depend on
//! them) and prints a Markdown table row per component.
//!
//! ```text
//! cargo run --release -p diffusion-benches --bin sd-bench [--features cuda] -- \
//!     [--device cpu|wgpu|cuda] [--size 512] [--batch 2] [--iters 5] [--conv backend|gemm]
//! ```
//! `--conv gemm` runs the convolutions as im2col + matmul
//! (`diffusion_models::nn::ConvAlgorithm::Gemm`).
//! The first call of each component is reported separately: GPU backends compile and
//! autotune their kernels on first use.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use diffusion_benches::time;
use diffusion_pipelines::core::{ConfigMap, HostTensor, Result};
use diffusion_pipelines::models::clip::ClipTextConfig;
use diffusion_pipelines::models::nn::{ConvAlgorithm, set_conv_algorithm};
use diffusion_pipelines::models::tensor::BurnTensor;
use diffusion_pipelines::models::unet::{UNet2DConditionConfig, UNetConditioning};
use diffusion_pipelines::models::vae::AutoencoderKLConfig;
use diffusion_pipelines::schedulers::registry;

struct Args {
    device: String,
    size: usize,
    batch: usize,
    iters: usize,
    conv: ConvAlgorithm,
}

fn parse() -> Args {
    let mut a = Args {
        device: "cpu".into(),
        size: 512,
        batch: 2,
        iters: 5,
        conv: ConvAlgorithm::Backend,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < argv.len() {
        let v = argv[i + 1].clone();
        match argv[i].as_str() {
            "--device" => a.device = v,
            "--size" => a.size = v.parse().expect("--size N"),
            "--batch" => a.batch = v.parse().expect("--batch N"),
            "--iters" => a.iters = v.parse().expect("--iters N"),
            "--conv" => {
                a.conv = match v.as_str() {
                    "backend" => ConvAlgorithm::Backend,
                    "gemm" => ConvAlgorithm::Gemm,
                    other => panic!("--conv backend|gemm, got {other}"),
                }
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn run<B: Backend>(args: &Args, device: &B::Device, name: &str) -> Result<()> {
    let lat = args.size / 8;
    let b = args.batch;
    println!("| component | input | first call (ms) | mean (ms) | std (ms) | device |");
    println!("| --- | --- | --- | --- | --- | --- |");

    let clip = ClipTextConfig::sd15().init::<B>(device)?;
    let ids: Vec<i64> = (0..b * 77).map(|i| (i % 1000) as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, 77]), device);
    let (f, m, s) = time(args.iters, || {
        let out = clip.forward(ids.clone()).expect("clip");
        let _ = out.last_hidden_state.into_data();
    });
    println!("| CLIP ViT-L/14 text encoder | {b}x77 tokens | {f:.1} | {m:.1} | {s:.1} | {name} |");
    let context = clip.forward(ids)?.last_hidden_state;
    drop(clip);

    let unet = UNet2DConditionConfig::sd_v1_5().init::<B>(device)?;
    let x = Tensor::<B, 4>::random(
        [b, 4, lat, lat],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        device,
    );
    let t = Tensor::<B, 1>::from_floats([500.0], device);
    let cond = UNetConditioning::default();
    let (f, m, s) = time(args.iters, || {
        let out = unet
            .forward(x.clone(), t.clone(), context.clone(), &cond)
            .expect("unet");
        let _ = out.slice([0..1, 0..1, 0..1, 0..1]).into_data();
    });
    println!("| SD1.5 U-Net (859.5M) | {b}x4x{lat}x{lat} | {f:.1} | {m:.1} | {s:.1} | {name} |");
    drop(unet);

    let vae = AutoencoderKLConfig::sd_v1_5().init::<B>(device)?;
    let z = Tensor::<B, 4>::random(
        [1, 4, lat, lat],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        device,
    );
    let (f, m, s) = time(args.iters.min(3), || {
        let out = vae.decode(z.clone()).expect("vae");
        let _ = out.slice([0..1, 0..1, 0..1, 0..1]).into_data();
    });
    println!(
        "| SD1.5 VAE decode | 1x4x{lat}x{lat} -> {0}x{0} | {f:.1} | {m:.1} | {s:.1} | {name} |",
        args.size
    );
    drop(vae);

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
        let _ = out
            .prev_sample
            .0
            .slice([0..1, 0..1, 0..1, 0..1])
            .into_data();
    });
    println!("| DPM-Solver++(2M) step | 1x4x{lat}x{lat} | {f:.2} | {m:.2} | {s:.2} | {name} |");
    Ok(())
}

fn main() -> Result<()> {
    let args = parse();
    set_conv_algorithm(args.conv);
    println!("convolutions: {:?}", args.conv);
    match args.device.as_str() {
        #[cfg(feature = "ndarray")]
        "cpu" => run::<burn::backend::NdArray<f32>>(&args, &Default::default(), "CPU (ndarray)"),
        #[cfg(feature = "wgpu")]
        "wgpu" => run::<burn::backend::Wgpu<f32>>(&args, &Default::default(), "wgpu"),
        #[cfg(feature = "cuda")]
        "cuda" => run::<burn::backend::Cuda<f32>>(&args, &Default::default(), "CUDA"),
        other => panic!("device {other} not built in (features: ndarray, wgpu, cuda)"),
    }
}
