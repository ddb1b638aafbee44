//! 2-D convolution as the models of this crate run it: in `f32` for half-precision inputs,
//! and through either the backend's convolution or a matrix product ([`ConvAlgorithm`]).
//!
//! # Why a GEMM path
//!
//! Burn 0.21's CubeCL backends (CUDA, wgpu), built without the `autotune` feature, compute
//! the convolution's *weight gradient* with a direct kernel that gives each weight one
//! thread and reduces over `batch x height x width` in it: for a 64-channel 3x3 convolution
//! of 128 16x16 maps that is 36,864 threads each summing 32,768 products one after another.
//! Training steps are then dominated by it. With `autotune` on, tuning a training graph's
//! kernels took minutes per step. [`ConvAlgorithm::Gemm`] writes the convolution as
//! `im2col` (zero padding, one shifted view of the input per kernel tap, stacked) and one
//! matrix product, so that autodiff's backward pass is matrix products too (the weight
//! gradient is one `[c_out, batch x h x w] x [batch x h x w, c_in x k x k]` product), which
//! every backend runs with its tiled matmul.
//!
//! It costs `k x k` times the input's memory for the stacked views (kept for the backward
//! pass); the backend's convolution needs none. Inference has no weight gradient, so
//! [`ConvAlgorithm::Backend`] stays the default; trainers switch with
//! [`set_conv_algorithm`].

use std::sync::Mutex;

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};

use super::kernels::ConvKernel;
use super::{cast_to, is_reduced_precision};

/// How [`conv_forward`] computes a 2-D convolution (process-wide, see
/// [`set_conv_algorithm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvAlgorithm {
    /// The backend's own `conv2d` (and its backward kernels under autodiff).
    #[default]
    Backend,
    /// `im2col` and a matrix product, for groups of one and explicit or no padding (others
    /// fall back to the backend); see the [module docs](self).
    Gemm,
    /// CUDA: cubek's implicit-GEMM convolution (tensor cores, `f32` accumulation, so
    /// `f16` / `bf16` inputs are not widened), for groups of one and symmetric padding,
    /// outside autodiff; everything else runs as [`ConvAlgorithm::Backend`]. See
    /// [the kernels module](mod@super::kernels).
    ImplicitGemm(ConvKernel),
}

static CONV_ALGORITHM: Mutex<ConvAlgorithm> = Mutex::new(ConvAlgorithm::Backend);

/// Sets the algorithm every later [`conv_forward`] of this process uses. All give the same
/// result up to float rounding (tested to 1e-5 relative, forward and gradients).
pub fn set_conv_algorithm(algorithm: ConvAlgorithm) {
    *CONV_ALGORITHM.lock().unwrap_or_else(|e| e.into_inner()) = algorithm;
}

/// The algorithm [`conv_forward`] uses now ([`ConvAlgorithm::Backend`] unless
/// [`set_conv_algorithm`] changed it).
pub fn conv_algorithm() -> ConvAlgorithm {
    *CONV_ALGORITHM.lock().unwrap_or_else(|e| e.into_inner())
}

/// Applies a 2-D convolution with the process's [`ConvAlgorithm`]; for `f16` / `bf16`
/// inputs it runs in `f32` (input and `f32` copies of the weights, result cast back), so its
/// sums accumulate in `f32` on every backend. Burn 0.21's CubeCL direct convolution (the
/// CUDA / wgpu default without autotune, and an autotune candidate) accumulates in the
/// input's dtype: on an H100 a 4608-term f16 convolution was off by 1e-1 relative, bf16 by
/// 7.8e-1. The weights stay stored in the low dtype.
///
/// # Shapes
///
/// - input: `[batch, channels_in, height, width]`
/// - output: `[batch, channels_out, height_out, width_out]`
pub fn conv_forward<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let algorithm = conv_algorithm();
    if let ConvAlgorithm::ImplicitGemm(kernel) = algorithm
        && let Some(out) = implicit_gemm(conv, &x, kernel)
    {
        return out;
    }
    let dtype = x.dtype();
    if !is_reduced_precision(dtype) {
        return conv_with_algorithm(conv, x, algorithm);
    }
    let wide = crate::precision::cast_module(conv.clone(), FloatDType::F32);
    cast_to(
        conv_with_algorithm(&wide, cast_to(x, DType::F32), algorithm),
        dtype,
    )
}

/// The convolution of `conv` as CUDA's implicit GEMM, in the input's dtype (the kernel
/// accumulates in `f32`); `None` off the CUDA backend, under autodiff, for grouped or
/// asymmetrically padded convolutions and where the kernel rejects the problem.
fn implicit_gemm<B: Backend>(
    conv: &Conv2d<B>,
    x: &Tensor<B, 4>,
    kernel: ConvKernel,
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "cuda")]
    {
        if !super::cuda::is_cuda::<B>() || conv.groups != 1 {
            return None;
        }
        let padding = match conv.padding {
            PaddingConfig2d::Explicit(top, left, bottom, right)
                if top == bottom && left == right =>
            {
                [top, left]
            }
            PaddingConfig2d::Valid => [0, 0],
            _ => return None,
        };
        super::cuda::conv2d_implicit_gemm(
            x,
            conv.weight.val(),
            conv.bias.as_ref().map(|b| b.val()),
            conv.stride,
            padding,
            conv.dilation,
            kernel,
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (conv, x, kernel);
        None
    }
}

