"""The command line (also `python -m minidiff`): one image per call, or many from a prompt file.

minidiff generate "a red circle on a white background" --output circle.png
minidiff generate --prompts prompts.jsonl --outdir out/ --batch-size 4
torchrun --nproc-per-node 2 -m minidiff generate --prompts prompts.jsonl --outdir out/

This module has the parser, `ddpm`, `convert` and the error handling of main; `generate` and the
checks every command shares are in cli_generate.py.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

from weights_conversion import ConversionError

from . import files
from .batch import SCHEDULER_ALIASES, BatchError
from .cli_generate import (
    CLIError,
    add_generate_parser,
    check_model,
    check_numbers,
    check_output,
    parse_dtype,
    pick_scheduler,
    save_images,
)
from .files import DestinationError
from .ldm_file import read_single_file
from .loading import CheckpointError
from .pipelines import (
    DDPMPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from .single_file import load_folder_models, load_pipeline, save_single_file, to_ldm_state_dict

__all__ = ["SCHEDULER_ALIASES", "CLIError", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line too, exit status 2
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def cmd_ddpm(args: argparse.Namespace) -> int:
    check_numbers("ddpm", args)
    check_output("ddpm", args.output, args.num_images)
    check_model("ddpm", args.model, "UNet2DModel", args.local_files_only)
    pipe = DDPMPipeline.from_pretrained(args.model, local_files_only=args.local_files_only)
    if args.scheduler:
        pipe.scheduler = pick_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.to(args.device, parse_dtype(args.dtype))
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(batch_size=args.num_images, generator=generator, num_inference_steps=args.steps).images
    for path in save_images(images, args.output):
        print(path)
    return 0


# (file family, inpainting UNet?) -> the pipeline class a converted folder is saved as
CONVERT_CLASSES = {
    ("sd", False): StableDiffusionPipeline,
    ("sd", True): StableDiffusionInpaintPipeline,
    ("sdxl", False): StableDiffusionXLPipeline,
    ("sdxl", True): StableDiffusionXLInpaintPipeline,
    ("sdxl-refiner", False): StableDiffusionXLImg2ImgPipeline,
    ("sdxl-refiner", True): StableDiffusionXLInpaintPipeline,
}


def cmd_convert(args: argparse.Namespace) -> int:
    """A single file -> a diffusers folder, or a diffusers folder -> a single file. Every
    check on DST comes before anything loads; the new file or folder is written beside DST and
    renamed / swapped into place only when complete (an existing DST needs --overwrite)."""
    src, dst = Path(args.src), Path(args.dst)
    try:
        if src.is_dir():
            if dst.suffix not in (".safetensors", ".ckpt"):
                raise CLIError(
                    f"minidiff convert: converting the folder {src} needs a DST ending in .safetensors or .ckpt"
                )
            files.check_file_destination(dst, args.overwrite, sources=[src])
            state_dict = to_ldm_state_dict(**load_folder_models(src))
            save_single_file(state_dict, dst, half=args.half, overwrite=args.overwrite)
        elif src.is_file():
            sources = [src] + ([args.tokenizer] if args.tokenizer else [])
            files.check_folder_destination(dst, args.overwrite, sources, marker="model_index.json")
            f = read_single_file(src, use_ema=args.ema)
            # the pipeline that can run the file: by its family, and a 9-channel UNet is an inpainting one
            unet = f.unet_config()
            cls = CONVERT_CLASSES[f.family, unet is not None and unet["in_channels"] == 9]
            # "auto": every model stays in its file's dtype, so the conversion is bit-exact
            pipe = load_pipeline(
                cls,
                f,
                prediction_type=args.prediction_type,
                tokenizer=args.tokenizer,
                torch_dtype=torch.float16 if args.half else "auto",
            )
            with files.atomic_folder(dst, args.overwrite, sources, marker="model_index.json") as tmp:
                pipe.save_pretrained(tmp)
        else:
            raise CLIError(f"minidiff convert: {src} does not exist")
    except DestinationError as e:
        raise CLIError(
            f"minidiff convert: {e}".replace("pass overwrite=True (--overwrite)", "pass --overwrite")
        ) from None
    print(dst)
    return 0


def build_parser() -> argparse.ArgumentParser:
    scheduler_help = 'swap in a scheduler: a sampler name (e.g. "DPM++ 2M Karras"; see generate --help), a short name ('
    scheduler_help += ", ".join(SCHEDULER_ALIASES) + ") or a class name"
    parser = _Parser(prog="minidiff", description="minidiff: Stable Diffusion / DDPM inference in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the full traceback")

    add_generate_parser(sub, common, scheduler_help)

    p = sub.add_parser(
        "ddpm", parents=[common], help="unconditional images from a DDPM UNet2DModel pipeline folder or Hub id"
    )
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
        parents=[common],
        help="original single file (SD 1.x / 2.x / XL) <-> diffusers folder (direction from SRC)",
        description="SRC a .safetensors / .ckpt single file (CompVis / LDM SD 1.x / 2.x, SDXL base or refiner) "
        "-> DST a diffusers pipeline folder; SRC a diffusers Stable Diffusion (XL) folder -> DST a "
        ".safetensors or .ckpt file in the original layout. "
        "Tensors are copied bit for bit, in their own dtype unless --half. DST is written beside itself and "
        "renamed into place when complete; an existing DST is refused unless --overwrite.",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing DST (a folder only if it has a model_index.json), once the new one is complete",
    )
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
        help="file -> folder: a tokenizer folder (or a pipeline folder: its tokenizer and tokenizer_2) to copy "
        "(default: the CLIP vocabulary shipped with minidiff)",
    )
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="file -> folder: take the UNet's EMA weights (default: when the file has them)",
    )
    p.set_defaults(func=cmd_convert)
    return parser


def _one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _as_cli_error(error: BaseException, command: str) -> CLIError:
    """Exit status 2 for what the user passed (a path, a value the pipeline refused), 1 for failures."""
    where = f"minidiff {command}: "
    if isinstance(error, CLIError):
        return error
    if isinstance(error, KeyboardInterrupt):
        return CLIError(where + "interrupted", 130)
    if isinstance(error, (CheckpointError, ConversionError)):  # the model files, not the arguments
        return CLIError(where + _one_line(error), 1)
    if isinstance(error, (DestinationError, BatchError, ValueError, FileNotFoundError)):
        return CLIError(where + _one_line(error), 2)
    if isinstance(error, OSError):  # e.g. a full disk while writing
        return CLIError(where + _one_line(error), 1)
    return CLIError(f"{where}{type(error).__name__}: {_one_line(error)} (--debug shows the traceback)", 1)


def main(argv: list[str] | None = None) -> int:
    """Errors are one line on stderr and a CLIError (a SystemExit: status 2 for a bad argument, 1 for
    a failure); --debug prints the traceback too."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BaseException as e:
        if isinstance(e, SystemExit) and not isinstance(e, CLIError):
            raise
        error = _as_cli_error(e, args.command)
        if args.debug:
            traceback.print_exc()
        print(_one_line(error), file=sys.stderr)
        raise error from None


if __name__ == "__main__":
    sys.exit(main())
