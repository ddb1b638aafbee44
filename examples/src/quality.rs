//! `diffusion evaluate`: prompt adherence of a shapes model, per sampler and guidance scale
//! (the table of docs/QUALITY.md).
//!
//! Every run prompts with the full captions ("a small red circle in the top left on a white
//! background") of the [`held_out_scenes`] the trainer never saw, starts each prompt from the
//! same initial latents (one seeded draw per prompt, shared by all runs), and reads colour,
//! background, shape, size and position back from the pixels with [`analyse`].

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::Backend;
use clap::Args;
use diffusion_pipelines::core::{Error, NoiseSource, Result, SeededNoise};
use diffusion_pipelines::data::shapes::{
    AdherenceScore, HELD_OUT_COUNT, ShapeScene, analyse, held_out_scenes,
};
use diffusion_pipelines::image_io::RgbImage;
use diffusion_pipelines::stable_diffusion::{GenerateOptions, StableDiffusionPipeline};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::cli::{BackendJob, DeviceKind, KernelArgs, on_device};

/// `diffusion evaluate` arguments.
#[derive(Debug, Clone, Args)]
pub struct EvaluateArgs {
    /// A diffusers-format shapes model (default: the embedded model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// How many of the 200 held-out scenes to prompt with.
    #[arg(long, default_value_t = HELD_OUT_COUNT)]
    pub prompts: usize,
    /// Guidance scales, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,3,7.5")]
    pub guidance: Vec<f64>,
    /// Samplers as NAME:STEPS, comma-separated (any name the scheduler registry accepts).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ddpm:1000,ddim:50,dpm++2m:20,euler:20,unipc:10"
    )]
    pub samplers: Vec<String>,
    /// Seed of the initial latents (prompt i uses seed + i) and of sampler noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts per pipeline call.
    #[arg(long, default_value_t = 50)]
    pub batch: usize,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Kernel choices (as `diffusion generate`).
    #[command(flatten)]
    pub kernels: KernelArgs,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a grid of each run's first 32 images into this folder.
    #[arg(long)]
    pub grids: Option<PathBuf>,
}

/// One run of the table: a sampler, its steps, a guidance scale and the score.
#[derive(Debug, Clone, Serialize)]
pub struct RunScore {
    /// Registry name of the sampler.
    pub sampler: String,
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// Attribute counts.
    pub score: AdherenceScore,
    /// Wall-clock seconds per image (batched, VAE decode included).
    pub seconds_per_image: f64,
}

fn parse_sampler(spec: &str) -> Result<(String, usize)> {
    let (name, steps) = spec
        .rsplit_once(':')
        .ok_or_else(|| Error::InvalidArgument(format!("--samplers: `{spec}` is not NAME:STEPS")))?;
    let steps = steps
        .parse::<usize>()
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "--samplers: `{steps}` in `{spec}` is not a step count"
            ))
        })?;
    Ok((name.to_string(), steps))
}

/// `diffusion evaluate`.
pub fn evaluate(args: &EvaluateArgs) -> Result<()> {
    struct Evaluate<'a>(&'a EvaluateArgs);
    impl BackendJob for Evaluate<'_> {
        type Output = ();
        fn run<B: Backend>(self, device: &B::Device) -> Result<()> {
            run::<B>(self.0, device)
        }
    }
    args.kernels.apply(args.device, crate::cli::DType::F32);
    on_device(args.device, Evaluate(args))
}

