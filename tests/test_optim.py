"""LARC against a plain per-parameter reference of apex's math; LR schedule values at key steps."""

from __future__ import annotations

import math

import pytest
import torch

from dcv2_k8s.config import resolve
from dcv2_k8s.optim import LRSchedule, build_optimizer, param_groups
from dcv2_k8s.optim.larc import LARC


def apex_larc_reference(params, lr, wd, momentum, bufs, trust=0.001, clip=False, eps=1e-8):
    """apex LARC + SGD(momentum), one tensor at a time, exactly as written there."""
    for i, p in enumerate(params):
        g = p.grad.clone()
        pn, gn = torch.norm(p.data), torch.norm(g)
        if pn != 0 and gn != 0:
            a = trust * pn / (gn + pn * wd + eps)
            if clip:
                a = min(a / lr, 1)
            g += wd * p.data
            g *= a
        if bufs[i] is None:
            bufs[i] = g.clone()
        else:
            bufs[i].mul_(momentum).add_(g)
        p.data.add_(bufs[i], alpha=-lr)


def _tensors(seed=0):
    torch.manual_seed(seed)
    shapes = [(16, 3, 7, 7), (16,), (32, 16, 1, 1), (32,), (10, 32), (10,), (256, 64, 3, 3)]  # last: SIMD paths
    params = [torch.randn(s) for s in shapes]
    params[1].zero_()  # a zero-init bias: ||p|| = 0
    grads = [torch.randn(s) for s in shapes]
    grads[3].zero_()  # ||g|| = 0
    return params, grads


