"""Shared helpers of the paper-reproduction examples (``paper_classifier.py``, ``paper_vae.py``).

Data (scikit-learn's digits, shipped with scikit-learn, no download), seeded minibatch streams,
summaries over seeds, interleaved step timing, markdown tables and plots with shaded spread.
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "docs" / "paper"
QUICK_OUT = REPO_ROOT / "results" / "paper_quick"  # git-ignored: quick runs never touch docs/
N_TEST = 297  # the last 297 digits are the test set (as in examples/demo.py)
THREADS = 2


# ----------------------------------------------------------------------------- setup


def setup_torch() -> None:
    """Two threads, and denormals flushed to zero.

    Without flushing, steps whose activations or gradients underflow into denormal floats ran
    up to ten times slower on our CPU, which would swamp the timing comparison.  (The scripts
    also set ``OMP_WAIT_POLICY=PASSIVE`` before importing torch, unless it is set already: with
    OpenMP's default spinning, other processes on the same two cores slowed our steps up to
    eightfold; sleeping threads lose far less.)
    """
    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(True)


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    """``--quick`` (a smoke run of every code path) and ``--out DIR``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="few steps, one seed, tiny sweep (< 60 s)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {DEFAULT_OUT.relative_to(REPO_ROOT)}, "
                             f"or {QUICK_OUT.relative_to(REPO_ROOT)} with --quick)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    return args


def machine_note() -> str:
    """One line about where the numbers were measured (CPU, threads, torch, load)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    cpu = platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads; load average at the end of the run (1/5/15 min): {load}")


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Split:
    """Training and test tensors: images ``(N, 1, 8, 8)`` and labels ``(N,)``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def digits_counts() -> Split:
    """The digits as raw counts: each pixel is an integer in 0..16 (stored as float).

    Deterministic split: the last :data:`N_TEST` images are the test set.
    """
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    return Split(images[:-N_TEST], labels[:-N_TEST], images[-N_TEST:], labels[-N_TEST:])


def digits_standardized() -> Split:
    """The digits scaled to [0, 1], then standardized with the training set's mean and std."""
    raw = digits_counts()
    x_train, x_test = raw.x_train / 16.0, raw.x_test / 16.0
    mean, std = x_train.mean(), x_train.std()
    return Split((x_train - mean) / std, raw.y_train, (x_test - mean) / std, raw.y_test)


class BatchStream:
    """Endless minibatch indices: a fresh permutation each epoch, incomplete batches dropped.

    Every batch has exactly ``batch_size`` rows (so batch norm and step timing see one shape);
    the order depends only on ``seed``.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if batch_size > n:
            msg = f"batch_size {batch_size} > {n} examples"
            raise ValueError(msg)
        self.n = n
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._batches: Iterator[Tensor] = iter(())

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Tensor:
        batch = next(self._batches, None)
        if batch is None:
            order = torch.randperm(self.n, generator=self.generator)
            usable = self.n - self.n % self.batch_size
            self._batches = iter(order[:usable].split(self.batch_size))
            batch = next(self._batches)
        return batch


def calibration_indices(n: int, size: int, seed: int) -> Tensor:
    """``size`` distinct training indices for the data-dependent init, drawn with ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


@dataclass(frozen=True)
class Config:
    """The training budget and protocol of an experiment (the same for every variant).

    ``timing_batch_sizes``: the batch sizes step times are measured at (the first is
    ``batch_size``; the others are only timed, not trained); empty: ``batch_size`` alone.
    """

    steps: int
    eval_every: int
    batch_size: int
    lr_grid: tuple[float, ...]
    sweep_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    timing_rounds: int
    timing_block: int
    timing_batch_sizes: tuple[int, ...] = ()


# ----------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    """One training run: a training and a test metric at ``steps`` (NaN after a divergence)."""

    variant: str
    lr: float
    seed: int
    steps: list[int] = field(default_factory=list)
    train: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def diverged(self) -> bool:
        return not all(math.isfinite(x) for x in self.train)

    @property
    def final_train(self) -> float:
        return self.train[-1] if self.train else math.nan

    @property
    def final_test(self) -> float:
        return self.test[-1] if self.test else math.nan


