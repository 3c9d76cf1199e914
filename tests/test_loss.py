"""The DCv2 loss against a hand computation; ignored rows; the memory bank's fill and write order."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dcv2_k8s.dcv2.kmeans import IGNORE
from dcv2_k8s.dcv2.loss import dcv2_loss
from dcv2_k8s.dcv2.memory_bank import MemoryBank


def test_loss_by_hand_with_ignored_rows():
    torch.manual_seed(0)
    b, crops, d, t = 3, 2, 4, 0.1
    z = F.normalize(torch.randn(crops * b, d), dim=1)
    cents = [F.normalize(torch.randn(5, d), dim=1), F.normalize(torch.randn(4, d), dim=1)]
    index = torch.tensor([7, 2, 9])
    table = torch.full((2, 10), IGNORE)
    table[0, 7], table[0, 9] = 3, 1          # head 0: image 2 has no target
    table[1, 7], table[1, 2], table[1, 9] = 0, 2, 3
    loss, ignored = dcv2_loss(z, index, cents, table, t)
    per_head = []
    for h, c in enumerate(cents):
        terms = []
        for row in range(crops * b):
            target = int(table[h, index[row % b]])  # crop-major: row = crop * B + image
            if target == IGNORE:
                continue
            logits = [float(z[row] @ c[k]) / t for k in range(c.shape[0])]
            terms.append(-logits[target] + math.log(sum(math.exp(v) for v in logits)))
        per_head.append(sum(terms) / len(terms))
    assert float(loss) == pytest.approx(sum(per_head) / 2, rel=1e-5)
    assert float(ignored) == pytest.approx((2 / 6 + 0) / 2)


def test_all_ignored_batch_gives_zero_not_nan():
    z = F.normalize(torch.randn(4, 3), dim=1).requires_grad_()
    loss, ignored = dcv2_loss(z, torch.tensor([0, 1]), [F.normalize(torch.randn(2, 3), dim=1)],
                              torch.full((1, 5), IGNORE), 0.1)
    assert loss.item() == 0.0 and ignored.item() == 1.0
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_bank_write_order_pointer_and_state():
    bank = MemoryBank(2, 6, 3)
    for step in range(3):
        idx = torch.tensor([10 * step, 10 * step + 1])
        views = [torch.full((2, 3), float(step)), torch.full((2, 3), -float(step))]
        bank.write(idx, views)
    assert bank.full and bank.ptr == 6
    assert bank.indices.tolist() == [0, 1, 10, 11, 20, 21]
    assert bank.embeddings[0, 4].tolist() == [2.0] * 3 and bank.embeddings[1, 4].tolist() == [-2.0] * 3
    with pytest.raises(RuntimeError, match="overflow"):
        bank.write(torch.tensor([1]), [torch.zeros(1, 3), torch.zeros(1, 3)])
    other = MemoryBank(2, 6, 3)
    other.load_state_dict(bank.state_dict())
    assert other.ptr == 6 and torch.equal(other.embeddings, bank.embeddings)
    with pytest.raises(ValueError, match="shape"):
        MemoryBank(2, 8, 3).load_state_dict(bank.state_dict())


def test_bank_write_is_detached():
    bank = MemoryBank(1, 2, 2)
    z = torch.randn(2, 2, requires_grad=True)
    bank.write(torch.tensor([0, 1]), [z * 2])
    assert not bank.embeddings.requires_grad
