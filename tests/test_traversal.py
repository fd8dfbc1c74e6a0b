"""Never read outside the model folder: shard names and subfolders must resolve inside it.

A `*.index.json` whose weight_map names `..`, an absolute path or a symlink out of the folder, and a
component subfolder that is a symlink out, are refused with an error naming the entry, before any
file outside is opened (every open is recorded). Hugging Face cache snapshots, whose files are
symlinks into the repo's blobs/ folder, keep loading, by Hub id and by the snapshot's path.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import TINY_UNET_2D

import minidiff
from minidiff import DDPMPipeline, DDPMScheduler, UNet2DModel, loading
from minidiff.loading import CheckpointError

TINY = TINY_UNET_2D
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**TINY)


@pytest.fixture
def sharded(unet, tmp_path):
    """`write(names)`: a model folder whose weights are split over shards with the given file names
    (written where the names point, relative to the folder), and its index."""

    def write(names: list[str], folder: Path | None = None) -> Path:
        folder = folder or tmp_path / "model"
        unet.save_pretrained(folder)
        state = safetensors.torch.load_file(folder / WEIGHTS)
        (folder / WEIGHTS).unlink()
        keys = sorted(state)
        weight_map = {}
        for i, name in enumerate(names):
            part = keys[i :: len(names)]
            target = Path(name) if os.path.isabs(name) else folder / name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                safetensors.torch.save_file({k: state[k] for k in part}, str(target))
            weight_map.update(dict.fromkeys(part, name))
        (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return folder

    return write


@pytest.fixture
def opened(monkeypatch):
    """Every path opened by Python, torch.load, safetensors or minidiff's weight reader, resolved."""
    paths: list[str] = []

    def record(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)):
                paths.append(os.path.realpath(file))
            return real(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", record(builtins.open))
    monkeypatch.setattr(io, "open", record(io.open))
    monkeypatch.setattr(os, "open", record(os.open))
    monkeypatch.setattr(torch, "load", record(torch.load))
    monkeypatch.setattr(safetensors.torch, "load_file", record(safetensors.torch.load_file))
    monkeypatch.setattr(loading, "read_tensors", record(loading.read_tensors))
    return paths


def test_sharded_names_inside_still_load(unet, sharded):
    folder = sharded(["a.safetensors", "sub/b.safetensors"])
    loaded = UNet2DModel.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), unet.state_dict().values()))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_a_shard_outside_the_folder_is_refused_before_any_open(sharded, tmp_path, opened, kind):
    outside = tmp_path / "outside" / "x.safetensors"
    if kind == "dotdot":
        name = "../outside/x.safetensors"
    elif kind == "absolute":
        name = str(outside)
    else:  # a shard name inside the folder that is a symlink to the file outside
        name = "x.safetensors"
    folder = sharded(["inside.safetensors", name])
    if kind == "symlink":
        outside.parent.mkdir()
        (folder / name).rename(outside)
        (folder / name).symlink_to(outside)
    assert outside.is_file()  # a valid safetensors file: it would load
    opened.clear()
    with pytest.raises(CheckpointError, match="outside the model folder") as err:
        UNet2DModel.from_pretrained(folder)
    assert (name if kind != "symlink" else "x.safetensors") in str(err.value)
    assert str(outside) not in opened and os.path.realpath(folder / "inside.safetensors") not in opened


@pytest.mark.parametrize(
    "value, error",
    [
        ("../../../../../../../../etc/passwd", "outside the model folder"),
        ("/etc/passwd", "outside the model folder"),
        ("..\\..\\etc\\passwd", "outside the model folder"),
        (3, "is not a file name"),
        ("", "is not a file name"),
    ],
)
def test_bad_names_in_the_weight_map(unet, tmp_path, opened, value, error):
    folder = tmp_path / "model"
    unet.save_pretrained(folder)
    keys = sorted(unet.weights_format.export(unet.state_dict(), unet.config))
    (folder / WEIGHTS).rename(folder / "w.safetensors")
    weight_map = {**dict.fromkeys(keys, "w.safetensors"), keys[-1]: value}
    (folder / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    opened.clear()
    with pytest.raises(CheckpointError, match=error) as err:
        UNet2DModel.from_pretrained(folder)
    assert repr(value) in str(err.value) and INDEX in str(err.value)
    assert "/etc/passwd" not in opened and not any(p.endswith("w.safetensors") for p in opened)


def test_a_component_symlinked_out_of_the_pipeline_folder(unet, tmp_path, opened):
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.save_pretrained(tmp_path / "elsewhere")
    folder = tmp_path / "ddpm"
    folder.mkdir()
    shutil.copy(tmp_path / "elsewhere" / "model_index.json", folder)
    shutil.copytree(tmp_path / "elsewhere" / "scheduler", folder / "scheduler")
    (folder / "unet").symlink_to(tmp_path / "elsewhere" / "unet")
    opened.clear()
    with pytest.raises(CheckpointError, match=r"unet/config\.json in .* outside the model folder"):
        DDPMPipeline.from_pretrained(folder)
    assert not any("elsewhere" in p for p in opened)
    # a symlink that stays inside the folder is fine
    (folder / "unet").unlink()
    shutil.copytree(tmp_path / "elsewhere" / "unet", folder / "real-unet")
    (folder / "unet").symlink_to("real-unet")
    assert isinstance(DDPMPipeline.from_pretrained(folder).unet, UNet2DModel)


def test_a_subfolder_argument_cannot_climb_out(unet, tmp_path):
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "model").mkdir()
    with pytest.raises(CheckpointError, match=r"'\.\./unet/config\.json'.*outside the model folder"):
        UNet2DModel.from_pretrained(tmp_path / "model", subfolder="../unet")


# ---------------------------------------------------------------- the Hugging Face cache layout


def hub_snapshot(cache: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> Path:
    """Copy `folder` into the cache as huggingface_hub lays it out: every file a blob named by its
    hash, the snapshot's files relative symlinks to them."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snapshot / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.mark.usefixtures("hub_cache")  # an offline cache of our own in HF_HUB_CACHE
def test_hub_snapshots_with_blob_symlinks_load(unet, sharded):
    cache = Path(os.environ["HF_HUB_CACHE"])
    folder = sharded(["a.safetensors", "b.safetensors"])
    snapshot = hub_snapshot(cache, "me/tiny-unet", folder)
    assert (snapshot / "a.safetensors").is_symlink()
    for source in ("me/tiny-unet", snapshot):
        loaded = UNet2DModel.from_pretrained(source)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), unet.state_dict().values()))
    # a snapshot file linking out of its repo's cache is refused like any other
    os.unlink(snapshot / "b.safetensors")
    (snapshot / "b.safetensors").symlink_to(folder / "b.safetensors")
    for source in ("me/tiny-unet", snapshot):
        with pytest.raises(CheckpointError, match="b.safetensors .*outside the model folder"):
            UNet2DModel.from_pretrained(source)


@pytest.mark.usefixtures("hub_cache")
def test_hub_pipeline_snapshot_loads():
    cache = Path(os.environ["HF_HUB_CACHE"])
    snapshot = hub_snapshot(cache, "me/shapes", Path(minidiff.DEFAULT_MODEL))
    pipe = minidiff.StableDiffusionPipeline.from_pretrained("me/shapes")
    assert pipe.unet.config.sample_size == minidiff.StableDiffusionPipeline.from_pretrained(snapshot).unet.sample_size
