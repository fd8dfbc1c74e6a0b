"""Shared test helpers: perturbing every weight, relative error, paths to the reference configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# the shared plan (reference configs, tutorials) sits beside the repository
SHARED = Path(os.environ.get("MINIDIFF_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REFERENCE_CONFIGS = SHARED / "reference-configs"


def reference_config(name: str) -> dict:
    """A real public config from ../shared/reference-configs, e.g. 'ddpm-cat-256.unet'."""
    path = REFERENCE_CONFIGS / f"{name}.json"
    if not path.is_file():
        pytest.fail(f"missing reference config {path} (set MINIDIFF_SHARED to the shared/ folder)")
    return json.loads(path.read_text())


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to EVERY parameter: zero-initialised layers would hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| / max|b| (PARITY.md's measure)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline, hand-built Hugging Face cache. Returns `add(repo_id, folder)` that copies a
    local folder into the cache as the repo's `main` snapshot (the layout huggingface_hub reads)."""
    import shutil

    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def add(repo_id: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        shutil.copytree(folder, repo / "snapshots" / commit)
        return repo

    return add