@dataclass
class VariantResult:
    """A variant: its sweep (runs per lr), its runs at the chosen lr, its step times."""

    variant: Any  # the script's Variant (has ``name`` and ``label``)
    sweep: dict[float, list[RunResult]]
    lr: float
    runs: list[RunResult]
    ms_per_step: dict[int, float] = field(default_factory=dict)  # batch size -> median ms

    @property
    def stable_runs(self) -> list[RunResult]:
        return [run for run in self.runs if not run.diverged]

    @property
    def diverged_runs(self) -> int:
        return len(self.runs) - len(self.stable_runs)


def train_run(run: RunResult, *, steps: int, eval_every: int, step: Callable[[], float],
              evaluate: Callable[[], float]) -> RunResult:
    """Call ``step()`` (one training step, returns its loss) ``steps`` times into ``run``.

    Every ``eval_every`` steps, records the mean training loss since the last evaluation and
    ``evaluate()``; stops at the first non-finite training loss and fills the evaluations it
    never reached with NaN.
    """
    started = time.perf_counter()
    window: list[float] = []
    for i in range(1, steps + 1):
        window.append(step())
        if i % eval_every == 0:
            run.steps.append(i)
            run.train.append(sum(window) / len(window))
            run.test.append(evaluate())
            window = []
            if not math.isfinite(run.train[-1]):
                break
    for i in range((run.steps[-1] if run.steps else 0) + eval_every, steps + 1, eval_every):
        run.steps.append(i)
        run.train.append(math.nan)
        run.test.append(math.nan)
    run.seconds = time.perf_counter() - started
    return run


def sweep_then_seeds(variant: Any, train: Callable[[float, int], RunResult], *, lr_grid: Sequence[float],
                     sweep_seeds: Sequence[int], seeds: Sequence[int],
                     describe: Callable[[RunResult, str], str]) -> VariantResult:
    """The lr sweep over ``sweep_seeds``, then ``seeds`` at the chosen lr.

    The chosen lr is the one whose worse final training metric over the sweep seeds is lowest
    (a diverged run counts as +inf).  ``train(lr, seed)`` runs one training.
    """
    sweep: dict[float, list[RunResult]] = {}
    for lr in lr_grid:
        sweep[lr] = []
        for seed in sweep_seeds:
            sweep[lr].append(train(lr, seed))
            print(describe(sweep[lr][-1], "sweep"), flush=True)
    lr = pick_lowest({lr: max(finite_or_inf(r.final_train) for r in runs) for lr, runs in sweep.items()})
    runs = []
    for seed in seeds:
        runs.append(train(lr, seed))
        print(describe(runs[-1], "final"), flush=True)
    return VariantResult(variant, sweep, lr, runs)


# ----------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class Spread:
    """Mean, standard deviation (ddof=1; 0 for one value), min and max of some values."""

    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        values = [float(v) for v in values]
        if not values or not all(math.isfinite(v) for v in values):
            msg = f"Spread needs finite values, got {values}"
            raise ValueError(msg)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, min(values), max(values))

    def format(self, spec: str = ".3f", scale: float = 1.0, unit: str = "") -> str:
        """``mean ± std [min, max]`` (the range only for more than one value), each as ``spec``."""
        mean, std, lo, hi = (scale * x for x in (self.mean, self.std, self.min, self.max))
        text = f"{mean:{spec}} ± {std:{spec}}{unit}"
        if self.min != self.max:
            text += f" [{lo:{spec}}, {hi:{spec}}]"
        return text


def finite_or_inf(value: float) -> float:
    """``value``, with NaN mapped to +inf (for choosing the lowest loss)."""
    return value if math.isfinite(value) else math.inf


