#!/usr/bin/env python3
"""Tiny pixel-space U-Nets (diffusers' UNet2DModel), DDPM pipelines and reference outputs.

Writes into diffusion-models/tests/fixtures/ (relative to the repository root):

  ddpm-tiny/                 DDPMPipeline(unet, DDPMScheduler).save_pretrained(): an unconditional
                             UNet2DModel (block_out_channels (8, 16), DownBlock2D + AttnDownBlock2D,
                             AttnUpBlock2D + UpBlock2D, mid-block attention, 3 channels, 8x8)
  ddpm-classcond-tiny/       the same layout with a class embedding table (num_class_embeds 4);
                             saved as a DDPMPipeline folder too (diffusers has no class-conditional
                             DDPM pipeline, so the reference loop is written out below)
  unet2d-variants-tiny/<v>/  U-Net-only variants covering the rest of the config space:
      scale-shift/    resnet_time_scale_shift "scale_shift" (mid attention without group norm),
                      downsample_type / upsample_type "resnet", act_fn "mish", center_input_sample,
                      class_embed_type "timestep", attention_head_dim null, three levels,
                      layers_per_block 2, mid_block_scale_factor sqrt(2); weights saved with the
                      deprecated attention key names (query/key/value/proj_attn) diffusers still
                      converts on load
      fourier/        time_embedding_type "fourier" (Gaussian Fourier features, output divided by
                      the timestep), class_embed_type "identity", time_embedding_dim 24,
                      downsample_padding 0, add_attention false, attn_norm_num_groups 2,
                      flip_sin_to_cos false, freq_shift 1, non-square sample_size [8, 12]
      learned/        time_embedding_type "learned" (an nn.Embedding over num_train_timesteps),
                      no mid block, one level only

Each model directory has a reference.safetensors:

  sample [B, C, H, W], timesteps [B] (float32; int64 for "learned"), class_labels (int64 ids,
  float32 scalars or float32 vectors when the model is class-conditional), out [B, C', H, W]:
  UNet2DModel(sample, timesteps, class_labels).sample in float32.
  `scalar_timestep` (shape [1]) / `out_scalar`: the same sample with one timestep for the batch.

ddpm-tiny/ and ddpm-classcond-tiny/ also have pipeline.safetensors, one group of tensors per run
`<run>`:

  <run>.draw.<i>     every standard-normal draw in order (float64; the initial image first, then
                     the DDPM step noise), drawn from numpy's default_rng(seed) through a patched
                     diffusers `randn_tensor`
  <run>.images       float32 [B, H, W, 3] in [0, 1] (output_type="np")
  <run>.class_labels int64 [B] (class-conditional runs)

with metadata `<run>` = JSON {"steps", "batch", "scheduler", "draws"}.

Requirements: pip install diffusers==0.42.1 torch numpy safetensors
Usage: python3 scripts/make_unet2d_fixtures.py
"""

import json
import math
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "diffusion-models", "tests", "fixtures")

