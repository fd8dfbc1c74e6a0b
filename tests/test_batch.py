"""Many images (minidiff/batch.py): a prompt file -> a folder of PNGs + manifest, over torchrun ranks.

The bundled shapes model at 4 steps keeps every run short; the torchrun runs are real subprocesses
(`python -m torch.distributed.run --nproc-per-node 2`, gloo on 127.0.0.1), one thread per process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import minidiff
from minidiff import batch, cli
from minidiff.batch import BatchError, Item, generate_many, load_items, resolve_items

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [f"a {c} {s} on a {b} background" for c, s, b in [
    ("red", "circle", "white"), ("green", "square", "yellow"), ("white", "triangle", "blue"),
    ("blue", "circle", "black"), ("yellow", "square", "red"), ("black", "triangle", "white"),
]]  # fmt: skip
STEPS = ["--steps", "4"]
RUN_ONLY = ("rank", "seconds")  # the manifest fields that say how a run went, not what it made


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    """12 items: plain prompts, an explicit seed, a per-item negative prompt, guidance and id."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [{"prompt": p} for p in SHAPES * 2]
    lines[3]["seed"] = 1234
    lines[5]["negative_prompt"] = "a black background"
    lines[7].update(guidance=3, id="seven")
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each torchrun rank below: the same float sums, the same bits
    yield
    torch.set_num_threads(threads)


def run_cli(*args: str) -> int:
    return cli.main(["generate", *args])


