#!/usr/bin/env python3
"""The CLI parity check of examples/tests/cli.rs (`cli_matches_diffusers`), run with a CUDA
build of `diffusion` on a GPU machine, under several kernel choices.

For each deterministic text-to-image case of diffusion-pipelines/tests/fixtures/pipelines.json
(the tiny SD1/SD2 fixture models, diffusers' own latents), it runs
`diffusion generate --device cuda ... --latents L.npy --output-npy OUT.npy` once per kernel
choice and prints the largest absolute difference from diffusers' image (pixels in [0, 1];
the CPU test requires <= 1e-3).

Requirements: numpy, safetensors. Usage (repository root, CUDA machine):
  python3 scripts/cuda_cli_parity.py PATH/TO/diffusion [--choices "auto;--conv backend"] [--limit N]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "diffusion-pipelines", "tests", "fixtures")
MODELS = os.path.join(ROOT, "diffusion-models", "tests", "fixtures")
DEVICE = "cuda"
DETERMINISTIC = {"ddim", "euler", "dpm++2m", "unipc", "pndm"}


def cases():
    meta = json.load(open(os.path.join(FIXTURES, "pipelines.json")))
    for case in meta["cases"]:
        if (
            case["kind"] == "txt2img"
            and case["scheduler"] in DETERMINISTIC
            and isinstance(case.get("prompt"), str)
            and "eta" not in case
            and "clip_skip" not in case
        ):
            yield case


def run(binary, case, extra, tmp):
    latents = np.asarray(case["latents"], dtype=np.float32).reshape(
        1, 4, case["height"] // 2, case["width"] // 2
    )
    lat = os.path.join(tmp, "latents.npy")
    np.save(lat, latents)
    out = os.path.join(tmp, "out.npy")
    args = [
        binary, "generate", "--device", DEVICE,
        "--model", os.path.join(MODELS, case["name"].split("/")[0]),
        "--prompt", case["prompt"],
        "--scheduler", case["scheduler"],
        "--steps", str(case["num_inference_steps"]),
        "--guidance", json.dumps(case["guidance_scale"]),
        "--latents", lat,
        "--output", os.path.join(tmp, "out.png"),
        "--output-npy", out,
    ] + extra
    if isinstance(case.get("negative_prompt"), str):
        args += ["--negative-prompt", case["negative_prompt"]]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        return None, done.stderr.strip().splitlines()[-1:]
    return np.load(out), None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("binary")
    p.add_argument("--choices", default="auto;--conv backend --matmul backend",
                   help="kernel flag sets separated by ';' ('auto': no flags)")
    p.add_argument("--limit", type=int, default=0, help="at most N cases (0: all)")
    p.add_argument("--device", default="cuda", help="diffusion --device (default cuda)")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    expected = load_file(os.path.join(FIXTURES, "pipelines.safetensors"))
    choices = [c.strip() for c in args.choices.split(";")]
    print("| case | " + " | ".join(choices) + " |")
    print("| --- |" + " ---: |" * len(choices))
    worst = {c: 0.0 for c in choices}
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases()):
            if args.limit and i >= args.limit:
                break
            want = expected[case["name"]]
            row = []
            for c in choices:
                extra = [] if c == "auto" else c.split()
                got, err = run(args.binary, case, extra, tmp)
                if got is None:
                    row.append(f"failed: {err}")
                    continue
                diff = float(np.abs(got.reshape(want.shape) - want).max())
                worst[c] = max(worst[c], diff)
                row.append(f"{diff:.2e}")
            print(f"| {case['name']} | " + " | ".join(row) + " |", flush=True)
    print("| worst | " + " | ".join(f"{worst[c]:.2e}" for c in choices) + " |")


if __name__ == "__main__":
    sys.exit(main())
