"""Many images: a prompt file -> a folder of PNGs and a JSONL manifest, shared out over torch.distributed ranks.

    items = load_items("prompts.jsonl", seed=0, steps=20)
    summary = generate_many(pipe, items, "out/", batch_size=4)

Each item has its own seed (given, or `seed + index`) and its own CPU torch.Generator, and a batch
passes one generator per image, so an item's noise does not depend on the batch it runs in, the
number of ranks or the order: rank r takes the items with index % world_size == r. The images are
bit-identical across ranks and orders at the same batch size and threads per process; batching or
a different thread count changes the float sums in the last bits (see tests/test_batch.py).

Launched by torchrun every rank calls generate_many on its own device; without torchrun the same
code runs as the world of one (batch_io.World). Files and resume rules: batch_io.py.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .batch_io import (
    RANK_MANIFEST,
    BatchError,
    Progress,
    World,
    append_line,
    check_outdir,
    check_run_settings,
    file_sha256,
    mend_torn_line,
    read_manifests,
    remove_stale,
    sha256,
    write_merged,
)
from .files import TMP_PREFIX, write_bytes
from .schedulers import SCHEDULERS

__all__ = ["BatchError", "Item", "Summary", "World", "generate_many", "load_items", "read_prompt_file", "resolve_items"]

# short names for --scheduler and the "scheduler" key (the class names work too)
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
ITEM_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "height", "width", "scheduler", "id")
SETTINGS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "height", "width", "scheduler")
ABORT_ENV = "MINIDIFF_BATCH_ABORT_AFTER"  # test hook: "N" (every rank) or "N:R" (rank R) dies after its Nth image
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def scheduler_name(name: str) -> str:
    """An alias or a class name -> the class name; unknown names raise BatchError listing the choices."""
    cls = SCHEDULER_ALIASES.get(name.lower(), name)
    if cls not in SCHEDULERS:
        raise BatchError(
            f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULER_ALIASES)} "
            f"or a class name ({', '.join(sorted(SCHEDULERS))})"
        )
    return cls


@dataclass(frozen=True)
class Item:
    """One image to make. `None` settings take the pipeline's own (its size, its scheduler)."""

    index: int
    id: str
    prompt: str
    seed: int
    negative_prompt: str | None = None
    steps: int = 50
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SETTINGS}


# -- reading and checking items ------------------------------------------------------------------------


