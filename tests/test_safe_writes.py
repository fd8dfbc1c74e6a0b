"""Never lose a file: atomic writes (minidiff.files), save_pretrained, `minidiff convert`, CLI errors.

Every data-loss case runs with an injected failure (a writer monkeypatched to write half its bytes
and raise, or a real `ulimit -f` write limit in a subprocess) and proves that the old file or folder
is byte-identical afterwards and that no temporary file is left. The CLI cases check the one-line
error and its exit status (2 for a bad argument, 1 for a failure) and that no model was loaded.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import TINY_COND_UNET, TINY_UNET_2D, clip_config, vae_config

import minidiff
from minidiff import AutoencoderKL, CLIPTextModel, UNet2DConditionModel, cli, files
from minidiff.cli import main
from minidiff.files import DestinationError
from minidiff.single_file import save_single_file, to_ldm_state_dict

ROOT = Path(__file__).resolve().parents[1]


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` (or the file itself) -> sha256 of its bytes; folders as "dir"."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(files.TMP_PREFIX))


def half_then_fail(real):
    """A writer (torch.save or safetensors' save_file) that writes half of what `real` would, then
    fails as a full disk does."""
    pickled = real is torch.save

    def write(obj, target, *args, **kwargs):
        if pickled:
            buffer = io.BytesIO()
            real(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
        else:
            data = safetensors.torch.save(obj, *args, **kwargs)
        if hasattr(target, "write"):
            target.write(data[: len(data) // 2])
        else:
            Path(target).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    return write


SAVE_HALF, SAVE_FILE_HALF = half_then_fail(torch.save), half_then_fail(safetensors.torch.save_file)


# ---------------------------------------------------------------- a tiny SD model LDM files can describe


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    unet_config = TINY_COND_UNET | dict(
        sample_size=64, norm_num_groups=32, cross_attention_dim=64, attention_head_dim=8
    )
    unet = UNet2DConditionModel._config_from_dict(unet_config)
    vae = AutoencoderKL._config_from_dict(vae_config((32, 32), norm_num_groups=32, sample_size=512))
    text_config = clip_config(64, 1, 1, hidden_act="quick_gelu", projection_dim=768, pad_token_id=1)
    text = CLIPTextModel._config_from_dict(text_config)
    return dict(unet=UNet2DConditionModel(unet), vae=AutoencoderKL(vae), text_encoder=CLIPTextModel(text))


@pytest.fixture(scope="module")
def sd_file(models, tmp_path_factory) -> Path:
    return save_single_file(to_ldm_state_dict(**models), tmp_path_factory.mktemp("ldm") / "model.safetensors")


@pytest.fixture(scope="module")
def sd_folder(sd_file, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("diffusers") / "sd"
    assert main(["convert", str(sd_file), str(folder)]) == 0
    return folder


def copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    return dst


# ---------------------------------------------------------------- minidiff.files


def test_a_failed_file_write_leaves_the_old_file(tmp_path):
    path = files.write_text(tmp_path / "a.json", "old\n")
    with pytest.raises(OSError, match="injected"):
        with files.atomic_file(path) as tmp:
            tmp.write_bytes(b"new, but only ha")
            raise OSError("injected")
    assert path.read_text() == "old\n" and leftovers(tmp_path) == []
    files.write_text(path, "new\n")
    assert path.read_text() == "new\n" and leftovers(tmp_path) == []
    with pytest.raises(DestinationError, match="exists; pass overwrite=True"):
        files.write_text(path, "newer\n", overwrite=False)
    assert path.read_text() == "new\n"


def test_permissions_are_the_usual_ones(tmp_path):
    path = files.write_bytes(tmp_path / "a.bin", b"x")
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    path.chmod(0o640)
    files.write_bytes(path, b"y")  # a replaced file keeps its mode
    assert path.stat().st_mode & 0o777 == 0o640
    with files.atomic_folder(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_folder_swap(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "model_index.json").write_text("{}")
    (dst / "stale.fp16.safetensors").write_text("old")
    before = tree(dst)
    with pytest.raises(RuntimeError, match="midway"):
        with files.atomic_folder(dst, overwrite=True) as tmp:
            (tmp / "model_index.json").write_text('{"new": 1}')
            raise RuntimeError("midway")
    assert tree(dst) == before and leftovers(tmp_path) == []
    with pytest.raises(DestinationError, match="exists and is not empty"):
        with files.atomic_folder(dst) as tmp:
            pass
    with files.atomic_folder(dst, overwrite=True) as tmp:
        (tmp / "model_index.json").write_text('{"new": 1}')
    assert sorted(tree(dst)) == ["model_index.json"] and leftovers(tmp_path) == []  # the stale file went


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    """Without renameat2 the swap is two renames: if the second fails the first is undone."""
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "model_index.json").write_text("{}")
    before = tree(dst)
    real_rename = os.rename

    def rename(a, b):
        if Path(a).name.endswith(".tmp"):
            raise OSError(errno.EIO, "injected I/O error")
        return real_rename(a, b)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        with files.atomic_folder(dst, overwrite=True) as tmp:
            (tmp / "model_index.json").write_text('{"new": 1}')
    assert tree(dst) == before and leftovers(tmp_path) == []


def test_replacing_needs_the_marker(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    with pytest.raises(DestinationError, match="has no model_index.json"):
        files.check_folder_destination(home, overwrite=True, marker="model_index.json")
    assert (home / "notes.txt").read_text() == "precious"


def test_nesting_is_refused(tmp_path):
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    for dst, what in [(src, "is the source"), (src / "unet" / "x.ckpt", "inside the source"), (tmp_path, "source")]:
        with pytest.raises(DestinationError, match=what):
            files.check_not_nested(src, dst)
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(DestinationError, match="inside the source"):
        files.check_not_nested(src, tmp_path / "link" / "m.safetensors")
    files.check_not_nested(src, tmp_path / "other")


# ---------------------------------------------------------------- save_pretrained


def test_save_pretrained_writes_into_a_folder_as_diffusers_does(models, tmp_path):
    unet = models["unet"]
    unet.save_pretrained(tmp_path)  # tmp_path exists: written into
    unet.save_pretrained(tmp_path, variant="fp16")  # again: both variants side by side
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors",
    ]
    with pytest.raises(DestinationError, match="not empty"):
        unet.save_pretrained(tmp_path, overwrite=False)
    unet.save_pretrained(tmp_path, overwrite=True)  # the whole folder replaced: the variant is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_save_pretrained_failing_midway_keeps_the_old_weights(models, tmp_path, monkeypatch):
    unet = models["unet"]
    unet.save_pretrained(tmp_path / "in")
    before = tree(tmp_path / "in")
    monkeypatch.setattr(safetensors.torch, "save_file", SAVE_FILE_HALF)
    for overwrite in (None, True):
        with pytest.raises(OSError, match="injected"):
            unet.save_pretrained(tmp_path / "in", overwrite=overwrite)
        assert tree(tmp_path / "in") == before and leftovers(tmp_path) == leftovers(tmp_path / "in") == []
    with pytest.raises(OSError, match="injected"):
        unet.save_pretrained(tmp_path / "new")  # a new folder appears complete or not at all
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_pipeline_save_pretrained_overwrite(sd_folder, tmp_path, monkeypatch):
    pipe = minidiff.StableDiffusionPipeline.from_pretrained(sd_folder)
    out = copy(sd_folder, tmp_path / "sd")
    (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"an old variant")
    before = tree(out)
    monkeypatch.setattr(torch, "save", SAVE_HALF)
    monkeypatch.setattr(safetensors.torch, "save_file", SAVE_FILE_HALF)
    with pytest.raises(OSError, match="injected"):
        pipe.save_pretrained(out, overwrite=True)
    assert tree(out) == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    pipe.save_pretrained(out, overwrite=True)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in tree(out)
    assert minidiff.StableDiffusionPipeline.from_pretrained(out).unet.config == pipe.unet.config


# ---------------------------------------------------------------- minidiff convert


def cli_error(args: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in this process: (exit status, what it printed on stderr), which must be one line."""
    with pytest.raises(SystemExit) as e:
        main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line and "it/s]" not in line]  # no bars
    assert len(lines) == 1, lines
    return e.value.code, lines[0]


