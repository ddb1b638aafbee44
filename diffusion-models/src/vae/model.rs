//! `AutoencoderKL`: diffusers' KL VAE (encoder, decoder, quant convolutions), with
//! diffusers-identical tiled encoding/decoding and latent scaling helpers.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use diffusion_core::model_dir::ROOT;
use diffusion_core::{Error, ModelDir, Result};

use super::config::AutoencoderKLConfig;
use crate::loading::{LoadOptions, load_component};
use crate::nn::{
    Activation, Attention, AttentionChunking, AttentionConfig, Downsample2D, Downsample2DConfig,
    ResnetBlock2D, ResnetBlock2DConfig, Upsample2D, Upsample2DConfig, cast_to, conv_forward,
    group_norm,
};

/// The diagonal Gaussian posterior returned by [`AutoencoderKL::encode`].
#[derive(Debug, Clone)]
pub struct DiagonalGaussian<B: Backend> {
    /// Mean, `[batch, latent_channels, h, w]`.
    pub mean: Tensor<B, 4>,
    /// Log-variance, clamped to `[-30, 20]` as diffusers does.
    pub logvar: Tensor<B, 4>,
}

impl<B: Backend> DiagonalGaussian<B> {
    /// Splits the `2 * latent_channels` moments into mean and clamped log-variance.
    ///
    /// # Shapes
    ///
    /// - moments: `[batch, 2 latent_channels, h, w]`
    pub fn from_moments(moments: Tensor<B, 4>) -> Self {
        let c = moments.dims()[1] / 2;
        let mean = moments.clone().narrow(1, 0, c);
        let logvar = moments.narrow(1, c, c).clamp(-30.0, 20.0);
        Self { mean, logvar }
    }

    /// Standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Tensor<B, 4> {
        self.logvar.clone().mul_scalar(0.5).exp()
    }

    /// `mean + std * noise` with a caller-supplied standard-normal `noise` of the mean's
    /// shape (so that sampling is reproducible across backends).
    pub fn sample(&self, noise: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        if noise.dims() != self.mean.dims() {
            return Err(Error::Shape(format!(
                "posterior noise is {:?}, the latent is {:?}",
                noise.dims(),
                self.mean.dims()
            )));
        }
        Ok(self.mean.clone() + self.std() * noise)
    }

    /// The mode (= the mean).
    pub fn mode(&self) -> Tensor<B, 4> {
        self.mean.clone()
    }
}

/// Tiling parameters of [`AutoencoderKL::tiled_encode`] / [`AutoencoderKL::tiled_decode`],
/// diffusers' `tile_sample_min_size`, `tile_latent_min_size` and `tile_overlap_factor`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeTiling {
    /// Image-space tile size.
    pub tile_sample_min_size: usize,
    /// Latent-space tile size (`tile_sample_min_size / downsampling factor`).
    pub tile_latent_min_size: usize,
    /// Fraction of a tile shared with its neighbour (diffusers: 0.25).
    pub tile_overlap_factor: f64,
}

impl VaeTiling {
    /// diffusers' defaults for a config: tiles of `sample_size`, overlap 0.25.
    pub fn for_config(config: &AutoencoderKLConfig) -> Self {
        let sample = config.sample_size.dims()[0];
        Self {
            tile_sample_min_size: sample,
            tile_latent_min_size: sample / config.downsampling_factor(),
            tile_overlap_factor: 0.25,
        }
    }

    fn validate(&self) -> Result<()> {
        let ok = self.tile_sample_min_size > 0
            && self.tile_latent_min_size > 0
            && (0.0..1.0).contains(&self.tile_overlap_factor);
        let stride_s =
            (self.tile_sample_min_size as f64 * (1.0 - self.tile_overlap_factor)) as usize;
        let stride_l =
            (self.tile_latent_min_size as f64 * (1.0 - self.tile_overlap_factor)) as usize;
        if ok && stride_s > 0 && stride_l > 0 {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "invalid VAE tiling {self:?}: tile sizes must be positive, the overlap in [0, 1) \
                 and leave a positive stride"
            )))
        }
    }
}

/// The VAE's mid block (`UNetMidBlock2D` without time embedding): ResNet, then
/// (self-attention, ResNet) pairs.
#[derive(Module, Debug)]
pub struct VaeMidBlock<B: Backend> {
    /// The ResNets (`resnets.0`, `resnets.1`).
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The self-attention (`attentions.0`), absent with `mid_block_add_attention: false`.
    pub attentions: Vec<Attention<B>>,
}

