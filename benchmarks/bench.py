"""Benchmark minidiff against diffusers/transformers on the same full-size SD 1.5 weights.

Usage (the committed tables: benchmarks/README.md):
    python benchmarks/bench.py --make-weights /tmp/minidiff-bench/sd15
    python benchmarks/bench.py --dtype fp32 --only unet32,unet64,vae256,vae512,text,txt2img,ttfo --memory --json o.json
    python benchmarks/bench.py --dtype bf16 --only unet32 --compile
    python benchmarks/bench.py --dtype fp32 --only sdxl_unet32 --memory   # makes /tmp/minidiff-bench/sdxl-base first

Each workload runs the two implementations interleaved (A B A B ...) after warm-up, so slow drifts
in machine speed (other tenants, clocks) hit both alike; medians are reported. Time to first
output and peak memory are measured in a fresh process per implementation (`--child`), so one
library's imports, caches and allocator state never count against the other. The SDXL UNet (10.3 GB in
fp32) is timed one implementation at a time instead (diffusers, then minidiff), never two copies at once.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
# copies of the public SD 1.5 (and SDXL base UNet) configs (shared/reference-configs), so that a machine with only this
# repository (a GPU box with no Hub access) can make the weights
CONFIGS = Path(__file__).resolve().parent / "configs"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("diffusers", "minidiff")
SECTIONS = {  # name -> (component, description)
    "unet32": ("unet", "UNet step, batch 2 (CFG), 32×32 latents"),
    "unet64": ("unet", "UNet step, batch 2 (CFG), 64×64 latents"),
    "vae256": ("vae", "VAE decode, 256×256"),
    "vae512": ("vae", "VAE decode, 512×512"),
    "text": ("text_encoder", "text encoder, batch 2 × 77 tokens"),
    "txt2img": ("pipeline", "txt2img 256×256, 10 steps (PNDM, CFG)"),
    "ttfo": ("unet", "time to first output: load UNet + first 32×32 step"),
    "sdxl_unet32": ("sdxl_unet", "SDXL base UNet step, batch 2 (CFG), 32×32 latents"),
}
PROMPT = "a photograph of an astronaut riding a horse"


def make_weights(folder: Path, configs: dict[str, dict] | None = None) -> None:
    """Write a full-size SD 1.5 folder with random weights (real configs) unless it exists.
    `configs` ({"unet", "vae", "text_encoder"} -> config dict) replaces the SD 1.5 ones (tiny models)."""
    if (folder / "model_index.json").exists():
        return
    import diffusers
    import transformers

    sys.path.insert(0, str(REPO))
    from weights_conversion.clip_vocab import write_hf_tokenizer_files

    configs = configs or {
        c: json.loads((CONFIGS / f"sd-v1-5.{c}.json").read_text()) for c in ("unet", "vae", "text_encoder")
    }
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    diffusers.UNet2DConditionModel.from_config(configs["unet"]).save_pretrained(folder / "unet")
    diffusers.AutoencoderKL.from_config(configs["vae"]).save_pretrained(folder / "vae")
    te_cfg = transformers.CLIPTextConfig.from_dict(configs["text_encoder"])
    transformers.CLIPTextModel(te_cfg).save_pretrained(folder / "text_encoder")
    write_hf_tokenizer_files(REPO / "minidiff/data/bpe_simple_vocab_16e6.txt.gz", folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    shutil.copy(CONFIGS / "sd-v1-5.scheduler.json", folder / "scheduler/scheduler_config.json")
    shutil.copy(CONFIGS / "sd-v1-5.model_index.json", folder / "model_index.json")  # written last: marks completion
    print(f"wrote random SD 1.5 weights to {folder}", flush=True)


def make_sdxl_weights(folder: Path) -> None:
    """Write the SDXL base UNet (real config, random weights, 10.3 GB) to folder/unet unless it exists."""
    if (folder / "unet" / "config.json").exists():
        return
    import diffusers

    torch.manual_seed(0)
    config = json.loads((CONFIGS / "sdxl-base-1.0.unet.json").read_text())
    unet = diffusers.UNet2DConditionModel.from_config(config)
    unet.save_pretrained(folder / "unet.partial", max_shard_size="2GB")  # sharded like the Hub's
    del unet
    (folder / "unet.partial").rename(folder / "unet")  # renamed last: marks completion
    print(f"wrote a random SDXL base UNet to {folder / 'unet'}", flush=True)


def weights_folder(component: str, args: argparse.Namespace) -> Path:
    return args.sdxl_weights if component == "sdxl_unet" else args.weights


# -- loading and workloads -----------------------------------------------------------------------


def load(impl: str, component: str, folder: Path, device: str, dtype: torch.dtype) -> Any:
    """One component (or the whole pipeline) of one implementation, on `device` in `dtype`."""
    if impl == "minidiff":
        sys.path.insert(0, str(REPO))
        import minidiff as lib

        te_cls = lib.CLIPTextModel
    else:
        import diffusers as lib
        import transformers

        te_cls = transformers.CLIPTextModel
    if component == "pipeline":
        kwargs = (
            {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
            if impl == "diffusers"
            else {}
        )
        pipe = lib.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, **kwargs).to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    cls = {"unet": lib.UNet2DConditionModel, "vae": lib.AutoencoderKL, "text_encoder": te_cls}
    cls["sdxl_unet"] = lib.UNet2DConditionModel
    subfolder = "unet" if component == "sdxl_unet" else component
    return cls[component].from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype).to(device).eval()


def workload(section: str, model: Any, device: str, dtype: torch.dtype) -> Callable[[], Any]:
    """The timed call for a section; inputs are seeded, so both implementations get the same ones."""
    g = torch.Generator().manual_seed(0)
    if section in ("unet32", "unet64", "ttfo"):
        s = 64 if section == "unet64" else 32
        x = torch.randn(2, 4, s, s, generator=g).to(device, dtype)
        t = torch.tensor([500, 500], device=device)
        ctx = torch.randn(2, 77, 768, generator=g).to(device, dtype)
        return lambda: model(x, t, encoder_hidden_states=ctx).sample
    if section == "sdxl_unet32":
        x = torch.randn(2, 4, 32, 32, generator=g).to(device, dtype)
        t = torch.tensor([500, 500], device=device)
        ctx = torch.randn(2, 77, 2048, generator=g).to(device, dtype)
        added = {
            "text_embeds": torch.randn(2, 1280, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device=device, dtype=dtype),
        }
        return lambda: model(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    if section in ("vae256", "vae512"):
        z = torch.randn(1, 4, int(section[3:]) // 8, int(section[3:]) // 8, generator=g).to(device, dtype)
        return lambda: model.decode(z).sample
    if section == "text":
        ids = torch.randint(0, 49408, (2, 77), generator=g).to(device)
        return lambda: model(ids)[0]
    if section == "txt2img":
        return lambda: (
            model(
                PROMPT,
                height=256,
                width=256,
                num_inference_steps=10,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images
        )
    raise ValueError(section)


def compiled(model: Any) -> Any:
    """torch.compile; on CPU inductor with frozen weights, which pre-packs them for oneDNN once
    instead of on every call. The wrapper shares the eager model's parameters."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model)