def test_convert_refuses_an_existing_file_unless_overwrite(sd_folder, sd_file, tmp_path, capsys, monkeypatch):
    dst = copy(sd_file, tmp_path / "old.safetensors")
    before = tree(dst)
    monkeypatch.setattr(cli, "load_folder_models", lambda *a, **k: pytest.fail("loaded before the error"))
    code, err = cli_error(["convert", str(sd_folder), str(dst)], capsys)
    assert code == 2 and "exists; pass --overwrite" in err and tree(dst) == before
    monkeypatch.undo()
    assert main(["convert", str(sd_folder), str(dst), "--overwrite"]) == 0
    assert tree(dst) == before  # the same weights, written again: the same bytes


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_convert_failing_midway_keeps_the_old_file(sd_folder, sd_file, tmp_path, capsys, monkeypatch, suffix):
    dst = tmp_path / f"old{suffix}"
    dst.write_bytes(b"a good checkpoint")
    monkeypatch.setattr(torch, "save", SAVE_HALF)
    monkeypatch.setattr(safetensors.torch, "save_file", SAVE_FILE_HALF)
    code, err = cli_error(["convert", str(sd_folder), str(dst), "--overwrite"], capsys)
    assert code == 1 and "No space left on device" in err
    assert dst.read_bytes() == b"a good checkpoint" and leftovers(tmp_path) == []


