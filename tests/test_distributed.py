"""Data-dependent init and training under torch.distributed: 2 processes, gloo, CPU.

Each rank calibrates on its own shard; the result must equal a single-process init on the
concatenated batch, and a DDP/FSDP step must equal a single-process step on the global batch.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

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


def _work(rank: int, out: str, wrapper: str) -> None:
    x, y = _data()
    shard = slice(rank * 16, (rank + 1) * 16)
    model = _init(_model(), x[shard], seed=100 + rank)  # rank 1's draw must be replaced by rank 0's
    torch.save(model.state_dict(), f"{out}/init{rank}.pt")
    if wrapper == "ddp":
        _step(nn.parallel.DistributedDataParallel(model), x[shard], y[shard])
        torch.save(model.state_dict(), f"{out}/step{rank}.pt")
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        _step(model, x[shard], y[shard])
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        torch.save(full, f"{out}/step{rank}.pt")


def _worker(rank: int, store: str, out: str, wrapper: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
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


def test_a_single_process_without_a_group_is_unaffected() -> None:
    x, _ = _data()
    a = _init(_model(), x, seed=3)
    b = _init(_model(), x, seed=3, distributed=False)
    _assert_states_equal(a.state_dict(), b.state_dict())
