"""`minidiff generate`: its options, one image per call, or many from a prompt file; and the checks
and helpers every command shares (argument checks before any model loads, one-line errors).

minidiff generate "a red circle on a white background" --output circle.png
minidiff generate --prompts prompts.jsonl --outdir out/ --batch-size 4
minidiff generate "a lighthouse at dusk" --model stabilityai/stable-diffusion-xl-base-1.0 \\
    --refiner stabilityai/stable-diffusion-xl-refiner-1.0 --steps 40
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from weights_conversion import ConversionError

from . import DEFAULT_MODEL, files
from .batch import SCHEDULER_ALIASES, BatchError, World, dtype_name, generate_many, load_items, preflight
from .files import DestinationError
from .ldm_file import SingleFile, read_single_file
from .loading import CheckpointError, load_config
from .pipelines import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from .pipelines.loaders import load_lora_and_embeddings
from .schedulers.names import NAMES_HELP, scheduler_from_name, scheduler_options
from .single_file import load_pipeline

MAX_SEED = 2**63  # seeds are in [0, 2**63), as in a prompt file


class CLIError(SystemExit):
    """One line for the user; exit status 2 for a bad argument, 1 for a failure (main prints it)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if name not in dtypes:
        raise CLIError(f"minidiff: unknown --dtype {name!r} (choose from {', '.join(dtypes)})")
    return dtypes[name]


def _image_paths(output: str, count: int) -> list[Path]:
    out = Path(output)
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def check_output(cmd: str, output: str, count: int) -> None:
    """Before any model loads: an image file name PIL can write, in a folder that can be written."""
    try:
        for path in _image_paths(output, count):
            if path.is_dir():
                raise DestinationError(f"{path} is a folder; --output names the image file")
        files.image_format(output)
        files.check_writable_folder(Path(output).parent)
    except DestinationError as e:
        raise CLIError(f"minidiff {cmd}: --output {e}") from None


def save_images(images, output: str) -> list[Path]:
    """Each image written atomically (an existing file is replaced only by the complete new image)."""
    paths = _image_paths(output, len(images))
    for image, path in zip(images, paths):
        files.save_image(image, path)
    return paths


