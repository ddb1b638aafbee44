//! Which kernels the layers of this crate run: the backend's own operations, or, on Burn's
//! CUDA backend, tensor-core kernels chosen explicitly.
//!
//! # Why explicit kernels
//!
//! Burn 0.21's CUDA backend without its `autotune` feature runs every convolution with a
//! direct kernel (no tensor cores, and for `f16` / `bf16` inputs it accumulates in the
//! input's dtype), and attention as the full `[batch, heads, queries, keys]` score matrix,
//! a softmax and a second product. The crates under it (`cubek-convolution`,
//! `cubek-attention`, `cubek-matmul`) hold implicit-GEMM convolutions, flash attention and
//! several tensor-core matrix products that only `autotune` would pick, and tuning them
//! took minutes for a U-Net and was not kept between processes. [`Kernels`] names the
//! kernel of each operation instead, with no tuning; the choice is made once, from
//! measurements on an H200 (docs/BENCHMARKS.md).
//!
//! Every explicit kernel accumulates in `f32` and falls back to the backend's operation
//! wherever it does not apply: other backends, tensors under autodiff, shapes or dtypes
//! the kernel rejects (it answers with an error, which is counted in [`fallbacks`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

/// The attention kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// [`burn::tensor::module::attention`]: the backend's choice (on CUDA without autotune,
    /// the unfused score matrix).
    #[default]
    Backend,
    /// CUDA: flash attention with tensor-core inner products, `planes` warps per cube
    /// (2, 4 or 8), accumulating the softmax and the output in `f32`.
    Flash {
        /// Warps (planes) per cube.
        planes: u8,
    },
    /// CUDA: flash attention with scalar (unit) inner products.
    FlashUnit,
}

/// The matrix-product kernel of linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulKernel {
    /// [`Tensor::matmul`]: the backend's choice (on CUDA, cubek's `SimpleCyclicCmma`).
    #[default]
    Backend,
    /// CUDA: a named cubek tensor-core strategy.
    Cube(MatmulStrategy),
}

/// cubek-matmul strategies offered by [`MatmulKernel::Cube`] (each with its inferred
/// blueprint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulStrategy {
    /// `SimpleCyclicCmma` (what the backend picks).
    SimpleCyclicCmma,
    /// `SimpleCyclicMma`.
    SimpleCyclicMma,
    /// `DoubleCyclicCmma`: double-buffered loads.
    DoubleCyclicCmma,
    /// `DoubleCyclicMma`.
    DoubleCyclicMma,
    /// `SimpleTmaMma`: Hopper's bulk tensor copies.
    SimpleTmaMma,
    /// `DoubleTmaMma`.
    DoubleTmaMma,
    /// `SpecializedTmaMma`: warp-specialised loaders.
    SpecializedTmaMma,
    /// `SpecializedCyclicMma`.
    SpecializedCyclicMma,
}

/// The implicit-GEMM convolution kernels offered by [`super::ConvAlgorithm::ImplicitGemm`]
/// (cubek-convolution's algorithm and tile instruction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKernel {
    /// `SimpleSyncCyclic` with `cmma` (Burn's `ConvStrategy::ImplicitGemm`).
    SyncCmma,
    /// `SimpleSyncStrided` with `mma`.
    SyncMma,
    /// `SimpleAsyncCyclic` with `cmma`.
    AsyncCmma,
    /// `SimpleAsyncStrided` with `mma`.
    AsyncMma,
    /// `SimpleAsyncTma` with `mma`.
    TmaMma,
    /// `SpecializedTma` with `mma`.
    SpecializedTmaMma,
}

/// The kernels of attention and linear layers (convolutions: [`super::ConvAlgorithm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Kernels {
    /// Attention.
    pub attention: AttentionKernel,
    /// Linear layers.
    pub matmul: MatmulKernel,
}

static KERNELS: Mutex<Kernels> = Mutex::new(Kernels {
    attention: AttentionKernel::Backend,
    matmul: MatmulKernel::Backend,
});
static FALLBACKS: AtomicUsize = AtomicUsize::new(0);

