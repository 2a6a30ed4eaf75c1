"""The paper's supervised experiment (Salimans & Kingma, 2016, sec. 5.1), scaled to the digits.

One small CNN, trained from scratch on scikit-learn's 8x8 digits (shipped with scikit-learn;
the last 297 images are the test set, pixels standardized with training statistics), in these
parameterizations (the network is the same; only the parameterization and normalization differ):

* ``plain``: the normal parameterization, torch's default init;
* ``wn``: weight norm, the paper's init: directions resampled ``v ~ N(0, 0.05^2)``
  (``resample=True``) and data-dependent ``g``, ``b`` on a calibration batch;
* ``wn_noinit``: weight norm without data-dependent init (``init="preserve"``):
  ``g = ||w||`` of torch's default init, so it starts as the same function as ``plain``;
* ``bn``: batch norm (``BatchNorm2d``/``BatchNorm1d`` behind every conv and hidden linear);
* ``wn_mobn``: weight norm + mean-only batch norm (``mean_only_bn=True``), paper's init;
* ``wn_exp``: weight norm with the exponential scale ``g = e^s`` (``exp_scale=True``), paper's init.

Protocol.  SGD with momentum 0.9, batch 100, the same number of steps for every variant.
The learning rate of each variant is chosen by a sweep over a log grid with two seeds that are
*not* among the reported seeds: the lr whose worse final training loss (the mean minibatch loss
over the last evaluation window) of the two is lowest wins; a diverged run counts as +inf, so an
lr must work for both seeds.  The chosen lr is then run with three other seeds.  Every
``eval_every`` steps we record the training loss (mean of the minibatch losses since the last
evaluation, in train mode, as the optimizer saw them) and the test error (eval mode, all 297
test images).  Finally the median wall-clock time of one training step (forward, backward, SGD
step) of every variant is measured, interleaved, at the training batch size and at a large one.

    .venv/bin/python examples/paper_classifier.py            # full run -> docs/paper/
    .venv/bin/python examples/paper_classifier.py --quick    # smoke run -> results/paper_quick/
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see _paper_common

import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import wn_transform  # noqa: E402

if __package__ in (None, ""):  # run as a script: the helpers sit next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _paper_common as common  # noqa: E402

CALIB_SIZE = 500  # images in the data-dependent init's calibration batch (the paper: one minibatch)
MOMENTUM = 0.9


@dataclass(frozen=True)
class Variant:
    """One parameterization of the same network."""

    name: str
    label: str
    batch_norm: bool = False
    weight_norm: Literal["data", "preserve"] | None = None
    mean_only_bn: bool = False
    exp_scale: bool = False

    @property
    def resample(self) -> bool:
        """The paper's init (fresh directions ``v ~ N(0, 0.05^2)``) goes with the data init."""
        return self.weight_norm == "data"


VARIANTS = (
    Variant("plain", "plain (normal parameterization)"),
    Variant("wn", "weight norm, data init", weight_norm="data"),
    Variant("wn_noinit", "weight norm, no data init", weight_norm="preserve"),
    Variant("bn", "batch norm", batch_norm=True),
    Variant("wn_mobn", "weight norm + mean-only BN", weight_norm="data", mean_only_bn=True),
    Variant("wn_exp", "weight norm, g = exp(s)", weight_norm="data", exp_scale=True),
)


Config = common.Config

FULL = Config(steps=300, eval_every=15, batch_size=100, lr_grid=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
              sweep_seeds=(100, 101), seeds=(0, 1, 2), timing_rounds=12, timing_block=10,
              timing_batch_sizes=(100, 1000))
QUICK = Config(steps=45, eval_every=15, batch_size=100, lr_grid=(0.01, 0.1),
               sweep_seeds=(100,), seeds=(0,), timing_rounds=2, timing_block=3, timing_batch_sizes=(100, 200))


@dataclass(frozen=True)
class Task:
    """A data set and the network trained on it (``build(batch_norm)``; the same for all variants)."""

    name: str
    title: str
    data: common.Split
    build: Callable[[bool], nn.Module]


RunResult = common.RunResult
VariantResult = common.VariantResult


# ----------------------------------------------------------------------------- models


def digits_cnn(batch_norm: bool) -> nn.Sequential:
    """Four 3x3 convs (16, 16, 32, 32 channels, two max-pools) and two linears, leaky ReLU 0.1.

    With ``batch_norm``, a ``BatchNorm2d``/``BatchNorm1d`` follows every conv and the hidden linear.
    """

    def unit(layer: nn.Module, width: int, norm: type[nn.Module]) -> list[nn.Module]:
        return [layer, *([norm(width)] if batch_norm else []), nn.LeakyReLU(0.1)]

    return nn.Sequential(
        *unit(nn.Conv2d(1, 16, 3, padding=1), 16, nn.BatchNorm2d),
        *unit(nn.Conv2d(16, 16, 3, padding=1), 16, nn.BatchNorm2d),
        nn.MaxPool2d(2),
        *unit(nn.Conv2d(16, 32, 3, padding=1), 32, nn.BatchNorm2d),
        *unit(nn.Conv2d(32, 32, 3, padding=1), 32, nn.BatchNorm2d),
        nn.MaxPool2d(2),
        nn.Flatten(),
        *unit(nn.Linear(32 * 2 * 2, 64), 64, nn.BatchNorm1d),
        nn.Linear(64, 10),
    )


