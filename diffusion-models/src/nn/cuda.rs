//! The explicit CUDA kernels of [the kernels module](mod@super::kernels): Burn tensors of
//! the CUDA backend are taken apart into their `CubeTensor`s and handed to cubek's launchers
//! with a named strategy.
//!
//! The backend is recognised at run time by the type of its float primitive (a
//! `CubeTensor<CudaRuntime>`), so the models stay generic over `B: Backend`: on every other
//! backend, and under autodiff (whose primitive wraps the inner one), these functions are
//! never reached.

use std::any::{Any, TypeId};

use burn::tensor::backend::Backend;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::kernel::attention::{AttentionStrategy, attention as cube_attention};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::kernel::matmul::init_matmul_output;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cubek::attention::routines::blackbox_accelerated::BlackboxAcceleratedStrategy;
use cubek::convolution::{
    AcceleratedTileKind, ConvAlgorithm as CubeConvAlgorithm, ConvolutionArgs, ConvolutionInputs,
    Strategy as ConvStrategy,
};
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek::matmul::launch::Strategy as MatmulLaunch;
use cubek::std::InputBinding;

use super::kernels::{AttentionKernel, ConvKernel, MatmulStrategy, count_fallback};

type Cube = CubeTensor<CudaRuntime>;

/// Whether `B`'s float tensors are CUDA `CubeTensor`s (Burn's CUDA backend, any float
/// element type).
pub(crate) fn is_cuda<B: Backend>() -> bool {
    TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<Cube>()
}

/// The `CubeTensor` of a float tensor of the CUDA backend (callers check [`is_cuda`]).
fn to_cube<B: Backend, const D: usize>(x: Tensor<B, D>) -> Cube {
    let boxed: Box<dyn Any> = Box::new(x.into_primitive().tensor());
    *boxed
        .downcast::<Cube>()
        .expect("is_cuda checked the primitive type")
}

/// The Burn tensor of a `CubeTensor` (callers check [`is_cuda`]).
fn from_cube<B: Backend, const D: usize>(x: Cube) -> Tensor<B, D> {
    let boxed: Box<dyn Any> = Box::new(x);
    let primitive = *boxed
        .downcast::<B::FloatTensorPrimitive>()
        .expect("is_cuda checked the primitive type");
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

fn storage(dtype: DType) -> cubecl::ir::StorageType {
    dtype.into()
}

fn launch(strategy: MatmulStrategy) -> MatmulLaunch {
    match strategy {
        MatmulStrategy::SimpleCyclicCmma => MatmulLaunch::SimpleCyclicCmma(Default::default()),
        MatmulStrategy::SimpleCyclicMma => MatmulLaunch::SimpleCyclicMma(Default::default()),
        MatmulStrategy::DoubleCyclicCmma => MatmulLaunch::DoubleCyclicCmma(Default::default()),
        MatmulStrategy::DoubleCyclicMma => MatmulLaunch::DoubleCyclicMma(Default::default()),
        MatmulStrategy::SimpleTmaMma => MatmulLaunch::SimpleTmaMma(Default::default()),
        MatmulStrategy::DoubleTmaMma => MatmulLaunch::DoubleTmaMma(Default::default()),
        MatmulStrategy::SpecializedTmaMma => MatmulLaunch::SpecializedTmaMma(Default::default()),
        MatmulStrategy::SpecializedCyclicMma => {
            MatmulLaunch::SpecializedCyclicMma(Default::default())
        }
    }
}

/// `lhs x rhs` with a named cubek strategy (accumulating in `f32` for `f16` / `bf16`),
/// or [`Tensor::matmul`] where the strategy rejects the problem.
///
/// # Shapes
///
/// - lhs: `[m, k]`, rhs: `[k, n]`, output: `[m, n]`
pub(crate) fn matmul<B: Backend>(
    lhs: Tensor<B, 2>,
    rhs: Tensor<B, 2>,
    strategy: MatmulStrategy,
) -> Tensor<B, 2> {
    let (lhs, rhs) = (to_cube(lhs), to_cube(rhs));
    let out = init_matmul_output(&lhs, &rhs, lhs.dtype);
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: storage(lhs.dtype),
        rhs: storage(rhs.dtype),
        out: storage(out.dtype),
    });
    let client = out.client.clone();
    let result = cubek::matmul::launch::launch_ref(
        &launch(strategy),
        &client,
        InputBinding::new(lhs.clone().binding(), storage(lhs.dtype)),
        InputBinding::new(rhs.clone().binding(), storage(rhs.dtype)),
        out.clone().binding(),
        &mut dtypes,
    );
    match result {
        Ok(()) => from_cube(out),
        Err(_) => {
            count_fallback();
            from_cube::<B, 2>(lhs).matmul(from_cube(rhs))
        }
    }
}

