//! `UNet2DModel`: diffusers' pixel-space U-Net.

use std::marker::PhantomData;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, ElementConversion, Int, Tensor};
use diffusion_core::model_dir::ROOT;
use diffusion_core::{Error, ModelDir, Result};

use super::blocks::{BlockSettings, DownBlock, MidBlock, UpBlock, set_chunking};
use super::config::{TimeEmbeddingType, UNet2DClassEmbedding, UNet2DConfig};
use crate::loading::{LoadOptions, load_component};
use crate::nn::{
    Activation, AttentionChunking, TimestepEmbedding, TimestepEmbeddingConfig, Timesteps, cast_to,
    group_norm,
};
use crate::unet::{ClassEmbedding, ClassLabels};

/// diffusers' `GaussianFourierProjection` as `UNet2DModel` uses it (`log=True`,
/// `flip_sin_to_cos=False`): `[sin(2 pi log(t) w), cos(2 pi log(t) w)]`.
#[derive(Module, Debug)]
pub struct GaussianFourierProjection<B: Backend> {
    /// The random frequencies `w` (`time_proj.weight`, fixed after initialisation).
    pub weight: Param<Tensor<B, 1>>,
}

impl<B: Backend> GaussianFourierProjection<B> {
    /// Frequencies drawn from `N(0, scale^2)`, as diffusers initialises them.
    pub fn new(embedding_size: usize, scale: f64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::random(
                [embedding_size],
                Distribution::Normal(0.0, scale),
                device,
            )),
        }
    }

    /// Embeds positive timesteps (noise levels), in `f32`.
    ///
    /// # Shapes
    ///
    /// - timesteps: `[batch]`
    /// - output: `[batch, 2 * embedding_size]`
    pub fn forward(&self, timesteps: Tensor<B, 1>) -> Tensor<B, 2> {
        let t = cast_to(timesteps, DType::F32).log().unsqueeze_dim::<2>(1);
        let w = cast_to(self.weight.val(), DType::F32).unsqueeze_dim::<2>(0);
        let x = (t * w).mul_scalar(2.0).mul_scalar(std::f64::consts::PI);
        Tensor::cat(vec![x.clone().sin(), x.cos()], 1)
    }
}

/// The sinusoidal projection held by [`TimeProjection::Positional`] (no parameters).
#[derive(Module, Debug)]
pub struct SinusoidalProjection<B: Backend> {
    /// The projection.
    pub timesteps: Timesteps,
    /// Ties the module to its backend.
    pub backend: PhantomData<B>,
}

/// `time_proj`: how timesteps become the time MLP's input (`time_embedding_type`).
#[derive(Module, Debug)]
pub enum TimeProjection<B: Backend> {
    /// Sinusoidal features (`"positional"`).
    Positional(SinusoidalProjection<B>),
    /// Gaussian Fourier features of `log t` (`"fourier"`).
    Fourier(GaussianFourierProjection<B>),
    /// An embedding table over integer timesteps (`"learned"`).
    Learned(Embedding<B>),
}

impl<B: Backend> TimeProjection<B> {
    /// Projects one timestep per batch element, returning an `f32` tensor for the
    /// positional and Fourier kinds. Fourier timesteps must be positive, learned ones
    /// integers below the table size.
    ///
    /// # Shapes
    ///
    /// - timesteps: `[batch]`
    /// - output: `[batch, width]` (`block_out_channels[0]`, twice that for Fourier)
    pub fn forward(&self, timesteps: Tensor<B, 1>) -> Result<Tensor<B, 2>> {
        match self {
            Self::Positional(p) => Ok(p.timesteps.forward(timesteps)),
            Self::Fourier(f) => {
                let min: f64 = timesteps.clone().min().into_scalar().elem();
                if min.is_nan() || min <= 0.0 {
                    return Err(Error::InvalidArgument(format!(
                        "a Fourier time embedding takes log(t): timesteps must be positive, got \
                         {min}"
                    )));
                }
                Ok(f.forward(timesteps))
            }
            Self::Learned(table) => {
                let size = table.weight.val().dims()[0];
                let values: Vec<f64> = timesteps
                    .clone()
                    .into_data()
                    .convert::<f64>()
                    .to_vec()
                    .map_err(|e| Error::InvalidState(format!("reading timesteps: {e:?}")))?;
                if let Some(bad) = values
                    .iter()
                    .find(|&&t| t.fract() != 0.0 || t < 0.0 || t >= size as f64)
                {
                    return Err(Error::InvalidArgument(format!(
                        "a learned time embedding takes integer timesteps in 0..{size}, got {bad}"
                    )));
                }
                let ids: Tensor<B, 1, Int> = timesteps.int();
                Ok(table.forward(ids.unsqueeze_dim::<2>(1)).squeeze_dim::<2>(1))
            }
        }
    }
}

