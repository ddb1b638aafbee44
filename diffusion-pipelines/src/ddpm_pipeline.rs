//! `DdpmPipeline`: unconditional or class-conditional image generation in pixel space
//! (diffusers' `DDPMPipeline`, e.g. `google/ddpm-cifar10-32`).
//!
//! The loop is diffusers' `DDPMPipeline.__call__`: draw the initial image from the noise
//! source, then at each timestep run the [`UNet2DModel`] once and let the scheduler step;
//! finally map `[-1, 1]` to `[0, 1]`. Class-conditional models (`num_class_embeds` or
//! `class_embed_type: "timestep"`) take one class label per image, passed to the U-Net as
//! diffusers' `unet(image, t, class_labels=labels)` does.
//!
//! Any sampler can replace the folder's one ([`DdpmPipeline::set_scheduler_by_name`]). Unlike
//! diffusers' `DDPMPipeline`, the loop scales the initial noise by the sampler's
//! `init_noise_sigma` and its input by `scale_model_input`; both are the identity for DDPM,
//! DDIM and the other samplers diffusers' pipeline works with, and make the sigma-space
//! (Euler, Heun, ...) samplers correct.

use std::ops::ControlFlow;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use diffusion_core::{ConfigMap, Error, ModelDir, NoiseSource, Result};
use diffusion_models::tensor::BurnTensor;
use diffusion_models::unet::ClassLabels;
use diffusion_models::unet2d::{UNet2DClassEmbedding, UNet2DConfig, UNet2DModel};
use diffusion_schedulers::{Scheduler, registry};

use crate::image_io::RgbImage;
use crate::stable_diffusion::{DynScheduler, GenerateOutput, StepCallback, StepInfo};

/// diffusers' `DDPMPipeline`: a [`UNet2DModel`] and a sampler.
pub struct DdpmPipeline<B: Backend> {
    unet: UNet2DModel<B>,
    unet_config: UNet2DConfig,
    scheduler: DynScheduler<B>,
    scheduler_config: ConfigMap,
    sample_size: Option<[usize; 2]>,
    device: B::Device,
}