def check_numbers(cmd: str, args: argparse.Namespace) -> None:
    """The numeric options, before anything loads."""
    if not 0 <= args.seed < MAX_SEED:
        raise CLIError(f"minidiff {cmd}: --seed must be in [0, 2**63), got {args.seed}")
    for name in ("steps", "num_images", "threads", "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CLIError(f"minidiff {cmd}: --{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("height", "width"):
        value = getattr(args, name, None)
        if value is not None and (value < 8 or value % 8):
            raise CLIError(f"minidiff {cmd}: --{name} must be a positive multiple of 8, got {value}")
    split = getattr(args, "refiner_split", None)
    if split is not None and not 0 < split < 1:
        raise CLIError(f"minidiff {cmd}: --refiner-split must be between 0 and 1, got {split}")
    guidance = getattr(args, "guidance", None)
    if guidance is not None and not math.isfinite(guidance):
        raise CLIError(f"minidiff {cmd}: --guidance must be a finite number, got {guidance}")
    try:
        torch.device(args.device)
    except RuntimeError as e:
        raise CLIError(f"minidiff {cmd}: --device {args.device!r}: {e}") from None
    parse_dtype(args.dtype)
    if args.scheduler:
        pick_scheduler(args.scheduler)


def check_model(cmd: str, model: str, unet_class: str, local_files_only: bool) -> dict:
    """Read model_index.json first: a missing folder, or a DDPM folder given to `generate` (an SD
    folder to `ddpm`), is a one-line error before any weight loads. Returns the index."""
    try:
        index = load_config(model, None, "model_index.json", local_files_only)
    except (FileNotFoundError, CheckpointError) as e:
        raise CLIError(f"minidiff {cmd}: {e}") from None
    unet = index.get("unet")
    found = unet[1] if isinstance(unet, list) and len(unet) == 2 else None
    if found != unet_class:
        other = "minidiff ddpm MODEL" if found == "UNet2DModel" else "minidiff generate --model MODEL"
        raise CLIError(
            f"minidiff {cmd}: {model} is a {index.get('_class_name')} folder (its unet is a {found}); "
            f"`minidiff {cmd}` needs a {unet_class}" + (f" (try `{other}`)" if found else "")
        )
    return index


# what --model / --refiner hold -> the pipeline that runs them
FAMILY_PIPELINES = {
    "sd": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sdxl-refiner": StableDiffusionXLImg2ImgPipeline,
}


@dataclass
class ModelSource:
    """A --model or --refiner: a pipeline folder or Hub id, or a single file (read once, here)."""

    name: str
    family: str  # "sd" (1.x / 2.x), "sdxl" or "sdxl-refiner", as ldm_file names single files
    local_files_only: bool
    single_file: SingleFile | None = None

    def load(self) -> StableDiffusionPipeline:
        cls = FAMILY_PIPELINES[self.family]
        if self.single_file is not None:
            return load_pipeline(cls, self.single_file)
        return cls.from_pretrained(self.name, local_files_only=self.local_files_only)


def find_model(cmd: str, model: str, local_files_only: bool) -> ModelSource:
    """Which kind of Stable Diffusion `model` is, read before any weight loads: a .safetensors / .ckpt
    file by its keys, a folder by model_index.json (SDXL has a text_encoder_2; the refiner conditions on
    an aesthetic score, requires_aesthetics_score)."""
    if Path(model).is_file():
        try:
            f = read_single_file(model)
        except (CheckpointError, ConversionError, ValueError) as e:
            raise CLIError(f"minidiff {cmd}: {e}") from None  # main prints it on one line
        return ModelSource(model, f.family, local_files_only, f)
    index = check_model(cmd, model, "UNet2DConditionModel", local_files_only)
    family = "sd"
    if index.get("text_encoder_2") not in (None, [None, None]):
        family = "sdxl-refiner" if index.get("requires_aesthetics_score") else "sdxl"
    return ModelSource(model, family, local_files_only)


def pick_scheduler(name: str, config: dict | None = None) -> object:
    """--scheduler: a short name, a class name or a sampler name ("DPM++ 2M Karras"): its (class name, options), or
    with a config, that scheduler built on it (from_config)."""
    try:
        name = SCHEDULER_ALIASES.get(name.lower(), name)
        return scheduler_options(name) if config is None else scheduler_from_name(name, config)
    except ValueError as e:
        message = str(e).replace("scheduler name", "--scheduler", 1)  # "unknown --scheduler 'x'; choose ..."
        raise CLIError(f"minidiff: {message}; or a short name ({', '.join(SCHEDULER_ALIASES)})") from None


def _set_threads(threads: int | None, ranks_here: int) -> None:
    """--threads (default: this machine's cores) shared by the ranks on this machine, so they do not oversubscribe."""
    if threads is None and ranks_here == 1:
        return  # torch's own default
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, (threads or cores) // ranks_here))


def _model_name(model: str) -> str:
    """A local folder or file by its absolute path (the same from any working directory), a Hub id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompts is not None:
        return cmd_generate_many(args)
    if args.prompt is None:
        raise CLIError("minidiff generate: give a PROMPT, or --prompts FILE for many images")
    if args.outdir is not None or args.batch_size is not None:
        raise CLIError("minidiff generate: --outdir and --batch-size go with --prompts FILE")
    check_numbers("generate", args)
    loras, embeddings = adapter_specs("generate", args)
    output = args.output or "minidiff.png"
    check_output("generate", output, args.num_images)
    model = args.model or DEFAULT_MODEL  # the bundled toy model: offline, 64x64, shapes
    base = find_model("generate", model, args.local_files_only or model == DEFAULT_MODEL)
    refiner = _check_refiner(args, base)
    _set_threads(args.threads, 1)
    pipe = _load(base, args)
    load_lora_and_embeddings(pipe, loras, embeddings)
    # a CPU generator: the same seed gives the same image as the Python API (and as diffusers)
    generator = torch.Generator().manual_seed(args.seed)
    call = dict(
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=_guidance(args, base),
        num_images_per_prompt=args.num_images,
        generator=generator,
    )
    if refiner is None:
        images = pipe(args.prompt, height=args.height, width=args.width, **call).images
    else:  # base then refiner, diffusers' "ensemble of experts": the base stops at the split, the refiner goes on
        split = args.refiner_split
        latents = pipe(
            args.prompt, height=args.height, width=args.width, denoising_end=split, output_type="latent", **call
        ).images
        del pipe  # one pipeline in memory at a time
        images = _load(refiner, args)(args.prompt, image=latents, denoising_start=split, **call).images
    for path in save_images(images, output):
        print(path)
    return 0


def adapter_specs(cmd: str, args: argparse.Namespace) -> tuple[list[tuple[str, float]], list[tuple[str, str | None]]]:
    """--lora FILE[:SCALE] and --embedding FILE[:TOKEN], checked before any model loads."""

    def split(spec: str, flag: str) -> tuple[str, str | None]:
        path, sep, tail = spec.rpartition(":")
        if not sep or os.path.isfile(spec) or not path:
            path, tail = spec, None
        if not os.path.isfile(path):
            raise CLIError(f"minidiff {cmd}: {flag} {spec}: no such file {path}")
        return path, tail

    loras = []
    for spec in args.lora or []:
        path, scale = split(spec, "--lora")
        try:
            loras.append((path, 1.0 if scale is None else float(scale)))
        except ValueError:
            raise CLIError(f"minidiff {cmd}: --lora {spec}: the scale after ':' must be a number") from None
    return loras, [split(spec, "--embedding") for spec in args.embedding or []]


def _check_refiner(args: argparse.Namespace, base: ModelSource) -> ModelSource | None:
    """--model must be a base model; --refiner an SDXL refiner (or base) after an SDXL --model."""
    if base.family == "sdxl-refiner":
        raise CLIError(
            f"minidiff generate: {base.name} is an SDXL refiner, which refines an image: give it as --refiner, "
            f"with an SDXL base model as --model"
        )
    if args.refiner is None:
        return None
    if base.family != "sdxl":
        raise CLIError(f"minidiff generate: --refiner goes with an SDXL base model; {base.name} is SD 1.x / 2.x")
    refiner = find_model("generate", args.refiner, args.local_files_only)
    if refiner.family == "sd":
        raise CLIError(f"minidiff generate: --refiner {args.refiner} is SD 1.x / 2.x, not an SDXL model")
    return refiner


def _load(source: ModelSource, args: argparse.Namespace) -> StableDiffusionPipeline:
    """The pipeline, with --scheduler swapped in, on --device in --dtype."""
    pipe = source.load()
    if args.scheduler:
        pipe.scheduler = pick_scheduler(args.scheduler, pipe.scheduler.config)
    return pipe.to(args.device, parse_dtype(args.dtype))


def _guidance(args: argparse.Namespace, source: ModelSource) -> float:
    """--guidance, else the pipeline's own default: 5.0 for SDXL, 7.5 for SD 1.x / 2.x (as diffusers)."""
    if args.guidance is not None:
        return args.guidance
    return 7.5 if source.family == "sd" else 5.0


def cmd_generate_many(args: argparse.Namespace) -> int:
    """--prompts FILE --outdir DIR: every check that needs no model, then this rank's share of the items."""
    if args.prompt is not None:
        raise CLIError("minidiff generate: give a PROMPT or --prompts FILE, not both")
    if args.outdir is None:
        raise CLIError("minidiff generate: --prompts needs --outdir DIR (the images and manifest.jsonl go there)")
    if args.output is not None or args.num_images != 1:
        raise CLIError(
            "minidiff generate: --output and --num-images are for one prompt; --prompts writes into --outdir"
        )
    check_numbers("generate", args)
    loras, embeddings = adapter_specs("generate", args)
    dtype = parse_dtype(args.dtype)
    scheduler, options = pick_scheduler(args.scheduler) if args.scheduler else (None, {})
    if options:  # a prompt file's "scheduler" names a class
        raise CLIError(
            f"minidiff generate: with --prompts, --scheduler is a short or class name, not {args.scheduler!r}"
        )
    model = args.model or DEFAULT_MODEL
    device = torch.device(args.device)
    run = {
        # the bundled model by name, so that a folder's manifest does not depend on where minidiff is installed
        "model": "minidiff.DEFAULT_MODEL" if model == DEFAULT_MODEL else _model_name(model),
        "dtype": dtype_name(dtype),
        "device": device.type,
    }
    if args.refiner is not None:
        raise CLIError("minidiff generate: --refiner makes one image per call; it does not go with --prompts")
    source = find_model("generate", model, args.local_files_only or model == DEFAULT_MODEL)
    defaults = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance=_guidance(args, source))
    try:
        items = load_items(
            args.prompts, seed=args.seed, height=args.height, width=args.width, scheduler=scheduler, **defaults
        )
        preflight(args.outdir, items, run, int(os.environ.get("WORLD_SIZE", "1")), args.resume)
    except BatchError as e:
        raise CLIError(f"minidiff generate: {e}") from None

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    world = World.init(device.type)  # torchrun's process group, or the world of one
    _set_threads(args.threads, world.local_size)
    pipe = source.load().to(device, dtype)
    load_lora_and_embeddings(pipe, loras, embeddings)
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
        raise CLIError(f"minidiff generate: {e}", code=1) from None
    finally:
        if started and world.distributed:
            dist.destroy_process_group()
    if world.rank == 0:
        print(summary)
    return 0


def add_generate_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, scheduler_help: str) -> None:
    """The `generate` subcommand's options."""
    p = sub.add_parser(
        "generate",
        parents=[common],
        help="text to image with Stable Diffusion 1.x / 2.x / XL (a pipeline folder, Hub id or single file)",
        epilog="Short names: " + ", ".join(f"{k} ({v})" for k, v in SCHEDULER_ALIASES.items()) + ". " + NAMES_HELP,
    )
    p.add_argument("prompt", nargs="?", help="the text (or --prompts FILE for many images)")
    p.add_argument(
        "--model",
        help="pipeline folder, Hub id or single .safetensors / .ckpt file: SD 1.x / 2.x or SDXL base "
        "(default: the bundled shapes model, minidiff.DEFAULT_MODEL)",
    )
    p.add_argument(
        "--refiner",
        metavar="MODEL",
        help="an SDXL refiner (folder, Hub id or single file) to finish the SDXL --model's image: the base "
        "denoises until --refiner-split, the refiner from there (diffusers' ensemble of experts)",
    )
    p.add_argument(
        "--refiner-split",
        type=float,
        default=0.8,
        metavar="FRACTION",
        help="the fraction of the noise schedule the base runs before the refiner takes over (default 0.8)",
    )
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale; <= 1 turns it off (default 7.5; 5.0 for SDXL, as diffusers)",
    )
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
    p.add_argument(
        "--lora", action="append", metavar="FILE[:SCALE]", help="a LoRA file at SCALE (default 1); repeatable"
    )
    p.add_argument(
        "--embedding",
        action="append",
        metavar="FILE[:TOKEN]",
        help="a textual-inversion embedding as TOKEN; repeatable",
    )
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