fn run<B: Backend>(args: &EvaluateArgs, device: &B::Device) -> Result<()> {
    if args.prompts == 0 || args.prompts > HELD_OUT_COUNT {
        return Err(Error::InvalidArgument(format!(
            "--prompts must be in 1..={HELD_OUT_COUNT}, got {}",
            args.prompts
        )));
    }
    if args.batch == 0 {
        return Err(Error::InvalidArgument("--batch must be at least 1".into()));
    }
    if let Some(g) = args
        .guidance
        .iter()
        .find(|g| !(g.is_finite() && **g >= 0.0))
    {
        return Err(Error::InvalidArgument(format!(
            "--guidance {g} is not a scale >= 0"
        )));
    }
    let samplers = args
        .samplers
        .iter()
        .map(|s| parse_sampler(s))
        .collect::<Result<Vec<_>>>()?;
    let dir = match &args.model {
        Some(m) => m.clone(),
        None => crate::embedded::default_model_dir()?,
    };
    let mut pipe = StableDiffusionPipeline::<B>::from_pretrained(&dir, device)?;
    for (name, _) in &samplers {
        pipe.set_scheduler_by_name(name)?;
    }
    let scenes: Vec<ShapeScene> = held_out_scenes()[..args.prompts].to_vec();
    let (h, w) = pipe.default_size();
    let f = pipe.vae_scale_factor();
    let per_prompt = 4 * (h / f) * (w / f);
    let latents: Vec<Vec<f32>> = (0..scenes.len())
        .map(|i| {
            let v = SeededNoise::new(args.seed.wrapping_add(i as u64)).sample(&[per_prompt])?;
            Ok(v.into_iter().map(|x| x as f32).collect())
        })
        .collect::<Result<_>>()?;

    let interrupted = crate::train_cli::interrupt_flag();
    let runs = samplers.len() * args.guidance.len();
    let total_steps: usize = samplers.iter().map(|(_, s)| s).sum::<usize>()
        * args.guidance.len()
        * scenes.len().div_ceil(args.batch);
    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} batch-steps [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    let mut results = Vec::with_capacity(runs);
    for (name, steps) in &samplers {
        for &guidance in &args.guidance {
            pipe.set_scheduler_by_name(name)?;
            bar.set_message(format!("{name} {steps} steps, guidance {guidance}"));
            let start = Instant::now();
            let mut score = AdherenceScore::default();
            let mut first_images: Vec<RgbImage> = Vec::new();
            for (chunk, batch) in scenes.chunks(args.batch).enumerate() {
                let offset = chunk * args.batch;
                let mut opts = GenerateOptions::prompt(String::new());
                opts.prompts = batch.iter().map(|s| s.caption()).collect();
                opts.steps = *steps;
                opts.guidance_scale = guidance;
                opts.latents = Some(latents[offset..offset + batch.len()].concat());
                // Sampler noise (DDPM, ancestral samplers): seeded per chunk.
                let mut noise = SeededNoise::new(
                    args.seed ^ 0x9E37_79B9_7F4A_7C15 ^ (chunk as u64).wrapping_mul(0x1000_0001),
                );
                let out = pipe.generate(&opts, &mut noise, &mut |_, _| {
                    bar.inc(1);
                    if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                })?;
                for (scene, image) in batch.iter().zip(&out.images) {
                    score.add(scene, analyse(image).as_ref());
                }
                for image in out.images {
                    if first_images.len() < 32 {
                        first_images.push(image);
                    }
                }
            }
            let seconds_per_image = start.elapsed().as_secs_f64() / scenes.len() as f64;
            if let Some(folder) = &args.grids {
                save_run_grid(folder, name, *steps, guidance, &first_images, &dir)?;
            }
            bar.println(row(name, *steps, guidance, &score, seconds_per_image));
            results.push(RunScore {
                sampler: name.clone(),
                steps: *steps,
                guidance,
                score,
                seconds_per_image,
            });
        }
    }
    bar.finish_and_clear();
    println!("{}", table(&results));
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "model": dir.display().to_string(),
            "prompts": scenes.len(),
            "seed": args.seed,
            "runs": results,
        });
        let text = serde_json::to_string_pretty(&json).expect("scores serialise");
        diffusion_pipelines::image_io::write_atomically(path, |w| {
            std::io::Write::write_all(w, text.as_bytes())
        })?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn pct(score: &AdherenceScore, count: usize) -> String {
    format!("{:.1}", 100.0 * score.rate(count))
}

fn row(name: &str, steps: usize, guidance: f64, s: &AdherenceScore, spi: f64) -> String {
    format!(
        "| {name} | {steps} | {guidance} | {} | {} | {} | {} | {} | {} | {:.4} |",
        pct(s, s.color),
        pct(s, s.position),
        pct(s, s.shape),
        pct(s, s.background),
        pct(s, s.size),
        pct(s, s.all),
        spi
    )
}

/// The results as a Markdown table (percentages of the images).
pub fn table(results: &[RunScore]) -> String {
    let mut out = String::from(
        "| sampler | steps | guidance | colour % | position % | shape % | background % | size % | all five % | s/image |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in results {
        out.push_str(&row(
            &r.sampler,
            r.steps,
            r.guidance,
            &r.score,
            r.seconds_per_image,
        ));
        out.push('\n');
    }
    out
}

fn save_run_grid(
    folder: &Path,
    name: &str,
    steps: usize,
    guidance: f64,
    images: &[RgbImage],
    model: &Path,
) -> Result<()> {
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let meta = vec![
        ("sampler".to_string(), name.to_string()),
        ("steps".to_string(), steps.to_string()),
        ("guidance".to_string(), guidance.to_string()),
        ("model".to_string(), model.display().to_string()),
    ];
    crate::train_cli::save_grid(
        images,
        8,
        &folder.join(format!("{safe}-{steps}-g{guidance}.png")),
        &meta,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_specs_parse_or_fail_clearly() {
        assert_eq!(parse_sampler("dpm++2m:20").unwrap(), ("dpm++2m".into(), 20));
        assert!(parse_sampler("ddim").is_err());
        assert!(parse_sampler("ddim:0").is_err());
        assert!(parse_sampler("ddim:x").is_err());
    }
}
