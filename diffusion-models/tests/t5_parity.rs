//! Parity of the T5 encoder with transformers on the `t5-tiny` fixture
//! (scripts/make_model_fixtures.py).

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use diffusion_core::Error;
use diffusion_models::t5::{T5Config, T5EncoderModel};
use safetensors::{Dtype, SafeTensors};

type B = NdArray<f32>;

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

    fn tensor(&self, name: &str) -> (Vec<usize>, Dtype, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        (view.shape().to_vec(), view.dtype(), view.data().to_vec())
    }

    fn f32<const D: usize>(&self, name: &str) -> Tensor<B, D> {
        let (shape, dtype, data) = self.tensor(name);
        assert_eq!(dtype, Dtype::F32, "{name}");
        let values: Vec<f32> = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    fn i64<const D: usize>(&self, name: &str) -> Tensor<B, D, Int> {
        let (shape, dtype, data) = self.tensor(name);
        assert_eq!(dtype, Dtype::I64, "{name}");
        let values: Vec<i64> = data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }
}

/// `max|a - b|` and `max|b|`.
fn max_errors(got: Tensor<B, 3>, want: Tensor<B, 3>) -> (f32, f32) {
    assert_eq!(got.dims(), want.dims());
    let err: f32 = (got - want.clone()).abs().max().into_scalar();
    let scale: f32 = want.abs().max().into_scalar();
    (err, scale)
}

#[test]
fn t5_tiny_matches_transformers() {
    let device = Default::default();
    let model = T5EncoderModel::<B>::from_dir(fixture("t5-tiny"), &device).unwrap();
    let reference = Reference::open("t5-tiny");
    let ids = reference.i64::<2>("input_ids");
    let mask = reference.i64::<2>("attention_mask");

    let masked = model.forward(ids.clone(), Some(mask));
    let (err, scale) = max_errors(masked, reference.f32("last_hidden_state"));
    println!("t5-tiny masked: max abs err {err:e} (output max {scale})");
    assert!(err <= 1e-5, "masked: {err} (scale {scale})");

    let unmasked = model.forward(ids, None);
    let (err, scale) = max_errors(unmasked, reference.f32("last_hidden_state_no_mask"));
    println!("t5-tiny unmasked: max abs err {err:e} (output max {scale})");
    assert!(err <= 1e-5, "unmasked: {err} (scale {scale})");
}

#[test]
fn t5_tiny_config_reads_the_fixture() {
    let config = T5Config::from_file(fixture("t5-tiny").join("config.json")).unwrap();
    assert_eq!(
        (
            config.d_model,
            config.d_kv,
            config.num_heads,
            config.d_ff,
            config.num_layers
        ),
        (32, 8, 4, 37, 2)
    );
    assert!(config.is_gated_act());
    assert_eq!(config.dense_act_fn(), "gelu_new");
    assert_eq!(config.vocab_size, 1000);
}

#[test]
fn loading_a_mismatched_checkpoint_is_an_error() {
    // The sd1 text encoder is a CLIP model: none of its keys fit a T5 encoder.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("t5-tiny").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::copy(
        fixture("sd1-tiny")
            .join("text_encoder")
            .join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let err = T5EncoderModel::<B>::from_dir(dir.path(), &Default::default()).unwrap_err();
    assert!(matches!(err, Error::Weights(_)), "{err}");
}
