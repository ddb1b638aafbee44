//! Building blocks shared by the U-Net and the VAE, mirroring diffusers' modules.
//!
//! Every layer follows burn-nn's style: an `XConfig` (`#[derive(Config)]`) whose `init`
//! builds the module `X` (`#[derive(Module)]`). Field names equal the keys of diffusers'
//! state dicts (`to_q`, `ff.net.0.proj`, `time_emb_proj`, ...) so that weights load by a
//! direct path match through burn-store's PyTorch adapter. Containers that are a PyTorch
//! `nn.ModuleList` of mixed layers (`ff.net`) or a layer whose type depends on the config
//! (`proj_in`: `Conv2d` or `Linear`) are Burn enums; loading therefore uses
//! `skip_enum_variants(true)`, so the variant name does not appear in the key.

pub mod activation;
pub mod attention;
pub mod conv;
#[cfg(feature = "cuda")]
mod cuda;
pub mod downsample;
pub mod embeddings;
pub mod feed_forward;
pub mod kernels;
pub mod resnet;
pub mod transformer_2d;
pub mod transformer_block;
pub mod upsample;

pub use activation::Activation;
pub use attention::{Attention, AttentionChunking, AttentionConfig};
pub use conv::{ConvAlgorithm, conv_algorithm, conv_forward, conv2d_gemm, set_conv_algorithm};
pub use downsample::{Downsample2D, Downsample2DConfig};
pub use embeddings::{TimestepEmbedding, TimestepEmbeddingConfig, Timesteps};
pub use feed_forward::{
    FeedForward, FeedForwardActivation, FeedForwardConfig, FeedForwardLayer, GeGlu,
};
pub use kernels::{
    AttentionKernel, ConvKernel, Kernels, MatmulKernel, MatmulStrategy, kernels, linear,
    scaled_dot_product, set_kernels,
};
pub use resnet::{ResnetBlock2D, ResnetBlock2DConfig, TimeEmbeddingNorm};
pub use transformer_2d::{Projection, Transformer2DModel, Transformer2DModelConfig};
pub use transformer_block::{BasicTransformerBlock, BasicTransformerBlockConfig};
pub use upsample::{Upsample2D, Upsample2DConfig};

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{GroupNorm, LayerNorm};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, FloatDType, Int, Tensor};

/// Counts the parameters of `module` without initialising them.
///
/// Burn initialises parameters lazily (a freshly built model allocates nothing until a
/// tensor is used or loaded over); [`Module::num_params`] reads every tensor and so
/// materialises the random initialisation, which for an SDXL U-Net means allocating 10 GB.
/// This visitor reads only the shapes.
pub fn parameter_count<B: Backend, M: Module<B>>(module: &M) -> usize {
    struct Count(usize);
    impl<B: Backend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 += param.lazy_shape().num_elements();
        }
        fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<B, D, Int>>) {
            self.0 += param.lazy_shape().num_elements();
        }
        fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, Bool>>) {
            self.0 += param.lazy_shape().num_elements();
        }
    }
    let mut count = Count(0);
    module.visit(&mut count);
    count.0
}

/// The dtype precision-sensitive steps run in: `f32` for half-precision (and other
/// sub-`f32`) inputs, the input's own dtype otherwise (`f32`, `f64`).
pub(crate) fn upcast_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 | DType::F32 => dtype,
        _ if dtype.is_float() => DType::F32,
        _ => dtype,
    }
}

/// Whether `dtype` is a float format narrower than `f32` (`f16`, `bf16`), whose
/// precision-sensitive steps (normalisation statistics, attention) run in `f32`.
pub fn is_reduced_precision(dtype: DType) -> bool {
    dtype.is_float() && upcast_dtype(dtype) != dtype
}

/// Casts `x` to `dtype` unless it already has it.
pub(crate) fn cast_to<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype { x } else { x.cast(dtype) }
}

/// Group normalisation whose statistics are computed in at least `f32` whatever the input
/// dtype (half-precision sums over a whole 64x64 feature map lose most of their digits), then
/// cast back before the affine transform.
///
/// Numerically this is `torch.nn.GroupNorm`: biased variance, `eps` inside the square root.
///
/// # Shapes
///
/// - input: `[batch, channels, *]`
/// - output: `[batch, channels, *]`
pub(crate) fn group_norm<B: Backend, const D: usize>(
    norm: &GroupNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let dims = x.dims();
    let (batch, channels) = (dims[0], dims[1]);
    assert_eq!(
        channels, norm.num_channels,
        "GroupNorm expects {} channels, got {channels}",
        norm.num_channels
    );
    let per_group = dims.iter().product::<usize>() / (batch * norm.num_groups);
    let x = cast_to(x, upcast_dtype(dtype)).reshape([batch, norm.num_groups, per_group]);
    let mean = mean_last(x.clone());
    let centered = x - mean;
    let var = mean_last(centered.clone().square());
    let normalized = centered / var.add_scalar(norm.epsilon).sqrt();
    let normalized = cast_to(normalized.reshape(dims), dtype);
    match (&norm.gamma, &norm.beta) {
        (Some(gamma), Some(beta)) => {
            let mut affine = [1usize; D];
            affine[1] = channels;
            normalized * gamma.val().reshape(affine) + beta.val().reshape(affine)
        }
        _ => normalized,
    }
}

