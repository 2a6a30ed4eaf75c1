"""Data-dependent init and training under torch.distributed: 2 processes, gloo, CPU.

Each rank calibrates on its own shard; the result must equal a single-process init on the
concatenated batch, and a DDP/FSDP step must equal a single-process step on the global batch.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import wn_transform as wn

WORLD = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 16), nn.ReLU(), nn.Linear(16, 4))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 8, generator=generator) * 2 + 1
    return x, torch.randint(0, 4, (32,), generator=generator)


def _init(model: nn.Module, batch: torch.Tensor, seed: int, **kwargs) -> nn.Module:
    return wn.apply_weight_norm(model, batch, resample=True, generator=torch.Generator().manual_seed(seed), **kwargs)


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


class _Experts(nn.Module):
    """Two experts of one shape, each called on every rank, on the rows routed to it (maybe none)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
        self.experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, route = self.inp(x), (x[:, 0] > 0).long()
        y = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows = (route == e).nonzero().squeeze(1)
            y = y.index_add(0, rows, expert(h[rows]))
        return self.out(y)


def _routed() -> torch.Tensor:
    """16 rows: rank 0's 8 all go to expert 1, rank 1's 8 all to expert 0."""
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    x[:, 0] = x[:, 0].abs() + 0.1
    x[8:, 0] *= -1
    return x


def _tabular() -> torch.Tensor:
    """16 rows of unnormalized tabular features: 1e5 +- 100, 1e-2 +- 1e-2, a constant 5."""
    generator = torch.Generator().manual_seed(3)
    return torch.stack([1e5 + 100 * torch.randn(16, generator=generator), 1e-2 * torch.randn(16, generator=generator),
                        torch.full((16,), 5.0)], dim=1)


def _tabular_layer() -> nn.Module:
    torch.manual_seed(0)  # the same bias on every rank: the init checks that the ranks' models are equal
    layer = nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(3))  # unit 1 reads the small feature alone
    return nn.Sequential(layer)


class _Branches(nn.Module):
    """Takes branch ``a`` or ``b`` (layers of one width) by the sign of its batch's mean."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.mean() > 0 else self.b(x)


class _SkipsItsLastLayer(nn.Module):
    """Runs ``b`` only on a batch of negative mean: a rank whose shard skips it finishes the pass early
    (an expert no row of its shard was routed to, behind ``if rows.numel() == 0: continue``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h) if x.mean() < 0 else h


class _ChecksItsRows(nn.Module):
    """Raises on its own output's non-finite values in the rows it uses (after its last layer), and only
    rank 0's rows are used; unit 0 of ``fc`` is constant on the whole batch, so the init runs twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(torch.relu(self.fc(x)))
        if not bool(y[x[:, 1] > 0].isfinite().all()):
            raise ValueError("non-finite output")
        return y


def _constant_feature_shard(rank: int) -> torch.Tensor:
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(rank))
    x[:, 0] = 0.5
    x[:, 1] = x[:, 1].abs() * (1 if rank == 0 else -1)
    return x


def _with_a_zero_layer() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    nn.init.zeros_(model[2].weight)  # a zero-initialized output: its units get directions drawn
    return model


def _edge_cases(rank: int, out: str) -> None:
    """Shards the init must handle as one batch, and ranks that took different branches."""
    model = wn.apply_weight_norm(_tabular_layer(), _tabular()[rank * 8:(rank + 1) * 8])
    torch.save(model.state_dict(), f"{out}/tabular{rank}.pt")
    x, _ = _data()
    model = wn.apply_weight_norm(_model(), x[:5] if rank == 0 else x[:0])  # rank 1's shard is empty
    torch.save(model.state_dict(), f"{out}/empty{rank}.pt")
    cases = {
        "branches": lambda: wn.apply_weight_norm(_Branches(), torch.randn(8, 4) + (3 if rank == 0 else -3)),
        "unseeded": lambda: wn.apply_weight_norm(_unseeded(rank), torch.randn(8, 4)),  # DDP would sync it later
        "deeper": lambda: wn.apply_weight_norm(_deeper(extra=rank == 1), torch.randn(8, 4)),
        "complex": lambda: wn.apply_weight_norm(_Spectral(imaginary=float(rank)), torch.randn(8, 4)),
        "tail": lambda: wn.apply_weight_norm(_SkipsItsLastLayer(), torch.randn(8, 4) + (3 if rank == 0 else -3)),
        "outside": lambda: wn.apply_weight_norm(_model(), init="preserve", distributed=first_only),
    }
    first_only = dist.new_group([0])  # (every rank creates it; rank 1 is not in it)
    # a pass that raised on one rank only (the constant unit's NaN, in the rows rank 0 checks): both rerun
    torch.save(wn.apply_weight_norm(_ChecksItsRows(), _constant_feature_shard(rank)).state_dict(), f"{out}/checks{rank}.pt")
    if rank == 0:  # a preserve apply talks to no other rank: rank 0 alone, while rank 1 goes on to the barrier
        start = time.perf_counter()
        wn.apply_weight_norm(_with_a_zero_layer(), init="preserve")
        Path(f"{out}/alone{rank}.txt").write_text(f"{time.perf_counter() - start:.1f}")
    for name, case in cases.items():
        start = time.perf_counter()
        try:
            case()
        except wn.WeightNormError as exc:
            Path(f"{out}/{name}{rank}.txt").write_text(f"{time.perf_counter() - start:.1f} {exc}")


def _unseeded(rank: int) -> nn.Module:
    torch.manual_seed(rank)  # each rank draws its own weights
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


class _Spectral(nn.Sequential):
    """Complex spectral weights (an FNO's) beside a Linear: the ranks differ in their imaginary parts."""

    def __init__(self, imaginary: float) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Linear(4, 4))
        self.spectral = nn.Parameter(torch.complex(torch.ones(3), torch.full((3,), imaginary)))