@pytest.mark.parametrize("clip", [False, True])
def test_larc_bitwise_equals_apex_reference(clip):
    params, grads = _tensors()
    ours = [p.clone().requires_grad_() for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    opt = LARC(torch.optim.SGD(ours, lr=0.7, momentum=0.9, weight_decay=1e-4, foreach=True), 0.001, clip, 1e-8)
    bufs = [None] * len(ref)
    for step in range(3):
        for o, r, g in zip(ours, ref, grads):
            o.grad = g.clone() * (step + 1)
            r.grad = g.clone() * (step + 1)
        opt.step()
        apex_larc_reference(ref, 0.7, 1e-4, 0.9, bufs, clip=clip)
    for o, r in zip(ours, ref):
        assert torch.equal(o.detach(), r.detach())
    assert opt.param_groups[0]["weight_decay"] == 1e-4  # restored after the inner step


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.3])  # 0.3: wd * p rounded alone vs fused into the sum differ in SIMD lanes
def test_larc_bitwise_groups_without_grads_and_wd(clip, wd):
    """Two groups (wd and wd=0, i.e. VISSL's no-decay BN/bias group), a parameter without a gradient (left alone,
    as apex and SGD skip it), zero-norm parameter and gradient: all bitwise equal to the per-tensor reference."""
    params, grads = _tensors(1)
    ours = [p.clone().requires_grad_() for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    split, no_grad = 4, 5  # group 0: tensors 0-3 (with weight decay wd), group 1: 4-6 (none); tensor 5 no grad
    opt = LARC(torch.optim.SGD([{"params": ours[:split], "weight_decay": wd}, {"params": ours[split:]}], lr=0.7,
                               momentum=0.9, weight_decay=0.0, foreach=True), 0.001, clip, 1e-8)
    bufs = [[None] * split, [None] * (len(ref) - split - 1)]
    for step in range(3):
        for i, (o, r, g) in enumerate(zip(ours, ref, grads)):
            o.grad = None if i == no_grad else g.clone() * (step + 1)
            r.grad = None if i == no_grad else g.clone() * (step + 1)
        opt.step()
        apex_larc_reference(ref[:split], 0.7, wd, 0.9, bufs[0], clip=clip)
        apex_larc_reference([r for i, r in enumerate(ref) if i >= split and i != no_grad], 0.7, 0.0, 0.9, bufs[1],
                            clip=clip)
    for o, r in zip(ours, ref):
        assert torch.equal(o.detach(), r.detach())
    assert torch.equal(ours[no_grad].detach(), params[no_grad])
    assert [g["weight_decay"] for g in opt.param_groups] == [wd, 0.0]


def test_larc_adapted_gradient_bitwise_and_in_place():
    """The rewritten gradient itself (what apex leaves in ``p.grad``), in the gradient's own storage."""
    torch.manual_seed(2)
    p = torch.randn(1000, 3, requires_grad=True)
    g = torch.randn(1000, 3) * 0.01
    p.grad = g.clone()
    storage = p.grad.data_ptr()
    LARC(torch.optim.SGD([p], lr=0.1, weight_decay=0.3), 0.001, False).adapt_gradients()
    pn, gn = torch.norm(p.detach()), torch.norm(g)
    expect = (g + 0.3 * p.detach()) * (0.001 * pn / (gn + pn * 0.3 + 1e-8))
    assert torch.equal(p.grad, expect) and p.grad.data_ptr() == storage


def test_zero_norm_parameter_gets_plain_step_without_decay():
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.ones(4)
    LARC(torch.optim.SGD([p], lr=0.1, weight_decay=0.5), 0.001, False).step()
    torch.testing.assert_close(p.detach(), torch.full((4,), -0.1))


def test_larc_state_dict_round_trip():
    params, grads = _tensors()
    ps = [p.clone().requires_grad_() for p in params]
    opt = LARC(torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    for p, g in zip(ps, grads):
        p.grad = g
    opt.step()
    sd = opt.state_dict()
    opt2 = LARC(torch.optim.SGD([p.detach().clone().requires_grad_() for p in ps], lr=0.1, momentum=0.9))
    opt2.load_state_dict(sd)
    assert len(opt2.state) == len(ps)


def test_param_groups_regularize_flags():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    groups = param_groups(model, 1e-4, regularize_bn=False, regularize_bias=False)
    assert len(groups[0]["params"]) == 1 and len(groups[1]["params"]) == 3 and groups[1]["weight_decay"] == 0
    assert len(param_groups(model, 1e-4, True, True)) == 1


def test_build_optimizer_wraps_sgd_in_larc():
    cfg = resolve(["config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"]).cfg
    opt = build_optimizer(torch.nn.Linear(3, 3), cfg.OPTIMIZER)
    assert isinstance(opt, LARC) and opt.trust_coefficient == 0.001 and not opt.clip
    assert opt.optim.param_groups[0]["momentum"] == 0.9


# ----------------------------------------------------------------------------------------- schedules
def _lr_cfg(world=64):
    return resolve(["config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"], world_size=world,
                   local_world_size=8).cfg.OPTIMIZER.param_schedulers.lr


def test_vissl_composite_schedule_values():
    sched = LRSchedule(_lr_cfg(), total_steps=1000, steps_per_epoch=10)
    assert sched(0) == pytest.approx(0.3)                   # warmup start
    assert sched(50) == pytest.approx(0.3 + 4.5 * 0.5)       # half-way through the 10 % warmup
    # 'fixed' cosine: evaluated on global progress, so it starts at 4.8 x (1 + cos(0.1 pi)) / 2 = 4.68
    assert sched(100) == pytest.approx(4.8 * 0.5 * (1 + math.cos(0.1 * math.pi)))
    assert sched(999) == pytest.approx(0.0, abs=1e-3)


def test_rescaled_cosine_and_floor():
    cfg = {"name": "composite", "lengths": [0.1, 0.9], "interval_scaling": ["rescaled", "rescaled"],
           "schedulers": [{"name": "linear", "start_value": 0.3, "end_value": 4.8},
                          {"name": "cosine", "start_value": 4.8, "end_value": 0.0048}]}
    sched = LRSchedule(cfg, 1000, 10)
    assert sched(100) == pytest.approx(4.8) and sched(550) == pytest.approx((4.8 + 0.0048) / 2)


def test_swav_reference_form():
    cfg = {"name": "swav_warmup_cosine", "start_warmup": 0.3, "base_lr": 4.8, "final_lr": 0.0048,
           "warmup_fraction": 0.1}
    sched = LRSchedule(cfg, 1000, 10)
    assert sched(0) == pytest.approx(0.3) and sched(99) == pytest.approx(4.8)   # linspace includes the end
    assert sched(100) == pytest.approx(4.8) and sched(999) == pytest.approx(0.0048, rel=1e-2)


def test_multistep_in_epochs():
    cfg = {"name": "multistep", "values": [0.01, 0.001, 0.0001], "milestones": [8, 16]}
    sched = LRSchedule(cfg, 280, 10)
    assert (sched(79), sched(80), sched(160)) == (0.01, 0.001, 0.0001)
