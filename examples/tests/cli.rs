//! The `diffusion` command end to end: images equal to diffusers' through the CLI, and bad
//! inputs answered with a one-line error and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use diffusion_pipelines::image_io::{NpyArray, RgbImage};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model(name: &str) -> PathBuf {
    root().join("diffusion-models/tests/fixtures").join(name)
}

fn diffusion(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffusion"))
        .args(args)
        .output()
        .expect("run diffusion")
}

fn flatten(v: &Value, out: &mut Vec<f32>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        Value::Number(n) => out.push(n.as_f64().unwrap() as f32),
        other => panic!("unexpected {other}"),
    }
}

fn expected_images(name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes =
        std::fs::read(root().join("diffusion-pipelines/tests/fixtures/pipelines.safetensors"))
            .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let data = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (t.shape().to_vec(), data)
}

/// Deterministic text-to-image cases of the pipeline fixtures, run through the CLI with
/// diffusers' latents (`--latents`), must give diffusers' images (`--output-npy`) to 1e-3.
#[test]
fn cli_matches_diffusers() {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("diffusion-pipelines/tests/fixtures/pipelines.json"))
            .unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let deterministic = ["ddim", "euler", "dpm++2m", "unipc", "pndm"]
            .contains(&case["scheduler"].as_str().unwrap());
        if case["kind"] != "txt2img"
            || !deterministic
            || !case["prompt"].is_string()
            || case.get("eta").is_some()
            || case.get("clip_skip").is_some()
        {
            continue;
        }
        let mut latents = Vec::new();
        flatten(&case["latents"], &mut latents);
        let (lh, lw) = (
            case["height"].as_u64().unwrap() as usize / 2,
            case["width"].as_u64().unwrap() as usize / 2,
        );
        let lat_path = dir.path().join("latents.npy");
        NpyArray {
            shape: vec![1, 4, lh, lw],
            data: latents,
        }
        .write(&lat_path)
        .unwrap();
        let npy = dir.path().join("out.npy");
        let png = dir.path().join("out.png");
        let steps = case["num_inference_steps"].to_string();
        let guidance = case["guidance_scale"].to_string();
        let model_dir = model(name.split('/').next().unwrap());
        let mut args = vec![
            "generate",
            "--model",
            model_dir.to_str().unwrap(),
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--scheduler",
            case["scheduler"].as_str().unwrap(),
            "--steps",
            &steps,
            "--guidance",
            &guidance,
            "--latents",
            lat_path.to_str().unwrap(),
            "--output",
            png.to_str().unwrap(),
            "--output-npy",
            npy.to_str().unwrap(),
        ];
        if let Some(neg) = case.get("negative_prompt").and_then(Value::as_str) {
            args.extend(["--negative-prompt", neg]);
        }
        let out = diffusion(&args);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = NpyArray::read(&npy).unwrap();
        let (shape, want) = expected_images(name);
        assert_eq!(got.shape, shape, "{name}");
        let err = got
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err <= 1e-3, "{name}: max abs error {err}");
        // The PNG is the same image, rounded to 8 bits.
        let img = RgbImage::open(&png).unwrap();
        let back = img
            .pixels
            .iter()
            .zip(&got.data)
            .map(|(p, v)| (*p as f32 / 255.0 - v).abs())
            .fold(0f32, f32::max);
        assert!(back <= 0.5 / 255.0 + 1e-6, "{name}: png rounding {back}");
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} CLI cases ran");
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure, got success");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error:"), "{err}");
    assert!(lines[0].contains(needle), "expected {needle:?} in {err}");
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = model("sd1-tiny");
    let sd1 = sd1.to_str().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();

    // Missing model part.
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for entry in [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
    ] {
        copy_recursively(&model("sd1-tiny").join(entry), &broken.join(entry));
    }
    let out = diffusion(&[
        "generate",
        "--model",
        broken.to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--output",
        &p("a.png"),
    ]);
    assert_one_line_error(&out, "vae");

    // Unknown scheduler.
    let out = diffusion(&[
        "generate",
        "--model",
        sd1,
        "--prompt",
        "x",
        "--scheduler",
        "warp-drive",
        "--output",
        &p("a.png"),
    ]);
    assert_one_line_error(&out, "unknown scheduler");

    // Unreadable latents file.
    std::fs::write(p("bad.npy"), b"not an npy file").unwrap();
    let out = diffusion(&[
        "generate",
        "--model",
        sd1,
        "--prompt",
        "x",
        "--latents",
        &p("bad.npy"),
        "--output",
        &p("a.png"),
    ]);
    assert_one_line_error(&out, "bad.npy");

    // Strength outside (0, 1].
    let img = RgbImage {
        width: 16,
        height: 16,
        pixels: vec![128; 16 * 16 * 3],
    };
    img.save_png(p("init.png"), &[]).unwrap();
    let out = diffusion(&[
        "generate",
        "--model",
        sd1,
        "--prompt",
        "x",
        "--init-image",
        &p("init.png"),
        "--strength",
        "1.5",
        "--output",
        &p("a.png"),
    ]);
    assert_one_line_error(&out, "strength");

    // Wrong image size (not a multiple of 8) and a mask of another size.
    let odd = RgbImage {
        width: 12,
        height: 16,
        pixels: vec![128; 12 * 16 * 3],
    };
    odd.save_png(p("odd.png"), &[]).unwrap();
    let out = diffusion(&[
        "generate",
        "--model",
        sd1,
        "--prompt",
        "x",
        "--init-image",
        &p("odd.png"),
        "--output",
        &p("a.png"),
    ]);
    assert_one_line_error(&out, "multiples of 8");
    let small = RgbImage {
        width: 8,
        height: 8,
        pixels: vec![255; 8 * 8 * 3],
    };
    small.save_png(p("mask.png"), &[]).unwrap();
    let out = diffusion(&[
        "generate",
        "--model",
        sd1,
        "--prompt",
        "x",
        "--init-image",
        &p("init.png"),
        "--mask",
        &p("mask.png"),
        "--output",
        &p("a.png"),
    ]);
    assert_one_line_error(&out, "mask");

    // A non-positive shard size for `train`'s export, refused before any training.
    let out = diffusion(&[
        "train",
        "--stage",
        "vae",
        "--architecture",
        "tiny",
        "--out",
        &p("run"),
        "--max-shard-mb",
        "0",
    ]);
    assert_one_line_error(&out, "--max-shard-mb must be a positive number");
    assert!(!dir.path().join("run").exists());

    // Nothing was written by the failed runs.
    assert!(!dir.path().join("a.png").exists());
}