def read_prompt_file(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """Plain text (one prompt a line) or JSONL (one object a line; chosen by a .jsonl name or a first line
    starting with "{") -> [(where, entry)], where `where` is "FILE line N" for error messages."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BatchError(f"prompt file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"cannot read the prompt file {path}: {e}") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise BatchError(f"prompt file {path} is empty: write one prompt a line, or one JSON object a line")
    jsonl = path.suffix == ".jsonl" or lines[0][1].startswith("{")
    entries = []
    for n, line in lines:
        where = f"{path} line {n}"
        if not jsonl:
            entries.append((where, {"prompt": line}))
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise BatchError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(entry, dict):
            raise BatchError(f'{where}: expected a JSON object like {{"prompt": ...}}, got {type(entry).__name__}')
        entries.append((where, entry))
    return entries


_SIZE = (lambda v: v is None or (type(v) is int and v > 0 and v % 8 == 0), "a positive multiple of 8 or null")
_CHECKS = {  # key -> (test, what it must be)
    "prompt": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "negative_prompt": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "seed": (lambda v: type(v) is int and 0 <= v < 2**63, "an integer in [0, 2**63)"),
    "steps": (lambda v: type(v) is int and v >= 1, "a positive integer"),
    "guidance": (lambda v: type(v) in (int, float) and math.isfinite(v), "a number"),
    "height": _SIZE,
    "width": _SIZE,
    "scheduler": (lambda v: v is None or isinstance(v, str), "a scheduler name or null"),
    "id": (lambda v: isinstance(v, str) and _ID.fullmatch(v) is not None, "a file name of letters, digits, . _ -"),
}


def resolve_items(
    entries: Iterable[str | dict[str, Any] | tuple[str, dict[str, Any]]],
    *,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    scheduler: str | None = None,
) -> list[Item]:
    """Prompts or dicts (ITEM_KEYS) -> checked Items; the keyword arguments are the defaults, and an item
    without a "seed" gets `seed + index`, so item i is the image `minidiff generate PROMPT --seed S+i` makes."""
    items: list[Item] = []
    seen: dict[str, str] = {}
    for index, entry in enumerate(entries):
        where, entry = entry if isinstance(entry, tuple) else (f"item {index}", entry)
        entry = {"prompt": entry} if isinstance(entry, str) else entry
        unknown = sorted(set(entry) - set(ITEM_KEYS))
        if unknown:
            raise BatchError(f"{where}: unknown key {unknown[0]!r} (the keys are {', '.join(ITEM_KEYS)})")
        defaults = dict(negative_prompt=negative_prompt, seed=seed + index, steps=steps, guidance=guidance)
        defaults.update(height=height, width=width, scheduler=scheduler, id=f"{index:05d}")
        e = {**defaults, **entry}
        e["id"] = str(e["id"]) if type(e["id"]) is int else e["id"]
        for key, (ok, wanted) in _CHECKS.items():
            if not ok(e.get(key)):
                raise BatchError(f"{where}: {key!r} must be {wanted}, got {e.get(key)!r}")
        if e["scheduler"] is not None:
            try:
                e["scheduler"] = scheduler_name(e["scheduler"])
            except BatchError as err:
                raise BatchError(f"{where}: {err}") from None
        v = e["id"]
        if v in seen:
            raise BatchError(f"{where}: id {v!r} is used twice (first by {seen[v]})")
        seen[v] = where
        items.append(Item(index=index, **{**e, "guidance": float(e["guidance"])}))
    if not items:
        raise BatchError("no items to generate")
    return items


def load_items(path: str | os.PathLike, **defaults: Any) -> list[Item]:
    """read_prompt_file + resolve_items: the errors name the file's line."""
    return resolve_items(read_prompt_file(path), **defaults)


# -- the run -------------------------------------------------------------------------------------------


@dataclass
class Summary:
    total: int
    generated: int
    skipped: int
    world_size: int
    seconds: float
    outdir: str

    def __str__(self) -> str:
        rate = self.generated / self.seconds if self.seconds > 0 else 0.0
        ranks = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        return (
            f"minidiff: {self.total} items in {self.outdir}: {self.generated} generated, {self.skipped} already "
            f"there; {ranks}, {self.seconds:.1f} s, {rate:.2f} items/s"
        )


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _conflicts(records: list[dict[str, Any]], items: Sequence[Item], outdir: Path) -> None:
    """An item id already in the manifest with another prompt / seed / steps / ...: mixing, refused."""
    by_id = {it.id: it.settings() for it in items}
    differ: dict[str, tuple[str, Any, Any]] = {}
    for record in records:
        now = by_id.get(record["id"])
        for key in SETTINGS if now is not None else ():
            if key not in differ and now[key] is not None and record.get(key) != now[key]:
                differ[key] = (record["id"], record.get(key), now[key])
    if differ:
        named = ", ".join(f"{k} {a!r} there, {b!r} now (item {i})" for k, (i, a, b) in differ.items())
        raise BatchError(
            f"{outdir} holds these items made with other settings: {named}; "
            f"use another --outdir, or --no-resume to regenerate every item"
        )


def preflight(
    outdir: str | os.PathLike, items: Sequence[Item], run: dict[str, Any], world_size: int, resume: bool | None
) -> None:
    """Every check that needs no model: the world fits the items, DIR is writable, and (unless resume=False)
    a manifest already in DIR was made with the same model / dtype / device and item settings. The CLI runs
    it before loading the model; generate_many checks the same again with the model's size and scheduler filled in."""
    if world_size > len(items):
        raise BatchError(f"{world_size} processes for {len(items)} items: start at most {len(items)}")
    outdir = Path(outdir)
    check_outdir(outdir)
    if resume is False:
        return
    records = read_manifests(outdir)
    check_run_settings(records, run, outdir)
    _conflicts(records, items, outdir)


def _abort_after(world: World) -> int | None:
    spec = os.environ.get(ABORT_ENV, "")
    count, _, rank = spec.partition(":")
    return int(count) if count and (not rank or int(rank) == world.rank) else None


def _die_mid_write(outdir: Path, world: World, next_id: str) -> None:
    """The test hook's crash: half a temporary image and a torn manifest line, then no cleanup at all."""
    (outdir / f"{TMP_PREFIX}{next_id}.png.rank{world.rank}.tmp").write_bytes(b"\x89PNG\r\n\x1a\n half an image")
    with open(outdir / RANK_MANIFEST.format(world.rank), "a") as f:
        f.write(json.dumps({"id": next_id, "prompt": "torn"})[:20])
    os._exit(17)


def _batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Items with the same steps / guidance / size / scheduler, in runs of at most batch_size, in index order."""
    groups: dict[tuple, list[Item]] = {}
    for it in items:
        groups.setdefault((it.steps, it.guidance, it.height, it.width, it.scheduler), []).append(it)
    runs = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    return sorted(runs, key=lambda run: run[0].index)


def generate_many(
    pipe: Any,
    items: Sequence[Item | str | dict[str, Any]],
    outdir: str | os.PathLike,
    *,
    batch_size: int = 1,
    resume: bool | None = None,
    model: str | None = None,
    world: World | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> Summary:
    """Make every item's image in `outdir` (this rank's share when torch.distributed is initialized).

    `resume` (default: when `outdir` has a manifest) keeps the images whose manifest line and sha256
    match and regenerates the others; `resume=False` regenerates every item and starts a new manifest.
    `model` is recorded in the manifest and must match the folder's. Raises BatchError on bad input."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BatchError(f"batch_size must be a positive integer, got {batch_size!r}")
    world = world or World.current()
    if not all(isinstance(it, Item) for it in items):
        items = resolve_items(items)
    outdir = Path(outdir)
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    own = type(pipe.scheduler).__name__
    items = [
        replace(
            it,
            height=it.height or h * pipe.vae_scale_factor,
            width=it.width or w * pipe.vae_scale_factor,
            scheduler=it.scheduler or own,
        )
        for it in items
    ]
    run = {"model": model, "dtype": dtype_name(pipe.dtype), "device": pipe.device.type}
    if world.size > len(items):
        raise BatchError(f"{world.size} processes for {len(items)} items: start at most {len(items)}")
    check_outdir(outdir)
    if world.rank == 0:
        remove_stale(outdir, manifests=resume is False)
    world.barrier()
    records = read_manifests(outdir)  # empty after resume=False: rank 0 removed them
    check_run_settings(records, run, outdir)
    _conflicts(records, items, outdir)
    latest = {r["id"]: r for r in records}  # the last line for each id wins

    def kept(it: Item) -> dict[str, Any] | None:
        """The item's manifest line when its image is there and hashes to the line's sha256."""
        r = latest.get(it.id)
        ok = r is not None and r.get("file") == f"{it.id}.png"
        ok = ok and file_sha256(outdir / r["file"]) == r.get("sha256")
        return {**r, "index": it.index} if ok else None

    mine = [it for it in items if it.index % world.size == world.rank]
    done = {it.id: r for it in mine if (r := kept(it)) is not None}
    todo = [it for it in mine if it.id not in done]
    rank_manifest = outdir / RANK_MANIFEST.format(world.rank)
    mend_torn_line(rank_manifest)
    world.barrier()  # every rank has read the folder before any rank writes into it
    skipped, _ = world.sum(len(done), len(todo))
    bar = Progress(world, len(items), skipped, progress, verbose)
    abort_after, made = _abort_after(world), 0
    schedulers = {own: pipe.scheduler}
    old_bar_config = getattr(pipe, "_progress_bar_config", {})
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    try:
        for batch in _batches(todo, batch_size):
            first = batch[0]
            if first.scheduler not in schedulers:
                schedulers[first.scheduler] = SCHEDULERS[first.scheduler].from_config(schedulers[own].config)
            pipe.scheduler = schedulers[first.scheduler]
            negatives = [it.negative_prompt or "" for it in batch]
            t0 = time.perf_counter()
            images = pipe(
                [it.prompt for it in batch],
                negative_prompt=negatives if any(negatives) else None,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance,
                height=first.height,
                width=first.width,
                generator=[torch.Generator().manual_seed(it.seed) for it in batch],
                output_type="pil",
            ).images
            seconds = round((time.perf_counter() - t0) / len(batch), 4)
            for it, image in zip(batch, images):
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                data = buf.getvalue()
                path = outdir / f"{it.id}.png"
                write_bytes(path, data)
                record = {"id": it.id, "index": it.index, **it.settings(), **run}
                record.update(file=path.name, sha256=sha256(data), rank=world.rank, seconds=seconds)
                append_line(rank_manifest, record)
                done[it.id] = record
                bar.add(record)
                made += 1
                if made == abort_after:
                    left = [t.id for t in todo if t.id not in done]
                    _die_mid_write(outdir, world, left[0] if left else "end")
    finally:
        pipe.scheduler = schedulers[own]
        pipe.set_progress_bar_config(**old_bar_config)
    gathered = world.gather(([done[it.id] for it in mine], made))  # also waits for every rank's last image
    bar.close()
    seconds = time.perf_counter() - start
    if world.rank == 0:
        ids = {it.id for it in items}
        merged = sorted((r for part, _ in gathered for r in part), key=lambda r: r["index"])
        extra = {r["id"]: r for r in records if r["id"] not in ids}  # other items of this folder stay listed
        write_merged(outdir, merged + list(extra.values()))
    world.barrier()
    generated = sum(n for _, n in gathered)
    return Summary(len(items), generated, skipped, world.size, seconds, str(outdir))
