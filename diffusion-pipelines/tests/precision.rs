//! The pipeline in reduced precision (`Precision::half(F16 | BF16)`) on burn-flex, the CPU
//! backend with f16 / bf16 tensors, against diffusers 0.42.1 running the same policy
//! (`scripts/pipeline_reference.py --precision`: U-Net and text encoder(s) in the low dtype,
//! VAE, latents, sampler and guidance in f32, attention in f32).
//!
//! The tolerance is derived, not tuned. Let `ref32` be diffusers' f32 image and `ref_lo` its
//! image under the policy in the low dtype; `d = max|ref_lo - ref32|` is the error PyTorch's
//! own rounding to that dtype causes (f16 about 2e-3, bf16 1e-2 to 3.4e-2 on these fixtures).
//! Two implementations that round the same operations to the same dtype are equally far from
//! the f32 result up to the order in which they accumulate, so ours must satisfy
//! `max|ours_lo - ref32| <= 2 d + 1e-3`: at most twice PyTorch's rounding error, plus the
//! 1e-3 the f32 parity test (tests/pipeline_parity.rs) allows between the two
//! implementations. A mistake in the precision handling (a layer left in f32 while its input
//! is f16, a norm computed in f16, f16 latents in the sampler, an f16 VAE) shows up either
//! as a dtype panic or as errors far larger than that. The measured distances are printed.
//!
//! The f32 run on the same backend is held to the f32 parity bound (1e-3), so the backend
//! itself is not what the reduced-precision bound absorbs. With `--features cuda` the same
//! cases run on an NVIDIA GPU too (`cuda_half_precision_...`; CI has no GPU).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::backend::{Flex, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType};
use diffusion_core::{Error, FixedNoise};
use diffusion_models::precision::parameter_dtypes;
use diffusion_pipelines::stable_diffusion::{GenerateOptions, Precision, StableDiffusionPipeline};
use safetensors::SafeTensors;
use serde_json::Value;

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

fn options(case: &Value) -> GenerateOptions {
    let mut latents = Vec::new();
    flatten(&case["latents"], &mut latents);
    GenerateOptions {
        prompts: vec![case["prompt"].as_str().unwrap().to_string()],
        negative_prompts: Some(vec![case["negative_prompt"].as_str().unwrap().to_string()]),
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        steps: case["num_inference_steps"].as_u64().unwrap() as usize,
        height: case["height"].as_u64().map(|v| v as usize),
        width: case["width"].as_u64().map(|v| v as usize),
        latents: Some(latents),
        ..GenerateOptions::default()
    }
}