/// Out-of-range numbers and unusable output paths are refused before the model is loaded:
/// every case names a model folder that does not exist, so an error about anything else
/// shows the check came first.
#[test]
fn bad_numbers_and_outputs_fail_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let missing_model = p("no-such-model");
    let out_png = p("a.png");
    let npy_in_missing = p("missing/a.npy");
    let png_in_missing = p("missing/a.png");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--guidance", "nan"],
            "guidance scale must be a finite number",
        ),
        (
            vec!["--guidance", "inf"],
            "guidance scale must be a finite number",
        ),
        (
            vec!["--guidance=-inf"],
            "guidance scale must be a finite number",
        ),
        (vec!["--steps", "0"], "steps must be in 1..=10000"),
        (vec!["--steps", "10001"], "steps must be in 1..=10000"),
        (vec!["--num-images", "0"], "images per prompt"),
        (vec!["--num-images", "5000"], "images per prompt"),
        (
            vec!["--height", "17"],
            "height must be a positive multiple of 8",
        ),
        (
            vec!["--width", "0"],
            "width must be a positive multiple of 8",
        ),
        (vec!["--width", "32768"], "up to 16384"),
        (vec!["--strength", "nan"], "strength must be in (0, 1]"),
        (
            vec!["--jpeg-quality", "0"],
            "--jpeg-quality: JPEG quality must be in 1..=100",
        ),
        (vec!["--jpeg-quality", "101"], "1..=100, got 101"),
        (
            vec!["--output", "out.gif"],
            "supported extensions: .png, .jpg, .jpeg, .webp",
        ),
        (vec!["--output", "out"], "(no extension)"),
        (vec!["--output", &png_in_missing], "does not exist"),
        (
            vec!["--output", dir.path().to_str().unwrap()],
            "unsupported image format",
        ),
        (vec!["--output-npy", &out_png], "must end in .npy"),
        (vec!["--output-npy", &npy_in_missing], "does not exist"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["generate", "--model", &missing_model, "--prompt", "x"];
        if !extra.contains(&"--output") {
            args.extend(["--output", &out_png]);
        }
        args.extend(extra.iter().copied());
        let out = diffusion(&args);
        assert_one_line_error(&out, needle);
    }
    // A folder named like an image is still a folder.
    let folder = p("dir.png");
    std::fs::create_dir(&folder).unwrap();
    let out = diffusion(&[
        "generate",
        "--model",
        &missing_model,
        "--prompt",
        "x",
        "--output",
        &folder,
    ]);
    assert_one_line_error(&out, "is a folder");
    // The files are read before the model, and the options checked again with them.
    let img = RgbImage {
        width: 16,
        height: 16,
        pixels: vec![128; 16 * 16 * 3],
    };
    img.save_png(p("init.png"), &[]).unwrap();
    let out = diffusion(&[
        "generate",
        "--model",
        &missing_model,
        "--prompt",
        "x",
        "--init-image",
        &p("init.png"),
        "--steps",
        "2",
        "--strength",
        "0.4",
        "--output",
        &out_png,
    ]);
    assert_one_line_error(&out, "leaves no denoising steps");
    let nan_latents = p("nan.npy");
    NpyArray {
        shape: vec![1, 4, 8, 8],
        data: vec![f32::NAN; 4 * 8 * 8],
    }
    .write(&nan_latents)
    .unwrap();
    let out = diffusion(&[
        "generate",
        "--model",
        &missing_model,
        "--prompt",
        "x",
        "--latents",
        &nan_latents,
        "--output",
        &out_png,
    ]);
    assert_one_line_error(&out, "latents must be finite");
    // With good arguments the error is the missing model, as a control.
    let out = diffusion(&[
        "generate",
        "--model",
        &missing_model,
        "--prompt",
        "x",
        "--output",
        &out_png,
    ]);
    assert_one_line_error(&out, "no-such-model");
    assert!(!dir.path().join("a.png").exists());
}

