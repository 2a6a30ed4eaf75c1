"""The paper's generative experiment (Salimans & Kingma, 2016, sec. 5.2), scaled to the digits.

A small convolutional variational auto-encoder on scikit-learn's 8x8 digits (the last 297 images
are held out), trained with and without weight normalization:

* ``plain``: the normal parameterization, torch's default init;
* ``wn``: weight norm with the paper's init (``apply_weight_norm(model, calib, resample=True)``:
  directions ``v ~ N(0, 0.05^2)``, then data-dependent ``g``, ``b`` on a calibration batch).

Model.  Encoder: conv 3x3 (16) -> conv 3x3 stride 2 (32) -> linear to the mean and log-variance
of a 16-dimensional diagonal Gaussian ``q(z|x)``.  Decoder: linear -> transposed conv 4x4
stride 2 (16) -> conv 3x3 -> one logit per pixel.  ELU activations; prior ``N(0, I)``.

Likelihood.  A digits pixel is a count in 0..16 (on-pixels of a 4x4 block of the original
32x32 bitmap), so each pixel is modelled as ``Binomial(16, sigmoid(logit))``: the Bernoulli
cross-entropy on pixels scaled to [0, 1], times 16, plus ``log C(16, k)``.  The negative ELBO is
then a true upper bound on ``-log p(x)`` of the data, in nats per image.

Protocol.  Adam, batch 100, the same number of steps for both.  The lr of each variant is chosen
by a sweep with seeds not among the reported ones: the lr whose worst final training bound (the
mean minibatch bound of the last evaluation window) over those seeds is lowest; then three
seeds at that lr.  Every
``eval_every`` steps the test bound is computed on all 297 held-out images, averaged over
``EVAL_SAMPLES`` draws of ``z`` per image (the same draws at every evaluation).

    .venv/bin/python examples/paper_vae.py            # full run -> docs/paper/
    .venv/bin/python examples/paper_vae.py --quick    # smoke run -> results/paper_quick/
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see _paper_common

import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import wn_transform  # noqa: E402

if __package__ in (None, ""):  # run as a script: the helpers sit next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _paper_common as common  # noqa: E402

LATENT = 16
TRIALS = 16  # a digits pixel counts on-pixels in a 4x4 block: 0..16
CALIB_SIZE = 500
EVAL_SAMPLES = 8  # z draws per test image when evaluating the bound
EVAL_SEED = 12345  # the test bound's draws are the same at every evaluation and for every run


@dataclass(frozen=True)
class Variant:
    """Plain parameterization, or weight norm with the paper's data-dependent init."""

    name: str
    label: str
    weight_norm: bool


VARIANTS = (
    Variant("plain", "plain (normal parameterization)", weight_norm=False),
    Variant("wn", "weight norm, data init", weight_norm=True),
)


Config = common.Config

FULL = Config(steps=900, eval_every=50, batch_size=100, lr_grid=(1e-3, 3e-3, 1e-2, 3e-2),
              sweep_seeds=(100, 101), seeds=(0, 1, 2), timing_rounds=12, timing_block=10)
QUICK = Config(steps=60, eval_every=20, batch_size=100, lr_grid=(1e-3, 3e-3),
               sweep_seeds=(100,), seeds=(0,), timing_rounds=2, timing_block=3)


RunResult = common.RunResult
VariantResult = common.VariantResult


# ----------------------------------------------------------------------------- model


def binomial_log_prob(counts: Tensor, logits: Tensor) -> Tensor:
    """``log Binomial(counts; TRIALS, sigmoid(logits))`` summed per image."""
    log_choose = torch.lgamma(torch.tensor(TRIALS + 1.0)) - torch.lgamma(counts + 1) - torch.lgamma(TRIALS - counts + 1)
    log_p = counts * F.logsigmoid(logits) + (TRIALS - counts) * F.logsigmoid(-logits) + log_choose
    return log_p.flatten(1).sum(dim=1)


