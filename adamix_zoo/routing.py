"""Stochastic routing: which expert a mixture uses in one forward pass.

AdaMix routes at random in training, independently for the down (A / D) and up (B / U) projections.
Two granularities:

- ``"batch"``: one draw per pass for the whole batch (the paper and the official code). A step costs
  one adapter, but each expert is trained on about 1/K of the steps, so under Adam it moves about
  lr / sqrt(K) per step and the merged average trails a single adapter at equal steps.
- ``"row"``: every row draws its own experts, and each row's expert weights are gathered and applied
  with a batched matmul (same FLOPs as one adapter). Every expert learns on every step, from the
  rows routed to it.

Outside training the experts are averaged ("merged"), one is fixed, or routing stays random per
pass (the paper's analysis of single stochastic adapters).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

MERGED = -1  # expert index meaning "average of all experts"

Choice = int | torch.Tensor  # one expert (or MERGED) for the pass, or a (rows,) index per row


class Router:
    """Draws expert indices from one seedable generator shared by every mixture of a model."""

    def __init__(
        self, seed: int = 0, eval_routing: str = "merged", eval_expert: int = 0, routing: str = "batch"
    ) -> None:
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.eval_routing = eval_routing
        self.eval_expert = eval_expert
        self.routing = routing
        # >1 while a forward pass carries that many stacked copies of a batch (see routed_groups)
        self.groups = 1

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def draw(self, num_experts: int) -> int:
        if num_experts == 1:
            return 0
        return int(torch.randint(num_experts, (1,), generator=self.generator).item())

    def choose(self, num_experts: int, training: bool, rows: int = 1) -> Choice:
        """Experts for one projection of one pass over ``rows`` rows.

        Returns an int (an expert, or MERGED for the mean of the experts) or, when training with
        ``routing="row"``, a (rows,) tensor of expert indices.
        """
        if num_experts == 1:
            return 0
        if training and self.routing == "row":
            return torch.randint(num_experts, (rows,), generator=self.generator)
        if training or self.eval_routing == "random":
            return self.draw(num_experts)
        if self.eval_routing == "fixed":
            return min(self.eval_expert, num_experts - 1)
        return MERGED


def select(experts: torch.Tensor, index: int) -> torch.Tensor:
    """experts: (K, ...) -> one expert (...), or their mean for MERGED."""
    if index == MERGED:
        return experts.mean(dim=0)
    return experts[index]


def routed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, choice: Choice
) -> torch.Tensor:
    """``F.linear`` with the routed expert: x (n, ..., d_in), weight (K, d_out, d_in), bias (K, d_out).

    A per-row ``choice`` (n,) gathers each row's expert, (n, d_out, d_in), and applies it with bmm.
    """
    if not torch.is_tensor(choice):
        return F.linear(x, select(weight, choice), None if bias is None else select(bias, choice))
    index = choice.to(weight.device)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (n, tokens, d_in)
    out = torch.bmm(flat, weight[index].to(flat.dtype).transpose(1, 2))  # (n, tokens, d_out)
    if bias is not None:
        out = out + bias[index].to(out.dtype).unsqueeze(1)
    return out.reshape(*x.shape[:-1], weight.shape[1])


@contextmanager
def routed_groups(model: nn.Module, groups: int) -> Iterator[None]:
    """Route each of ``groups`` equal slices of the batch (dim 0) independently in training.

    Running the two consistency passes as one doubled batch ``cat([x, x])`` inside
    ``routed_groups(model, 2)`` is the same computation as two separate passes with independent
    routing, but the frozen projections run as one larger matrix product and backward walks one graph.
    """
    routers = {id(r): r for m in model.modules() if isinstance(r := getattr(m, "router", None), Router)}
    for router in routers.values():
        router.groups = groups
    try:
        yield
    finally:
        for router in routers.values():
            router.groups = 1


def grouped_delta(x: torch.Tensor, router: Router, training: bool, delta) -> torch.Tensor:
    """``delta(x)`` of a mixture, computed per routing group when the batch holds several.

    Per-row routing draws every row independently already, so the batch needs no splitting.
    """
    groups = router.groups if training and router.routing == "batch" else 1
    if groups == 1:
        return delta(x)
    if x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} rows cannot be split into {groups} routing groups")
    return torch.cat([delta(chunk) for chunk in x.chunk(groups, dim=0)], dim=0)
