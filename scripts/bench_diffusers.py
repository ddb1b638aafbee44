#!/usr/bin/env python3
"""PyTorch/diffusers side of the side-by-side Stable Diffusion 1.5 GPU benchmark.

Builds a Stable Diffusion 1.5-architecture pipeline with random weights (the published SD 1.5
configs; speed does not depend on the weights) and saves it as a diffusers folder that the
Rust loader reads as it is (`diffusion generate --model DIR`):

  DIR/model_index.json         StableDiffusionPipeline; safety_checker/feature_extractor null
  DIR/unet/                    UNet2DConditionModel (320, 640, 1280, 1280), 859.5M parameters
  DIR/vae/                     AutoencoderKL (128, 256, 512, 512), scaling_factor 0.18215
  DIR/text_encoder/            transformers CLIPTextModel (ViT-L/14 text tower, quick_gelu)
  DIR/tokenizer/               the four CLIP tokenizer files of models/shapes/tokenizer
                               (model_max_length set to 77)
  DIR/scheduler/               DPMSolverMultistepScheduler with SD 1.5's beta schedule

All weights are stored as float16 safetensors (half the disk; the Rust side converts dtypes on
load). Weights come from torch.manual_seed(0) on the CPU, so the same folder comes out on any
machine. --tiny makes a tiny model of the same structure instead (for a CPU smoke test).

--bench DIR loads the folder with StableDiffusionPipeline.from_pretrained for each of --dtypes
on --device, with diffusers' default attention processor (PyTorch SDPA), and times, after
warm-up calls (--warmup, default 3), with torch.cuda.synchronize() around every timed call:
  - the CLIP text encoder on 2x77 token ids,
  - one U-Net call on the classifier-free-guidance batch (2x4x(size/8)x(size/8), t = 500,
    encoder_hidden_states 2x77x768),
  - one VAE decode of 1x4x(size/8)x(size/8),
  - the whole text-to-image call (DPM-Solver++ 2M, guidance 7.5, output_type="np") for each of
    --steps,
  - the peak GPU memory of the whole 20-step call (max_memory_allocated, max_memory_reserved),
  - the first image in a new process: this script run again with the hidden flag
    --first-image DIR, which imports torch/diffusers, loads the pipeline, moves it to the
    device and makes one 20-step image; the parent times the whole subprocess and the child
    prints its own import, load, to-device and generate seconds.
It prints a Markdown table (component | input | dtype | mean ms | std ms; std is the
population standard deviation, as benches/src/lib.rs's `time`) and the memory and first-image
lines, and with --json PATH writes every number (with the torch/diffusers/transformers
versions, GPU name and date) to a JSON file. Nothing is downloaded: the script runs offline.
Without the `accelerate` package (the JSON records whether it is there), from_pretrained
initialises every weight before loading it, which adds to the load seconds.

Requirements: pip install torch diffusers==0.42.1 transformers safetensors numpy pillow
Usage (GPU machine, e.g. nvidia-h200):
  python3 scripts/bench_diffusers.py --make-model /tmp/sd15-random --bench /tmp/sd15-random \\
      --json $OUT/diffusers.json
  python3 scripts/bench_diffusers.py --bench DIR [--device cuda] [--dtypes fp16,fp32]
      [--size 512] [--steps 20,50] [--iters 10] [--pipeline-iters 3] [--json PATH]
and then the Rust side on the very same folder:
  cargo run --release --features cuda -p diffusion-examples --bin diffusion -- \\
      generate --model /tmp/sd15-random ...

CPU smoke test on a developer machine, in the git-ignored venv scripts/.venv (PyPI's torch
wheel runs on the CPU without a GPU):
  python3 -m venv scripts/.venv
  scripts/.venv/bin/pip install torch diffusers==0.42.1 transformers safetensors numpy pillow
  scripts/.venv/bin/python scripts/bench_diffusers.py --make-model /tmp/tiny --bench /tmp/tiny \\
      --tiny --device cpu --dtypes fp32 --size 64 --steps 2 --iters 1
"""

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

_T_START = time.perf_counter()  # before torch/diffusers are imported (first-image timing)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network on the GPU machine
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

_T_IMPORTED = time.perf_counter()

# Keep the output to the numbers: no progress bars, no info/deprecation chatter.
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "models", "shapes", "tokenizer")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
SEQ = 77  # CLIP context length (max_position_embeddings)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
FIRST_IMAGE_STEPS = 20
FIRST_IMAGE_TAG = "FIRST_IMAGE_JSON "

# ---------------------------------------------------------------------------------------------
# model configs
# ---------------------------------------------------------------------------------------------

# The published SD 1.5 configs (runwayml/stable-diffusion-v1-5, diffusers layout).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_CLIP = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=SEQ,
    hidden_act="quick_gelu",
    projection_dim=768,
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)

