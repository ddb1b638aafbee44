#!/usr/bin/env python3
"""Build tiny, architecture-faithful diffusers/transformers models and reference outputs.

Writes into diffusion-models/tests/fixtures/ (relative to the repository root):

  sd1-tiny/               StableDiffusionPipeline (SD 1.x layout), all weights float32
  sd2-tiny/               StableDiffusionPipeline, SD 2.x style (linear projections, per-block
                          head counts, upcast attention, gelu text encoder, "!" padding,
                          v-prediction DDIM scheduler). unet/ is saved in float16, text_encoder/
                          is sharded (model.safetensors.index.json).
  unet-sdxl-tiny/         StableDiffusionXLPipeline (text_time added conditioning, two text
                          encoders, transformer_layers_per_block (1, 2), tiny VAE)
  unet-classcond-tiny/    UNet2DConditionModel with a class embedding table (num_class_embeds)
  unet-lcm-tiny/          UNet2DConditionModel with time_cond_proj_dim (LCM guidance embedding)
  unet-inpaint-tiny/      UNet2DConditionModel with in_channels 9; unet/ is sharded
  t5-tiny/                T5EncoderModel (T5 v1.1 style, gated-gelu); t5-tiny/tokenizer/ is a
                          tiny sentencepiece unigram T5Tokenizer (900 pieces + 100 extra ids)
                          with prompts.json (reference ids)
  clip-tokenizer-full/    the full real CLIP BPE vocabulary (vocab.json, merges.txt, ...) and
                          prompts.json with the ids transformers' CLIPTokenizer produces

Each model fixture directory has a `reference.safetensors` with fixed seeded inputs and the float32
outputs of the Python reference (keys are documented in tests/fixtures/README.md, which this script
also writes).

Requirements (exact versions used to produce the committed fixtures):

    pip install diffusers==0.42.1 transformers==5.24.0 torch numpy safetensors open_clip_torch \
        sentencepiece protobuf

open_clip_torch is only read for its data file bpe_simple_vocab_16e6.txt.gz (the real CLIP BPE
merges); `pip install --no-deps open_clip_torch` is enough, the package is never imported.
sentencepiece (and protobuf, for transformers' spm -> tokenizers conversion) train the tiny T5
tokenizer.
No network access is needed. Everything is deterministic (torch.manual_seed per component,
CPU, float32).

Usage: python3 scripts/make_model_fixtures.py
"""