/// Sets the kernels every later layer of this process uses. All give the same result up to
/// float rounding.
pub fn set_kernels(kernels: Kernels) {
    *KERNELS.lock().unwrap_or_else(|e| e.into_inner()) = kernels;
}

/// The kernels in use ([`Kernels::default`], the backend's operations, unless
/// [`set_kernels`] changed them).
pub fn kernels() -> Kernels {
    *KERNELS.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many times an explicit kernel was asked for and the backend's operation ran instead
/// because the kernel rejected the problem (not counted: other backends and autodiff).
pub fn fallbacks() -> usize {
    FALLBACKS.load(Ordering::Relaxed)
}

#[cfg(feature = "cuda")]
pub(crate) fn count_fallback() {
    FALLBACKS.fetch_add(1, Ordering::Relaxed);
}

/// Whether [`scaled_dot_product`] runs a flash kernel for tensors of `B` (a flash
/// [`AttentionKernel`] is chosen and `B` is the CUDA backend outside autodiff).
pub fn flash_applies<B: Backend>() -> bool {
    if kernels().attention == AttentionKernel::Backend {
        return false;
    }
    #[cfg(feature = "cuda")]
    return super::cuda::is_cuda::<B>();
    #[cfg(not(feature = "cuda"))]
    false
}

/// Keeps the kernels that Burn's CUDA backend compiles at run time (NVRTC) in `dir`, so
/// that later processes load them instead of compiling them again (the first image of a new
/// process is then mostly loading weights). Call it before the first CUDA tensor is made.
/// Returns whether the cache at `dir` is in use: `false` without the `cuda` feature, or when a
/// `cubecl.toml` already configures a compilation cache (the user's file wins).
pub fn keep_compiled_kernels(dir: &std::path::Path) -> bool {
    #[cfg(feature = "cuda")]
    return super::cuda::keep_compiled_kernels(dir);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dir;
        false
    }
}

/// A linear layer, `x W + b`, with the process's [`MatmulKernel`].
///
/// # Shapes
///
/// - input: `[..., d_input]`
/// - output: `[..., d_output]`
pub fn linear<B: Backend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let MatmulKernel::Cube(_strategy) = kernels().matmul else {
        return layer.forward(x);
    };
    #[cfg(feature = "cuda")]
    if super::cuda::is_cuda::<B>() {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let weight = layer.weight.val();
        let d_out = weight.dims()[1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let y = super::cuda::matmul(x.reshape([rows, d_in]), weight, _strategy);
        let y = match &layer.bias {
            Some(bias) => y + bias.val().unsqueeze_dim(0),
            None => y,
        };
        let mut out = dims;
        out[D - 1] = d_out;
        return y.reshape(out);
    }
    layer.forward(x)
}

/// `softmax(q k^T scale) v` with the process's [`AttentionKernel`]; `scale` defaults to
/// `1 / sqrt(head_dim)`.
///
/// # Shapes
///
/// - q: `[batch, heads, seq_q, head_dim]`
/// - k, v: `[batch, heads, seq_k, head_dim]`
/// - output: `[batch, heads, seq_q, head_dim]`
pub fn scaled_dot_product<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: Option<f64>,
) -> Tensor<B, 4> {
    let options = AttentionModuleOptions {
        scale,
        softcap: None,
        is_causal: false,
    };
    let kernel = kernels().attention;
    if kernel == AttentionKernel::Backend {
        return attention(q, k, v, None, None, options);
    }
    // The flash kernels scale by 1 / sqrt(head_dim) whatever `options.scale` says.
    let head_dim = q.dims()[3];
    let default_scale = scale.is_none_or(|s| (s * (head_dim as f64).sqrt() - 1.0).abs() < 1e-12);
    #[cfg(feature = "cuda")]
    if default_scale && super::cuda::is_cuda::<B>() {
        return super::cuda::flash_attention(q, k, v, kernel, options);
    }
    let _ = default_scale;
    attention(q, k, v, None, None, options)
}

