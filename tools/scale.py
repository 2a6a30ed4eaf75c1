"""Memory at scale: apply_weight_norm and fold_weight_norm in place on a ~1 B-parameter model.

Measures the peak resident memory (VmHWM, reset through /proc/self/clear_refs before each
step) of: building the model, one plain forward of the calibration batch, apply_weight_norm
(inplace, preserve), apply_weight_norm (inplace, data-dependent init: one forward pass), and
fold_weight_norm (inplace).  The claim checked: no step holds a second copy of the weights, and
the init pass peaks within the plain forward's peak plus the per-unit statistics.

    .venv/bin/python tools/scale.py [--params 1e9] [--width 8192] [--batch 64]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import wn_transform as wn

GIB = 1024**3


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    msg = f"{field} not in /proc/self/status"
    raise RuntimeError(msg)


def measure(name: str, fn: Callable[[], object]) -> dict[str, float]:
    """Run ``fn``; report its time, the resident memory before and after, and the peak."""
    gc.collect()
    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    gc.collect()
    row = {"step": name, "seconds": seconds, "rss_before_gib": before / GIB,
           "rss_after_gib": _status("VmRSS") / GIB, "peak_gib": _status("VmHWM") / GIB}
    print(f"{name:<34} {seconds:7.1f} s   before {row['rss_before_gib']:6.2f} GiB   "
          f"peak {row['peak_gib']:6.2f} GiB   after {row['rss_after_gib']:6.2f} GiB", flush=True)
    return row


def build(params: float, width: int) -> nn.Sequential:
    layers = max(1, round(params / (width * width)))
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*blocks[:-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    holder: dict[str, nn.Module] = {}
    with torch.device("cpu"):
        measure("build the model", lambda: holder.__setitem__("model", build(args.params, args.width)))
    model = holder["model"]
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n / 1e9:.2f} B parameters, {n * 4 / GIB:.2f} GiB of float32 weights; batch {args.batch}")
    batch = torch.randn(args.batch, args.width)

    def forward() -> None:
        with torch.no_grad():
            model(batch)

    rows = [measure("plain forward (no grad)", forward)]
    rows.append(measure("apply_weight_norm inplace, preserve", lambda: wn.apply_weight_norm(model, inplace=True)))
    rows.append(measure("fold_weight_norm inplace", lambda: wn.fold_weight_norm(model, inplace=True)))
    rows.append(measure("apply_weight_norm inplace, data init", lambda: wn.apply_weight_norm(model, batch, inplace=True)))
    rows.append(measure("fold_weight_norm inplace", lambda: wn.fold_weight_norm(model, inplace=True)))
    weights = n * 4 / GIB
    print(f"\nweights {weights:.2f} GiB; extra peak over the resident model in each step:")
    for row in rows:
        print(f"  {row['step']:<34} +{row['peak_gib'] - row['rss_before_gib']:.2f} GiB "
              f"({(row['peak_gib'] - row['rss_before_gib']) / weights:.1%} of the weights)")


if __name__ == "__main__":
    main()
