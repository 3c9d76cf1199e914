"""LARC (layer-wise adaptive rate control) with apex's semantics and no per-parameter host syncs.

For every parameter with a gradient, with ``wd`` the group's weight decay and ``lr`` its learning rate:

    local = trust_coefficient * ||p|| / (||g|| + wd * ||p|| + eps)
    clip mode:  local = min(local / lr, 1)
    g <- (g + wd * p) * local          if ||p|| != 0 and ||g|| != 0
    g unchanged (no decay, no scaling) otherwise

then the wrapped optimizer steps with its weight decay set to 0 (restored afterwards). apex evaluates the
``!= 0`` test on the host for every tensor (two device->host syncs each); here norms come from one
``torch._foreach_norm`` per group and the test is a ``torch.where`` on the device. Reference: apex
``apex/parallel/LARC.py``; You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks" (2017).
"""

from __future__ import annotations

import torch


class LARC:
    """Wrap ``optimizer`` (any torch optimizer) with LARC.

    Args:
        optimizer: the inner optimizer; its param groups' ``weight_decay`` is folded into the trust ratio.
        trust_coefficient: eta in the formula above (DCv2's 0.001; apex's own default is 0.02).
        clip: clip mode (``min(local / lr, 1)``) instead of scale mode (DCv2 uses scale mode).
        eps: added to the denominator.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, trust_coefficient: float = 0.001, clip: bool = False,
                 eps: float = 1e-8):
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.clip = clip
        self.eps = eps

    # the wrapper looks like the optimizer it wraps
    @property
    def param_groups(self):
        return self.optim.param_groups

    @property
    def state(self):
        return self.optim.state

    def state_dict(self) -> dict:
        return self.optim.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optim.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"LARC(trust_coefficient={self.trust_coefficient}, clip={self.clip}, eps={self.eps}, {self.optim!r})"

    @torch.no_grad()
    def adapt_gradients(self) -> None:
        """Rewrite every gradient in place as LARC prescribes (what apex does before the inner step)."""
        for group in self.optim.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd = float(group.get("weight_decay", 0.0))
            norms = torch.stack(torch._foreach_norm(params + grads))  # one call for both
            p_norm, g_norm = norms[: len(params)], norms[len(params):]
            local = self.trust_coefficient * p_norm / (g_norm + p_norm * wd + self.eps)
            if self.clip:
                local = torch.clamp(local / group["lr"], max=1.0)
            ok = (p_norm != 0) & (g_norm != 0)
            scale = torch.where(ok, local, 1.0)
            if wd != 0:
                # apex: g += wd * p, the product rounded before the sum. In place, no temporary: addcmul computes
                # g + (wd * p) * ok with ok a 0-dim 0/1 tensor per parameter, so wd * p is rounded on its own, the
                # x 1 / x 0 is exact and the sum is rounded once, fused multiply-add or not: bitwise apex's.
                # (``g.add_(p, alpha=wd)`` is one fused multiply-add on CPU SIMD: not bitwise equal; tests check.)
                torch._foreach_addcmul_(grads, params, list(ok.to(local.dtype).unbind()), value=wd)
            torch._foreach_mul_(grads, list(scale.unbind()))

    @torch.no_grad()
    def step(self, closure=None):
        self.adapt_gradients()
        saved = [g.get("weight_decay", 0.0) for g in self.optim.param_groups]
        for g in self.optim.param_groups:
            g["weight_decay"] = 0.0
        try:
            return self.optim.step(closure)
        finally:
            for g, wd in zip(self.optim.param_groups, saved):
                g["weight_decay"] = wd
