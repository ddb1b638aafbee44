#!/usr/bin/env python3
"""Check that a folder exported by `diffusion train` (or
`diffusion_pipelines::train::export::export_pipeline`) is a valid diffusers pipeline.

Loads the folder with diffusers' `StableDiffusionPipeline.from_pretrained` (strictly: any
missing or unexpected weight is an error), checks every component's class, parameter count and
that no weight was left at its random initialisation (every state-dict key of each component
must come from the files), then runs the pipeline on a prompt and writes the image.

With --latents FILE.npy (the initial latents, float32 [1, C, h, w]) and --compare-npy FILE.npy
(the `[1, H, W, 3]` array `diffusion generate --latents FILE.npy --output-npy FILE.npy` wrote for
the same prompt, steps and guidance with the model's own deterministic sampler), the script also
reports the largest difference between diffusers' image and ours.

Requirements: diffusers==0.42.1 transformers==5.24.0 torch (CPU is enough).

Usage:
    python3 scripts/check_export.py MODEL_DIR [--prompt TEXT] [--steps N] [--out image.png]
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file


def check_component_keys(model, folder, weights_name):
    """Every parameter/buffer the torch module persists must be in the file, and vice versa."""
    path = os.path.join(folder, weights_name)
    index = path + ".index.json"
    if os.path.exists(index):  # sharded (diffusers' layout): read every shard
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(load_file(os.path.join(folder, shard)))
    else:
        tensors = load_file(path)
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    bad_shapes = sorted(k for k in set(state) & set(tensors) if tuple(state[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or bad_shapes:
        raise SystemExit(
            f"{path}: missing {missing[:5]} unexpected {unexpected[:5]} mis-shaped {bad_shapes[:5]}"
        )
    worst = max(float((state[k].float() - tensors[k].float()).abs().max()) for k in tensors)
    if worst != 0.0:
        raise SystemExit(f"{path}: loaded weights differ from the file by {worst}")
    return sum(t.numel() for t in tensors.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompt", default="a red circle on a white background")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="where to write the generated image (PNG)")
    ap.add_argument("--latents", default=None, help="initial latents (.npy, float32 [1, C, h, w])")
    ap.add_argument("--compare-npy", default=None, help="our [1, H, W, 3] output for the same inputs")
    args = ap.parse_args()

    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    print(f"loaded {args.model}: {type(pipe).__name__}")
    expected = {
        "unet": ("UNet2DConditionModel", "diffusion_pytorch_model.safetensors"),
        "vae": ("AutoencoderKL", "diffusion_pytorch_model.safetensors"),
        "text_encoder": ("CLIPTextModel", "model.safetensors"),
    }
    for name, (cls, weights) in expected.items():
        comp = getattr(pipe, name)
        if type(comp).__name__ != cls:
            raise SystemExit(f"{name} is a {type(comp).__name__}, expected {cls}")
        n = check_component_keys(comp, os.path.join(args.model, name), weights)
        print(f"  {name}: {cls}, {n} parameters, every weight from the file")
    print(f"  tokenizer: {type(pipe.tokenizer).__name__}, model_max_length {pipe.tokenizer.model_max_length}")
    print(f"  scheduler: {type(pipe.scheduler).__name__}, prediction_type {pipe.scheduler.config.prediction_type}")

    ids = pipe.tokenizer(args.prompt, padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length).input_ids
    print(f"  prompt ids: {ids}")

    generator = torch.Generator().manual_seed(args.seed)
    latents = torch.from_numpy(np.load(args.latents)) if args.latents else None
    with torch.no_grad():
        result = pipe(
            args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generator,
            latents=latents,
            output_type="np",
        )
    image = result.images[0]
    if not np.isfinite(image).all():
        raise SystemExit("the pipeline produced non-finite pixels")
    h, w, c = image.shape
    print(f"generated a {w}x{h} image: mean {image.mean():.4f}, std {image.std():.4f}")
    if args.out:
        from PIL import Image

        Image.fromarray((image * 255).round().clip(0, 255).astype(np.uint8)).save(args.out)
        print(f"wrote {args.out}")
    report = {"ok": True, "height": h, "width": w}
    if args.compare_npy:
        ours = np.load(args.compare_npy)[0]
        if ours.shape != image.shape:
            raise SystemExit(f"our image is {ours.shape}, diffusers' is {image.shape}")
        diff = float(np.abs(ours - image).max())
        print(f"max |ours - diffusers| = {diff:.3e} (pixel values in [0, 1])")
        report["max_abs_diff"] = diff
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
