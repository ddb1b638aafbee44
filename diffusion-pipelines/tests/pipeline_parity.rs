//! The pipelines against diffusers 0.42.1: text-to-image, image-to-image and inpainting on
//! the tiny SD1-style and SD2-style (v-prediction) fixture models, with diffusers' latents
//! and every random draw it made replayed (scripts/pipeline_reference.py). Images must
//! match to 1e-3 max abs on [0, 1].

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use diffusion_core::{FixedNoise, ModelDir};
use diffusion_models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffusion_pipelines::stable_diffusion::{GenerateOptions, StableDiffusionPipeline};
use safetensors::SafeTensors;
use serde_json::Value;

type B = NdArray<f32>;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../diffusion-models/tests/fixtures")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn flatten(v: &Value, out: &mut Vec<f32>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        Value::Number(n) => out.push(n.as_f64().expect("number") as f32),
        other => panic!("unexpected {other}"),
    }
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().expect("string").to_string())
            .collect(),
        other => panic!("unexpected {other}"),
    }
}

fn options(case: &Value) -> GenerateOptions {
    let get = |k: &str| case.get(k).filter(|v| !v.is_null());
    let mut o = GenerateOptions {
        prompts: strings(&case["prompt"]),
        negative_prompts: get("negative_prompt").map(strings),
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        guidance_rescale: get("guidance_rescale")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        steps: case["num_inference_steps"].as_u64().unwrap() as usize,
        height: get("height").and_then(Value::as_u64).map(|v| v as usize),
        width: get("width").and_then(Value::as_u64).map(|v| v as usize),
        images_per_prompt: get("num_images_per_prompt")
            .and_then(Value::as_u64)
            .unwrap_or(1) as usize,
        clip_skip: get("clip_skip").and_then(Value::as_u64).map(|v| v as usize),
        eta: get("eta").and_then(Value::as_f64),
        strength: get("strength").and_then(Value::as_f64).unwrap_or(0.8),
        ..GenerateOptions::default()
    };
    if let Some(l) = get("latents") {
        let mut v = Vec::new();
        flatten(l, &mut v);
        o.latents = Some(v);
    }
    if let Some(i) = get("init_image") {
        let mut v = Vec::new();
        flatten(i, &mut v);
        o.init_image = Some(v);
    }
    if let Some(m) = get("mask") {
        let mut v = Vec::new();
        flatten(m, &mut v);
        o.mask = Some(v);
    }
    o
}

fn pipeline_for(name: &str) -> StableDiffusionPipeline<B> {
    let device = Default::default();
    let model = name.split('/').next().unwrap();
    match model {
        "sd1-tiny+unet9" => {
            let mut pipe =
                StableDiffusionPipeline::<B>::from_pretrained(models().join("sd1-tiny"), &device)
                    .unwrap();
            let dir = ModelDir::open(models().join("unet-inpaint-tiny")).unwrap();
            let config =
                UNet2DConditionConfig::from_config_map(&dir.config("unet").unwrap()).unwrap();
            let unet = UNet2DConditionModel::load(&dir, "unet", None, &device).unwrap();
            pipe.replace_unet(unet, config);
            pipe
        }
        m => StableDiffusionPipeline::<B>::from_pretrained(models().join(m), &device).unwrap(),
    }
}

#[test]
fn pipelines_match_diffusers() {
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("pipelines.json")).unwrap())
            .unwrap();
    let bytes = std::fs::read(fixtures().join("pipelines.safetensors")).unwrap();
    let outputs = SafeTensors::deserialize(&bytes).unwrap();
    let mut worst = 0f32;
    let mut failures = Vec::new();
    let cases = meta["cases"].as_array().unwrap();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut pipe = pipeline_for(name);
        pipe.set_scheduler_by_name(case["scheduler"].as_str().unwrap())
            .unwrap();
        let draws: Vec<Vec<f64>> = serde_json::from_value(case["noise"].clone()).unwrap();
        let mut noise = FixedNoise::new(draws);
        let out = pipe
            .generate(&options(case), &mut noise, &mut |_, _| {
                ControlFlow::Continue(())
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = outputs.tensor(name).unwrap();
        let want: Vec<f32> = expected
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(
            out.shape.to_vec(),
            expected.shape().to_vec(),
            "{name}: shape"
        );
        let err = out
            .array
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        worst = worst.max(err);
        println!("{name}: max abs error {err:.2e}");
        if err > 1e-3 {
            failures.push(format!("{name}: {err:.3e}"));
        }
    }
    println!("{} cases, worst max abs error {worst:.2e}", cases.len());
    assert!(failures.is_empty(), "cases over 1e-3: {failures:?}");
}
