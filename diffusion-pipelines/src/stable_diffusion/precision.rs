//! The precision the pipeline's networks run in.

use burn::tensor::FloatDType;
use burn::tensor::backend::Backend;
use diffusion_core::{Error, Result};
use diffusion_models::precision::{check_dtype, dtype_name};

/// The float formats of the pipeline's networks (see `docs/pipelines.md`, *Precision*).
///
/// Whatever the choice, the sampler, the latents, the guidance arithmetic and the returned
/// images stay in `f32`: each network casts its inputs to its weights' dtype and its output
/// back to `f32`. Group / layer norm statistics, the timestep embeddings and CLIP's attention
/// are always computed in `f32`; the U-Net's attention too when [`attention_f32`] is set.
///
/// [`attention_f32`]: Self::attention_f32
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// The U-Net's weights and activations.
    pub unet: FloatDType,
    /// The text encoder(s).
    pub text_encoder: FloatDType,
    /// The VAE. `f32` in [`Precision::half`]: SD's VAE decoder overflows `f16` (diffusers'
    /// `force_upcast`; fp16 VAEs are known to give black images).
    pub vae: FloatDType,
    /// Computes the U-Net's attention (`softmax(q k^T) v`) in `f32` when the U-Net runs in
    /// `f16` / `bf16` (overrides the checkpoint's `upcast_attention`; no effect in `f32`).
    pub attention_f32: bool,
}

impl Default for Precision {
    fn default() -> Self {
        Self::f32()
    }
}

impl Precision {
    /// Everything in `f32` (the default).
    pub fn f32() -> Self {
        Self {
            unet: FloatDType::F32,
            text_encoder: FloatDType::F32,
            vae: FloatDType::F32,
            attention_f32: true,
        }
    }

    /// The U-Net and the text encoder(s) in `dtype` (`F16` or `BF16`), the VAE and the
    /// U-Net's attention in `f32`.
    pub fn half(dtype: FloatDType) -> Self {
        Self {
            unet: dtype,
            text_encoder: dtype,
            ..Self::f32()
        }
    }

    /// Parses `f32` / `fp32` / `float32`, `f16` / `fp16` / `float16` or `bf16` /
    /// `bfloat16` into [`Precision::f32`] or [`Precision::half`].
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::f32()),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::half(FloatDType::F16)),
            "bf16" | "bfloat16" => Ok(Self::half(FloatDType::BF16)),
            other => Err(Error::InvalidArgument(format!(
                "unknown precision `{other}` (f32, f16 or bf16)"
            ))),
        }
    }

    /// Whether any network runs in something other than `f32`.
    pub fn is_reduced(&self) -> bool {
        [self.unet, self.text_encoder, self.vae]
            .iter()
            .any(|d| *d != FloatDType::F32)
    }

    /// `Ok` when the backend supports every dtype used, else [`Error::Unsupported`] (e.g.
    /// `NdArray` and `f16`). Cheap: no model is touched.
    pub fn check<B: Backend>(&self, device: &B::Device) -> Result<()> {
        for (part, dtype) in [
            ("U-Net", self.unet),
            ("text encoder", self.text_encoder),
            ("VAE", self.vae),
        ] {
            check_dtype::<B>(device, dtype).map_err(|e| match e {
                Error::Unsupported(msg) => Error::Unsupported(format!(
                    "cannot run the {part} in {}: {msg}",
                    dtype_name(dtype)
                )),
                other => other,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn parse_and_defaults() {
        assert_eq!(Precision::parse("F32").unwrap(), Precision::default());
        let half = Precision::parse("fp16").unwrap();
        assert_eq!(half.unet, FloatDType::F16);
        assert_eq!(half.text_encoder, FloatDType::F16);
        assert_eq!(half.vae, FloatDType::F32);
        assert!(half.attention_f32 && half.is_reduced());
        assert_eq!(Precision::parse("bfloat16").unwrap().unet, FloatDType::BF16);
        assert!(matches!(
            Precision::parse("f8"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(!Precision::f32().is_reduced());
    }

    #[test]
    fn ndarray_rejects_half_precision() {
        let device = Default::default();
        assert!(Precision::f32().check::<NdArray<f32>>(&device).is_ok());
        let err = Precision::half(FloatDType::BF16)
            .check::<NdArray<f32>>(&device)
            .unwrap_err();
        assert!(
            matches!(&err, Error::Unsupported(m) if m.contains("bfloat16") && m.contains("U-Net")),
            "{err}"
        );
    }
}
