"""The AdaMix configuration: one validated dataclass, serialisable to JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

KINDS = ("lora", "adapter")
SHARING = ("up", "down", "none")
PLACEMENTS = ("ffn", "houlsby")
EVAL_ROUTING = ("merged", "fixed", "random")
ACTIVATIONS = ("relu", "gelu", "tanh", "silu")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(allowed)}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass
class AdaMixConfig:
    """Mixture-of-Adaptations (Wang et al., EMNLP 2022) on a frozen transformer.

    ``num_experts=1`` is exactly plain LoRA / a plain Houlsby adapter: the baselines share the code.
    """

    kind: str = field(default="lora", metadata={"help": "Expert kind: 'lora' or 'adapter'."})
    num_experts: int = field(default=4, metadata={"help": "Experts K per adapted place."})
    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scale = alpha / rank."})
    bottleneck: int = field(default=16, metadata={"help": "Adapter bottleneck size m."})
    activation: str = field(default="gelu", metadata={"help": "Adapter non-linearity."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    sharing: str = field(
        default="up",
        metadata={"help": "Projection shared by all experts: 'up' (B / U), 'down' (A / D), 'none'."},
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module-name suffixes to adapt; None picks the architecture default."},
    )
    placement: str = field(
        default="ffn",
        metadata={"help": "Adapter places: 'ffn' (AdaMix) or 'houlsby' (after attention too)."},
    )
    consistency_weight: float = field(
        default=1.0, metadata={"help": "Weight w of the consistency loss between two passes."}
    )
    eval_routing: str = field(
        default="merged",
        metadata={"help": "Routing outside training: 'merged', 'fixed' or 'random'."},
    )
    eval_expert: int = field(default=0, metadata={"help": "Expert used when eval_routing='fixed'."})
    seed: int = field(default=0, metadata={"help": "Seed of the routing generator."})

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, KINDS)
        _check_choice("sharing", self.sharing, SHARING)
        _check_choice("placement", self.placement, PLACEMENTS)
        _check_choice("eval_routing", self.eval_routing, EVAL_ROUTING)
        _check_choice("activation", self.activation, ACTIVATIONS)
        for name in ("num_experts", "rank", "alpha", "bottleneck"):
            _check_positive(name, getattr(self, name))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {self.consistency_weight!r}")
        if not 0 <= self.eval_expert < self.num_experts:
            raise ValueError(
                f"eval_expert={self.eval_expert} is out of range for num_experts={self.num_experts}"
            )
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules must name at least one module, or be None")

    @property
    def scale(self) -> float:
        """LoRA output scale alpha / r."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdaMixConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdaMixConfig fields: {', '.join(unknown)}")
        return cls(**data)