# Same structure, tiny sizes: for the CPU smoke test (--tiny).
TINY_UNET = dict(
    SD15_UNET,
    sample_size=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    cross_attention_dim=32,
)
TINY_VAE = dict(
    SD15_VAE,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    norm_num_groups=8,
    sample_size=64,
)
TINY_CLIP = dict(
    SD15_CLIP,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=32,
)


# ---------------------------------------------------------------------------------------------
# --make-model
# ---------------------------------------------------------------------------------------------


def load_tokenizer(tokenizer_dir):
    """The CLIP tokenizer from local files, padding to the 77-token CLIP context."""
    return CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=SEQ)


def write_tokenizer(dst, tokenizer_dir):
    """Replaces dst with the four tokenizer files of tokenizer_dir (the real checkpoints'
    layout: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json), with
    model_max_length set to 77 (models/shapes has 32), so that prompts pad to 77 tokens."""
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    for name in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(dst, name))
    path = os.path.join(dst, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["model_max_length"] = SEQ
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def make_model(out_dir, tiny, tokenizer_dir):
    """Builds the random-weight pipeline (seed 0, on the CPU) and saves it, float16, to out_dir."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
    tokenizer = load_tokenizer(tokenizer_dir)
    clip = CLIPTextConfig(
        **(TINY_CLIP if tiny else SD15_CLIP),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(clip)
    scheduler = DPMSolverMultistepScheduler(**SD15_SCHEDULER)
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
    pipe.to(torch.float16)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    write_tokenizer(os.path.join(out_dir, "tokenizer"), tokenizer_dir)

    params = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
    }
    size = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out_dir) for f in files
    )
    print(
        f"wrote {out_dir} ({'tiny' if tiny else 'SD 1.5'}, float16, {size / 2**20:.1f} MiB): "
        + ", ".join(f"{k} {v / 1e6:.1f}M params" for k, v in params.items())
    )
    for d, _, files in sorted(os.walk(out_dir)):
        for f in sorted(files):
            print("  " + os.path.relpath(os.path.join(d, f), out_dir))
    del pipe, unet, vae, text_encoder
    gc.collect()


# ---------------------------------------------------------------------------------------------
# --bench
# ---------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, iters, warmup):
    """Runs fn `warmup` times (the first timed on its own), then `iters` timed times, each
    between two synchronizes. Returns a dict of first-call, mean and (population) std ms."""
    first = None
    for i in range(warmup):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        if i == 0:
            first = (time.perf_counter() - t) * 1e3
    samples = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t) * 1e3)
    return {
        "first_ms": first,
        "mean_ms": statistics.fmean(samples),
        "std_ms": statistics.pstdev(samples),
        "iters": len(samples),
        "warmup": warmup,
        "samples_ms": samples,
    }


def load_pipeline(model_dir, dtype, device):
    """from_pretrained + .to(device); returns the pipeline and the two durations in s."""
    t = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, dtype=dtype, safety_checker=None, local_files_only=True
    )
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    pipe.to(device)
    sync(device)
    to_device_s = time.perf_counter() - t
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_s, to_device_s


def generate(pipe, prompt, steps, size, device):
    """The whole text-to-image call (returns the float32 [1, H, W, 3] image in [0, 1])."""
    gen = torch.Generator(device=device).manual_seed(0)
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=7.5,
        height=size,
        width=size,
        output_type="np",
        generator=gen,
    ).images


def bench_components(pipe, dtype_name, dtype, device, args):
    """CLIP text encoder, one U-Net call, one VAE decode; returns result rows."""
    rows = []
    lat = args.size // pipe.vae_scale_factor
    ctx_dim = pipe.unet.config.cross_attention_dim
    gen = torch.Generator().manual_seed(0)  # CPU generator: the same inputs on every device

    ids = pipe.tokenizer(
        [args.prompt, ""],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    with torch.inference_mode():
        r = time_calls(lambda: pipe.text_encoder(ids)[0], device, args.iters, args.warmup)
    rows.append(dict(component="CLIP text encoder", input=f"2x{ids.shape[1]} tokens", **r))

    latents = torch.randn(2, 4, lat, lat, generator=gen).to(device, dtype)
    context = torch.randn(2, SEQ, ctx_dim, generator=gen).to(device, dtype)
    timestep = torch.tensor(500, device=device)
    with torch.inference_mode():
        r = time_calls(
            lambda: pipe.unet(latents, timestep, encoder_hidden_states=context, return_dict=False)[
                0
            ],
            device,
            args.iters,
            args.warmup,
        )
    rows.append(
        dict(component="U-Net", input=f"2x4x{lat}x{lat}, t=500, ctx 2x{SEQ}x{ctx_dim}", **r)
    )

    z = torch.randn(1, 4, lat, lat, generator=gen).to(device, dtype)
    with torch.inference_mode():
        r = time_calls(
            lambda: pipe.vae.decode(z, return_dict=False)[0], device, args.iters, args.warmup
        )
    rows.append(
        dict(component="VAE decode", input=f"1x4x{lat}x{lat} -> {args.size}x{args.size}", **r)
    )
    for row in rows:
        row["dtype"] = dtype_name
    return rows


def bench_pipeline(pipe, dtype_name, device, args):
    """The whole text-to-image call for each of --steps (one warm-up, --pipeline-iters timed)."""
    rows = []
    for steps in args.steps:
        r = time_calls(
            lambda: generate(pipe, args.prompt, steps, args.size, device),
            device,
            args.pipeline_iters,
            1,
        )
        rows.append(
            dict(
                component=f"text-to-image, {steps} steps",
                input=f"1 prompt, CFG 7.5, {args.size}x{args.size}, DPM-Solver++ 2M",
                dtype=dtype_name,
                **r,
            )
        )
    return rows


def measure_memory(pipe, dtype_name, device, args):
    """Peak CUDA memory (MiB) of one whole 20-step text-to-image call (None on the CPU)."""
    if device.type != "cuda":
        return None
    steps = FIRST_IMAGE_STEPS
    gc.collect()
    torch.cuda.empty_cache()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    image = generate(pipe, args.prompt, steps, args.size, device)
    sync(device)
    return {
        "dtype": dtype_name,
        "steps": steps,
        "size": args.size,
        "max_memory_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
        "max_memory_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20,
        "weights_mib": sum(
            p.numel() * p.element_size()
            for m in (pipe.unet, pipe.vae, pipe.text_encoder)
            for p in m.parameters()
        )
        / 2**20,
        "image_finite": bool(np.isfinite(image).all()),
    }


def first_image_child(args):
    """Hidden --first-image mode: load, move to the device, make one 20-step image; print
    the seconds of each phase (and one JSON line for the parent)."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    t_main = time.perf_counter()
    pipe, load_s, to_device_s = load_pipeline(args.first_image, dtype, device)
    t = time.perf_counter()
    image = generate(pipe, args.prompt, FIRST_IMAGE_STEPS, args.size, device)
    sync(device)
    generate_s = time.perf_counter() - t
    out = {
        "dtype": args.dtype,
        "steps": FIRST_IMAGE_STEPS,
        "size": args.size,
        "import_s": _T_IMPORTED - _T_START,
        "load_s": load_s,
        "to_device_s": to_device_s,
        "generate_s": generate_s,
        "in_process_s": time.perf_counter() - _T_START,
        "setup_s": t_main - _T_IMPORTED,
        "image_shape": list(image.shape),
        "image_mean": float(np.nan_to_num(image).mean()),
        "image_finite": bool(np.isfinite(image).all()),
    }
    print(
        f"first image ({args.dtype}, {args.device}): import {out['import_s']:.2f} s, "
        f"load {load_s:.2f} s, to device {to_device_s:.2f} s, "
        f"generate {generate_s:.2f} s ({FIRST_IMAGE_STEPS} steps)"
    )
    print(FIRST_IMAGE_TAG + json.dumps(out), flush=True)


def bench_first_image(model_dir, dtype_name, args):
    """Runs this script in a new process with --first-image; returns the child's numbers plus
    the wall time of the whole subprocess seen from here."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--first-image",
        model_dir,
        "--dtype",
        dtype_name,
        "--device",
        args.device,
        "--size",
        str(args.size),
        "--prompt",
        args.prompt,
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall_s = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"first-image subprocess failed with exit code {proc.returncode}")
    child = None
    for line in proc.stdout.splitlines():
        if line.startswith(FIRST_IMAGE_TAG):
            child = json.loads(line[len(FIRST_IMAGE_TAG) :])
    if child is None:
        raise RuntimeError("first-image subprocess printed no result:\n" + proc.stdout)
    child["subprocess_wall_s"] = wall_s
    return child


def environment(device):
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        # without accelerate, from_pretrained initialises the weights before loading them
        "accelerate": importlib.util.find_spec("accelerate") is not None,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_mib"] = props.total_memory / 2**20
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["gpu"] = None
    return env


def print_table(rows):
    print("| component | input | dtype | mean ms | std ms |")
    print("| --- | --- | --- | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['component']} | {r['input']} | {r['dtype']} | {r['mean_ms']:.2f} | "
            f"{r['std_ms']:.2f} |"
        )


def bench(model_dir, args):
    device = torch.device(args.device)
    env = environment(device)
    print(
        f"# diffusers {env['diffusers']}, torch {env['torch']}, transformers "
        f"{env['transformers']} on {env['gpu'] or 'CPU'} ({env['date']})"
    )
    rows, memory, loads, attention = [], [], [], {}
    for name in args.dtypes:
        pipe, load_s, to_device_s = load_pipeline(model_dir, DTYPES[name], device)
        loads.append({"dtype": name, "load_s": load_s, "to_device_s": to_device_s})
        attention[name] = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
        rows += bench_components(pipe, name, DTYPES[name], device, args)
        rows += bench_pipeline(pipe, name, device, args)
        mem = measure_memory(pipe, name, device, args)
        if mem is not None:
            memory.append(mem)
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    first = []
    if not args.no_first_image:
        first = [bench_first_image(model_dir, name, args) for name in args.dtypes]

    print()
    print_table(rows)
    print()
    for m in memory:
        print(
            f"peak GPU memory, {m['steps']}-step {m['size']}x{m['size']} call, {m['dtype']}: "
            f"{m['max_memory_allocated_mib']:.0f} MiB allocated, "
            f"{m['max_memory_reserved_mib']:.0f} MiB reserved "
            f"(weights {m['weights_mib']:.0f} MiB)"
        )
    if device.type != "cuda":
        print("peak GPU memory: n/a (not a CUDA device)")
    for f in first:
        print(
            f"first image in a new process, {f['dtype']} ({f['steps']} steps, "
            f"{f['size']}x{f['size']}): {f['subprocess_wall_s']:.2f} s wall "
            f"(import {f['import_s']:.2f} s, load {f['load_s']:.2f} s, "
            f"to device {f['to_device_s']:.2f} s, generate {f['generate_s']:.2f} s)"
        )
    for name in args.dtypes:
        print(f"attention processors ({name}): {', '.join(attention[name])}")

    if args.json:
        result = {
            "tool": "diffusers",
            "script": "scripts/bench_diffusers.py",
            "model_dir": os.path.abspath(model_dir),
            "environment": env,
            "settings": {
                "device": args.device,
                "dtypes": args.dtypes,
                "size": args.size,
                "steps": args.steps,
                "iters": args.iters,
                "warmup": args.warmup,
                "pipeline_iters": args.pipeline_iters,
                "prompt": args.prompt,
                "guidance_scale": 7.5,
                "scheduler": "DPMSolverMultistepScheduler",
                "seed": 0,
            },
            "attention_processors": attention,
            "results": rows,
            "load": loads,
            "memory": memory,
            "first_image": first,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def int_list(s):
    return [int(v) for v in s.split(",") if v.strip()]


def dtype_list(s):
    names = [v.strip() for v in s.split(",") if v.strip()]
    for n in names:
        if n not in DTYPES:
            raise argparse.ArgumentTypeError(f"unknown dtype {n!r} (one of {', '.join(DTYPES)})")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="diffusers side of the SD 1.5 benchmark (see the module docstring)."
    )
    p.add_argument("--make-model", metavar="DIR", help="write the random-weight pipeline to DIR")
    p.add_argument("--tiny", action="store_true", help="with --make-model: a tiny model")
    p.add_argument(
        "--tokenizer",
        default=TOKENIZER_DIR,
        metavar="DIR",
        help="with --make-model: the CLIP tokenizer files to copy (models/shapes/tokenizer)",
    )
    p.add_argument(
        "--bench",
        metavar="DIR",
        nargs="?",
        const="",
        help="benchmark the pipeline folder DIR (bare --bench: the --make-model folder)",
    )
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--dtypes", type=dtype_list, default=["fp16", "fp32"], help="default fp16,fp32")
    p.add_argument("--size", type=int, default=512, help="image height and width (default 512)")
    p.add_argument("--steps", type=int_list, default=[20, 50], help="default 20,50")
    p.add_argument("--iters", type=int, default=10, help="timed calls per component (10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per component (3)")
    p.add_argument(
        "--pipeline-iters", type=int, default=3, help="timed text-to-image calls per --steps (3)"
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--no-first-image", action="store_true", help="skip the new-process run")
    p.add_argument("--json", metavar="PATH", help="write all numbers to PATH")
    # hidden: the first-image child process
    p.add_argument("--first-image", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bench == "":
        if not args.make_model:
            p.error("a bare --bench needs --make-model DIR")
        args.bench = args.make_model
    if not (args.make_model or args.bench or args.first_image):
        p.error("nothing to do: give --make-model DIR and/or --bench DIR")
    return args


def main():
    args = parse_args()
    if args.first_image:
        first_image_child(args)
        return
    if args.make_model:
        make_model(args.make_model, args.tiny, args.tokenizer)
    if args.bench:
        bench(args.bench, args)


if __name__ == "__main__":
    main()