def test_convert_a_folder_into_itself_is_refused(sd_folder, tmp_path, capsys):
    src = copy(sd_folder, tmp_path / "sd")
    before = tree(src)
    for dst in (src / "unet" / "diffusion_pytorch_model.safetensors", src / "model.ckpt"):
        code, err = cli_error(["convert", str(src), str(dst), "--overwrite"], capsys)
        assert code == 2 and "inside the source" in err
    assert tree(src) == before


def test_convert_into_an_existing_folder(sd_file, sd_folder, tmp_path, capsys, monkeypatch):
    dst = copy(sd_folder, tmp_path / "sd")
    (dst / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"an old variant")
    before = tree(dst)
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("loaded before the error"))
    code, err = cli_error(["convert", str(sd_file), str(dst)], capsys)
    assert code == 2 and "not empty; pass --overwrite" in err and tree(dst) == before
    monkeypatch.undo()
    # a failure midway: the old folder, stale variant and all, exactly as it was
    monkeypatch.setattr(safetensors.torch, "save_file", SAVE_FILE_HALF)
    code, err = cli_error(["convert", str(sd_file), str(dst), "--overwrite"], capsys)
    assert code == 1 and tree(dst) == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    assert main(["convert", str(sd_file), str(dst), "--overwrite"]) == 0
    after = tree(dst)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in after  # no stale file
    assert {k: v for k, v in before.items() if "fp16" not in k} == after
    with pytest.raises(FileNotFoundError):
        minidiff.UNet2DConditionModel.from_pretrained(dst, subfolder="unet", variant="fp16")


