#!/usr/bin/env python
"""What a sound zero direction costs on a device: our CUDA route against torch's fused kernel alone.

    python tools/mend_cost.py --device cuda [--workloads 1,3,4,2,eval] [--budget 8]

On CUDA a weight is ``fast.guarded_weight``: torch's fused ``_weight_norm_interface`` kernel, its
zero-direction rows mended on the device (three small kernels more per weight forward, two in
eval).  This tool times, interleaved, ``tools/bench.py``'s workloads with the wn_transform model's
weights from three routes, beside plain and torch's ``parametrizations.weight_norm``:

* ``mended``: ``fast.guarded_weight``, what ships;
* ``fused_alone``: torch's kernel without the mend (NaN for a zero direction, as torch's own: a
  floor for this design, not an option);
* ``plain_formula``: ``g * v/||v||`` with ordinary ops (``norm.compose_weight``, autograd's
  backward).

and prints, per workload, each variant's median and its per-round ratio to torch's.  On the CPU
the route is forced onto CPU tensors (a smoke test: there Linear layers may take the output form
or the native kernels, which no route changes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tools/ is not a package)
import bench_models as bm  # noqa: E402

from wn_transform import fast, kernels  # noqa: E402
from wn_transform.norm import UnitLayout, compose_weight  # noqa: E402


def _fused_alone(v: Tensor, gain: Tensor, dim: int) -> Tensor:
    return torch._weight_norm_interface(v, gain, dim)[0]


def _plain_formula(v: Tensor, gain: Tensor, dim: int) -> Tensor:
    return compose_weight(gain, v, UnitLayout(dim))


ROUTES: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    "mended": fast.guarded_weight, "fused_alone": _fused_alone, "plain_formula": _plain_formula}


def routed(route: str, run: Callable[[object], object]) -> Callable[[object], object]:
    """``run`` with the wn_transform weights from ``route`` (``fast.guarded_weight`` swapped for the call)."""
    weight = ROUTES[route]
    shipped = fast.guarded_weight

    def call(arg: object) -> object:
        fast.guarded_weight = weight
        try:
            return run(arg)
        finally:
            fast.guarded_weight = shipped
    return call


def workload_cases(key: str, device: torch.device) -> tuple[str, list[bench.Case]]:
    """The title and cases of a training workload of ``tools/bench.py`` (or ``"eval"``: its workload 6),
    after checking that every variant computes plain's output (each route on its own copy)."""
    spec = {s.key: s for s in bench.train_specs()}.get(key)
    if spec is None:
        title, plain = "eval forward (no_grad), MLP 784-1024-1024-10, batch 1", bm.mlp().to(device).eval()
        x, y = bench._classification_batch((1, 784))[0].to(device), None  # workload 6's input
    else:
        title, plain = spec.title, spec.build(False).to(device)
        x, y = (t.to(device) for t in spec.batch())
    models = {"plain": plain, "torch": bm.make_variant("torch", plain)}
    models |= {route: bm.make_variant("wn_transform", plain) for route in ROUTES}
    with torch.no_grad():
        expected = plain(x)
        for name, model in models.items():
            if name != "plain":
                bench.check_close(name, routed(name, model)(x) if name in ROUTES else model(x), expected)
    runs = {name: bench._eval_case(name, model.eval(), x).run if y is None else bench.TrainStep(model, x, y)
            for name, model in models.items()}
    return title, [bench.Case(name, routed(name, run) if name in ROUTES else run) for name, run in runs.items()]


def report(title: str, timing: bench.Timing) -> str:
    lines = [f"## {title} ({timing.rounds} rounds)", "| variant | median | ratio to plain | per-round ratio to torch | rounds faster than torch |",
             "|---|---:|---:|---:|---|"]
    for name, samples in timing.samples.items():
        paired = timing.paired_ratios(name, "torch")
        faster = sum(r < 1 for r in paired)
        lines.append(f"| {name} | {samples.median * 1e6:.1f} us | {timing.ratio(name, 'plain'):.3f} | "
                     f"{statistics.median(paired):.3f} | {faster} of {len(paired)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workloads", default="1,3,4,2,eval", help="comma-separated: 1, 2, 3, 4, 13 and eval")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timing per workload (0: 2 rounds)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device on this machine")
    known = {"1", "2", "3", "4", "13", "eval"}
    keys = [k for k in args.workloads.split(",") if k]
    if unknown := sorted(set(keys) - known):
        parser.error(f"unknown workloads {unknown}; known: {sorted(known)}")
    device = torch.device(args.device)
    if device.type == "cpu":  # the CUDA route, on CPU tensors
        fast.guarded_on_device = lambda v: type(v) in kernels.PLAIN_TYPES
    bench.set_threads(1)
    bench.full_float32()
    effort = bench.Effort.full(1.0) if args.budget > 0 else bench.Effort.quick()
    print(f"# the cost of the zero-direction mend on {bench.device_name(device)}, torch {torch.__version__}")
    for key in keys:
        title, cases = workload_cases(key, device)
        print(report(title, bench.interleave(cases, effort, budget_s=args.budget)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