impl<B: Backend> VaeMidBlock<B> {
    fn new(
        channels: usize,
        groups: usize,
        act: Activation,
        attention: bool,
        device: &B::Device,
    ) -> Self {
        let resnet = || {
            ResnetBlock2DConfig::new(channels)
                .with_temb_channels(None)
                .with_groups(groups)
                .with_eps(1e-6)
                .with_non_linearity(act)
                .init(device)
        };
        Self {
            resnets: vec![resnet(), resnet()],
            attentions: attention
                .then(|| {
                    AttentionConfig::new(channels)
                        .with_heads(1)
                        .with_dim_head(channels)
                        .with_bias(true)
                        .with_upcast_softmax(true)
                        .with_norm_num_groups(Some(groups))
                        .with_eps(1e-6)
                        .with_residual_connection(true)
                        .init(device)
                })
                .into_iter()
                .collect(),
        }
    }

    /// Applies the block.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, channels, h, w]`
    /// - output: `[batch, channels, h, w]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, None);
        // With no attention, diffusers still runs the second ResNet.
        for (i, resnet) in self.resnets[1..].iter().enumerate() {
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward_spatial(x);
            }
            x = resnet.forward(x, None);
        }
        x
    }
}

/// diffusers' `DownEncoderBlock2D`: ResNets and an optional downsampler.
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D<B: Backend> {
    /// The ResNets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The downsampler (`downsamplers.0`, asymmetric padding), absent in the last block.
    pub downsamplers: Vec<Downsample2D<B>>,
}

/// diffusers' `UpDecoderBlock2D`: ResNets and an optional upsampler.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D<B: Backend> {
    /// The ResNets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The upsampler (`upsamplers.0`), absent in the last block.
    pub upsamplers: Vec<Upsample2D<B>>,
}

/// The VAE encoder: image to `2 * latent_channels` moments.
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    /// Input convolution.
    pub conv_in: Conv2d<B>,
    /// Down blocks.
    pub down_blocks: Vec<DownEncoderBlock2D<B>>,
    /// Mid block.
    pub mid_block: VaeMidBlock<B>,
    /// Output group norm.
    pub conv_norm_out: GroupNorm<B>,
    /// Output convolution.
    pub conv_out: Conv2d<B>,
    /// Activation.
    pub act: Activation,
}

/// The VAE decoder: latents to image.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// Input convolution.
    pub conv_in: Conv2d<B>,
    /// Mid block.
    pub mid_block: VaeMidBlock<B>,
    /// Up blocks.
    pub up_blocks: Vec<UpDecoderBlock2D<B>>,
    /// Output group norm.
    pub conv_norm_out: GroupNorm<B>,
    /// Output convolution.
    pub conv_out: Conv2d<B>,
    /// Activation.
    pub act: Activation,
}

fn conv<B: Backend>(cin: usize, cout: usize, k: usize, device: &B::Device) -> Conv2d<B> {
    let p = k / 2;
    Conv2dConfig::new([cin, cout], [k, k])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .init(device)
}

fn vae_resnet<B: Backend>(
    cin: usize,
    cout: usize,
    groups: usize,
    act: Activation,
    device: &B::Device,
) -> ResnetBlock2D<B> {
    ResnetBlock2DConfig::new(cin)
        .with_out_channels(Some(cout))
        .with_temb_channels(None)
        .with_groups(groups)
        .with_eps(1e-6)
        .with_non_linearity(act)
        .init(device)
}

impl<B: Backend> Encoder<B> {
    /// Encodes an image into moments.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, in_channels, H, W]`
    /// - output: `[batch, 2 latent_channels, H / f, W / f]` (`f` = downsampling factor)
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = conv_forward(&self.conv_in, x);
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(x, None);
            }
            for down in &block.downsamplers {
                x = down.forward(x);
            }
        }
        let x = self.mid_block.forward(x);
        let x = self.act.forward(group_norm(&self.conv_norm_out, x));
        conv_forward(&self.conv_out, x)
    }
}

impl<B: Backend> Decoder<B> {
    /// Decodes latents into an image.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, latent_channels, h, w]`
    /// - output: `[batch, out_channels, h f, w f]`
    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.mid_block.forward(conv_forward(&self.conv_in, z));
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(x, None);
            }
            for up in &block.upsamplers {
                x = up.forward(x, None);
            }
        }
        let x = self.act.forward(group_norm(&self.conv_norm_out, x));
        conv_forward(&self.conv_out, x)
    }
}

