import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from adamix_zoo.consistency import consistency_loss, symmetric_kl, token_masked_kl


def test_symmetric_kl_value_matches_torch_kl_div():
    l1, l2 = torch.randn(5, 3), torch.randn(5, 3)
    lp1, lp2 = F.log_softmax(l1, -1), F.log_softmax(l2, -1)
    kl12 = F.kl_div(lp2, lp1, log_target=True, reduction="batchmean")  # KL(p1 || p2)
    kl21 = F.kl_div(lp1, lp2, log_target=True, reduction="batchmean")
    assert_close(symmetric_kl(l1, l2), 0.5 * (kl12 + kl21))


@pytest.mark.parametrize("problem", ["classification", "regression"])
def test_zero_for_identical_positive_otherwise(problem):
    a = torch.randn(4, 3) if problem == "classification" else torch.randn(4)
    assert consistency_loss(a, a.clone(), problem).item() == pytest.approx(0.0, abs=1e-7)
    assert consistency_loss(a, a + torch.randn_like(a), problem).item() > 0


def test_gradients_stop_at_the_target_side():
    l1, l2 = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    lp1, lp2 = F.log_softmax(l1, -1), F.log_softmax(l2, -1)
    # the KL(p1 || sg p2) term alone must give no gradient to l2
    from adamix_zoo.consistency import _kl_sg

    _kl_sg(lp1, lp2).sum().backward()
    assert l2.grad is None and l1.grad is not None and l1.grad.abs().sum() > 0
    # the symmetric loss gives each side the gradient of its own term only
    l1.grad = None
    symmetric_kl(l1, l2).backward()
    ref1 = l1.detach().clone().requires_grad_()
    (0.5 * _kl_sg(F.log_softmax(ref1, -1), lp2.detach()).mean()).backward()
    assert_close(l1.grad, ref1.grad)


def test_token_mask_excludes_tokens():
    l1, l2 = torch.randn(2, 5, 7), torch.randn(2, 5, 7, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    loss = token_masked_kl(l1, l2, mask)
    changed = l1.clone()
    changed[mask == 0] += 5.0  # masked tokens may differ arbitrarily
    assert_close(token_masked_kl(changed, l2, mask), loss)
    loss.backward()
    assert (l2.grad[mask == 0] == 0).all() and l2.grad[mask == 1].abs().sum() > 0
    with pytest.raises(ValueError, match="needs a token mask"):
        consistency_loss(l1, l2, "lm")
    with pytest.raises(ValueError, match="problem='ranking'"):
        consistency_loss(l1, l2, "ranking")
