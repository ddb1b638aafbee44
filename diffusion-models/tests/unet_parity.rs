//! Parity of the U-Net with diffusers on the tiny fixtures of scripts/make_model_fixtures.py:
//! every fixture, both reference calls (one timestep broadcast over the batch, and one
//! fractional timestep per element), within 1e-4 of the output's scale in f32.

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use diffusion_models::diffusion_core::{Error, ModelDir};
use diffusion_models::nn::{AttentionChunking, ConvAlgorithm, set_conv_algorithm};
use diffusion_models::unet::{ClassLabels, UNet2DConditionModel, UNetConditioning};
use safetensors::{Dtype, SafeTensors};

type B = NdArray<f32>;

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn open(dir: &str) -> Self {
        let path = fixture(dir).join("reference.safetensors");
        Self {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn has(&self, name: &str) -> bool {
        SafeTensors::deserialize(&self.bytes)
            .unwrap()
            .tensor(name)
            .is_ok()
    }

    fn f32<const D: usize>(&self, name: &str) -> Tensor<B, D> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Tensor::from_data(
            TensorData::new(values, view.shape().to_vec()),
            &Default::default(),
        )
    }

    fn i64(&self, name: &str) -> Tensor<B, 1, Int> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(view.dtype(), Dtype::I64, "{name}");
        let values: Vec<i64> = view
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Tensor::from_data(
            TensorData::new(values, view.shape().to_vec()),
            &Default::default(),
        )
    }
}

/// `(max|a - b|, max|b|)`.
fn errors(got: Tensor<B, 4>, want: Tensor<B, 4>) -> (f32, f32) {
    assert_eq!(got.dims(), want.dims());
    let err: f32 = (got - want.clone()).abs().max().into_scalar();
    let scale: f32 = want.abs().max().into_scalar();
    (err, scale)
}

fn conditioning(reference: &Reference) -> UNetConditioning<B> {
    let p = |k: &str| format!("unet.{k}");
    UNetConditioning {
        class_labels: reference
            .has(&p("class_labels"))
            .then(|| ClassLabels::Ids(reference.i64(&p("class_labels")))),
        text_embeds: reference
            .has(&p("text_embeds"))
            .then(|| reference.f32(&p("text_embeds"))),
        time_ids: reference
            .has(&p("time_ids"))
            .then(|| reference.f32(&p("time_ids"))),
        timestep_cond: reference
            .has(&p("timestep_cond"))
            .then(|| reference.f32(&p("timestep_cond"))),
    }
}

/// Loads the U-Net of `dir` (a pipeline folder with `unet/`, or a folder holding `unet/`),
/// runs both reference calls and returns the relative errors.
fn check(dir: &str) -> [f32; 2] {
    let device = Default::default();
    let model_dir = ModelDir::open(fixture(dir)).unwrap();
    let model = UNet2DConditionModel::<B>::load(&model_dir, "unet", None, &device)
        .unwrap_or_else(|e| panic!("{dir}: {e}"));
    let reference = Reference::open(dir);
    let sample = reference.f32::<4>("unet.sample");
    let context = reference.f32::<3>("unet.encoder_hidden_states");
    let cond = conditioning(&reference);
    let mut rel = [0.0; 2];
    for (i, (t, out)) in [("timestep_a", "out_a"), ("timesteps_b", "out_b")]
        .into_iter()
        .enumerate()
    {
        let timesteps = reference.f32::<1>(&format!("unet.{t}"));
        let got = model
            .forward(sample.clone(), timesteps, context.clone(), &cond)
            .unwrap();
        let (err, scale) = errors(got, reference.f32(&format!("unet.{out}")));
        rel[i] = err / scale;
        println!(
            "{dir} {out}: max abs err {err:e}, output max {scale}, relative {:e}",
            rel[i]
        );
        assert!(
            err <= TOLERANCE * scale,
            "{dir} {out}: max abs err {err} > {TOLERANCE} x {scale}"
        );
    }
    rel
}

#[test]
fn sd1_unet_matches_diffusers() {
    check("sd1-tiny");
}

#[test]
fn sd2_unet_linear_projection_per_block_heads_upcast_f16_weights() {
    check("sd2-tiny");
}

