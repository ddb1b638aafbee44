//! The pixel-space DDPM pipeline against diffusers 0.42.1 (scripts/make_unet2d_fixtures.py):
//! `DDPMPipeline` on the tiny unconditional fixture with its DDPM scheduler and with DDIM
//! swapped in, and the same loop with class labels on the class-conditional fixture, every
//! random draw replayed. Images must match to 1e-3 max abs on [0, 1].

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::tensor::Tensor;
use diffusion_core::{Error, FixedNoise, SeededNoise};
use diffusion_pipelines::ddpm_pipeline::DdpmPipeline;
use diffusion_pipelines::stable_diffusion::StepInfo;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

type B = NdArray<f32>;

const TOLERANCE: f32 = 1e-3;

fn model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../diffusion-models/tests/fixtures")
        .join(name)
}

/// One recorded run of pipeline.safetensors.
struct Run {
    steps: usize,
    batch: usize,
    scheduler: String,
    draws: Vec<Vec<f64>>,
    images: Vec<f32>,
    shape: Vec<usize>,
    class_labels: Option<Vec<usize>>,
}

fn load_run(fixture: &str, run: &str) -> Run {
    let path = model(fixture).join("pipeline.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta: Value = serde_json::from_str(
        header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(run))
            .unwrap_or_else(|| panic!("no run {run}")),
    )
    .unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let n_draws = meta["draws"].as_u64().unwrap() as usize;
    let draws = (0..n_draws)
        .map(|i| {
            let view = st.tensor(&format!("{run}.draw.{i}")).unwrap();
            assert_eq!(view.dtype(), Dtype::F64);
            view.data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect()
        })
        .collect();
    let view = st.tensor(&format!("{run}.images")).unwrap();
    assert_eq!(view.dtype(), Dtype::F32);
    let images = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let class_labels = st.tensor(&format!("{run}.class_labels")).ok().map(|v| {
        v.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as usize)
            .collect()
    });
    Run {
        steps: meta["steps"].as_u64().unwrap() as usize,
        batch: meta["batch"].as_u64().unwrap() as usize,
        scheduler: meta["scheduler"].as_str().unwrap().to_string(),
        draws,
        images,
        shape: view.shape().to_vec(),
        class_labels,
    }
}

fn no_callback() -> impl FnMut(StepInfo, &Tensor<B, 4>) -> ControlFlow<()> {
    |_, _| ControlFlow::Continue(())
}

/// Runs `run` of `fixture` and returns the max abs error on [0, 1].
fn replay(fixture: &str, run: &str) -> f32 {
    let reference = load_run(fixture, run);
    let mut pipe = DdpmPipeline::<B>::from_pretrained(model(fixture), &Default::default()).unwrap();
    pipe.set_scheduler_by_name(&reference.scheduler).unwrap();
    let mut noise = FixedNoise::new(reference.draws.clone());
    let mut steps_seen = Vec::new();
    let mut callback = |info: StepInfo, x: &Tensor<B, 4>| {
        assert_eq!(x.dims()[0], reference.batch);
        steps_seen.push(info.step);
        ControlFlow::Continue(())
    };
    let out = pipe
        .generate(
            reference.batch,
            reference.steps,
            reference.class_labels.clone(),
            &mut noise,
            &mut callback,
        )
        .unwrap();
    assert_eq!(
        noise.remaining(),
        0,
        "{fixture} {run}: unused recorded draws"
    );
    assert_eq!(steps_seen, (0..reference.steps).collect::<Vec<_>>());
    assert_eq!(out.shape.to_vec(), reference.shape);
    assert_eq!(out.images.len(), reference.batch);
    let err = out
        .array
        .iter()
        .zip(&reference.images)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // The RGB8 images are the rounded floats.
    for (i, image) in out.images.iter().enumerate() {
        let plane = image.pixels.len();
        for (p, &v) in image
            .pixels
            .iter()
            .zip(&out.array[i * plane..(i + 1) * plane])
        {
            assert_eq!(*p, (v * 255.0).round() as u8);
        }
    }
    println!("{fixture} {run}: max abs err {err:.3e}");
    err
}

#[test]
fn ddpm_pipeline_matches_diffusers() {
    let err = replay("ddpm-tiny", "ddpm");
    assert!(err <= TOLERANCE, "{err}");
}

#[test]
fn ddim_swapped_in_matches_diffusers() {
    let err = replay("ddpm-tiny", "ddim");
    assert!(err <= TOLERANCE, "{err}");
}

