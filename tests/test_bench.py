"""``tools/bench.py --quick``: every workload runs and passes its sanity checks.

Timings are never asserted (they belong to the full run on a quiet machine); what is checked is
that every variant of every workload computes what it must (the bench's own sanity checks:
same function as plain, weight norm fully folded, data init standardizing, ONNX agreeing with
onnxruntime) and that each workload produced its rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"
WORKLOADS = [str(k) for k in range(1, 14)]


def test_the_quick_bench_runs_every_workload_and_passes_its_sanity_checks(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "--quick", "--out", str(tmp_path), "--no-plots"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    workloads = {w["key"]: w for w in report["workloads"]}
    assert sorted(workloads, key=int) == WORKLOADS
    for key, workload in workloads.items():
        assert workload["error"] is None, f"workload {key}: {workload['error']}"
        assert workload["rows"], f"workload {key} produced no rows"
    table = (tmp_path / "bench.md").read_text()
    assert all(f"| {key}. " in table for key in WORKLOADS)


def _bench_module():
    sys.path.insert(0, str(TOOLS))
    try:
        import bench
    finally:
        sys.path.remove(str(TOOLS))
    return bench


def test_the_head_to_head_sign_test_is_the_exact_binomial_one() -> None:
    """The p-value the bench prints beside a head-to-head count, against scipy's binomtest."""
    binomtest = pytest.importorskip("scipy.stats").binomtest
    bench = _bench_module()
    for wins, rounds in [(0, 1), (1, 2), (5, 10), (0, 10), (9, 10), (31, 40), (60, 121), (100, 100)]:
        expected = binomtest(wins, rounds, 0.5, alternative="two-sided").pvalue
        assert abs(bench.sign_test(wins, rounds) - expected) < 1e-12, (wins, rounds)


def test_the_page_fault_count_sees_a_step_that_touches_fresh_memory_and_not_one_that_reuses_it() -> None:
    pytest.importorskip("resource")
    bench = _bench_module()
    kept = torch.zeros(1 << 22)
    cases = [bench.Case("fresh", lambda _: torch.ones(1 << 24)),  # 64 MiB: mapped afresh by any allocator
             bench.Case("reused", lambda _: kept.fill_(1.0))]
    faults = bench.step_faults(cases, rounds=5)
    assert sorted(faults) == ["fresh", "reused"] and all(len(c) == 5 for c in faults.values())
    assert min(faults["fresh"]) >= 32  # at least one fault per 2 MiB, even where huge pages back it
    assert sorted(faults["reused"])[2] <= 2, faults
    note = bench.faults_note(faults)
    assert note.startswith("minor page faults per step") and "fresh" in note and "of 5 interleaved steps" in note


def test_asking_for_cuda_without_a_cuda_device_is_a_clear_usage_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    result = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "--device", "cuda", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--device cuda" in result.stderr and "no CUDA device" in result.stderr
    assert not (tmp_path / "bench.md").exists()


def test_the_limit_variant_does_its_passes_over_every_normalized_weight_and_trains_as_plain() -> None:
    """``limit`` (plain plus issue #6's floor: the norms' read, the projection's pass) reads every
    weight weight norm would normalize and writes each one's gradient in place, yet its steps give
    plain's parameters bit for bit (the projection's coefficient is zero)."""
    bench = _bench_module()
    import bench_models as bm

    model = bm.transformer()  # Linear weights and MultiheadAttention.in_proj_weight
    x, y = torch.randn(2, 5, 256), torch.tensor([1, 7])
    plain = bench.TrainStep.of_variant("plain", bm.make_variant("plain", model), x, y)
    limit = bench.TrainStep.of_variant("limit", bm.make_variant("limit", model), x, y)
    weights = limit.limit.weights
    assert len(weights) == len(bm.normalized_sites(model)) == 4 * 4 + 1
    assert plain.limit is None
    norms_read = []
    original_norm = torch.linalg.vector_norm
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.linalg, "vector_norm", lambda t, *a, **k: norms_read.append(t.data_ptr()) or original_norm(t, *a, **k))
        for _ in range(3):
            plain()
            limit()
            versions = [w.grad._version for w in weights]
            limit.limit.project()  # the pass writes every gradient in place ...
            assert [w.grad._version for w in weights] == [v + 1 for v in versions]
    assert sorted(set(norms_read)) == sorted(w.data_ptr() for w in weights)
    for (name, a), b in zip(plain.model.named_parameters(), limit.model.parameters(), strict=True):
        assert torch.equal(a, b), name  # ... and leaves the training unchanged


def test_variants_narrows_the_training_workloads_to_a_head_to_head_and_keeps_plain(tmp_path: Path) -> None:
    """``--variants wn_transform,torch``: a training workload times plain (its baseline) and those two
    alone, so a long run spends its rounds on the comparison asked for; an unknown name is a usage error."""
    result = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "--quick", "--only", "3", "--variants",
                             "wn_transform,torch", "--out", str(tmp_path), "--no-plots"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (workload,) = json.loads((tmp_path / "bench.json").read_text())["workloads"]
    assert {row["variant"] for row in workload["rows"]} == {"plain", "wn_transform", "torch"}
    assert any("head to head, wn_transform / torch" in note for note in workload["notes"])
    wrong = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "--variants", "wn_transform,tourch",
                            "--out", str(tmp_path / "wrong")], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "--variants: unknown ['tourch']" in wrong.stderr
    assert not (tmp_path / "wrong").exists()


def test_the_step_profiler_prints_each_variants_op_table_after_checking_they_agree() -> None:
    result = subprocess.run([sys.executable, str(TOOLS / "profile_step.py"), "--workload", "2", "--steps", "2",
                             "--rows", "4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    headers = [line for line in result.stdout.splitlines() if line.startswith("### ")]
    assert [h.split(":")[0] for h in headers] == ["### plain", "### wn_transform", "### torch"]
    assert result.stdout.count("Self CPU time total") == 3


def test_the_mend_cost_tool_times_each_route_after_checking_it_computes_plains_output() -> None:
    result = subprocess.run([sys.executable, str(TOOLS / "mend_cost.py"), "--budget", "0", "--workloads", "2,eval"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    tables = result.stdout.split("## ")[1:]
    assert [t.split(",")[0] for t in tables] == ["2. train step", "eval forward (no_grad)"]
    for table in tables:
        rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
        assert rows == ["variant", "plain", "torch", "mended", "fused_alone", "plain_formula"]


def test_the_mend_cost_tool_refuses_an_unknown_workload() -> None:
    result = subprocess.run([sys.executable, str(TOOLS / "mend_cost.py"), "--workloads", "1,7"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "unknown workloads ['7']" in result.stderr


def test_the_step_profiler_refuses_a_variant_the_workload_lacks() -> None:
    result = subprocess.run([sys.executable, str(TOOLS / "profile_step.py"), "--workload", "4", "--variants",
                             "batchnorm"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "workload 4 has no variants ['batchnorm']" in result.stderr
