//! Input checks and truncation reports of `StableDiffusionPipeline::generate`, on the tiny
//! SD1 fixture (`diffusion-models/tests/fixtures/sd1-tiny`: 16x16 images, CLIP window 77).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use diffusion_core::{Error, NoiseSource, Result, SeededNoise};

use super::*;

type B = NdArray<f32>;

fn sd1_tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../diffusion-models/tests/fixtures/sd1-tiny")
}

fn pipeline() -> StableDiffusionPipeline<B> {
    StableDiffusionPipeline::<B>::from_pretrained(sd1_tiny(), &Default::default()).unwrap()
}

/// Counts the noise drawn: zero draws means no latents were made and no VAE ran.
struct CountingNoise(usize);

impl NoiseSource for CountingNoise {
    fn sample(&mut self, shape: &[usize]) -> Result<Vec<f64>> {
        self.0 += 1;
        SeededNoise::new(0).sample(shape)
    }
}

fn small(prompt: &str) -> GenerateOptions {
    GenerateOptions {
        steps: 2,
        height: Some(16),
        width: Some(16),
        ..GenerateOptions::prompt(prompt)
    }
}

/// Each bad value, alone, with the word its message must contain.
fn bad_cases() -> Vec<(GenerateOptions, &'static str)> {
    let base = small("a red circle");
    let with = |f: &dyn Fn(&mut GenerateOptions)| {
        let mut o = base.clone();
        f(&mut o);
        o
    };
    let img = || Some(vec![0.5; 3 * 16 * 16]);
    vec![
        (with(&|o| o.prompts.clear()), "prompt"),
        (
            with(&|o| o.negative_prompts = Some(vec![])),
            "negative prompts",
        ),
        (with(&|o| o.guidance_scale = f64::NAN), "guidance scale"),
        (
            with(&|o| o.guidance_scale = f64::INFINITY),
            "guidance scale",
        ),
        (
            with(&|o| o.guidance_scale = f64::NEG_INFINITY),
            "guidance scale",
        ),
        (with(&|o| o.guidance_rescale = f64::NAN), "guidance rescale"),
        (with(&|o| o.guidance_rescale = 1.5), "guidance rescale"),
        (with(&|o| o.guidance_rescale = -0.1), "guidance rescale"),
        (with(&|o| o.eta = Some(f64::NAN)), "eta"),
        (with(&|o| o.eta = Some(-1.0)), "eta"),
        (with(&|o| o.eta = Some(f64::INFINITY)), "eta"),
        (with(&|o| o.strength = f64::NAN), "strength"),
        (with(&|o| o.strength = 1.5), "strength"),
        (with(&|o| o.strength = -0.5), "strength"),
        (
            with(&|o| {
                o.init_image = img();
                o.strength = 0.0
            }),
            "strength",
        ),
        (
            with(&|o| {
                o.init_image = img();
                o.strength = 0.4 // 2 steps x 0.4: no step left
            }),
            "leaves no denoising steps",
        ),
        (with(&|o| o.steps = 0), "steps"),
        (with(&|o| o.steps = MAX_STEPS + 1), "steps"),
        (with(&|o| o.steps = usize::MAX), "steps"),
        (with(&|o| o.images_per_prompt = 0), "images per prompt"),
        (
            with(&|o| o.images_per_prompt = MAX_IMAGES_PER_PROMPT + 1),
            "images per prompt",
        ),
        (with(&|o| o.height = Some(0)), "height"),
        (with(&|o| o.height = Some(12)), "height"),
        (with(&|o| o.width = Some(MAX_IMAGE_SIDE + 8)), "width"),
        (with(&|o| o.width = Some(usize::MAX)), "width"),
        (
            with(&|o| o.mask = Some(vec![1.0; 16 * 16])),
            "mask needs an init image",
        ),
        (
            with(&|o| o.latents = Some(vec![f32::NAN; 4 * 8 * 8])),
            "latents must be finite",
        ),
        (
            with(&|o| {
                let mut i = img().unwrap();
                i[7] = f32::INFINITY;
                o.init_image = Some(i);
            }),
            "init image must be finite",
        ),
    ]
}

#[test]
fn options_check_needs_no_model() {
    assert!(small("x").check().is_ok());
    assert!(
        GenerateOptions::prompt("x").check().is_ok(),
        "defaults pass"
    );
    let at_bounds = GenerateOptions {
        steps: MAX_STEPS,
        images_per_prompt: MAX_IMAGES_PER_PROMPT,
        height: Some(MAX_IMAGE_SIDE),
        guidance_rescale: 1.0,
        guidance_scale: -3.0,
        eta: Some(0.0),
        strength: 1.0,
        ..GenerateOptions::prompt("x")
    };
    assert!(at_bounds.check().is_ok());
    for (opts, needle) in bad_cases() {
        match opts.check() {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains(needle), "{needle}: {msg}"),
            other => panic!("{needle}: expected InvalidArgument, got {other:?}"),
        }
    }
}

