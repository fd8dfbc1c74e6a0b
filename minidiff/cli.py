"""The command line (also `python -m minidiff`): one image per call, or many from a prompt file.

minidiff generate "a red circle on a white background" --output circle.png
minidiff generate --prompts prompts.jsonl --outdir out/ --batch-size 4
torchrun --nproc-per-node 2 -m minidiff generate --prompts prompts.jsonl --outdir out/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from weights_conversion import ConversionError

from . import DEFAULT_MODEL
from .batch import SCHEDULER_ALIASES, BatchError, World, dtype_name, generate_many, load_items, preflight
from .loading import CheckpointError
from .pipelines import DDPMPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from .schedulers import SCHEDULERS
from .single_file import load_folder_models, load_pipeline, save_single_file, to_ldm_state_dict

__all__ = ["SCHEDULER_ALIASES", "build_parser", "main"]


def _parse_dtype(name: str) -> torch.dtype:
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


def _scheduler_class(name: str) -> type:
    cls = SCHEDULERS.get(SCHEDULER_ALIASES.get(name.lower(), name))
    if cls is None:
        raise SystemExit(
            f"minidiff: unknown --scheduler {name!r}; choose from {', '.join(SCHEDULER_ALIASES)} "
            f"or a class name ({', '.join(sorted(SCHEDULERS))})"
        )
    return cls


def _set_threads(threads: int | None, ranks_here: int) -> None:
    """--threads (default: this machine's cores) shared by the ranks on this machine, so they do not oversubscribe."""
    if threads is None and ranks_here == 1:
        return  # torch's own default
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, (threads or cores) // ranks_here))


def _model_name(model: str) -> str:
    """A local folder by its absolute path (the same from any working directory), a Hub id as given."""
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompts is not None:
        return cmd_generate_many(args)
    if args.prompt is None:
        raise SystemExit("minidiff generate: give a PROMPT, or --prompts FILE for many images")
    if args.outdir is not None or args.batch_size is not None:
        raise SystemExit("minidiff generate: --outdir and --batch-size go with --prompts FILE")
    _set_threads(args.threads, 1)
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
    for path in _save_images(images, args.output or "minidiff.png"):
        print(path)
    return 0


def cmd_generate_many(args: argparse.Namespace) -> int:
    """--prompts FILE --outdir DIR: every check that needs no model, then this rank's share of the items."""
    if args.prompt is not None:
        raise SystemExit("minidiff generate: give a PROMPT or --prompts FILE, not both")
    if args.outdir is None:
        raise SystemExit("minidiff generate: --prompts needs --outdir DIR (the images and manifest.jsonl go there)")
    if args.output is not None or args.num_images != 1:
        raise SystemExit(
            "minidiff generate: --output and --num-images are for one prompt; --prompts writes into --outdir"
        )
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit(f"minidiff generate: --batch-size must be at least 1, got {args.batch_size}")
    dtype = _parse_dtype(args.dtype)
    scheduler = _scheduler_class(args.scheduler).__name__ if args.scheduler else None
    model = args.model or DEFAULT_MODEL
    device = torch.device(args.device)
    run = {
        # the bundled model by name, so that a folder's manifest does not depend on where minidiff is installed
        "model": "minidiff.DEFAULT_MODEL" if model == DEFAULT_MODEL else _model_name(model),
        "dtype": dtype_name(dtype),
        "device": device.type,
    }
    defaults = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance)
    try:
        items = load_items(
            args.prompts, seed=args.seed, height=args.height, width=args.width, scheduler=scheduler, **defaults
        )
        preflight(args.outdir, items, run, int(os.environ.get("WORLD_SIZE", "1")), args.resume)
    except BatchError as e:
        raise SystemExit(f"minidiff generate: {e}") from None

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    world = World.init(device.type)  # torchrun's process group, or the world of one
    _set_threads(args.threads, world.local_size)
    pipe = StableDiffusionPipeline.from_pretrained(
        model, local_files_only=args.local_files_only or model == DEFAULT_MODEL
    )
    pipe.to(device, dtype)
    try:
        summary = generate_many(
            pipe,
            items,
            args.outdir,
            batch_size=args.batch_size or 1,
            resume=args.resume,
            model=run["model"],
            world=world,
            verbose=args.verbose,
        )
    except BatchError as e:
        raise SystemExit(f"minidiff generate: {e}") from None
    finally:
        if started and world.distributed:
            dist.destroy_process_group()
    if world.rank == 0:
        print(summary)
    return 0


def cmd_ddpm(args: argparse.Namespace) -> int:
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
    p.add_argument("prompt", nargs="?", help="the text (or --prompts FILE for many images)")
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
    p.add_argument(
        "--output", default=None, help="PNG path (default minidiff.png); several images get -0, -1, ... suffixes"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads, shared by the ranks on this machine")
    many = p.add_argument_group(
        "many images",
        "FILE: one prompt a line, or JSONL with per-item prompt, negative_prompt, seed, steps, guidance, height, "
        "width, scheduler, id (the options above are the defaults; an item's seed defaults to --seed + its index). "
        "Under torchrun every rank takes its share of the items.",
    )
    many.add_argument("--prompts", metavar="FILE", help="make one image per line of FILE, into --outdir")
    many.add_argument("--outdir", metavar="DIR", help="DIR/<id>.png and DIR/manifest.jsonl")
    many.add_argument("--batch-size", type=int, default=None, help="images per pipeline call (default 1)")
    many.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the images DIR's manifest vouches for (default when DIR has a manifest); "
        "--no-resume regenerates every item and starts a new manifest",
    )
    many.add_argument("--verbose", action="store_true", help="a line per image from every rank instead of the bar")
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