class ConvVAE(nn.Module):
    """Conv encoder / transposed-conv decoder; ``forward`` returns the negative ELBO per image."""

    def __init__(self, latent: int = LATENT, width: int = 16) -> None:
        super().__init__()
        self.latent = latent
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ELU(),  # 8x8 -> 4x4
            nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, 2 * latent),  # mean and log-variance of q(z|x)
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent, 2 * width * 4 * 4), nn.ELU(),
            nn.Unflatten(1, (2 * width, 4, 4)),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.ELU(),  # 4x4 -> 8x8
            nn.Conv2d(width, 1, 3, padding=1),  # one logit per pixel
        )

    def forward(self, counts: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``-ELBO`` of each image of ``counts`` (``(N, 1, 8, 8)``, values 0..16), one draw of z."""
        mean, log_var = self.encoder(counts / TRIALS).chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        z = mean + (0.5 * log_var).exp() * eps
        log_likelihood = binomial_log_prob(counts, self.decoder(z))
        kl = 0.5 * (mean.square() + log_var.exp() - 1 - log_var).sum(dim=1)
        return kl - log_likelihood


def build_model(variant: Variant, x_train: Tensor, seed: int) -> nn.Module:
    """The VAE, seeded, in ``variant``'s parameterization (and initialization)."""
    torch.manual_seed(seed)
    model = ConvVAE()
    if not variant.weight_norm:
        return model
    calib = x_train[common.calibration_indices(len(x_train), CALIB_SIZE, seed)]
    return wn_transform.apply_weight_norm(model, calib, resample=True, inplace=True,
                                          generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def test_bound(model: nn.Module, x_test: Tensor) -> float:
    """Mean negative ELBO per held-out image, averaged over ``EVAL_SAMPLES`` fixed draws of z."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    return float(torch.stack([model(x_test, generator) for _ in range(EVAL_SAMPLES)]).mean())


def adam_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, generator: torch.Generator) -> float:
    """One Adam step on the mean negative ELBO of a minibatch; returns it."""
    loss = model(x, generator).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train(variant: Variant, lr: float, seed: int, data: common.Split, config: Config) -> RunResult:
    """Train one VAE for ``config.steps`` steps; stops early (NaN-filled) if the bound diverges."""
    model = build_model(variant, data.x_train, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    stream = common.BatchStream(len(data.x_train), config.batch_size, seed)
    noise = torch.Generator().manual_seed(seed)
    return common.train_run(RunResult(variant.name, lr, seed), steps=config.steps, eval_every=config.eval_every,
                            step=lambda: adam_step(model, optimizer, data.x_train[next(stream)], noise),
                            evaluate=lambda: test_bound(model, data.x_test))


def describe(run: RunResult, tag: str) -> str:
    status = ("DIVERGED" if run.diverged
              else f"train bound {run.final_train:.2f}, test bound {run.final_test:.2f} nats")
    return f"  [{tag}] {run.variant:<5} lr={run.lr:<6g} seed={run.seed:<3d} {status} ({run.seconds:.1f} s)"


def run_variant(variant: Variant, data: common.Split, config: Config) -> VariantResult:
    """The lr sweep (the sweep seeds), then the reported seeds at the chosen lr."""
    return common.sweep_then_seeds(variant, lambda lr, seed: train(variant, lr, seed, data, config),
                                   lr_grid=config.lr_grid, sweep_seeds=config.sweep_seeds, seeds=config.seeds,
                                   describe=describe)


def measure_step_times(results: Sequence[VariantResult], data: common.Split, config: Config) -> None:
    """Median ms per training step of each variant at its chosen lr, timed interleaved."""
    steps = {}
    for result in results:
        model = build_model(result.variant, data.x_train, config.seeds[0])
        optimizer = torch.optim.Adam(model.parameters(), lr=result.lr)
        stream = common.BatchStream(len(data.x_train), config.batch_size, config.seeds[0])
        noise = torch.Generator().manual_seed(config.seeds[0])

        def step(model=model, optimizer=optimizer, stream=stream, noise=noise) -> None:
            adam_step(model, optimizer, data.x_train[next(stream)], noise)

        steps[result.variant.name] = step
    times = common.interleaved_step_times(steps, rounds=config.timing_rounds, block=config.timing_block)
    for result in results:
        result.ms_per_step[config.batch_size] = times[result.variant.name]


# ----------------------------------------------------------------------------- outputs


def results_table(results: Sequence[VariantResult]) -> str:
    ms = {r.variant.name: next(iter(r.ms_per_step.values()), math.nan) for r in results}  # one batch size
    plain_ms = ms.get("plain", math.nan)
    rows = []
    for r in results:
        edge = " (grid edge)" if r.lr in (min(r.sweep), max(r.sweep)) else ""
        rows.append([f"`{r.variant.name}`", r.variant.label, f"{r.lr:g}{edge}",
                     common.final_cell(r, lambda run: run.final_train, ".2f"),
                     common.final_cell(r, lambda run: run.final_test, ".2f"),
                     common.final_cell(r, lambda run: min(run.test), ".2f"),
                     f"{ms[r.variant.name]:.2f}", f"{ms[r.variant.name] / plain_ms:.2f}x"])
    headers = ["variant", "parameterization", "lr", "final train bound", "final test bound",
               "best test bound", "ms/step", "vs plain"]
    return common.markdown_table(headers, rows, "llrrrrrr")


def plot_range(curves: Sequence[list[float]]) -> tuple[float, float] | None:
    """A y range from the lowest bound to the highest at the second evaluation.

    The first evaluation is far higher (> 100 nats above the end) and would flatten the rest.
    """
    finite = [b for curve in curves for b in curve if math.isfinite(b)]
    second = [curve[1] for curve in curves if len(curve) > 1 and math.isfinite(curve[1])]
    if not finite or not second:
        return None
    low, high = min(finite), max(second)
    margin = 0.03 * (high - low) + 1e-9
    return low - margin, high + margin


def write_outputs(out: Path, data: common.Split, results: Sequence[VariantResult], config: Config,
                  seconds: float) -> None:
    """``vae_digits.png`` (curves), ``vae_digits_lr.png`` (sweep), ``.md`` (tables), ``.csv`` (curves)."""
    out.mkdir(parents=True, exist_ok=True)
    labels = {r.variant.name: f"{r.variant.label}, lr {r.lr:g}{common.divergence_note(r)}" for r in results}
    steps = np.array(results[0].runs[0].steps)

    def curves(metric: str) -> dict[str, np.ndarray]:
        return {r.variant.name: np.array([getattr(run, metric) for run in r.runs], dtype=float) for r in results}

    ylim = plot_range([curve for r in results for run in r.runs for curve in (run.train, run.test)])

    common.plot_panels(
        out / "vae_digits.png",
        f"Conv VAE on the digits: Adam, batch {config.batch_size}; mean over seeds {list(config.seeds)}, "
        "shaded min-max",
        steps,
        [common.Panel("training bound, -ELBO (nats/image, minibatch mean)", curves("train"), ylim=ylim),
         common.Panel(f"test bound, -ELBO (nats/image, {EVAL_SAMPLES} draws of z)", curves("test"), ylim=ylim)],
        labels)
    common.plot_sweep(
        out / "vae_digits_lr.png",
        f"Conv VAE on the digits: lr sweep, Adam, {config.steps} steps\n"
        f"dots: seeds {list(config.sweep_seeds)}; line: the worse seed; x: diverged; circle: chosen lr",
        {r.variant.name: {lr: [run.final_train for run in runs] for lr, runs in r.sweep.items()} for r in results},
        {r.variant.name: r.variant.label for r in results}, {r.variant.name: r.lr for r in results},
        "final training bound, -ELBO (nats/image)", log_y=False)
    rows = [[r.variant.name, run.lr, run.seed, step, f"{tr:.6g}", f"{te:.6g}"]
            for r in results for run in r.runs
            for step, tr, te in zip(run.steps, run.train, run.test)]
    common.write_curves_csv(out / "vae_digits.csv",
                            ["variant", "lr", "seed", "step", "train_bound", "test_bound"], rows)
    epochs = config.steps * config.batch_size / len(data.x_train)
    text = f"""# Convolutional VAE: scikit-learn digits (8x8)

Written by `examples/paper_vae.py{' --quick' if config is QUICK else ''}` in {seconds:.0f} s.

Setup: {len(data.x_train)} training / {len(data.x_test)} held-out images; pixels are counts 0..{TRIALS},
modelled as Binomial({TRIALS}, p); {LATENT}-dimensional Gaussian latent.  Adam, batch
{config.batch_size}, {config.steps} steps (~{epochs:.0f} epochs) for both variants; evaluation every
{config.eval_every} steps.  `wn`: `apply_weight_norm(model, calib, resample=True)` on {CALIB_SIZE} random
training images.  Learning rate: per variant, from a sweep with seeds {list(config.sweep_seeds)}: the lr whose
worse final training bound over those seeds is lowest (table below); then seeds {list(config.seeds)} at that lr.

Bounds are the negative ELBO in nats per image (lower is better), mean ± std over seeds [min, max]
(over the seeds that did not diverge, if any did).
Final train bound: mean minibatch bound of the last {config.eval_every} steps.  Test bound: all
held-out images, {EVAL_SAMPLES} draws of z each; "best" is the lowest test bound seen during the run.
ms/step: median wall-clock time of one training step, both variants timed interleaved.

{results_table(results)}

![VAE bound](vae_digits.png)

## Learning-rate sweep: final training bound (seed {' / seed '.join(map(str, config.sweep_seeds))}), chosen lr in bold

{common.sweep_table(results, ".1f")}

![learning-rate sweep](vae_digits_lr.png)

Machine: {common.machine_note()}.
"""
    (out / "vae_digits.md").write_text(text)


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment; returns the process exit status."""
    args = common.parse_args(argv, __doc__.splitlines()[0])
    config = QUICK if args.quick else FULL
    common.setup_torch()
    started = time.perf_counter()
    data = common.digits_counts()
    print(f"conv VAE on the digits: {len(data.x_train)} train / {len(data.x_test)} held out; "
          f"{config.steps} steps of batch {config.batch_size}; lr grid {list(config.lr_grid)}; seeds {list(config.seeds)}")
    results = []
    for variant in VARIANTS:
        results.append(run_variant(variant, data, config))
        print(f"{variant.name}: chose lr={results[-1].lr:g}", flush=True)
    measure_step_times(results, data, config)
    print("ms/step: " + ", ".join(f"{r.variant.name} {r.ms_per_step[config.batch_size]:.2f}" for r in results))
    write_outputs(args.out, data, results, config, time.perf_counter() - started)
    print(f"wrote {args.out}/vae_digits{{.md,.png,_lr.png,.csv}} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