def _deeper(*, extra: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)]
    return nn.Sequential(*layers, *([nn.ReLU(), nn.Linear(3, 2)] if extra else []))


def _work(rank: int, out: str, wrapper: str) -> None:
    if wrapper == "edge_cases":
        _edge_cases(rank, out)
        return
    if wrapper == "experts":  # each expert sees rows on one rank only, and 0 rows on the other
        model = wn.apply_weight_norm(_Experts(), _routed()[rank * 8:(rank + 1) * 8])
        torch.save(model.state_dict(), f"{out}/init{rank}.pt")
        torch.save(model.state_dict(), f"{out}/step{rank}.pt")
        return
    x, y = _data()
    shard = slice(rank * 16, (rank + 1) * 16)
    model = _init(_model(), x[shard], seed=100 + rank)  # rank 1's draw must be replaced by rank 0's
    torch.save(model.state_dict(), f"{out}/init{rank}.pt")
    if wrapper == "ddp":
        _step(nn.parallel.DistributedDataParallel(model), x[shard], y[shard])
        torch.save(model.state_dict(), f"{out}/step{rank}.pt")
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))  # (its default mesh is on a GPU where there is one)
        _step(model, x[shard], y[shard])
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        torch.save(full, f"{out}/step{rank}.pt")
        model.eval()  # a validation pass, then training goes on: the eval weight cache must leave
        with torch.no_grad():  # FSDP's storage resizable (it frees a parameter by resizing it to 0)
            model(x[shard])
        model.train()
        _step(model, x[shard], y[shard])


def _worker(rank: int, store: str, out: str, wrapper: str) -> None:
    import datetime

    # (a collective a rank never joins fails in a minute, not after gloo's default 30)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        _work(rank, out, wrapper)
        dist.barrier()  # both ranks are done with every collective
        gc.collect()  # ... and the model, FSDP's state and their pending work objects are gone
    finally:
        dist.destroy_process_group()
    # Leave without interpreter teardown: gloo worker threads that still hold tensors can abort
    # the process there ("terminate called without an active exception", pytorch#179291), after
    # the results are written.
    os._exit(0)


def _run(tmp_path: Path, wrapper: str) -> tuple[list[dict], list[dict]]:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), wrapper), nprocs=WORLD, join=True)
    load = lambda name: [torch.load(tmp_path / f"{name}{r}.pt", weights_only=True) for r in range(WORLD)]  # noqa: E731
    return load("init"), load("step")


def _assert_states_equal(got: dict, expected: dict, **tolerance) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key, **tolerance)