/// The mean over the last axis of `[batch, groups, n]`, as the mean of `k` equal chunks
/// means (`k` the largest divisor of `n` up to `sqrt(n)`, for `n >= 4096`).
///
/// Why: Burn 0.21's CUDA reduction (no autotune) gives each output row one thread-block's
/// worth of work or less, so a group norm's few long rows (`batch x 32` rows of up to a
/// million values in the VAE decoder at 512x512) ran nearly serially: 18 ms per norm on an
/// H200, 94% of the VAE decode. Reducing chunks first gives it `k` times the rows, each
/// `k` times shorter. The result is the same mean, summed in a different order (pairwise
/// sums are, if anything, more exact).
///
/// # Shapes
///
/// - input: `[batch, groups, n]`
/// - output: `[batch, groups, 1]`
fn mean_last<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [batch, groups, n] = x.dims();
    if n < 4096 {
        return x.mean_dim(2);
    }
    let mut k = (n as f64).sqrt() as usize;
    while !n.is_multiple_of(k) {
        k -= 1;
    }
    if k == 1 {
        return x.mean_dim(2);
    }
    x.reshape([batch, groups * k, n / k])
        .mean_dim(2)
        .reshape([batch, groups, k])
        .mean_dim(2)
}

/// Layer normalisation over the last dimension that, for `f16` / `bf16` inputs, runs in
/// `f32` (statistics, normalisation and the affine transform, with `f32` copies of `gamma`
/// and `beta`) and casts the result back, as PyTorch's half-precision `layer_norm`
/// accumulates in `f32` (the squared deviations of CLIP's large activations overflow
/// `f16`). `f32` and `f64` inputs go through Burn's [`LayerNorm::forward`] unchanged.
///
/// # Shapes
///
/// - input: `[..., d_model]`
/// - output: `[..., d_model]`
pub fn layer_norm<B: Backend, const D: usize>(
    norm: &LayerNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    if !is_reduced_precision(dtype) {
        return norm.forward(x);
    }
    let wide = crate::precision::cast_module(norm.clone(), FloatDType::F32);
    cast_to(wide.forward(cast_to(x, DType::F32)), dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::nn::GroupNormConfig;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    #[test]
    fn parameter_count_equals_num_params() {
        let device = Default::default();
        let block = ResnetBlock2DConfig::new(8)
            .with_out_channels(Some(16))
            .with_groups(4)
            .init::<B>(&device);
        let lazy = parameter_count(&block);
        assert_eq!(lazy, block.num_params());
        // conv1 72*16+16, conv2 144*16+16, shortcut 8*16+16, time_emb_proj 512*16+16, norms.
        assert_eq!(
            lazy,
            (72 + 1 + 144 + 1 + 8 + 1 + 512 + 1) * 16 + 2 * 8 + 2 * 16
        );
    }

    #[test]
    fn group_norm_matches_burn_group_norm() {
        let device = Default::default();
        let norm = GroupNormConfig::new(2, 6)
            .with_epsilon(1e-6)
            .init::<B>(&device);
        // Non-trivial affine parameters.
        let norm = GroupNorm {
            gamma: Some(burn::module::Param::from_tensor(Tensor::random(
                [6],
                Distribution::Normal(1.0, 0.3),
                &device,
            ))),
            beta: Some(burn::module::Param::from_tensor(Tensor::random(
                [6],
                Distribution::Normal(0.0, 0.3),
                &device,
            ))),
            ..norm
        };
        let x = Tensor::<B, 4>::random([2, 6, 3, 5], Distribution::Normal(0.5, 2.0), &device);
        let ours = group_norm(&norm, x.clone());
        let theirs = norm.forward(x);
        let diff: f32 = (ours - theirs).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn chunked_mean_equals_mean() {
        let device = Default::default();
        // 4096 = 64 x 64 (chunked), 4099 (prime: not chunked), 40960 = 160 x 256.
        for n in [100, 4096, 4099, 40960] {
            let x = Tensor::<B, 3>::random([2, 3, n], Distribution::Normal(0.5, 2.0), &device);
            let diff: f32 = (mean_last(x.clone()) - x.mean_dim(2))
                .abs()
                .max()
                .into_scalar();
            assert!(diff < 1e-5, "n {n}: {diff}");
        }
    }
}