/// `--output` picks the format by extension: PNG with the settings, JPEG at
/// `--jpeg-quality`, lossless WebP; numbered files for several images; the files get the
/// permissions the umask gives a new file (not tempfile's 0600).
#[test]
fn output_formats_follow_the_extension() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = model("sd1-tiny");
    let run = |output: &Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            sd1.to_str().unwrap(),
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--height",
            "16",
            "--width",
            "16",
            "--output",
            output.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = diffusion(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // A prompt that fits gives no warning.
        assert!(!String::from_utf8_lossy(&o.stderr).contains("warning"));
    };
    let png = dir.path().join("a.png");
    let npy = dir.path().join("a.npy");
    run(&png, &["--output-npy", npy.to_str().unwrap()]);
    let reference = RgbImage::open(&png).unwrap();
    let text = diffusion_pipelines::image_io::read_png_text(&png).unwrap();
    assert!(text.contains(&("prompt".to_string(), "a red circle".to_string())));

    let webp = dir.path().join("a.WEBP");
    run(&webp, &[]);
    assert!(std::fs::read(&webp).unwrap().starts_with(b"RIFF"));
    assert_eq!(
        RgbImage::open(&webp).unwrap(),
        reference,
        "WebP is lossless"
    );

    let max_diff = |a: &RgbImage, b: &RgbImage| {
        a.pixels
            .iter()
            .zip(&b.pixels)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap()
    };
    let (q100, q5) = (dir.path().join("q100.jpg"), dir.path().join("q5.jpeg"));
    run(&q100, &["--jpeg-quality", "100"]);
    run(&q5, &["--jpeg-quality", "5"]);
    for path in [&q100, &q5] {
        assert!(std::fs::read(path).unwrap().starts_with(b"\xff\xd8\xff"));
    }
    let (hi, lo) = (RgbImage::open(&q100).unwrap(), RgbImage::open(&q5).unwrap());
    assert_eq!((hi.width, hi.height), (16, 16));
    assert!(
        max_diff(&hi, &reference) < max_diff(&lo, &reference),
        "quality 100 should be closer to the PNG than quality 5"
    );

    let several = dir.path().join("many.jpg");
    run(&several, &["--num-images", "2"]);
    for i in 0..2 {
        assert!(dir.path().join(format!("many-{i}.jpg")).exists());
    }

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let plain = dir.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let want = mode(&plain);
        for path in [&png, &npy, &webp, &q100] {
            assert_eq!(mode(path), want, "{}", path.display());
        }
    }
}

