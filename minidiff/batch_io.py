"""The files and the ranks of a batch run: atomic PNG writes, the JSONL manifest, torch.distributed.

A batch run writes into one folder (DIR):

    DIR/<id>.png               one image per item, written under a temporary name and renamed
    DIR/manifest.rank<R>.jsonl what rank R finished in this run: one JSON line per image, flushed and
                               fsync'ed right after the image's rename
    DIR/manifest.jsonl         the merged manifest, one line per item, written by rank 0 at the end
                               (the rank files are then removed)

A killed run leaves the rank files; the next run reads every manifest file in DIR, keeps the lines
whose image exists and hashes to the recorded sha256, and regenerates the rest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .files import TMP_PREFIX, write_bytes

MANIFEST = "manifest.jsonl"
RANK_MANIFEST = "manifest.rank{}.jsonl"
# files.write_bytes writes an image as ".minidiff-<id>.png.<random>.tmp" first; a crash may leave one, the next run
# removes it
STALE_IMAGES = f"{TMP_PREFIX}*.png.*.tmp"
# the settings every line of a folder must share: a folder holds one model's images, made one way
RUN_SETTINGS = ("model", "dtype", "device")


_runs = itertools.count()  # the progress counter's key: one per run of this process


class BatchError(ValueError):
    """A bad prompt file, output folder or manifest; the message names the line or the problem."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str | None:
    try:
        return sha256(path.read_bytes())
    except OSError:
        return None


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with a single write, then fsync: a crash loses at most this line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def mend_torn_line(path: Path) -> None:
    """A process killed inside a write can leave a last line without its newline: end it, so the next
    append starts a line of its own (the torn line is then skipped as unreadable)."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())


def manifest_files(outdir: Path) -> list[Path]:
    """The merged manifest first, then the rank files in rank order (later lines win)."""
    ranks = sorted(outdir.glob(RANK_MANIFEST.format("*")), key=lambda p: (len(p.name), p.name))
    merged = outdir / MANIFEST
    return ([merged] if merged.is_file() else []) + ranks


def read_manifests(outdir: Path) -> list[dict[str, Any]]:
    """Every readable line of every manifest file in DIR, in file order; torn or foreign lines are skipped."""
    records = []
    for path in manifest_files(outdir):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                records.append(record)
    return records


def check_outdir(outdir: Path) -> None:
    """Create DIR if needed and prove it writable with a probe file that is removed again."""
    if outdir.exists() and not outdir.is_dir():
        raise BatchError(f"--outdir {outdir} exists and is not a folder")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".minidiff-probe-", dir=outdir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise BatchError(f"cannot write into --outdir {outdir}: {e.strerror or e}") from None


def check_run_settings(records: list[dict[str, Any]], run: dict[str, Any], outdir: Path) -> None:
    """Refuse a folder whose manifest was made with another model / dtype / device."""
    differ = {}
    for record in records:
        for key in RUN_SETTINGS:
            if key not in differ and record.get(key) != run[key]:
                differ[key] = record.get(key)
    if differ:
        named = ", ".join(f"{k} {v!r} there, {run[k]!r} now" for k, v in differ.items())
        raise BatchError(
            f"{outdir} holds images made with other settings ({named}); "
            f"use another --outdir, or --no-resume to regenerate every item"
        )


def remove_stale(outdir: Path, *, manifests: bool) -> None:
    """Remove temporary images a killed run left behind (and, to start over, every manifest file)."""
    for path in outdir.glob(STALE_IMAGES):
        path.unlink(missing_ok=True)
    if manifests:
        for path in manifest_files(outdir):
            path.unlink(missing_ok=True)


def write_merged(outdir: Path, records: list[dict[str, Any]]) -> None:
    """Rank 0, at the end: the one manifest, atomically, then the rank files it replaces are removed."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_bytes(outdir / MANIFEST, text.encode())
    for path in outdir.glob(RANK_MANIFEST.format("*")):
        path.unlink(missing_ok=True)


# -- the ranks ---------------------------------------------------------------------------------------


@dataclass
class World:
    """This process's place among the ranks. Without torchrun (no RANK / WORLD_SIZE in the environment)
    and without a process group it is the world of one: the same code runs, the collectives are no-ops."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    distributed: bool = field(default=False, repr=False)

    @classmethod
    def current(cls) -> World:
        """The process group the caller set up (torch.distributed), or the world of one."""
        local = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), *local, distributed=True)
        return cls()

    @classmethod
    def init(cls, device_type: str) -> World:
        """Join torchrun's process group: gloo for the CPU (all of minidiff's messages are small CPU
        tensors and objects), plus NCCL for CUDA tensors when the ranks run on GPUs."""
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
        return cls.current()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, *values: int) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def store(self) -> Any:
        """The process group's key-value store (for the progress count), or None."""
        if not self.distributed:
            return None
        get = getattr(dist.distributed_c10d, "_get_default_store", None)
        try:
            return get() if get else None
        except RuntimeError:
            return None


class Progress:
    """Rank 0's bar counts every rank's images: each rank adds to a counter in the process group's
    store, and a thread on rank 0 reads it twice a second. With `verbose`, every rank prints a line per image."""

    def __init__(self, world: World, total: int, initial: int, show: bool, verbose: bool) -> None:
        self.world, self.verbose, self.key = world, verbose, f"minidiff.batch.{next(_runs)}.done"
        self.store = world.store()
        disable = not show or verbose or world.rank != 0
        self.bar = tqdm(total=total, initial=initial, unit="img", desc="minidiff", disable=disable, file=sys.stderr)
        self.initial, self.stop, self.thread = initial, threading.Event(), None
        if self.store is not None and not disable:
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()

    def _refresh(self) -> None:
        done = int(self.store.add(self.key, 0))
        self.bar.update(self.initial + done - self.bar.n)

    def _poll(self) -> None:
        while not self.stop.wait(0.5):
            self._refresh()

    def add(self, record: dict[str, Any]) -> None:
        if self.store is not None:
            self.store.add(self.key, 1)
        else:
            self.bar.update(1)
        if self.verbose:
            w = self.world
            print(
                f"[rank {w.rank}/{w.size}] {record['file']} seed {record['seed']} {record['seconds']:.2f} s",
                file=sys.stderr,
            )

    def close(self) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self._refresh()
        self.bar.close()