def test_convert_never_replaces_a_folder_it_did_not_write_nor_the_source(sd_file, tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    code, err = cli_error(["convert", str(sd_file), str(home), "--overwrite"], capsys)
    assert code == 2 and "has no model_index.json" in err
    src = copy(sd_file, home / "model.safetensors")
    (home / "model_index.json").write_text("{}")
    code, err = cli_error(["convert", str(src), str(home), "--overwrite"], capsys)
    assert code == 2 and "inside the destination" in err
    assert (home / "notes.txt").read_text() == "precious" and src.is_file()


def _limited(cmd: list[str], kib: int) -> subprocess.CompletedProcess:
    """Run `python -m minidiff ...` with a real file size limit (ulimit -f, in KiB)."""
    script = f"ulimit -f {kib} && exec {sys.executable} -m minidiff " + " ".join(cmd)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_a_real_write_limit_keeps_the_old_file_and_folder(sd_file, sd_folder, tmp_path):
    """ulimit -f below the size of the weights: the write fails for real (EFBIG) in both directions."""
    old_file = copy(sd_file, tmp_path / "old.ckpt")
    old_file.write_bytes(old_file.read_bytes()[:1000])  # any old content: it must survive as it is
    old_folder = copy(sd_folder, tmp_path / "sd")
    before = tree(old_file), tree(old_folder)
    for cmd in (
        [str(sd_folder), str(old_file), "--overwrite"],
        [str(sd_file), str(old_folder), "--overwrite"],
    ):
        done = _limited(["convert", *cmd], kib=1024)
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("minidiff convert: ")
        assert "File too large" in done.stderr
    assert (tree(old_file), tree(old_folder)) == before and leftovers(tmp_path) == []


# ---------------------------------------------------------------- CLI errors: one line, exit 2 or 1


@pytest.fixture
def no_model(monkeypatch):
    for cls in (minidiff.StableDiffusionPipeline, minidiff.DDPMPipeline):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded before the error"))


@pytest.mark.parametrize(
    "args, error",
    [
        (["--output", "/proc/x.png"], "--output cannot write into /proc"),
        (["--output", "{tmp}"], "is a folder; --output names the image file"),
        (["--output", "{tmp}/x.unknown"], "PIL cannot write '.unknown' images"),
        (["--output", "{tmp}/x"], "has no extension"),
        (["--output", "{tmp}/file.txt/x.png"], "is not a folder"),
        (["--seed", str(2**70)], r"--seed must be in \[0, 2\*\*63\), got 1180591620717411303424"),
        (["--seed", "-1"], r"--seed must be in \[0, 2\*\*63\)"),
        (["--num-images", "0"], "--num-images must be at least 1, got 0"),
        (["--steps", "-3"], "--steps must be at least 1, got -3"),
        (["--height", "-64"], "--height must be a positive multiple of 8, got -64"),
        (["--width", "30"], "--width must be a positive multiple of 8, got 30"),
        (["--guidance", "nan"], "--guidance must be a finite number"),
        (["--dtype", "fp8"], "unknown --dtype 'fp8'"),
        (["--device", "gpu0"], "--device 'gpu0'"),
        (["--scheduler", "magic"], r"--scheduler.*'magic'"),
        (["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
        (["--model", "{tmp}/missing"], "neither a local folder nor a Hugging Face Hub id"),
        (["--model", "{ddpm}"], "is a DDPMPipeline folder .*try `minidiff ddpm MODEL`"),
    ],
)
def test_generate_bad_arguments(args, error, tmp_path, capsys, no_model, ddpm_folder):
    (tmp_path / "file.txt").write_text("x")
    args = [a.format(tmp=tmp_path, ddpm=ddpm_folder) for a in args]
    code, err = cli_error(["generate", "a red circle", *args], capsys)
    assert code == 2
    assert err.startswith("minidiff") and re.search(error, err), err
    assert not (tmp_path / "minidiff.png").exists()


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory) -> Path:
    unet = minidiff.UNet2DModel(**TINY_UNET_2D)
    folder = tmp_path_factory.mktemp("ddpm") / "ddpm"
    minidiff.DDPMPipeline(unet=unet, scheduler=minidiff.DDPMScheduler(num_train_timesteps=10)).save_pretrained(folder)
    return folder


def test_ddpm_pointed_at_an_sd_folder(capsys, tmp_path, no_model):
    code, err = cli_error(["ddpm", minidiff.DEFAULT_MODEL, "--output", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "is a StableDiffusionPipeline folder" in err and "needs a UNet2DModel" in err


def test_a_size_the_pipeline_refuses_is_one_line(capsys, tmp_path):
    """The pipeline's own bound (not the CLI's): surfaced as one line, exit 2, no image."""
    out = tmp_path / "x.png"
    code, err = cli_error(["generate", "x", "--height", "100000", "--width", "100000", "--output", str(out)], capsys)
    assert code == 2 and "100000" in err and not out.exists()


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--num-images", "0", "--debug"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == "minidiff generate: --num-images must be at least 1, got 0"


def test_exit_status_of_the_real_process(tmp_path, sd_file):
    """Through the interpreter: the status is 2 for a bad argument, 1 for a failure; one line on stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "minidiff", *a], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    bad = run("generate", "x", "--num-images", "0")
    assert (bad.returncode, bad.stderr) == (2, "minidiff generate: --num-images must be at least 1, got 0\n")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(sd_file.read_bytes()[:5000])
    failed = run("convert", str(broken), str(tmp_path / "out"))
    assert failed.returncode == 1 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert failed.stderr.startswith("minidiff convert: ") and "truncated or corrupt" in failed.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_generated_images_are_written_atomically(tmp_path, capsys, monkeypatch):
    out = tmp_path / "x.png"
    out.write_bytes(b"an old image")
    real_save = files.Image.Image.save

    def save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        if isinstance(fp, io.BytesIO):  # the check of the format before generating
            return
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(files.Image.Image, "save", save)
    code, err = cli_error(["generate", "x", "--steps", "1", "--output", str(out)], capsys)
    assert code == 1 and "No space left" in err
    assert out.read_bytes() == b"an old image" and leftovers(tmp_path) == []