def test_ddp_init_and_step_equal_a_single_process_on_the_global_batch(tmp_path: Path) -> None:
    inits, steps = _run(tmp_path, "ddp")
    x, y = _data()
    single = _init(_model(), x, seed=100, distributed=False)
    for state in inits:
        _assert_states_equal(state, single.state_dict(), rtol=1e-5, atol=1e-6)
    _step(single, x, y)
    for state in steps:
        _assert_states_equal(state, single.state_dict(), rtol=1e-4, atol=1e-6)


def test_fsdp_fully_shard_step_equals_a_single_process(tmp_path: Path) -> None:
    inits, steps = _run(tmp_path, "fsdp")
    x, y = _data()
    single = _init(_model(), x, seed=100, distributed=False)
    _step(single, x, y)
    for state in steps:
        _assert_states_equal(state, single.state_dict(), rtol=1e-4, atol=1e-6)


def test_an_expert_with_no_rows_on_one_rank_joins_the_reduction_and_gets_the_other_ranks_statistics(
        tmp_path: Path) -> None:
    """A mixture of experts that calls every expert on every rank, some on 0 rows: each rank still
    joins each expert's reduction, so the statistics pair up (an expert skipped on one rank would
    reduce with the next expert's statistics there) and equal the single-process init's."""
    inits, _ = _run(tmp_path, "experts")
    single = wn.apply_weight_norm(_Experts(), _routed(), distributed=False)
    for state in inits:
        _assert_states_equal(state, single.state_dict(), rtol=1e-5, atol=1e-6)