def torchrun(*args: str, nproc: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k != batch.ABORT_ENV}
    env = {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    launcher += ["--master-addr=127.0.0.1", f"--master-port={port}", "-m", "minidiff", "generate", *args]
    return subprocess.run(launcher, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def manifest(folder: Path, drop: tuple[str, ...] = RUN_ONLY) -> list[dict]:
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255


@pytest.fixture(scope="module")
def reference(prompt_file, tmp_path_factory) -> Path:
    """One process, batch size 1, one thread: the images every other run is compared with."""
    out = tmp_path_factory.mktemp("reference") / "out"
    threads = torch.get_num_threads()
    try:
        assert run_cli("--prompts", str(prompt_file), "--outdir", str(out), *STEPS, "--threads", "1") == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_reference_run(reference):
    records = manifest(reference, drop=())
    assert [r["id"] for r in records] == [f"{i:05d}" for i in range(7)] + ["seven"] + [f"{i:05d}" for i in range(8, 12)]
    assert sorted(pngs(reference)) == sorted(r["file"] for r in records)
    assert not list(reference.glob("manifest.rank*")) and not list(reference.glob(".*"))
    r3, r5, r7 = records[3], records[5], records[7]
    assert (r3["seed"], records[4]["seed"], r5["negative_prompt"], r7["guidance"]) == (
        1234,
        4,
        "a black background",
        3.0,
    )
    assert {r["model"] for r in records} == {"minidiff.DEFAULT_MODEL"}
    assert {(r["steps"], r["height"], r["width"], r["scheduler"], r["dtype"], r["device"]) for r in records} == {
        (4, 64, 64, "DPMSolverMultistepScheduler", "fp32", "cpu")
    }
    for r in records:
        assert r["sha256"] == batch.sha256((reference / r["file"]).read_bytes()) and r["rank"] == 0


def test_item_equals_a_single_generate(reference, tmp_path, one_thread, capsys):
    """Item i without a seed is the image `minidiff generate PROMPT --seed i` makes, byte for byte."""
    out = tmp_path / "one.png"
    assert run_cli(SHAPES[4], "--seed", "4", *STEPS, "--output", str(out)) == 0
    assert out.read_bytes() == (reference / "00004.png").read_bytes()


def test_two_ranks_and_batches_make_the_same_images(reference, prompt_file, tmp_path, one_thread, capsys):
    ranks = tmp_path / "ranks"
    done = torchrun("--prompts", str(prompt_file), "--outdir", str(ranks), *STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 0 alone prints the summary, and its bar counts both ranks' images
    assert done.stdout.count("minidiff: 12 items") == 1 and "12 generated, 0 already there; 2 processes" in done.stdout
    assert "12/12" in done.stderr
    # batch size 1 on both sides, one thread per process: bit-exact
    assert pngs(ranks) == pngs(reference)
    assert manifest(ranks) == manifest(reference)
    assert {r["rank"] for r in manifest(ranks, drop=())} == {0, 1}

    # batch size 4 sums the same floats in another order: within 3e-4 on [0, 1] before the 8-bit rounding,
    # so a PNG value moves by at most one level (1/255) and rarely
    batched = tmp_path / "batched"
    assert run_cli("--prompts", str(prompt_file), "--outdir", str(batched), *STEPS, "--batch-size", "4") == 0
    assert manifest(batched, drop=(*RUN_ONLY, "sha256")) == manifest(reference, drop=(*RUN_ONLY, "sha256"))
    for name in pngs(reference):
        diff = np.abs(pixels(batched / name) - pixels(reference / name))
        assert diff.max() <= 1 / 255 + 1e-9 and diff.mean() < 3e-4, name


def test_batched_floats_within_3e4(one_thread):
    """The claim behind the pixel check above, on the float images: one generator per item."""
    pipe = minidiff.StableDiffusionPipeline.from_pretrained(minidiff.DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=4, output_type="np")
    together = pipe(SHAPES[:4], generator=[torch.Generator().manual_seed(s) for s in range(4)], **kwargs).images
    for s, prompt in enumerate(SHAPES[:4]):
        alone = pipe(prompt, generator=[torch.Generator().manual_seed(s)], **kwargs).images[0]
        assert np.abs(alone - together[s]).max() < 3e-4


def test_killed_run_resumes_to_the_complete_set(reference, prompt_file, tmp_path, one_thread, capsys):
    out = tmp_path / "out"
    # every rank dies after its 3rd image, half-way through writing the 4th (temporary file, torn line)
    killed = torchrun("--prompts", str(prompt_file), "--outdir", str(out), *STEPS, env={batch.ABORT_ENV: "3"})
    assert killed.returncode != 0
    assert len(list(out.glob("*.png"))) == 6 and len(list(out.glob(".*.tmp"))) == 2
    assert not (out / "manifest.jsonl").exists()
    for rank in (0, 1):
        assert not (out / f"manifest.rank{rank}.jsonl").read_text().endswith("\n")  # the torn line
    for name, data in pngs(out).items():
        assert data == (reference / name).read_bytes()
    # a corrupt image (its sha256 no longer matches) is made again; so is an image without a manifest line
    (out / "00000.png").write_bytes(b"not a png")
    shutil.copy(reference / "00011.png", out / "00011.png")

    capsys.readouterr()
    assert run_cli("--prompts", str(prompt_file), "--outdir", str(out), *STEPS) == 0  # --resume is the default
    assert "7 generated, 5 already there" in capsys.readouterr().out
    assert pngs(out) == pngs(reference)
    assert manifest(out) == manifest(reference)  # one line per item, no duplicate
    assert sorted(p.name for p in out.iterdir()) == sorted([*pngs(reference), "manifest.jsonl"])

    # complete: a rerun (here on two ranks) makes nothing
    again = torchrun("--prompts", str(prompt_file), "--outdir", str(out), *STEPS)
    assert again.returncode == 0 and "0 generated, 12 already there" in again.stdout
    assert manifest(out) == manifest(reference) and pngs(out) == pngs(reference)


def test_python_api(tmp_path, one_thread):
    pipe = minidiff.StableDiffusionPipeline.from_pretrained(minidiff.DEFAULT_MODEL)
    items = resolve_items(SHAPES[:3], seed=10, steps=2, scheduler="euler-a")
    assert items[2] == Item(2, "00002", SHAPES[2], seed=12, steps=2, scheduler="EulerAncestralDiscreteScheduler")
    summary = generate_many(pipe, items, tmp_path, batch_size=2, model="shapes", progress=False)
    assert (summary.total, summary.generated, summary.skipped, summary.world_size) == (3, 3, 0, 1)
    assert "3 items" in str(summary) and "items/s" in str(summary)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"  # the pipeline's own, back in place
    assert generate_many(pipe, items, tmp_path, model="shapes", progress=False).generated == 0
    with pytest.raises(BatchError, match=r"model 'shapes' there, 'other' now"):
        generate_many(pipe, items, tmp_path, model="other", progress=False)
    # resume=False starts over: every item again, one manifest line each
    assert generate_many(pipe, items, tmp_path, model="other", resume=False, progress=False).generated == 3
    assert len(manifest(tmp_path)) == 3


# -- bad input: a clear error before any model loads, and no file left behind ------------------------------


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(cli.StableDiffusionPipeline, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "text, error",
    [
        ('{"prompt": "a red circle"}\n{"prompt": "a blue\n', r"prompts.jsonl line 2: not valid JSON"),
        ('{"prompt": "a"}\n\n{"prompt": "b", "promt": "c"}\n', r"line 3: unknown key 'promt' \(the keys are prompt,"),
        ('{"prompt": "a"}\n["b"]\n', r"line 2: expected a JSON object"),
        ('{"prompt": "a", "seed": "7"}\n', r"line 1: 'seed' must be an integer"),
        ('{"prompt": "a", "height": 60}\n', r"line 1: 'height' must be a positive multiple of 8"),
        ('{"prompt": "a", "scheduler": "magic"}\n', r"line 1: unknown scheduler 'magic'"),
        (
            '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n',
            r"line 2: id 'x' is used twice \(first by .*line 1",
        ),
        ('{"prompt": "a", "id": "../up"}\n', r"line 1: 'id' must be a file name"),
        ('{"prompt": ""}\n', r"line 1: 'prompt' must be a non-empty string"),
        ("\n  \n", r"prompts.jsonl is empty"),
    ],
)
def test_bad_prompt_file(tmp_path, no_model, text, error):
    (tmp_path / "prompts.jsonl").write_text(text)
    with pytest.raises(SystemExit, match=error):
        run_cli("--prompts", str(tmp_path / "prompts.jsonl"), "--outdir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_run(tmp_path, prompt_file, reference, no_model, monkeypatch):
    prompts = ["--prompts", str(prompt_file)]
    with pytest.raises(SystemExit, match="does not exist"):
        run_cli("--prompts", str(tmp_path / "missing.txt"), "--outdir", str(tmp_path / "out"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="cannot write into --outdir"):
        run_cli(*prompts, "--outdir", str(tmp_path / "file" / "out"))
    with pytest.raises(SystemExit, match="exists and is not a folder"):
        run_cli(*prompts, "--outdir", str(tmp_path / "file"))
    with pytest.raises(SystemExit, match="not both"):
        run_cli("a red circle", *prompts, "--outdir", str(tmp_path / "out"))
    with pytest.raises(SystemExit, match="needs --outdir"):
        run_cli(*prompts)
    with pytest.raises(SystemExit, match="unknown --scheduler 'magic'"):
        run_cli(*prompts, "--outdir", str(tmp_path / "out"), "--scheduler", "magic")
    monkeypatch.setenv("WORLD_SIZE", "13")
    with pytest.raises(SystemExit, match="13 processes for 12 items: start at most 12"):
        run_cli(*prompts, "--outdir", str(tmp_path / "out"))
    monkeypatch.delenv("WORLD_SIZE")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

    # a folder made with other settings: refused, naming them, and left as it was
    out = tmp_path / "done"
    shutil.copytree(reference, out)
    before = pngs(out), (out / "manifest.jsonl").read_bytes()
    with pytest.raises(SystemExit, match=r"other settings \(dtype 'fp32' there, 'bf16' now\)"):
        run_cli(*prompts, "--outdir", str(out), *STEPS, "--dtype", "bf16")
    with pytest.raises(SystemExit, match=r"other settings: steps 4 there, 5 now \(item 00000\)"):
        run_cli(*prompts, "--outdir", str(out), "--steps", "5")
    with pytest.raises(SystemExit, match=r"seed 0 there, 1 now \(item 00000\)"):
        run_cli(*prompts, "--outdir", str(out), *STEPS, "--seed", "1")
    assert (pngs(out), (out / "manifest.jsonl").read_bytes()) == before


def test_plain_text_prompt_file(tmp_path):
    """One prompt a line (blank lines skipped); a later line starting with "{" is just a prompt."""
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n  a blue square  \r\n{not json}\n")
    items = load_items(path, seed=5, steps=3)
    assert [(it.id, it.prompt, it.seed, it.steps) for it in items] == [
        ("00000", "a red circle", 5, 3),
        ("00001", "a blue square", 6, 3),
        ("00002", "{not json}", 7, 3),
    ]
