"""Benchmark minidiff against diffusers/transformers on identical SD 1.5-sized weights.

Usage:
    python benchmarks/bench.py --make-weights /tmp/minidiff-bench/sd15
    python benchmarks/bench.py --device cpu --dtype fp32 --repeats 3 --warmup 1 --json benchmarks/results-cpu-fp32.json

Each workload runs minidiff and the reference interleaved (A B A B ...) so slow drifts in
machine speed (thermal, other tenants) hit both equally; the median of the timed runs is kept.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
CONFIGS = Path("/work/shared/reference-configs")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_weights(folder: Path) -> None:
    """Write a full-size SD 1.5 folder with random weights (real configs) unless it exists."""
    if (folder / "model_index.json").exists():
        print(f"weights already present in {folder}")
        return
    import diffusers
    import transformers

    sys.path.insert(0, str(REPO))
    from weights_conversion.clip_vocab import write_hf_tokenizer_files

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    unet_cfg = json.loads((CONFIGS / "sd-v1-5.unet.json").read_text())
    vae_cfg = json.loads((CONFIGS / "sd-v1-5.vae.json").read_text())
    diffusers.UNet2DConditionModel.from_config(unet_cfg).save_pretrained(folder / "unet")
    diffusers.AutoencoderKL.from_config(vae_cfg).save_pretrained(folder / "vae")
    te_cfg = transformers.CLIPTextConfig.from_json_file(str(CONFIGS / "sd-v1-5.text_encoder.json"))
    transformers.CLIPTextModel(te_cfg).save_pretrained(folder / "text_encoder")
    write_hf_tokenizer_files(REPO / "minidiff/data/bpe_simple_vocab_16e6.txt.gz", folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    shutil.copy(CONFIGS / "sd-v1-5.scheduler.json", folder / "scheduler/scheduler_config.json")
    shutil.copy(CONFIGS / "sd-v1-5.model_index.json", folder / "model_index.json")  # written last: marks completion
    print(f"wrote random SD 1.5 weights to {folder}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def count_flops(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def interleaved(fns: dict[str, Callable[[], Any]], device: str, warmup: int, repeats: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn, device))
    return times


def peak_gflops(device: str, dtype: torch.dtype, repeats: int = 10) -> dict[str, float]:
    """Best achieved GFLOP/s of a 2048^3 matmul and of a 3x3 conv (512->512, 64x64): practical ceilings.

    Both are measured because on some CPUs (e.g. MKL sgemm on AMD) the conv library is much faster than gemm.
    """
    n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    x = torch.randn(1, 512, 64, 64, device=device, dtype=dtype)
    w = torch.randn(512, 512, 3, 3, device=device, dtype=dtype)
    cases: dict[str, tuple[Callable[[], Any], float]] = {
        "matmul_2048": (lambda: a @ b, 2 * n**3),
        "conv3x3_512_64x64": (lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * 9 * 512 * 512 * 64 * 64)}
    out: dict[str, float] = {}
    for name, (fn, flops) in cases.items():
        for _ in range(3):
            fn()
        out[name] = flops / min(time_once(fn, device) for _ in range(repeats)) / 1e9
    return out


def build_workloads(folder: Path, device: str, dtype: torch.dtype, sizes: list[int], vae_sizes: list[int]) -> list[dict[str, Any]]:
    """Return workloads as {name, fns: {impl: callable}}; models are loaded once per component."""
    import diffusers
    import transformers

    sys.path.insert(0, str(REPO))
    import minidiff

    g = torch.Generator().manual_seed(0)
    workloads: list[dict[str, Any]] = []

    def load(component: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        ref_cls = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL,
                   "text_encoder": transformers.CLIPTextModel}[component]
        mine_cls = {"unet": minidiff.UNet2DConditionModel, "vae": minidiff.AutoencoderKL,
                    "text_encoder": minidiff.CLIPTextModel}[component]
        ref = ref_cls.from_pretrained(folder, subfolder=component, torch_dtype=dtype).to(device).eval()
        mine = mine_cls.from_pretrained(folder, subfolder=component, torch_dtype=dtype).to(device).eval()
        return mine, ref

    mine, ref = load("unet")
    for s in sizes:
        x = torch.randn(2, 4, s, s, generator=g).to(device, dtype)
        t = torch.tensor([500, 500], device=device)
        ctx = torch.randn(2, 77, 768, generator=g).to(device, dtype)
        workloads.append({"name": f"unet step b2 {s}x{s} latents",
                          "fns": {"diffusers": lambda m=ref, x=x, t=t, c=ctx: m(x, t, encoder_hidden_states=c),
                                  "minidiff": lambda m=mine, x=x, t=t, c=ctx: m(x, t, encoder_hidden_states=c)}})
    mine, ref = load("vae")
    for px in vae_sizes:
        z = torch.randn(1, 4, px // 8, px // 8, generator=g).to(device, dtype)
        workloads.append({"name": f"vae decode b1 {px}x{px}",
                          "fns": {"diffusers": lambda m=ref, z=z: m.decode(z),
                                  "minidiff": lambda m=mine, z=z: m.decode(z)}})
    mine, ref = load("text_encoder")
    ids = torch.randint(0, 49408, (2, 77), generator=g).to(device)
    workloads.append({"name": "text encoder b2 x 77",
                      "fns": {"diffusers": lambda m=ref, i=ids: m(i), "minidiff": lambda m=mine, i=ids: m(i)}})
    return workloads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-weights", type=Path, metavar="DIR", help="create random SD 1.5 weights in DIR and exit")
    p.add_argument("--weights", type=Path, default=Path("/tmp/minidiff-bench/sd15"))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sizes", type=int, nargs="+", default=[32], help="UNet latent sizes, e.g. 32 64")
    p.add_argument("--vae-sizes", type=int, nargs="+", default=[256], help="VAE output sizes, e.g. 256 512")
    p.add_argument("--json", type=Path, help="write results here")
    args = p.parse_args()

    if args.make_weights:
        make_weights(args.make_weights)
        return
    make_weights(args.weights)  # no-op when present
    dtype = DTYPES[args.dtype]
    peaks = peak_gflops(args.device, dtype)
    peak = max(peaks.values())  # "% of peak" is relative to the faster of the two ceilings
    print(f"measured peaks {args.dtype}: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))

    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for w in build_workloads(args.weights, args.device, dtype, args.sizes, args.vae_sizes):
            # FLOPs from the reference run; both implement the same math (checked by tests/).
            flops = count_flops(w["fns"]["diffusers"])
            times = interleaved(w["fns"], args.device, args.warmup, args.repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"workload": w["name"], "flops": flops, "times_s": times,
                   "median_ms": {k: v * 1e3 for k, v in med.items()},
                   "gflops": {k: flops / v / 1e9 for k, v in med.items()},
                   "ratio_minidiff_over_diffusers": med["minidiff"] / med["diffusers"]}
            row["pct_of_peak"] = {k: 100 * v / peak for k, v in row["gflops"].items()}
            rows.append(row)
            print(f"{w['name']}: {flops / 1e9:.1f} GFLOP, diffusers {row['median_ms']['diffusers']:.1f} ms, "
                  f"minidiff {row['median_ms']['minidiff']:.1f} ms, ratio {row['ratio_minidiff_over_diffusers']:.3f}",
                  flush=True)

    # Re-measure the ceilings with the machine warm and keep the best: a cold first pass under-reads them.
    peaks = {k: max(v, peak_gflops(args.device, dtype)[k]) for k, v in peaks.items()}
    peak = max(peaks.values())
    print("best measured peaks: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    for r in rows:
        r["pct_of_peak"] = {k: 100 * v / peak for k, v in r["gflops"].items()}

    print("\n| workload | GFLOP | diffusers ms | minidiff ms | ratio | diffusers GFLOP/s | minidiff GFLOP/s "
          "| diffusers % peak | minidiff % peak |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['flops'] / 1e9:.1f} | {r['median_ms']['diffusers']:.1f} | "
              f"{r['median_ms']['minidiff']:.1f} | {r['ratio_minidiff_over_diffusers']:.3f} | "
              f"{r['gflops']['diffusers']:.1f} | {r['gflops']['minidiff']:.1f} | "
              f"{r['pct_of_peak']['diffusers']:.0f}% | {r['pct_of_peak']['minidiff']:.0f}% |")

    if args.json:
        import diffusers

        meta = {"device": args.device, "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup,
                "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(),
                "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                "peak_gflops": peaks, "peak_used_gflops": peak, "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