fn image(outputs: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    outputs
        .tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn run<B: Backend>(case: &Value, precision: Precision, device: &B::Device) -> Vec<f32> {
    let model = case["model"].as_str().unwrap();
    let mut pipe = StableDiffusionPipeline::<B>::from_pretrained_with_precision(
        models().join(model),
        device,
        precision,
    )
    .unwrap();
    assert_eq!(pipe.precision(), precision);
    let parts = pipe.parts();
    let unet_dtype = DType::from(precision.unet);
    assert_eq!(parameter_dtypes(&parts.unet), vec![unet_dtype], "U-Net");
    assert_eq!(
        parameter_dtypes(&parts.text_encoder),
        vec![DType::from(precision.text_encoder)],
        "text encoder"
    );
    assert_eq!(parameter_dtypes(&parts.vae), vec![DType::F32], "VAE");
    pipe.set_scheduler_by_name(case["scheduler"].as_str().unwrap())
        .unwrap();
    let draws: Vec<Vec<f64>> = serde_json::from_value(case["noise"].clone()).unwrap();
    let out = pipe
        .generate(
            &options(case),
            &mut FixedNoise::new(draws),
            &mut |_, latents| {
                // The sampler's latents stay f32 whatever the U-Net's dtype.
                assert_eq!(latents.dtype(), DType::F32);
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    out.array
}

#[test]
fn half_precision_matches_diffusers_within_its_own_rounding_error() {
    check_against_diffusers::<Flex>(&Default::default());
}

/// The same cases and bounds on an NVIDIA GPU (`--features cuda`; CI has no GPU). Ignored
/// until rerun: on an H100 (2026-11-26) it failed, f16 / bf16 images 2.3x to 4.8x PyTorch's
/// own rounding error from diffusers (f16 sd1-tiny 9.5e-3, sd2-tiny 1.7e-2, sdxl-tiny 4.0e-3;
/// bf16 6.2e-2, 7.8e-2, 3.8e-2). The cause, found with a per-kernel probe on the same GPU:
/// CubeCL's direct convolution accumulates in f16 / bf16 (1e-1 / 7.8e-1 relative error on a
/// 4608-term sum). Convolutions now run in f32 (`diffusion_models::nn::conv_forward`); the
/// rerun after that change could not be made. See docs/pipelines.md, *Precision*. Run with
/// `-- --include-ignored cuda`.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "failed on CUDA before convolutions moved to f32; rerun: see the comment"]
fn cuda_half_precision_matches_diffusers_within_its_own_rounding_error() {
    check_against_diffusers::<burn::backend::Cuda>(&Default::default());
}

/// Everything in f16, the VAE included (`vae` set explicitly; `Precision::half` keeps it in
/// f32), through image-to-image, which also runs the VAE encoder and the posterior sampling.
#[test]
fn explicit_f16_vae_runs_image_to_image() {
    all_half_img2img::<Flex>(&Default::default());
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_explicit_f16_vae_runs_image_to_image() {
    all_half_img2img::<burn::backend::Cuda>(&Default::default());
}

fn all_half_img2img<B: Backend>(device: &B::Device) {
    let all_f16 = Precision {
        vae: FloatDType::F16,
        ..Precision::half(FloatDType::F16)
    };
    let (h, w) = (16, 16);
    let init: Vec<f32> = (0..3 * h * w)
        .map(|i| 0.5 + 0.4 * ((i % 97) as f32 / 97.0 - 0.5))
        .collect();
    let opts = GenerateOptions {
        height: Some(h),
        width: Some(w),
        steps: 4,
        strength: 0.6,
        init_image: Some(init),
        ..GenerateOptions::prompt("a red circle on a blue background")
    };
    let mut images = Vec::new();
    for precision in [Precision::f32(), all_f16] {
        let mut pipe = StableDiffusionPipeline::<B>::from_pretrained_with_precision(
            models().join("sd1-tiny"),
            device,
            precision,
        )
        .unwrap();
        pipe.set_scheduler_by_name("ddim").unwrap();
        assert_eq!(
            parameter_dtypes(&pipe.parts().vae),
            vec![DType::from(precision.vae)]
        );
        let out = pipe
            .generate(
                &opts,
                &mut diffusion_core::SeededNoise::new(3),
                &mut |_, _| ControlFlow::Continue(()),
            )
            .unwrap();
        assert!(out.array.iter().all(|v| v.is_finite()));
        images.push(out.array);
    }
    let err = max_abs(&images[0], &images[1]);
    println!("img2img all-f16 vs f32 on {}: {err:.2e}", B::name(device));
    // A sanity bound, an order of magnitude above the f16 text-to-image errors measured
    // against diffusers (<= 4.3e-3): it catches a broken path (garbage, black images), and
    // the f16 run must differ from the f32 one at all.
    assert!(err > 0.0 && err < 5e-2, "{err}");
}

fn check_against_diffusers<B: Backend>(device: &B::Device) {
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("precision.json")).unwrap())
            .unwrap();
    let bytes = std::fs::read(fixtures().join("precision.safetensors")).unwrap();
    let outputs = SafeTensors::deserialize(&bytes).unwrap();
    let cases = meta["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let base = name.rsplit_once('/').unwrap().0;
        let ref32 = image(&outputs, &format!("{base}/f32"));
        let (precision, parity_only) = match case["dtype"].as_str().unwrap() {
            "f32" => (Precision::f32(), true),
            "f16" => (Precision::half(FloatDType::F16), false),
            "bf16" => (Precision::half(FloatDType::BF16), false),
            other => panic!("{name}: dtype {other}"),
        };
        let ours = run::<B>(case, precision, device);
        let err32 = max_abs(&ours, &ref32);
        if parity_only {
            println!(
                "{name}: {} f32 vs diffusers f32 {err32:.2e} (bound 1.0e-3)",
                B::name(device)
            );
            if err32 > 1e-3 {
                failures.push(format!("{name}: {err32:.3e} > 1e-3"));
            }
        } else {
            let reference = image(&outputs, name);
            let d = max_abs(&reference, &ref32);
            let bound = 2.0 * d + 1e-3;
            let err_same = max_abs(&ours, &reference);
            println!(
                "{name}: ours vs diffusers f32 {err32:.2e} (bound {bound:.2e} = 2 x {d:.2e} + 1e-3); \
                 ours vs diffusers same dtype {err_same:.2e}"
            );
            if err32 > bound {
                failures.push(format!("{name}: {err32:.3e} > {bound:.3e}"));
            }
            // Had the networks silently computed in f32, the distance would be at the f32
            // parity level (~1e-6), not near PyTorch's rounding error (>= 1.7e-3 here).
            if err32 < 1e-4 {
                failures.push(format!("{name}: {err32:.3e}: no sign of reduced precision"));
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 9, "three models x f32, f16, bf16");
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn ndarray_rejects_half_precision_before_loading() {
    let device = Default::default();
    for dtype in [FloatDType::F16, FloatDType::BF16] {
        // A folder that does not exist: the dtype check comes first, so the error is about
        // the dtype, not the missing model.
        let result = StableDiffusionPipeline::<NdArray<f32>>::from_pretrained_with_precision(
            "/nonexistent/model",
            &device,
            Precision::half(dtype),
        );
        match result {
            Err(Error::Unsupported(msg)) => {
                assert!(msg.contains("ndarray"), "{msg}");
            }
            Err(other) => panic!("{dtype:?}: expected Error::Unsupported, got {other}"),
            Ok(_) => panic!("{dtype:?}: NdArray accepted a half-precision pipeline"),
        }
    }
    // And on a loaded pipeline: the error leaves it usable in f32.
    let mut pipe = StableDiffusionPipeline::<NdArray<f32>>::from_pretrained(
        models().join("sd1-tiny"),
        &device,
    )
    .unwrap();
    let err = pipe
        .set_precision(Precision::half(FloatDType::F16))
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    assert_eq!(pipe.precision(), Precision::f32());
    assert_eq!(parameter_dtypes(&pipe.parts().unet), vec![DType::F32]);
}

#[test]
fn networks_take_and_return_the_callers_dtype() {
    use burn::tensor::{Distribution, Tensor};
    use diffusion_models::precision::cast_module;
    use diffusion_models::unet::UNetConditioning;

    let device = Default::default();
    let pipe = StableDiffusionPipeline::<Flex>::from_pretrained(models().join("sd1-tiny"), &device)
        .unwrap();
    let parts = pipe.parts();
    let unet = cast_module(parts.unet.clone(), FloatDType::F16);
    assert_eq!(unet.dtype(), DType::F16);
    let width = parts.unet.cross_attention_dim[0];
    let sample = Tensor::<Flex, 4>::random([1, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<Flex, 1>::from_floats([500.0], &device);
    let ctx = Tensor::<Flex, 3>::random([1, 77, width], Distribution::Normal(0.0, 1.0), &device);
    let want = parts
        .unet
        .forward(
            sample.clone(),
            t.clone(),
            ctx.clone(),
            &UNetConditioning::default(),
        )
        .unwrap();
    // f32 in, f32 out, from an f16 model; f16 in, f16 out.
    let got = unet
        .forward(
            sample.clone(),
            t.clone(),
            ctx.clone(),
            &UNetConditioning::default(),
        )
        .unwrap();
    assert_eq!(got.dtype(), DType::F32);
    let err: f32 = (got - want.clone()).abs().max().into_scalar();
    let scale: f32 = want.abs().max().into_scalar();
    // One forward pass in f16 (unit roundoff 4.9e-4): a few roundoffs relative to the scale.
    assert!(err > 0.0 && err < 1e-2 * scale, "{err} vs scale {scale}");
    let half = unet
        .forward(
            sample.cast(FloatDType::F16),
            t,
            ctx.cast(FloatDType::F16),
            &UNetConditioning::default(),
        )
        .unwrap();
    assert_eq!(half.dtype(), DType::F16);

    let vae = cast_module(parts.vae.clone(), FloatDType::BF16);
    assert_eq!(vae.dtype(), DType::BF16);
    let z = Tensor::<Flex, 4>::random([1, 4, 2, 2], Distribution::Normal(0.0, 1.0), &device);
    assert_eq!(vae.decode(z.clone()).unwrap().dtype(), DType::F32);
    let posterior = vae.encode(Tensor::zeros([1, 3, 16, 16], &device)).unwrap();
    assert_eq!(posterior.mean.dtype(), DType::F32);
}

#[test]
fn half_precision_layer_norm_does_not_overflow() {
    use burn::nn::LayerNormConfig;
    use burn::tensor::{Distribution, Tensor};
    use diffusion_models::nn::layer_norm;
    use diffusion_models::precision::cast_module;

    // Activations of a few hundred (CLIP has such outlier features): their squared deviations
    // (~1e5) exceed f16's largest value, 65504, so f16 statistics would be inf.
    let device = Default::default();
    let norm = LayerNormConfig::new(64).init::<Flex>(&device);
    let x = Tensor::<Flex, 3>::random([2, 5, 64], Distribution::Normal(0.0, 300.0), &device);
    let want = layer_norm(&norm, x.clone());
    let half = cast_module(norm, FloatDType::F16);
    let got = layer_norm(&half, x.cast(FloatDType::F16));
    assert_eq!(got.dtype(), DType::F16);
    let got = got.cast(FloatDType::F32);
    assert!(got.clone().is_finite().all().into_scalar());
    let err: f32 = (got - want).abs().max().into_scalar();
    // Normalised values are O(1): the f16 rounding of input and output, ~1e-3 each.
    assert!(err < 1e-2, "{err}");
}
