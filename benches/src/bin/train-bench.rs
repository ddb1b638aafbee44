//! Times one training step's compute (forward, loss, backward; no optimizer update) of the
//! embedded shapes model's U-Net + text encoder and VAE, with the backend's convolutions
//! and with im2col + matmul ones (`diffusion_models::nn::ConvAlgorithm`), and prints a
//! Markdown table row per case.
//!
//! ```text
//! cargo run --release -p diffusion-benches --bin train-bench [--features cuda] -- \
//!     [--device cpu|wgpu|cuda] [--unet-batch 128] [--vae-batch 64] [--iters 5]
//! ```
//! Weights and inputs are random (speed does not depend on them). The first call of each
//! case is reported separately: GPU backends compile their kernels on first use.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use diffusion_benches::time;
use diffusion_pipelines::core::Result;
use diffusion_pipelines::models::nn::{ConvAlgorithm, set_conv_algorithm};
use diffusion_pipelines::train::model::{ModelArchitecture, TextToImageModel};

struct Args {
    device: String,
    unet_batch: usize,
    vae_batch: usize,
    iters: usize,
}

fn parse() -> Args {
    let mut a = Args {
        device: "cpu".into(),
        unet_batch: 128,
        vae_batch: 64,
        iters: 5,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < argv.len() {
        let v = argv[i + 1].clone();
        match argv[i].as_str() {
            "--device" => a.device = v,
            "--unet-batch" => a.unet_batch = v.parse().expect("--unet-batch N"),
            "--vae-batch" => a.vae_batch = v.parse().expect("--vae-batch N"),
            "--iters" => a.iters = v.parse().expect("--iters N"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn run<B: AutodiffBackend>(args: &Args, device: &B::Device, name: &str) -> Result<()> {
    let arch = ModelArchitecture::shapes();
    let side = arch.image_size();
    let latent = side / arch.vae.downsampling_factor();
    println!("| step | batch | convolution | first call (ms) | mean (ms) | std (ms) | device |");
    println!("| --- | ---: | --- | ---: | ---: | ---: | --- |");

    B::seed(device, 0);
    let model = TextToImageModel::<B>::init(&arch.unet, &arch.text_encoder, device)?;
    let vae = arch.vae.init::<B>(device)?;
    let b = args.unet_batch;
    let tokens = 16;
    let ids: Vec<i64> = (0..b * tokens).map(|i| (i % 97) as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, tokens]), device);
    let latents =
        Tensor::<B, 4>::random([b, 4, latent, latent], Distribution::Normal(0., 1.), device);
    let timesteps: Vec<f32> = (0..b).map(|i| ((i * 7919) % 1000) as f32).collect();
    let timesteps = Tensor::<B, 1>::from_data(TensorData::new(timesteps, [b]), device);
    let images = Tensor::<B, 4>::random(
        [args.vae_batch, 3, side, side],
        Distribution::Uniform(-1., 1.),
        device,
    );

    for (label, algorithm) in [
        ("backend", ConvAlgorithm::Backend),
        ("im2col + matmul", ConvAlgorithm::Gemm),
    ] {
        set_conv_algorithm(algorithm);
        let (f, m, s) = time(args.iters, || {
            let pred = model
                .forward(latents.clone(), timesteps.clone(), ids.clone())
                .expect("U-Net forward");
            let loss = (pred - latents.clone()).square().mean();
            let grads = loss.backward();
            sync(model.unet.conv_in.weight.val().grad(&grads));
        });
        println!(
            "| U-Net + text encoder, 4x{latent}x{latent} latents | {b} | {label} | {f:.1} | {m:.1} | {s:.1} | {name} |"
        );
        let (f, m, s) = time(args.iters, || {
            let posterior = vae.encode(images.clone()).expect("VAE encode");
            let recon = vae.decode(posterior.mean).expect("VAE decode");
            let loss = (recon - images.clone()).abs().mean();
            let grads = loss.backward();
            sync(vae.encoder.conv_in.weight.val().grad(&grads));
        });
        println!(
            "| VAE, {side}x{side} images | {} | {label} | {f:.1} | {m:.1} | {s:.1} | {name} |",
            args.vae_batch
        );
    }
    set_conv_algorithm(ConvAlgorithm::Backend);
    Ok(())
}

/// Waits for the backward pass: reads back the gradient of the first convolution, the last
/// one the backward pass computes.
fn sync<B: burn::tensor::backend::Backend>(grad: Option<Tensor<B, 4>>) {
    let grad = grad.expect("the first convolution has a gradient");
    let _ = grad.sum().into_data();
}

fn main() -> Result<()> {
    let args = parse();
    match args.device.as_str() {
        #[cfg(feature = "ndarray")]
        "cpu" => run::<burn::backend::Autodiff<burn::backend::NdArray<f32>>>(
            &args,
            &Default::default(),
            "CPU (NdArray)",
        ),
        #[cfg(feature = "wgpu")]
        "wgpu" => run::<burn::backend::Autodiff<burn::backend::Wgpu<f32>>>(
            &args,
            &Default::default(),
            "wgpu",
        ),
        #[cfg(feature = "cuda")]
        "cuda" => run::<burn::backend::Autodiff<burn::backend::Cuda<f32>>>(
            &args,
            &Default::default(),
            "CUDA",
        ),
        other => panic!("--device {other}: unknown or not compiled in"),
    }
}
