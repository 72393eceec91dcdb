"""Adapter kinds. Adding one means: a module here with a layer class, an entry in ``build_layer``,
default targets in ``adamix_zoo.targets``, and its merged-file layout in ``adamix_zoo.formats.merged``."""

from __future__ import annotations

from torch import nn

from adamix_zoo.config import AdaMixConfig
from adamix_zoo.mixtures.adapter import MixtureOfAdapters
from adamix_zoo.mixtures.lora import MixtureOfLoRA
from adamix_zoo.routing import Router

MIXTURE_LAYERS = (MixtureOfLoRA, MixtureOfAdapters)


def build_layer(base_layer: nn.Module, config: AdaMixConfig, router: Router) -> nn.Module:
    """Wrap one frozen projection in the mixture that ``config.kind`` names."""
    if config.kind == "lora":
        return MixtureOfLoRA(
            base_layer,
            rank=config.rank,
            alpha=config.alpha,
            num_experts=config.num_experts,
            sharing=config.sharing,
            dropout=config.dropout,
            router=router,
            expert_init=config.expert_init,
            freeze_shared=config.freeze_shared,
        )
    return MixtureOfAdapters(
        base_layer,
        bottleneck=config.bottleneck,
        num_experts=config.num_experts,
        sharing=config.sharing,
        activation=config.activation,
        dropout=config.dropout,
        router=router,
        expert_init=config.expert_init,
        init=config.adapter_init,
    )


__all__ = ["MIXTURE_LAYERS", "MixtureOfAdapters", "MixtureOfLoRA", "build_layer"]
