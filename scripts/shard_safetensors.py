#!/usr/bin/env python3
"""Split a safetensors file into shards of at most --max-mb MB, in diffusers' sharded layout
(`NAME-00001-of-0000N.safetensors` + `NAME.safetensors.index.json`), tensors unchanged.

Used to keep every committed file of models/shapes under 5 MB:
    python3 scripts/shard_safetensors.py models/shapes/unet/diffusion_pytorch_model.safetensors
"""

import argparse
import json
import os

from safetensors.numpy import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--max-mb", type=float, default=4.0)
    args = ap.parse_args()
    tensors = load_file(args.file)
    limit = int(args.max_mb * 1e6)
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        n = tensors[key].nbytes
        if current and size + n > limit:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += n
    shards.append(current)
    stem = args.file[: -len(".safetensors")]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{os.path.basename(stem)}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(os.path.dirname(args.file), name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(args.file + ".index.json", "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    os.remove(args.file)
    print(f"{args.file}: {len(shards)} shards")


if __name__ == "__main__":
    main()