/// diffusers' `AutoencoderKL`; field names are the state-dict keys.
#[derive(Module, Debug)]
pub struct AutoencoderKL<B: Backend> {
    /// The encoder.
    pub encoder: Encoder<B>,
    /// The decoder.
    pub decoder: Decoder<B>,
    /// 1x1 convolution on the encoder's moments.
    pub quant_conv: Option<Conv2d<B>>,
    /// 1x1 convolution on the latents before decoding.
    pub post_quant_conv: Option<Conv2d<B>>,
    /// Latent scaling factor.
    pub scaling_factor: f64,
    /// Latent shift (0 when the config has none).
    pub shift_factor: f64,
    /// Tiling used by [`encode`](Self::encode) / [`decode`](Self::decode) for inputs larger
    /// than one tile (diffusers' `enable_tiling()`); `None`: never tile.
    pub tiling: Option<VaeTiling>,
    /// The tiling [`enable_tiling`](Self::enable_tiling) turns on (from the config).
    pub default_tiling: VaeTiling,
    /// Image channels the encoder expects.
    pub in_channels: usize,
    /// Latent channels.
    pub latent_channels: usize,
    /// Spatial downsampling factor.
    pub downsampling_factor: usize,
}

impl AutoencoderKLConfig {
    /// Builds the VAE with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<AutoencoderKL<B>> {
        self.validate()?;
        let act = self.activation()?;
        let ch = &self.block_out_channels;
        let n = ch.len();
        let g = self.norm_num_groups;
        let lpb = self.layers_per_block;

        let mut down_blocks = Vec::with_capacity(n);
        let mut out = ch[0];
        for (i, &channel) in ch.iter().enumerate() {
            let cin = out;
            out = channel;
            down_blocks.push(DownEncoderBlock2D {
                resnets: (0..lpb)
                    .map(|j| vae_resnet(if j == 0 { cin } else { out }, out, g, act, device))
                    .collect(),
                downsamplers: (i + 1 < n)
                    .then(|| Downsample2DConfig::new(out).with_padding(0).init(device))
                    .into_iter()
                    .collect(),
            });
        }
        let encoder = Encoder {
            conv_in: conv(self.in_channels, ch[0], 3, device),
            down_blocks,
            mid_block: VaeMidBlock::new(ch[n - 1], g, act, self.mid_block_add_attention, device),
            conv_norm_out: GroupNormConfig::new(g, ch[n - 1])
                .with_epsilon(1e-6)
                .init(device),
            conv_out: conv(ch[n - 1], 2 * self.latent_channels, 3, device),
            act,
        };

        let mut up_blocks = Vec::with_capacity(n);
        let mut out = ch[n - 1];
        for i in 0..n {
            let prev = out;
            out = ch[n - 1 - i];
            up_blocks.push(UpDecoderBlock2D {
                resnets: (0..=lpb)
                    .map(|j| vae_resnet(if j == 0 { prev } else { out }, out, g, act, device))
                    .collect(),
                upsamplers: (i + 1 < n)
                    .then(|| Upsample2DConfig::new(out).init(device))
                    .into_iter()
                    .collect(),
            });
        }
        let decoder = Decoder {
            conv_in: conv(self.latent_channels, ch[n - 1], 3, device),
            mid_block: VaeMidBlock::new(ch[n - 1], g, act, self.mid_block_add_attention, device),
            up_blocks,
            conv_norm_out: GroupNormConfig::new(g, ch[0])
                .with_epsilon(1e-6)
                .init(device),
            conv_out: conv(ch[0], self.out_channels, 3, device),
            act,
        };
        let lc = self.latent_channels;
        Ok(AutoencoderKL {
            encoder,
            decoder,
            quant_conv: self.use_quant_conv.then(|| conv(2 * lc, 2 * lc, 1, device)),
            post_quant_conv: self.use_post_quant_conv.then(|| conv(lc, lc, 1, device)),
            scaling_factor: self.scaling_factor,
            shift_factor: self.shift_factor.unwrap_or(0.0),
            tiling: None,
            default_tiling: VaeTiling::for_config(self),
            in_channels: self.in_channels,
            latent_channels: lc,
            downsampling_factor: self.downsampling_factor(),
        })
    }
}

