//! `StableDiffusionPipeline`: text-to-image, image-to-image and inpainting with
//! classifier-free guidance, for SD 1.x / 2.x and SDXL checkpoints in diffusers format.
//!
//! The loop is diffusers' `StableDiffusionPipeline.__call__`: encode the prompts (and the
//! negative prompts for guidance), start from `latents * init_noise_sigma`, and at each
//! timestep run the U-Net once on the concatenated `[uncond, cond]` batch, combine the two
//! predictions, and let the scheduler step; finally decode with the VAE.

mod guidance;
mod options;
mod precision;
#[cfg(test)]
mod tests;

use std::ops::ControlFlow;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData, get_device_settings};
use diffusion_core::{ConfigMap, Error, ModelDir, NoiseSource, Result};
use diffusion_models::clip::{ClipTextModel, ClipTextModelWithProjection};
use diffusion_models::nn::layer_norm;
use diffusion_models::precision::cast_module;
use diffusion_models::tensor::BurnTensor;
use diffusion_models::tokenizer::ClipTokenizer;
use diffusion_models::unet::{UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
use diffusion_models::vae::AutoencoderKL;
use diffusion_schedulers::{Scheduler, registry};

pub use guidance::{classifier_free_guidance, guidance_scale_embedding, rescale_guidance};
pub use options::{
    GenerateOptions, GenerateOutput, MAX_IMAGE_SIDE, MAX_IMAGES_PER_PROMPT, MAX_STEPS, PromptKind,
    StepCallback, StepInfo, TruncatedPrompt,
};
pub use precision::Precision;

use crate::image_io::RgbImage;

/// The scheduler type pipelines run: any sampler over device tensors.
pub type DynScheduler<B> = Box<dyn Scheduler<BurnTensor<B, 4>>>;

/// SDXL's second text encoder and its tokenizer.
#[derive(Debug)]
pub struct SecondTextEncoder<B: Backend> {
    /// `text_encoder_2` (OpenCLIP bigG with projection).
    pub text_encoder: ClipTextModelWithProjection<B>,
    /// `tokenizer_2`.
    pub tokenizer: ClipTokenizer,
}

/// The parts of a pipeline, for building one without a model folder.
pub struct PipelineParts<B: Backend> {
    /// The denoiser.
    pub unet: UNet2DConditionModel<B>,
    /// Its config (sample size, conditioning kinds).
    pub unet_config: UNet2DConditionConfig,
    /// The autoencoder.
    pub vae: AutoencoderKL<B>,
    /// The (first) text encoder.
    pub text_encoder: ClipTextModel<B>,
    /// Its tokenizer.
    pub tokenizer: ClipTokenizer,
    /// SDXL's second text encoder.
    pub text_encoder_2: Option<SecondTextEncoder<B>>,
    /// The sampler.
    pub scheduler: DynScheduler<B>,
    /// The model's `scheduler_config.json`, kept so the sampler can be swapped by name.
    pub scheduler_config: ConfigMap,
    /// SDXL `force_zeros_for_empty_prompt` (zero negative embeddings when no negative prompt).
    pub force_zeros_for_empty_prompt: bool,
}

/// diffusers' `StableDiffusionPipeline` (and `StableDiffusionXLPipeline` when a second text
/// encoder is present), with image-to-image and inpainting.
pub struct StableDiffusionPipeline<B: Backend> {
    parts: PipelineParts<B>,
    device: B::Device,
    vae_scale_factor: usize,
    precision: Precision,
}

impl<B: Backend> PipelineParts<B> {
    /// Casts the networks to `precision` (which must have been checked), taking each one by
    /// value so that its old weights are released parameter by parameter.
    fn cast(self, precision: &Precision) -> Self {
        let mut unet = cast_module(self.unet, precision.unet);
        unet.set_attention_upcast(precision.attention_f32);
        Self {
            unet,
            vae: cast_module(self.vae, precision.vae),
            text_encoder: cast_module(self.text_encoder, precision.text_encoder),
            text_encoder_2: self.text_encoder_2.map(|second| SecondTextEncoder {
                text_encoder: cast_module(second.text_encoder, precision.text_encoder),
                tokenizer: second.tokenizer,
            }),
            ..self
        }
    }
}

impl<B: Backend> StableDiffusionPipeline<B> {
    /// Loads every component of a diffusers model folder (`model_index.json`, `unet/`,
    /// `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, and for SDXL `text_encoder_2/`,
    /// `tokenizer_2/`). The scheduler is the class named in its config.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        Self::from_pretrained_with_precision(dir, device, Precision::f32())
    }

    /// [`from_pretrained`](Self::from_pretrained) running the networks in `precision`, e.g.
    /// `Precision::half(FloatDType::F16)`. The backend's support for the dtypes is checked
    /// first: an unsupported one (`NdArray` has no `f16` / `bf16`) is
    /// [`Error::Unsupported`] before anything is read. The weights are loaded in `f32` and
    /// cast one tensor at a time.
    pub fn from_pretrained_with_precision(
        dir: impl AsRef<Path>,
        device: &B::Device,
        precision: Precision,
    ) -> Result<Self> {
        precision.check::<B>(device)?;
        let dir = ModelDir::open(dir)?;
        let unet_config = UNet2DConditionConfig::from_config_map(&dir.config("unet")?)?;
        let unet = UNet2DConditionModel::load(&dir, "unet", None, device)?;
        let vae = AutoencoderKL::load(&dir, "vae", None, device)?;
        let text_encoder = ClipTextModel::load(&dir, "text_encoder", None, device)?;
        let tokenizer = ClipTokenizer::from_model_dir(&dir, "tokenizer")?;
        let has_second = matches!(dir.component_spec("text_encoder_2"), Ok(Some(_)));
        let text_encoder_2 = if has_second {
            Some(SecondTextEncoder {
                text_encoder: ClipTextModelWithProjection::load(
                    &dir,
                    "text_encoder_2",
                    None,
                    device,
                )?,
                tokenizer: ClipTokenizer::from_model_dir(&dir, "tokenizer_2")?,
            })
        } else {
            None
        };
        let scheduler_config = dir.config("scheduler")?;
        let scheduler = registry::from_class_config(&scheduler_config)?;
        let force_zeros_for_empty_prompt = dir
            .index()
            .and_then(|i| i.options.get("force_zeros_for_empty_prompt"))
            .and_then(|v| v.as_bool())
            .unwrap_or(text_encoder_2.is_some());
        let parts = PipelineParts {
            unet,
            unet_config,
            vae,
            text_encoder,
            tokenizer,
            text_encoder_2,
            scheduler,
            scheduler_config,
            force_zeros_for_empty_prompt,
        };
        let mut pipe = Self::from_parts(parts, device)?;
        if precision != Precision::f32() {
            pipe.parts = pipe.parts.cast(&precision);
            pipe.precision = precision;
        }
        Ok(pipe)
    }

    /// Assembles a pipeline from loaded parts (run in whatever dtype their weights have;
    /// [`precision`](Self::precision) reports `f32` until [`set_precision`](Self::set_precision)).
    pub fn from_parts(parts: PipelineParts<B>, device: &B::Device) -> Result<Self> {
        let vae_scale_factor = parts.vae.downsampling_factor;
        Ok(Self {
            parts,
            device: device.clone(),
            vae_scale_factor,
            precision: Precision::f32(),
        })
    }

    /// The precision the networks were last set to.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Casts the networks to `precision`. An unsupported dtype is [`Error::Unsupported`]
    /// and leaves the pipeline as it was. While a network is cast, its old and new weights
    /// coexist (load with [`from_pretrained_with_precision`](Self::from_pretrained_with_precision)
    /// to avoid that peak); casting down and back to `f32` keeps the rounding of the
    /// narrower format.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        precision.check::<B>(&self.device)?;
        let mut unet = cast_module(self.parts.unet.clone(), precision.unet);
        unet.set_attention_upcast(precision.attention_f32);
        self.parts.unet = unet;
        self.parts.vae = cast_module(self.parts.vae.clone(), precision.vae);
        self.parts.text_encoder =
            cast_module(self.parts.text_encoder.clone(), precision.text_encoder);
        if let Some(second) = &mut self.parts.text_encoder_2 {
            second.text_encoder = cast_module(second.text_encoder.clone(), precision.text_encoder);
        }
        self.precision = precision;
        Ok(())
    }

    /// The parts, e.g. to reach the U-Net.
    pub fn parts(&self) -> &PipelineParts<B> {
        &self.parts
    }

    /// Replaces the U-Net (e.g. by an inpainting U-Net sharing the other components). It is
    /// cast to the pipeline's [`precision`](Self::precision) when that is not `f32`.
    pub fn replace_unet(&mut self, unet: UNet2DConditionModel<B>, config: UNet2DConditionConfig) {
        self.parts.unet = if self.precision == Precision::f32() {
            unet
        } else {
            let mut unet = cast_module(unet, self.precision.unet);
            unet.set_attention_upcast(self.precision.attention_f32);
            unet
        };
        self.parts.unet_config = config;
    }

    /// Replaces the sampler by one built from the model's scheduler config under another
    /// name (class or short name), as diffusers' `X.from_config(pipe.scheduler.config)`.
    pub fn set_scheduler_by_name(&mut self, name: &str) -> Result<()> {
        self.parts.scheduler = registry::from_config(name, &self.parts.scheduler_config)?;
        Ok(())
    }

    /// Replaces the sampler (any `Scheduler`, including one defined outside this crate).
    pub fn set_scheduler(&mut self, scheduler: DynScheduler<B>) {
        self.parts.scheduler = scheduler;
    }

    /// The sampler in use.
    pub fn scheduler(&self) -> &dyn Scheduler<BurnTensor<B, 4>> {
        self.parts.scheduler.as_ref()
    }

    /// Pixels per latent cell (`2^(len(vae.block_out_channels) - 1)`).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_scale_factor
    }

    /// The default image size: the U-Net's `sample_size` times the VAE scale factor.
    pub fn default_size(&self) -> (usize, usize) {
        let [h, w] = self
            .parts
            .unet_config
            .sample_size
            .as_ref()
            .map(|s| s.dims())
            .unwrap_or([64, 64]);
        (h * self.vae_scale_factor, w * self.vae_scale_factor)
    }

    /// The token ids of `text` under the (first) tokenizer, padded to its max length.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.parts.tokenizer.encode(text)
    }

    fn ids_tensor(&self, tokenizer: &ClipTokenizer, texts: &[String]) -> Result<Tensor<B, 2, Int>> {
        let mut flat = Vec::new();
        let mut len = 0;
        for t in texts {
            let ids = tokenizer.encode(t)?;
            len = ids.len();
            flat.extend(ids.into_iter().map(|i| i as i64));
        }
        Ok(Tensor::from_data(
            TensorData::new(flat, [texts.len(), len]),
            &self.device,
        ))
    }

    /// Encodes texts to the U-Net's `encoder_hidden_states` (and SDXL's pooled embeddings).
    ///
    /// SD 1.x/2.x: the last hidden state, or with `clip_skip` the hidden state `clip_skip`
    /// layers earlier passed through the final layer norm. SDXL: the penultimate hidden
    /// states (`clip_skip` more layers back) of both encoders concatenated, and the second
    /// encoder's projected pooled output.
    ///
    /// The embeddings are returned in the device's default float dtype (`f32`) whatever the
    /// text encoders' precision.
    pub fn encode_text(
        &self,
        texts: &[String],
        clip_skip: Option<usize>,
    ) -> Result<(Tensor<B, 3>, Option<Tensor<B, 2>>)> {
        let ids = self.ids_tensor(&self.parts.tokenizer, texts)?;
        let out = self.parts.text_encoder.forward(ids)?;
        match &self.parts.text_encoder_2 {
            None => {
                let hidden = match clip_skip {
                    None => out.last_hidden_state,
                    Some(k) => layer_norm(
                        &self.parts.text_encoder.final_layer_norm,
                        out.hidden_state_from_end(k + 1)?,
                    ),
                };
                Ok((to_default_float(hidden), None))
            }
            Some(second) => {
                let skip = clip_skip.unwrap_or(0);
                let h1 = out.hidden_state_from_end(skip + 2)?;
                let ids2 = self.ids_tensor(&second.tokenizer, texts)?;
                let out2 = second.text_encoder.forward(ids2)?;
                let h2 = out2.hidden_state_from_end(skip + 2)?;
                let pooled = out2.text_embeds.ok_or_else(|| {
                    Error::InvalidState("text_encoder_2 returned no projected embeddings".into())
                })?;
                Ok((
                    to_default_float(Tensor::cat(vec![h1, h2], 2)),
                    Some(to_default_float(pooled)),
                ))
            }
        }
    }

    /// Checks `opts` against this model before any work, as diffusers' `check_inputs`:
    /// [`GenerateOptions::check`] (ranges and finiteness, no model needed), then the image
    /// size (the model's default when not given) a positive multiple of the VAE scale factor
    /// (and of 8) up to [`MAX_IMAGE_SIDE`], an inpainting U-Net given a mask, and the latents,
    /// init image and mask sized for the batch and image. Returns the image `(height, width)`.
    ///
    /// [`generate`](Self::generate) calls it first; a failure is
    /// [`Error::InvalidArgument`] (or [`Error::Shape`] for arrays of the wrong length)
    /// before any network runs or noise is drawn.
    pub fn check_inputs(&self, opts: &GenerateOptions) -> Result<(usize, usize)> {
        opts.check()?;
        let (height, width) = self.check_size(opts)?;
        let unet_in = self.parts.unet_config.in_channels;
        let latent_channels = self.parts.vae.latent_channels;
        if unet_in == latent_channels * 2 + 1 && opts.mask.is_none() {
            return Err(Error::InvalidArgument(format!(
                "this U-Net has {unet_in} input channels (an inpainting model): give an init image and a mask"
            )));
        }
        let batch = opts.prompts.len() * opts.images_per_prompt;
        let f = self.vae_scale_factor;
        let lshape = [batch, latent_channels, height / f, width / f];
        let sizes = [
            ("latents", &opts.latents, lshape.iter().product::<usize>()),
            ("the init image", &opts.init_image, 3 * height * width),
            ("the mask", &opts.mask, height * width),
        ];
        for (name, values, expected) in sizes {
            if let Some(values) = values
                && values.len() != expected
            {
                return Err(Error::Shape(format!(
                    "{name} has {} values; a {width}x{height} run of {batch} image(s) needs {expected}{}",
                    values.len(),
                    if name == "latents" {
                        format!(" ({lshape:?})")
                    } else {
                        String::new()
                    }
                )));
            }
        }
        Ok((height, width))
    }

    /// Runs the pipeline. Noise (initial latents when not given, VAE posterior samples,
    /// image-to-image noising, ancestral sampler noise) is drawn from `noise` in diffusers'
    /// order, so a recorded list of diffusers' draws replays its run exactly.
    ///
    /// The inputs are checked first ([`check_inputs`](Self::check_inputs)). Prompts longer
    /// than the text encoder's window are truncated, as diffusers does; the dropped text is
    /// reported in [`GenerateOutput::truncated`].
    pub fn generate(
        &mut self,
        opts: &GenerateOptions,
        noise: &mut dyn NoiseSource,
        callback: &mut StepCallback<'_, B>,
    ) -> Result<GenerateOutput> {
        let (height, width) = self.check_inputs(opts)?;
        let unet_in = self.parts.unet_config.in_channels;
        let latent_channels = self.parts.vae.latent_channels;
        let inpaint9 = unet_in == latent_channels * 2 + 1;
        let n_prompts = opts.prompts.len();
        let per = opts.images_per_prompt;
        let batch = n_prompts * per;
        let use_cfg =
            opts.guidance_scale > 1.0 && self.parts.unet_config.time_cond_proj_dim.is_none();

        // Timesteps first (image-to-image starts part-way): a strength that leaves no step is
        // an error before the text encoder runs. The scheduler draws no noise here, so the
        // order does not change any result.
        let scheduler = &mut self.parts.scheduler;
        if let Some(eta) = opts.eta {
            scheduler.set_eta(eta);
        }
        scheduler.set_timesteps(opts.steps)?;
        let all_timesteps = scheduler.timesteps().to_vec();
        let order = scheduler.order();
        let timesteps = if opts.init_image.is_some() {
            let init = ((opts.steps as f64 * opts.strength) as usize).min(opts.steps);
            let t_start = (opts.steps - init) * order;
            if t_start >= all_timesteps.len() {
                return Err(Error::InvalidArgument(format!(
                    "strength {} leaves no denoising steps out of {}",
                    opts.strength, opts.steps
                )));
            }
            scheduler.set_begin_index(t_start);
            all_timesteps[t_start..].to_vec()
        } else {
            all_timesteps
        };

        let mut truncated = self.truncations(&opts.prompts, PromptKind::Prompt)?;
        // 1. Prompt embeddings, repeated per image: [p0, p0, p1, p1, ...].
        let (cond, pooled) = self.encode_text(&opts.prompts, opts.clip_skip)?;
        let cond = repeat_interleave3(cond, per);
        let pooled = pooled.map(|p| repeat_interleave2(p, per));
        let (embeds, pooled_all) = if use_cfg {
            // Counted against the prompts by check_inputs.
            let negatives = opts.negative_prompts.clone();
            let zero_negative = negatives.is_none()
                && self.parts.force_zeros_for_empty_prompt
                && self.parts.text_encoder_2.is_some();
            let (neg, neg_pooled) = if zero_negative {
                (
                    cond.clone().zeros_like(),
                    pooled.clone().map(|p| p.zeros_like()),
                )
            } else {
                let texts = negatives.unwrap_or_else(|| vec![String::new(); n_prompts]);
                truncated.extend(self.truncations(&texts, PromptKind::NegativePrompt)?);
                let (n, p) = self.encode_text(&texts, opts.clip_skip)?;
                (
                    repeat_interleave3(n, per),
                    p.map(|p| repeat_interleave2(p, per)),
                )
            };
            let pooled_all = match (neg_pooled, pooled) {
                (Some(n), Some(p)) => Some(Tensor::cat(vec![n, p], 0)),
                _ => None,
            };
            (Tensor::cat(vec![neg, cond], 0), pooled_all)
        } else {
            (cond, pooled)
        };
        let model_batch = if use_cfg { 2 * batch } else { batch };

        // 2. Extra conditioning: SDXL time ids, LCM guidance embedding.
        let mut conditioning = UNetConditioning::default();
        if let Some(p) = pooled_all {
            let (oh, ow) = opts.original_size.unwrap_or((height, width));
            let (ct, cl) = opts.crops_coords_top_left;
            let ids = [oh, ow, ct, cl, height, width].map(|v| v as f32);
            let flat: Vec<f32> = (0..model_batch).flat_map(|_| ids).collect();
            conditioning.time_ids = Some(Tensor::from_data(
                TensorData::new(flat, [model_batch, 6]),
                &self.device,
            ));
            conditioning.text_embeds = Some(p);
        }
        if let Some(dim) = self.parts.unet_config.time_cond_proj_dim {
            let w = vec![opts.guidance_scale - 1.0; batch];
            let emb = guidance_scale_embedding(&w, dim);
            conditioning.timestep_cond = Some(Tensor::from_data(
                TensorData::new(emb, [batch, dim]),
                &self.device,
            ));
        }

        // 3. Latents (their length was checked by check_inputs).
        let (lh, lw) = (
            height / self.vae_scale_factor,
            width / self.vae_scale_factor,
        );
        let lshape = [batch, latent_channels, lh, lw];
        let given = opts
            .latents
            .as_ref()
            .map(|l| Tensor::<B, 4>::from_data(TensorData::new(l.clone(), lshape), &self.device));
        let init_pixels = match &opts.init_image {
            Some(img) => Some(self.image_tensor(img, height, width)?),
            None => None,
        };
        let mask_pixels = match &opts.mask {
            Some(m) => Some(self.mask_tensor(m, height, width)?),
            None => None,
        };
        let init_sigma = self.parts.scheduler.init_noise_sigma();
        let strength_max = opts.strength >= 1.0;
        let mut image_latents = None;
        let mut blend_noise = None;
        let mut latents = match (&init_pixels, &mask_pixels) {
            (Some(pixels), None) => {
                // image-to-image: encode, then noise to the first timestep
                let encoded = self.encode_image(pixels.clone(), noise)?;
                let encoded = repeat_batch(encoded, batch);
                let eps = match given {
                    Some(g) => g,
                    None => self.randn(lshape, noise)?,
                };
                self.add_noise(encoded, eps, timesteps[0])?
            }
            (Some(pixels), Some(_)) => {
                if !inpaint9 {
                    let encoded = self.encode_image(pixels.clone(), noise)?;
                    image_latents = Some(repeat_batch(encoded, batch));
                }
                let eps = match given {
                    Some(g) => g,
                    None => self.randn(lshape, noise)?,
                };
                blend_noise = Some(eps.clone());
                if strength_max {
                    eps.mul_scalar(init_sigma)
                } else {
                    let il = image_latents.clone().ok_or_else(|| {
                        Error::Unsupported("strength < 1 with a 9-channel inpainting U-Net".into())
                    })?;
                    self.add_noise(il, eps, timesteps[0])?
                }
            }
            (None, _) => match given {
                Some(g) => g.mul_scalar(init_sigma),
                None => self.randn(lshape, noise)?.mul_scalar(init_sigma),
            },
        };

        // 4. Inpainting mask latents.
        let mut mask_latent = None;
        let mut masked_image_latents = None;
        if let (Some(pixels), Some(mask)) = (&init_pixels, &mask_pixels) {
            let keep = mask.clone().lower_elem(0.5).float();
            let masked = pixels.clone().mul(keep);
            let m = nearest_resize(mask.clone(), lh, lw);
            let mil = self.encode_image(masked, noise)?;
            mask_latent = Some(repeat_batch(m, batch));
            masked_image_latents = Some(repeat_batch(mil, batch));
        }

        // 5. Denoising loop.
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let doubled = if use_cfg {
                Tensor::cat(vec![latents.clone(), latents.clone()], 0)
            } else {
                latents.clone()
            };
            let mut model_in = self
                .parts
                .scheduler
                .scale_model_input(&BurnTensor(doubled), t)?
                .0;
            if inpaint9 {
                let (m, mil) = (
                    mask_latent.clone().expect("mask"),
                    masked_image_latents.clone().expect("masked"),
                );
                let (m, mil) = if use_cfg {
                    (
                        Tensor::cat(vec![m.clone(), m], 0),
                        Tensor::cat(vec![mil.clone(), mil], 0),
                    )
                } else {
                    (m, mil)
                };
                model_in = Tensor::cat(vec![model_in, m, mil], 1);
            }
            let t_tensor =
                Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32], [1]), &self.device);
            let pred =
                self.parts
                    .unet
                    .forward(model_in, t_tensor, embeds.clone(), &conditioning)?;
            let pred = if use_cfg {
                let mut halves = pred.chunk(2, 0);
                let c = halves.pop().expect("two halves");
                let u = halves.pop().expect("two halves");
                let guided = classifier_free_guidance(u, c.clone(), opts.guidance_scale);
                if opts.guidance_rescale > 0.0 {
                    rescale_guidance(guided, c, opts.guidance_rescale)
                } else {
                    guided
                }
            } else {
                pred
            };
            latents = self
                .parts
                .scheduler
                .step(&BurnTensor(pred), t, &BurnTensor(latents), noise)?
                .prev_sample
                .0;
            if let (Some(il), Some(m), Some(eps)) = (&image_latents, &mask_latent, &blend_noise) {
                // latent blending (inpainting with an ordinary U-Net): keep the known region
                // at the noise level of the next timestep
                let proper = if i + 1 < total {
                    self.add_noise(il.clone(), eps.clone(), timesteps[i + 1])?
                } else {
                    il.clone()
                };
                let inv = m.clone().neg().add_scalar(1.0);
                latents = proper.mul(inv).add(latents.mul(m.clone()));
            }
            let info = StepInfo {
                step: i,
                total,
                timestep: t,
            };
            if let ControlFlow::Break(()) = callback(info, &latents) {
                return Err(Error::Interrupted);
            }
        }

        // 6. Decode.
        let mut out = self.decode(latents)?;
        out.truncated = truncated;
        Ok(out)
    }

    /// What the tokenizers drop from each of `texts` (one entry per text cut; SDXL's two
    /// tokenizers usually cut at the same token and then report it once).
    fn truncations(&self, texts: &[String], kind: PromptKind) -> Result<Vec<TruncatedPrompt>> {
        let mut out: Vec<TruncatedPrompt> = Vec::new();
        let second = self.parts.text_encoder_2.as_ref().map(|s| &s.tokenizer);
        for tokenizer in std::iter::once(&self.parts.tokenizer).chain(second) {
            for (index, text) in texts.iter().enumerate() {
                if let Some(dropped) = truncated_text(tokenizer, text)? {
                    let t = TruncatedPrompt {
                        kind,
                        index,
                        max_tokens: tokenizer.max_length(),
                        dropped,
                    };
                    if !out.contains(&t) {
                        out.push(t);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Decodes latents to images: `vae.decode(latents / scaling_factor + shift)`, mapped from
    /// `[-1, 1]` to `[0, 1]`.
    pub fn decode(&self, latents: Tensor<B, 4>) -> Result<GenerateOutput> {
        let images = self
            .parts
            .vae
            .decode(self.parts.vae.unscale_latents(latents))?;
        let images = images.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0);
        let [b, c, h, w] = images.dims();
        if c != 3 {
            return Err(Error::Shape(format!(
                "the VAE decoded {c} channels, expected 3"
            )));
        }
        let nhwc = images.permute([0, 2, 3, 1]);
        let array: Vec<f32> = nhwc
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| Error::InvalidState(format!("reading the decoded images: {e:?}")))?;
        let plane = h * w * 3;
        let rgb = (0..b)
            .map(|i| {
                let pixels = array[i * plane..(i + 1) * plane]
                    .iter()
                    .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
                    .collect();
                RgbImage {
                    width: w as u32,
                    height: h as u32,
                    pixels,
                }
            })
            .collect();
        Ok(GenerateOutput {
            images: rgb,
            array,
            shape: [b, h, w, 3],
            truncated: Vec::new(),
        })
    }

    fn check_size(&self, opts: &GenerateOptions) -> Result<(usize, usize)> {
        let (dh, dw) = self.default_size();
        let (h, w) = (opts.height.unwrap_or(dh), opts.width.unwrap_or(dw));
        let f = self.vae_scale_factor.max(8);
        if h == 0 || w == 0 || h % f != 0 || w % f != 0 {
            return Err(Error::InvalidArgument(format!(
                "height and width must be positive multiples of {f}, got {h}x{w}"
            )));
        }
        // Given sizes were bounded by GenerateOptions::check; this catches a model whose
        // own default size is out of range.
        if h > MAX_IMAGE_SIDE || w > MAX_IMAGE_SIDE {
            return Err(Error::InvalidArgument(format!(
                "height and width must be at most {MAX_IMAGE_SIDE}, got {h}x{w}"
            )));
        }
        Ok((h, w))
    }

    fn randn(&self, shape: [usize; 4], noise: &mut dyn NoiseSource) -> Result<Tensor<B, 4>> {
        let data: Vec<f32> = noise
            .sample(&shape)?
            .into_iter()
            .map(|v| v as f32)
            .collect();
        Ok(Tensor::from_data(
            TensorData::new(data, shape),
            &self.device,
        ))
    }

    fn add_noise(&self, x0: Tensor<B, 4>, eps: Tensor<B, 4>, t: f64) -> Result<Tensor<B, 4>> {
        let b = x0.dims()[0];
        Ok(self
            .parts
            .scheduler
            .add_noise(&BurnTensor(x0), &BurnTensor(eps), &vec![t; b])?
            .0)
    }

    /// `[3, H, W]` in `[0, 1]` to a `[1, 3, H, W]` tensor in `[-1, 1]`.
    fn image_tensor(&self, img: &[f32], height: usize, width: usize) -> Result<Tensor<B, 4>> {
        if img.len() != 3 * height * width {
            return Err(Error::Shape(format!(
                "the init image has {} values; a {width}x{height} RGB image has {}",
                img.len(),
                3 * height * width
            )));
        }
        let t = Tensor::<B, 4>::from_data(
            TensorData::new(img.to_vec(), [1, 3, height, width]),
            &self.device,
        );
        Ok(t.mul_scalar(2.0).sub_scalar(1.0))
    }

    /// `[H, W]` in `[0, 1]` to a binarised `[1, 1, H, W]` mask (1 = repaint).
    fn mask_tensor(&self, mask: &[f32], height: usize, width: usize) -> Result<Tensor<B, 4>> {
        if mask.len() != height * width {
            return Err(Error::Shape(format!(
                "the mask has {} values; a {width}x{height} mask has {}",
                mask.len(),
                height * width
            )));
        }
        let t = Tensor::<B, 4>::from_data(
            TensorData::new(mask.to_vec(), [1, 1, height, width]),
            &self.device,
        );
        Ok(t.greater_equal_elem(0.5).float())
    }

    /// VAE-encodes `[1, 3, H, W]` pixels in `[-1, 1]` and samples the posterior with one
    /// noise draw, scaled by the VAE's scaling factor.
    fn encode_image(
        &self,
        pixels: Tensor<B, 4>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor<B, 4>> {
        let posterior = self.parts.vae.encode(pixels)?;
        let shape = posterior.mean.dims();
        let eps = self.randn(shape, noise)?;
        Ok(self.parts.vae.scale_latents(posterior.sample(eps)?))
    }
}

/// The text `tokenizer` drops from `prompt` to fit its window, or `None` when it fits:
/// the decoded tokens between the window's last content position and the end token, as
/// diffusers' `untruncated_ids[:, model_max_length - 1 : -1]`. Truncation keeps the start
/// token and puts the end token last, so the window holds `max_length - 2` prompt tokens.
pub fn truncated_text(tokenizer: &ClipTokenizer, prompt: &str) -> Result<Option<String>> {
    let ids = tokenizer.encode_unpadded(prompt)?;
    let max = tokenizer.max_length();
    if ids.len() <= max {
        return Ok(None);
    }
    Ok(Some(tokenizer.decode(&ids[max - 1..ids.len() - 1])?))
}

/// Casts to the device's default float dtype (`f32` for `Backend<f32>`) unless already
/// there: the text encoders' outputs when they run in reduced precision.
fn to_default_float<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let dtype: DType = get_device_settings::<B>(&x.device()).float_dtype.into();
    if x.dtype() == dtype { x } else { x.cast(dtype) }
}

fn repeat_interleave3<B: Backend>(x: Tensor<B, 3>, n: usize) -> Tensor<B, 3> {
    if n == 1 {
        return x;
    }
    let [b, s, d] = x.dims();
    x.unsqueeze_dim::<4>(1)
        .repeat_dim(1, n)
        .reshape([b * n, s, d])
}

fn repeat_interleave2<B: Backend>(x: Tensor<B, 2>, n: usize) -> Tensor<B, 2> {
    if n == 1 {
        return x;
    }
    let [b, d] = x.dims();
    x.unsqueeze_dim::<3>(1).repeat_dim(1, n).reshape([b * n, d])
}

/// Repeats a batch-of-one (or batch-dividing) tensor to `batch` (diffusers' `repeat`).
fn repeat_batch<B: Backend>(x: Tensor<B, 4>, batch: usize) -> Tensor<B, 4> {
    let b = x.dims()[0];
    if b == batch || b == 0 || !batch.is_multiple_of(b) {
        return x;
    }
    x.repeat_dim(0, batch / b)
}

/// PyTorch's `F.interpolate(mode="nearest")` to `[h, w]`: source index `floor(i * in / out)`.
fn nearest_resize<B: Backend>(x: Tensor<B, 4>, h: usize, w: usize) -> Tensor<B, 4> {
    let [_, _, ih, iw] = x.dims();
    let device = x.device();
    let rows: Vec<i64> = (0..h).map(|i| ((i * ih) / h) as i64).collect();
    let cols: Vec<i64> = (0..w).map(|j| ((j * iw) / w) as i64).collect();
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [h]), &device);
    let cols = Tensor::<B, 1, Int>::from_data(TensorData::new(cols, [w]), &device);
    x.select(2, rows).select(3, cols)
}
