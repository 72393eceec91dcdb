"""Stochastic routing: which expert a mixture uses in one forward pass.

AdaMix routes the whole batch to one expert per projection per pass, chosen uniformly at random
and independently for the down (A / D) and up (B / U) projections, so a training step costs the
same as a single adapter. Outside training the experts are averaged ("merged"), one is fixed, or
routing stays random (the paper's analysis of single stochastic adapters).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

MERGED = -1  # expert index meaning "average of all experts"


class Router:
    """Draws expert indices from one seedable generator shared by every mixture of a model."""

    def __init__(self, seed: int = 0, eval_routing: str = "merged", eval_expert: int = 0) -> None:
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.eval_routing = eval_routing
        self.eval_expert = eval_expert
        # >1 while a forward pass carries that many stacked copies of a batch (see routed_groups)
        self.groups = 1

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def draw(self, num_experts: int) -> int:
        if num_experts == 1:
            return 0
        return int(torch.randint(num_experts, (1,), generator=self.generator).item())

    def choose(self, num_experts: int, training: bool) -> int:
        """Expert index for one projection of one pass; MERGED means the mean of the experts."""
        if num_experts == 1:
            return 0
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
    """``delta(x)`` of a mixture, computed per routing group when the batch holds several."""
    groups = router.groups if training else 1
    if groups == 1:
        return delta(x)
    if x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} rows cannot be split into {groups} routing groups")
    return torch.cat([delta(chunk) for chunk in x.chunk(groups, dim=0)], dim=0)
