"""The CUDA run: minidiff vs diffusers on one GPU, in one prepared script with a fixed time budget.

Usage (on the GPU machine, from the repository root; benchmarks/cuda.sh wraps this):
    python benchmarks/cuda_suite.py                       # ~7.5 min: JSON + markdown table
    python benchmarks/cuda_suite.py --dry-run             # the same path on CPU, tiny model, < 1 min

It makes the random SD 1.5 weights (bench.py's make_weights, real configs), then runs its
sections in priority order, each with its own time limit inside one overall budget:

    weights        random SD 1.5 weights on disk (skipped when present)
    parity         GPU numerics: noise-drawing semantics (CPU / CUDA generators), a fp32 UNet step
                   with TF32 off, fp16 steps against that fp32 reference, the same seeded fp16
                   txt2img with both (image difference on [0, 1])
    unet_fp16      UNet step, batch 2 (CFG), 64×64 latents, eager, interleaved A B A B
    txt2img_fp16   txt2img 512², 50 PNDM steps, CFG, batch 1: s/image and the loop's it/s
    vae_fp16       VAE decode 512²
    unet_bf16      as unet_fp16 in bf16
    sync           one denoising loop per library under torch.cuda.set_sync_debug_mode("warn"),
                   plus a dispatch-level count of host-sync ops (item, nonzero, D2H copies) with
                   the source lines that issue them
    compile_fp16   torch.compile'd UNets next to the eager ones; compile time (first call) apart
    profile        torch.profiler top kernels of one fp16 UNet step per library
    compile_bf16   as compile_fp16 in bf16, when time is left

Timing: CUDA events around each call, torch.cuda.synchronize() before and after; medians of
interleaved runs. Peak memory: torch.cuda.max_memory_allocated over one call, as the library's own
weights + the call's transient peak above what was allocated before it (both libraries' models
are resident during a section, so the raw process peak would count the other's weights too).

The sections run in a worker process that the parent watches: a section past its limit is killed
and reported as `timeout` (with whatever it had measured), and a new worker goes on with the next
one, so no section can eat the budget of the others. `--dry-run` runs every section on the CPU
with a tiny random SD model (perf_counter instead of CUDA events, torch.compile with the `eager`
backend, a dispatch-level sync count instead of the CUDA sync debug mode).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

REPO = bench.REPO
sys.path.insert(0, str(REPO))
IMPLS = bench.IMPLS  # ("diffusers", "minidiff"): the reference first in every interleaved round
PROMPT = bench.PROMPT


@dataclass(frozen=True)
class Sizes:
    latent: int  # UNet step latents (64 -> 512² images)
    image: int  # txt2img and VAE decode, pixels
    steps: int  # txt2img and the sync-counted loop
    unet_warmup: int
    unet_repeats: int
    pipe_repeats: int
    vae_repeats: int


REAL = Sizes(latent=64, image=512, steps=50, unet_warmup=5, unet_repeats=30, pipe_repeats=3, vae_repeats=10)
DRY = Sizes(latent=8, image=16, steps=3, unet_warmup=1, unet_repeats=3, pipe_repeats=2, vae_repeats=2)

# a tiny SD (2 levels, 32/64 channels) for --dry-run; the tokenizer is the real CLIP one, so the
# text encoder keeps CLIP's vocabulary and special-token ids
TINY = {
    "unet": {
        "sample_size": 8,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "sample_size": 16,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
    },
    "text_encoder": {
        **json.loads((bench.CONFIGS / "sd-v1-5.text_encoder.json").read_text()),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 32,
    },
}


# -- sections: name, title, limit (s) on the GPU / in the dry run, least time worth starting it --


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    limit_s: float
    dry_limit_s: float
    min_s: float


SECTIONS = [
    Section("weights", "random SD 1.5 weights", 150, 40, 0),
    Section("parity", "GPU parity", 100, 40, 30),
    Section("unet_fp16", "UNet step fp16", 45, 20, 10),
    Section("txt2img_fp16", "txt2img fp16", 60, 20, 20),
    Section("vae_fp16", "VAE decode fp16", 30, 20, 8),
    Section("unet_bf16", "UNet step bf16", 45, 20, 10),
    Section("sync", "host syncs in the denoising loop", 45, 20, 15),
    Section("compile_fp16", "torch.compile UNet fp16", 180, 40, 60),
    Section("profile", "profile UNet step fp16", 40, 20, 10),
    Section("compile_bf16", "torch.compile UNet bf16", 150, 40, 60),
]
BY_NAME = {s.name: s for s in SECTIONS}


# -- timing and memory ---------------------------------------------------------------------------


class Clock:
    """CUDA events on a GPU (the GPU's own timeline, launch gaps included), perf_counter on CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        """Between two marks; on CUDA the end mark must have completed (call sync() first)."""
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def time(self, fn: Callable[[], Any]) -> float:
        self.sync()
        start = self.mark()
        fn()
        end = self.mark()
        self.sync()
        return self.seconds(start, end)

    def wall(self, fn: Callable[[], Any]) -> float:
        """Host wall time of a call up to the GPU being idle (compilation, first calls)."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def interleaved(
    clock: Clock, fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, soft_deadline: float
) -> dict[str, list[float]]:
    """A B A B ... after warm-up; stops early (after at least 2 rounds) at the section's soft deadline."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        if i >= 2 and time.time() > soft_deadline:
            break
        for name, fn in fns.items():
            times[name].append(clock.time(fn))
    return times


def module_bytes(*modules: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def peak_memory(clock: Clock, fn: Callable[[], Any], weights: int) -> dict[str, float | None]:
    """The library's own weights + the call's transient peak (CUDA: max_memory_allocated above what
    was allocated before; CPU: the process's peak RSS above its RSS before, where /proc allows)."""
    gc.collect()
    if clock.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        transient = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        try:
            base_mib = bench._vm("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            fn()
            transient = max(bench._vm("VmHWM") - base_mib, 0.0)
        except OSError:
            fn()
            transient = None
    w = weights / 2**20
    return {"peak_mib": None if transient is None else w + transient, "weights_mib": w, "transient_mib": transient}


def diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """a against the reference b: max / mean abs difference, max |b|, their ratio, cosine, NaNs."""
    a, b = a.detach().double().flatten().cpu(), b.detach().double().flatten().cpu()
    d = (a - b).abs()
    ref = b.abs().max().item()
    return {
        "max_abs": d.max().item(),
        "mean_abs": d.mean().item(),
        "ref_max_abs": ref,
        "rel_max": d.max().item() / max(ref, 1e-12),
        "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
        "nan": int(a.isnan().sum() + b.isnan().sum()),
    }


@contextlib.contextmanager
def tf32_off() -> Iterator[dict[str, Any]]:
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield {"matmul_allow_tf32": False, "cudnn_allow_tf32": False, "float32_matmul_precision": "highest"}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


# -- host-sync counting --------------------------------------------------------------------------

# ops that make the host wait for the device: a scalar read (item, int(), float(), bool(), `if t:`),
# data-dependent shapes, tensor comparisons returning a bool; device -> host copies are added below
SYNC_OPS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::equal",
    "aten::is_nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
}
LIBS = ("minidiff", "diffusers", "transformers", "benchmarks")


def source_line() -> str:
    """The innermost frame in minidiff / diffusers / transformers (not torch): 'minidiff/x.py:12'."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        parts = Path(frame.filename).parts
        for lib in LIBS:
            if lib in parts and "torch" not in parts[parts.index(lib) :]:
                return f"{'/'.join(parts[parts.index(lib) :])}:{frame.lineno}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """Counts the aten ops that synchronise with the device, by the library line that issued them.
    Device-agnostic, so the CPU dry run sees the same calls (.item(), int(t), nonzero) as the GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        hit = name in SYNC_OPS
        if name in ("aten::_to_copy", "aten::copy_") and args and isinstance(args[0], torch.Tensor):
            src, dst = (args[1], args[0]) if name == "aten::copy_" else (args[0], kwargs.get("device"))
            dst_type = dst.device.type if isinstance(dst, torch.Tensor) else getattr(dst, "type", None)
            hit = isinstance(src, torch.Tensor) and src.device.type == "cuda" and dst_type == "cpu"
        if hit:
            self.hits[(name.removeprefix("aten::"), source_line())] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_sync_warnings(cuda: bool) -> Iterator[list | None]:
    """torch.cuda.set_sync_debug_mode('warn'), with every warning it raises recorded."""
    if not cuda:
        yield None
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")


# -- the worker: runs sections in this process, reports events as JSON lines ---------------------


class Ctx:
    """What a section needs: device, sizes, clock, the weights, its deadline, and a way to report."""

    def __init__(self, args: argparse.Namespace, events: Any) -> None:
        self.args = args
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.cuda = self.device == "cuda"
        self.sizes = DRY if self.dry else REAL
        self.clock = Clock(self.cuda)
        self.weights = Path(args.weights)
        self.deadline = args.deadline
        self.events = events
        self.section = ""
        self.soft_deadline = 0.0
        self.row: dict[str, Any] = {}

    def emit(self, event: str, **data: Any) -> None:
        self.events.write(json.dumps({"event": event, "t": time.time(), **data}, default=str) + "\n")
        self.events.flush()

    def save(self) -> None:
        """Report the section's results so far (kept if the section is then killed at its limit)."""
        self.emit("partial", section=self.section, row=self.row)

    def load(self, impl: str, component: str, dtype: torch.dtype) -> Any:
        return bench.load(impl, component, self.weights, self.device, dtype)


def unet_inputs(ctx: Ctx, model: Any, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    s = ctx.sizes.latent
    x = torch.randn(2, model.config.in_channels, s, s, generator=g).to(ctx.device, dtype)
    ctx_states = torch.randn(2, 77, model.config.cross_attention_dim, generator=g).to(ctx.device, dtype)
    t = torch.tensor([500, 500], device=ctx.device)
    return lambda m=model: m(x, t, encoder_hidden_states=ctx_states).sample


def summarise_times(row: dict[str, Any], times: dict[str, list[float]]) -> None:
    row["times_ms"] = {k: [1e3 * t for t in v] for k, v in times.items()}
    row["median_ms"] = {k: 1e3 * statistics.median(v) for k, v in times.items() if v}
    if "minidiff" in row["median_ms"] and "diffusers" in row["median_ms"]:
        row["ratio"] = row["median_ms"]["minidiff"] / row["median_ms"]["diffusers"]


def flops_and_memory(ctx: Ctx, row: dict[str, Any], fns: dict[str, Callable[[], Any]], modules: dict[str, Any]) -> None:
    """The row's FLOPs (counted on diffusers' call) and peak memory of each implementation after one warm-up call each,
    their ratio, then save."""
    row["flops"] = bench.count_flops(fns["diffusers"])
    for fn in fns.values():
        fn()
    row["memory"] = {impl: peak_memory(ctx.clock, fns[impl], module_bytes(modules[impl])) for impl in IMPLS}
    memory_ratio(row)
    ctx.save()


def memory_ratio(row: dict[str, Any]) -> None:
    peaks = {impl: row["memory"][impl]["peak_mib"] for impl in IMPLS if impl in row.get("memory", {})}
    if len(peaks) == 2 and None not in peaks.values():
        row["memory_ratio"] = peaks["minidiff"] / peaks["diffusers"]


def sec_weights(ctx: Ctx) -> None:
    ctx.row["folder"] = str(ctx.weights)
    ctx.row["created"] = not (ctx.weights / "model_index.json").exists()
    bench.make_weights(ctx.weights, TINY if ctx.dry else None)


def sec_parity(ctx: Ctx) -> None:
    from diffusers.utils.torch_utils import randn_tensor as diffusers_randn

    from minidiff.noise import randn_tensor as minidiff_randn

    row, dev = ctx.row, ctx.device
    # 1. noise: a CPU generator for device tensors draws on the CPU; a device generator on the device
    shape = (2, 4, ctx.sizes.latent, ctx.sizes.latent)
    cases = {
        "cpu_generator": lambda: torch.Generator("cpu").manual_seed(0),
        "device_generator": lambda: torch.Generator(dev).manual_seed(0),
        "generator_list": lambda: [torch.Generator("cpu").manual_seed(i) for i in range(2)],
    }
    row["noise"] = {}
    for case, gen in cases.items():
        a = minidiff_randn(shape, generator=gen(), device=torch.device(dev), dtype=torch.float16)
        b = diffusers_randn(shape, generator=gen(), device=torch.device(dev), dtype=torch.float16)
        row["noise"][case] = {"identical": bool(torch.equal(a, b)), "device": str(a.device)}
    ctx.save()

    # 2. a fp32 UNet step with TF32 off, then the same models in fp16 against that fp32 reference
    unets = {impl: ctx.load(impl, "unet", torch.float32) for impl in IMPLS}
    with torch.no_grad():
        with tf32_off() as flags:
            ref = {impl: unet_inputs(ctx, m, torch.float32)() for impl, m in unets.items()}
            ctx.clock.sync()
        row["unet_fp32"] = {**diff(ref["minidiff"], ref["diffusers"]), **flags}
        ctx.save()
        for m in unets.values():
            m.half()
        half = {impl: unet_inputs(ctx, m, torch.float16)() for impl, m in unets.items()}
    row["unet_fp16"] = diff(half["minidiff"], half["diffusers"])
    row["unet_fp16_vs_fp32"] = {impl: diff(half[impl], ref["diffusers"]) for impl in IMPLS}
    del unets, ref, half
    ctx.save()

    # 3. the same seeded fp16 txt2img with both, a generator on the device (as GPU users seed)
    s, n = ctx.sizes.image, ctx.sizes.steps
    images = {}
    for impl in IMPLS:
        pipe = ctx.load(impl, "pipeline", torch.float16)
        images[impl] = torch.from_numpy(
            pipe(
                PROMPT,
                height=s,
                width=s,
                num_inference_steps=n,
                generator=torch.Generator(dev).manual_seed(0),
                output_type="np",
            ).images
        )
        del pipe
        free(ctx)
    row["txt2img_fp16"] = {**diff(images["minidiff"], images["diffusers"]), "size": s, "steps": n, "generator": dev}


def sec_unet(ctx: Ctx, dtype: torch.dtype) -> None:
    row, z = ctx.row, ctx.sizes
    with torch.no_grad():
        models = {impl: ctx.load(impl, "unet", dtype) for impl in IMPLS}
        fns = {impl: unet_inputs(ctx, m, dtype) for impl, m in models.items()}
        row["workload"] = f"UNet step, batch 2 (CFG), {z.latent}×{z.latent} latents"
        flops_and_memory(ctx, row, fns, models)
        times = interleaved(ctx.clock, fns, z.unet_warmup, z.unet_repeats, ctx.soft_deadline)
    summarise_times(row, times)
    row["tflops"] = {k: row["flops"] / v / 1e9 for k, v in row["median_ms"].items()}


def sec_txt2img(ctx: Ctx) -> None:
    row, z = ctx.row, ctx.sizes
    pipes = {impl: ctx.load(impl, "pipeline", torch.float16) for impl in IMPLS}
    row["workload"] = f"txt2img {z.image}², {z.steps} PNDM steps, CFG 7.5, batch 1"
    marks: dict[int, Any] = {}  # loop iteration -> a mark at its end (PNDM: 50 steps are 51 UNet calls)

    def on_step(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        marks[i] = ctx.clock.mark()
        return {}

    def loop_rate() -> float:
        """Loop iterations (UNet call + scheduler step) per second, from the end of the first to the end of the last."""
        last = max(marks)
        return last / ctx.clock.seconds(marks[0], marks[last])

    def call(pipe: Any) -> Callable[[], Any]:
        return lambda: pipe(
            PROMPT,
            height=z.image,
            width=z.image,
            num_inference_steps=z.steps,
            generator=torch.Generator(ctx.device).manual_seed(0),
            output_type="np",
            callback_on_step_end=on_step,
        )

    fns = {impl: call(p) for impl, p in pipes.items()}
    for fn in fns.values():  # first calls (cuDNN / SDPA heuristics) are not timed
        fn()
    weights = {impl: module_bytes(p.unet, p.vae, p.text_encoder) for impl, p in pipes.items()}
    row["memory"] = {impl: peak_memory(ctx.clock, fns[impl], weights[impl]) for impl in IMPLS}
    memory_ratio(row)
    ctx.save()
    secs: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    loop_its: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for i in range(z.pipe_repeats):
        if i >= 2 and time.time() > ctx.soft_deadline:
            break
        for impl, fn in fns.items():
            marks.clear()
            secs[impl].append(ctx.clock.time(fn))  # synchronises, so the step marks are complete
            loop_its[impl].append(loop_rate())
        row["s_per_image"] = {impl: statistics.median(v) for impl, v in secs.items()}
        row["it_per_s"] = {impl: statistics.median(v) for impl, v in loop_its.items()}
        ctx.save()
    row["times_s"], row["loop_it_per_s_runs"] = secs, loop_its
    row["ratio"] = row["s_per_image"]["minidiff"] / row["s_per_image"]["diffusers"]
    row["ratio_loop"] = row["it_per_s"]["diffusers"] / row["it_per_s"]["minidiff"]


def sec_vae(ctx: Ctx) -> None:
    row, z = ctx.row, ctx.sizes
    with torch.no_grad():
        vaes = {impl: ctx.load(impl, "vae", torch.float16) for impl in IMPLS}
        g = torch.Generator().manual_seed(0)
        f = 2 ** (len(vaes["diffusers"].config.block_out_channels) - 1)
        latents = torch.randn(1, 4, z.image // f, z.image // f, generator=g).to(ctx.device, torch.float16)
        fns = {impl: (lambda v=v: v.decode(latents).sample) for impl, v in vaes.items()}
        row["workload"] = f"VAE decode {z.image}²"
        flops_and_memory(ctx, row, fns, vaes)
        times = interleaved(ctx.clock, fns, 2, z.vae_repeats, ctx.soft_deadline)
    summarise_times(row, times)


def sec_sync(ctx: Ctx) -> None:
    row, z = ctx.row, ctx.sizes
    pipes = {impl: ctx.load(impl, "pipeline", torch.float16) for impl in IMPLS}
    # the loop alone: prompt embeddings and latents given, latents out (no text encoder, VAE or numpy)
    with torch.no_grad():
        cond, uncond = pipes["diffusers"].encode_prompt(PROMPT, torch.device(ctx.device), 1, True)
    s = z.image // pipes["diffusers"].vae_scale_factor
    latents = torch.randn(1, 4, s, s, generator=torch.Generator().manual_seed(0)).to(ctx.device, torch.float16)

    def loop(pipe: Any, steps: int) -> Any:
        return pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            latents=latents,
            height=z.image,
            width=z.image,
            num_inference_steps=steps,
            output_type="latent",
        )

    row["steps"] = z.steps
    for impl, pipe in pipes.items():
        loop(pipe, 2)  # warm-up: first-call allocations and heuristics are not the loop's syncs
        ctx.clock.sync()
        with cuda_sync_warnings(ctx.cuda) as caught, HostSyncCounter() as counter:
            loop(pipe, z.steps)
        ctx.clock.sync()
        where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught or [] if "synchroniz" in str(w.message))
        row[impl] = {
            "sync_debug_warnings": None if caught is None else sum(where.values()),
            "sync_debug_where": dict(where.most_common(8)),
            "host_sync_ops": sum(counter.hits.values()),
            "host_sync_ops_per_step": sum(counter.hits.values()) / z.steps,
            "host_sync_where": {f"{op} @ {loc}": n for (op, loc), n in counter.hits.most_common(8)},
        }
        ctx.save()


def sec_compile(ctx: Ctx, dtype: torch.dtype) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    row, z = ctx.row, ctx.sizes
    backend = "eager" if ctx.dry else "inductor"
    mode = None if ctx.dry else ctx.args.compile_mode
    row.update(backend=backend, mode=mode, workload=f"UNet step, batch 2 (CFG), {z.latent}×{z.latent} latents")
    with torch.no_grad():
        models = {impl: ctx.load(impl, "unet", dtype) for impl in IMPLS}
        fns = {impl: unet_inputs(ctx, m, dtype) for impl, m in models.items()}
        row["compile_s"], row["graph_breaks"], row["graphs"] = {}, {}, {}
        for impl in IMPLS:
            counters.clear()
            compiled = torch.compile(models[impl], backend=backend, mode=mode)
            fn = unet_inputs(ctx, compiled, dtype)
            row["compile_s"][impl] = ctx.clock.wall(fn)  # the first call traces and compiles
            row["graph_breaks"][impl] = sum(counters["graph_break"].values())
            row["graphs"][impl] = counters["stats"]["unique_graphs"]
            fns[f"{impl}+compile"] = fn
            ctx.save()
        weights = {k: module_bytes(models[k.split("+")[0]]) for k in fns}
        row["memory"] = {k: peak_memory(ctx.clock, fn, weights[k]) for k, fn in fns.items()}
        ctx.save()
        times = interleaved(ctx.clock, fns, z.unet_warmup, z.unet_repeats, ctx.soft_deadline)
    summarise_times(row, times)
    m = row["median_ms"]
    row["ratio_compiled"] = m["minidiff+compile"] / m["diffusers+compile"]
    row["speedup_from_compile"] = {impl: m[impl] / m[f"{impl}+compile"] for impl in IMPLS}
    torch._dynamo.reset()


def sec_profile(ctx: Ctx) -> None:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    row, z = ctx.row, ctx.sizes
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    sort = "self_device_time_total" if ctx.cuda else "self_cpu_time_total"
    report = [f"# UNet step, batch 2, {z.latent}×{z.latent}, fp16, {ctx.args.device_name}, torch {torch.__version__}\n"]
    with torch.no_grad():
        for impl in IMPLS:
            model = ctx.load(impl, "unet", torch.float16)
            fn = unet_inputs(ctx, model, torch.float16)
            for _ in range(3):
                fn()
            wall = ctx.clock.time(fn)
            with profile(activities=activities) as prof:
                fn()
                ctx.clock.sync()
            events = prof.key_averages()
            # GPU busy time: the kernels' own durations; kernel_ms well under step_ms = launch-bound
            kernels = [e for e in events if e.device_type != DeviceType.CPU]
            busy = sum(e.device_time_total for e in kernels) / 1e3 if ctx.cuda else None
            row[impl] = {"step_ms": 1e3 * wall, "kernel_ms": busy, "kernel_names": len(kernels), "ops": len(events)}
            report += [f"## {impl}: {1e3 * wall:.2f} ms per step unprofiled", events.table(sort_by=sort, row_limit=20)]
            del model, fn
            free(ctx)
            ctx.save()
    path = Path(ctx.args.out_dir) / f"profile-unet{z.latent}-fp16-{ctx.args.slug}.txt"
    path.write_text("\n".join(report) + "\n")
    row["file"] = path.name


RUNNERS: dict[str, Callable[[Ctx], None]] = {
    "weights": sec_weights,
    "parity": sec_parity,
    "unet_fp16": lambda ctx: sec_unet(ctx, torch.float16),
    "txt2img_fp16": sec_txt2img,
    "vae_fp16": sec_vae,
    "unet_bf16": lambda ctx: sec_unet(ctx, torch.bfloat16),
    "sync": sec_sync,
    "compile_fp16": lambda ctx: sec_compile(ctx, torch.float16),
    "profile": sec_profile,
    "compile_bf16": lambda ctx: sec_compile(ctx, torch.bfloat16),
}


def free(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def environment(dry: bool) -> dict[str, Any]:
    import diffusers
    import transformers

    meta: dict[str, Any] = {
        "dry_run": dry,
        "device": "cpu" if dry else "cuda",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if not dry:
        props = torch.cuda.get_device_properties(0)
        meta.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
        with contextlib.suppress(Exception):
            meta["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
    with contextlib.suppress(Exception):
        meta["commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    meta["slug"] = "dry-run-cpu" if dry else re.sub(r"[^a-z0-9]+", "-", meta["gpu"].lower()).strip("-")
    return meta


def section_limit(sec: Section, args: argparse.Namespace) -> float:
    overrides = dict(item.split("=") for item in args.limits.split(",") if item)
    return float(overrides.get(sec.name, sec.dry_limit_s if args.dry_run else sec.limit_s))


def worker(args: argparse.Namespace) -> None:
    with open(args.events, "a") as events:
        ctx = Ctx(args, events)
        if not ctx.dry and not torch.cuda.is_available():
            ctx.emit("fatal", error="torch.cuda.is_available() is False: no GPU (use --dry-run on a CPU)")
            return
        meta = environment(ctx.dry)
        args.device_name, args.slug = meta.get("gpu", "cpu"), meta["slug"]
        ctx.emit("meta", meta=meta)
        for name in args.sections.split(","):
            sec = BY_NAME[name]
            now = time.time()
            if ctx.deadline - now < sec.min_s:
                ctx.emit("done", section=name, status="skipped", row={"reason": "budget"}, seconds=0.0)
                continue
            limit = section_limit(sec, args)
            hard = min(now + limit, ctx.deadline)
            ctx.section, ctx.row = name, {}
            ctx.soft_deadline = hard - max(3.0, 0.15 * limit)
            ctx.emit("start", section=name, hard_deadline=hard, limit_s=limit)
            try:
                if name == args.stall:  # tests of the watchdog: a section that never ends
                    time.sleep(3600)
                RUNNERS[name](ctx)
                status = "ok"
            except Exception:
                ctx.row["error"] = traceback.format_exc()[-3000:]
                print(ctx.row["error"], file=sys.stderr, flush=True)
                status = "error"
            ctx.emit("done", section=name, status=status, row=ctx.row, seconds=time.time() - now)
            print(f"[{name}] {status} in {time.time() - now:.1f} s", flush=True)
            free(ctx)


# -- the parent: starts workers, enforces the limits, writes the JSON and the table -------------


def run_sections(args: argparse.Namespace, names: list[str], deadline: float) -> tuple[dict, dict]:
    """Run `names` in workers; returns (meta, {section: result}). A section past its hard
    deadline (+ up to 5 s grace) is killed, and a fresh worker goes on with the rest."""
    results: dict[str, dict[str, Any]] = {}
    meta: dict[str, Any] = {}
    remaining = list(names)
    events_path = Path(tempfile.mkstemp(prefix="minidiff-cuda-events-", suffix=".jsonl")[1])
    try:
        while remaining:
            events_path.write_text("")
            cmd = [sys.executable, __file__, "--worker", "--events", str(events_path), "--deadline", str(deadline)]
            cmd += ["--sections", ",".join(remaining), "--weights", str(args.weights), "--out-dir", str(args.out_dir)]
            cmd += ["--compile-mode", args.compile_mode, "--limits", args.limits, "--stall", args.stall]
            cmd += ["--dry-run"] if args.dry_run else []
            proc = subprocess.Popen(cmd, start_new_session=True)
            current, hard, offset, progressed, grace = None, deadline, 0, False, 5.0
            while True:
                with open(events_path) as f:
                    f.seek(offset)
                    chunk = f.read()
                lines = chunk[: chunk.rfind("\n") + 1]
                offset += len(lines)
                for line in lines.splitlines():
                    ev = json.loads(line)
                    if ev["event"] == "meta":
                        meta = ev["meta"]
                    elif ev["event"] == "fatal":
                        raise SystemExit(ev["error"])
                    elif ev["event"] == "start":
                        current, hard, started, progressed = ev["section"], ev["hard_deadline"], ev["t"], True
                        grace = min(5.0, max(1.0, ev["limit_s"] / 4))  # room for the soft deadline's overrun
                        results[current] = {"status": "running", "limit_s": ev["limit_s"]}
                    elif ev["event"] == "partial":
                        results[ev["section"]] = {**results.get(ev["section"], {}), **ev["row"]}
                    elif ev["event"] == "done":
                        done = {"status": ev["status"], "seconds": ev["seconds"], **ev["row"]}
                        results[ev["section"]] = {**results.get(ev["section"], {}), **done}
                        remaining.remove(ev["section"])
                        current = None
                if proc.poll() is not None and not lines:
                    break
                if time.time() > (hard if current else deadline) + grace:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    if current is None:  # past the overall deadline between sections
                        remaining.clear()
                        break
                    row = results.get(current, {})
                    row.update(status="timeout", seconds=time.time() - started)
                    results[current] = row
                    print(f"[{current}] timeout after {row['seconds']:.1f} s: killed, going on", flush=True)
                    remaining.remove(current)
                    break
                time.sleep(0.1)
            if current is not None and current in remaining:  # the worker died inside a section
                results[current] = {**results.get(current, {}), "status": f"crashed (rc {proc.returncode})"}
                remaining.remove(current)
            elif remaining and not progressed:
                raise SystemExit(f"the worker exited ({proc.returncode}) before starting a section")
    finally:
        events_path.unlink(missing_ok=True)
    for name in names:
        results.setdefault(name, {"status": "skipped", "reason": "budget"})
    return meta, results


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(meta: dict[str, Any], results: dict[str, dict[str, Any]], sizes: Sizes) -> str:
    """The tables: performance (ratios minidiff / diffusers, < 1 = minidiff faster or smaller),
    compile times, GPU parity, host syncs, section status."""
    where = meta.get("gpu") or f"CPU dry run ({meta.get('cpu')}, tiny model)"
    head = (
        f"### minidiff vs diffusers on {where}\n\n"
        f"torch {meta.get('torch')} (CUDA {meta.get('cuda')}), diffusers {meta.get('diffusers')}, "
        f"transformers {meta.get('transformers')}, commit {meta.get('commit', '?')}; medians of interleaved runs, "
        f"{'perf_counter' if meta.get('dry_run') else 'CUDA events'}. Ratios are minidiff ÷ diffusers in time and "
        "memory (< 1: minidiff faster / smaller).\n"
    )
    perf = [
        "| workload | diffusers | minidiff | minidiff / diffusers | peak MiB diffusers | peak MiB minidiff "
        "| mem ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def mem_cells(r: dict[str, Any], keys: tuple[str, str] = IMPLS) -> list[str]:
        mem = r.get("memory", {})
        peaks = [mem.get(k, {}).get("peak_mib") for k in keys]
        ratio = peaks[1] / peaks[0] if None not in peaks and peaks[0] else None
        return [fmt(peaks[0], ".0f"), fmt(peaks[1], ".0f"), f"**{fmt(ratio, '.3f')}**"]

    def perf_row(label: str, d: float | None, m: float | None, spec: str, mem: list[str], ratio=None) -> None:
        ratio = ratio if ratio is not None else (m / d if d and m else None)
        perf.append(
            f"| {label} | {fmt(d, spec)} | {fmt(m, spec)} | **{fmt(ratio, '.3f')}** | " + " | ".join(mem) + " |"
        )

    s, n, lat = sizes.image, sizes.steps, sizes.latent
    for name, dt in (("unet_fp16", "fp16"), ("unet_bf16", "bf16")):
        r = results.get(name, {})
        ms = r.get("median_ms", {})
        perf_row(
            f"UNet step {dt}, batch 2, {lat}×{lat} (ms)", ms.get("diffusers"), ms.get("minidiff"), ".2f", mem_cells(r)
        )
        c = results.get(f"compile_{dt}", {})
        cms = c.get("median_ms", {})
        label = f"UNet step {dt}, torch.compile (ms)"
        perf_row(
            label,
            cms.get("diffusers+compile"),
            cms.get("minidiff+compile"),
            ".2f",
            mem_cells(c, ("diffusers+compile", "minidiff+compile")),
        )
    r = results.get("txt2img_fp16", {})
    spi, its = r.get("s_per_image", {}), r.get("it_per_s", {})
    perf_row(
        f"txt2img {s}², {n} steps, CFG, fp16 (s/image)", spi.get("diffusers"), spi.get("minidiff"), ".3f", mem_cells(r)
    )
    perf_row(
        f"txt2img {s}² denoising loop (it/s; ratio in time)",
        its.get("diffusers"),
        its.get("minidiff"),
        ".1f",
        ["", "", ""],
        r.get("ratio_loop"),
    )
    r = results.get("vae_fp16", {})
    ms = r.get("median_ms", {})
    perf_row(f"VAE decode {s}², fp16 (ms)", ms.get("diffusers"), ms.get("minidiff"), ".2f", mem_cells(r))

    comp = []
    for dt in ("fp16", "bf16"):
        c = results.get(f"compile_{dt}", {})
        if "compile_s" in c:
            cs, gb = c["compile_s"], c.get("graph_breaks", {})
            comp.append(
                f"- torch.compile {dt} ({c.get('backend')}, mode {c.get('mode')}): first call (compile) "
                + ", ".join(f"{k} {v:.1f} s, {gb.get(k, '?')} graph breaks" for k, v in cs.items())
                + (
                    "; speed-up over eager: " + ", ".join(f"{k} {v:.2f}×" for k, v in c["speedup_from_compile"].items())
                    if "speedup_from_compile" in c
                    else ""
                )
            )

    p = results.get("parity", {})
    par = ["| check | result |", "|---|---|"]
    for case, v in p.get("noise", {}).items():
        par.append(
            f"| noise, {case.replace('_', ' ')} ({v['device']}) | {'identical' if v['identical'] else '**differs**'} |"
        )

    def dline(label: str, d: dict[str, float] | None) -> None:
        if d:
            par.append(
                f"| {label} | max abs {d['max_abs']:.3g} (max abs ref {d['ref_max_abs']:.3g}, rel {d['rel_max']:.2e}), "
                f"mean abs {d['mean_abs']:.3g}, cosine {d['cosine']:.6f}"
                + (f", **{d['nan']} NaN**" if d["nan"] else "")
                + " |"
            )

    dline(f"UNet step fp32, TF32 off, {lat}×{lat}: minidiff vs diffusers", p.get("unet_fp32"))
    dline("UNet step fp16: minidiff vs diffusers", p.get("unet_fp16"))
    for impl, d in p.get("unet_fp16_vs_fp32", {}).items():
        dline(f"UNet step fp16 {impl} vs fp32 diffusers", d)
    t = p.get("txt2img_fp16")
    dline(f"txt2img {s}², {n} steps, fp16, same seed ({t['generator'] if t else '?'} generator): image on [0, 1]", t)

    sync = results.get("sync", {})
    syn = [
        f"| library | sync debug mode warnings ({sync.get('steps', n)} steps) | host-sync ops (dispatch) "
        "| per step | where |",
        "|---|---:|---:|---:|---|",
    ]
    for impl in IMPLS:
        v = sync.get(impl)
        if v:
            loc = "; ".join(f"{k} ×{c}" for k, c in v["host_sync_where"].items())
            syn.append(
                f"| {impl} | {fmt(v['sync_debug_warnings'], 'd')} | {v['host_sync_ops']} | "
                f"{v['host_sync_ops_per_step']:.2f} | {loc} |"
            )

    status = ["| section | status | s | limit s |", "|---|---|---:|---:|"]
    for sec in SECTIONS:
        r = results.get(sec.name, {})
        status.append(
            f"| {sec.name} | {r.get('status', '–')} | {fmt(r.get('seconds'), '.1f')} | {fmt(r.get('limit_s'), '.0f')} |"
        )
    parts = (
        [head, *perf, ""] + comp + ["", "#### GPU parity", "", *par, "", "#### Host syncs in the denoising loop", ""]
    )
    parts += [*syn, "", "#### Sections", "", *status]
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the whole path on CPU, tiny random model, in seconds")
    p.add_argument("--budget", type=float, help="overall seconds (default 450 on a GPU, 150 dry)")
    p.add_argument("--sections", default=",".join(s.name for s in SECTIONS), help="comma-separated, in order")
    p.add_argument("--weights", type=Path, help="SD 1.5 folder (default /tmp/minidiff-bench/sd15; dry: a temp dir)")
    p.add_argument("--out-dir", type=Path, help="where the JSON and profile go (default benchmarks/; dry: a temp dir)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--limits", default="", help="per-section limits in s, e.g. compile_fp16=240,parity=60")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--events", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--stall", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    t0 = time.time()
    names = args.sections.split(",")
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {list(BY_NAME)}")
    names = ["weights"] + [n for n in names if n != "weights"]
    budget = args.budget or (150.0 if args.dry_run else 450.0)
    tmp = Path(tempfile.mkdtemp(prefix="minidiff-cuda-dry-")) if args.dry_run else None
    args.out_dir = args.out_dir or (tmp if tmp else REPO / "benchmarks")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.weights = args.weights or (tmp / "tiny-sd" if tmp else Path("/tmp/minidiff-bench/sd15"))
    try:
        meta, results = run_sections(args, names, t0 + budget)
    finally:
        if tmp is not None and args.weights.is_relative_to(tmp):
            shutil.rmtree(args.weights, ignore_errors=True)
    sizes = DRY if args.dry_run else REAL
    meta.update(
        budget_s=budget, wall_s=time.time() - t0, command="python benchmarks/cuda_suite.py " + " ".join(sys.argv[1:])
    )
    table = markdown(meta, results, sizes)
    ordered = {s.name: results[s.name] for s in SECTIONS if s.name in results}
    out = args.out_dir / f"results-cuda-{meta.get('slug', 'unknown')}.json"
    out.write_text(
        json.dumps({"meta": meta, "sizes": asdict(sizes), "sections": ordered, "table": table}, indent=2) + "\n"
    )
    print("\n" + table + f"\n\nwrote {out} ({meta['wall_s']:.0f} s of a {budget:.0f} s budget)", flush=True)


if __name__ == "__main__":
    main()
