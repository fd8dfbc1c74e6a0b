"""Writing files so that a failure never loses one: everything minidiff writes goes through here.

- A file is written under a temporary name in its destination's folder, flushed to disk (fsync) and
  only then renamed over the destination (`atomic_file`, `write_bytes`, `write_text`, `save_image`):
  a reader, or a crash, sees the old file or the complete new one, never a truncated mix.
- A folder (`atomic_folder`) is written as a temporary sibling folder and swapped in when complete;
  a folder it replaces goes only after the swap, so nothing stale from it stays behind.
- An existing destination is refused unless `overwrite=True`, and a destination inside the folder
  being read (or a source inside the destination) is refused (`check_not_nested`).
`output_folder` keeps diffusers' `save_pretrained` habit of writing into an existing folder when it
is not told to overwrite or refuse: then every file is still replaced atomically, one at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

TMP_PREFIX = ".minidiff-"  # temporary files and folders: ".minidiff-<name>.<random>.tmp"


class DestinationError(ValueError):
    """An output path that cannot be written as asked (exists, is a folder, is inside the source...)."""


def fsync(path: Path) -> None:
    """fsync a file or a folder (a folder after a rename into it makes the rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> str:
    return f"{TMP_PREFIX}{path.name}."


def _default_mode(folder: bool) -> int:
    """What open() / mkdir() would give under the umask (mkstemp / mkdtemp make 0600 / 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def check_not_nested(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Refuse writing `destination` when it is `source`, lies inside it, or holds it (symlinks followed)."""
    src, dst = Path(os.path.realpath(source)), Path(os.path.realpath(destination))
    if dst == src:
        raise DestinationError(f"the destination {destination} is the source itself")
    if dst.is_relative_to(src):
        raise DestinationError(f"the destination {destination} is inside the source {source}, which it would change")
    if src.is_relative_to(dst):
        raise DestinationError(f"the source {source} is inside the destination {destination}, which would replace it")


def check_file_destination(
    path: str | os.PathLike, overwrite: bool = False, sources: Iterable[str | os.PathLike] = ()
) -> Path:
    """A file destination: not a folder; existing only with overwrite; its folder writable (or
    creatable); not inside a source folder."""
    path = Path(path)
    for source in sources:
        check_not_nested(source, path)
    if path.is_dir():
        raise DestinationError(f"{path} is a folder, not a file")
    if os.path.lexists(path) and not overwrite:
        raise DestinationError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    check_writable_folder(path.parent)
    return path


def check_writable_folder(folder: str | os.PathLike) -> None:
    """The nearest existing ancestor of `folder` must be a folder in which a file can be created."""
    folder = Path(os.path.abspath(folder))
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DestinationError(f"cannot write into {folder}: {existing} is not a folder")
    try:  # a real probe: permissions, read-only and pseudo file systems (/proc) all show up here
        with tempfile.NamedTemporaryFile(prefix=TMP_PREFIX + "probe.", dir=existing):
            pass
    except OSError as e:
        raise DestinationError(
            f"cannot write into {folder} (creating a file in {existing}: {e.strerror or e})"
        ) from None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """`with atomic_file(dst) as tmp: write(tmp)`: on success tmp is fsync'ed and renamed onto dst;
    on any failure tmp is removed and dst is untouched. overwrite=False never replaces an existing dst."""
    path = Path(path)
    if path.is_dir():
        raise DestinationError(f"{path} is a folder, not a file")
    if not overwrite and os.path.lexists(path):
        raise DestinationError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_tmp_name(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    # a replaced file keeps its permissions, a new one gets the usual ones
    mode = stat.S_IMODE(os.stat(path).st_mode) if path.is_file() else _default_mode(folder=False)
    try:
        yield tmp
        os.chmod(tmp, mode)  # after the writer: some (safetensors) replace the file they are given
        fsync(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync(path.parent)


def _place_new(tmp: Path, path: Path) -> None:
    """Rename tmp to path only if path does not exist (a hard link fails if it appeared meanwhile)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise DestinationError(f"{path} exists; pass overwrite=True (--overwrite) to replace it") from None
    except OSError:  # no hard links on this file system
        if os.path.lexists(path):
            raise DestinationError(f"{path} exists; pass overwrite=True (--overwrite) to replace it") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    with atomic_file(path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), overwrite)


class _Recording:
    """A file object that remembers the OSError of a failed write (torch.save reports only its own
    "enforce fail ... unexpected pos" RuntimeError, not the full disk or the file size limit)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj: Any, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """torch.save, atomically. Written through a file object, so the archive inside is named
    "archive" whatever the file's (temporary) name: the same tensors give the same bytes."""
    with atomic_file(path, overwrite) as tmp, open(tmp, "wb") as f:
        writer = _Recording(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as e:
            if writer.error is not None:
                raise writer.error from e
            raise
    return Path(path)


def image_format(path: str | os.PathLike) -> str:
    """The PIL format a file name's extension asks for, if PIL can write it; else DestinationError."""
    suffix = Path(path).suffix.lower()
    if not suffix:
        raise DestinationError(f"{path} has no extension: name the image format, e.g. {Path(path).name}.png")
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise DestinationError(f"{path}: PIL cannot write {suffix!r} images (use .png, .jpg, .webp, ...)")
    try:  # the format may still refuse an RGB image (e.g. .xbm is 1-bit): find out now, not after the work
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError) as e:
        raise DestinationError(f"{path}: PIL cannot write an RGB image as {fmt}: {e}") from None
    return fmt


def save_image(image: Any, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """A PIL image, written atomically in the format its extension names."""
    fmt = image_format(path)
    with atomic_file(path, overwrite) as tmp:
        image.save(tmp, format=fmt)
    return Path(path)


def _fsync_tree(folder: Path) -> None:
    for root, _, names in os.walk(folder):
        for name in names:
            if not os.path.islink(os.path.join(root, name)):
                fsync(Path(root, name))
        fsync(Path(root))


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(new: Path, dst: Path) -> None:
    """Put the complete folder `new` at `dst`; an old `dst` is removed only once `new` is in place."""
    if not os.path.lexists(dst):
        os.rename(new, dst)
        return
    if not _exchange(new, dst):  # two renames; the old folder is put back if the second fails
        old = Path(tempfile.mkdtemp(prefix=_tmp_name(dst), suffix=".old", dir=dst.parent))
        os.rename(dst, old / "x")
        try:
            os.rename(new, dst)
        except BaseException:
            os.rename(old / "x", dst)
            old.rmdir()
            raise
        new = old
    fsync(dst.parent)
    shutil.rmtree(new, ignore_errors=True)  # now the old folder


def check_folder_destination(
    path: str | os.PathLike,
    overwrite: bool = False,
    sources: Iterable[str | os.PathLike] = (),
    marker: str | None = None,
) -> Path:
    """A folder destination: not a file; a non-empty one only with overwrite (and, with `marker`, only
    if it holds that file: never replace a folder minidiff did not write); not nested with a source."""
    path = Path(path)
    for source in sources:
        check_not_nested(source, path)
    if not os.path.lexists(path):
        check_writable_folder(path.parent)
        return path
    if not path.is_dir():
        raise DestinationError(f"{path} exists and is not a folder")
    if not any(path.iterdir()):
        return path  # an empty folder: nothing to lose
    if not overwrite:
        raise DestinationError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    if marker is not None and not (path / marker).is_file():
        raise DestinationError(f"refusing to replace {path}: it has no {marker}, so it is not a folder minidiff wrote")
    return path


@contextlib.contextmanager
def atomic_folder(
    path: str | os.PathLike,
    overwrite: bool = False,
    sources: Iterable[str | os.PathLike] = (),
    marker: str | None = None,
) -> Iterator[Path]:
    """`with atomic_folder(dst) as tmp: write into tmp`: tmp is a sibling of dst, swapped in when the
    block succeeds and removed when it fails (dst then untouched). An existing non-empty dst is refused
    unless overwrite (and, with `marker`, unless it holds that file); so is dst nested with a source."""
    path = check_folder_destination(path, overwrite, sources, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, _default_mode(folder=True))
    try:
        yield tmp
        _fsync_tree(tmp)
        check_folder_destination(path, overwrite, (), marker)  # again: it may have appeared meanwhile
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, overwrite: bool | None = None, marker: str | None = None) -> Iterator[Path]:
    """Where save_pretrained writes. overwrite=None (diffusers' way): into an existing folder, file by
    atomic file; a new folder appears complete or not at all. False: refuse a non-empty folder. True:
    build the new folder beside it and swap it in whole (no stale files)."""
    path = Path(path)
    if overwrite is None and path.is_dir():
        yield path
        return
    with atomic_folder(path, overwrite=bool(overwrite), marker=marker) as tmp:
        yield tmp