def test_shards_that_are_one_batch_together_and_ranks_at_different_layers(tmp_path: Path) -> None:
    """The init on shards equals the single-process init on their concatenation: where a unit reading
    the batch itself is standardized after the neighbour rule called it constant (decided alike on
    every rank), and where one rank's shard is empty.  Ranks that took different branches of the
    model get an error naming the layer, not statistics mixed from two layers."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), "edge_cases"), nprocs=WORLD, join=True)
    single = wn.apply_weight_norm(_tabular_layer(), _tabular(), distributed=False)
    assert wn.weight_norm_report(single).notes.constant_units == {"0.weight": 1}  # the constant feature's unit only
    for rank in range(WORLD):
        _assert_states_equal(torch.load(tmp_path / f"tabular{rank}.pt"), single.state_dict(), rtol=1e-5, atol=1e-6)
    x, _ = _data()
    single = wn.apply_weight_norm(_model(), x[:5], distributed=False)
    for rank in range(WORLD):
        _assert_states_equal(torch.load(tmp_path / f"empty{rank}.pt"), single.state_dict(), rtol=1e-5, atol=1e-6)
    for rank, layer in enumerate("ab"):
        error = (tmp_path / f"branches{rank}.txt").read_text().split(" ", 1)[1]
        assert error.startswith(f"the ranks of the process group are at different layers of the data-dependent init: "
                                f"this rank calibrates '{layer}.weight'"), error
    for rank in range(WORLD):  # every rank is told at once (not one left waiting out the group's timeout)
        seconds, error = (tmp_path / f"unseeded{rank}.txt").read_text().split(" ", 1)
        assert error.startswith("the ranks of the process group hold different parameter values (0.weight, 0.bias, "
                                "2.weight, 2.bias)"), error
        assert "torch.manual_seed" in error and float(seconds) < 5
        seconds, error = (tmp_path / f"deeper{rank}.txt").read_text().split(" ", 1)
        assert error.startswith(f"the ranks of the process group found different weights to normalize: this rank "
                                f"has {2 + rank} ("), error
        assert float(seconds) < 5
        error = (tmp_path / f"complex{rank}.txt").read_text().split(" ", 1)[1]
        assert error.startswith("the ranks of the process group hold different parameter values (spectral)"), error
    # a rank whose shard skips the last layer does not return with it uncalibrated: both are told
    (done_after, done), (waiting_after, waiting) = ((tmp_path / f"tail{rank}.txt").read_text().split(" ", 1)
                                                    for rank in range(WORLD))
    assert float(done_after) < 5 and float(waiting_after) < 5  # told at once, not after the group's timeout
    assert done.startswith("the ranks of the process group are at different layers of the data-dependent init: this "
                           "rank has finished the pass while another still calibrates a layer"), done
    assert waiting.startswith("the ranks of the process group are at different layers of the data-dependent init: "
                              "this rank calibrates 'b.weight'"), waiting
    assert not (tmp_path / "outside0.txt").exists()  # rank 0 is in the group: a one-rank init
    assert "names a process group this rank is not a member of" in (tmp_path / "outside1.txt").read_text()
    assert float((tmp_path / "alone0.txt").read_text()) < 5
    single = wn.apply_weight_norm(_ChecksItsRows(), torch.cat([_constant_feature_shard(r) for r in range(WORLD)]),
                                  distributed=False)
    for rank in range(WORLD):
        _assert_states_equal(torch.load(tmp_path / f"checks{rank}.pt"), single.state_dict(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_the_same_model_check_sums_a_sparse_parameter_by_its_values(layout: str) -> None:
    from wn_transform.ranks import _sums

    dense = torch.tensor([[0.0, 2.0, 0.0], [1.5, 0.0, -3.0]])
    sparse = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    torch.testing.assert_close(_sums(sparse), _sums(dense))
    torch.testing.assert_close(_sums(dense), torch.tensor([0.5, 15.25], dtype=torch.float64))


def test_a_single_process_without_a_group_is_unaffected() -> None:
    x, _ = _data()
    a = _init(_model(), x, seed=3)
    b = _init(_model(), x, seed=3, distributed=False)
    _assert_states_equal(a.state_dict(), b.state_dict())


def test_wrapped_or_sharded_models_are_refused_with_the_route_that_works(tmp_path: Path) -> None:
    """DDP keeps all-reducing the weights it was built with (g and v would silently drift apart
    across ranks); FSDP's shards cannot be reparameterized, copied or folded in place.  Each is a
    clear error that says what to do; so is a ``distributed=`` value that is not a process group."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(wn.WeightNormError, match=r"DistributedDataParallel wrapper.*\(ddp\.module"):
            wn.apply_weight_norm(nn.parallel.DistributedDataParallel(_model()), init="preserve")
        inside = nn.Sequential(nn.parallel.DistributedDataParallel(_model()), nn.Linear(4, 2))
        with pytest.raises(wn.WeightNormError, match=r"Sequential\.0 is a DistributedDataParallel wrapper.*\(0\.module"):
            wn.apply_weight_norm(inside, init="preserve")
        sharded = wn.apply_weight_norm(_model(), init="preserve")
        fully_shard(sharded)
        x, _ = _data()
        calls = [(wn.WeightNormError, lambda: wn.apply_weight_norm(sharded, init="preserve", inplace=True)),
                 (wn.FoldError, lambda: wn.fold_weight_norm(sharded, inplace=True)),
                 (wn.ExportError, lambda: wn.export_onnx(sharded, x, tmp_path / "model.onnx"))]
        for error, call in calls:
            with pytest.raises(error, match=r"sharded by FSDP \(module '\(root\)'\).*fold_state_dict"):
                call()
        assert not (tmp_path / "model.onnx").exists()
        with pytest.raises(TypeError, match=r"distributed must be .*ProcessGroup, got 'yes'"):
            wn.apply_weight_norm(_model(), init="preserve", distributed="yes")
    finally:
        dist.destroy_process_group()


def _peer_failure_worker(rank: int, store: str, out: str) -> None:
    import datetime

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=5))
    x, _ = _data()
    shard = x[rank * 16:(rank + 1) * 16].clone()
    if rank == 1:
        shard[0, 0, 0] = float("nan")  # refused before the pass: rank 0 waits for it in vain
    try:
        wn.apply_weight_norm(_model(), shard)
    except Exception as exc:  # noqa: BLE001 - the test checks the type and message
        Path(f"{out}/error{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    if rank == 1:
        time.sleep(8)  # alive past rank 0's timeout: rank 0 times out rather than losing its peer
    os._exit(0)


def test_a_rank_left_waiting_by_a_peers_failure_is_told_what_every_rank_must_do(tmp_path: Path) -> None:
    """Not "the model rejected the sample batch": its own batch was fine."""
    mp.spawn(_peer_failure_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    assert (tmp_path / "error1.txt").read_text().startswith("BatchError: the sample batch holds NaN values")
    waited = (tmp_path / "error0.txt").read_text()
    assert waited.startswith("WeightNormError: apply_weight_norm's reduction across ranks failed (")
    assert "every rank of the process group must call apply_weight_norm" in waited and "distributed=False" in waited


def test_ddp_wrappers_in_fold_plan_and_report_and_fsdp1_flat_parameters(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """``fold_weight_norm`` of a DDP wrapper: refused in place (the wrapper would keep all-reducing
    g and v), a copy of the module it holds otherwise; ``plan_weight_norm`` and
    ``weight_norm_report`` look through the wrapper.  FSDP's v1 wrapper with a flat parameter
    (its default) leaves g and v as plain attributes: the layers compute through torch's getter.
    One rank's FSDP shards saved with torch.save are named as such by the CLI."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    from wn_transform.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x, _ = _data()
        model = wn.apply_weight_norm(_model(), x)
        ddp = nn.parallel.DistributedDataParallel(model)
        assert wn.weight_norm_report(ddp) is wn.weight_norm_report(model)
        assert wn.plan_weight_norm(ddp).converted == wn.plan_weight_norm(model).converted
        with pytest.raises(wn.FoldError, match=r"fold_weight_norm got a DistributedDataParallel wrapper.*never the "
                                               r"folded weights: call fold_weight_norm on the model itself \(ddp\.module"):
            wn.fold_weight_norm(ddp, inplace=True)
        assert wn.find_weight_norms(model)  # left as it was
        folded = wn.fold_weight_norm(ddp)
        assert type(folded) is nn.Sequential and not wn.find_weight_norms(folded)
        compiled = wn.fold_weight_norm(torch.compile(ddp))  # a copy through both wrappers
        assert type(compiled) is nn.Sequential and not wn.find_weight_norms(compiled)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x))

        flat = FullyShardedDataParallel(wn.apply_weight_norm(_model(), x), device_id=torch.device("cpu"))
        with torch.no_grad():
            torch.testing.assert_close(flat(x), model(x), rtol=1e-5, atol=1e-6)
        F.cross_entropy(flat(x), torch.zeros(len(x), dtype=torch.long)).backward()

        sharded = wn.apply_weight_norm(_model(), init="preserve")
        fully_shard(sharded)
        torch.save(sharded.state_dict(), tmp_path / "rank0.pt")
    finally:
        dist.destroy_process_group()
    assert main(["fold", str(tmp_path / "rank0.pt"), "-o", str(tmp_path / "plain.pt")]) == 1
    error = capsys.readouterr().err
    assert "rank0.pt: one rank's shards of a model sharded by FSDP (DTensors), not a whole state dict" in error
    assert "full_state_dict=True" in error and not (tmp_path / "plain.pt").exists()


def test_dtensor_parameters_on_the_cpu_train_through_the_plain_formula(tmp_path: Path) -> None:
    """A DTensor is no plain tensor: torch's fused weight-norm kernel has no sharding rule for its
    backward (torch's own weight norm fails there), so such parameters take the plain formula, on
    the CPU as on CUDA; the gradients are the plain layer's."""
    from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_module, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        for make, x in ((lambda: nn.Linear(6, 4), torch.randn(3, 6)), (lambda: nn.Conv1d(3, 4, 3), torch.randn(2, 3, 7))):
            for placement in (Replicate(), Shard(0)):
                torch.manual_seed(0)
                reference = wn.apply_weight_norm(make(), init="preserve")
                reference(x).square().sum().backward()
                torch.manual_seed(0)

                def distribute(name: str, module: nn.Module, mesh: DeviceMesh, placement=placement) -> None:
                    for key, p in list(module.named_parameters(recurse=False)):
                        module.register_parameter(key, nn.Parameter(distribute_tensor(p.data, mesh, [placement])))

                model = distribute_module(wn.apply_weight_norm(make(), init="preserve"), mesh, distribute)
                model(distribute_tensor(x, mesh, [Replicate()])).full_tensor().square().sum().backward()
                for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
                    torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=f"{placement} {name}")
    finally:
        dist.destroy_process_group()