/// A prompt longer than CLIP's 77 tokens is truncated as diffusers does, with one warning
/// line naming the dropped words.
#[test]
fn long_prompts_warn_about_the_dropped_words() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = model("sd1-tiny");
    let out = dir.path().join("long.png");
    // One token per word in the fixture's vocabulary: 100 words, then the words to lose.
    let prompt = vec!["a red"; 50].join(" ") + " the end";
    let o = diffusion(&[
        "generate",
        "--model",
        sd1.to_str().unwrap(),
        "--prompt",
        &prompt,
        "--negative-prompt",
        "blurry",
        "--steps",
        "1",
        "--height",
        "16",
        "--width",
        "16",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].starts_with("warning: --prompt is longer than the text encoder's 77 tokens")
            && warnings[0].ends_with(" the end\""),
        "{err}"
    );
    // 75 prompt tokens fit: what was dropped is the rest, 25 words and "the end".
    let dropped = warnings[0].split("dropped: \"").nth(1).unwrap();
    assert_eq!(dropped.split_whitespace().count(), 27, "{dropped}");
    assert!(out.exists());
}

#[test]
fn tokenize_and_info() {
    let sd1 = model("sd1-tiny");
    let out = diffusion(&["tokenize", "--model", sd1.to_str().unwrap(), "a red circle"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 998);
    let out = diffusion(&["info", "--model", sd1.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("unet: UNet2DConditionModel") && text.contains("parameters"),
        "{text}"
    );
}

fn copy_recursively(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_recursively(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

/// With no `--model`, `generate` runs the embedded shapes model: a 64x64 image with the
/// generation settings in its PNG text chunks.
#[test]
fn generate_uses_the_embedded_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shape.png");
    let o = diffusion(&[
        "generate",
        "--prompt",
        "a red circle on a blue background",
        "--steps",
        "4",
        "--seed",
        "3",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = RgbImage::open(&out).unwrap();
    assert_eq!((img.width, img.height), (64, 64));
    let png = std::fs::read(&out).unwrap();
    let text = String::from_utf8_lossy(&png);
    assert!(text.contains("a red circle on a blue background"));
}

/// `evaluate` scores every (sampler, guidance) pair over the held-out prompts and writes
/// the counts as JSON; bad sampler specs are one-line errors.
#[test]
fn evaluate_writes_scores() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("q.json");
    let o = diffusion(&[
        "evaluate",
        "--prompts",
        "3",
        "--samplers",
        "euler:2,ddim:2",
        "--guidance",
        "1,7.5",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    let pairs: Vec<(String, f64)> = runs
        .iter()
        .map(|r| {
            (
                r["sampler"].as_str().unwrap().to_string(),
                r["guidance"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("euler".to_string(), 1.0),
            ("euler".to_string(), 7.5),
            ("ddim".to_string(), 1.0),
            ("ddim".to_string(), 7.5)
        ]
    );
    for r in runs {
        let s = &r["score"];
        assert_eq!(s["images"], 3);
        for key in ["found", "color", "background", "shape", "size", "position"] {
            assert!(s[key].as_u64().unwrap() <= 3, "{key}");
        }
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("| euler | 2 | 7.5 |"), "{stdout}");
    assert_one_line_error(
        &diffusion(&["evaluate", "--samplers", "euler"]),
        "NAME:STEPS",
    );
    assert_one_line_error(
        &diffusion(&["evaluate", "--samplers", "nonsense:3", "--prompts", "1"]),
        "nonsense",
    );
}