impl<B: Backend> AutoencoderKL<B> {
    /// Reads `component`'s `config.json` in a diffusers folder and loads its weights
    /// strictly through [`crate::loading`].
    pub fn load(
        dir: &ModelDir,
        component: &str,
        variant: Option<&str>,
        device: &B::Device,
    ) -> Result<Self> {
        let config = AutoencoderKLConfig::from_config_map(&dir.config(component)?)?;
        let model = config.init(device)?;
        load_component(model, dir, component, variant, &LoadOptions::new())
    }

    /// [`load`](Self::load) for a `vae` folder itself (`config.json` + weights).
    pub fn from_dir(path: impl AsRef<std::path::Path>, device: &B::Device) -> Result<Self> {
        Self::load(&ModelDir::open(path)?, ROOT, None, device)
    }

    /// Turns on diffusers-style automatic tiling with the config's tile size.
    pub fn enable_tiling(&mut self) {
        self.tiling = Some(self.default_tiling);
    }

    /// Sets (or, with `None`, turns off) automatic tiling.
    pub fn set_tiling(&mut self, tiling: Option<VaeTiling>) -> Result<()> {
        if let Some(t) = &tiling {
            t.validate()?;
        }
        self.tiling = tiling;
        Ok(())
    }

    /// Sets how the mid-block self-attention is evaluated; query chunks bound its memory
    /// (the attention matrix is `(H/f * W/f)^2` per image).
    pub fn set_attention_chunking(&mut self, chunking: AttentionChunking) {
        for mid in [&mut self.encoder.mid_block, &mut self.decoder.mid_block] {
            mid.attentions
                .iter_mut()
                .for_each(|a| a.chunking = chunking);
        }
    }

    fn check_image(&self, x: &Tensor<B, 4>) -> Result<()> {
        let [_, c, h, w] = x.dims();
        if c != self.in_channels || h == 0 || w == 0 {
            return Err(Error::Shape(format!(
                "VAE input is {:?}, expected [batch, {}, H, W]",
                x.dims(),
                self.in_channels
            )));
        }
        Ok(())
    }

    fn check_latent(&self, z: &Tensor<B, 4>) -> Result<()> {
        let [_, c, h, w] = z.dims();
        if c != self.latent_channels || h == 0 || w == 0 {
            return Err(Error::Shape(format!(
                "VAE latent is {:?}, expected [batch, {}, h, w]",
                z.dims(),
                self.latent_channels
            )));
        }
        Ok(())
    }

    /// The dtype the decoder computes in: that of its weights (`decoder.conv_in.weight`).
    /// [`encode`](Self::encode) and [`decode`](Self::decode) cast their input to the weights'
    /// dtype and their result back to the input's, so an `f16` VAE takes and returns `f32`.
    pub fn dtype(&self) -> DType {
        self.decoder.conv_in.weight.val().dtype()
    }

    fn moments(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let out_dtype = x.dtype();
        let x = cast_to(x, self.encoder.conv_in.weight.val().dtype());
        let h = self.encoder.forward(x);
        let h = match &self.quant_conv {
            Some(q) => conv_forward(q, h),
            None => h,
        };
        cast_to(h, out_dtype)
    }

    fn decode_tile(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let out_dtype = z.dtype();
        let z = cast_to(z, self.dtype());
        let z = match &self.post_quant_conv {
            Some(p) => conv_forward(p, z),
            None => z,
        };
        cast_to(self.decoder.forward(z), out_dtype)
    }

    /// Encodes images (in `[-1, 1]`) into the latent posterior; tiles when automatic tiling
    /// is on and the image is larger than a tile (as diffusers' `encode`).
    ///
    /// # Shapes
    ///
    /// - x: `[batch, in_channels, H, W]`
    /// - posterior mean/logvar: `[batch, latent_channels, H / f, W / f]`
    pub fn encode(&self, x: Tensor<B, 4>) -> Result<DiagonalGaussian<B>> {
        self.check_image(&x)?;
        let [_, _, h, w] = x.dims();
        if let Some(t) = self.tiling
            && (h > t.tile_sample_min_size || w > t.tile_sample_min_size)
        {
            return self.tiled_encode(x, &t);
        }
        Ok(DiagonalGaussian::from_moments(self.moments(x)))
    }