import gzip
import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "diffusion-models", "tests", "fixtures")

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
TINY_VOCAB = 1000
SEQ = 7  # encoder_hidden_states sequence length used for U-Net references


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def perturb_constant_params(module, seed):
    """Add small noise to every parameter that is initialised to a constant (norm weights = 1,
    biases = 0, ...), so that a swapped gamma/beta or a missing bias shows up in parity tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            flat = p.detach().flatten()
            if flat.numel() > 1 and bool(torch.all(flat == flat[0])):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def f32(t):
    return t.detach().to(torch.float32).contiguous()


def save_reference(dirname, tensors, metadata=None):
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta = {
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    if metadata:
        meta.update(metadata)
    save_file(tensors, os.path.join(dirname, "reference.safetensors"), metadata=meta)


def fresh_dir(name):
    path = os.path.join(OUT, name)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


# ---------------------------------------------------------------------------------------------
# CLIP BPE vocabulary (the real one, from open_clip's data file)
# ---------------------------------------------------------------------------------------------


def bytes_to_unicode():
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def real_clip_merges():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        sys.exit("open_clip_torch is required (pip install --no-deps open_clip_torch)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    # Same slice as CLIP's SimpleTokenizer: skip the version header, keep 49152-256-2 merges.
    return lines[1 : 49152 - 256 - 2 + 1]


def clip_vocab(merges):
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [SOT, EOT]
    assert len(tokens) == len(set(tokens)), "CLIP vocabulary tokens must be unique"
    return {t: i for i, t in enumerate(tokens)}


def added_token(content):
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_clip_tokenizer(path, merges, pad_token):
    """Write a tokenizer folder in the layout of the real SD checkpoints (vocab.json, merges.txt,
    tokenizer_config.json, special_tokens_map.json) and load it back with transformers."""
    os.makedirs(path, exist_ok=True)
    vocab = clip_vocab(merges)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": {k: v for k, v in added_token(SOT).items() if k != "__type"},
        "eos_token": {k: v for k, v in added_token(EOT).items() if k != "__type"},
        "pad_token": pad_token,
        "unk_token": {k: v for k, v in added_token(EOT).items() if k != "__type"},
    }
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2, ensure_ascii=False)
    config = {
        "add_prefix_space": False,
        "bos_token": added_token(SOT),
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": added_token(EOT),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added_token(EOT),
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    tok = CLIPTokenizer.from_pretrained(path)
    assert tok.pad_token == pad_token, (tok.pad_token, pad_token)
    assert tok.model_max_length == 77
    assert len(tok) == len(vocab), (len(tok), len(vocab))
    return tok


def tiny_merges(all_merges):
    return all_merges[: TINY_VOCAB - 512 - 2]


def encode77(tok, prompts):
    return tok(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids.to(torch.int64)


# ---------------------------------------------------------------------------------------------
# model builders
# ---------------------------------------------------------------------------------------------


def clip_text_config(hidden_act, layers=3, projection_dim=32, legacy_eos=True):
    return CLIPTextConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        layer_norm_eps=1e-5,
        # Real SD checkpoints carry the legacy ids (bos 0, pad 1, eos 2): transformers then pools
        # at argmax(input_ids). The non-legacy form pools at the first eos_token_id.
        bos_token_id=0 if legacy_eos else TINY_VOCAB - 2,
        pad_token_id=1 if legacy_eos else TINY_VOCAB - 1,
        eos_token_id=2 if legacy_eos else TINY_VOCAB - 1,
    )


def build_clip(cls, config, seed):
    torch.manual_seed(seed)
    model = cls(config).eval()
    return perturb_constant_params(model, seed + 1)


def build_unet(seed, **kwargs):
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**kwargs).eval()
    return perturb_constant_params(model, seed + 1)


def build_vae(seed, **kwargs):
    torch.manual_seed(seed)
    model = AutoencoderKL(**kwargs).eval()
    return perturb_constant_params(model, seed + 1)


def round_to_f16(model):
    """Round the weights through float16 (what a float16 checkpoint stores) but keep computing in
    float32, so the reference matches a loader that upcasts f16 weights to f32."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


# ---------------------------------------------------------------------------------------------
# reference computations
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def unet_reference(unet, gen, prefix="unet.", cond_dim=None, extra=None):
    """Two calls: (a) one scalar timestep shared by the batch, (b) one timestep per batch element
    (non-integer values). `extra(gen)` returns additional forward kwargs (as tensors to record)."""
    cfg = unet.config
    cond_dim = cond_dim or cfg.cross_attention_dim
    sample = randn(gen, 2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    ehs = randn(gen, 2, SEQ, cond_dim)
    rec = {"sample": sample, "encoder_hidden_states": ehs}
    kwargs = {}
    if extra is not None:
        for name, value in extra(gen).items():
            rec[name] = value
            if name in ("text_embeds", "time_ids"):
                kwargs.setdefault("added_cond_kwargs", {})[name] = value
            else:
                kwargs[name] = value
    t_a = torch.tensor([981.0])
    t_b = torch.tensor([10.5, 500.25])
    out_a = unet(sample, t_a, encoder_hidden_states=ehs, **kwargs).sample
    out_b = unet(sample, t_b, encoder_hidden_states=ehs, **kwargs).sample
    rec.update({"timestep_a": t_a, "out_a": out_a, "timesteps_b": t_b, "out_b": out_b})
    return {prefix + k: f32(v) if v.is_floating_point() else v for k, v in rec.items()}


@torch.no_grad()
def vae_reference(vae, gen, image_size=32, prefix="vae."):
    cfg = vae.config
    down = 2 ** (len(cfg.block_out_channels) - 1)
    image = torch.rand(1, 3, image_size, image_size, generator=gen) * 2.0 - 1.0
    dist = vae.encode(image).latent_dist
    latent = randn(gen, 1, cfg.latent_channels, 8, 8)
    decoded = vae.decode(latent).sample
    assert decoded.shape[-1] == 8 * down
    rec = {
        "image": image,
        "latent_mean": dist.mean,
        "latent_logvar": dist.logvar,
        "latent": latent,
        "decoded": decoded,
    }
    return {prefix + k: f32(v) for k, v in rec.items()}


@torch.no_grad()
def text_reference(model, input_ids, prefix):
    out = model(input_ids, output_hidden_states=True)
    rec = {
        "input_ids": input_ids,
        "last_hidden_state": f32(out.last_hidden_state),
        "hidden_states_penultimate": f32(out.hidden_states[-2]),
    }
    if hasattr(out, "pooler_output") and out.pooler_output is not None:
        rec["pooler_output"] = f32(out.pooler_output)
    if hasattr(out, "text_embeds") and out.text_embeds is not None:
        rec["text_embeds"] = f32(out.text_embeds)
    return {prefix + k: v for k, v in rec.items()}


TEXT_PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A Painting of a squirrel eating a burger, 4K!",
]