/// diffusers' `UNet2DModel`, the U-Net of pixel-space DDPM models (unconditional or
/// class-conditional); field names are the state-dict keys.
#[derive(Module, Debug)]
pub struct UNet2DModel<B: Backend> {
    /// Input convolution.
    pub conv_in: Conv2d<B>,
    /// Timestep projection.
    pub time_proj: TimeProjection<B>,
    /// Timestep MLP (SiLU, whatever `act_fn` says).
    pub time_embedding: TimestepEmbedding<B>,
    /// Class embedding (absent for `class_embed_type: "identity"`, which has no weights).
    pub class_embedding: Option<ClassEmbedding<B>>,
    /// Down blocks, highest resolution first.
    pub down_blocks: Vec<DownBlock<B>>,
    /// The mid block.
    pub mid_block: Option<MidBlock<B>>,
    /// Up blocks, lowest resolution first.
    pub up_blocks: Vec<UpBlock<B>>,
    /// Output group norm.
    pub conv_norm_out: GroupNorm<B>,
    /// Output convolution.
    pub conv_out: Conv2d<B>,
    /// The class-embedding kind.
    pub class_embed_type: Option<UNet2DClassEmbedding>,
    /// Maps the input to `2 x - 1` first.
    pub center_input_sample: bool,
    /// Expected input channels.
    pub in_channels: usize,
    /// Width of the time embedding (and of `"identity"` class vectors).
    pub time_embed_dim: usize,
}

impl UNet2DConfig {
    /// Builds the model with freshly initialised weights; fails on an invalid or
    /// unsupported config.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<UNet2DModel<B>> {
        let plan = self.plan()?;
        let channels = &plan.block_out_channels;
        let n = channels.len();
        let c0 = channels[0];
        let temb = plan.time_embed_dim;
        let conv3 = |cin: usize, cout: usize| {
            Conv2dConfig::new([cin, cout], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };

        let time_proj = match plan.time_embedding_type {
            TimeEmbeddingType::Positional => TimeProjection::Positional(SinusoidalProjection {
                timesteps: Timesteps::new(c0, self.flip_sin_to_cos, self.freq_shift),
                backend: PhantomData,
            }),
            TimeEmbeddingType::Fourier => {
                TimeProjection::Fourier(GaussianFourierProjection::new(c0, 16.0, device))
            }
            TimeEmbeddingType::Learned(size) => {
                TimeProjection::Learned(EmbeddingConfig::new(size, c0).init(device))
            }
        };
        let mlp = || TimestepEmbeddingConfig::new(plan.time_proj_dim, temb).init(device);
        let class_embedding = plan.class_embed.and_then(|kind| match kind {
            UNet2DClassEmbedding::Embedding(classes) => Some(ClassEmbedding::Embedding(
                EmbeddingConfig::new(classes, temb).init(device),
            )),
            UNet2DClassEmbedding::Timestep => Some(ClassEmbedding::Mlp(mlp())),
            UNet2DClassEmbedding::Identity => None,
        });

        let settings = |scale: f64| BlockSettings {
            temb_channels: temb,
            groups: plan.norm_num_groups,
            eps: self.norm_eps,
            act: plan.act,
            time_embedding_norm: plan.time_embedding_norm,
            dropout: self.dropout,
            output_scale_factor: scale,
            attention_head_dim: self.attention_head_dim,
        };
        let block = settings(1.0);

        let mut down_blocks = Vec::with_capacity(n);
        let mut out = c0;
        for (i, &channel) in channels.iter().enumerate() {
            let cin = out;
            out = channel;
            down_blocks.push(DownBlock::new(
                &block,
                cin,
                out,
                self.layers_per_block,
                plan.down_attention[i],
                plan.down_samplers[i],
                self.downsample_padding,
                device,
            ));
        }

        let mid_block = plan.mid_block.then(|| {
            MidBlock::new(
                &settings(self.mid_block_scale_factor),
                channels[n - 1],
                self.add_attention,
                plan.mid_attention_groups,
                device,
            )
        });

        let mut up_blocks = Vec::with_capacity(n);
        let mut out = channels[n - 1];
        for i in 0..n {
            let prev = out;
            out = channels[n - 1 - i];
            let cin = channels[(n - 1).saturating_sub(i + 1)];
            up_blocks.push(UpBlock::new(
                &block,
                cin,
                out,
                prev,
                self.layers_per_block + 1,
                plan.up_attention[i],
                plan.up_samplers[i],
                device,
            ));
        }

        Ok(UNet2DModel {
            conv_in: conv3(self.in_channels, c0),
            time_proj,
            time_embedding: mlp(),
            class_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNormConfig::new(plan.norm_num_groups, c0)
                .with_epsilon(self.norm_eps)
                .init(device),
            conv_out: conv3(c0, self.out_channels),
            class_embed_type: plan.class_embed,
            center_input_sample: self.center_input_sample,
            in_channels: self.in_channels,
            time_embed_dim: temb,
        })
    }
}