impl ConvKernel {
    /// Every implicit-GEMM kernel.
    pub const ALL: [ConvKernel; 6] = [
        ConvKernel::SyncCmma,
        ConvKernel::SyncMma,
        ConvKernel::AsyncCmma,
        ConvKernel::AsyncMma,
        ConvKernel::TmaMma,
        ConvKernel::SpecializedTmaMma,
    ];

    /// The kernel's name in [`super::ConvAlgorithm`]'s text form (`igemm-<name>`).
    pub fn name(self) -> &'static str {
        match self {
            ConvKernel::SyncCmma => "sync-cmma",
            ConvKernel::SyncMma => "sync-mma",
            ConvKernel::AsyncCmma => "async-cmma",
            ConvKernel::AsyncMma => "async-mma",
            ConvKernel::TmaMma => "tma-mma",
            ConvKernel::SpecializedTmaMma => "specialized-tma-mma",
        }
    }
}

impl MatmulStrategy {
    /// Every strategy.
    pub const ALL: [MatmulStrategy; 8] = [
        MatmulStrategy::SimpleCyclicCmma,
        MatmulStrategy::SimpleCyclicMma,
        MatmulStrategy::DoubleCyclicCmma,
        MatmulStrategy::DoubleCyclicMma,
        MatmulStrategy::SimpleTmaMma,
        MatmulStrategy::DoubleTmaMma,
        MatmulStrategy::SpecializedTmaMma,
        MatmulStrategy::SpecializedCyclicMma,
    ];

    /// The strategy's name in [`MatmulKernel`]'s text form.
    pub fn name(self) -> &'static str {
        match self {
            MatmulStrategy::SimpleCyclicCmma => "simple-cyclic-cmma",
            MatmulStrategy::SimpleCyclicMma => "simple-cyclic-mma",
            MatmulStrategy::DoubleCyclicCmma => "double-cyclic-cmma",
            MatmulStrategy::DoubleCyclicMma => "double-cyclic-mma",
            MatmulStrategy::SimpleTmaMma => "simple-tma-mma",
            MatmulStrategy::DoubleTmaMma => "double-tma-mma",
            MatmulStrategy::SpecializedTmaMma => "specialized-tma-mma",
            MatmulStrategy::SpecializedCyclicMma => "specialized-cyclic-mma",
        }
    }
}

impl AttentionKernel {
    /// Every kernel.
    pub const ALL: [AttentionKernel; 5] = [
        AttentionKernel::Backend,
        AttentionKernel::Flash { planes: 2 },
        AttentionKernel::Flash { planes: 4 },
        AttentionKernel::Flash { planes: 8 },
        AttentionKernel::FlashUnit,
    ];
}

impl MatmulKernel {
    /// Every kernel.
    pub fn all() -> impl Iterator<Item = MatmulKernel> {
        std::iter::once(MatmulKernel::Backend).chain(MatmulStrategy::ALL.map(MatmulKernel::Cube))
    }
}

impl std::fmt::Display for super::ConvAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            super::ConvAlgorithm::Backend => f.write_str("backend"),
            super::ConvAlgorithm::Gemm => f.write_str("gemm"),
            super::ConvAlgorithm::ImplicitGemm(k) => write!(f, "igemm-{}", k.name()),
        }
    }
}

impl std::fmt::Display for AttentionKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttentionKernel::Backend => f.write_str("backend"),
            AttentionKernel::Flash { planes } => write!(f, "flash{planes}"),
            AttentionKernel::FlashUnit => f.write_str("flash-unit"),
        }
    }
}

impl std::fmt::Display for MatmulKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MatmulKernel::Backend => f.write_str("backend"),
            MatmulKernel::Cube(s) => f.write_str(s.name()),
        }
    }
}

