"""The `minidiff` command line (also `python -m minidiff`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parse_dtype(name: str):
    import torch

    dtypes = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
              "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise SystemExit(f"minidiff: unknown --dtype {name!r} (choose from {', '.join(dtypes)})")
    return dtypes[name]


def _save_images(images, output: str) -> list[Path]:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        paths = [out]
    else:
        paths = [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def cmd_ddpm(args: argparse.Namespace) -> int:
    import torch

    from .pipelines import DDPMPipeline
    from .schedulers import SCHEDULERS

    pipe = DDPMPipeline.from_pretrained(args.model, local_files_only=args.local_files_only)
    if args.scheduler:
        pipe.scheduler = SCHEDULERS[args.scheduler].from_config(pipe.scheduler.config)
    pipe.to(args.device, _parse_dtype(args.dtype))
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(batch_size=args.num_images, generator=generator, num_inference_steps=args.steps).images
    for path in _save_images(images, args.output):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .schedulers import SCHEDULERS

    parser = argparse.ArgumentParser(prog="minidiff", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ddpm", help="unconditional images from a DDPM UNet2DModel pipeline folder or Hub id")
    p.add_argument("model", help="pipeline folder or Hub id (e.g. google/ddpm-cat-256)")
    p.add_argument("--steps", type=int, default=1000, help="number of denoising steps (default 1000)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="swap in another scheduler (from_config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument("--local-files-only", action="store_true", help="never contact the Hub")
    p.add_argument("--output", default="ddpm.png", help="PNG path; several images get -0, -1, ... suffixes")
    p.set_defaults(func=cmd_ddpm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