def digits_task() -> Task:
    return Task("digits", "scikit-learn digits (8x8), small CNN", common.digits_standardized(), digits_cnn)


def build_model(task: Task, variant: Variant, seed: int) -> nn.Module:
    """The task's network, seeded, in ``variant``'s parameterization (and initialization)."""
    torch.manual_seed(seed)
    model = task.build(variant.batch_norm)
    if variant.weight_norm is None:
        return model
    calib = None
    if variant.weight_norm == "data":
        calib = task.data.x_train[common.calibration_indices(len(task.data.x_train), CALIB_SIZE, seed)]
    return wn_transform.apply_weight_norm(
        model, calib, init=variant.weight_norm, resample=variant.resample, exp_scale=variant.exp_scale,
        mean_only_bn=variant.mean_only_bn, inplace=True, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def test_error(model: nn.Module, data: common.Split) -> float:
    """Fraction of test images misclassified, in eval mode (train mode is restored)."""
    was_training = model.training
    model.eval()
    wrong = (model(data.x_test).argmax(dim=1) != data.y_test).float().mean().item()
    model.train(was_training)
    return wrong


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One SGD step on a minibatch; returns its loss."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train(task: Task, variant: Variant, lr: float, seed: int, config: Config) -> RunResult:
    """Train one model for ``config.steps`` steps; stops early (NaN-filled) if the loss diverges."""
    model = build_model(task, variant, seed)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    stream = common.BatchStream(len(task.data.x_train), config.batch_size, seed)

    def step() -> float:
        idx = next(stream)
        return sgd_step(model, optimizer, task.data.x_train[idx], task.data.y_train[idx])

    return common.train_run(RunResult(variant.name, lr, seed), steps=config.steps, eval_every=config.eval_every,
                            step=step, evaluate=lambda: test_error(model, task.data))


def describe(run: RunResult, tag: str) -> str:
    status = "DIVERGED" if run.diverged else f"train loss {run.final_train:.3g}, test error {run.final_test:.2%}"
    return f"  [{tag}] {run.variant:<9} lr={run.lr:<6g} seed={run.seed:<3d} {status} ({run.seconds:.1f} s)"


def run_variant(task: Task, variant: Variant, config: Config) -> VariantResult:
    """The lr sweep (the sweep seeds), then the reported seeds at the chosen lr."""
    return common.sweep_then_seeds(variant, lambda lr, seed: train(task, variant, lr, seed, config),
                                   lr_grid=config.lr_grid, sweep_seeds=config.sweep_seeds, seeds=config.seeds,
                                   describe=describe)


def measure_step_times(task: Task, results: Sequence[VariantResult], config: Config, batch_size: int,
                       rounds: int) -> None:
    """Median ms per training step of every variant at its chosen lr, timed interleaved."""
    steps = {}
    for result in results:
        model = build_model(task, result.variant, config.seeds[0])
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=result.lr, momentum=MOMENTUM)
        stream = common.BatchStream(len(task.data.x_train), batch_size, config.seeds[0])

        def step(model=model, optimizer=optimizer, stream=stream) -> None:
            idx = next(stream)
            sgd_step(model, optimizer, task.data.x_train[idx], task.data.y_train[idx])

        steps[result.variant.name] = step
    times = common.interleaved_step_times(steps, rounds=rounds, block=config.timing_block)
    for result in results:
        result.ms_per_step[batch_size] = times[result.variant.name]


# ----------------------------------------------------------------------------- outputs


def curves(results: Sequence[VariantResult], metric: str) -> dict[str, np.ndarray]:
    """``{variant: array [seeds, evaluations]}`` of ``metric`` (an attribute of RunResult)."""
    return {r.variant.name: np.array([getattr(run, metric) for run in r.runs], dtype=float) for r in results}


def results_table(results: Sequence[VariantResult]) -> str:
    batch_sizes = list(results[0].ms_per_step)
    plain = next((r for r in results if r.variant.name == "plain"), results[0])
    rows = []
    for r in results:
        edge = " (grid edge)" if r.lr in (min(r.sweep), max(r.sweep)) else ""
        times = [f"{r.ms_per_step[b]:.2f} ({r.ms_per_step[b] / plain.ms_per_step[b]:.2f}x)" for b in batch_sizes]
        rows.append([f"`{r.variant.name}`", r.variant.label, f"{r.lr:g}{edge}",
                     common.final_cell(r, lambda run: run.final_train, ".1e"),
                     common.final_cell(r, lambda run: run.final_test, ".2f", 100, " %"), *times])
    headers = ["variant", "parameterization", "lr", "final train loss", "final test error",
               *(f"ms/step, batch {b} (vs plain)" for b in batch_sizes)]
    return common.markdown_table(headers, rows, "llr" + "r" * (len(headers) - 3))