    /// Decodes latents (unscaled: see [`unscale_latents`](Self::unscale_latents)); tiles
    /// when automatic tiling is on and the latent is larger than a tile.
    ///
    /// # Shapes
    ///
    /// - z: `[batch, latent_channels, h, w]`
    /// - output: `[batch, out_channels, h f, w f]`
    pub fn decode(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        self.check_latent(&z)?;
        let [_, _, h, w] = z.dims();
        if let Some(t) = self.tiling
            && (h > t.tile_latent_min_size || w > t.tile_latent_min_size)
        {
            return self.tiled_decode(z, &t);
        }
        Ok(self.decode_tile(z))
    }

    /// Encodes tile by tile (overlapping tiles blended linearly), exactly as diffusers'
    /// `_tiled_encode`: memory stays bounded whatever the image size.
    ///
    /// # Shapes
    ///
    /// - x: `[batch, in_channels, H, W]`
    /// - posterior mean/logvar: `[batch, latent_channels, ~H / f, ~W / f]`
    pub fn tiled_encode(&self, x: Tensor<B, 4>, tiling: &VaeTiling) -> Result<DiagonalGaussian<B>> {
        self.check_image(&x)?;
        tiling.validate()?;
        let moments = tiled(
            x,
            tiling.tile_sample_min_size,
            tiling.tile_latent_min_size,
            tiling.tile_overlap_factor,
            |tile| self.moments(tile),
        );
        Ok(DiagonalGaussian::from_moments(moments))
    }

    /// Decodes tile by tile, exactly as diffusers' `tiled_decode`.
    ///
    /// # Shapes
    ///
    /// - z: `[batch, latent_channels, h, w]`
    /// - output: `[batch, out_channels, ~h f, ~w f]`
    pub fn tiled_decode(&self, z: Tensor<B, 4>, tiling: &VaeTiling) -> Result<Tensor<B, 4>> {
        self.check_latent(&z)?;
        tiling.validate()?;
        Ok(tiled(
            z,
            tiling.tile_latent_min_size,
            tiling.tile_sample_min_size,
            tiling.tile_overlap_factor,
            |tile| self.decode_tile(tile),
        ))
    }

    /// Latents as the U-Net sees them: `(z - shift_factor) * scaling_factor`.
    pub fn scale_latents(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let z = if self.shift_factor != 0.0 {
            z.sub_scalar(self.shift_factor)
        } else {
            z
        };
        z.mul_scalar(self.scaling_factor)
    }

    /// The inverse of [`scale_latents`](Self::scale_latents): `z / scaling_factor +
    /// shift_factor`, the input of [`decode`](Self::decode).
    pub fn unscale_latents(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let z = z.div_scalar(self.scaling_factor);
        if self.shift_factor != 0.0 {
            z.add_scalar(self.shift_factor)
        } else {
            z
        }
    }
}

/// diffusers' tiling loop: input tiles of `tile_in` every `tile_in * (1 - overlap)` pixels,
/// each mapped by `f` to an output tile of (nominally) `tile_out`; each output tile is
/// blended with the (already blended) tiles above and to its left over
/// `tile_out * overlap` rows/columns, then cropped to `tile_out - blend` and concatenated.
fn tiled<B: Backend>(
    x: Tensor<B, 4>,
    tile_in: usize,
    tile_out: usize,
    overlap: f64,
    f: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [_, _, h, w] = x.dims();
    let stride = (tile_in as f64 * (1.0 - overlap)) as usize;
    let blend = (tile_out as f64 * overlap) as usize;
    let limit = tile_out - blend;
    let mut rows: Vec<Vec<Tensor<B, 4>>> = Vec::new();
    for i in (0..h).step_by(stride) {
        let mut row = Vec::new();
        for j in (0..w).step_by(stride) {
            let tile = x.clone().slice([
                0..x.dims()[0],
                0..x.dims()[1],
                i..(i + tile_in).min(h),
                j..(j + tile_in).min(w),
            ]);
            row.push(f(tile));
        }
        rows.push(row);
    }
    let mut result_rows = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        let mut result_row = Vec::with_capacity(rows[i].len());
        for j in 0..rows[i].len() {
            let mut tile = rows[i][j].clone();
            if i > 0 {
                tile = blend_along(&rows[i - 1][j], tile, blend, 2);
            }
            if j > 0 {
                tile = blend_along(&rows[i][j - 1], tile, blend, 3);
            }
            rows[i][j] = tile.clone();
            let [b, c, th, tw] = tile.dims();
            result_row.push(tile.slice([0..b, 0..c, 0..th.min(limit), 0..tw.min(limit)]));
        }
        result_rows.push(Tensor::cat(result_row, 3));
    }
    Tensor::cat(result_rows, 2)
}

