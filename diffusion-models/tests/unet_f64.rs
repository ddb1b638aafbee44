//! The U-Net is generic over the float dtype: the sd2-tiny fixture (f16 file) loaded into an
//! `NdArray<f64>` model (the loader converts each tensor to the parameter dtype) matches
//! diffusers too, and its output is f64.
//!
//! This is its own test binary: Burn keeps the default float dtype per device, and
//! `NdArray<f32>` and `NdArray<f64>` share the CPU device, so a process must not mix them.

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::{DType, Tensor, TensorData};
use diffusion_models::diffusion_core::ModelDir;
use diffusion_models::unet::{UNet2DConditionModel, UNetConditioning};
use safetensors::{Dtype, SafeTensors};

type B = NdArray<f64>;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

fn read(bytes: &[u8], name: &str) -> (Vec<f64>, Vec<usize>) {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let view = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(view.dtype(), Dtype::F32, "{name}");
    let values = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
        .collect();
    (values, view.shape().to_vec())
}

fn tensor<const D: usize>(bytes: &[u8], name: &str) -> Tensor<B, D> {
    let (values, shape) = read(bytes, name);
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

#[test]
fn f64_model_matches_diffusers() {
    let device = Default::default();
    let dir = ModelDir::open(fixture("sd2-tiny")).unwrap();
    let model = UNet2DConditionModel::<B>::load(&dir, "unet", None, &device).unwrap();
    let bytes = std::fs::read(fixture("sd2-tiny").join("reference.safetensors")).unwrap();
    let got = model
        .forward(
            tensor(&bytes, "unet.sample"),
            tensor(&bytes, "unet.timesteps_b"),
            tensor(&bytes, "unet.encoder_hidden_states"),
            &UNetConditioning::default(),
        )
        .unwrap();
    assert_eq!(got.dtype(), DType::F64);
    let got: Vec<f64> = got.into_data().to_vec().unwrap();
    let (want, _) = read(&bytes, "unet.out_b");
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
    println!("sd2-tiny in f64: max abs err {err:e}, output max {scale}");
    assert!(err <= 1e-4 * scale, "{err} > 1e-4 x {scale}");
}
