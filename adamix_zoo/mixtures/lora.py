"""Mixture of LoRA experts on a frozen linear layer (AdaMix, Wang et al., EMNLP 2022).

Expert k adds ``scale * B_k A_k x`` to ``W x`` with A_k: (r, d_in), B_k: (d_out, r). The experts of a
projection are stacked into one parameter, (K, r, d_in) for A and (K, d_out, r) for B; a shared
projection has K=1. With K=1 everywhere this is exactly PEFT's LoRA. ``freeze_shared`` (with A
shared) keeps A at its initialisation and trains only the B experts (FFA-LoRA, Sun et al., ICLR
2024): each expert's update ``scale * B_k A`` is then linear in what trains.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adamix_zoo.routing import Router, grouped_delta, routed_linear

# Parameter names of the stacked factors (what the federation pairs up and averages).
LORA_A, LORA_B = "adamix_lora_A", "adamix_lora_B"


def linear_dims(layer: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, fan_in_fan_out) of an nn.Linear or a GPT-2 Conv1D (weight stored (d_in, d_out))."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return d_in, d_out, True
    raise TypeError(f"cannot adapt {type(layer).__name__}: expected nn.Linear or transformers Conv1D")


class MixtureOfLoRA(nn.Module):
    """A frozen linear layer plus K LoRA experts, routed at random in training."""

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float,
        num_experts: int,
        sharing: str,
        dropout: float,
        router: Router,
        expert_init: str = "identical",
        freeze_shared: bool = False,
    ) -> None:
        super().__init__()
        if freeze_shared and sharing != "down":
            raise ValueError(f"freeze_shared freezes the shared A: it needs sharing='down', got {sharing!r}")
        d_in, d_out, self.fan_in_fan_out = linear_dims(base_layer)
        self.base_layer = base_layer
        self.scale = alpha / rank
        self.router = router
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.folded = False
        k_a = 1 if sharing == "down" else num_experts
        k_b = 1 if sharing == "up" else num_experts
        weight = base_layer.weight
        self.adamix_lora_A = nn.Parameter(weight.new_empty(k_a, rank, d_in))
        self.adamix_lora_B = nn.Parameter(weight.new_zeros(k_b, d_out, rank))
        # PEFT's default init; B = 0 so the delta starts at 0. "identical" copies one draw into every
        # expert (official loralib deep-copies one LoRA), so the experts are averaged around a common
        # start; "independent" draws each.
        for expert in self.adamix_lora_A.data[: 1 if expert_init == "identical" else k_a]:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        if expert_init == "identical":
            self.adamix_lora_A.data[1:] = self.adamix_lora_A.data[:1]
        self.adamix_lora_A.requires_grad_(not freeze_shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.folded:
            return out
        return out + grouped_delta(x, self.router, self.training, self._delta)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        """One routed pass of the experts: x (batch, ..., d_in) -> (batch, ..., d_out)."""
        a, b = self.adamix_lora_A, self.adamix_lora_B
        z = routed_linear(self.dropout(x).to(a.dtype), a, None, self._choose(len(a), x))  # (..., r)
        return routed_linear(z, b, None, self._choose(len(b), x)) * self.scale

    def _choose(self, num_experts: int, x: torch.Tensor):
        return self.router.choose(num_experts, self.training, rows=x.shape[0])

    @torch.no_grad()
    def merge_experts(self) -> None:
        """Average the experts in place: A = mean_k A_k, B = mean_k B_k (K becomes 1)."""
        for name in (LORA_A, LORA_B):
            param = getattr(self, name)
            merged = nn.Parameter(param.mean(dim=0, keepdim=True), requires_grad=param.requires_grad)
            setattr(self, name, merged)

    def delta_weight(self) -> torch.Tensor:
        """scale * mean(B) @ mean(A): (d_out, d_in), the weight update of the merged adapter."""
        return self.scale * self.adamix_lora_B.mean(0) @ self.adamix_lora_A.mean(0)

    @torch.no_grad()
    def fold(self) -> None:
        """Add the merged delta to the frozen weight so inference costs nothing extra."""
        if self.folded:
            return
        if len(self.adamix_lora_A) != 1 or len(self.adamix_lora_B) != 1:
            raise RuntimeError("merge the experts before folding: fold() needs one expert per projection")
        delta = self.delta_weight().to(self.base_layer.weight.dtype)
        self.base_layer.weight += delta.T if self.fan_in_fan_out else delta
        self.folded = True
