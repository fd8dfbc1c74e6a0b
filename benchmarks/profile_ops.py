"""torch.profiler top-ops tables for one bench.py section, both implementations, one after the other.

Usage:
    python benchmarks/profile_ops.py --only unet32 --dtype fp32 --out benchmarks/profiles

Writes <out>/<section>-<dtype>.txt: for each implementation the operators sorted by self CPU
time, then minidiff's top operators split by input shape (which layers the time goes to).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import DTYPES, IMPLS, SECTIONS, load, make_weights, time_once, workload  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=Path("/tmp/minidiff-bench/sd15"))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument(
        "--only", default="unet32", help=f"comma-separated sections: {','.join(s for s in SECTIONS if s != 'ttfo')}"
    )
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--out", type=Path, default=Path("benchmarks/profiles"))
    args = p.parse_args()
    make_weights(args.weights)
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[args.dtype]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    for section in args.only.split(","):
        report = [
            f"# {SECTIONS[section][1]}, {args.dtype}, {args.device}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads\n"
        ]
        for impl in IMPLS:
            with torch.no_grad():
                model = load(impl, SECTIONS[section][0], args.weights, args.device, dtype)
                fn = workload(section, model, args.device, dtype)
                fn()  # warm-up
                wall = time_once(fn, args.device)
                with profile(activities=activities, record_shapes=True) as prof:
                    fn()
            del model, fn
            report.append(f"## {impl}: {wall * 1e3:.0f} ms unprofiled\n")
            report.append(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=50))
            if impl == "minidiff":
                report.append(f"\n## {impl} by input shape\n")
                report.append(
                    prof.key_averages(group_by_input_shape=True).table(
                        sort_by=sort, row_limit=args.rows, max_name_column_width=40, max_shapes_column_width=70
                    )
                )
        path = args.out / f"{section}-{args.dtype}.txt"
        path.write_text("\n".join(report) + "\n")
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
