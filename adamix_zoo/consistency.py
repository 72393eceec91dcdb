"""Consistency regularisation between two stochastically routed passes (AdaMix, section 2.3).

Each term lets gradients flow only through its first argument; the other side is a stop-gradient
target (``sg``). The caller multiplies by the configured weight w.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from adamix_zoo.routing import routed_groups


def _kl_sg(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || sg(q)) over the last dimension, from log-probabilities."""
    return (logp.exp() * (logp - logq.detach())).sum(dim=-1)


def symmetric_kl(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """0.5 * (KL(p1 || sg p2) + KL(p2 || sg p1)), averaged over rows. logits: (batch, classes)."""
    lp1, lp2 = F.log_softmax(logits1.float(), -1), F.log_softmax(logits2.float(), -1)
    return 0.5 * (_kl_sg(lp1, lp2) + _kl_sg(lp2, lp1)).mean()


def squared_difference(pred1: torch.Tensor, pred2: torch.Tensor) -> torch.Tensor:
    """Regression: 0.5 * ((y1 - sg y2)^2 + (y2 - sg y1)^2), averaged. pred: (batch,) or (batch, 1)."""
    p1, p2 = pred1.float(), pred2.float()
    return 0.5 * ((p1 - p2.detach()) ** 2 + (p2 - p1.detach()) ** 2).mean()


def token_masked_kl(
    logits1: torch.Tensor, logits2: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Language modelling: symmetric KL per token, averaged over tokens where ``mask`` is true.

    logits: (batch, seq, vocab); mask: (batch, seq), true on the tokens that are trained on.
    """
    lp1, lp2 = F.log_softmax(logits1.float(), -1), F.log_softmax(logits2.float(), -1)
    per_token = 0.5 * (_kl_sg(lp1, lp2) + _kl_sg(lp2, lp1))  # (batch, seq)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def consistency_loss(out1: torch.Tensor, out2: torch.Tensor, problem: str, mask=None) -> torch.Tensor:
    """Dispatch on the problem type: 'classification', 'regression' or 'lm'."""
    if problem == "classification":
        return symmetric_kl(out1, out2)
    if problem == "regression":
        return squared_difference(out1, out2)
    if problem == "lm":
        if mask is None:
            raise ValueError("the language-modelling consistency loss needs a token mask")
        return token_masked_kl(out1, out2, mask)
    raise ValueError(f"problem={problem!r} is not supported; choose classification, regression or lm")


def two_routed_passes(
    model: nn.Module, forward: Callable[[dict[str, Any]], Any], inputs: dict[str, Any], second_pass: str = "train"
) -> tuple[Any, Any]:
    """Outputs of two independently routed passes over ``inputs``, run as one doubled batch; with
    ``second_pass="target"`` the second is a separate forward without gradient.

    ``forward(batch)`` returns a tensor (or an object with ``.logits``) whose dim 0 is the batch.
    """
    if second_pass == "target":
        first = _logits(forward(inputs))
        with torch.no_grad():
            return first, _logits(forward(inputs))
    doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with routed_groups(model, 2):
        out = forward(doubled)
    return _logits(out).chunk(2, dim=0)


def _logits(out: Any) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.logits