#[test]
fn class_conditional_matches_the_reference_loop() {
    for run in ["labels-1-3", "labels-2-2-0"] {
        let err = replay("ddpm-classcond-tiny", run);
        assert!(err <= TOLERANCE, "{run}: {err}");
    }
}

#[test]
fn bad_class_labels_are_typed_errors() {
    let device = Default::default();
    let mut uncond = DdpmPipeline::<B>::from_pretrained(model("ddpm-tiny"), &device).unwrap();
    let mut cond =
        DdpmPipeline::<B>::from_pretrained(model("ddpm-classcond-tiny"), &device).unwrap();
    assert_eq!(uncond.num_classes(), None);
    assert_eq!(cond.num_classes(), Some(4));
    let mut noise = SeededNoise::new(0);
    let mut cb = no_callback();
    let mut run = |pipe: &mut DdpmPipeline<B>, batch: usize, labels: Option<Vec<usize>>| {
        pipe.generate(batch, 2, labels, &mut noise, &mut cb)
            .map(|_| ())
            .unwrap_err()
    };
    // Labels for an unconditional model.
    assert!(matches!(
        run(&mut uncond, 2, Some(vec![0, 1])),
        Error::InvalidArgument(_)
    ));
    // No labels, too few, too many, out of range.
    assert!(matches!(run(&mut cond, 2, None), Error::InvalidArgument(_)));
    assert!(matches!(
        run(&mut cond, 2, Some(vec![1])),
        Error::InvalidArgument(_)
    ));
    assert!(matches!(
        run(&mut cond, 1, Some(vec![1, 2])),
        Error::InvalidArgument(_)
    ));
    assert!(matches!(
        run(&mut cond, 2, Some(vec![1, 4])),
        Error::InvalidArgument(_)
    ));
    assert!(matches!(run(&mut cond, 0, None), Error::InvalidArgument(_)));
    // A size the U-Net cannot take.
    uncond.set_sample_size(Some([7, 8]));
    assert!(matches!(
        run(&mut uncond, 1, None),
        Error::InvalidArgument(_)
    ));
}

#[test]
fn other_sizes_samplers_and_interruption() {
    let device = Default::default();
    let mut pipe = DdpmPipeline::<B>::from_pretrained(model("ddpm-tiny"), &device).unwrap();
    assert_eq!(pipe.sample_size().unwrap(), [8, 8]);
    pipe.set_sample_size(Some([4, 6]));
    pipe.set_scheduler_by_name("euler-a").unwrap();
    let out = pipe
        .generate(1, 3, None, &mut SeededNoise::new(1), &mut no_callback())
        .unwrap();
    assert_eq!(out.shape, [1, 4, 6, 3]);
    assert!(out.array.iter().all(|v| (0.0..=1.0).contains(v)));

    let mut stop_after_one = |info: StepInfo, _: &Tensor<B, 4>| {
        if info.step == 0 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let err = pipe
        .generate(1, 3, None, &mut SeededNoise::new(1), &mut stop_after_one)
        .unwrap_err();
    assert!(matches!(err, Error::Interrupted), "{err}");
}

#[test]
fn learned_variance_and_greyscale_models_run() {
    use diffusion_core::ConfigMap;
    use diffusion_models::unet2d::UNet2DConfig;
    use diffusion_schedulers::registry;

    let device = Default::default();
    // One input channel, two output channels: the DDPM sampler splits off the variance.
    let config = UNet2DConfig::from_json(
        r#"{"in_channels": 1, "out_channels": 2, "sample_size": 4,
            "block_out_channels": [4, 8], "norm_num_groups": 2, "attention_head_dim": 4,
            "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}"#,
    )
    .unwrap();
    let unet = config.init::<B>(&device).unwrap();
    let scheduler_config = ConfigMap::parse(
        r#"{"_class_name": "DDPMScheduler", "variance_type": "learned_range"}"#,
        "scheduler",
    )
    .unwrap();
    let scheduler = registry::from_class_config(&scheduler_config).unwrap();
    let mut pipe = DdpmPipeline::from_parts(unet, config, scheduler, scheduler_config, &device);
    let out = pipe
        .generate(2, 4, None, &mut SeededNoise::new(3), &mut no_callback())
        .unwrap();
    assert_eq!(out.shape, [2, 4, 4, 1]);
    assert_eq!(out.images[1].pixels.len(), 4 * 4 * 3);
    assert!(out.array.iter().all(|v| (0.0..=1.0).contains(v)));
}
