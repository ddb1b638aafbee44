//! `UNet2DConditionModel`: diffusers' conditional U-Net.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    Embedding, EmbeddingConfig, GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d,
};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, Tensor};
use diffusion_core::model_dir::ROOT;
use diffusion_core::{Error, ModelDir, Result};

use super::blocks::{BlockSettings, DownBlock2D, MidBlock2D, UpBlock2D};
use super::config::{
    ClassEmbedType, DownBlockType, MidBlockType, UNet2DConditionConfig, UpBlockType,
};
use crate::loading::{LoadOptions, load_component};
use crate::nn::{
    Activation, AttentionChunking, TimestepEmbedding, TimestepEmbeddingConfig, Timesteps, cast_to,
    conv_forward, group_norm,
};

/// The `class_embedding` layer; its type depends on `class_embed_type`.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum ClassEmbedding<B: Backend> {
    /// `nn.Embedding` over class ids (`num_class_embeds`).
    Embedding(Embedding<B>),
    /// `TimestepEmbedding` MLP (`"timestep"`, `"projection"`).
    Mlp(TimestepEmbedding<B>),
    /// A single linear layer (`"simple_projection"`).
    Linear(Linear<B>),
}

/// The class-conditioning input, in the form the model's `class_embed_type` expects.
#[derive(Debug, Clone)]
pub enum ClassLabels<B: Backend> {
    /// Integer class ids, `[batch]` (`num_class_embeds` without `class_embed_type`).
    Ids(Tensor<B, 1, Int>),
    /// Scalar labels embedded like timesteps, `[batch]` (`"timestep"`).
    Timesteps(Tensor<B, 1>),
    /// Vectors, `[batch, width]` (`"projection"`, `"simple_projection"`, `"identity"`).
    Vectors(Tensor<B, 2>),
}

/// Conditioning inputs beyond the timestep and the text embeddings.
#[derive(Debug, Clone)]
pub struct UNetConditioning<B: Backend> {
    /// Class labels, required when the model has a class embedding.
    pub class_labels: Option<ClassLabels<B>>,
    /// SDXL's pooled text embedding, `[batch, pooled_width]` (`"text_time"`).
    pub text_embeds: Option<Tensor<B, 2>>,
    /// SDXL's size/crop conditioning, `[batch, 6]` (`"text_time"`).
    pub time_ids: Option<Tensor<B, 2>>,
    /// LCM's guidance embedding, `[batch, time_cond_proj_dim]`, added to the sinusoidal
    /// timestep embedding through `time_embedding.cond_proj`.
    pub timestep_cond: Option<Tensor<B, 2>>,
}

impl<B: Backend> Default for UNetConditioning<B> {
    fn default() -> Self {
        Self {
            class_labels: None,
            text_embeds: None,
            time_ids: None,
            timestep_cond: None,
        }
    }
}

/// diffusers' `UNet2DConditionModel`; field names are the state-dict keys.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel<B: Backend> {
    /// Input convolution.
    pub conv_in: Conv2d<B>,
    /// Sinusoidal timestep embedding (no parameters).
    pub time_proj: Timesteps,
    /// Timestep MLP.
    pub time_embedding: TimestepEmbedding<B>,
    /// Class embedding (absent for `class_embed_type: "identity"`, which has no weights).
    pub class_embedding: Option<ClassEmbedding<B>>,
    /// Sinusoidal embedding of SDXL's `time_ids`.
    pub add_time_proj: Option<Timesteps>,
    /// MLP on `[text_embeds, add_time_proj(time_ids)]` (SDXL).
    pub add_embedding: Option<TimestepEmbedding<B>>,
    /// Down blocks, highest resolution first.
    pub down_blocks: Vec<DownBlock2D<B>>,
    /// The mid block.
    pub mid_block: Option<MidBlock2D<B>>,
    /// Up blocks, lowest resolution first.
    pub up_blocks: Vec<UpBlock2D<B>>,
    /// Output group norm.
    pub conv_norm_out: GroupNorm<B>,
    /// Output convolution.
    pub conv_out: Conv2d<B>,
    /// Activation after `conv_norm_out`.
    pub conv_act: Activation,
    /// Activation applied to the summed embeddings.
    pub time_embed_act: Option<Activation>,
    /// The class-embedding kind (including `"identity"`).
    pub class_embed_type: Option<ClassEmbedType>,
    /// Concatenates instead of adding the class embedding.
    pub class_embeddings_concat: bool,
    /// Maps the input to `2 x - 1` first.
    pub center_input_sample: bool,
    /// Expected input channels.
    pub in_channels: usize,
    /// Expected `encoder_hidden_states` width per down block (mid uses the last).
    pub cross_attention_dim: Vec<usize>,
}

