"""`minidiff generate --model <SDXL folder>` and `--refiner <folder>`: the PNG the CLI writes is the
Python API's image (same seed, same recipe), on the tiny perturbed SDXL folders of test_sdxl_pipelines;
the models' kinds are told apart before any weight loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REFERENCE_CONFIGS
from PIL import Image
from test_sdxl_pipelines import save_tiny_sdxl

from minidiff import cli_generate
from minidiff.cli import main
from minidiff.cli_generate import FAMILY_PIPELINES, CLIError, find_model
from minidiff.pipelines import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-cli")
    return {kind: save_tiny_sdxl(root / kind, kind, seed) for seed, kind in enumerate(("base", "refiner"))}


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def api_png(images) -> np.ndarray:
    return np.asarray(images[0])  # PIL, rounded as the CLI's


def test_generate_sdxl_folder_equals_api(folders, tmp_path):
    out = tmp_path / "base.png"
    assert (
        main(
            ["generate", "a cat", "--model", str(folders["base"]), "--steps", "3", "--seed", "7", "--output", str(out)]
        )
        == 0
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(folders["base"])
    pipe.set_progress_bar_config(disable=True)
    # the CLI's defaults for SDXL: diffusers' guidance 5.0, the UNet's size
    expected = pipe("a cat", num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(7))
    assert np.array_equal(png(out), api_png(expected.images))


def test_generate_with_refiner_equals_two_stage_api(folders, tmp_path):
    out = tmp_path / "refined.png"
    argv = ["generate", "a lighthouse", "--model", str(folders["base"]), "--refiner", str(folders["refiner"])]
    argv += [
        "--steps",
        "5",
        "--refiner-split",
        "0.6",
        "--guidance",
        "4",
        "--negative-prompt",
        "fog",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    base = StableDiffusionXLPipeline.from_pretrained(folders["base"])
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(folders["refiner"])
    for p in (base, refiner):
        p.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    call = dict(negative_prompt="fog", num_inference_steps=5, guidance_scale=4.0, generator=generator)
    latents = base("a lighthouse", denoising_end=0.6, output_type="latent", **call).images
    expected = refiner("a lighthouse", image=latents, denoising_start=0.6, **call).images
    assert np.array_equal(png(out), api_png(expected))
    # and the refiner did something: the base's own image differs
    plain = base("a lighthouse", **{**call, "generator": torch.Generator().manual_seed(0)}).images
    assert not np.array_equal(png(out), api_png(plain))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{refiner}"], "is an SDXL refiner"),
        (["--refiner", "{refiner}"], "--refiner goes with an SDXL base model"),  # the default SD model as --model
        (["--model", "{base}", "--refiner", "{refiner}", "--refiner-split", "1.0"], "--refiner-split must be between"),
        (["--model", "{base}", "--refiner", "{refiner}", "--prompts", "p.txt", "--outdir", "o"], "does not go with"),
    ],
)
def test_generate_refuses_the_wrong_kinds_before_loading(folders, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a cat\n")
    refuse = lambda *a, **k: pytest.fail("a model was loaded before the error")  # noqa: E731
    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", classmethod(refuse))
    argv = ["generate", *([] if "--prompts" in args else ["a cat"])]
    argv += [a.format(base=folders["base"], refiner=folders["refiner"]) for a in args]
    with pytest.raises(CLIError, match=message):
        main(argv)


def test_generate_single_file_goes_to_load_pipeline(folders, tmp_path, monkeypatch):
    """A file as --model is read once, its family picks the class, and load_pipeline builds it (the file
    formats themselves are test_sdxl_single_file's)."""
    fake = tmp_path / "sdxl-base.safetensors"
    fake.write_bytes(b"not read")
    read = type("Read", (), {"family": "sdxl"})()
    built = []
    monkeypatch.setattr(cli_generate, "read_single_file", lambda path: read)

    def load(cls, f):
        built.append((cls, f))
        return StableDiffusionXLPipeline.from_pretrained(folders["base"])

    monkeypatch.setattr(cli_generate, "load_pipeline", load)
    out = tmp_path / "file.png"
    assert main(["generate", "a cat", "--model", str(fake), "--steps", "2", "--output", str(out)]) == 0
    assert built == [(StableDiffusionXLPipeline, read)] and out.is_file()


def test_generate_unreadable_file_is_one_line_error(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(CLIError, match="broken.safetensors"):
        main(["generate", "a cat", "--model", str(bad), "--output", str(tmp_path / "x.png")])


@pytest.mark.parametrize(
    "name, family",
    [("sdxl-base-1.0", "sdxl"), ("sdxl-refiner-1.0", "sdxl-refiner"), ("sd-v1-5", "sd")],
)
def test_kind_from_the_real_model_index(tmp_path, name, family):
    """The Hub folders' own model_index.json files (../shared/reference-configs) tell the kinds apart."""
    index = REFERENCE_CONFIGS / f"{name}.model_index.json"
    if not index.is_file():
        pytest.fail(f"missing reference config {index}")
    (tmp_path / "model_index.json").write_text(index.read_text())
    source = find_model("generate", str(tmp_path), local_files_only=True)
    assert source.family == family and source.single_file is None
    cls = FAMILY_PIPELINES[family]
    assert json.loads(index.read_text())["_class_name"] == cls.__name__