impl<B: Backend> DdpmPipeline<B> {
    /// Loads a diffusers `DDPMPipeline` folder (`model_index.json`, `unet/`, `scheduler/`).
    /// The sampler is the class named in the scheduler config.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        let dir = ModelDir::open(dir)?;
        let unet_config = UNet2DConfig::from_config_map(&dir.config("unet")?)?;
        let unet = UNet2DModel::load(&dir, "unet", None, device)?;
        let scheduler_config = dir.config("scheduler")?;
        let scheduler = registry::from_class_config(&scheduler_config)?;
        Ok(Self::from_parts(
            unet,
            unet_config,
            scheduler,
            scheduler_config,
            device,
        ))
    }

    /// Assembles a pipeline from loaded parts. `scheduler_config` is kept so the sampler can
    /// be swapped by name.
    pub fn from_parts(
        unet: UNet2DModel<B>,
        unet_config: UNet2DConfig,
        scheduler: DynScheduler<B>,
        scheduler_config: ConfigMap,
        device: &B::Device,
    ) -> Self {
        Self {
            unet,
            unet_config,
            scheduler,
            scheduler_config,
            sample_size: None,
            device: device.clone(),
        }
    }

    /// The U-Net.
    pub fn unet(&self) -> &UNet2DModel<B> {
        &self.unet
    }

    /// The U-Net's config.
    pub fn unet_config(&self) -> &UNet2DConfig {
        &self.unet_config
    }

    /// Replaces the sampler by one built from the model's scheduler config under another
    /// name (class or short name), as diffusers' `X.from_config(pipe.scheduler.config)`.
    pub fn set_scheduler_by_name(&mut self, name: &str) -> Result<()> {
        self.scheduler = registry::from_config(name, &self.scheduler_config)?;
        Ok(())
    }

    /// Replaces the sampler (any `Scheduler`, including one defined outside this crate).
    pub fn set_scheduler(&mut self, scheduler: DynScheduler<B>) {
        self.scheduler = scheduler;
    }

    /// The sampler in use.
    pub fn scheduler(&self) -> &dyn Scheduler<BurnTensor<B, 4>> {
        self.scheduler.as_ref()
    }

    /// Generates at `[height, width]` instead of the U-Net's `sample_size` (`None` restores
    /// it). Both must be multiples of the U-Net's downsampling factor.
    pub fn set_sample_size(&mut self, size: Option<[usize; 2]>) {
        self.sample_size = size;
    }

    /// `[height, width]` of the generated images: the size set with
    /// [`set_sample_size`](Self::set_sample_size), else the U-Net's `sample_size`.
    pub fn sample_size(&self) -> Result<[usize; 2]> {
        self.sample_size
            .or_else(|| self.unet_config.sample_dims())
            .ok_or_else(|| {
                Error::InvalidArgument(
                    "the U-Net config has no sample_size: set one with set_sample_size".into(),
                )
            })
    }

    /// Number of classes of a class-table model (`num_class_embeds`), if it has one.
    pub fn num_classes(&self) -> Option<usize> {
        match self.unet.class_embed_type {
            Some(UNet2DClassEmbedding::Embedding(n)) => Some(n),
            _ => None,
        }
    }

    /// Generates `batch` images in `steps` sampler steps.
    ///
    /// `class_labels` holds one label per image for a class-conditional U-Net and must be
    /// `None` otherwise. Noise (the initial image `[batch, in_channels, H, W]`, then the
    /// sampler's noise) is drawn from `noise` in diffusers' order, so a recorded list of
    /// diffusers' draws replays its run exactly. `callback` sees every step and the image
    /// after it (in `[-1, 1]`); `ControlFlow::Break` stops with [`Error::Interrupted`].
    ///
    /// The output holds the images as RGB8 (a one-channel model gives grey RGB) and as
    /// float32 `[batch, H, W, in_channels]` in `[0, 1]`, diffusers' `output_type="np"`:
    /// `(x / 2 + 0.5).clamp(0, 1)`.
    pub fn generate(
        &mut self,
        batch: usize,
        steps: usize,
        class_labels: Option<Vec<usize>>,
        noise: &mut dyn NoiseSource,
        callback: &mut StepCallback<'_, B>,
    ) -> Result<GenerateOutput> {
        if batch == 0 {
            return Err(Error::InvalidArgument("batch must be at least 1".into()));
        }
        if steps == 0 {
            return Err(Error::InvalidArgument("steps must be at least 1".into()));
        }
        let channels = self.unet.in_channels;
        if channels != 1 && channels != 3 {
            return Err(Error::Unsupported(format!(
                "images with {channels} channels (RGB and greyscale models are supported)"
            )));
        }
        let [height, width] = self.sample_size()?;
        let factor = self.unet.downsampling_factor();
        if height == 0
            || width == 0
            || !height.is_multiple_of(factor)
            || !width.is_multiple_of(factor)
        {
            return Err(Error::InvalidArgument(format!(
                "height and width must be positive multiples of {factor}, got {height}x{width}"
            )));
        }
        let labels = self.class_labels(batch, class_labels)?;

        // 1. Timesteps and the initial image.
        self.scheduler.set_timesteps(steps)?;
        let timesteps = self.scheduler.timesteps().to_vec();
        let shape = [batch, channels, height, width];
        let data: Vec<f32> = noise
            .sample(&shape)?
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let mut image = Tensor::<B, 4>::from_data(TensorData::new(data, shape), &self.device)
            .mul_scalar(self.scheduler.init_noise_sigma());

        // 2. Denoising loop.
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = self
                .scheduler
                .scale_model_input(&BurnTensor(image.clone()), t)?
                .0;
            let t_tensor =
                Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32], [1]), &self.device);
            let output = self.unet.forward(input, t_tensor, labels.as_ref())?;
            image = self
                .scheduler
                .step(&BurnTensor(output), t, &BurnTensor(image), noise)?
                .prev_sample
                .0;
            let info = StepInfo {
                step: i,
                total,
                timestep: t,
            };
            if let ControlFlow::Break(()) = callback(info, &image) {
                return Err(Error::Interrupted);
            }
        }

        // 3. To [0, 1], channels last.
        to_output(image)
    }

    /// Checks the labels against the model and turns them into the U-Net's input.
    fn class_labels(
        &self,
        batch: usize,
        labels: Option<Vec<usize>>,
    ) -> Result<Option<ClassLabels<B>>> {
        let kind = self.unet.class_embed_type;
        let labels = match (kind, labels) {
            (None, None) => return Ok(None),
            (None, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "class labels were given, but this model is not class-conditional".into(),
                ));
            }
            (Some(_), None) => {
                return Err(Error::InvalidArgument(format!(
                    "this model is class-conditional: give one class label per image ({batch})"
                )));
            }
            (Some(_), Some(labels)) => labels,
        };
        if labels.len() != batch {
            return Err(Error::InvalidArgument(format!(
                "{} class labels for a batch of {batch} (give one per image)",
                labels.len()
            )));
        }
        let n = labels.len();
        Ok(Some(match kind {
            Some(UNet2DClassEmbedding::Embedding(classes)) => {
                if let Some(bad) = labels.iter().find(|&&l| l >= classes) {
                    return Err(Error::InvalidArgument(format!(
                        "class label {bad} is out of range: the model has {classes} classes"
                    )));
                }
                let ids = labels.into_iter().map(|l| l as i64).collect();
                ClassLabels::Ids(Tensor::<B, 1, Int>::from_data(
                    TensorData::new(ids, [n]),
                    &self.device,
                ))
            }
            Some(UNet2DClassEmbedding::Timestep) => {
                let values = labels.into_iter().map(|l| l as f32).collect();
                ClassLabels::Timesteps(Tensor::from_data(
                    TensorData::new(values, [n]),
                    &self.device,
                ))
            }
            _ => {
                return Err(Error::Unsupported(
                    "an `identity` class embedding takes embedding vectors, not class labels: \
                     call the U-Net directly"
                        .into(),
                ));
            }
        }))
    }
}