# -- timing --------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], device: str, warmup: int, repeats: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn, device))
    return times


def count_flops(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def peak_gflops(device: str, dtype: torch.dtype, repeats: int = 10) -> dict[str, float]:
    """Best achieved GFLOP/s of a 2048³ matmul and of a 3×3 conv (512→512 channels, 64×64): the
    practical ceilings. Both, because on this CPU (AMD, MKL sgemm) oneDNN convs beat gemm in fp32."""
    n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    x = torch.randn(1, 512, 64, 64, device=device, dtype=dtype)
    w = torch.randn(512, 512, 3, 3, device=device, dtype=dtype)
    cases: dict[str, tuple[Callable[[], Any], float]] = {
        "matmul_2048": (lambda: a @ b, 2 * n**3),
        "conv3x3_512_64x64": (lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * 9 * 512 * 512 * 64 * 64),
    }
    out: dict[str, float] = {}
    for name, (fn, flops) in cases.items():
        for _ in range(3):
            fn()
        out[name] = flops / min(time_once(fn, device) for _ in range(repeats)) / 1e9
    return out


# -- fresh-process measurements (--child) --------------------------------------------------------


def _vm(key: str) -> float:
    """A /proc/self/status field in MiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run one section once in this (fresh) process; report load time, first-call time and memory."""
    dtype = DTYPES[args.dtype]
    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    for name in ("minidiff",) if args.impl == "minidiff" else ("diffusers", "transformers"):
        importlib.import_module(name)
    t_import = time.perf_counter() - t0
    component = SECTIONS[args.child][0]
    with torch.no_grad():
        t0 = time.perf_counter()
        model = load(args.impl, component, weights_folder(component, args), args.device, dtype)
        t_load = time.perf_counter() - t0
        fn = workload(args.child, model, args.device, dtype)
        rss_loaded = _vm("VmRSS")
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below is the workload's
        t_first = time_once(fn, args.device)
    out = {
        "impl": args.impl,
        "section": args.child,
        "import_s": t_import,
        "load_s": t_load,
        "first_call_s": t_first,
        "rss_after_load_mib": rss_loaded,
        "workload_peak_rss_mib": _vm("VmHWM"),
    }
    if args.device == "cuda":
        out["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_child(args: argparse.Namespace, section: str, impl: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        section,
        "--impl",
        impl,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--weights",
        str(args.weights),
        "--sdxl-weights",
        str(args.sdxl_weights),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- the sections --------------------------------------------------------------------------------


def side_by_side(
    section: str, args: argparse.Namespace, dtype: torch.dtype, row: dict[str, Any]
) -> dict[str, list[float]]:
    """Both implementations loaded at once and timed interleaved (plus compiled copies with --compile);
    the FLOPs of one reference call and the compile times go into `row`."""
    component = SECTIONS[section][0]
    with torch.no_grad():
        models = {impl: load(impl, component, args.weights, args.device, dtype) for impl in IMPLS}
        fns = {impl: workload(section, m, args.device, dtype) for impl, m in models.items()}
        # FLOPs of one reference call (both implement the same maths, checked by tests/)
        row["flops"] = count_flops(fns["diffusers"])
        if args.compile:
            # eager and compiled side by side; the first compiled call (compilation) is timed on its own
            row["compile_s"] = {}
            for impl in IMPLS:
                fn = workload(section, compiled(models[impl]), args.device, dtype)
                row["compile_s"][impl] = time_once(fn, args.device)
                fns[f"{impl}+compile"] = fn
        times = interleaved(fns, args.device, args.warmup, args.repeats)
    del models, fns
    gc.collect()
    return times


def one_at_a_time(section: str, args: argparse.Namespace, dtype: torch.dtype) -> tuple[dict[str, list[float]], int]:
    """Each implementation loaded, warmed up, timed and freed in turn: for models too big for two copies."""
    times, flops = {}, 0
    with torch.no_grad():
        for impl in IMPLS:
            model = load(impl, SECTIONS[section][0], args.sdxl_weights, args.device, dtype)
            fn = workload(section, model, args.device, dtype)
            if impl == "diffusers":
                flops = count_flops(fn)
            times[impl] = interleaved({impl: fn}, args.device, args.warmup, args.repeats)[impl]
            del model, fn
            gc.collect()
    return times, flops


def bench_section(section: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time one section in this process, interleaved (the SDXL UNet: one model at a time), + memory in
    fresh processes if asked."""
    dtype = DTYPES[args.dtype]
    component = SECTIONS[section][0]
    row: dict[str, Any] = {"section": section, "workload": SECTIONS[section][1]}
    if args.compile and component == "pipeline":
        raise SystemExit("--compile applies to the model sections (unet*, vae*, text), not txt2img")
    if section == "ttfo":
        runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in IMPLS}
        for _ in range(args.repeats):  # fresh processes, interleaved; the files stay in the page cache
            for impl in IMPLS:
                runs[impl].append(run_child(args, "ttfo", impl))
        row["runs"] = runs
        row["median_ms"] = {
            impl: 1e3 * statistics.median(r["load_s"] + r["first_call_s"] for r in runs[impl]) for impl in IMPLS
        }
        row["import_ms"] = {impl: 1e3 * statistics.median(r["import_s"] for r in runs[impl]) for impl in IMPLS}
        row["ratio"] = row["median_ms"]["minidiff"] / row["median_ms"]["diffusers"]
        return row

    if component == "sdxl_unet":
        if args.compile:
            raise SystemExit("--compile is not offered for the SDXL UNet (two compiled 10 GB models)")
        times, row["flops"] = one_at_a_time(section, args, dtype)
    else:
        times = side_by_side(section, args, dtype, row)
    row["times_s"] = times
    row["median_ms"] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    row["gflops"] = {k: row["flops"] / v / 1e6 for k, v in row["median_ms"].items()}
    row["ratio"] = row["median_ms"]["minidiff"] / row["median_ms"]["diffusers"]
    if args.compile:
        row["ratio_compiled"] = row["median_ms"]["minidiff+compile"] / row["median_ms"]["diffusers+compile"]
        row["ratio_compiled_vs_eager_diffusers"] = row["median_ms"]["minidiff+compile"] / row["median_ms"]["diffusers"]
    if args.memory:
        mem = {impl: run_child(args, section, impl) for impl in IMPLS}
        key = "max_memory_allocated_mib" if args.device == "cuda" else "workload_peak_rss_mib"
        row["memory"] = mem
        row["peak_mib"] = {impl: mem[impl][key] for impl in IMPLS}
        row["memory_ratio"] = row["peak_mib"]["minidiff"] / row["peak_mib"]["diffusers"]
    return row


def markdown(rows: list[dict[str, Any]], peak: float) -> str:
    """One table row per workload (and one more per compiled pair); ratios are minidiff / diffusers."""
    cuda = any("max_memory_allocated_mib" in r.get("memory", {}).get("minidiff", {}) for r in rows)
    lines = [
        f"| workload | GFLOP | diffusers ms | minidiff ms | minidiff / diffusers | diffusers GFLOP/s (% peak) "
        "| minidiff GFLOP/s (% peak) | "
        f"{'max allocated' if cuda else 'peak RSS'} diffusers MiB | minidiff MiB | mem ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pairs = [("diffusers", "minidiff")] + ([("diffusers+compile", "minidiff+compile")] if "compile_s" in r else [])
        for d, m in pairs:
            ms_d, ms_m = r["median_ms"][d], r["median_ms"][m]
            cells = [r["workload"] + (" (torch.compile)" if d != "diffusers" else "")]
            cells += [
                f"{r['flops'] / 1e9:.1f}" if "flops" in r else "–",
                f"{ms_d:.1f}",
                f"{ms_m:.1f}",
                f"**{ms_m / ms_d:.3f}**",
            ]
            cells += [
                f"{r['gflops'][k]:.0f} ({100 * r['gflops'][k] / peak:.0f}%)" if "gflops" in r else "–" for k in (d, m)
            ]
            if "peak_mib" in r and d == "diffusers":
                cells += [
                    f"{r['peak_mib']['diffusers']:.0f}",
                    f"{r['peak_mib']['minidiff']:.0f}",
                    f"**{r['memory_ratio']:.3f}**",
                ]
            else:
                cells += ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-weights", type=Path, metavar="DIR", help="create random SD 1.5 weights in DIR and exit")
    p.add_argument("--weights", type=Path, default=Path("/tmp/minidiff-bench/sd15"))
    p.add_argument("--sdxl-weights", type=Path, default=Path("/tmp/minidiff-bench/sdxl-base"))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--only", default="unet32,vae256,text", help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory", action="store_true", help="also measure each section's peak memory in fresh processes")
    p.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd models (compile time reported apart)"
    )
    p.add_argument("--json", type=Path, help="write results here")
    p.add_argument("--child", choices=list(SECTIONS), help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.make_weights:
        make_weights(args.make_weights)
        return
    if args.child:
        print(json.dumps(child(args)))
        return
    sections = args.only.split(",")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    # no-ops when present
    if any(SECTIONS[s][0] != "sdxl_unet" for s in sections):
        make_weights(args.weights)
    if any(SECTIONS[s][0] == "sdxl_unet" for s in sections):
        make_sdxl_weights(args.sdxl_weights)
    dtype = DTYPES[args.dtype]
    peaks = peak_gflops(args.device, dtype)
    print(f"measured peaks {args.dtype}: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)

    # results accumulate in --json across runs (one row per section), so the tables can be built by
    # several shorter commands; each section is written as soon as it is done
    previous = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    rows = {r["section"]: r for r in previous.get("results", [])}
    import diffusers
    import transformers

    meta = {
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }
    commands = previous.get("meta", {}).get("commands", []) + ["python benchmarks/bench.py " + " ".join(sys.argv[1:])]
    peaks = {k: max(v, previous.get("meta", {}).get("peak_gflops", {}).get(k, 0.0)) for k, v in peaks.items()}
    for section in sections:
        row = bench_section(section, args)
        row["repeats"], row["warmup"] = args.repeats, args.warmup
        rows[section] = row
        print(
            f"{section}: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in row["median_ms"].items())
            + f", ratio {row['ratio']:.3f}"
            + (f", compile s {row['compile_s']}" if "compile_s" in row else "")
            + (f", peak MiB {row['peak_mib']}" if "peak_mib" in row else ""),
            flush=True,
        )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {"meta": {**meta, "peak_gflops": peaks, "commands": commands}, "results": list(rows.values())},
                    indent=2,
                )
                + "\n"
            )

    # ceilings again with the machine warm, keeping the best: a cold first pass under-reads them
    peaks = {k: max(v, peak_gflops(args.device, dtype)[k]) for k, v in peaks.items()}
    peak = max(peaks.values())
    print("best measured peaks: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    ordered = [rows[s] for s in SECTIONS if s in rows]
    table = markdown(ordered, peak)
    print("\n" + table)
    if args.json:
        meta.update(peak_gflops=peaks, peak_used_gflops=peak, commands=commands)
        args.json.write_text(json.dumps({"meta": meta, "results": ordered, "table": table}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
