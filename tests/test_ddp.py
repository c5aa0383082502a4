"""DistributedDataParallel on a transformed model (gloo, CPU).

With GroupNorm + Proxy Norm every sample is normalized on its own, so 2 ranks at batch B give the
gradients of 1 process at batch 2B (DDP averages the ranks' mean-loss gradients). BatchNorm
couples the samples of a batch and does not: the same check fails for it, which shows the test
can fail.
"""

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import graphpass as gp

pytestmark = pytest.mark.slow

WORLD = 2
HALF_BATCH = 4
TIMEOUT_S = 240
NORMS = ("gn+pn", "keep")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip


def full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * HALF_BATCH, 3, 8, 8, generator=g), torch.randint(0, 5, (WORLD * HALF_BATCH,), generator=g)


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n.removeprefix("module."): p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, store_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        x, y = full_batch()
        part = slice(rank * HALF_BATCH, (rank + 1) * HALF_BATCH)
        result = {}
        for norm in NORMS:
            gm = gp.transform(make_model(), (x[part],), bits=None, norm=norm)
            result[norm] = gradients(DistributedDataParallel(gm), x[part], y[part])
        if rank == 0:
            torch.save(result, out_path)
    finally:
        dist.destroy_process_group()


def test_two_ranks_at_batch_b_match_one_process_at_batch_2b_with_gn_pn(tmp_path):
    out = tmp_path / "ddp_grads.pt"
    # A file store, not a "free" TCP port: under load a rank retrying connect() to a port nobody
    # listens on yet can be handed that very port by the kernel (a TCP self-connect), and rank 0
    # then aborts in its store's bind. CI saw that SIGABRT at start-up once; under load here it came
    # back 2 times in 47 runs with the TCP port, and 0 in 20 with the file store.
    ctx = mp.start_processes(_worker, args=(str(tmp_path / "store"), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, f"DDP workers did not finish within {TIMEOUT_S} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ddp = torch.load(out)
    x, y = full_batch()
    for norm in NORMS:
        single = gradients(gp.transform(make_model(), (x,), bits=None, norm=norm), x, y)
        assert set(single) == set(ddp[norm])
        if norm == "gn+pn":
            for name, g in single.items():
                torch.testing.assert_close(ddp[norm][name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        else:  # BatchNorm: statistics of 4 samples are not those of 8
            worst = max(((ddp[norm][n] - g).norm() / g.norm()).item() for n, g in single.items())
            assert worst > 1e-3
