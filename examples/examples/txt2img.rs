//! Text-to-image with the whole sampling loop written out: tokenize, encode, denoise with
//! classifier-free guidance, decode. `StableDiffusionPipeline::generate` does the same with
//! more options.
//!
//! ```text
//! cargo run --release -p diffusion-examples --example txt2img -- MODEL_DIR "a prompt" out.png
//! ```

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use diffusion_pipelines::core::{ModelDir, NoiseSource, Result, SeededNoise};
use diffusion_pipelines::image_io::RgbImage;
use diffusion_pipelines::models::clip::ClipTextModel;
use diffusion_pipelines::models::tensor::BurnTensor;
use diffusion_pipelines::models::tokenizer::ClipTokenizer;
use diffusion_pipelines::models::unet::{UNet2DConditionModel, UNetConditioning};
use diffusion_pipelines::models::vae::AutoencoderKL;
use diffusion_pipelines::schedulers::registry;

type B = NdArray<f32>;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| "diffusion-models/tests/fixtures/sd1-tiny".into());
    let prompt = args
        .next()
        .unwrap_or_else(|| "a red circle on a blue background".into());
    let output = args.next().unwrap_or_else(|| "txt2img.png".into());
    let (steps, guidance, seed) = (20, 7.5, 0);

    let device = Default::default();
    let dir = ModelDir::open(&model)?;
    let tokenizer = ClipTokenizer::from_model_dir(&dir, "tokenizer")?;
    let text_encoder = ClipTextModel::<B>::load(&dir, "text_encoder", None, &device)?;
    let unet = UNet2DConditionModel::<B>::load(&dir, "unet", None, &device)?;
    let vae = AutoencoderKL::<B>::load(&dir, "vae", None, &device)?;
    let mut scheduler =
        registry::from_config::<BurnTensor<B, 4>>("dpm++2m", &dir.config("scheduler")?)?;

    // 1. Text embeddings for the empty prompt (unconditional) and the prompt, in one batch.
    let mut ids = tokenizer.encode("")?;
    ids.extend(tokenizer.encode(&prompt)?);
    let len = ids.len() / 2;
    let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2, len]), &device);
    let context = text_encoder.forward(ids)?.last_hidden_state;

    // 2. Initial noise, drawn on the host so one seed gives one image on every backend.
    let side = dir
        .config("unet")?
        .get("sample_size")
        .and_then(|v| v.as_u64())
        .unwrap_or(64) as usize;
    let shape = [1, vae.latent_channels, side, side];
    let mut noise = SeededNoise::new(seed);
    let eps: Vec<f32> = noise
        .sample(&shape)?
        .into_iter()
        .map(|v| v as f32)
        .collect();
    scheduler.set_timesteps(steps)?;
    let mut latents = Tensor::<B, 4>::from_data(TensorData::new(eps, shape), &device)
        .mul_scalar(scheduler.init_noise_sigma());

    // 3. Denoise: one U-Net call on [uncond, cond], then guidance and a scheduler step.
    for t in scheduler.timesteps().to_vec() {
        let input = Tensor::cat(vec![latents.clone(), latents.clone()], 0);
        let input = scheduler.scale_model_input(&BurnTensor(input), t)?.0;
        let t_in = Tensor::<B, 1>::from_floats([t as f32], &device);
        let pred = unet.forward(input, t_in, context.clone(), &UNetConditioning::default())?;
        let [uncond, cond] = [pred.clone().narrow(0, 0, 1), pred.narrow(0, 1, 1)];
        let guided = uncond.clone() + (cond - uncond) * guidance;
        latents = scheduler
            .step(&BurnTensor(guided), t, &BurnTensor(latents), &mut noise)?
            .prev_sample
            .0;
    }

    // 4. Decode to pixels in [0, 1] and save.
    let image = vae.decode(vae.unscale_latents(latents))?;
    let image = (image / 2.0 + 0.5).clamp(0.0, 1.0);
    let [_, _, h, w] = image.dims();
    let data: Vec<f32> = image
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 data");
    RgbImage::from_chw_unit(&data, h, w)?.save_png(&output, &[("prompt".into(), prompt)])?;
    println!("wrote {output}");
    Ok(())
}