/// The text forms accepted, for error messages.
fn choices<T: std::fmt::Display>(all: impl IntoIterator<Item = T>) -> String {
    all.into_iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn conv_algorithms() -> impl Iterator<Item = super::ConvAlgorithm> {
    [super::ConvAlgorithm::Backend, super::ConvAlgorithm::Gemm]
        .into_iter()
        .chain(ConvKernel::ALL.map(super::ConvAlgorithm::ImplicitGemm))
}

impl std::str::FromStr for super::ConvAlgorithm {
    type Err = diffusion_core::Error;

    /// `backend`, `gemm` or `igemm-<kernel>` (`igemm` alone: `igemm-sync-cmma`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "igemm" {
            return Ok(super::ConvAlgorithm::ImplicitGemm(ConvKernel::SyncCmma));
        }
        conv_algorithms()
            .find(|c| c.to_string() == s)
            .ok_or_else(|| {
                diffusion_core::Error::InvalidArgument(format!(
                    "unknown convolution algorithm `{s}` (one of: {})",
                    choices(conv_algorithms())
                ))
            })
    }
}

impl std::str::FromStr for AttentionKernel {
    type Err = diffusion_core::Error;

    /// `backend`, `flash2`, `flash4`, `flash8` or `flash-unit` (`flash` alone: `flash4`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "flash" {
            return Ok(AttentionKernel::Flash { planes: 4 });
        }
        AttentionKernel::ALL
            .into_iter()
            .find(|k| k.to_string() == s)
            .ok_or_else(|| {
                diffusion_core::Error::InvalidArgument(format!(
                    "unknown attention kernel `{s}` (one of: flash, {})",
                    choices(AttentionKernel::ALL)
                ))
            })
    }
}

impl std::str::FromStr for MatmulKernel {
    type Err = diffusion_core::Error;

    /// `backend` or a strategy name (`simple-cyclic-cmma`, ...).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MatmulKernel::all()
            .find(|k| k.to_string() == s)
            .ok_or_else(|| {
                diffusion_core::Error::InvalidArgument(format!(
                    "unknown matmul kernel `{s}` (one of: {})",
                    choices(MatmulKernel::all())
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ConvAlgorithm;
    use burn::backend::NdArray;
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    #[test]
    fn text_forms_round_trip() {
        for c in conv_algorithms() {
            assert_eq!(c.to_string().parse::<ConvAlgorithm>().unwrap(), c);
        }
        for k in AttentionKernel::ALL {
            assert_eq!(k.to_string().parse::<AttentionKernel>().unwrap(), k);
        }
        for k in MatmulKernel::all() {
            assert_eq!(k.to_string().parse::<MatmulKernel>().unwrap(), k);
        }
        assert_eq!(
            "igemm".parse::<ConvAlgorithm>().unwrap(),
            ConvAlgorithm::ImplicitGemm(ConvKernel::SyncCmma)
        );
        let err = "fast".parse::<AttentionKernel>().unwrap_err().to_string();
        assert!(err.contains("flash-unit"), "{err}");
    }

    #[test]
    fn explicit_kernels_fall_back_off_cuda() {
        // On the CPU backend every explicit choice runs the backend's operations.
        let device = Default::default();
        let layer = LinearConfig::new(6, 5).init::<B>(&device);
        let x = Tensor::<B, 3>::random([2, 3, 6], Distribution::Normal(0.0, 1.0), &device);
        let q = Tensor::<B, 4>::random([1, 2, 5, 4], Distribution::Normal(0.0, 1.0), &device);
        let before = kernels();
        let expect_linear = layer.forward(x.clone());
        let expect_attention = scaled_dot_product(q.clone(), q.clone(), q.clone(), None);
        set_kernels(Kernels {
            attention: AttentionKernel::Flash { planes: 4 },
            matmul: MatmulKernel::Cube(MatmulStrategy::DoubleTmaMma),
        });
        assert!(!flash_applies::<B>());
        let got_linear = linear(&layer, x);
        let got_attention = scaled_dot_product(q.clone(), q.clone(), q, None);
        set_kernels(before);
        let d: f32 = (got_linear - expect_linear).abs().max().into_scalar();
        assert!(d < 1e-6, "{d}");
        let d: f32 = (got_attention - expect_attention).abs().max().into_scalar();
        assert!(d < 1e-6, "{d}");
    }
}