#[test]
fn sdxl_unet_text_time_and_transformer_depths() {
    check("unet-sdxl-tiny");
}

#[test]
fn class_conditional_unet() {
    check("unet-classcond-tiny");
}

#[test]
fn lcm_unet_with_timestep_cond() {
    check("unet-lcm-tiny");
}

#[test]
fn inpainting_unet_nine_channels_sharded() {
    check("unet-inpaint-tiny");
}

/// The im2col + matmul convolutions (`ConvAlgorithm::Gemm`, for training) meet the same
/// tolerance against diffusers. The setting is process-wide: other tests of this binary that
/// run meanwhile may use it too, and meet their tolerances either way.
#[test]
fn gemm_convolutions_match_diffusers() {
    set_conv_algorithm(ConvAlgorithm::Gemm);
    let results = std::panic::catch_unwind(|| (check("sd1-tiny"), check("unet-sdxl-tiny")));
    set_conv_algorithm(ConvAlgorithm::Backend);
    if let Err(panic) = results {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn chunked_attention_equals_unchunked_on_the_unet() {
    let device = Default::default();
    let dir = ModelDir::open(fixture("sd1-tiny")).unwrap();
    let mut model = UNet2DConditionModel::<B>::load(&dir, "unet", None, &device).unwrap();
    let reference = Reference::open("sd1-tiny");
    let sample = reference.f32::<4>("unet.sample");
    let context = reference.f32::<3>("unet.encoder_hidden_states");
    let t = reference.f32::<1>("unet.timesteps_b");
    let cond = UNetConditioning::default();
    let full = model
        .forward(sample.clone(), t.clone(), context.clone(), &cond)
        .unwrap();
    model.set_attention_chunking(AttentionChunking::QueryChunks(5));
    let chunked = model.forward(sample, t, context, &cond).unwrap();
    let (err, _) = errors(chunked, full);
    println!("chunked vs unchunked: {err:e}");
    assert!(err <= 1e-5, "{err}");
}

#[test]
fn missing_or_misshaped_conditioning_is_an_error() {
    let device = Default::default();
    let dir = ModelDir::open(fixture("unet-sdxl-tiny")).unwrap();
    let model = UNet2DConditionModel::<B>::load(&dir, "unet", None, &device).unwrap();
    let reference = Reference::open("unet-sdxl-tiny");
    let sample = reference.f32::<4>("unet.sample");
    let context = reference.f32::<3>("unet.encoder_hidden_states");
    let t = reference.f32::<1>("unet.timesteps_b");
    let err = model
        .forward(
            sample.clone(),
            t.clone(),
            context.clone(),
            &UNetConditioning::default(),
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");

    let mut cond = conditioning(&reference);
    cond.time_ids = Some(Tensor::zeros([2, 5], &device));
    let err = model
        .forward(sample.clone(), t.clone(), context.clone(), &cond)
        .unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");

    let three = Tensor::<B, 1>::from_floats([1.0, 2.0, 3.0], &device);
    let err = model
        .forward(sample.clone(), three, context, &conditioning(&reference))
        .unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");

    let narrow = Tensor::<B, 3>::zeros([2, 7, 32], &device);
    let err = model
        .forward(sample, t, narrow, &conditioning(&reference))
        .unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
}

#[test]
fn odd_sized_sample_uses_the_skip_sizes_for_upsampling() {
    let device = Default::default();
    let dir = ModelDir::open(fixture("sd1-tiny")).unwrap();
    let model = UNet2DConditionModel::<B>::load(&dir, "unet", None, &device).unwrap();
    let reference = Reference::open("sd1-tiny-extra");
    let got = model
        .forward(
            reference.f32("unet.sample"),
            reference.f32("unet.timestep"),
            reference.f32("unet.encoder_hidden_states"),
            &UNetConditioning::default(),
        )
        .unwrap();
    let (err, scale) = errors(got, reference.f32("unet.out"));
    println!("sd1-tiny 9x7 sample: max abs err {err:e}, output max {scale}");
    assert!(err <= TOLERANCE * scale, "{err} > {TOLERANCE} x {scale}");
}
