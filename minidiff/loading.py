"""Finding and reading checkpoint files: a local folder or a Hugging Face Hub id, safely.

Everything here is format plumbing shared by models, schedulers, tokenizers and pipelines:
- `resolve_file` turns (path_or_hub_id, subfolder, filename) into a local path, downloading
  (or reading the local Hub cache) one file at a time so only the files needed are fetched;
- `find_weight_files` picks ONE weight format: safetensors first, then `.bin` pickles,
  single file or sharded through `*.index.json`, honouring an optional `variant` ("fp16");
- `read_state_dict` reads those files, pickles only via `torch.load(weights_only=True)`;
- `download_pipeline` fetches the files of a whole pipeline from the Hub (or finds them in the cache)
  as diffusers does, so its components then load from one local folder.
Hub keywords (`revision`, `token`, `cache_dir`, `force_download`) travel as one `hub` dict to
huggingface_hub with its meaning. Every failure names the file (or Hub id) it is about.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import torch

_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
_LFS_POINTER = b"version https://git-lfs"
_HUB_CACHE_REPO = ("models--", "datasets--", "spaces--")  # a repo's folder in the Hugging Face cache


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be used as it is."""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}


def check_entry(name: Any, what: str) -> str:
    """A relative path named inside a checkpoint (a shard, a subfolder): no '..', not absolute."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{what}: {name!r} is not a file name")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or ".." in parts:
        raise CheckpointError(f"{what} names {name!r}, which is outside the model folder; refusing it")
    return name


def _allowed_roots(root: Path) -> list[Path]:
    """Where a file of the folder `root` may really lie: inside it, and for a Hugging Face cache
    snapshot (models--owner--name/snapshots/<commit>) in that repo's blobs/, where its links point."""
    real = Path(os.path.realpath(root))
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def _check_inside(path: Path, root: Path, entry: str) -> None:
    """`path` (root/entry) must resolve, symlinks followed, inside `root` (or its Hub cache blobs)."""
    real = Path(os.path.realpath(path))
    # a folder downloaded with symlinks into the Hub cache (huggingface-cli --local-dir, older versions)
    in_hub_blobs = real.parent.name == "blobs" and real.parent.parent.name.startswith(_HUB_CACHE_REPO)
    if not in_hub_blobs and not any(real.is_relative_to(r) for r in _allowed_roots(root)):
        raise CheckpointError(f"{entry} in {root} resolves to {real}, outside the model folder; refusing it")


def resolve_file(
    path_or_id: str | os.PathLike,
    filename: str,
    subfolder: str | None = None,
    *,
    local_files_only: bool = False,
    required: bool = True,
    hub: dict[str, Any] | None = None,
) -> Path | None:
    """Local path of `subfolder/filename` in a folder or a Hub repo; None if absent and not required.
    The path must stay inside the folder (or the repo's cache), symlinks followed: checked before
    anything is opened."""
    local = Path(path_or_id)
    entry = check_entry(f"{subfolder}/{filename}" if subfolder else filename, f"the file asked of {path_or_id}")
    rel = Path(entry)
    if local.is_dir():
        path = local / rel
        _check_inside(path, local, entry)
        if path.is_file():
            return path
        if required:
            raise FileNotFoundError(f"{path} does not exist (looked in the local folder {local})")
        return None

    repo_id = str(path_or_id)
    if not _HUB_ID.match(repo_id):
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder nor a Hugging Face Hub id of the form 'owner/name'"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = local_files_only or _hub_offline()
    try:
        path = Path(
            hf_hub_download(
                repo_id, filename, subfolder=subfolder or None, local_files_only=local_files_only, **(hub or {})
            )
        )
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: catch it first)
        if required:
            where = "and the Hub is offline" if offline else "and the Hub could not be reached"
            raise FileNotFoundError(
                f"{rel.as_posix()} of the Hub repo {repo_id} is not in the local Hugging Face cache "
                f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}) {where}"
            ) from None
        return None
    except EntryNotFoundError:
        if required:
            raise FileNotFoundError(f"the Hub repo {repo_id} has no file {rel.as_posix()}") from None
        return None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"the Hub repo {repo_id} does not exist or is not accessible") from None
    except RevisionNotFoundError:
        revision = (hub or {}).get("revision")
        raise FileNotFoundError(f"the Hub repo {repo_id} has no revision {revision!r}") from None
    _check_inside(path, path.parents[len(rel.parts) - 1], entry)  # the snapshot folder it came from
    return path


