//! The explicit CUDA kernels of `diffusion_models::nn::kernels` against the plain Burn
//! operations, on the GPU. Needs an NVIDIA GPU, so it is ignored by default:
//!
//! ```text
//! cargo test --release -p diffusion-models --features cuda --test cuda_kernels -- --include-ignored
//! ```
//!
//! Each kernel runs on random inputs of the shapes the SD1.5 U-Net gives it (smaller
//! spatially) and must agree with the backend's own operation, computed in `f32`, to the
//! precision of its products: TF32 tensor-core products for `f32` inputs (10-bit mantissa)
//! and `f16` inputs, both accumulated in `f32`; the bound is 1e-2 of the reference's largest
//! magnitude (a 10-bit mantissa rounds each product by up to 2^-11 = 4.9e-4 relative).
#![cfg(feature = "cuda")]

use burn::backend::Cuda;
use burn::nn::conv::Conv2dConfig;
use burn::nn::{LinearConfig, PaddingConfig2d};
use burn::tensor::{DType, Distribution, FloatDType, Tensor};
use diffusion_models::nn::kernels::fallbacks;
use diffusion_models::nn::{
    AttentionKernel, ConvAlgorithm, ConvKernel, Kernels, MatmulKernel, MatmulStrategy,
    conv_forward, linear, scaled_dot_product, set_conv_algorithm, set_kernels,
};
use diffusion_models::precision::cast_module;

type B = Cuda<f32>;

const BOUND: f64 = 1e-2;

fn rel<const D: usize>(got: Tensor<B, D>, want: Tensor<B, D>) -> f64 {
    let got = got.cast(DType::F32);
    let scale: f32 = want.clone().abs().max().into_scalar();
    let diff: f32 = (got - want).abs().max().into_scalar();
    assert!(diff.is_finite(), "non-finite output");
    diff as f64 / scale.max(1e-12) as f64
}

fn reset() {
    set_conv_algorithm(ConvAlgorithm::Backend);
    set_kernels(Kernels::default());
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn implicit_gemm_convolutions_match_the_backend() {
    let device = Default::default();
    // A 3x3 same-padded convolution, a stride-2 downsampler and a 1x1 shortcut.
    let cases = [
        (
            Conv2dConfig::new([64, 64], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)),
            16,
        ),
        (
            Conv2dConfig::new([64, 128], [3, 3])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)),
            16,
        ),
        (Conv2dConfig::new([128, 64], [1, 1]), 8),
    ];
    for (config, size) in cases {
        reset();
        let conv = config.init::<B>(&device);
        let c_in = conv.weight.dims()[1];
        let x = Tensor::<B, 4>::random(
            [2, c_in, size, size],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let want = conv.forward(x.clone());
        for kernel in [ConvKernel::SyncCmma, ConvKernel::AsyncCmma] {
            for dtype in [FloatDType::F32, FloatDType::F16] {
                set_conv_algorithm(ConvAlgorithm::ImplicitGemm(kernel));
                let before = fallbacks();
                let got = conv_forward(&cast_module(conv.clone(), dtype), x.clone().cast(dtype));
                let err = rel(got, want.clone());
                assert_eq!(fallbacks(), before, "{kernel:?} {dtype:?} fell back");
                assert!(err < BOUND, "{kernel:?} {dtype:?}: relative error {err:e}");
            }
        }
    }
    reset();
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn matmul_strategies_match_the_backend() {
    let device = Default::default();
    let layer = LinearConfig::new(320, 640).init::<B>(&device);
    let x = Tensor::<B, 3>::random([2, 256, 320], Distribution::Normal(0.0, 1.0), &device);
    reset();
    let want = layer.forward(x.clone());
    for strategy in [
        MatmulStrategy::SimpleCyclicCmma,
        MatmulStrategy::DoubleTmaMma,
        MatmulStrategy::SpecializedTmaMma,
    ] {
        let half = cast_module(layer.clone(), FloatDType::F16);
        set_kernels(Kernels {
            matmul: MatmulKernel::Cube(strategy),
            ..Kernels::default()
        });
        let err = rel(linear(&half, x.clone().cast(DType::F16)), want.clone());
        assert!(err < BOUND, "{strategy:?}: relative error {err:e}");
    }
    reset();
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_attention_matches_the_backend_or_falls_back() {
    let device = Default::default();
    // head_dim 64 (flash runs) and 40 (SD1.5's; the flash kernels reject it and fall back).
    for head_dim in [64, 40] {
        let q = Tensor::<B, 4>::random(
            [2, 4, 256, head_dim],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let k = Tensor::<B, 4>::random(
            [2, 4, 77, head_dim],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let v = Tensor::<B, 4>::random(
            [2, 4, 77, head_dim],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        reset();
        let want = scaled_dot_product(q.clone(), k.clone(), v.clone(), None);
        for kernel in [
            AttentionKernel::Flash { planes: 4 },
            AttentionKernel::FlashUnit,
        ] {
            set_kernels(Kernels {
                attention: kernel,
                ..Kernels::default()
            });
            let h = |t: &Tensor<B, 4>| t.clone().cast(DType::F16);
            let err = rel(scaled_dot_product(h(&q), h(&k), h(&v), None), want.clone());
            assert!(
                err < BOUND,
                "{kernel:?}, head_dim {head_dim}: relative error {err:e}"
            );
        }
    }
    reset();
}
