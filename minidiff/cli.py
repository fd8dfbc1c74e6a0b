"""The `minidiff` command line (also `python -m minidiff`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parse_dtype(name: str):
    import torch

    dtypes = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
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
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def _scheduler_class(name: str):
    from .schedulers import SCHEDULERS

    cls = SCHEDULERS.get(SCHEDULER_ALIASES.get(name.lower(), name))
    if cls is None:
        raise SystemExit(
            f"minidiff: unknown --scheduler {name!r}; choose from {', '.join(SCHEDULER_ALIASES)} "
            f"or a class name ({', '.join(sorted(SCHEDULERS))})"
        )
    return cls


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from . import DEFAULT_MODEL
    from .pipelines import StableDiffusionPipeline

    model = args.model or DEFAULT_MODEL  # the bundled toy model: offline, 64x64, shapes
    pipe = StableDiffusionPipeline.from_pretrained(
        model, local_files_only=args.local_files_only or model == DEFAULT_MODEL
    )
    if args.scheduler:
        pipe.scheduler = _scheduler_class(args.scheduler).from_config(pipe.scheduler.config)
    pipe.to(args.device, _parse_dtype(args.dtype))
    # a CPU generator: the same seed gives the same image as the Python API (and as diffusers)
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
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


def cmd_convert(args: argparse.Namespace) -> int:
    """An LDM single file -> a diffusers folder, or a diffusers folder -> an LDM single file."""
    import torch

    from weights_conversion import ConversionError

    from .loading import CheckpointError
    from .pipelines import StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from .single_file import load_folder_models, load_pipeline, save_single_file, to_ldm_state_dict

    src, dst = Path(args.src), Path(args.dst)
    try:
        if src.is_dir():
            if dst.suffix not in (".safetensors", ".ckpt"):
                raise SystemExit(
                    f"minidiff convert: converting the folder {src} needs a DST ending in .safetensors or .ckpt"
                )
            save_single_file(to_ldm_state_dict(**load_folder_models(src)), dst, half=args.half)
        elif src.is_file():
            if dst.exists() and not dst.is_dir():
                raise SystemExit(f"minidiff convert: {dst} exists and is not a folder")
            # "auto": every model stays in its file's dtype, so the conversion is bit-exact
            pipe = load_pipeline(
                StableDiffusionPipeline,
                src,
                prediction_type=args.prediction_type,
                tokenizer=args.tokenizer,
                torch_dtype=torch.float16 if args.half else "auto",
                use_ema=args.ema,
            )
            if pipe.unet.config.in_channels == 9:  # an inpainting UNet: name the pipeline that can run it
                pipe = StableDiffusionInpaintPipeline(**pipe.components)
            pipe.save_pretrained(dst)
        else:
            raise SystemExit(f"minidiff convert: {src} does not exist")
    except (CheckpointError, ConversionError, FileNotFoundError) as e:
        raise SystemExit(f"minidiff convert: {e}") from None
    print(dst)
    return 0


def build_parser() -> argparse.ArgumentParser:
    scheduler_help = "swap in another scheduler (from_config): " + ", ".join(SCHEDULER_ALIASES) + " or a class name"
    parser = argparse.ArgumentParser(
        prog="minidiff", description="minidiff: Stable Diffusion / DDPM inference in plain PyTorch"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "generate",
        help="text to image with a Stable Diffusion pipeline folder or Hub id",
        epilog="schedulers: " + ", ".join(f"{k} ({v})" for k, v in SCHEDULER_ALIASES.items()),
    )
    p.add_argument("prompt")
    p.add_argument(
        "--model", help="pipeline folder or Hub id (default: the bundled shapes model, minidiff.DEFAULT_MODEL)"
    )
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

    p = sub.add_parser(
        "convert",
        help="CompVis/LDM single file <-> diffusers folder (direction from SRC)",
        description="SRC a .safetensors / .ckpt single file -> DST a diffusers pipeline folder; "
        "SRC a diffusers Stable Diffusion folder -> DST a .safetensors or .ckpt file. "
        "Tensors are copied bit for bit, in their own dtype unless --half.",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--half", action="store_true", help="write float16 weights")
    p.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        default=None,
        help="file -> folder: the scheduler's prediction type (default: v_prediction for SD2 768 files, "
        "epsilon otherwise)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="file -> folder: a tokenizer folder to copy (default: the CLIP vocabulary shipped with minidiff)",
    )
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="file -> folder: take the UNet's EMA weights (default: when the file has them)",
    )
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
