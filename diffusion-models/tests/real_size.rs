//! The real Stable Diffusion architectures, built from the presets with random weights:
//! parameter counts equal diffusers' / transformers' exactly, and (ignored by default: slow
//! on CI) one CPU forward pass of each at real size.
//!
//! Reference counts: `sum(p.numel() for p in model.parameters())` of diffusers 0.42.1 /
//! transformers 5.24 models built from the published configs.

use std::time::Instant;

use burn::backend::NdArray;
use burn::module::Module;
use burn::tensor::{Distribution, Int, Tensor};
use diffusion_models::clip::ClipTextConfig;
use diffusion_models::nn::parameter_count;
use diffusion_models::unet::{UNet2DConditionConfig, UNetConditioning};
use diffusion_models::vae::AutoencoderKLConfig;

type B = NdArray<f32>;

const SD15_UNET_PARAMS: usize = 859_520_964;
const SD21_UNET_PARAMS: usize = 865_910_724;
const SDXL_UNET_PARAMS: usize = 2_567_463_684;
const SD_VAE_PARAMS: usize = 83_653_863;
const SD15_CLIP_PARAMS: usize = 123_060_480;

/// Parameters are initialised lazily and [`parameter_count`] reads only their shapes, so this
/// allocates nothing.
#[test]
fn parameter_counts_equal_diffusers() {
    let device = Default::default();
    for (name, config, expected) in [
        ("SD 1.5", UNet2DConditionConfig::sd_v1_5(), SD15_UNET_PARAMS),
        ("SD 2.1", UNet2DConditionConfig::sd_v2_1(), SD21_UNET_PARAMS),
        (
            "SDXL base",
            UNet2DConditionConfig::sdxl_base(),
            SDXL_UNET_PARAMS,
        ),
    ] {
        let count = parameter_count(&config.init::<B>(&device).unwrap());
        println!("{name} U-Net: {count} parameters");
        assert_eq!(count, expected, "{name} U-Net");
    }
    for (name, config) in [
        ("SD 1.5", AutoencoderKLConfig::sd_v1_5()),
        ("SDXL", AutoencoderKLConfig::sdxl()),
    ] {
        let count = parameter_count(&config.init::<B>(&device).unwrap());
        println!("{name} VAE: {count} parameters");
        assert_eq!(count, SD_VAE_PARAMS, "{name} VAE");
    }
    let count = parameter_count(&ClipTextConfig::sd15().init::<B>(&device).unwrap());
    println!("SD 1.5 CLIP text encoder: {count} parameters");
    assert_eq!(count, SD15_CLIP_PARAMS);
}

#[test]
#[ignore = "slow on CI"]
fn sd15_components_run_at_real_size_on_cpu() {
    let device = Default::default();

    let clip = ClipTextConfig::sd15().init::<B>(&device).unwrap();
    assert_eq!(clip.num_params(), SD15_CLIP_PARAMS);
    let ids = Tensor::<B, 2, Int>::from_ints([[0i64; 77]], &device);
    let start = Instant::now();
    let text = clip.forward(ids).unwrap();
    let [b, s, d] = text.last_hidden_state.dims();
    println!("CLIP forward [1, 77]: {:?}", start.elapsed());
    assert_eq!([b, s, d], [1, 77, 768]);
    let context = text.last_hidden_state;
    drop(clip);

    let unet = UNet2DConditionConfig::sd_v1_5().init::<B>(&device).unwrap();
    assert_eq!(unet.num_params(), SD15_UNET_PARAMS);
    let latent = Tensor::<B, 4>::random([1, 4, 64, 64], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<B, 1>::from_floats([999.0], &device);
    let start = Instant::now();
    let out = unet
        .forward(latent.clone(), t, context, &UNetConditioning::default())
        .unwrap();
    println!("U-Net forward [1, 4, 64, 64]: {:?}", start.elapsed());
    assert_eq!(out.dims(), [1, 4, 64, 64]);
    let finite: bool = out.is_finite().all().into_scalar();
    assert!(finite);
    drop(unet);

    let vae = AutoencoderKLConfig::sd_v1_5().init::<B>(&device).unwrap();
    assert_eq!(vae.num_params(), SD_VAE_PARAMS);
    let small = latent.slice([0..1, 0..4, 0..32, 0..32]);
    let start = Instant::now();
    let image = vae.decode(vae.unscale_latents(small)).unwrap();
    println!("VAE decode [1, 4, 32, 32]: {:?}", start.elapsed());
    assert_eq!(image.dims(), [1, 3, 256, 256]);
    let start = Instant::now();
    let posterior = vae.encode(image).unwrap();
    println!("VAE encode [1, 3, 256, 256]: {:?}", start.elapsed());
    assert_eq!(posterior.mean.dims(), [1, 4, 32, 32]);
}
