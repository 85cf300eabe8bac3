"""python -m runners.triposr: reconstruct one image to a GLB, or write a seeded random checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image


def _on_gray(image: Image.Image) -> Image.Image:
    """The model expects RGB with the object on 0.5 gray: composite images that carry alpha."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        gray = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        return Image.alpha_composite(gray, rgba).convert("RGB")
    return image.convert("RGB")


def reconstruct(args: argparse.Namespace) -> int:
    from runners.triposr.inference import reconstruct_batch
    from runners.triposr.loading import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, device=device)
    [glb] = reconstruct_batch(model, [_on_gray(Image.open(args.image))], resolution=args.resolution,
                              threshold=args.threshold, size_m=args.size, precision=args.precision)
    if not glb:
        raise ValueError(f"no surface at density {args.threshold}: nothing to export (try a lower --threshold)")
    args.output.write_bytes(glb)
    print(f"{args.output}: {len(glb)} bytes")
    return 0


def init_random(args: argparse.Namespace) -> int:
    from runners.triposr.loading import write_random_checkpoint

    folder = write_random_checkpoint(args.directory, config=args.config, seed=args.seed)
    print(f"{folder}: {args.config} config, random weights (seed {args.seed})")
    return 0


def import_model(args: argparse.Namespace) -> int:
    from runners.triposr.store import import_model as put_in_store

    print(put_in_store(args.source))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.triposr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("reconstruct", help="image -> GLB in the delivery frame (Y up, metres)")
    rec.add_argument("image", type=Path)
    rec.add_argument("-o", "--output", type=Path, required=True)
    rec.add_argument("--model", default="stabilityai/TripoSR", help="folder, BentoML tag or Hugging Face repo id")
    rec.add_argument("--resolution", type=int, default=256, help="marching-cubes grid")
    rec.add_argument("--threshold", type=float, default=25.0, help="density iso-level")
    rec.add_argument("--size", type=float, default=0.5, help="largest side of the GLB, metres")
    rec.add_argument("--device", default=None, help="cuda if available, else cpu")
    rec.add_argument("--precision", choices=["auto", "fp32", "mixed", "bf16"], default="auto",
                     help="auto: mixed on a GPU, fp32 (the original's numbers) elsewhere; see precision.py")
    rec.set_defaults(run=reconstruct)
    ini = sub.add_parser("init-random", help="write config.yaml + model.ckpt with seeded random weights")
    ini.add_argument("directory", type=Path)
    ini.add_argument("--config", choices=["official", "tiny"], default="tiny")
    ini.add_argument("--seed", type=int, default=0)
    ini.set_defaults(run=init_random)
    imp = sub.add_parser("import-model", help="validate a checkpoint and put it in the BentoML model store; "
                                              "prints its tag triposr:<version>")
    imp.add_argument("source", help="Hugging Face repo id, a folder with config.yaml + model.ckpt, or a .ckpt "
                                    "with config.yaml beside it")
    imp.set_defaults(run=import_model)
    args = parser.parse_args(argv)
    from runners.triposr.loading import ModelLoadError

    try:
        return args.run(args)
    except (ModelLoadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
