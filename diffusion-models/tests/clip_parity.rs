//! CLIP text encoders against transformers 5.24 on the tiny fixtures written by
//! `scripts/make_model_fixtures.py` (see `tests/fixtures/README.md`).
//!
//! Tolerance: 1e-5 absolute on every output (hidden states are O(1)).

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use diffusion_core::ModelDir;
use diffusion_models::clip::{ClipTextModel, ClipTextModelWithProjection, ClipTextOutput};
use safetensors::{Dtype, SafeTensors};

type B = NdArray<f32>;

const TOLERANCE: f32 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
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

    fn float<const D: usize>(&self, key: &str) -> Tensor<B, D> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(view.dtype(), Dtype::F32, "{key}");
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

    fn ids(&self, key: &str) -> Tensor<B, 2, Int> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(view.dtype(), Dtype::I64, "{key}");
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

fn max_abs_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).abs().max().into_scalar()
}

/// Compares every recorded output of one encoder; returns the largest error.
fn check(reference: &Reference, prefix: &str, out: &ClipTextOutput<B>, what: &str) -> f32 {
    let mut worst = 0.0f32;
    let mut compare = |name: &str, got: Tensor<B, 3>| {
        let want = reference.float::<3>(&format!("{prefix}{name}"));
        let err = max_abs_diff(got, want);
        println!("{what} {name}: max abs err {err:.3e}");
        assert!(err < TOLERANCE, "{what} {name}: max abs err {err}");
        worst = worst.max(err);
    };
    compare("last_hidden_state", out.last_hidden_state.clone());
    compare(
        "hidden_states_penultimate",
        out.hidden_state_from_end(2).unwrap(),
    );
    let (name, pooled) = match &out.text_embeds {
        Some(t) => ("text_embeds", t.clone()),
        None => ("pooler_output", out.pooler_output.clone()),
    };
    let want = reference.float::<2>(&format!("{prefix}{name}"));
    let err = max_abs_diff(pooled, want);
    println!("{what} {name}: max abs err {err:.3e}");
    assert!(err < TOLERANCE, "{what} {name}: max abs err {err}");
    worst.max(err)
}

#[test]
fn sd1_tiny_text_encoder_matches_transformers() {
    // quick_gelu, legacy eos id 2 (argmax pooling), keys without the `text_model.` prefix.
    let dir = ModelDir::open(fixture("sd1-tiny")).unwrap();
    let reference = Reference::open("sd1-tiny");
    let model = ClipTextModel::<B>::load(&dir, "text_encoder", None, &Default::default()).unwrap();
    let out = model
        .forward(reference.ids("text_encoder.input_ids"))
        .unwrap();
    check(&reference, "text_encoder.", &out, "sd1-tiny");
}

#[test]
fn sd2_tiny_sharded_text_encoder_matches_transformers() {
    // gelu, eos id 999 (first-eos pooling), "!" padding, sharded checkpoint.
    let dir = ModelDir::open(fixture("sd2-tiny")).unwrap();
    assert!(dir.weight_files("text_encoder", None).unwrap().is_sharded());
    let reference = Reference::open("sd2-tiny");
    let model = ClipTextModel::<B>::load(&dir, "text_encoder", None, &Default::default()).unwrap();
    let out = model
        .forward(reference.ids("text_encoder.input_ids"))
        .unwrap();
    check(&reference, "text_encoder.", &out, "sd2-tiny");
}

#[test]
fn sdxl_tiny_both_text_encoders_match_transformers() {
    let dir = ModelDir::open(fixture("unet-sdxl-tiny")).unwrap();
    let reference = Reference::open("unet-sdxl-tiny");
    let device = Default::default();
    let te1 = ClipTextModel::<B>::load(&dir, "text_encoder", None, &device).unwrap();
    let out1 = te1
        .forward(reference.ids("text_encoder.input_ids"))
        .unwrap();
    check(&reference, "text_encoder.", &out1, "sdxl-tiny text_encoder");

    let te2 =
        ClipTextModelWithProjection::<B>::load(&dir, "text_encoder_2", None, &device).unwrap();
    let out2 = te2
        .forward(reference.ids("text_encoder_2.input_ids"))
        .unwrap();
    check(
        &reference,
        "text_encoder_2.",
        &out2,
        "sdxl-tiny text_encoder_2",
    );
}

#[test]
fn legacy_prefixed_keys_load_too() {
    // The SD repositories' text encoders carry `text_model.`-prefixed keys (transformers 4):
    // re-save the fixture's state dict that way and check the outputs are unchanged.
    let src = fixture("sd1-tiny/text_encoder/model.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (format!("text_model.{k}"), v))
        .collect();
    // transformers 4 also saved the position_ids buffer; it must be ignored.
    let position_ids: Vec<u8> = (0..77i64).flat_map(|i| i.to_le_bytes()).collect();
    views.push((
        "text_model.embeddings.position_ids".to_string(),
        safetensors::tensor::TensorView::new(Dtype::I64, vec![1, 77], &position_ids).unwrap(),
    ));
    let tmp = tempfile::tempdir().unwrap();
    let legacy = tmp.path().join("model.safetensors");
    safetensors::serialize_to_file(views, None, &legacy).unwrap();

    let dir = ModelDir::open(fixture("sd1-tiny")).unwrap();
    let config = diffusion_models::clip::ClipTextConfig::from_config_map(
        &dir.config("text_encoder").unwrap(),
    )
    .unwrap();
    let reference = Reference::open("sd1-tiny");
    let model = ClipTextModel::<B>::load_files(&config, &[&legacy], &Default::default()).unwrap();
    let out = model
        .forward(reference.ids("text_encoder.input_ids"))
        .unwrap();
    check(&reference, "text_encoder.", &out, "sd1-tiny (legacy keys)");
}