/// Flash attention (see [`AttentionKernel`]), or Burn's attention where the kernel rejects
/// the problem. Always scales by `1 / sqrt(head_dim)`.
pub(crate) fn flash_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    kernel: AttentionKernel,
    options: AttentionModuleOptions,
) -> Tensor<B, 4> {
    let strategy = match kernel {
        AttentionKernel::Flash { planes } => {
            AttentionStrategy::FlashBlackboxAccelerated(BlackboxAcceleratedStrategy {
                num_planes: planes,
                seq_q: 1,
                seq_kv: 1,
            })
        }
        AttentionKernel::FlashUnit => AttentionStrategy::FlashUnit,
        AttentionKernel::Backend => AttentionStrategy::Fallback,
    };
    let (q, k, v) = (to_cube(q), to_cube(k), to_cube(v));
    let flash_options = AttentionModuleOptions {
        scale: None,
        ..options
    };
    match cube_attention(
        q.clone(),
        k.clone(),
        v.clone(),
        None,
        None,
        flash_options,
        strategy,
    ) {
        Ok(out) => from_cube(out),
        Err(_) => {
            // The caller skipped its f32 upcast because flash accumulates in f32 (see
            // `Attention::attend`); the fallback keeps that promise by running in f32.
            count_fallback();
            let dtype = q.dtype;
            let wide = |t: Cube| super::cast_to(from_cube::<B, 4>(t), super::upcast_dtype(dtype));
            let out =
                burn::tensor::module::attention(wide(q), wide(k), wide(v), None, None, options);
            super::cast_to(out, dtype)
        }
    }
}

/// A convolution as cubek's implicit GEMM (tensor cores, `f32` accumulation), on NHWC
/// copies of the input and weight; `None` where the kernel rejects the problem.
///
/// `padding` is symmetric (`[height, width]`); `groups` is one.
///
/// # Shapes
///
/// - x: `[batch, channels_in, height, width]`
/// - weight: `[channels_out, channels_in, k_h, k_w]`, bias: `[channels_out]`
/// - output: `[batch, channels_out, height_out, width_out]`
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d_implicit_gemm<B: Backend>(
    x: &Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    kernel: ConvKernel,
) -> Option<Tensor<B, 4>> {
    let [batch, _, height, width] = x.dims();
    let [c_out, _, k_h, k_w] = weight.dims();
    let span = |size: usize, k: usize, i: usize| {
        (size + 2 * padding[i]).checked_sub(dilation[i] * (k - 1) + 1)
    };
    let out_h = span(height, k_h, 0)? / stride[0] + 1;
    let out_w = span(width, k_w, 1)? / stride[1] + 1;

    let nhwc = |t: Cube| into_contiguous(burn_cubecl::ops::permute(t, &[0, 2, 3, 1]));
    let input = nhwc(to_cube(x.clone()));
    let weight = nhwc(to_cube(weight));
    let bias = bias.map(|b| to_cube(b.reshape([c_out])));
    let dtype = input.dtype;
    let out = empty_device_dtype(
        input.client.clone(),
        input.device.clone(),
        [batch, out_h, out_w, c_out].into(),
        dtype,
    );
    let (algorithm, tile_kind) = match kernel {
        ConvKernel::SyncCmma => (
            CubeConvAlgorithm::SimpleSyncCyclic,
            AcceleratedTileKind::Cmma,
        ),
        ConvKernel::SyncMma => (
            CubeConvAlgorithm::SimpleSyncStrided,
            AcceleratedTileKind::Mma,
        ),
        ConvKernel::AsyncCmma => (
            CubeConvAlgorithm::SimpleAsyncCyclic,
            AcceleratedTileKind::Cmma,
        ),
        ConvKernel::AsyncMma => (
            CubeConvAlgorithm::SimpleAsyncStrided,
            AcceleratedTileKind::Mma,
        ),
        ConvKernel::TmaMma => (CubeConvAlgorithm::SimpleAsyncTma, AcceleratedTileKind::Mma),
        ConvKernel::SpecializedTmaMma => {
            (CubeConvAlgorithm::SpecializedTma, AcceleratedTileKind::Mma)
        }
    };
    let dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: storage(dtype),
        rhs: storage(weight.dtype),
        out: storage(dtype),
    });
    let client = input.client.clone();
    let result = cubek::convolution::launch_ref::<CudaRuntime, 2>(
        &ConvStrategy::Inferred {
            algorithm,
            tile_kind,
        },
        &client,
        ConvolutionInputs::Forward {
            input: InputBinding::new(input.binding(), storage(dtype)),
            weight: InputBinding::new(weight.clone().binding(), storage(weight.dtype)),
            bias: bias.map(|b| {
                let dtype = b.dtype;
                InputBinding::new(b.binding(), storage(dtype))
            }),
            out: out.clone().binding(),
        },
        ConvolutionArgs {
            stride,
            padding,
            dilation,
        },
        dtypes,
    );
    match result {
        Ok(()) => Some(from_cube::<B, 4>(out).permute([0, 3, 1, 2])),
        Err(_) => {
            count_fallback();
            None
        }
    }
}

/// Keeps the CUDA backend's compiled kernels (PTX) in `dir` across processes, unless a
/// `cubecl.toml` already names a compilation cache. Must run before the first CUDA tensor
/// is made (the cache is read when the device's context is created); returns whether the
/// cache at `dir` is in use.
pub(crate) fn keep_compiled_kernels(dir: &std::path::Path) -> bool {
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig, cache::CacheConfig};
    let current = CubeClRuntimeConfig::get();
    if current.compilation.cache.is_some() {
        return false;
    }
    let mut config = (*current).clone();
    config.compilation.cache = Some(CacheConfig::File(dir.to_path_buf()));
    *CubeClRuntimeConfig::storage().lock() = Some(std::sync::Arc::new(config));
    true
}
