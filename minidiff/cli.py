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


# short names for --scheduler (the class names work too)
SCHEDULER_ALIASES = {
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
}


def _scheduler_class(name: str):
    from .schedulers import SCHEDULERS

    cls = SCHEDULERS.get(SCHEDULER_ALIASES.get(name.lower(), name))
    if cls is None:
        raise SystemExit(f"minidiff: unknown --scheduler {name!r}; choose from {', '.join(SCHEDULER_ALIASES)} "
                         f"or a class name ({', '.join(sorted(SCHEDULERS))})")
    return cls


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .pipelines import StableDiffusionPipeline

    model = args.model
    if model is None:
        import minidiff

        model = getattr(minidiff, "DEFAULT_MODEL", None)
        if model is None:
            raise SystemExit("minidiff: no --model given and this install has no bundled default model")
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=args.local_files_only)
    if args.scheduler:
        pipe.scheduler = _scheduler_class(args.scheduler).from_config(pipe.scheduler.config)
    pipe.to(args.device, _parse_dtype(args.dtype))
    # a CPU generator: the same seed gives the same image as the Python API (and as diffusers)
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(
        args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        num_inference_steps=args.steps, guidance_scale=args.guidance, num_images_per_prompt=args.num_images,
        generator=generator,
    ).images
    for path in _save_images(images, args.output):
        print(path)
    return 0


def cmd_ddpm(args: argparse.Namespace) -> int:
    import torch

    from .pipelines import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(args.model, local_files_only=args.local_files_only)
    if args.scheduler:
        pipe.scheduler = _scheduler_class(args.scheduler).from_config(pipe.scheduler.config)
    pipe.to(args.device, _parse_dtype(args.dtype))
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(batch_size=args.num_images, generator=generator, num_inference_steps=args.steps).images
    for path in _save_images(images, args.output):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    scheduler_help = "swap in another scheduler (from_config): " + ", ".join(SCHEDULER_ALIASES) + " or a class name"
    parser = argparse.ArgumentParser(prog="minidiff", description="minidiff: Stable Diffusion / DDPM inference in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="text to image with a Stable Diffusion pipeline folder or Hub id",
                       epilog="schedulers: " + ", ".join(f"{k} ({v})" for k, v in SCHEDULER_ALIASES.items()))
    p.add_argument("prompt")
    p.add_argument("--model", help="pipeline folder or Hub id (default: the bundled model, if any)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; <= 1 turns it off")
    p.add_argument("--scheduler", help=scheduler_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument("--local-files-only", action="store_true", help="never contact the Hub")
    p.add_argument("--output", default="minidiff.png", help="PNG path; several images get -0, -1, ... suffixes")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("ddpm", help="unconditional images from a DDPM UNet2DModel pipeline folder or Hub id")
    p.add_argument("model", help="pipeline folder or Hub id (e.g. google/ddpm-cat-256)")
    p.add_argument("--steps", type=int, default=1000, help="number of denoising steps (default 1000)")
    p.add_argument("--scheduler", help=scheduler_help)
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