META = {"diffusers": diffusers.__version__, "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def perturb_constant_params(module, seed):
    """Add small noise to every parameter initialised to a constant (norm weights = 1, biases
    = 0), so a swapped gamma/beta or a missing bias shows up in the parity tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            flat = p.detach().flatten()
            if flat.numel() > 1 and bool(torch.all(flat == flat[0])):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def fresh_dir(*parts):
    path = os.path.join(OUT, *parts)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def build_unet(seed, **config):
    torch.manual_seed(seed)
    return perturb_constant_params(UNet2DModel(**config).eval(), seed + 1000)


def save_tensors(path, tensors, metadata=None):
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta = dict(META)
    meta.update(metadata or {})
    save_file(tensors, path, metadata=meta)


def unet_reference(unet, dirname, gen, timesteps, class_labels=None, scalar_timestep=None):
    """Runs the U-Net on a seeded sample and writes reference.safetensors."""
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
    batch = len(timesteps)
    sample = torch.randn(batch, cfg.in_channels, *size, generator=gen, dtype=torch.float32)
    tensors = {"sample": sample, "timesteps": timesteps}
    if class_labels is not None:
        tensors["class_labels"] = class_labels
    tensors["out"] = unet(sample, timesteps, class_labels=class_labels).sample.float()
    if scalar_timestep is not None:
        tensors["scalar_timestep"] = scalar_timestep
        tensors["out_scalar"] = unet(sample, scalar_timestep, class_labels=class_labels).sample.float()
    save_tensors(os.path.join(dirname, "reference.safetensors"), tensors)
    scale = tensors["out"].abs().max().item()
    print(f"{os.path.relpath(dirname, OUT)}: out {tuple(tensors['out'].shape)} max|out| {scale:.3f}")


# ---------------------------------------------------------------------------------------------
# Record every randn_tensor call diffusers makes, drawing from a seeded numpy generator.
# ---------------------------------------------------------------------------------------------

_original_randn = diffusers.utils.torch_utils.randn_tensor
_draws = []
_rng = np.random.default_rng(0)


def _recording_randn(shape, generator=None, device=None, dtype=None, layout=None):
    values = _rng.standard_normal(size=tuple(shape))
    _draws.append(values.astype(np.float64))
    return torch.tensor(values, dtype=dtype or torch.float32, device=device)


def _patch_randn():
    for name, module in list(sys.modules.items()):
        if name.startswith("diffusers") and getattr(module, "randn_tensor", None) is _original_randn:
            module.randn_tensor = _recording_randn


def _reset_draws(seed):
    global _rng
    _rng = np.random.default_rng(seed)
    _draws.clear()


def record_run(tensors, metadata, run, images, steps, scheduler, class_labels=None):
    for i, d in enumerate(_draws):
        tensors[f"{run}.draw.{i}"] = torch.tensor(d, dtype=torch.float64)
    tensors[f"{run}.images"] = torch.tensor(np.asarray(images, dtype=np.float32))
    if class_labels is not None:
        tensors[f"{run}.class_labels"] = class_labels
    metadata[run] = json.dumps(
        {"steps": steps, "batch": int(images.shape[0]), "scheduler": scheduler, "draws": len(_draws)}
    )
    print(f"  run {run}: images {tuple(images.shape)}, {len(_draws)} draws")


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def ddpm_unet_config(**over):
    config = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        norm_num_groups=4,
    )
    config.update(over)
    return config


def ddpm_scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)


def make_ddpm():
    path = fresh_dir("ddpm-tiny")
    unet = build_unet(10, **ddpm_unet_config())
    pipe = DDPMPipeline(unet=unet, scheduler=ddpm_scheduler())
    pipe.save_pretrained(path, safe_serialization=True)
    gen = torch.Generator().manual_seed(11)
    unet_reference(
        unet,
        path,
        gen,
        timesteps=torch.tensor([999.0, 17.5]),
        scalar_timestep=torch.tensor([400.0]),
    )

    pipe.set_progress_bar_config(disable=True)
    tensors, metadata = {}, {}
    _patch_randn()
    # DDPMPipeline as shipped: the folder's DDPMScheduler, 10 steps, two images.
    _reset_draws(21)
    images = pipe(batch_size=2, num_inference_steps=10, output_type="np").images
    record_run(tensors, metadata, "ddpm", images, 10, "DDPMScheduler")
    # The same pipeline with DDIM (eta 0) swapped in: one draw, the initial image.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    _reset_draws(22)
    images = pipe(batch_size=1, num_inference_steps=5, output_type="np").images
    record_run(tensors, metadata, "ddim", images, 5, "DDIMScheduler")
    save_tensors(os.path.join(path, "pipeline.safetensors"), tensors, metadata)


def make_ddpm_classcond():
    path = fresh_dir("ddpm-classcond-tiny")
    unet = build_unet(30, **ddpm_unet_config(num_class_embeds=4))
    scheduler = ddpm_scheduler()
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=True)
    gen = torch.Generator().manual_seed(31)
    unet_reference(
        unet,
        path,
        gen,
        timesteps=torch.tensor([999.0, 250.0]),
        class_labels=torch.tensor([3, 0]),
        scalar_timestep=torch.tensor([600.0]),
    )

    # diffusers has no class-conditional DDPM pipeline: DDPMPipeline.__call__ with the class
    # labels passed to the U-Net, written out.
    tensors, metadata = {}, {}
    _patch_randn()
    for run, labels, seed in (("labels-1-3", [1, 3], 41), ("labels-2-2-0", [2, 2, 0], 42)):
        _reset_draws(seed)
        labels = torch.tensor(labels)
        batch = labels.shape[0]
        image = diffusers.utils.torch_utils.randn_tensor((batch, 3, 8, 8), dtype=torch.float32)
        scheduler.set_timesteps(10)
        for t in scheduler.timesteps:
            model_output = unet(image, t, class_labels=labels).sample
            image = scheduler.step(model_output, t, image).prev_sample
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        record_run(tensors, metadata, run, image, 10, "DDPMScheduler", class_labels=labels)
    save_tensors(os.path.join(path, "pipeline.safetensors"), tensors, metadata)


LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def save_with_legacy_attention_keys(unet, path):
    """Saves the weights under the pre-0.14 attention names that diffusers converts on load."""
    unet.save_config(path)
    state = {}
    for key, value in unet.state_dict().items():
        for new, old in LEGACY.items():
            if f".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        state[key] = value.detach().contiguous()
    save_file(state, os.path.join(path, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    reloaded = UNet2DModel.from_pretrained(path).eval()
    for (k1, v1), (k2, v2) in zip(sorted(unet.state_dict().items()), sorted(reloaded.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2), (k1, k2)


def make_variants():
    # scale_shift, resnet up/down sampling, mish, centered input, "timestep" class embedding
    path = fresh_dir("unet2d-variants-tiny", "scale-shift")
    unet = build_unet(
        50,
        sample_size=8,
        in_channels=2,
        out_channels=3,
        center_input_sample=True,
        block_out_channels=(8, 8, 16),
        layers_per_block=2,
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
        downsample_type="resnet",
        upsample_type="resnet",
        resnet_time_scale_shift="scale_shift",
        act_fn="mish",
        attention_head_dim=None,
        norm_num_groups=4,
        mid_block_scale_factor=math.sqrt(2.0),
        class_embed_type="timestep",
    )
    assert unet.mid_block.attentions[0].group_norm is None
    save_with_legacy_attention_keys(unet, path)
    gen = torch.Generator().manual_seed(51)
    unet_reference(
        unet,
        path,
        gen,
        timesteps=torch.tensor([3.0, 812.25]),
        class_labels=torch.tensor([7.0, 100.5]),
        scalar_timestep=torch.tensor([55.0]),
    )

    # Gaussian Fourier time features, identity class embedding, no mid attention
    path = fresh_dir("unet2d-variants-tiny", "fourier")
    unet = build_unet(
        60,
        sample_size=(8, 12),
        in_channels=3,
        out_channels=2,
        time_embedding_type="fourier",
        time_embedding_dim=24,
        flip_sin_to_cos=False,
        freq_shift=1,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        downsample_padding=0,
        add_attention=False,
        attn_norm_num_groups=2,
        attention_head_dim=4,
        norm_num_groups=4,
        norm_eps=1e-6,
        class_embed_type="identity",
    )
    unet.save_pretrained(path, safe_serialization=True)
    gen = torch.Generator().manual_seed(61)
    unet_reference(
        unet,
        path,
        gen,
        timesteps=torch.tensor([0.5, 3.5]),
        class_labels=torch.randn(2, 24, generator=gen),
        scalar_timestep=torch.tensor([1.25]),
    )

    # learned (nn.Embedding) time embedding, no mid block, a single level
    path = fresh_dir("unet2d-variants-tiny", "learned")
    unet = build_unet(
        70,
        sample_size=4,
        in_channels=1,
        out_channels=1,
        time_embedding_type="learned",
        num_train_timesteps=50,
        block_out_channels=(8,),
        layers_per_block=1,
        down_block_types=("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",),
        mid_block_type=None,
        attention_head_dim=4,
        norm_num_groups=2,
    )
    unet.save_pretrained(path, safe_serialization=True)
    gen = torch.Generator().manual_seed(71)
    unet_reference(
        unet,
        path,
        gen,
        timesteps=torch.tensor([0, 49]),
        scalar_timestep=torch.tensor([20]),
    )


def main():
    torch.set_grad_enabled(False)
    make_ddpm()
    make_ddpm_classcond()
    make_variants()


if __name__ == "__main__":
    main()