/// Key renames diffusers applies when loading checkpoints written before its attention
/// refactor (`google/ddpm-*`): `query`/`key`/`value`/`proj_attn` of the attention blocks.
fn legacy_attention_keys(options: LoadOptions) -> LoadOptions {
    [
        ("query", "to_q"),
        ("key", "to_k"),
        ("value", "to_v"),
        ("proj_attn", "to_out.0"),
    ]
    .into_iter()
    .fold(options, |o, (old, new)| {
        o.remap(
            format!(r"^(.*\.attentions\.\d+)\.{old}\.(weight|bias)$"),
            format!("$1.{new}.$2"),
        )
    })
}

impl<B: Backend> UNet2DModel<B> {
    /// Reads `component`'s `config.json` in a diffusers folder and loads its weights
    /// (`diffusion_pytorch_model[.variant].safetensors`, or its shards) through
    /// [`crate::loading`], strictly. Checkpoints with diffusers' deprecated attention key
    /// names (`query`, `key`, `value`, `proj_attn`) load too, as in diffusers.
    pub fn load(
        dir: &ModelDir,
        component: &str,
        variant: Option<&str>,
        device: &B::Device,
    ) -> Result<Self> {
        let config = UNet2DConfig::from_config_map(&dir.config(component)?)?;
        let model = config.init(device)?;
        load_component(
            model,
            dir,
            component,
            variant,
            &legacy_attention_keys(LoadOptions::new()),
        )
    }

    /// [`load`](Self::load) for a `unet` folder itself (`config.json` + weights).
    pub fn from_dir(path: impl AsRef<std::path::Path>, device: &B::Device) -> Result<Self> {
        Self::load(&ModelDir::open(path)?, ROOT, None, device)
    }

    /// The total downsampling factor: height and width must be multiples of it.
    pub fn downsampling_factor(&self) -> usize {
        1 << self
            .down_blocks
            .iter()
            .filter(|b| !b.downsamplers.is_empty())
            .count()
    }

    /// Whether the model needs class labels.
    pub fn is_class_conditional(&self) -> bool {
        self.class_embed_type.is_some()
    }

