//! Parity of the pixel-space U-Net (`UNet2DModel`) with diffusers on the tiny fixtures of
//! scripts/make_unet2d_fixtures.py: the two DDPM pipeline U-Nets and the variants covering
//! scale-shift / resampling ResNets / legacy attention keys, Fourier and learned time
//! embeddings, and every class-embedding kind. Both reference calls (one timestep per
//! element, one for the whole batch) must match within 1e-4 of the output's scale in f32.

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use diffusion_models::diffusion_core::ModelDir;
use diffusion_models::nn::AttentionChunking;
use diffusion_models::unet::ClassLabels;
use diffusion_models::unet2d::UNet2DModel;
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

    fn dtype(&self, name: &str) -> Option<Dtype> {
        SafeTensors::deserialize(&self.bytes)
            .unwrap()
            .tensor(name)
            .ok()
            .map(|v| v.dtype())
    }

    fn f32<const D: usize>(&self, name: &str) -> Tensor<B, D> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
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

    /// Timesteps as floats (the learned-embedding fixture stores them as int64).
    fn timesteps(&self, name: &str) -> Tensor<B, 1> {
        match self.dtype(name) {
            Some(Dtype::I64) => self.i64(name).float(),
            _ => self.f32(name),
        }
    }

    /// The class labels in the form the model's embedding takes.
    fn class_labels(&self) -> Option<ClassLabels<B>> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st.tensor("class_labels").ok()?;
        Some(match (view.dtype(), view.shape().len()) {
            (Dtype::I64, 1) => ClassLabels::Ids(self.i64("class_labels")),
            (Dtype::F32, 1) => ClassLabels::Timesteps(self.f32("class_labels")),
            (Dtype::F32, 2) => ClassLabels::Vectors(self.f32("class_labels")),
            other => panic!("unexpected class_labels {other:?}"),
        })
    }
}

/// `(max|a - b|, max|b|)`.
fn errors(got: Tensor<B, 4>, want: Tensor<B, 4>) -> (f32, f32) {
    assert_eq!(got.dims(), want.dims());
    let err: f32 = (got - want.clone()).abs().max().into_scalar();
    let scale: f32 = want.abs().max().into_scalar();
    (err, scale)
}

fn check(name: &str, model: &UNet2DModel<B>) {
    let reference = Reference::open(name);
    let sample: Tensor<B, 4> = reference.f32("sample");
    let labels = reference.class_labels();
    assert_eq!(model.is_class_conditional(), labels.is_some(), "{name}");
    for (t_key, out_key) in [("timesteps", "out"), ("scalar_timestep", "out_scalar")] {
        let t = reference.timesteps(t_key);
        let got = model
            .forward(sample.clone(), t, labels.as_ref())
            .unwrap_or_else(|e| panic!("{name} {t_key}: {e}"));
        let (err, scale) = errors(got, reference.f32(out_key));
        println!("{name} {out_key}: max abs err {err:.3e}, scale {scale:.3}");
        assert!(
            err <= TOLERANCE * scale,
            "{name} {out_key}: max abs err {err} > {TOLERANCE} x {scale}"
        );
    }
}

fn pipeline_unet(name: &str) -> UNet2DModel<B> {
    let dir = ModelDir::open(fixture(name)).unwrap();
    UNet2DModel::load(&dir, "unet", None, &Default::default()).unwrap()
}

#[test]
fn ddpm_unconditional() {
    check("ddpm-tiny", &pipeline_unet("ddpm-tiny"));
}

#[test]
fn ddpm_class_conditional() {
    check("ddpm-classcond-tiny", &pipeline_unet("ddpm-classcond-tiny"));
}

#[test]
fn scale_shift_resnet_sampling_legacy_keys_timestep_classes() {
    let name = "unet2d-variants-tiny/scale-shift";
    check(
        name,
        &UNet2DModel::from_dir(fixture(name), &Default::default()).unwrap(),
    );
}

#[test]
fn fourier_time_embedding_identity_classes() {
    let name = "unet2d-variants-tiny/fourier";
    check(
        name,
        &UNet2DModel::from_dir(fixture(name), &Default::default()).unwrap(),
    );
}

#[test]
fn learned_time_embedding_without_mid_block() {
    let name = "unet2d-variants-tiny/learned";
    check(
        name,
        &UNet2DModel::from_dir(fixture(name), &Default::default()).unwrap(),
    );
}

#[test]
fn chunked_attention_gives_the_same_output() {
    let mut model = pipeline_unet("ddpm-tiny");
    let reference = Reference::open("ddpm-tiny");
    let sample: Tensor<B, 4> = reference.f32("sample");
    let t = reference.timesteps("timesteps");
    let full = model.forward(sample.clone(), t.clone(), None).unwrap();
    model.set_attention_chunking(AttentionChunking::QueryChunks(3));
    let chunked = model.forward(sample, t, None).unwrap();
    let diff: f32 = (full - chunked).abs().max().into_scalar();
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn wrong_class_inputs_are_typed_errors() {
    use diffusion_models::diffusion_core::Error;
    let uncond = pipeline_unet("ddpm-tiny");
    let cond = pipeline_unet("ddpm-classcond-tiny");
    let reference = Reference::open("ddpm-classcond-tiny");
    let sample: Tensor<B, 4> = reference.f32("sample");
    let t = reference.timesteps("timesteps");
    let labels = reference.class_labels().unwrap();
    let err = uncond
        .forward(sample.clone(), t.clone(), Some(&labels))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let err = cond.forward(sample.clone(), t.clone(), None).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let one = ClassLabels::Ids(Tensor::from_data(
        TensorData::new(vec![1i64], [1]),
        &Default::default(),
    ));
    let err = cond.forward(sample, t, Some(&one)).unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
}