def pick_lowest(scores: dict[float, float]) -> float:
    """The key with the lowest finite score; the smallest key when none is finite."""
    finite = {k: v for k, v in scores.items() if math.isfinite(v)}
    if not finite:
        return min(scores)
    return min(finite, key=finite.__getitem__)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one of ``l``/``r`` per column (default: l then r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def final_cell(r: VariantResult, values: Callable[[RunResult], float], spec: str, scale: float = 1.0,
               unit: str = "") -> str:
    """``mean ± std [min, max]`` of ``values(run)`` over the runs that did not diverge, and how many did."""
    if not r.stable_runs:
        return f"diverged ({len(r.runs)}/{len(r.runs)})"
    text = Spread.of([values(run) for run in r.stable_runs]).format(spec, scale, unit)
    return text + (f"; {r.diverged_runs}/{len(r.runs)} diverged" if r.diverged_runs else "")


def sweep_table(results: Sequence[VariantResult], spec: str) -> str:
    """Final training metric of every sweep run (``div.`` if it diverged), chosen lr in bold."""
    grid = sorted({lr for r in results for lr in r.sweep})
    rows = []
    for r in results:
        cells = []
        for lr in grid:
            runs = r.sweep.get(lr, [])
            text = " / ".join("div." if run.diverged else f"{run.final_train:{spec}}" for run in runs) or "—"
            cells.append(f"**{text}**" if lr == r.lr else text)
        rows.append([f"`{r.variant.name}`", *cells])
    return markdown_table(["variant", *(f"lr={lr:g}" for lr in grid)], rows)


def divergence_note(r: VariantResult) -> str:
    """`` (k/n seeds diverged)`` for a plot label, or nothing."""
    return f" ({r.diverged_runs}/{len(r.runs)} seeds diverged)" if r.diverged_runs else ""


def write_curves_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Write the per-evaluation numbers behind the plots."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ----------------------------------------------------------------------------- timing


def interleaved_step_times(steps: dict[str, Callable[[], None]], *, rounds: int, block: int,
                           warmup: int = 3) -> dict[str, float]:
    """Median wall-clock milliseconds of one call of each ``steps[name]``.

    The cases are timed interleaved (A B C, B C A, C A B, ...; the start rotates each round),
    ``block`` single-call timings per case per round, the garbage collector off, so drift and
    background load hit every case alike.
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                step = steps[name]
                for _ in range(block):
                    start = time.perf_counter()
                    step()
                    samples[name].append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: 1000.0 * statistics.median(s) for name, s in samples.items()}


# ----------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class Panel:
    """One plot panel: ``{variant: array [seeds, evaluations]}`` against the evaluation steps."""

    ylabel: str
    curves: dict[str, np.ndarray]
    log_y: bool = False
    ylim: tuple[float, float] | None = None
    percent: bool = False


def plot_panels(path: Path, title: str, steps: np.ndarray, panels: Sequence[Panel], labels: dict[str, str]) -> None:
    """One row of panels; per variant the mean over seeds, shaded from min to max (NaNs ignored)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels):
        for i, (variant, values) in enumerate(panel.curves.items()):
            color = colors[i % len(colors)]
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns after a divergence
                mean = np.nanmean(values, axis=0)
                lo, hi = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
            ax.plot(steps, mean, color=color, label=labels.get(variant, variant), linewidth=1.6)
            if values.shape[0] > 1:
                ax.fill_between(steps, lo, hi, color=color, alpha=0.18, linewidth=0)
        if panel.log_y:
            ax.set_yscale("log")
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        if panel.percent:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("training step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(path: Path, title: str, sweeps: dict[str, dict[float, list[float]]], labels: dict[str, str],
               chosen: dict[str, float], ylabel: str, log_y: bool) -> None:
    """Final value against learning rate, per variant: each sweep seed a dot, their worst joined by a line.

    Diverged runs (non-finite values) are drawn as crosses on the top edge; the chosen lr is circled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [v for sweep in sweeps.values() for values in sweep.values() for v in values if math.isfinite(v)]
    top = max(finite) * (3.0 if log_y else 1.05) if finite else 1.0
    fig, ax = plt.subplots(figsize=(9.0, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (variant, sweep) in enumerate(sweeps.items()):
        color = colors[i % len(colors)]
        lrs = sorted(sweep)
        worst = [max(v if math.isfinite(v) else math.inf for v in sweep[lr]) for lr in lrs]
        ax.plot(lrs, [w if math.isfinite(w) else np.nan for w in worst], color=color, linewidth=1.4,
                label=labels.get(variant, variant))
        for lr in lrs:
            for v in sweep[lr]:
                if math.isfinite(v):
                    ax.scatter([lr], [v], color=color, s=14, zorder=3)
                else:
                    ax.scatter([lr], [top], color=color, marker="x", s=40, zorder=3)
        best = chosen[variant]
        ax.scatter([best], [max(sweep[best])], s=140, facecolors="none", edgecolors=color, linewidths=1.5, zorder=4)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