/// `(x / 2 + 0.5).clamp(0, 1)`, as `[batch, H, W, C]` floats and RGB8 images.
fn to_output<B: Backend>(image: Tensor<B, 4>) -> Result<GenerateOutput> {
    let [b, c, h, w] = image.dims();
    let nhwc = image
        .div_scalar(2.0)
        .add_scalar(0.5)
        .clamp(0.0, 1.0)
        .permute([0, 2, 3, 1]);
    let array: Vec<f32> = nhwc
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| Error::InvalidState(format!("reading the generated images: {e:?}")))?;
    let plane = h * w * c;
    let images = (0..b)
        .map(|i| {
            let pixels = array[i * plane..(i + 1) * plane]
                .chunks_exact(c)
                .flat_map(|px| {
                    let byte = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                    if c == 1 {
                        [byte(px[0]); 3]
                    } else {
                        [byte(px[0]), byte(px[1]), byte(px[2])]
                    }
                })
                .collect();
            RgbImage {
                width: w as u32,
                height: h as u32,
                pixels,
            }
        })
        .collect();
    Ok(GenerateOutput {
        images,
        array,
        shape: [b, h, w, c],
        // No text, nothing to truncate.
        truncated: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    #[test]
    fn output_maps_to_unit_range_channels_last() {
        let device = Default::default();
        // Two pixels, values -1, 0, 1, 3 across channels.
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(vec![-1.0f32, 0.0, 0.0, 1.0, 1.0, 3.0], [1, 3, 1, 2]),
            &device,
        );
        let out = to_output(x).unwrap();
        assert_eq!(out.shape, [1, 1, 2, 3]);
        assert_eq!(out.array, vec![0.0, 0.5, 1.0, 0.5, 1.0, 1.0]);
        assert_eq!(out.images[0].pixels, vec![0, 128, 255, 128, 255, 255]);
        let grey = Tensor::<B, 4>::from_data(TensorData::new(vec![0.0f32], [1, 1, 1, 1]), &device);
        let out = to_output(grey).unwrap();
        assert_eq!(out.shape, [1, 1, 1, 1]);
        assert_eq!(out.images[0].pixels, vec![128, 128, 128]);
    }
}