    /// Predicts the model output (noise, `v` or sample, depending on the checkpoint; the
    /// channels of the learned variance follow for learned-variance checkpoints).
    ///
    /// `timesteps` holds one (possibly fractional) timestep per batch element, or a single
    /// one for the whole batch. `class_labels` must be given exactly when the model is
    /// class-conditional: [`ClassLabels::Ids`] for a class table (`num_class_embeds`),
    /// [`ClassLabels::Timesteps`] (or `Ids`) for `"timestep"`, [`ClassLabels::Vectors`] of
    /// width `time_embed_dim` for `"identity"`. Mis-shaped or out-of-range inputs are errors.
    ///
    /// # Shapes
    ///
    /// - sample: `[batch, in_channels, height, width]`, height and width multiples of
    ///   [`downsampling_factor`](Self::downsampling_factor)
    /// - timesteps: `[batch]` or `[1]`
    /// - class_labels: `[batch]` (ids, timesteps) or `[batch, time_embed_dim]` (vectors)
    /// - output: `[batch, out_channels, height, width]`
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        class_labels: Option<&ClassLabels<B>>,
    ) -> Result<Tensor<B, 4>> {
        let [batch, channels, height, width] = sample.dims();
        if channels != self.in_channels {
            return Err(Error::Shape(format!(
                "U-Net sample has {channels} channels, the model expects {}",
                self.in_channels
            )));
        }
        let factor = self.downsampling_factor();
        if height == 0
            || width == 0
            || !height.is_multiple_of(factor)
            || !width.is_multiple_of(factor)
        {
            return Err(Error::Shape(format!(
                "sample is {height}x{width}; this U-Net needs positive multiples of {factor}"
            )));
        }
        let dtype = sample.dtype();

        // 1. Time (+ class) embedding.
        let timesteps = match timesteps.dims()[0] {
            n if n == batch => timesteps,
            1 => timesteps.expand([batch]),
            n => {
                return Err(Error::Shape(format!(
                    "{n} timesteps for a batch of {batch} (give one, or one per element)"
                )));
            }
        };
        let t_emb = cast_to(self.time_proj.forward(timesteps.clone())?, dtype);
        let mut emb = self.time_embedding.forward(t_emb, None);
        match (self.class_embed_type, class_labels) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "class labels were given to a U-Net without class conditioning".into(),
                ));
            }
            (Some(kind), labels) => {
                emb = emb + self.class_embed(kind, labels, batch, dtype)?;
            }
        }

        // 2. Pre-process.
        let sample = if self.center_input_sample {
            sample.mul_scalar(2.0).sub_scalar(1.0)
        } else {
            sample
        };
        let mut hidden = crate::nn::conv_forward(&self.conv_in, sample);

        // 3. Down.
        let mut skips = vec![hidden.clone()];
        for block in &self.down_blocks {
            let (h, s) = block.forward(hidden, &emb);
            hidden = h;
            skips.extend(s);
        }

        // 4. Mid.
        if let Some(mid) = &self.mid_block {
            hidden = mid.forward(hidden, &emb);
        }

        // 5. Up.
        for block in &self.up_blocks {
            hidden = block.forward(hidden, &mut skips, &emb);
        }

        // 6. Post-process (always SiLU, as diffusers).
        let hidden = Activation::Silu.forward(group_norm(&self.conv_norm_out, hidden));
        let out = crate::nn::conv_forward(&self.conv_out, hidden);
        Ok(match self.time_proj {
            // Score models predict the noise divided by sigma.
            TimeProjection::Fourier(_) => out / cast_to(timesteps, dtype).reshape([batch, 1, 1, 1]),
            _ => out,
        })
    }

    fn class_embed(
        &self,
        kind: UNet2DClassEmbedding,
        labels: Option<&ClassLabels<B>>,
        batch: usize,
        dtype: DType,
    ) -> Result<Tensor<B, 2>> {
        let expected = match kind {
            UNet2DClassEmbedding::Embedding(_) => "integer class ids",
            UNet2DClassEmbedding::Timestep => "scalar labels embedded like timesteps",
            UNet2DClassEmbedding::Identity => "class vectors of width time_embed_dim",
        };
        let wrong = || {
            Error::InvalidArgument(format!(
                "this U-Net is class-conditional ({kind:?}) and needs {expected} as class labels"
            ))
        };
        let labels = labels.ok_or_else(wrong)?;
        let len = |n: usize| {
            if n == batch {
                Ok(())
            } else {
                Err(Error::Shape(format!(
                    "{n} class labels for a batch of {batch}"
                )))
            }
        };
        let out = match (kind, labels, &self.class_embedding) {
            (
                UNet2DClassEmbedding::Embedding(classes),
                ClassLabels::Ids(ids),
                Some(ClassEmbedding::Embedding(table)),
            ) => {
                len(ids.dims()[0])?;
                let min: i64 = ids.clone().min().into_scalar().elem();
                let max: i64 = ids.clone().max().into_scalar().elem();
                if min < 0 || max >= classes as i64 {
                    return Err(Error::InvalidArgument(format!(
                        "class labels must lie in 0..{classes}, got {min}..={max}"
                    )));
                }
                table
                    .forward(ids.clone().unsqueeze_dim::<2>(1))
                    .squeeze_dim::<2>(1)
            }
            (UNet2DClassEmbedding::Timestep, labels, Some(ClassEmbedding::Mlp(mlp))) => {
                let t = match labels {
                    ClassLabels::Timesteps(t) => t.clone(),
                    ClassLabels::Ids(ids) => ids.clone().float(),
                    ClassLabels::Vectors(_) => return Err(wrong()),
                };
                len(t.dims()[0])?;
                mlp.forward(cast_to(self.time_proj.forward(t)?, dtype), None)
            }
            (UNet2DClassEmbedding::Identity, ClassLabels::Vectors(v), None) => {
                let [b, w] = v.dims();
                if b != batch || w != self.time_embed_dim {
                    return Err(Error::Shape(format!(
                        "class vectors are [{b}, {w}], expected [{batch}, {}]",
                        self.time_embed_dim
                    )));
                }
                v.clone()
            }
            _ => return Err(wrong()),
        };
        Ok(cast_to(out, dtype))
    }

    /// Sets how every attention layer of the model is evaluated (e.g.
    /// [`AttentionChunking::QueryChunks`] to bound memory at large resolutions).
    pub fn set_attention_chunking(&mut self, chunking: AttentionChunking) {
        set_chunking(
            &mut self.down_blocks,
            self.mid_block.as_mut(),
            &mut self.up_blocks,
            chunking,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type B = NdArray<f32>;

    fn tiny(json: &str) -> UNet2DModel<B> {
        let base = r#"{"block_out_channels": [4, 8], "norm_num_groups": 2,
            "attention_head_dim": 2, "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]"#;
        let json = format!("{base}{json}}}");
        UNet2DConfig::from_json(&json)
            .unwrap()
            .init(&Default::default())
            .unwrap()
    }

    fn sample(batch: usize, size: usize) -> Tensor<B, 4> {
        Tensor::random(
            [batch, 3, size, size],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        )
    }

    fn t(values: &[f32]) -> Tensor<B, 1> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            &Default::default(),
        )
    }

    #[test]
    fn output_shape_and_broadcast_timestep() {
        let model = tiny("");
        let x = sample(2, 8);
        let one = model.forward(x.clone(), t(&[10.0]), None).unwrap();
        let each = model.forward(x, t(&[10.0, 10.0]), None).unwrap();
        assert_eq!(one.dims(), [2, 3, 8, 8]);
        let diff: f32 = (one - each).abs().max().into_scalar();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let model = tiny("");
        let labels = ClassLabels::Ids(Tensor::from_data(
            TensorData::new(vec![0i64, 1], [2]),
            &Default::default(),
        ));
        assert!(matches!(
            model.forward(sample(2, 8), t(&[1.0]), Some(&labels)),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            model.forward(sample(2, 7), t(&[1.0]), None),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            model.forward(sample(2, 8), t(&[1.0, 2.0, 3.0]), None),
            Err(Error::Shape(_))
        ));

        let cond = tiny(r#", "num_class_embeds": 3"#);
        assert!(cond.is_class_conditional());
        assert!(matches!(
            cond.forward(sample(2, 8), t(&[1.0]), None),
            Err(Error::InvalidArgument(_))
        ));
        assert!(cond.forward(sample(2, 8), t(&[1.0]), Some(&labels)).is_ok());
        let three = ClassLabels::Ids(Tensor::from_data(
            TensorData::new(vec![0i64, 1, 2], [3]),
            &Default::default(),
        ));
        assert!(matches!(
            cond.forward(sample(2, 8), t(&[1.0]), Some(&three)),
            Err(Error::Shape(_))
        ));
        let out_of_range = ClassLabels::Ids(Tensor::from_data(
            TensorData::new(vec![0i64, 3], [2]),
            &Default::default(),
        ));
        assert!(matches!(
            cond.forward(sample(2, 8), t(&[1.0]), Some(&out_of_range)),
            Err(Error::InvalidArgument(_))
        ));
        let vectors = ClassLabels::Vectors(Tensor::zeros([2, 16], &Default::default()));
        assert!(matches!(
            cond.forward(sample(2, 8), t(&[1.0]), Some(&vectors)),
            Err(Error::InvalidArgument(_))
        ));

        let fourier = tiny(r#", "time_embedding_type": "fourier""#);
        assert!(matches!(
            fourier.forward(sample(1, 8), t(&[0.0]), None),
            Err(Error::InvalidArgument(_))
        ));
        let learned = tiny(r#", "time_embedding_type": "learned", "num_train_timesteps": 5"#);
        assert!(learned.forward(sample(1, 8), t(&[4.0]), None).is_ok());
        for bad in [5.0, 1.5, -1.0] {
            assert!(matches!(
                learned.forward(sample(1, 8), t(&[bad]), None),
                Err(Error::InvalidArgument(_))
            ));
        }
    }

    #[test]
    fn downsampling_factor_counts_downsamplers() {
        assert_eq!(tiny("").downsampling_factor(), 2);
        let one = UNet2DConfig::from_json(
            r#"{"block_out_channels": [4], "norm_num_groups": 2, "attention_head_dim": 2,
                "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"]}"#,
        )
        .unwrap()
        .init::<B>(&Default::default())
        .unwrap();
        assert_eq!(one.downsampling_factor(), 1);
        let x = Tensor::random(
            [1, 3, 5, 3],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        );
        assert_eq!(
            one.forward(x, t(&[3.0]), None).unwrap().dims(),
            [1, 3, 5, 3]
        );
    }
}