/// `generate` refuses every bad input before drawing noise or calling back, i.e. before
/// the text encoder, the U-Net or the VAE have run.
#[test]
fn generate_rejects_bad_inputs_before_any_work() {
    let mut pipe = pipeline();
    let mut cases: Vec<(GenerateOptions, &str)> = bad_cases();
    // Model-dependent ones: array lengths for this model's latents and image size.
    let base = small("a red circle");
    cases.push((
        GenerateOptions {
            latents: Some(vec![0.0; 7]),
            ..base.clone()
        },
        "latents has 7 values",
    ));
    cases.push((
        GenerateOptions {
            init_image: Some(vec![0.5; 10]),
            ..base.clone()
        },
        "init image has 10 values",
    ));
    cases.push((
        GenerateOptions {
            init_image: Some(vec![0.5; 3 * 16 * 16]),
            mask: Some(vec![1.0; 3]),
            ..base.clone()
        },
        "mask has 3 values",
    ));
    for (opts, needle) in cases {
        let mut noise = CountingNoise(0);
        let mut called = false;
        let result = pipe.generate(&opts, &mut noise, &mut |_, _| {
            called = true;
            ControlFlow::Continue(())
        });
        let msg = match result {
            Err(e @ (Error::InvalidArgument(_) | Error::Shape(_))) => e.to_string(),
            other => panic!("{needle}: expected a typed error, got {other:?}"),
        };
        assert!(msg.contains(needle), "{needle}: {msg}");
        assert_eq!(noise.0, 0, "{needle}: noise drawn before the error");
        assert!(!called, "{needle}");
    }
    // The pipeline still works after the refusals.
    let out = pipe
        .generate(&base, &mut SeededNoise::new(1), &mut |_, _| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(out.shape, [1, 16, 16, 3]);
    assert!(out.truncated.is_empty());
}

#[test]
fn check_inputs_resolves_the_model_size() {
    let pipe = pipeline();
    let opts = GenerateOptions::prompt("x");
    assert_eq!(pipe.check_inputs(&opts).unwrap(), pipe.default_size());
    // The fixture's VAE halves the size, but sides stay multiples of 8.
    let e = pipe
        .check_inputs(&GenerateOptions {
            height: Some(8),
            width: Some(20),
            ..opts
        })
        .unwrap_err();
    assert!(e.to_string().contains("multiple of 8"), "{e}");
}

/// 102 words of one token each in the fixture's vocabulary, far over CLIP's 75 prompt
/// tokens (one-token words keep the cut between words, so kept + dropped is the prompt).
fn long_prompt() -> String {
    vec!["a red"; 50].join(" ") + " the end"
}

#[test]
fn truncated_text_is_what_the_window_leaves_out() {
    let pipe = pipeline();
    let tok = &pipe.parts().tokenizer;
    assert_eq!(truncated_text(tok, "a red circle").unwrap(), None);
    assert_eq!(truncated_text(tok, "").unwrap(), None);
    let long = long_prompt();
    let dropped = truncated_text(tok, &long).unwrap().expect("too long");
    assert!(dropped.ends_with("the end"), "{dropped}");
    // What was kept plus what was dropped is the whole prompt.
    let kept = tok.decode(&tok.encode(&long).unwrap()).unwrap();
    let whole = tok.decode(&tok.encode_unpadded(&long).unwrap()).unwrap();
    assert_eq!(format!("{kept} {dropped}"), whole);
    // Exactly filling the window (75 prompt tokens) is not a truncation; one more is.
    let words = |n: usize| vec!["red"; n].join(" ");
    assert_eq!(tok.encode_unpadded(&words(75)).unwrap().len(), 77);
    assert_eq!(truncated_text(tok, &words(75)).unwrap(), None);
    assert_eq!(
        truncated_text(tok, &words(76)).unwrap().as_deref(),
        Some("red")
    );
}

#[test]
fn generate_reports_truncated_prompts() {
    let mut pipe = pipeline();
    let long = long_prompt();
    let opts = GenerateOptions {
        prompts: vec!["a red circle".into(), long.clone()],
        negative_prompts: Some(vec![long.clone(), "blurry".into()]),
        steps: 1,
        height: Some(16),
        width: Some(16),
        ..GenerateOptions::default()
    };
    let out = pipe
        .generate(&opts, &mut SeededNoise::new(0), &mut |_, _| {
            ControlFlow::Continue(())
        })
        .unwrap();
    let dropped = truncated_text(&pipe.parts().tokenizer, &long)
        .unwrap()
        .unwrap();
    assert_eq!(
        out.truncated,
        vec![
            TruncatedPrompt {
                kind: PromptKind::Prompt,
                index: 1,
                max_tokens: 77,
                dropped: dropped.clone(),
            },
            TruncatedPrompt {
                kind: PromptKind::NegativePrompt,
                index: 0,
                max_tokens: 77,
                dropped: dropped.clone(),
            },
        ]
    );
    let line = out.truncated[0].to_string();
    assert!(
        line.starts_with("prompt #1 was truncated") && line.contains(&dropped),
        "{line}"
    );
    // Without guidance the negative prompts are not encoded, so not reported.
    let out = pipe
        .generate(
            &GenerateOptions {
                guidance_scale: 1.0,
                ..opts
            },
            &mut SeededNoise::new(0),
            &mut |_, _| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(out.truncated.len(), 1);
    assert_eq!(out.truncated[0].kind, PromptKind::Prompt);
}