/// diffusers' `blend_v` (`dim = 2`) / `blend_h` (`dim = 3`): the first `extent` rows
/// (columns) of `b` become `a[-extent + y] * (1 - y / extent) + b[y] * (y / extent)`.
fn blend_along<B: Backend>(
    a: &Tensor<B, 4>,
    b: Tensor<B, 4>,
    extent: usize,
    dim: usize,
) -> Tensor<B, 4> {
    let extent = extent.min(a.dims()[dim]).min(b.dims()[dim]);
    if extent == 0 {
        return b;
    }
    let device = b.device();
    let dtype = b.dtype();
    let mut shape = [1usize; 4];
    shape[dim] = extent;
    let ratios: Vec<f64> = (0..extent).map(|y| y as f64 / extent as f64).collect();
    let weight = |values: Vec<f32>| {
        crate::nn::cast_to(
            Tensor::<B, 4>::from_data(
                TensorData::new(values, shape),
                (&device, burn::tensor::DType::F32),
            ),
            dtype,
        )
    };
    let w_b = weight(ratios.iter().map(|&r| r as f32).collect());
    let w_a = weight(ratios.iter().map(|&r| (1.0 - r) as f32).collect());
    let a_len = a.dims()[dim];
    let a_tail = a.clone().narrow(dim, a_len - extent, extent);
    let b_len = b.dims()[dim];
    let b_head = b.clone().narrow(dim, 0, extent);
    let blended = a_tail * w_a + b_head * w_b;
    if b_len == extent {
        blended
    } else {
        Tensor::cat(vec![blended, b.narrow(dim, extent, b_len - extent)], dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    #[test]
    fn blending_follows_diffusers_formula() {
        let device = Default::default();
        let a = Tensor::<B, 4>::random([1, 2, 5, 3], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<B, 4>::random([1, 2, 4, 3], Distribution::Normal(0.0, 1.0), &device);
        let got: Vec<f32> = blend_along(&a, b.clone(), 2, 2)
            .into_data()
            .to_vec()
            .unwrap();
        let av: Vec<f32> = a.into_data().to_vec().unwrap();
        let bv: Vec<f32> = b.into_data().to_vec().unwrap();
        for c in 0..2 {
            for y in 0..4 {
                for x in 0..3 {
                    let bi = (c * 4 + y) * 3 + x;
                    let want = if y < 2 {
                        let ai = (c * 5 + (5 - 2 + y)) * 3 + x;
                        av[ai] * (1.0 - y as f32 / 2.0) + bv[bi] * (y as f32 / 2.0)
                    } else {
                        bv[bi]
                    };
                    assert!((got[bi] - want).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn posterior_clamps_and_samples_with_given_noise() {
        let device = Default::default();
        let moments = Tensor::<B, 4>::from_data(
            TensorData::new(vec![1.0f32, 2.0, -50.0, 2.0f32.ln() * 2.0], [1, 4, 1, 1]),
            &device,
        );
        let post = DiagonalGaussian::from_moments(moments);
        let logvar: Vec<f32> = post.logvar.clone().into_data().to_vec().unwrap();
        assert_eq!(logvar[0], -30.0);
        let noise = Tensor::<B, 4>::ones([1, 2, 1, 1], &device);
        let s: Vec<f32> = post.sample(noise).unwrap().into_data().to_vec().unwrap();
        assert!((s[0] - (1.0 + (-15.0f32).exp())).abs() < 1e-6);
        assert!((s[1] - 4.0).abs() < 1e-5);
        assert!(post.sample(Tensor::zeros([1, 2, 2, 1], &device)).is_err());
    }

    #[test]
    fn scaling_round_trips() {
        let device = Default::default();
        let config = AutoencoderKLConfig {
            block_out_channels: vec![32],
            shift_factor: Some(0.1),
            scaling_factor: 0.5,
            ..AutoencoderKLConfig::default()
        };
        let vae = config.init::<B>(&device).unwrap();
        let z = Tensor::<B, 4>::random([1, 4, 2, 2], Distribution::Normal(0.0, 1.0), &device);
        let scaled = vae.scale_latents(z.clone());
        let expect = z.clone().sub_scalar(0.1).mul_scalar(0.5);
        let d1: f32 = (scaled.clone() - expect).abs().max().into_scalar();
        let d2: f32 = (vae.unscale_latents(scaled) - z).abs().max().into_scalar();
        assert!(d1 < 1e-6 && d2 < 1e-6);
    }
}