def write_outputs(out: Path, task: Task, results: Sequence[VariantResult], config: Config, seconds: float) -> None:
    """``classifier_<task>.png`` (curves), ``classifier_<task>_lr.png`` (sweep), ``.md`` (tables), ``.csv`` (curves)."""
    out.mkdir(parents=True, exist_ok=True)
    steps = np.array(results[0].runs[0].steps)
    common.plot_panels(
        out / f"classifier_{task.name}.png",
        f"{task.title}: SGD momentum 0.9, batch {config.batch_size}; mean over seeds {list(config.seeds)}, "
        "shaded min-max",
        steps,
        [common.Panel("training loss (minibatch mean since last eval)", curves(results, "train"), log_y=True),
         common.Panel("test error", curves(results, "test"), ylim=(0.0, 0.3), percent=True)],
        {r.variant.name: f"{r.variant.label}, lr {r.lr:g}{common.divergence_note(r)}" for r in results})
    common.plot_sweep(
        out / f"classifier_{task.name}_lr.png",
        f"{task.title}: lr sweep, SGD, {config.steps} steps\n"
        f"dots: seeds {list(config.sweep_seeds)}; line: the worse seed; x: diverged; circle: chosen lr",
        {r.variant.name: {lr: [run.final_train for run in runs] for lr, runs in r.sweep.items()} for r in results},
        {r.variant.name: r.variant.label for r in results}, {r.variant.name: r.lr for r in results},
        "final training loss", log_y=True)
    rows = [[task.name, r.variant.name, run.lr, run.seed, step, f"{loss:.6g}", f"{err:.6g}"]
            for r in results for run in r.runs
            for step, loss, err in zip(run.steps, run.train, run.test)]
    common.write_curves_csv(out / f"classifier_{task.name}.csv",
                            ["task", "variant", "lr", "seed", "step", "train_loss", "test_error"], rows)
    epochs = config.steps * config.batch_size / len(task.data.x_train)
    text = f"""# Classifier: {task.title}

Written by `examples/paper_classifier.py{' --quick' if config is QUICK else ''}` in {seconds:.0f} s.

Setup: {len(task.data.x_train)} training / {len(task.data.x_test)} test images; SGD, momentum {MOMENTUM},
batch {config.batch_size}, {config.steps} steps (~{epochs:.0f} epochs) for every variant; evaluation every
{config.eval_every} steps.  Data-dependent init (`wn`, `wn_mobn`, `wn_exp`): `apply_weight_norm(model,
calib, resample=True, ...)` on {CALIB_SIZE} random training images, directions resampled as in the paper.
Learning rate: per variant, from a sweep with seeds {list(config.sweep_seeds)}: the lr whose worse final
training loss over those seeds is lowest (a diverged run counts as infinite; table below); then
seeds {list(config.seeds)} at that lr.

Final values: mean ± std over seeds [min, max] (over the seeds that did not diverge, if any did).
Training loss: mean minibatch loss of the last {config.eval_every} steps.  Test error: eval mode,
after the last step.  ms/step: median wall-clock time of one training step (forward, backward,
SGD step), all variants timed interleaved ({config.timing_rounds} rounds of {config.timing_block} steps
at batch {config.batch_size}, half as many at the larger batch, which is only timed, not trained).
In the plot, curves are means over the seeds that had not diverged at that step.

{results_table(results)}

![training curves](classifier_{task.name}.png)

## Learning-rate sweep: final training loss (seed {' / seed '.join(map(str, config.sweep_seeds))}), chosen lr in bold

{common.sweep_table(results, ".2g")}

![learning-rate sweep](classifier_{task.name}_lr.png)

Machine: {common.machine_note()}.
"""
    (out / f"classifier_{task.name}.md").write_text(text)


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment; returns the process exit status."""
    args = common.parse_args(argv, __doc__.splitlines()[0])
    config = QUICK if args.quick else FULL
    common.setup_torch()
    started = time.perf_counter()
    task = digits_task()
    print(f"{task.title}: {len(task.data.x_train)} train / {len(task.data.x_test)} test; "
          f"{config.steps} steps of batch {config.batch_size}; lr grid {list(config.lr_grid)}; seeds {list(config.seeds)}")
    results = []
    for variant in VARIANTS:
        results.append(run_variant(task, variant, config))
        print(f"{variant.name}: chose lr={results[-1].lr:g}", flush=True)
    for i, batch_size in enumerate(config.timing_batch_sizes):
        rounds = config.timing_rounds if i == 0 else max(2, config.timing_rounds // 2)
        measure_step_times(task, results, config, batch_size, rounds)
        print(f"ms/step at batch {batch_size}: "
              + ", ".join(f"{r.variant.name} {r.ms_per_step[batch_size]:.2f}" for r in results), flush=True)
    write_outputs(args.out, task, results, config, time.perf_counter() - started)
    print(f"wrote {args.out}/classifier_{task.name}{{.md,.png,_lr.png,.csv}} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