def load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the JSON file {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def load_config(
    path_or_id: str | os.PathLike,
    subfolder: str | None = None,
    filename: str = "config.json",
    local_files_only: bool = False,
    hub: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON config of a folder or Hub repo (and subfolder), as a plain dict."""
    path = resolve_file(path_or_id, filename, subfolder, local_files_only=local_files_only, hub=hub)
    return load_json(path)


def with_variant(name: str, variant: str | None) -> str:
    """diffusers' naming: model.safetensors -> model.fp16.safetensors, x.index.json -> x.index.fp16.json."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def weight_formats(use_safetensors: bool | None) -> tuple[str, ...]:
    """diffusers' `use_safetensors`: True only safetensors, False only pickles, None both (safetensors first)."""
    if use_safetensors not in (True, False, None):
        raise TypeError(f"use_safetensors must be True, False or None, got {use_safetensors!r}")
    return {True: ("safetensors",), False: ("bin",), None: ("safetensors", "bin")}[use_safetensors]


def find_weight_files(
    path_or_id: str | os.PathLike,
    subfolder: str | None = None,
    weight_names: tuple[str, ...] = ("diffusion_pytorch_model",),
    variant: str | None = None,
    local_files_only: bool = False,
    use_safetensors: bool | None = None,
    hub: dict[str, Any] | None = None,
) -> list[Path]:
    """The files of one weight format: safetensors before pickles, a single file before shards."""
    tried = []

    def get(name: str, required: bool = False) -> Path | None:
        return resolve_file(path_or_id, name, subfolder, local_files_only=local_files_only, required=required, hub=hub)

    for ext in weight_formats(use_safetensors):
        for name in weight_names:
            single = with_variant(f"{name}.{ext}", variant)
            tried.append(single)
            path = get(single)
            if path is not None:
                return [path]
            index_name = with_variant(f"{name}.{ext}.index.json", variant)
            tried.append(index_name)
            index = get(index_name)
            if index is not None:
                weight_map = load_json(index).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise CheckpointError(f"{index} has no 'weight_map'")
                # every name checked before any shard is looked up or opened
                shards = sorted({check_entry(v, f"the weight_map of {index} ({k!r})") for k, v in weight_map.items()})
                return [get(shard, required=True) for shard in shards]  # type: ignore[misc]
    where = f"{path_or_id}" + (f"/{subfolder}" if subfolder else "")
    only = {True: " (use_safetensors=True: safetensors only)", False: " (use_safetensors=False: pickles only)"}
    raise FileNotFoundError(f"no weights in {where}{only.get(use_safetensors, '')}: looked for {', '.join(tried)}")


def read_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """Read one weight file. safetensors directly; pickles only through torch.load(weights_only=True)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"cannot open the weight file {path}: {e}") from e
    if not head:
        raise CheckpointError(f"the weight file {path} is empty")
    if head.startswith(_LFS_POINTER):
        raise CheckpointError(f"{path} is a Git LFS pointer, not the weights: fetch the real file (git lfs pull)")
    is_pickle_like = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
    if path.suffix == ".safetensors":
        # a safetensors file opens with its header's length (8 bytes, little-endian) then the JSON header:
        # that length may well start with byte 0x80, so only a file without the '{' is taken for a pickle
        if is_pickle_like and head[8:9] != b"{":
            raise CheckpointError(f"{path} is named .safetensors but holds a pickle/zip archive; refusing it")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from e
    if not is_pickle_like:
        raise CheckpointError(f"{path} is neither a safetensors file nor a PyTorch pickle")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain containers, "
            f"and pickles are only read with weights_only=True ({str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """Merge the tensors of one or more (sharded) weight files; a key in two shards is an error."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        part = read_tensors(path)
        if not isinstance(part, dict):
            raise CheckpointError(f"{path} does not hold a dict of tensors")
        for key, value in part.items():
            if key in state:
                raise CheckpointError(f"the key {key!r} appears in more than one shard (again in {path})")
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor")
            state[key] = value
    return state


# -- the Hub: a whole pipeline at once --------------------------------------------------------

# formats diffusers never reads into PyTorch: not downloaded
_FOREIGN_FORMATS = ("*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb", "*.ot", "*.ckpt", "*.pt")


def _component_weight_patterns(
    name: str, listing: list[str] | None, use_safetensors: bool | None, variant: str | None
) -> list[str]:
    """The weight files of the component folder `name` worth downloading. With the repo's file list
    (online): the files of the one format and variant find_weight_files will pick, by name. Offline:
    every weight file (nothing is downloaded then, the cache is only read)."""
    formats = weight_formats(use_safetensors)
    if listing is None:
        return [f"{name}/*.{ext}" for ext in formats] + [f"{name}/*.{ext}.index*.json" for ext in formats]
    tag = rf"\.{re.escape(variant)}" if variant else ""
    index_tag = tag.replace(r"\.", r"\.index\.", 1) if variant else r"\.index"
    for ext in formats:
        # stem[.variant].ext, stem[.variant]-00001-of-00002.ext, stem.ext.index[.variant].json
        weights = rf"{tag}(?:-\d{{5}}-of-\d{{5}})?\.{ext}"
        wanted = re.compile(rf"{re.escape(name)}/[^./]+(?:{weights}|\.{ext}{index_tag}\.json)")
        found = [f for f in listing if wanted.fullmatch(f)]
        if found:
            return found
    return []  # nothing to fetch: find_weight_files then names what it looked for


def download_pipeline(
    repo_id: str,
    components: list[str],
    *,
    use_safetensors: bool | None = None,
    variant: str | None = None,
    local_files_only: bool = False,
    hub: dict[str, Any] | None = None,
) -> Path:
    """The local snapshot folder of a Hub pipeline, holding model_index.json and, for each named
    component folder, its configs / tokenizer files and the weights of one format (diffusers'
    `DiffusionPipeline.download`). Offline (HF_HUB_OFFLINE=1 or local_files_only) it reads the cache."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    hub = dict(hub or {})
    offline = local_files_only or _hub_offline()
    listing = None
    if not offline:
        api_keys = {k: hub[k] for k in ("revision", "token") if k in hub}
        try:
            listing = HfApi().list_repo_files(repo_id, **api_keys)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise
        except Exception:  # no connection: the cache may still hold it, as diffusers falls back
            offline = True
    patterns = ["model_index.json"]
    for name in components:
        check_entry(name, f"the component folder asked of {repo_id}")
        patterns += [f"{name}/*.json", f"{name}/*.txt", f"{name}/*.model"]
        patterns += _component_weight_patterns(name, listing, use_safetensors, variant)
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=patterns,
            ignore_patterns=list(_FOREIGN_FORMATS),
            local_files_only=offline,
            **hub,
        )
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"the Hub repo {repo_id} does not exist or is not accessible") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"the Hub repo {repo_id} has no revision {hub.get('revision')!r}") from None
    except LocalEntryNotFoundError:
        revision = hub.get("revision") or "main"
        raise FileNotFoundError(
            f"the Hub repo {repo_id} (revision {revision!r}) is not in the local Hugging Face cache "
            f"({hub.get('cache_dir') or os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface'}) and the Hub is "
            f"{'offline' if local_files_only or _hub_offline() else 'not reachable'}"
        ) from None
    return Path(folder)


# -- diffusers' from_pretrained keywords ---------------------------------------------------------


@dataclass(frozen=True)
class LoadOptions:
    """The keywords diffusers' `from_pretrained` takes for reading files (models and pipelines alike)."""

    dtype: torch.dtype | None = None
    variant: str | None = None
    use_safetensors: bool | None = None
    local_files_only: bool = False
    hub: dict[str, Any] = field(default_factory=dict)  # revision, token, cache_dir, force_download

    @classmethod
    def pop(cls, kwargs: dict[str, Any], what: str) -> LoadOptions:
        """Take the loading keywords out of `kwargs` (what is left is for the caller to judge).

        `dtype` is diffusers' new name of `torch_dtype` (both: an error, as diffusers' pipelines raise);
        `use_auth_token` the older spelling of `token`; `low_cpu_mem_usage` is accepted either way,
        minidiff always builds on the meta device and adopts the loaded tensors (no random init)."""
        torch_dtype, dtype = kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None)
        if torch_dtype is not None and dtype is not None:
            raise ValueError(f"{what}: pass `dtype` or `torch_dtype` (its older name), not both")
        dtype = dtype if dtype is not None else torch_dtype
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"{what}: dtype must be a torch.dtype such as torch.float16, got {dtype!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"{what}: dtype must be a floating-point type, got {dtype}")
        token, old_token = kwargs.pop("token", None), kwargs.pop("use_auth_token", None)
        if token is not None and old_token is not None and token != old_token:
            raise ValueError(f"{what}: pass `token` or `use_auth_token` (its older name), not both")
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", True)
        if not isinstance(low_cpu_mem_usage, bool):
            raise TypeError(f"{what}: low_cpu_mem_usage must be True or False, got {low_cpu_mem_usage!r}")
        hub = {"token": token if token is not None else old_token}
        hub |= {k: kwargs.pop(k, None) for k in ("revision", "cache_dir")}
        hub["force_download"] = kwargs.pop("force_download", False)
        variant = kwargs.pop("variant", None)
        if variant is not None and (not isinstance(variant, str) or not re.fullmatch(r"[\w\-]+", variant)):
            raise ValueError(f"{what}: variant must be a short name such as 'fp16', got {variant!r}")
        use_safetensors = kwargs.pop("use_safetensors", None)
        weight_formats(use_safetensors)  # checks the value
        local_files_only = bool(kwargs.pop("local_files_only", False))
        hub = {k: v for k, v in hub.items() if v not in (None, False)}
        return cls(dtype, variant, use_safetensors, local_files_only, hub)
