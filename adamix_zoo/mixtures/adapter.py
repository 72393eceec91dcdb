"""Mixture of Houlsby bottleneck adapters (AdaMix, Wang et al., EMNLP 2022; Houlsby et al., 2019).

The adapter sits on the output h of a frozen projection (the feed-forward output, and in Houlsby's
placement the attention output too), before the residual LayerNorm: ``h + U_k act(D_k h)``, with
D_k: d -> m and U_k: m -> d. Experts are stacked: down (K, m, d) + (K, m), up (K, d, m) + (K, d).
With K=1 this is a plain Houlsby adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adamix_zoo.mixtures.lora import linear_dims
from adamix_zoo.routing import Router, grouped_delta, routed_linear

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


class MixtureOfAdapters(nn.Module):
    """A frozen projection followed by K bottleneck adapters, routed at random in training."""

    def __init__(
        self,
        base_layer: nn.Module,
        bottleneck: int,
        num_experts: int,
        sharing: str,
        activation: str,
        dropout: float,
        router: Router,
        expert_init: str = "independent",
        init: str = "normal",
    ) -> None:
        super().__init__()
        _, d, _ = linear_dims(base_layer)
        self.base_layer = base_layer
        self.router = router
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        k_down = 1 if sharing == "down" else num_experts
        k_up = 1 if sharing == "up" else num_experts
        weight = base_layer.weight
        # init "normal": N(0, 0.02) down and up, the transformers init the official AdaMix adapters
        # get; "zero-up": Houlsby's near-identity start (up = 0). Biases start at 0.
        self.adamix_down_weight = nn.Parameter(_draw(weight, (k_down, bottleneck, d), expert_init))
        self.adamix_down_bias = nn.Parameter(weight.new_zeros(k_down, bottleneck))
        up = _draw(weight, (k_up, d, bottleneck), expert_init)
        self.adamix_up_weight = nn.Parameter(up if init == "normal" else torch.zeros_like(up))
        self.adamix_up_bias = nn.Parameter(weight.new_zeros(k_up, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)  # (batch, ..., d)
        return h + grouped_delta(h, self.router, self.training, self._delta)

    def _delta(self, h: torch.Tensor) -> torch.Tensor:
        """One routed pass of the bottleneck: U act(D h + b_D) + b_U."""
        rows = h.shape[0]
        down = self.router.choose(len(self.adamix_down_weight), self.training, rows)
        up = self.router.choose(len(self.adamix_up_weight), self.training, rows)
        z = routed_linear(self.dropout(h), self.adamix_down_weight, self.adamix_down_bias, down)
        return routed_linear(self.act(z), self.adamix_up_weight, self.adamix_up_bias, up)

    @torch.no_grad()
    def merge_experts(self) -> None:
        """Average the experts of each projection (weights and biases) in place; K becomes 1."""
        for name in ("adamix_down_weight", "adamix_down_bias", "adamix_up_weight", "adamix_up_bias"):
            param = getattr(self, name)
            merged = nn.Parameter(param.mean(dim=0, keepdim=True), requires_grad=param.requires_grad)
            setattr(self, name, merged)


def _draw(like: torch.Tensor, shape: tuple[int, ...], expert_init: str) -> torch.Tensor:
    """N(0, 0.02) experts (K, ...): one draw copied K times ("identical") or K draws."""
    if expert_init == "identical":
        return like.new_empty(1, *shape[1:]).normal_(0, 0.02).expand(shape).clone()
    return like.new_empty(shape).normal_(0, 0.02)
