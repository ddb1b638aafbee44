//! What a generation run takes and returns.

use std::ops::ControlFlow;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use diffusion_core::{Error, Result};

use crate::image_io::RgbImage;

/// The most denoising steps [`GenerateOptions::check`] accepts. Far above any useful run
/// (samplers converge in tens of steps, DDPM uses 1000): a larger count is a typo that would
/// otherwise run for hours.
pub const MAX_STEPS: usize = 10_000;

/// The most images per prompt [`GenerateOptions::check`] accepts: every image is one row of
/// the U-Net batch, so a mistyped count would otherwise exhaust memory mid-run.
pub const MAX_IMAGES_PER_PROMPT: usize = 1_024;

/// The largest image side in pixels [`GenerateOptions::check`] accepts (also WebP's limit).
/// An SD U-Net's attention at 16384 x 16384 already needs far more memory than any device
/// has; the bound turns a typo into an error instead of an allocation failure.
pub const MAX_IMAGE_SIDE: usize = 16_384;

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

    /// Checks everything that does not depend on the model, as diffusers' `check_inputs`:
    /// at least one prompt and one negative prompt per prompt when negatives are given;
    /// `steps` in `1..=`[`MAX_STEPS`]; `images_per_prompt` in
    /// `1..=`[`MAX_IMAGES_PER_PROMPT`]; a finite `guidance_scale`; `guidance_rescale` in
    /// `[0, 1]`; `eta` finite and `>= 0`; `strength` in `[0, 1]`, and with an init image
    /// `> 0` and leaving at least one step (`steps * strength >= 1`); a mask only with an
    /// init image; a given `height` / `width` a positive multiple
    /// of 8 and at most [`MAX_IMAGE_SIDE`]; finite latents, init image and mask values.
    ///
    /// Any failure is [`Error::InvalidArgument`] naming the field. It costs no model work,
    /// so a caller (the `diffusion` command) can run it before loading anything;
    /// [`StableDiffusionPipeline::generate`](super::StableDiffusionPipeline::generate) runs
    /// it first, through
    /// [`check_inputs`](super::StableDiffusionPipeline::check_inputs).
    pub fn check(&self) -> Result<()> {
        let invalid = |msg: String| Err(Error::InvalidArgument(msg));
        if self.prompts.is_empty() {
            return invalid("at least one prompt is needed".into());
        }
        if let Some(n) = &self.negative_prompts
            && n.len() != self.prompts.len()
        {
            return invalid(format!(
                "{} negative prompts for {} prompts",
                n.len(),
                self.prompts.len()
            ));
        }
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return invalid(format!(
                "steps must be in 1..={MAX_STEPS}, got {}",
                self.steps
            ));
        }
        if !(1..=MAX_IMAGES_PER_PROMPT).contains(&self.images_per_prompt) {
            return invalid(format!(
                "images per prompt must be in 1..={MAX_IMAGES_PER_PROMPT}, got {}",
                self.images_per_prompt
            ));
        }
        // NaN compares false with everything, so each range test is written to fail on it.
        if !self.guidance_scale.is_finite() {
            return invalid(format!(
                "guidance scale must be a finite number, got {}",
                self.guidance_scale
            ));
        }
        if !(0.0..=1.0).contains(&self.guidance_rescale) {
            return invalid(format!(
                "guidance rescale must be in [0, 1], got {}",
                self.guidance_rescale
            ));
        }
        if let Some(eta) = self.eta
            && !(eta.is_finite() && eta >= 0.0)
        {
            return invalid(format!("eta must be a finite number >= 0, got {eta}"));
        }
        if !(0.0..=1.0).contains(&self.strength)
            || (self.init_image.is_some() && self.strength == 0.0)
        {
            return invalid(format!("strength must be in (0, 1], got {}", self.strength));
        }
        // Image-to-image runs the last `floor(steps * strength)` of the steps (diffusers'
        // `get_timesteps`). Zero is refused, as diffusers' inpainting does: most samplers
        // would have no timestep left, and PNDM (whose first timestep repeats) one leftover.
        if self.init_image.is_some() && (self.steps as f64 * self.strength) < 1.0 {
            return invalid(format!(
                "strength {} leaves no denoising steps out of {} (steps x strength must be at least 1)",
                self.strength, self.steps
            ));
        }
        if self.mask.is_some() && self.init_image.is_none() {
            return invalid("a mask needs an init image".into());
        }
        for (name, side) in [("height", self.height), ("width", self.width)] {
            if let Some(side) = side
                && (side == 0 || side % 8 != 0 || side > MAX_IMAGE_SIDE)
            {
                return invalid(format!(
                    "{name} must be a positive multiple of 8 up to {MAX_IMAGE_SIDE}, got {side}"
                ));
            }
        }
        // A single NaN in an input array turns the whole image into NaN (black) after many
        // steps of work; one pass over the values is cheap next to that.
        for (name, values) in [
            ("latents", &self.latents),
            ("the init image", &self.init_image),
            ("the mask", &self.mask),
        ] {
            if let Some(values) = values
                && let Some(i) = values.iter().position(|v| !v.is_finite())
            {
                return invalid(format!("{name} must be finite, value {i} is {}", values[i]));
            }
        }
        Ok(())
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
    /// Text the tokenizers dropped from prompts longer than their window, one entry per
    /// prompt cut (empty when every prompt fit).
    pub truncated: Vec<TruncatedPrompt>,
}

/// Which prompt of [`GenerateOptions`] a [`TruncatedPrompt`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    /// `prompts[index]`.
    Prompt,
    /// `negative_prompts[index]`.
    NegativePrompt,
}

/// A prompt that did not fit the text encoder's window: the tokenizer kept the first
/// `max_tokens` tokens (start and end tokens included) and the encoder never saw the rest.
/// Its `Display` is diffusers' warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncatedPrompt {
    /// Prompt or negative prompt.
    pub kind: PromptKind,
    /// Its index in [`GenerateOptions::prompts`] or [`GenerateOptions::negative_prompts`].
    pub index: usize,
    /// The tokenizer's window, start and end tokens included (77 for CLIP).
    pub max_tokens: usize,
    /// The dropped text, as the tokenizer decodes the dropped tokens (lower-cased, spaces
    /// normalised by CLIP's tokenizer).
    pub dropped: String,
}

impl std::fmt::Display for TruncatedPrompt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let which = match self.kind {
            PromptKind::Prompt => "prompt",
            PromptKind::NegativePrompt => "negative prompt",
        };
        write!(
            f,
            "{which} #{} was truncated because the text encoder can only handle sequences up \
             to {} tokens; dropped: \"{}\"",
            self.index, self.max_tokens, self.dropped
        )
    }
}

/// Keeps `B` used in the public callback type alias's documentation.
#[doc(hidden)]
pub fn _callback_type_check<B: Backend>(_: &mut StepCallback<'_, B>) {}