impl UNet2DConditionConfig {
    /// Builds the model with freshly initialised weights; fails on an invalid or
    /// unsupported config.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<UNet2DConditionModel<B>> {
        let plan = self.plan()?;
        let channels = &plan.block_out_channels;
        let n = channels.len();
        let c0 = channels[0];
        let temb = plan.time_embed_dim;
        let conv = |cin: usize, cout: usize, k: usize| {
            let p = (k - 1) / 2;
            Conv2dConfig::new([cin, cout], [k, k])
                .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                .init(device)
        };

        let class_embedding = plan.class_embed.and_then(|kind| match kind {
            ClassEmbedType::Embedding(classes) => Some(ClassEmbedding::Embedding(
                EmbeddingConfig::new(classes, temb).init(device),
            )),
            ClassEmbedType::Timestep => Some(ClassEmbedding::Mlp(
                TimestepEmbeddingConfig::new(c0, temb)
                    .with_act_fn(plan.act)
                    .init(device),
            )),
            ClassEmbedType::Projection(dim) => Some(ClassEmbedding::Mlp(
                TimestepEmbeddingConfig::new(dim, temb).init(device),
            )),
            ClassEmbedType::SimpleProjection(dim) => Some(ClassEmbedding::Linear(
                LinearConfig::new(dim, temb).init(device),
            )),
            ClassEmbedType::Identity => None,
        });

        let settings = |i: usize, scale: f64| {
            BlockSettings::new(
                plan.blocks_time_embed_dim,
                plan.norm_num_groups,
                self.norm_eps,
                plan.act,
                plan.time_embedding_norm,
            )
            .with_output_scale_factor(scale)
            .with_dropout(self.dropout)
            .with_heads(plan.heads[i])
            .with_cross_attention_dim(plan.cross_attention_dim[i])
            .with_use_linear_projection(self.use_linear_projection)
            .with_only_cross_attention(plan.only_cross_attention[i])
            .with_upcast_attention(self.upcast_attention)
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out = c0;
        for (i, &channel) in channels.iter().enumerate() {
            let cin = out;
            out = channel;
            let layers: &[usize] = match plan.down_types[i] {
                DownBlockType::CrossAttn => &plan.down_transformer_layers[i],
                DownBlockType::Plain => &[],
            };
            down_blocks.push(DownBlock2D::new(
                &settings(i, 1.0),
                cin,
                out,
                plan.layers_per_block[i],
                layers,
                i + 1 < n,
                self.downsample_padding,
                device,
            ));
        }

        let mid_block = plan.mid_type.map(|kind| {
            let layers = match kind {
                MidBlockType::CrossAttn => Some(plan.mid_transformer_layers),
                MidBlockType::Plain => None,
            };
            // The mid block's transformer never uses only_cross_attention.
            let s = settings(n - 1, self.mid_block_scale_factor).with_only_cross_attention(false);
            MidBlock2D::new(&s, channels[n - 1], layers, device)
        });

        let mut up_blocks = Vec::with_capacity(n);
        let mut out = channels[n - 1];
        for i in 0..n {
            let r = n - 1 - i;
            let prev = out;
            out = channels[r];
            let cin = channels[(r as isize - 1).max(0) as usize];
            let num_layers = plan.layers_per_block[r] + 1;
            let layers: &[usize] = match plan.up_types[i] {
                UpBlockType::CrossAttn => &plan.up_transformer_layers[i],
                UpBlockType::Plain => &[],
            };
            up_blocks.push(UpBlock2D::new(
                &settings(r, 1.0),
                cin,
                out,
                prev,
                num_layers,
                layers,
                i + 1 < n,
                device,
            ));
        }

        Ok(UNet2DConditionModel {
            conv_in: conv(self.in_channels, c0, self.conv_in_kernel),
            time_proj: Timesteps::new(c0, self.flip_sin_to_cos, self.freq_shift),
            time_embedding: TimestepEmbeddingConfig::new(c0, temb)
                .with_act_fn(plan.act)
                .with_post_act_fn(plan.timestep_post_act)
                .with_cond_proj_dim(self.time_cond_proj_dim)
                .init(device),
            class_embedding,
            add_time_proj: plan
                .text_time
                .map(|(dim, _)| Timesteps::new(dim, self.flip_sin_to_cos, self.freq_shift)),
            add_embedding: plan
                .text_time
                .map(|(_, input)| TimestepEmbeddingConfig::new(input, temb).init(device)),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNormConfig::new(plan.norm_num_groups, c0)
                .with_epsilon(self.norm_eps)
                .init(device),
            conv_out: conv(c0, self.out_channels, self.conv_out_kernel),
            conv_act: plan.act,
            time_embed_act: plan.time_embed_act,
            class_embed_type: plan.class_embed,
            class_embeddings_concat: self.class_embeddings_concat,
            center_input_sample: self.center_input_sample,
            in_channels: self.in_channels,
            cross_attention_dim: plan.cross_attention_dim.clone(),
        })
    }
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// Reads `component`'s `config.json` in a diffusers folder and loads its weights
    /// (`diffusion_pytorch_model[.variant].safetensors`, or its shards) through
    /// [`crate::loading`], strictly: every parameter must be present with its shape.
    pub fn load(
        dir: &ModelDir,
        component: &str,
        variant: Option<&str>,
        device: &B::Device,
    ) -> Result<Self> {
        let config = UNet2DConditionConfig::from_config_map(&dir.config(component)?)?;
        let model = config.init(device)?;
        load_component(model, dir, component, variant, &LoadOptions::new())
    }

