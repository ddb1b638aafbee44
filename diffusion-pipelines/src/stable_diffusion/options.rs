//! What a generation run takes and returns.

use std::ops::ControlFlow;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::image_io::RgbImage;

/// The inputs of [`StableDiffusionPipeline::generate`](super::StableDiffusionPipeline::generate),
/// with diffusers' defaults.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// One prompt per image group.
    pub prompts: Vec<String>,
    /// Negative prompts (one per prompt, or none: the empty prompt).
    pub negative_prompts: Option<Vec<String>>,
    /// Classifier-free guidance scale; guidance is off at `<= 1`.
    pub guidance_scale: f64,
    /// Guidance rescale `phi` (Lin et al. 2023, §3.4); 0 disables it.
    pub guidance_rescale: f64,
    /// Number of denoising steps.
    pub steps: usize,
    /// Image height in pixels (default: the U-Net's `sample_size * vae_scale_factor`).
    pub height: Option<usize>,
    /// Image width in pixels (default as `height`).
    pub width: Option<usize>,
    /// Images per prompt.
    pub images_per_prompt: usize,
    /// Initial latents `[batch, 4, H/f, W/f]`, as diffusers' `latents=` (scaled by
    /// `init_noise_sigma` by the pipeline); drawn from the noise source when absent.
    pub latents: Option<Vec<f32>>,
    /// CLIP skip: use the output of the layer `clip_skip` layers before the last.
    pub clip_skip: Option<usize>,
    /// DDIM / TCD `eta`.
    pub eta: Option<f64>,
    /// Image-to-image / inpainting source image, `[3, H, W]` in `[0, 1]`.
    pub init_image: Option<Vec<f32>>,
    /// How much of the source image is re-noised (1 = all).
    pub strength: f64,
    /// Inpainting mask `[H, W]` in `[0, 1]`; 1 (>= 0.5) marks pixels to repaint.
    pub mask: Option<Vec<f32>>,
    /// SDXL: the original size conditioning `(height, width)` (default: the target size).
    pub original_size: Option<(usize, usize)>,
    /// SDXL: the crop conditioning `(top, left)`.
    pub crops_coords_top_left: (usize, usize),
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            negative_prompts: None,
            guidance_scale: 7.5,
            guidance_rescale: 0.0,
            steps: 50,
            height: None,
            width: None,
            images_per_prompt: 1,
            latents: None,
            clip_skip: None,
            eta: None,
            init_image: None,
            strength: 0.8,
            mask: None,
            original_size: None,
            crops_coords_top_left: (0, 0),
        }
    }
}

impl GenerateOptions {
    /// Options for one prompt, otherwise defaults.
    pub fn prompt(prompt: impl Into<String>) -> Self {
        Self {
            prompts: vec![prompt.into()],
            ..Self::default()
        }
    }
}

/// Progress reported to the per-step callback.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// 0-based index of the step just taken.
    pub step: usize,
    /// Number of steps in the run.
    pub total: usize,
    /// The timestep of the step just taken.
    pub timestep: f64,
}

/// A per-step callback: sees the step and the latents after it; `ControlFlow::Break` stops
/// the run with [`diffusion_core::Error::Interrupted`].
pub type StepCallback<'a, B> = dyn FnMut(StepInfo, &Tensor<B, 4>) -> ControlFlow<()> + 'a;

/// What a run produces.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// The images as RGB8.
    pub images: Vec<RgbImage>,
    /// The images as float32 `[batch, H, W, 3]` in `[0, 1]` (diffusers' `output_type="np"`).
    pub array: Vec<f32>,
    /// `[batch, H, W, 3]`.
    pub shape: [usize; 4],
}

/// Keeps `B` used in the public callback type alias's documentation.
#[doc(hidden)]
pub fn _callback_type_check<B: Backend>(_: &mut StepCallback<'_, B>) {}