SD1_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


def make_sd1(merges):
    path = fresh_dir("sd1-tiny")
    unet = build_unet(
        100,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = build_vae(
        200,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.18215,
    )
    text_encoder = build_clip(CLIPTextModel, clip_text_config("quick_gelu"), 300)
    tok_dir = os.path.join(path, "tokenizer")
    tokenizer = write_clip_tokenizer(tok_dir, tiny_merges(merges), EOT)
    scheduler = PNDMScheduler(**SD1_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    # keep our hand-written tokenizer files (the real checkpoints' layout)
    shutil.rmtree(tok_dir)
    write_clip_tokenizer(tok_dir, tiny_merges(merges), EOT)

    gen = torch.Generator().manual_seed(1)
    ref = {}
    ref.update(unet_reference(unet, gen))
    ref.update(vae_reference(vae, gen))
    ref.update(text_reference(text_encoder, encode77(tokenizer, TEXT_PROMPTS), "text_encoder."))
    save_reference(path, ref, {"text_encoder.prompts": json.dumps(TEXT_PROMPTS)})


def make_sd2(merges):
    path = fresh_dir("sd2-tiny")
    unet = build_unet(
        110,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
    )
    round_to_f16(unet)
    vae = build_vae(
        210,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.18215,
    )
    text_encoder = build_clip(
        CLIPTextModel, clip_text_config("gelu", projection_dim=32, legacy_eos=False), 310
    )
    tok_dir = os.path.join(path, "tokenizer")
    tokenizer = write_clip_tokenizer(tok_dir, tiny_merges(merges), "!")
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        trained_betas=None,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    shutil.rmtree(tok_dir)
    write_clip_tokenizer(tok_dir, tiny_merges(merges), "!")
    # float16 U-Net weights
    shutil.rmtree(os.path.join(path, "unet"))
    unet.half().save_pretrained(os.path.join(path, "unet"))
    unet.float()
    # sharded text encoder
    shutil.rmtree(os.path.join(path, "text_encoder"))
    text_encoder.save_pretrained(os.path.join(path, "text_encoder"), max_shard_size="100KB")
    assert os.path.exists(os.path.join(path, "text_encoder", "model.safetensors.index.json"))

    gen = torch.Generator().manual_seed(2)
    ref = {}
    ref.update(unet_reference(unet, gen))
    ref.update(vae_reference(vae, gen))
    ref.update(text_reference(text_encoder, encode77(tokenizer, TEXT_PROMPTS), "text_encoder."))
    save_reference(path, ref, {"text_encoder.prompts": json.dumps(TEXT_PROMPTS)})


def make_sdxl(merges):
    path = fresh_dir("unet-sdxl-tiny")
    text_embed_dim = 32
    unet = build_unet(
        120,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=text_embed_dim + 6 * 8,
        # SDXL concatenates the penultimate hidden states of both text encoders (32 + 32)
        cross_attention_dim=64,
        norm_num_groups=4,
    )
    vae = build_vae(
        220,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    te1 = build_clip(CLIPTextModel, clip_text_config("quick_gelu"), 320)
    te2 = build_clip(
        CLIPTextModelWithProjection,
        clip_text_config("gelu", projection_dim=text_embed_dim),
        330,
    )
    tok1 = write_clip_tokenizer(os.path.join(path, "tokenizer"), tiny_merges(merges), EOT)
    tok2 = write_clip_tokenizer(os.path.join(path, "tokenizer_2"), tiny_merges(merges), "!")
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path)
    for name, pad in (("tokenizer", EOT), ("tokenizer_2", "!")):
        shutil.rmtree(os.path.join(path, name))
        write_clip_tokenizer(os.path.join(path, name), tiny_merges(merges), pad)

    def added(gen):
        return {
            "text_embeds": randn(gen, 2, text_embed_dim),
            "time_ids": torch.tensor(
                [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [1024.0, 768.0, 16.0, 8.0, 512.0, 640.0]]
            ),
        }

    gen = torch.Generator().manual_seed(3)
    ref = {}
    ref.update(unet_reference(unet, gen, extra=added))
    ref.update(vae_reference(vae, gen))
    ref.update(text_reference(te1, encode77(tok1, TEXT_PROMPTS), "text_encoder."))
    ref.update(text_reference(te2, encode77(tok2, TEXT_PROMPTS), "text_encoder_2."))
    save_reference(path, ref, {"text_encoder.prompts": json.dumps(TEXT_PROMPTS)})


def small_unet_kwargs(**over):
    kw = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    kw.update(over)
    return kw


def make_classcond():
    path = fresh_dir("unet-classcond-tiny")
    unet = build_unet(130, **small_unet_kwargs(layers_per_block=2, num_class_embeds=10))
    unet.save_pretrained(os.path.join(path, "unet"))

    def extra(gen):
        return {"class_labels": torch.tensor([3, 7], dtype=torch.int64)}

    gen = torch.Generator().manual_seed(4)
    save_reference(path, unet_reference(unet, gen, extra=extra))


def make_lcm():
    path = fresh_dir("unet-lcm-tiny")
    unet = build_unet(140, **small_unet_kwargs(time_cond_proj_dim=32))
    unet.save_pretrained(os.path.join(path, "unet"))
    LCMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=True,
        steps_offset=1,
        original_inference_steps=50,
        timestep_spacing="leading",
    ).save_pretrained(os.path.join(path, "scheduler"))

    def extra(gen):
        # LCM pipelines pass the guidance-scale embedding of (w - 1) as timestep_cond
        return {"timestep_cond": randn(gen, 2, 32)}

    gen = torch.Generator().manual_seed(5)
    save_reference(path, unet_reference(unet, gen, extra=extra))


def make_inpaint():
    path = fresh_dir("unet-inpaint-tiny")
    unet = build_unet(150, **small_unet_kwargs(in_channels=9))
    unet.save_pretrained(os.path.join(path, "unet"), max_shard_size="100KB")
    assert os.path.exists(
        os.path.join(path, "unet", "diffusion_pytorch_model.safetensors.index.json")
    )
    gen = torch.Generator().manual_seed(6)
    save_reference(path, unet_reference(unet, gen))


def make_t5():
    path = fresh_dir("t5-tiny")
    config = T5Config(
        vocab_size=TINY_VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(160)
    model = T5EncoderModel(config).eval()
    perturb_constant_params(model, 161)
    model.save_pretrained(path)

    gen = torch.Generator().manual_seed(7)
    length = 40  # long enough to reach the logarithmic relative-position buckets
    input_ids = torch.randint(3, TINY_VOCAB, (2, length), generator=gen, dtype=torch.int64)
    input_ids[0, -1] = 1  # </s>
    attention_mask = torch.ones(2, length, dtype=torch.int64)
    input_ids[1, 25] = 1
    input_ids[1, 26:] = 0  # <pad>
    attention_mask[1, 26:] = 0
    with torch.no_grad():
        masked = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        unmasked = model(input_ids=input_ids).last_hidden_state
    save_reference(
        path,
        {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "last_hidden_state": f32(masked),
            "last_hidden_state_no_mask": f32(unmasked),
        },
    )


def make_t5_tokenizer(merges):
    """A tiny real sentencepiece unigram model (nmt_nfkc normalisation like T5's), trained on a
    fixed corpus (the prompts, the fixture README and the words of the first 20000 CLIP merges),
    converted by transformers' T5Tokenizer; 900 pieces + 100 <extra_id_N> = the t5-tiny
    vocab_size 1000."""
    import sentencepiece as spm

    path = os.path.join(OUT, "t5-tiny", "tokenizer")
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    corpus_path = os.path.join(OUT, ".tmp-t5-corpus.txt")
    corpus = [p for p in TRICKY_PROMPTS + TEXT_PROMPTS if p.strip()] + README.splitlines()
    words = [m.replace(" ", "").replace("</w>", "") for m in merges[:20000]]
    corpus += [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    with open(corpus_path, "w", encoding="utf-8") as f:
        f.write("\n".join(line for line in corpus if line.strip()) + "\n")
    spm.SentencePieceTrainer.train(
        input=corpus_path,
        model_prefix=os.path.join(path, "spiece"),
        vocab_size=TINY_VOCAB - 100,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        num_threads=1,
        minloglevel=2,
    )
    os.remove(corpus_path)
    os.remove(os.path.join(path, "spiece.vocab"))
    tok = T5Tokenizer.from_pretrained(path, model_max_length=512)
    assert len(tok) == TINY_VOCAB, len(tok)
    tok.save_pretrained(path)
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    tok = T5Tokenizer.from_pretrained(path)
    entries = []
    for text in TRICKY_PROMPTS:
        ids = tok(text).input_ids
        padded = tok(text, padding="max_length", max_length=64, truncation=True)
        entries.append(
            {
                "text": text,
                "ids": ids,
                "ids_padded_64": padded.input_ids,
                "attention_mask_64": padded.attention_mask,
            }
        )
    doc = {
        "description": "T5Tokenizer ids. ids: no padding, no truncation (</s> appended). "
        "ids_padded_64 / attention_mask_64: padding='max_length', max_length=64, "
        "truncation=True (as SD3/Flux call the T5 tokenizer, with their own max length).",
        "transformers": transformers.__version__,
        "sentencepiece": spm.__version__,
        "pad_id": tok.pad_token_id,
        "eos_id": tok.eos_token_id,
        "unk_id": tok.unk_token_id,
        "prompts": entries,
    }
    with open(os.path.join(path, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)


# ---------------------------------------------------------------------------------------------
# full tokenizer + tricky prompts
# ---------------------------------------------------------------------------------------------

TRICKY_PROMPTS = [
    "",
    " ",
    "a",
    "A",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "a photo of an astronaut riding a horse on mars",
    "  leading and trailing spaces  ",
    "multiple     spaces    between   words",
    "tabs\tand\tnewlines\nin\r\nthe prompt",
    "punctuation!!! what?? yes... (parentheses) [brackets] {braces}",
    "a, b; c: d - e — f – g",
    "masterpiece, best quality, ((ultra-detailed)), (illustration:1.2), [[sketch]]",
    "it's a dog's life, isn't it? we're here, you've seen, I'm sure, they'll go, he'd say",
    "IT'S LOUD, DON'T SHOUT",
    "rock 'n' roll ''quoted'' \"double quoted\"",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 12345678",
    "3.14159 2,718 1e-6 50% $100 #1 @home",
    "8k uhd, 4k, 1080p, 35mm f/1.8, iso 100",
    "café naïve résumé façade jalapeño",
    "CAFÉ NAÏVE RÉSUMÉ",
    "e\u0301 composed vs é precomposed",
    "straße groß Ärger Öl Übel",
    "ångström æther œuvre ø",
    "東京の夜景、ネオンライト",
    "一只猫坐在窗台上",
    "한국어 프롬프트 테스트",
    "привет мир, красивый пейзаж",
    "γειά σου κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "हिन्दी पाठ",
    "ภาษาไทย",
    "emoji 😀 🐱 🚀 🌈 ❤️ 👍🏽 👨‍👩‍👧",
    "flags 🇯🇵 🇫🇷 and symbols ™ © ® ° ± × ÷ µ",
    "html entities &amp; &lt;tag&gt; &quot;quote&quot; &#39; &nbsp;",
    "<b>bold</b> <i>italic</i> <br/>",
    "https://example.com/path?query=1&x=y#frag",
    "www.example.org/image_01.png user@example.com",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
    "c++ c# .net node.js",
    "x^2 + y^2 = z^2, a*b/c, 1<2>0",
    "~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./",
    "<|startoftext|> special tokens in text <|endoftext|>",
    "<|endoftext|>",
    "!",
    "!!!!!!!!",
    "....",
    "a" * 100,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaa bbbbbbbbbbbb cccccccccccc",
    " ".join(["word"] * 90),
    " ".join(f"token{i}" for i in range(60)),
    "a highly detailed digital painting of a futuristic city at sunset, with flying cars, "
    "neon lights, towering skyscrapers, bustling streets full of people, reflections on wet "
    "pavement, volumetric lighting, cinematic composition, trending on artstation, by greg "
    "rutkowski and alphonse mucha, octane render, unreal engine 5, 8k resolution, sharp focus",
    "portrait of a woman, (freckles:1.3), red hair, green eyes, soft light, bokeh, 85mm",
    "Mixed CASE WiTh DiGiTs 123abc ABC123 a1b2c3",
    "non\u00a0breaking\u00a0space and zero\u200bwidth",
    "full-width ＡＢＣ１２３ and ｶﾀｶﾅ",
    "ligatures ﬁ ﬂ and roman numerals Ⅻ ⅻ",
    "math 𝔸𝔹ℂ 𝒳 ∑∫∂√∞≈≠",
    "control\u0007chars\u0001here",
    "trailing newline\n",
    "dog 's cat 't",
    "o'clock rock'n'roll y'all",
    "the the the the the the the the the the the the the the the the the the the the the the "
    "the the the the the the the the the the the the the the the the the the the the the the "
    "the the the the the the the the the the the the the the the the the the the the the the",
]


def make_clip_full(merges):
    path = fresh_dir("clip-tokenizer-full")
    tok_sd1 = write_clip_tokenizer(path, merges, EOT)
    sd2_dir = os.path.join(OUT, ".tmp-sd2-tokenizer")
    if os.path.exists(sd2_dir):
        shutil.rmtree(sd2_dir)
    tok_sd2 = write_clip_tokenizer(sd2_dir, merges, "!")
    try:
        import ftfy  # noqa: F401

        has_ftfy = True
    except ImportError:
        has_ftfy = False
    entries = []
    for text in TRICKY_PROMPTS:
        ids_sd1 = tok_sd1(text, padding="max_length", max_length=77, truncation=True).input_ids
        ids_sd2 = tok_sd2(text, padding="max_length", max_length=77, truncation=True).input_ids
        full = tok_sd1(text, truncation=False).input_ids
        assert len(ids_sd1) == 77 and len(ids_sd2) == 77
        entries.append(
            {"text": text, "ids_sd1": ids_sd1, "ids_sd2": ids_sd2, "ids_unpadded": full}
        )
    shutil.rmtree(sd2_dir)
    doc = {
        "description": "CLIPTokenizer ids for tricky prompts. ids_sd1: padding='max_length', "
        "max_length=77, truncation=True, pad token <|endoftext|> (SD1). ids_sd2: same with pad "
        "token '!' (id 0, SD2/SDXL tokenizer_2). ids_unpadded: no padding, no truncation, with "
        "<|startoftext|> ... <|endoftext|>.",
        "transformers": transformers.__version__,
        "tokenizer_backend": "tokenizers (transformers 5 CLIPTokenizer has no slow Python "
        "implementation: NFC, \\s+ -> ' ', lowercase, CLIP split regex, byte-level BPE)",
        "ftfy": has_ftfy,
        "max_length": 77,
        "bos_id": tok_sd1.bos_token_id,
        "eos_id": tok_sd1.eos_token_id,
        "pad_id_sd1": tok_sd1.pad_token_id,
        "pad_id_sd2": tok_sd2.pad_token_id,
        "prompts": entries,
    }
    with open(os.path.join(path, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)


README = """# Model fixtures

Generated by `scripts/make_model_fixtures.py` (diffusers 0.42.1, transformers 5.24.0, torch 2.15,
CPU, float32, seeded). Do not edit by hand; rerun the script.

All random models have every constant-initialised parameter (norm weights/biases, zero biases)
perturbed with small noise so that mapping mistakes show up numerically.

## reference.safetensors keys

U-Net (`unet.` prefix in pipeline folders; same prefix in the unet-* folders):
- `unet.sample` [2, C_in, 8, 8], `unet.encoder_hidden_states` [2, 7, cross_attention_dim]
- `unet.timestep_a` [1] = 981 (one timestep broadcast over the batch) -> `unet.out_a`
- `unet.timesteps_b` [2] = (10.5, 500.25) (one per batch element) -> `unet.out_b`
- optional inputs used in both calls: `unet.class_labels` [2] i64 (classcond),
  `unet.timestep_cond` [2, 32] (lcm), `unet.text_embeds` [2, 32] and `unet.time_ids` [2, 6]
  (sdxl `added_cond_kwargs`)

VAE (`vae.`): `vae.image` [1, 3, 32, 32] in [-1, 1] -> `vae.latent_mean`, `vae.latent_logvar`
(the DiagonalGaussianDistribution's mean and clamped logvar, after quant_conv);
`vae.latent` [1, 4, 8, 8] -> `vae.decoded` (post_quant_conv + decoder).

Text encoders (`text_encoder.`, `text_encoder_2.`): `input_ids` [2, 77] i64 from the fixture's
tokenizer for the prompts in the safetensors metadata `text_encoder.prompts` (JSON list) ->
`last_hidden_state` (after final_layer_norm), `hidden_states_penultimate` (= hidden_states[-2],
before final_layer_norm: the SD "clip skip" input), `pooler_output` (CLIPTextModel),
`text_embeds` (CLIPTextModelWithProjection).

T5 (`t5-tiny`): `input_ids` [2, 40] i64, `attention_mask` [2, 40] i64 (row 1 padded after 26)
-> `last_hidden_state`; `last_hidden_state_no_mask` is the same ids without a mask.

## Folders

- `sd1-tiny/`: StableDiffusionPipeline, SD1 layout; UNet (32, 64) layers_per_block 1, heads 8,
  GroupNorm 32; VAE (32, 64) (2x downsampling); CLIP text (hidden 32, 3 layers, quick_gelu, legacy
  eos id 2 -> argmax pooling); tokenizer with the first 486 real CLIP merges (vocab 1000, pad
  <|endoftext|>); PNDMScheduler with SD1.5's config. All float32.
- `sd2-tiny/`: SD2 layout: UNet (16, 32), attention_head_dim (2, 4), use_linear_projection,
  upcast_attention, GroupNorm 8, saved in **float16** (reference computed in f32 from the
  f16-rounded weights); VAE (16, 32) GroupNorm 8; CLIP text gelu, eos_token_id 999 (pooling at the
  first eos), **sharded** (model.safetensors.index.json); tokenizer pad "!"; DDIMScheduler
  v_prediction.
- `unet-sdxl-tiny/`: StableDiffusionXLPipeline: UNet (8, 16) GroupNorm 4, DownBlock2D +
  CrossAttnDownBlock2D,
  transformer_layers_per_block (1, 2), text_time addition (addition_time_embed_dim 8, projection
  input 32 + 48 = 80), cross_attention_dim 64 (= 32 + 32, both encoders' penultimate states
  concatenated); text_encoder (quick_gelu, pad eos) and text_encoder_2 (CLIPTextModelWithProjection,
  gelu, pad "!"); VAE (8, 16) GroupNorm 4 scaling 0.13025; EulerDiscreteScheduler.
- `unet-classcond-tiny/unet`: UNet (8, 16), layers_per_block 2, num_class_embeds 10
  (`class_embedding` nn.Embedding), GroupNorm 4.
- `unet-lcm-tiny/`: UNet (8, 16) with time_cond_proj_dim 32 (`time_embedding.cond_proj`); LCMScheduler.
- `unet-inpaint-tiny/unet`: UNet (8, 16) with in_channels 9, **sharded**
  (diffusion_pytorch_model.safetensors.index.json).
- `t5-tiny/`: T5EncoderModel, d_model 32, d_kv 8, heads 4, d_ff 37, 2 layers, gated-gelu
  (dense_act_fn gelu_new), 32 buckets, max distance 128, vocab 1000.
  `t5-tiny/tokenizer/`: a tiny sentencepiece unigram T5Tokenizer (nmt_nfkc, 900 pieces + 100
  `<extra_id_N>`; spiece.model and transformers' tokenizer.json) and `prompts.json` with its ids.
- `clip-tokenizer-full/`: the full real CLIP vocabulary (49408 tokens) and `prompts.json`.
"""


def main():
    os.makedirs(OUT, exist_ok=True)
    merges = real_clip_merges()
    assert len(merges) == 48894
    make_sd1(merges)
    make_sd2(merges)
    make_sdxl(merges)
    make_classcond()
    make_lcm()
    make_inpaint()
    make_sd1_extra()
    make_t5()
    make_t5_tokenizer(merges)
    make_clip_full(merges)
    with open(os.path.join(OUT, "README.md"), "w", encoding="utf-8") as f:
        f.write(README + SD1_EXTRA_README)
    print("fixtures written to", OUT)


# ---------------------------------------------------------------------------------------------
# extra cases on the sd1-tiny weights (added for the U-Net/VAE parity tests)
# ---------------------------------------------------------------------------------------------

SD1_EXTRA_README = """
## sd1-tiny-extra/reference.safetensors

Extra cases computed with the **sd1-tiny** U-Net and VAE weights (no weights of its own):

- `unet.sample` [1, 4, 9, 7] (not a multiple of the U-Net's downsampling factor, so diffusers
  passes `upsample_size` to the upsamplers), `unet.encoder_hidden_states` [1, 7, 32],
  `unet.timestep` [1] = 500 -> `unet.out`.
- VAE tiling (`enable_tiling()` with `tile_sample_min_size` 16, `tile_latent_min_size` 8,
  overlap 0.25; the sizes are in the metadata): `vae.tiled_image` [1, 3, 40, 36] ->
  `vae.tiled_latent_mean`, `vae.tiled_latent_logvar` (tiled encode, ragged last tiles);
  `vae.tiled_latent` [1, 4, 20, 18] -> `vae.tiled_decoded` (tiled decode).
"""


@torch.no_grad()
def make_sd1_extra():
    sd1 = os.path.join(OUT, "sd1-tiny")
    path = fresh_dir("sd1-tiny-extra")
    gen = torch.Generator().manual_seed(4242)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(sd1, "unet")).eval()
    sample = randn(gen, 1, unet.config.in_channels, 9, 7)
    ehs = randn(gen, 1, SEQ, unet.config.cross_attention_dim)
    t = torch.tensor([500.0])
    out = unet(sample, t, encoder_hidden_states=ehs).sample
    ref = {
        "unet.sample": sample,
        "unet.encoder_hidden_states": ehs,
        "unet.timestep": t,
        "unet.out": out,
    }

    vae = AutoencoderKL.from_pretrained(os.path.join(sd1, "vae")).eval()
    vae.enable_tiling()
    vae.tile_sample_min_size = 16
    vae.tile_latent_min_size = 8
    vae.tile_overlap_factor = 0.25
    image = torch.rand(1, 3, 40, 36, generator=gen) * 2.0 - 1.0
    dist = vae.encode(image).latent_dist
    latent = randn(gen, 1, vae.config.latent_channels, 20, 18)
    decoded = vae.decode(latent).sample
    assert dist.mean.shape[-2:] == (20, 18) and decoded.shape[-2:] == (40, 36)
    ref.update(
        {
            "vae.tiled_image": image,
            "vae.tiled_latent_mean": dist.mean,
            "vae.tiled_latent_logvar": dist.logvar,
            "vae.tiled_latent": latent,
            "vae.tiled_decoded": decoded,
        }
    )
    save_reference(
        path,
        {k: f32(v) for k, v in ref.items()},
        {
            "vae.tile_sample_min_size": "16",
            "vae.tile_latent_min_size": "8",
            "vae.tile_overlap_factor": "0.25",
        },
    )


if __name__ == "__main__":
    main()
