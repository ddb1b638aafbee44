//! Parity of the VAE with diffusers' `AutoencoderKL` on the tiny fixtures of
//! scripts/make_model_fixtures.py: encode (posterior mean and clamped log-variance), decode,
//! and diffusers' `enable_tiling()` encode/decode with ragged edge tiles, within 1e-4 of the
//! output's scale in f32.

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use diffusion_models::diffusion_core::{Error, ModelDir};
use diffusion_models::nn::{AttentionChunking, ConvAlgorithm, set_conv_algorithm};
use diffusion_models::vae::{AutoencoderKL, VaeTiling};
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

    fn f32(&self, name: &str) -> Tensor<B, 4> {
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

    fn metadata(&self, key: &str) -> String {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).unwrap();
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get(key).cloned())
            .unwrap_or_else(|| panic!("metadata {key}"))
    }
}

fn compare(what: &str, got: Tensor<B, 4>, want: Tensor<B, 4>) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}");
    let err: f32 = (got - want.clone()).abs().max().into_scalar();
    let scale: f32 = want.abs().max().into_scalar();
    println!(
        "{what}: max abs err {err:e}, output max {scale}, relative {:e}",
        err / scale
    );
    assert!(
        err <= TOLERANCE * scale,
        "{what}: max abs err {err} > {TOLERANCE} x {scale}"
    );
    err / scale
}

fn load(dir: &str) -> AutoencoderKL<B> {
    let model_dir = ModelDir::open(fixture(dir)).unwrap();
    AutoencoderKL::<B>::load(&model_dir, "vae", None, &Default::default())
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
}

fn check(dir: &str) {
    let vae = load(dir);
    let reference = Reference::open(dir);
    let posterior = vae.encode(reference.f32("vae.image")).unwrap();
    compare(
        &format!("{dir} latent_mean"),
        posterior.mean.clone(),
        reference.f32("vae.latent_mean"),
    );
    compare(
        &format!("{dir} latent_logvar"),
        posterior.logvar.clone(),
        reference.f32("vae.latent_logvar"),
    );
    let decoded = vae.decode(reference.f32("vae.latent")).unwrap();
    compare(
        &format!("{dir} decoded"),
        decoded,
        reference.f32("vae.decoded"),
    );
}

#[test]
fn sd1_vae_matches_diffusers() {
    check("sd1-tiny");
}

/// The im2col + matmul convolutions (`ConvAlgorithm::Gemm`, for training; including the
/// encoder's bottom/right-padded stride-2 downsamplers) meet the same tolerance against
/// diffusers. The setting is process-wide; other tests of this binary meet their tolerances
/// with either algorithm.
#[test]
fn gemm_convolutions_match_diffusers() {
    set_conv_algorithm(ConvAlgorithm::Gemm);
    let result = std::panic::catch_unwind(|| check("sd1-tiny"));
    set_conv_algorithm(ConvAlgorithm::Backend);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn sd2_vae_matches_diffusers() {
    check("sd2-tiny");
}

#[test]
fn sdxl_vae_matches_diffusers() {
    check("unet-sdxl-tiny");
    assert_eq!(load("unet-sdxl-tiny").scaling_factor, 0.13025);
}

fn extra_tiling(reference: &Reference) -> VaeTiling {
    let parse = |k: &str| reference.metadata(k);
    VaeTiling {
        tile_sample_min_size: parse("vae.tile_sample_min_size").parse().unwrap(),
        tile_latent_min_size: parse("vae.tile_latent_min_size").parse().unwrap(),
        tile_overlap_factor: parse("vae.tile_overlap_factor").parse().unwrap(),
    }
}

#[test]
fn tiled_encode_and_decode_match_diffusers_enable_tiling() {
    let mut vae = load("sd1-tiny");
    let reference = Reference::open("sd1-tiny-extra");
    let tiling = extra_tiling(&reference);

    // Explicit tiled calls.
    let posterior = vae
        .tiled_encode(reference.f32("vae.tiled_image"), &tiling)
        .unwrap();
    compare(
        "tiled latent_mean",
        posterior.mean,
        reference.f32("vae.tiled_latent_mean"),
    );
    compare(
        "tiled latent_logvar",
        posterior.logvar,
        reference.f32("vae.tiled_latent_logvar"),
    );
    let decoded = vae
        .tiled_decode(reference.f32("vae.tiled_latent"), &tiling)
        .unwrap();
    compare("tiled decoded", decoded, reference.f32("vae.tiled_decoded"));

    // Automatic tiling, as enable_tiling() does in diffusers.
    vae.set_tiling(Some(tiling)).unwrap();
    let decoded = vae.decode(reference.f32("vae.tiled_latent")).unwrap();
    compare(
        "auto-tiled decoded",
        decoded,
        reference.f32("vae.tiled_decoded"),
    );
    // A latent no larger than a tile is decoded whole.
    let reference_small = Reference::open("sd1-tiny");
    let small = vae.decode(reference_small.f32("vae.latent")).unwrap();
    compare(
        "untiled small decoded",
        small,
        reference_small.f32("vae.decoded"),
    );
}

#[test]
fn chunked_mid_block_attention_equals_unchunked() {
    let mut vae = load("sd1-tiny");
    let reference = Reference::open("sd1-tiny");
    let latent = reference.f32("vae.latent");
    let full = vae.decode(latent.clone()).unwrap();
    vae.set_attention_chunking(AttentionChunking::QueryChunks(7));
    let chunked = vae.decode(latent).unwrap();
    let err: f32 = (chunked - full).abs().max().into_scalar();
    println!("VAE chunked vs unchunked: {err:e}");
    assert!(err <= 1e-5, "{err}");
}

#[test]
fn bad_inputs_are_errors() {
    let mut vae = load("sd1-tiny");
    let device = Default::default();
    let err = vae
        .decode(Tensor::<B, 4>::zeros([1, 3, 4, 4], &device))
        .unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
    let err = vae
        .encode(Tensor::<B, 4>::zeros([1, 4, 8, 8], &device))
        .unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
    let bad = VaeTiling {
        tile_sample_min_size: 16,
        tile_latent_min_size: 0,
        tile_overlap_factor: 0.25,
    };
    assert!(matches!(
        vae.set_tiling(Some(bad)).unwrap_err(),
        Error::InvalidArgument(_)
    ));
}
