//! Running models in reduced precision (`f16`, `bf16`).
//!
//! Burn 0.21 float tensors carry their dtype at run time, so one backend type (e.g.
//! `Cuda<f32>`) holds `f32`, `f16` and `bf16` tensors side by side. A model is switched to
//! another precision by casting its parameters ([`cast_module`]); the models of this crate
//! compute in the dtype of their weights, cast their float inputs to it on entry and return
//! their output in the dtype of the input (the U-Net, the VAE), so callers keep working in
//! `f32`. Inside, the precision-sensitive steps run in `f32` whatever the weights' dtype:
//! group and layer norm statistics, the sinusoidal timestep embeddings, CLIP's attention,
//! and (when [`Attention::upcast`](crate::nn::Attention::upcast) is set, e.g. through
//! [`UNet2DConditionModel::set_attention_upcast`](crate::unet::UNet2DConditionModel::set_attention_upcast))
//! the U-Net's and VAE's attention.
//!
//! Whether a backend can hold and compute with a dtype is [`check_dtype`]: burn-ndarray has
//! no `f16` / `bf16` tensors (casting to them panics), burn-flex (CPU) and the CubeCL GPU
//! backends (CUDA; wgpu where the adapter has `shader-f16`) have them.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};
use diffusion_core::{Error, Result};

use crate::nn::cast_to;

/// The name diffusers / PyTorch use for a float dtype (`float32`, `float16`, `bfloat16`).
pub fn dtype_name(dtype: FloatDType) -> &'static str {
    match dtype {
        FloatDType::F64 => "float64",
        FloatDType::F32 => "float32",
        FloatDType::Flex32 => "flex32",
        FloatDType::F16 => "float16",
        FloatDType::BF16 => "bfloat16",
    }
}

/// `Ok` when tensors of `dtype` can be stored and computed with on `device`
/// ([`Backend::supports_dtype`]); otherwise [`Error::Unsupported`] naming the backend and
/// the dtype. Call it before casting: a cast to an unsupported dtype panics inside the
/// backend.
pub fn check_dtype<B: Backend>(device: &B::Device, dtype: FloatDType) -> Result<()> {
    if B::supports_dtype(device, DType::from(dtype)) {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "the {} backend has no {} tensors on {device:?}",
            B::name(device),
            dtype_name(dtype)
        )))
    }
}

/// Casts every float parameter of `module` to `dtype` (parameters already in `dtype` are
/// left as they are). Integer and bool parameters are untouched. Check support with
/// [`check_dtype`] first.
///
/// Parameters are cast one at a time, each original released as soon as its copy exists,
/// so the peak memory is the module's size in its current dtype plus one tensor. Casting
/// down and back up does not restore the bits rounded off: reload the weights for an exact
/// `f32` model.
pub fn cast_module<B: Backend, M: Module<B>>(module: M, dtype: FloatDType) -> M {
    struct Cast(DType);
    impl<B: Backend> ModuleMapper<B> for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let dtype = self.0;
            param.map(|t| cast_to(t, dtype))
        }
    }
    module.map(&mut Cast(DType::from(dtype)))
}

/// The dtypes of the float parameters of `module`, each listed once in order of first
/// appearance (initialising lazily initialised parameters).
pub fn parameter_dtypes<B: Backend, M: Module<B>>(module: &M) -> Vec<DType> {
    struct Collect(Vec<DType>);
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let dtype = param.val().dtype();
            if !self.0.contains(&dtype) {
                self.0.push(dtype);
            }
        }
    }
    let mut collect = Collect(Vec::new());
    module.visit(&mut collect);
    collect.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::nn::LinearConfig;

    #[test]
    fn ndarray_has_no_half_precision() {
        let device = Default::default();
        assert!(check_dtype::<NdArray<f32>>(&device, FloatDType::F32).is_ok());
        for dtype in [FloatDType::F16, FloatDType::BF16] {
            match check_dtype::<NdArray<f32>>(&device, dtype) {
                Err(Error::Unsupported(msg)) => assert!(msg.contains(dtype_name(dtype)), "{msg}"),
                other => panic!("{dtype:?}: expected Unsupported, got {other:?}"),
            }
        }
    }

    #[test]
    fn casting_to_the_current_dtype_keeps_the_values() {
        let device = Default::default();
        let linear = LinearConfig::new(3, 2).init::<NdArray<f32>>(&device);
        let before = linear.weight.val();
        let cast = cast_module(linear, FloatDType::F32);
        assert_eq!(parameter_dtypes(&cast), vec![DType::F32]);
        cast.weight
            .val()
            .into_data()
            .assert_eq(&before.into_data(), true);
    }
}