    /// [`load`](Self::load) for a `unet` folder itself (`config.json` + weights).
    pub fn from_dir(path: impl AsRef<std::path::Path>, device: &B::Device) -> Result<Self> {
        Self::load(&ModelDir::open(path)?, ROOT, None, device)
    }

    /// Predicts the model output (noise, `v` or sample, depending on the checkpoint).
    ///
    /// `timesteps` holds one (possibly fractional) timestep per batch element, or a single
    /// one for the whole batch. Missing or mis-shaped conditioning is an error.
    ///
    /// The model computes in the dtype of its weights ([`dtype`](Self::dtype)): the float
    /// inputs are cast to it on entry, and the output is cast back to the dtype of `sample`,
    /// so an `f16` model takes and returns `f32` tensors like an `f32` one. The sinusoidal
    /// timestep embeddings are computed in `f32` before the cast.
    ///
    /// # Shapes
    ///
    /// - sample: `[batch, in_channels, height, width]` (any height/width)
    /// - timesteps: `[batch]` or `[1]`
    /// - encoder_hidden_states: `[batch, tokens, cross_attention_dim]`
    /// - output: `[batch, out_channels, height, width]`
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        encoder_hidden_states: Tensor<B, 3>,
        cond: &UNetConditioning<B>,
    ) -> Result<Tensor<B, 4>> {
        let [batch, channels, height, width] = sample.dims();
        if channels != self.in_channels {
            return Err(Error::Shape(format!(
                "U-Net sample has {channels} channels, the model expects {}",
                self.in_channels
            )));
        }
        let [ctx_batch, _, ctx_dim] = encoder_hidden_states.dims();
        if ctx_batch != batch {
            return Err(Error::Shape(format!(
                "encoder_hidden_states batch {ctx_batch} != sample batch {batch}"
            )));
        }
        if self.cross_attention_dim.iter().any(|&d| d != ctx_dim) && self.has_cross_attention() {
            return Err(Error::Shape(format!(
                "encoder_hidden_states width {ctx_dim}, the model expects {:?}",
                self.cross_attention_dim
            )));
        }
        let out_dtype = sample.dtype();
        let dtype = self.dtype();
        let sample = cast_to(sample, dtype);
        let encoder_hidden_states = cast_to(encoder_hidden_states, dtype);

        // 1. Time (+ class, + text_time) embedding.
        let timesteps = match timesteps.dims()[0] {
            n if n == batch => timesteps,
            1 => timesteps.expand([batch]),
            n => {
                return Err(Error::Shape(format!(
                    "{n} timesteps for a batch of {batch} (give one, or one per element)"
                )));
            }
        };
        let t_emb = crate::nn::cast_to(self.time_proj.forward(timesteps), dtype);
        let timestep_cond = match (&cond.timestep_cond, &self.time_embedding.cond_proj) {
            (Some(c), Some(proj)) => {
                let expected = proj.weight.val().dims()[0];
                check_2d(c, batch, expected, "timestep_cond")?;
                Some(cast_to(c.clone(), dtype))
            }
            (None, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "this U-Net has time_cond_proj_dim set and needs `timestep_cond`".into(),
                ));
            }
            _ => None,
        };
        let mut emb = self.time_embedding.forward(t_emb, timestep_cond);

        if let Some(kind) = self.class_embed_type {
            let class_emb = self.class_embed(kind, cond.class_labels.as_ref(), batch, dtype)?;
            emb = if self.class_embeddings_concat {
                Tensor::cat(vec![emb, class_emb], 1)
            } else {
                emb + class_emb
            };
        }

        if let (Some(proj), Some(embedding)) = (&self.add_time_proj, &self.add_embedding) {
            let (Some(text_embeds), Some(time_ids)) = (&cond.text_embeds, &cond.time_ids) else {
                return Err(Error::InvalidArgument(
                    "this U-Net has addition_embed_type `text_time` and needs `text_embeds` \
                     and `time_ids`"
                        .into(),
                ));
            };
            let [ids_batch, ids] = time_ids.dims();
            let input = embedding.linear_1.weight.val().dims()[0];
            let text_width = input.saturating_sub(ids * proj.num_channels);
            check_2d(text_embeds, batch, text_width, "text_embeds")?;
            if ids_batch != batch || text_width == 0 {
                return Err(Error::Shape(format!(
                    "time_ids is [{ids_batch}, {ids}]; with the add_embedding input width \
                     {input} and text_embeds [{batch}, {text_width}] that does not fit"
                )));
            }
            let time_embeds = proj
                .forward(time_ids.clone().reshape([batch * ids]))
                .reshape([batch, ids * proj.num_channels]);
            let add = Tensor::cat(
                vec![
                    cast_to(text_embeds.clone(), dtype),
                    cast_to(time_embeds, dtype),
                ],
                1,
            );
            emb = emb + embedding.forward(add, None);
        }
        if let Some(act) = self.time_embed_act {
            emb = act.forward(emb);
        }

        // 2. Pre-process.
        let sample = if self.center_input_sample {
            sample.mul_scalar(2.0).sub_scalar(1.0)
        } else {
            sample
        };
        let mut hidden = conv_forward(&self.conv_in, sample);
        let context = Some(&encoder_hidden_states);

        // 3. Down.
        let mut skips = vec![hidden.clone()];
        for block in &self.down_blocks {
            let (h, s) = block.forward(hidden, &emb, context);
            hidden = h;
            skips.extend(s);
        }

        // 4. Mid.
        if let Some(mid) = &self.mid_block {
            hidden = mid.forward(hidden, &emb, context);
        }

        // 5. Up. When the input size is not a multiple of the total downsampling factor,
        // each upsampler targets the size of the next skip state instead of doubling.
        let num_upsamplers = self
            .up_blocks
            .iter()
            .filter(|b| !b.upsamplers.is_empty())
            .count();
        let factor = 1usize << num_upsamplers;
        let forward_upsample_size = height % factor != 0 || width % factor != 0;
        let last = self.up_blocks.len().saturating_sub(1);
        for (i, block) in self.up_blocks.iter().enumerate() {
            let remaining = skips.len() - block.resnets.len();
            let upsample_size = (i != last && forward_upsample_size).then(|| {
                let [_, _, h, w] = skips[remaining - 1].dims();
                [h, w]
            });
            hidden = block.forward(hidden, &mut skips, &emb, context, upsample_size);
        }

        // 6. Post-process.
        let hidden = self
            .conv_act
            .forward(group_norm(&self.conv_norm_out, hidden));
        Ok(cast_to(conv_forward(&self.conv_out, hidden), out_dtype))
    }

    fn has_cross_attention(&self) -> bool {
        self.down_blocks.iter().any(|b| !b.attentions.is_empty())
            || self.up_blocks.iter().any(|b| !b.attentions.is_empty())
            || self
                .mid_block
                .as_ref()
                .is_some_and(|m| !m.attentions.is_empty())
    }

    fn class_embed(
        &self,
        kind: ClassEmbedType,
        labels: Option<&ClassLabels<B>>,
        batch: usize,
        dtype: DType,
    ) -> Result<Tensor<B, 2>> {
        let missing = || {
            Error::InvalidArgument(format!(
                "this U-Net has a class embedding ({kind:?}) and needs matching `class_labels`"
            ))
        };
        let labels = labels.ok_or_else(missing)?;
        let out = match (kind, labels, &self.class_embedding) {
            (
                ClassEmbedType::Embedding(classes),
                ClassLabels::Ids(ids),
                Some(ClassEmbedding::Embedding(e)),
            ) => {
                check_len(ids.dims()[0], batch, "class_labels")?;
                let max: i64 = ids.clone().max().into_scalar().elem::<i64>();
                let min: i64 = ids.clone().min().into_scalar().elem::<i64>();
                if min < 0 || max >= classes as i64 {
                    return Err(Error::InvalidArgument(format!(
                        "class_labels must lie in 0..{classes}, got {min}..={max}"
                    )));
                }
                e.forward(ids.clone().unsqueeze_dim::<2>(1))
                    .squeeze_dim::<2>(1)
            }
            (
                ClassEmbedType::Timestep,
                ClassLabels::Timesteps(t),
                Some(ClassEmbedding::Mlp(mlp)),
            ) => {
                check_len(t.dims()[0], batch, "class_labels")?;
                let t = crate::nn::cast_to(self.time_proj.forward(t.clone()), dtype);
                mlp.forward(t, None)
            }
            (
                ClassEmbedType::Projection(dim),
                ClassLabels::Vectors(v),
                Some(ClassEmbedding::Mlp(mlp)),
            ) => {
                check_2d(v, batch, dim, "class_labels")?;
                mlp.forward(cast_to(v.clone(), dtype), None)
            }
            (
                ClassEmbedType::SimpleProjection(dim),
                ClassLabels::Vectors(v),
                Some(ClassEmbedding::Linear(l)),
            ) => {
                check_2d(v, batch, dim, "class_labels")?;
                l.forward(cast_to(v.clone(), dtype))
            }
            (ClassEmbedType::Identity, ClassLabels::Vectors(v), None) => {
                let width = self.time_embedding.linear_2.weight.val().dims()[1];
                check_2d(v, batch, width, "class_labels")?;
                v.clone()
            }
            _ => return Err(missing()),
        };
        Ok(crate::nn::cast_to(out, dtype))
    }

    /// Sets how every attention layer of the model is evaluated (e.g.
    /// [`AttentionChunking::QueryChunks`] to bound memory at large resolutions).
    pub fn set_attention_chunking(&mut self, chunking: AttentionChunking) {
        self.down_blocks
            .iter_mut()
            .for_each(|b| b.set_chunking(chunking));
        if let Some(mid) = &mut self.mid_block {
            mid.set_chunking(chunking);
        }
        self.up_blocks
            .iter_mut()
            .for_each(|b| b.set_chunking(chunking));
    }

    /// Sets whether every attention layer computes `softmax(q k^T) v` in `f32` when the model
    /// runs in `f16` / `bf16` (no effect on `f32` / `f64` models). Overrides the config's
    /// `upcast_attention` for every layer.
    pub fn set_attention_upcast(&mut self, upcast: bool) {
        self.down_blocks
            .iter_mut()
            .for_each(|b| b.set_attention_upcast(upcast));
        if let Some(mid) = &mut self.mid_block {
            mid.set_attention_upcast(upcast);
        }
        self.up_blocks
            .iter_mut()
            .for_each(|b| b.set_attention_upcast(upcast));
    }

    /// The dtype the model computes in: that of its weights (`conv_in.weight`).
    pub fn dtype(&self) -> DType {
        self.conv_in.weight.val().dtype()
    }
}

fn check_len(got: usize, batch: usize, name: &str) -> Result<()> {
    if got == batch {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "{name} has {got} entries for a batch of {batch}"
        )))
    }
}

fn check_2d<B: Backend>(t: &Tensor<B, 2>, batch: usize, width: usize, name: &str) -> Result<()> {
    let [b, w] = t.dims();
    if b == batch && w == width {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "{name} is [{b}, {w}], expected [{batch}, {width}]"
        )))
    }
}
