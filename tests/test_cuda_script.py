"""benchmarks/cuda.sh --dry-run: the whole CUDA script path on the CPU with a tiny random SD model.

The GPU run happens rarely and briefly, so everything but the GPU itself is checked here: every
section runs and reports what the tables need, the JSON and markdown have every part, tiny-model
parity holds, and the watchdog kills a section past its limit and goes on with the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = [
    "weights",
    "parity",
    "unet_fp16",
    "txt2img_fp16",
    "vae_fp16",
    "unet_bf16",
    "sync",
    "compile_fp16",
    "profile",
    "compile_bf16",
]


def run_script(out_dir: Path, *args: str) -> tuple[dict, str]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_WAIT_POLICY": "PASSIVE"}
    res = subprocess.run(
        ["bash", str(REPO / "benchmarks/cuda.sh"), "--dry-run", "--out-dir", str(out_dir), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((out_dir / "results-cuda-dry-run-cpu.json").read_text()), res.stdout


def test_dry_run_every_section(tmp_path):
    result, stdout = run_script(tmp_path)
    sections = result["sections"]
    assert list(sections) == SECTIONS
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(SECTIONS, "ok")
    assert result["meta"]["dry_run"] and result["meta"]["slug"] == "dry-run-cpu"

    parity = sections["parity"]
    assert all(case["identical"] for case in parity["noise"].values())
    assert parity["unet_fp32"]["rel_max"] < 1e-4
    assert parity["txt2img_fp16"]["max_abs"] < 0.02 and parity["txt2img_fp16"]["nan"] == 0
    assert set(parity["unet_fp16_vs_fp32"]) == {"diffusers", "minidiff"}

    for name in ("unet_fp16", "unet_bf16", "vae_fp16"):
        s = sections[name]
        assert set(s["median_ms"]) == {"diffusers", "minidiff"} and s["ratio"] > 0
        assert all(m["weights_mib"] > 0 for m in s["memory"].values())
    t2i = sections["txt2img_fp16"]
    assert set(t2i["s_per_image"]) == set(t2i["it_per_s"]) == {"diffusers", "minidiff"}
    for dt in ("fp16", "bf16"):
        c = sections[f"compile_{dt}"]
        assert set(c["median_ms"]) == {"diffusers", "minidiff", "diffusers+compile", "minidiff+compile"}
        assert set(c["compile_s"]) == set(c["graph_breaks"]) == {"diffusers", "minidiff"}
    assert sections["sync"]["diffusers"]["host_sync_ops"] > 0  # its PNDM reads timesteps on the host
    for impl in ("diffusers", "minidiff"):
        sync = sections["sync"][impl]
        assert sync["sync_debug_warnings"] is None  # CUDA only
        assert sync["host_sync_ops"] >= 0 and sync["host_sync_ops_per_step"] == pytest.approx(sync["host_sync_ops"] / 3)
        assert sections["profile"][impl]["step_ms"] > 0
    assert (tmp_path / sections["profile"]["file"]).is_file()
    assert not (tmp_path / "tiny-sd").exists()  # the dry run's weights live in a temp dir, removed

    table = result["table"]
    for part in (
        "UNet step fp16, batch 2",
        "UNet step bf16, torch.compile",
        "s/image",
        "it/s",
        "VAE decode",
        "#### GPU parity",
        "TF32 off",
        "image on [0, 1]",
        "#### Host syncs in the denoising loop",
        "#### Sections",
    ):
        assert part in table and part in stdout, part
    performance = table.split("#### GPU parity")[0]
    assert "| – |" not in performance and "**–**" not in performance  # every cell measured


def test_watchdog_kills_a_section_past_its_limit(tmp_path):
    result, stdout = run_script(
        tmp_path, "--sections", "weights,sync,vae_fp16", "--stall", "sync", "--limits", "sync=1"
    )
    sections = result["sections"]
    assert sections["sync"]["status"] == "timeout"
    assert sections["vae_fp16"]["status"] == "ok"  # a fresh worker went on
    assert list(sections) == ["weights", "vae_fp16", "sync"]  # the table's order; only those asked for
    assert "[sync] timeout" in stdout