/// [`Conv2d::forward`] or [`conv2d_gemm`], by `algorithm`.
fn conv_with_algorithm<B: Backend>(
    conv: &Conv2d<B>,
    x: Tensor<B, 4>,
    algorithm: ConvAlgorithm,
) -> Tensor<B, 4> {
    match (algorithm, &conv.padding) {
        (ConvAlgorithm::Gemm, PaddingConfig2d::Explicit(top, left, bottom, right))
            if conv.groups == 1 =>
        {
            conv2d_gemm(conv, x, [*top, *left, *bottom, *right])
        }
        (ConvAlgorithm::Gemm, PaddingConfig2d::Valid) if conv.groups == 1 => {
            conv2d_gemm(conv, x, [0; 4])
        }
        _ => conv.forward(x),
    }
}

/// The convolution of `conv` (groups of one) as `im2col` and one matrix product.
///
/// `padding` is `[top, left, bottom, right]` zeros. The input is made channel-major
/// (`[c_in, batch, h, w]`), each of the `k_h x k_w` kernel taps takes the view of the padded
/// input it multiplies (`[c_in, batch, h_out, w_out]`, strided by subsampling a reshape), the
/// views are stacked after the channel axis into the columns `[c_in k_h k_w, batch h_out
/// w_out]`, whose row order is that of the weight's flattening `[c_out, c_in k_h k_w]`, and
/// `weight x columns` is the output `[c_out, batch h_out w_out]`.
///
/// # Shapes
///
/// - input: `[batch, channels_in, height, width]`
/// - output: `[batch, channels_out, height_out, width_out]`, with `height_out = (height +
///   top + bottom - dilation (k_h - 1) - 1) / stride + 1`
pub fn conv2d_gemm<B: Backend>(
    conv: &Conv2d<B>,
    x: Tensor<B, 4>,
    padding: [usize; 4],
) -> Tensor<B, 4> {
    let [top, left, bottom, right] = padding;
    let [batch, c_in, height, width] = x.dims();
    let weight = conv.weight.val();
    let [c_out, w_in, k_h, k_w] = weight.dims();
    assert_eq!(
        w_in, c_in,
        "convolution weight expects {w_in} input channels, got {c_in}"
    );
    let [s_h, s_w] = conv.stride;
    let [d_h, d_w] = conv.dilation;
    let (padded_h, padded_w) = (height + top + bottom, width + left + right);
    let (span_h, span_w) = (d_h * (k_h - 1) + 1, d_w * (k_w - 1) + 1);
    assert!(
        padded_h >= span_h && padded_w >= span_w,
        "convolution kernel {k_h}x{k_w} (dilation {d_h}x{d_w}) is larger than the padded input {padded_h}x{padded_w}"
    );
    let (out_h, out_w) = ((padded_h - span_h) / s_h + 1, (padded_w - span_w) / s_w + 1);

    // Channel-major, zero padded; extra zero rows / columns at the bottom / right so that
    // every tap's strided view is a whole reshape (`out x stride` rows from its offset).
    let (extra_h, extra_w) = (
        (d_h * (k_h - 1) + out_h * s_h).saturating_sub(padded_h),
        (d_w * (k_w - 1) + out_w * s_w).saturating_sub(padded_w),
    );
    let x = x.swap_dims(0, 1);
    let x = if [top, left, bottom + extra_h, right + extra_w] == [0; 4] {
        x
    } else {
        let device = x.device();
        let dtype = x.dtype();
        Tensor::<B, 4>::zeros(
            [c_in, batch, padded_h + extra_h, padded_w + extra_w],
            (&device, dtype),
        )
        .slice_assign(
            [0..c_in, 0..batch, top..top + height, left..left + width],
            x,
        )
    };

    let mut taps = Vec::with_capacity(k_h * k_w);
    for i in 0..k_h {
        for j in 0..k_w {
            let (y0, x0) = (i * d_h, j * d_w);
            let view = x.clone().slice([
                0..c_in,
                0..batch,
                y0..y0 + out_h * s_h,
                x0..x0 + out_w * s_w,
            ]);
            let view = if s_h == 1 && s_w == 1 {
                view
            } else {
                // Rows y0 + s oy, columns x0 + s ox: the first of each stride-sized group.
                view.reshape([c_in * batch, out_h, s_h, out_w, s_w])
                    .slice([0..c_in * batch, 0..out_h, 0..1, 0..out_w, 0..1])
                    .reshape([c_in, batch, out_h, out_w])
            };
            taps.push(view);
        }
    }
    let columns = if taps.len() == 1 {
        taps.pop()
            .expect("one tap")
            .reshape([c_in, batch * out_h * out_w])
    } else {
        Tensor::stack::<5>(taps, 1).reshape([c_in * k_h * k_w, batch * out_h * out_w])
    };
    let out = weight
        .reshape([c_out, c_in * k_h * k_w])
        .matmul(columns)
        .reshape([c_out, batch, out_h, out_w])
        .swap_dims(0, 1);
    match &conv.bias {
        Some(bias) => out + bias.val().reshape([1, c_out, 1, 1]),
        None => out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;
    type A = Autodiff<B>;

    fn max_rel(a: Tensor<B, 4>, b: Tensor<B, 4>) -> f32 {
        let scale: f32 = b.clone().abs().max().into_scalar();
        let diff: f32 = (a - b).abs().max().into_scalar();
        diff / scale.max(1e-12)
    }

    /// Forward output and the gradients of input, weight and bias, with both algorithms,
    /// for a loss `sum(out * probe)` with a random probe (so every output element counts
    /// with a different weight).
    fn compare(config: Conv2dConfig, input: [usize; 4]) {
        let device = Default::default();
        let conv = config.init::<A>(&device);
        let x = Tensor::<A, 4>::random(input, Distribution::Normal(0.0, 1.0), &device);
        let reference = conv.forward(x.clone().detach());
        let probe =
            Tensor::<A, 4>::random(reference.dims(), Distribution::Normal(0.0, 1.0), &device);
        let run = |algorithm| {
            let x = x.clone().detach().require_grad();
            let out = conv_with_algorithm(&conv, x.clone(), algorithm);
            let grads = (out.clone() * probe.clone()).sum().backward();
            let gx = x.grad(&grads).expect("input gradient");
            let gw = conv.weight.val().grad(&grads).expect("weight gradient");
            let gb = conv
                .bias
                .as_ref()
                .map(|b| b.val().grad(&grads).expect("bias gradient"));
            (out.inner(), gx, gw, gb)
        };
        let (out_b, gx_b, gw_b, gb_b) = run(ConvAlgorithm::Backend);
        let (out_g, gx_g, gw_g, gb_g) = run(ConvAlgorithm::Gemm);
        assert_eq!(out_g.dims(), out_b.dims());
        for (name, rel) in [
            ("output", max_rel(out_g, out_b)),
            ("input gradient", max_rel(gx_g, gx_b)),
            ("weight gradient", max_rel(gw_g, gw_b)),
        ] {
            assert!(rel < 1e-5, "{name}: relative difference {rel:e}");
        }
        if let (Some(g), Some(b)) = (gb_g, gb_b) {
            let rel = max_rel(g.reshape([1, 1, 1, -1]), b.reshape([1, 1, 1, -1]));
            assert!(rel < 1e-5, "bias gradient: relative difference {rel:e}");
        }
    }

    #[test]
    fn gemm_matches_backend_3x3_same_padding() {
        compare(
            Conv2dConfig::new([5, 7], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)),
            [3, 5, 6, 7],
        );
    }

    #[test]
    fn gemm_matches_backend_1x1_without_bias() {
        compare(
            Conv2dConfig::new([6, 4], [1, 1]).with_bias(false),
            [2, 6, 5, 3],
        );
    }

    #[test]
    fn gemm_matches_backend_stride_two() {
        // The U-Net's downsampler (padding 1) and the VAE encoder's (bottom / right only),
        // on even and odd sizes.
        compare(
            Conv2dConfig::new([4, 6], [3, 3])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)),
            [2, 4, 8, 7],
        );
        compare(
            Conv2dConfig::new([4, 6], [3, 3])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(0, 0, 1, 1)),
            [2, 4, 9, 8],
        );
    }

    #[test]
    fn gemm_matches_backend_dilation_and_uneven_kernel() {
        compare(
            Conv2dConfig::new([3, 5], [2, 3])
                .with_dilation([2, 1])
                .with_stride([1, 2])
                .with_padding(PaddingConfig2d::Explicit(2, 0, 1, 3)),
            [2, 3, 7, 6],
        );
    }

    #[test]
    fn algorithm_is_process_wide_and_defaults_to_backend() {
        assert_eq!(ConvAlgorithm::default(), ConvAlgorithm::Backend);
        // Other tests of this binary may run concurrently and read the setting; both
        // algorithms agree, so switching it here cannot change their results.
        let before = conv_algorithm();
        set_conv_algorithm(ConvAlgorithm::Gemm);
        assert_eq!(conv_algorithm(), ConvAlgorithm::Gemm);
        set_conv_algorithm(before);
        assert_eq!(conv_algorithm(), before);
    }
}
