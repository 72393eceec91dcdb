"""Wrap any transformers model with AdaMix: inject, freeze, state dicts, merge, fold.

Every adapter-expert parameter is named ``...adamix_*``, so "what trains", "what federation moves"
and "what gets saved" are one prefix test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adamix_zoo.config import AdaMixConfig
from adamix_zoo.mixtures import MIXTURE_LAYERS, MixtureOfLoRA, build_layer
from adamix_zoo.routing import Router
from adamix_zoo.targets import default_patterns, find_targets, user_patterns

ADAPTER_PREFIX = "adamix_"
# Task heads of transformers' *For* classes; they train with the adapters and travel with them.
HEAD_NAMES = ("classifier", "score", "pre_classifier", "qa_outputs")


def is_adapter_param(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith(ADAPTER_PREFIX)


@dataclass(frozen=True)
class ParameterCounts:
    adapter: int
    head: int
    backbone: int

    @property
    def trainable(self) -> int:
        return self.adapter + self.head

    @property
    def percent_of_backbone(self) -> float:
        return 100.0 * self.trainable / self.backbone


class AdaMixModel(nn.Module):
    """A frozen transformers model whose target projections hold AdaMix mixtures.

    Args:
        model: any ``transformers`` model (or nn.Module with a ``config.model_type``); modified in place.
        config: the AdaMix configuration.
        head_modules: names of modules that stay trainable (task heads); None detects transformers'
            standard head names (classifier, score, pre_classifier, qa_outputs).

    Raises:
        ValueError: no module matches the targets, or a target is not a linear projection.
    """

    def __init__(
        self, model: nn.Module, config: AdaMixConfig, head_modules: list[str] | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.router = Router(config.seed, config.eval_routing, config.eval_expert, config.routing)
        self.head_modules = self._resolve_heads(head_modules)
        self.target_names = self._inject()
        self._freeze_backbone()

    # -- construction ----------------------------------------------------------------------------
    def _resolve_heads(self, head_modules: list[str] | None) -> list[str]:
        names = dict(self.model.named_modules())
        if head_modules is None:
            return [n for n in names if n.rsplit(".", 1)[-1] in HEAD_NAMES]
        missing = [h for h in head_modules if h not in names]
        if missing:
            raise ValueError(f"head modules not found in the model: {', '.join(missing)}")
        return list(head_modules)

    def _inject(self) -> list[str]:
        cfg = self.config
        if cfg.target_modules is not None:
            patterns = user_patterns(cfg.target_modules)
        else:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            patterns = default_patterns(str(model_type), cfg.kind, cfg.placement)
        targets = find_targets(self.model, patterns)
        if not targets:
            raise ValueError(f"no module of the model matches the targets {patterns}")
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, build_layer(getattr(parent, child), cfg, self.router))
        return targets

    def _freeze_backbone(self) -> None:
        """Only heads and adapters train; adapter tensors keep what their layer set (FFA-LoRA's
        frozen shared A stays frozen)."""
        heads = tuple(h + "." for h in self.head_modules)
        for name, param in self.model.named_parameters():
            if not is_adapter_param(name):
                param.requires_grad = name.startswith(heads)

    # -- running ----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def mixtures(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, MIXTURE_LAYERS)}

    def seed_routing(self, seed: int) -> None:
        self.router.seed(seed)

    def set_eval_routing(self, routing: str, expert: int = 0) -> None:
        AdaMixConfig(num_experts=self.config.num_experts, eval_routing=routing, eval_expert=expert)
        self.router.eval_routing, self.router.eval_expert = routing, expert

    # -- parameters --------------------------------------------------------------------------------
    def parameter_counts(self) -> ParameterCounts:
        adapter = head = backbone = 0
        heads = tuple(h + "." for h in self.head_modules)
        for name, param in self.model.named_parameters():
            if is_adapter_param(name):
                adapter += param.numel()
            elif name.startswith(heads):
                head += param.numel()
            else:
                backbone += param.numel()
        return ParameterCounts(adapter, head, backbone)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter experts only (what federation moves): name -> (K, ...) tensor, detached."""
        return {n: p.detach() for n, p in self.model.named_parameters() if is_adapter_param(n)}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        heads = tuple(h + "." for h in self.head_modules)
        return {n: p.detach() for n, p in self.model.named_parameters() if n.startswith(heads)}

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], heads: bool = False) -> None:
        """Copy adapter (and, with ``heads``, head) tensors in; names and shapes must match exactly.

        Raises:
            ValueError: missing or unexpected names, or a shape mismatch; nothing is changed then.
        """
        own = self.adapter_state_dict() | (self.head_state_dict() if heads else {})
        check_compatible(own, state)
        params = dict(self.model.named_parameters())
        for name, tensor in state.items():
            params[name].copy_(tensor)

    # -- merge and fold -----------------------------------------------------------------------------
    def merge(self) -> None:
        """Average the experts of every mixture in place: the model becomes a single adapter."""
        for layer in self.mixtures().values():
            layer.merge_experts()

    @property
    def is_merged(self) -> bool:
        return all(
            p.shape[0] == 1 for n, p in self.model.named_parameters() if is_adapter_param(n)
        )

    def fold(self) -> None:
        """Merge, then add each LoRA delta into its frozen weight (zero inference overhead)."""
        if self.config.kind != "lora":
            raise ValueError("only LoRA mixtures fold into the base weights; adapters add a layer")
        self.merge()
        for layer in self.mixtures().values():
            assert isinstance(layer, MixtureOfLoRA)
            layer.fold()


def check_compatible(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{n}: expected {tuple(expected[n].shape)}, got {tuple(given[n].shape)}"
        for n in sorted(set(expected) & set(given))
        if expected[n].shape != given[n].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (first: {missing[:3]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (first: {unexpected[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (first: {shapes[:3]})")
    if problems:
        raise ValueError("adapter state does not fit this model: " + "; ".join(problems))
