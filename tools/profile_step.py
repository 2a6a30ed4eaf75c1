#!/usr/bin/env python
"""Where a training step's time goes: torch.profiler's op table for each variant of a bench workload.

    .venv/bin/python tools/profile_step.py [--workload 1] [--device cuda] [--steps 20] [--rows 20]

Builds the variants of ``tools/bench.py``'s training workload (1-4, 13: plain, wn_transform,
torch's weight_norm, ...), runs ``--steps`` warm steps of each under ``torch.profiler`` and
prints, per variant, the host wall time per step and the ops sorted by their own time on the
device (CUDA) or the CPU.  A diagnosis aid for a benchmark row, not a benchmark: the profiler's
own overhead inflates small ops, so ratios come from ``tools/bench.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tools/ is not a package)


def profile_variant(name: str, step: bench.TrainStep, steps: int, device: torch.device, rows: int) -> str:
    """The op table of ``steps`` calls of ``step`` after a warm-up, headed by the wall time per step."""
    for _ in range(3):
        step()
    bench.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    bench.synchronize()
    per_step = (time.perf_counter() - start) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        bench.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    return f"### {name}: {per_step * 1e6:.1f} us per step (unprofiled, {steps} steps)\n{table}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    specs = {spec.key: spec for spec in bench.train_specs() if not spec.compile}
    parser.add_argument("--workload", choices=sorted(specs, key=int), default="1")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--variants", default="plain,wn_transform,torch",
                        help="comma-separated variants of the workload (default plain,wn_transform,torch)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device on this machine")
    spec = specs[args.workload]
    wanted = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(wanted) - set(spec.variants))
    if unknown:
        parser.error(f"workload {spec.key} has no variants {unknown}; it has {list(spec.variants)}")
    bench.set_threads(1)
    bench.full_float32()
    device = torch.device(args.device)
    spec = replace(spec, variants=tuple(dict.fromkeys(["plain", *wanted])))
    ctx = bench.Context(bench.Effort.quick(), 1, device)
    x, y = (t.to(device) for t in spec.batch())
    models = bench.on_device(bench.build_variants(spec), ctx)
    bench.check_variants(models, x)
    print(f"# {spec.title} on {bench.device_name(device)}, torch {torch.__version__}")
    for name, model in models.items():
        print(profile_variant(name, bench.TrainStep.of_variant(name, model, x, y), args.steps, device, args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
