#!/usr/bin/env python3
"""Reference outputs of diffusers' Stable Diffusion pipelines on the tiny fixture models.

Runs StableDiffusionPipeline (text-to-image), StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline on diffusion-models/tests/fixtures/{sd1-tiny,sd2-tiny}
(and sd1-tiny with the 9-channel unet-inpaint-tiny U-Net) with fixed latents, and records
every random draw diffusers makes (VAE posterior sampling, img2img noising, ancestral
sampler noise) so the Rust pipeline can replay them exactly.

Writes diffusion-pipelines/tests/fixtures/pipelines.json (the cases: prompts, scheduler,
steps, guidance, latents, recorded noise, init image, mask) and
diffusion-pipelines/tests/fixtures/pipelines.safetensors (each case's output images, float32
[batch, H, W, 3] in [0, 1], diffusers' output_type="np").

With --precision it writes instead diffusion-pipelines/tests/fixtures/precision.{json,safetensors}:
three text-to-image cases (sd1-tiny DPM-Solver++, sd2-tiny DDIM v-prediction, unet-sdxl-tiny
Euler) each run in float32 and in the Rust pipeline's reduced-precision policy
(`Precision::half`) for float16 and bfloat16: U-Net and text encoder(s) in the low dtype, the
VAE, the latents, the sampler and the guidance arithmetic in float32, every attention
computed in float32 (see mixed_precision()). The Rust test (tests/precision.rs) bounds its
own f16/bf16 error by the error PyTorch's run of the same policy shows against float32.

Requirements: pip install diffusers==0.42.1 transformers==5.24.0 torch numpy safetensors
Usage: python3 scripts/pipeline_reference.py [--precision]
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "diffusion-models", "tests", "fixtures")
OUT = os.path.join(ROOT, "diffusion-pipelines", "tests", "fixtures")

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "pndm": PNDMScheduler,
}

# ---------------------------------------------------------------------------------------
# Record every randn_tensor call diffusers makes, drawing from a seeded numpy generator.
# ---------------------------------------------------------------------------------------
_original_randn = diffusers.utils.torch_utils.randn_tensor
_draws = []
_rng = np.random.default_rng(0)


def _recording_randn(shape, generator=None, device=None, dtype=None, layout=None):
    values = _rng.standard_normal(size=tuple(shape))
    _draws.append(values.astype(np.float64).ravel().tolist())
    return torch.tensor(values, dtype=dtype or torch.float32, device=device)


def _patch_randn():
    for name, module in list(sys.modules.items()):
        if name.startswith("diffusers") and getattr(module, "randn_tensor", None) is _original_randn:
            module.randn_tensor = _recording_randn


def _reset_draws(seed):
    global _rng
    _rng = np.random.default_rng(seed)
    _draws.clear()


def init_image(h, w):
    """A smooth procedural RGB image in [0, 1], [1, 3, h, w]."""
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.stack([0.5 + 0.4 * np.sin(6 * x), 0.5 + 0.4 * np.cos(5 * y), x * y], axis=0)
    return torch.tensor(img[None], dtype=torch.float32)


def mask_image(h, w):
    """1 = repaint: the right half, [1, 1, h, w]."""
    m = np.zeros((1, 1, h, w), dtype=np.float32)
    m[..., w // 2 :] = 1.0
    return torch.tensor(m)


def main():
    torch.set_grad_enabled(False)
    cases = []
    outputs = {}

    def run(name, pipe, kind, scheduler, seed, **kw):
        pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
        _patch_randn()
        _reset_draws(seed)
        gen = torch.Generator().manual_seed(seed)
        args = dict(kw)
        latents = args.pop("latents", None)
        extra = {}
        if latents is not None:
            extra["latents"] = torch.tensor(latents, dtype=torch.float32)
        if kind == "img2img":
            extra["image"] = init_image(args["height"], args["width"])
        if kind == "inpaint":
            extra["image"] = init_image(args["height"], args["width"])
            extra["mask_image"] = mask_image(args["height"], args["width"])
        call = {k: v for k, v in args.items() if not (kind == "img2img" and k in ("height", "width"))}
        images = pipe(generator=gen, output_type="np", **call, **extra).images
        outputs[name] = torch.tensor(np.asarray(images, dtype=np.float32)).contiguous()
        case = {"name": name, "kind": kind, "scheduler": scheduler, "noise": [list(d) for d in _draws]}
        case.update({k: v for k, v in kw.items()})
        if kind in ("img2img", "inpaint"):
            case["init_image"] = extra["image"].numpy().ravel().tolist()
        if kind == "inpaint":
            case["mask"] = extra["mask_image"].numpy().ravel().tolist()
        cases.append(case)
        print(f"{name}: {outputs[name].shape} draws={len(_draws)}", flush=True)

    for model in ("sd1-tiny", "sd2-tiny"):
        path = os.path.join(MODELS, model)
        pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        vsf = pipe.vae_scale_factor
        h = w = pipe.unet.config.sample_size * vsf
        lat_shape = (1, 4, h // vsf, w // vsf)
        rng = np.random.default_rng(1234)
        latents1 = rng.standard_normal(lat_shape).astype(np.float32)
        latents2 = rng.standard_normal((2,) + lat_shape[1:]).astype(np.float32)
        base = dict(height=h, width=w, num_inference_steps=4)
        prompt = "a red circle on a blue background"
        neg = "blurry, low quality"
        for sched in SCHEDULERS:
            run(f"{model}/txt2img/{sched}/cfg7.5-neg", pipe, "txt2img", sched, 10,
                prompt=prompt, negative_prompt=neg, guidance_scale=7.5, latents=latents1.tolist(), **base)
        for sched in ("ddim", "dpm++2m"):
            run(f"{model}/txt2img/{sched}/cfg1", pipe, "txt2img", sched, 11,
                prompt=prompt, guidance_scale=1.0, latents=latents1.tolist(), **base)
            run(f"{model}/txt2img/{sched}/cfg7.5", pipe, "txt2img", sched, 12,
                prompt=prompt, guidance_scale=7.5, latents=latents1.tolist(), **base)
        run(f"{model}/txt2img/euler-a/two-prompts", pipe, "txt2img", "euler-a", 13,
            prompt=[prompt, "a small green square in the top left"], negative_prompt=[neg, ""],
            guidance_scale=7.5, latents=latents2.tolist(), **base)
        run(f"{model}/txt2img/ddim/eta1-two-images", pipe, "txt2img", "ddim", 14,
            prompt=prompt, num_images_per_prompt=2, guidance_scale=5.0, eta=1.0,
            latents=latents2.tolist(), **base)
        # diffusers 0.42.1's clip_skip path reads `text_encoder.text_model`, which transformers 5
        # no longer has; compute the clip-skipped embeddings as diffusers defines them
        # (hidden_states[-(clip_skip + 1)] followed by the final layer norm) and pass them in.
        ids = pipe.tokenizer([prompt, ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        enc = pipe.text_encoder(ids, output_hidden_states=True)
        skipped = pipe.text_encoder.final_layer_norm(enc.hidden_states[-(1 + 1)])
        run(f"{model}/txt2img/dpm++2m/rescale0.7-clipskip1", pipe, "txt2img", "dpm++2m", 15,
            prompt_embeds=skipped[:1], negative_prompt_embeds=skipped[1:], guidance_scale=7.5,
            guidance_rescale=0.7, latents=latents1.tolist(), **base)
        cases[-1].pop("prompt_embeds")
        cases[-1].pop("negative_prompt_embeds")
        cases[-1].update(prompt=prompt, negative_prompt="", clip_skip=1)

        img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
        img2img.set_progress_bar_config(disable=True)
        for sched in ("ddim", "euler-a"):
            run(f"{model}/img2img/{sched}/s0.6", img2img, "img2img", sched, 20,
                prompt=prompt, negative_prompt=neg, guidance_scale=7.5, strength=0.6,
                height=h, width=w, num_inference_steps=5)

        inpaint = StableDiffusionInpaintPipeline(**pipe.components)
        inpaint.set_progress_bar_config(disable=True)
        run(f"{model}/inpaint-blend/ddim", inpaint, "inpaint", "ddim", 30,
            prompt=prompt, guidance_scale=7.5, strength=1.0, latents=latents1.tolist(), **base)

    # 9-channel inpainting U-Net with sd1-tiny's other components.
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(MODELS, "sd1-tiny"), torch_dtype=torch.float32, safety_checker=None)
    unet9 = UNet2DConditionModel.from_pretrained(os.path.join(MODELS, "unet-inpaint-tiny", "unet"), torch_dtype=torch.float32)
    comps = dict(pipe.components)
    comps["unet"] = unet9
    inpaint9 = StableDiffusionInpaintPipeline(**comps)
    inpaint9.set_progress_bar_config(disable=True)
    vsf = inpaint9.vae_scale_factor
    h = w = unet9.config.sample_size * vsf
    lat = np.random.default_rng(99).standard_normal((1, 4, h // vsf, w // vsf)).astype(np.float32)
    run("sd1-tiny+unet9/inpaint/ddim", inpaint9, "inpaint", "ddim", 31,
        prompt="a red circle on a blue background", guidance_scale=7.5, strength=1.0,
        latents=lat.tolist(), height=h, width=w, num_inference_steps=4)

    # SDXL: two text encoders, pooled text embeddings and size conditioning.
    xl = StableDiffusionXLPipeline.from_pretrained(os.path.join(MODELS, "unet-sdxl-tiny"), torch_dtype=torch.float32)
    xl.set_progress_bar_config(disable=True)
    vsf = xl.vae_scale_factor
    h = w = xl.unet.config.sample_size * vsf
    lat = np.random.default_rng(7).standard_normal((1, 4, h // vsf, w // vsf)).astype(np.float32)
    for sched in ("euler", "ddim"):
        run(f"unet-sdxl-tiny/txt2img/{sched}/cfg5-neg", xl, "txt2img", sched, 40,
            prompt="a red circle on a blue background", negative_prompt="blurry", guidance_scale=5.0,
            latents=lat.tolist(), height=h, width=w, num_inference_steps=4)
    run("unet-sdxl-tiny/txt2img/euler/cfg5-zero-negative", xl, "txt2img", "euler", 41,
        prompt="a red circle on a blue background", guidance_scale=5.0,
        latents=lat.tolist(), height=h, width=w, num_inference_steps=4)

    os.makedirs(OUT, exist_ok=True)
    meta = {"diffusers_version": diffusers.__version__, "torch_version": torch.__version__, "cases": cases}
    with open(os.path.join(OUT, "pipelines.json"), "w") as f:
        json.dump(meta, f)
    save_file(outputs, os.path.join(OUT, "pipelines.safetensors"))
    print("wrote", len(cases), "cases")


# ---------------------------------------------------------------------------------------
# Reduced precision: the Rust pipeline's Precision::half policy, reproduced in diffusers.
# ---------------------------------------------------------------------------------------
_original_sdpa = torch.nn.functional.scaled_dot_product_attention


def _sdpa_in_f32(query, key, value, *args, **kwargs):
    """Attention computed in float32 for half-precision inputs, cast back (the Rust models
    upcast CLIP's attention always and the U-Net's with Precision::attention_f32)."""
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):
        out = _original_sdpa(query.float(), key.float(), value.float(), *args, **kwargs)
        return out.to(dtype)
    return _original_sdpa(query, key, value, *args, **kwargs)


def mixed_precision(pipe, dtype):
    """Casts the U-Net and the text encoder(s) to `dtype`; the VAE stays float32. Hooks make
    the U-Net take float32 inputs (cast to `dtype` on entry, except the timestep, whose
    sinusoidal embedding diffusers computes in float32 anyway) and return float32, so the
    latents, the sampler and the guidance stay in float32, as in the Rust pipeline."""
    pipe.unet.to(dtype)
    pipe.text_encoder.to(dtype)
    if getattr(pipe, "text_encoder_2", None) is not None:
        pipe.text_encoder_2.to(dtype)

    def cast(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.to(dtype)
        if isinstance(x, dict):
            return {k: cast(v) for k, v in x.items()}
        return x

    def pre(module, args, kwargs):
        args = list(args)
        args[0] = cast(args[0])
        kwargs = {k: (v if k == "timestep" else cast(v)) for k, v in kwargs.items()}
        return tuple(args), kwargs

    def post(module, args, kwargs, output):
        if isinstance(output, tuple):
            return tuple(o.float() if isinstance(o, torch.Tensor) else o for o in output)
        output.sample = output.sample.float()
        return output

    handles = [
        pipe.unet.register_forward_pre_hook(pre, with_kwargs=True),
        pipe.unet.register_forward_hook(post, with_kwargs=True),
    ]
    return handles


def main_precision():
    torch.set_grad_enabled(False)
    torch.nn.functional.scaled_dot_product_attention = _sdpa_in_f32
    cases = []
    outputs = {}
    specs = [
        ("sd1-tiny", StableDiffusionPipeline, "dpm++2m", 7.5, "blurry, low quality", 1234),
        ("sd2-tiny", StableDiffusionPipeline, "ddim", 7.5, "blurry, low quality", 1234),
        ("unet-sdxl-tiny", StableDiffusionXLPipeline, "euler", 5.0, "blurry", 7),
    ]
    prompt = "a red circle on a blue background"
    for model, cls, sched, guidance, neg, lat_seed in specs:
        for dtype_name, dtype in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
            kwargs = {"safety_checker": None} if cls is StableDiffusionPipeline else {}
            pipe = cls.from_pretrained(os.path.join(MODELS, model), torch_dtype=torch.float32, **kwargs)
            pipe.set_progress_bar_config(disable=True)
            pipe.scheduler = SCHEDULERS[sched].from_config(pipe.scheduler.config)
            if dtype != torch.float32:
                mixed_precision(pipe, dtype)
            vsf = pipe.vae_scale_factor
            h = w = pipe.unet.config.sample_size * vsf
            lat = np.random.default_rng(lat_seed).standard_normal((1, 4, h // vsf, w // vsf)).astype(np.float32)
            _patch_randn()
            _reset_draws(50)
            images = pipe(prompt=prompt, negative_prompt=neg, guidance_scale=guidance, height=h, width=w,
                          num_inference_steps=4, latents=torch.tensor(lat), output_type="np",
                          generator=torch.Generator().manual_seed(50)).images
            name = f"{model}/txt2img/{sched}/{dtype_name}"
            outputs[name] = torch.tensor(np.asarray(images, dtype=np.float32)).contiguous()
            cases.append({"name": name, "model": model, "dtype": dtype_name, "scheduler": sched,
                          "prompt": prompt, "negative_prompt": neg, "guidance_scale": guidance,
                          "num_inference_steps": 4, "height": h, "width": w,
                          "latents": lat.tolist(), "noise": [list(d) for d in _draws]})
            print(f"{name}: {outputs[name].shape} draws={len(_draws)}", flush=True)
    torch.nn.functional.scaled_dot_product_attention = _original_sdpa
    os.makedirs(OUT, exist_ok=True)
    meta = {"diffusers_version": diffusers.__version__, "torch_version": torch.__version__, "cases": cases}
    with open(os.path.join(OUT, "precision.json"), "w") as f:
        json.dump(meta, f)
    save_file(outputs, os.path.join(OUT, "precision.safetensors"))
    print("wrote", len(cases), "cases")


if __name__ == "__main__":
    if "--precision" in sys.argv[1:]:
        main_precision()
    else:
        main()
