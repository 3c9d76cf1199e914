"""All-reduce BN across gloo processes equals plain BN over the concatenated batch of each group."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dcv2_k8s.distributed import DistInfo, bn_group, free_port
from dcv2_k8s.model.syncbn import AllReduceBatchNorm, convert_all_reduce_bn


def _inputs(world: int):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3 + r, 5, 4, 4, generator=g) * (r + 1) + r for r in range(world)]  # unequal batches
    ws = [torch.randn(3 + r, 5, 4, 4, generator=g) for r in range(world)]  # upstream gradients
    return xs, ws


def _groups(world: int, local_world: int, group_size: int) -> list[list[int]]:
    size = {0: world, -1: local_world}.get(group_size, min(group_size, world))
    return [list(range(s, s + size)) for s in range(0, world, size)]


def _worker(rank: int, world: int, local_world: int, group_size: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        info = DistInfo(rank, world, rank % local_world, local_world)
        group = bn_group(group_size, info)
        xs, ws = _inputs(world)
        model = convert_all_reduce_bn(nn.Sequential(nn.BatchNorm2d(5)), group)
        assert isinstance(model[0], AllReduceBatchNorm)
        with torch.no_grad():
            model[0].weight.copy_(torch.linspace(0.5, 1.5, 5))
            model[0].bias.copy_(torch.linspace(-1, 1, 5))
        x = xs[rank].clone().requires_grad_()
        y = model(x)
        (y * ws[rank]).sum().backward()
        vals = (y.detach(), x.grad, model[0].weight.grad, model[0].running_mean, model[0].running_var)
        q.put((rank, *[v.numpy() for v in vals]))  # by value: the sender exits before the reader
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world,local_world,group_size", [(2, 2, 0), (2, 1, -1), (4, 4, 0), (4, 4, 2),
                                                          (4, 2, -1)])
def test_all_reduce_bn_equals_bn_over_group_batch(world, local_world, group_size):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, local_world, group_size, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(world):
        rank, *vals = q.get(timeout=120)
        results[rank] = [torch.from_numpy(v) for v in vals]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    xs, ws = _inputs(world)
    for ranks in _groups(world, local_world, group_size):
        bn = nn.BatchNorm2d(5)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 1.5, 5))
            bn.bias.copy_(torch.linspace(-1, 1, 5))
        x = torch.cat([xs[r] for r in ranks]).requires_grad_()
        y = bn(x)
        (y * torch.cat([ws[r] for r in ranks])).sum().backward()
        offsets = [0]
        for r in ranks:
            offsets.append(offsets[-1] + xs[r].shape[0])
        for i, r in enumerate(ranks):
            y_r, gx_r, gw_r, rm_r, rv_r = results[r]
            sl = slice(offsets[i], offsets[i + 1])
            torch.testing.assert_close(y_r, y[sl].detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gx_r, x.grad[sl], atol=1e-5, rtol=1e-4)
            # DDP averages parameter gradients over ranks; the group's BN gradient is their sum
            torch.testing.assert_close(rm_r, bn.running_mean, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(rv_r, bn.running_var, atol=1e-6, rtol=1e-5)
        gw_sum = sum(results[r][2] for r in ranks)
        torch.testing.assert_close(gw_sum, bn.weight.grad, atol=1e-4, rtol=1e-4)


def test_single_process_falls_back_to_plain_bn():
    bn = convert_all_reduce_bn(nn.BatchNorm1d(3))
    ref = nn.BatchNorm1d(3)
    x = torch.randn(8, 3)
    torch.testing.assert_close(bn(x), ref(x))
    bn.eval(), ref.eval()
    torch.testing.assert_close(bn(x), ref(x))
