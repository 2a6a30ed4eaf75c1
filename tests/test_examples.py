"""The paper-reproduction examples: their ``--quick`` runs, and the helpers they rest on.

Each quick run trains every variant for a few steps (one seed, a two-point lr sweep) and writes
its plot, table and curves into a temporary folder; the tests read those outputs back.
"""

from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import _paper_common as common  # noqa: E402
import paper_classifier  # noqa: E402
import paper_vae  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_curves(path: Path, metrics: tuple[str, ...]) -> dict[str, dict[str, list[float]]]:
    """``{variant: {metric: values in step order}}`` over all seeds of a curves CSV (one seed in quick runs)."""
    curves: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with path.open() as f:
        for row in csv.DictReader(f):
            for metric in metrics:
                curves[row["variant"]][metric].append(float(row[metric]))
    return curves


def check_outputs(out: Path, stem: str, variant_names: list[str]) -> None:
    """Both plots (curves, lr sweep) are non-trivial PNGs; the table names every variant."""
    for name in (f"{stem}.png", f"{stem}_lr.png"):
        png = (out / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000, name
    table = (out / f"{stem}.md").read_text()
    for name in variant_names:
        assert f"| `{name}` |" in table, f"{name} missing from the results table"
    assert "nan" not in table.lower().split("## learning-rate sweep")[0]


@pytest.fixture(scope="module")
def classifier_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("classifier")
    assert paper_classifier.main(["--quick", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def vae_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    assert paper_vae.main(["--quick", "--out", str(out)]) == 0
    return out


def test_classifier_quick_outputs(classifier_out: Path) -> None:
    names = [v.name for v in paper_classifier.VARIANTS]
    assert {"plain", "wn", "wn_noinit", "bn", "wn_mobn", "wn_exp"} <= set(names)
    check_outputs(classifier_out, "classifier_digits", names)


def test_classifier_quick_curves_learn(classifier_out: Path) -> None:
    curves = read_curves(classifier_out / "classifier_digits.csv", ("train_loss", "test_error"))
    assert set(curves) == {v.name for v in paper_classifier.VARIANTS}
    evaluations = paper_classifier.QUICK.steps // paper_classifier.QUICK.eval_every
    for name, c in curves.items():
        loss, error = c["train_loss"], c["test_error"]
        assert len(loss) == evaluations
        assert all(math.isfinite(x) for x in loss + error), name
        assert all(0.0 <= e <= 1.0 for e in error), name
        assert loss[-1] < loss[0], f"{name}: training loss did not decrease ({loss})"


def test_vae_quick_outputs(vae_out: Path) -> None:
    check_outputs(vae_out, "vae_digits", [v.name for v in paper_vae.VARIANTS])


def test_vae_quick_bounds_improve(vae_out: Path) -> None:
    curves = read_curves(vae_out / "vae_digits.csv", ("train_bound", "test_bound"))
    assert set(curves) == {"plain", "wn"}
    for name, c in curves.items():
        bounds = c["train_bound"] + c["test_bound"]
        assert all(math.isfinite(b) and b > 0 for b in bounds), name  # -log p(x) >= 0 for counts
        assert c["train_bound"][-1] < c["train_bound"][0], name
        assert c["test_bound"][-1] < c["test_bound"][0], name


def test_binomial_likelihood_is_normalized() -> None:
    """Per pixel, the probabilities of the counts 0..16 sum to 1, so the bound is in nats."""
    counts = torch.arange(paper_vae.TRIALS + 1, dtype=torch.float32).view(-1, 1, 1, 1)
    for logit in (-3.0, 0.0, 1.7):
        log_p = paper_vae.binomial_log_prob(counts, torch.full_like(counts, logit))
        assert torch.logsumexp(log_p, dim=0).item() == pytest.approx(0.0, abs=1e-5)


def test_batch_stream_is_seeded_and_covers_each_epoch() -> None:
    first = common.BatchStream(10, 3, seed=7)
    epoch = [next(first) for _ in range(3)]  # 10 // 3 full batches, one example left out
    assert all(len(b) == 3 for b in epoch)
    assert len(set(torch.cat(epoch).tolist())) == 9
    again = common.BatchStream(10, 3, seed=7)
    assert all(torch.equal(a, next(again)) for a in epoch)
    other = common.BatchStream(10, 3, seed=8)
    assert not all(torch.equal(a, next(other)) for a in epoch)


def test_lr_choice_skips_diverged_runs() -> None:
    assert common.pick_lowest({0.1: math.nan, 0.03: 0.2, 0.01: 0.5}) == 0.03
    assert common.pick_lowest({0.1: math.nan, 0.3: math.inf}) == 0.1


def test_spread_format() -> None:
    assert common.Spread.of([1.0, 2.0, 3.0]).format(".1f") == "2.0 ± 1.0 [1.0, 3.0]"
    assert common.Spread.of([0.05]).format(".1f", 100, " %") == "5.0 ± 0.0 %"


def test_train_run_stops_at_a_divergence_and_fills_the_rest_with_nan() -> None:
    losses = iter([1.0, 0.5, math.inf, 0.1, 0.1, 0.1])
    calls = []
    run = common.train_run(common.RunResult("x", 0.1, 0), steps=6, eval_every=2,
                           step=lambda: (calls.append(1), next(losses))[1], evaluate=lambda: 0.3)
    assert len(calls) == 4  # stopped after the evaluation that saw inf
    assert run.steps == [2, 4, 6]
    assert run.train[0] == 0.75 and math.isinf(run.train[1]) and math.isnan(run.train[2])
    assert run.test[:2] == [0.3, 0.3] and math.isnan(run.test[2])
    assert run.diverged and math.isnan(run.final_train)


def test_the_demo_runs_and_its_fold_check_passes(capsys: pytest.CaptureFixture[str]) -> None:
    """``make demo``: trains the digits CNN with and without weight norm, folds it, and checks that
    the folded model computes the same logits with plain ``weight`` Parameters (its exit status)."""
    import demo

    threads = torch.get_num_threads()
    try:
        assert demo.main() == 0
    finally:
        torch.set_num_threads(threads)  # the demo asks for 2
    out = capsys.readouterr().out
    assert "4 weights reparameterized, 0 skipped" in out and out.rstrip().endswith("fold check passed")
