"""The AdaMix configuration: one validated dataclass, serialisable to JSON, and the method names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

KINDS = ("lora", "adapter")
SHARING = ("up", "down", "none")
PLACEMENTS = ("ffn", "houlsby")
EVAL_ROUTING = ("merged", "fixed", "random")
ACTIVATIONS = ("relu", "gelu", "tanh", "silu")
ROUTING = ("row", "batch")
EXPERT_INIT = ("identical", "independent")
ADAPTER_INIT = ("normal", "zero-up")
TASK_LOSS_PASSES = ("both", "first")
SECOND_PASS = ("train", "target")
PROBLEMS = ("classification", "regression", "lm")
# Adapter methods: a plain kind is K=1 of the same code (the baselines); "adamix-<kind>" mixes K experts.
ADAPTER_METHODS = ("lora", "adapter", "adamix-lora", "adamix-adapter")
# Consistency weight per problem when ``consistency_weight`` is None (docs/BENCHMARKS.md, fidelity).
DEFAULT_CONSISTENCY = {"classification": 1.0, "regression": 1.0, "lm": 1.0}


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
    consistency_weight: float | None = field(
        default=None,
        metadata={"help": "Weight w of the consistency loss between two passes; None takes the "
                  "per-problem default DEFAULT_CONSISTENCY (classification 1, the paper; regression "
                  "1 on a squared difference, where the official code's one-logit KL is identically "
                  "0; lm 1 on the per-token KL, where official NLG/src/model.py uses 100)."},
    )
    routing: str = field(
        default="row",
        metadata={"help": "Training routing: 'row' (each row draws its experts, so every expert "
                  "learns on every step) or 'batch' (one draw per pass, the paper's and official "
                  "code's; each expert then learns on 1/K of the steps)."},
    )
    expert_init: str = field(
        default="identical",
        metadata={"help": "'identical' (K copies of one draw: official LoRA experts, "
                  "NLG/loralib/layers.py deep-copies one LoRA) or 'independent' (one draw each: "
                  "official adapter experts, drawn by the transformers init)."},
    )
    adapter_init: str = field(
        default="normal",
        metadata={"help": "Adapter weights: 'normal' (N(0, 0.02) down and up, the transformers init "
                  "of the official AdaMix adapters) or 'zero-up' (Houlsby's near-identity: up = 0)."},
    )
    task_loss_passes: str = field(
        default="both",
        metadata={"help": "Task loss on 'both' consistency passes (mean, as R-Drop) or the 'first' "
                  "only (official GPT-2 AdaMix)."},
    )
    second_pass: str = field(
        default="train",
        metadata={"help": "The second consistency pass: 'train' (both passes backpropagate, run as one "
                  "doubled batch) or 'target' (a forward without gradient that the first pass is pulled "
                  "toward; about 1.5x a single adapter's step instead of 2x; the task loss is then "
                  "the first pass's)."},
    )
    eval_routing: str = field(
        default="merged",
        metadata={"help": "Routing outside training: 'merged', 'fixed' or 'random'."},
    )
    eval_expert: int = field(default=0, metadata={"help": "Expert used when eval_routing='fixed'."})
    freeze_shared: bool = field(
        default=False,
        metadata={"help": "Freeze the shared down-projection A at its initialisation and train only the "
                  "B experts (FFA-LoRA, Sun et al., ICLR 2024). Every expert's update s B_k A is then "
                  "linear in what trains, so averaging B across clients (federation) or experts "
                  "(merging) averages the updates exactly. Needs kind='lora' and sharing='down'."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the routing generator."})

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, KINDS)
        _check_choice("sharing", self.sharing, SHARING)
        _check_choice("placement", self.placement, PLACEMENTS)
        _check_choice("eval_routing", self.eval_routing, EVAL_ROUTING)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("routing", self.routing, ROUTING)
        _check_choice("expert_init", self.expert_init, EXPERT_INIT)
        _check_choice("adapter_init", self.adapter_init, ADAPTER_INIT)
        _check_choice("task_loss_passes", self.task_loss_passes, TASK_LOSS_PASSES)
        _check_choice("second_pass", self.second_pass, SECOND_PASS)
        for name in ("num_experts", "rank", "alpha", "bottleneck"):
            _check_positive(name, getattr(self, name))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.consistency_weight is not None and not self.consistency_weight >= 0:
            raise ValueError(f"consistency_weight must be >= 0, got {self.consistency_weight!r}")
        if not 0 <= self.eval_expert < self.num_experts:
            raise ValueError(
                f"eval_expert={self.eval_expert} is out of range for num_experts={self.num_experts}"
            )
        if self.freeze_shared and (self.kind, self.sharing) != ("lora", "down"):
            raise ValueError(
                "freeze_shared=True freezes the shared LoRA down-projection A (FFA-LoRA): it needs "
                f"kind='lora' and sharing='down', got kind={self.kind!r}, sharing={self.sharing!r}"
                + (" (the shared B starts at 0: frozen, the update would stay 0)" if self.sharing == "up" else "")
            )
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules must name at least one module, or be None")

    @property
    def scale(self) -> float:
        """LoRA output scale alpha / r."""
        return self.alpha / self.rank

    def consistency_weight_for(self, problem: str) -> float:
        """The consistency weight for a problem type: the configured one, else its default."""
        _check_choice("problem", problem, PROBLEMS)
        if self.consistency_weight is not None:
            return self.consistency_weight
        return DEFAULT_CONSISTENCY[problem] if self.num_experts > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdaMixConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdaMixConfig fields: {', '.join(unknown)}")
        return cls(**data)


def method_kind(method: str, num_experts: int) -> tuple[str, int]:
    """(kind, K) of an adapter method: ``adamix-lora`` keeps ``num_experts``, ``lora`` is K=1.

    Raises:
        ValueError: not one of ``ADAPTER_METHODS``.
    """
    _check_choice("method", method, ADAPTER_METHODS)
    return method.removeprefix("adamix-"), num_experts if method.startswith("adamix-") else 1


def method_name(kind: str, num_experts: int) -> str:
    """The method name of a mixture: ``adamix-<kind>`` with K > 1, the plain kind with K = 1."""
    return f"adamix-{kind}" if num_experts > 1 else kind


def method_config(method: str, mixture: AdaMixConfig, seed: int) -> AdaMixConfig:
    """``mixture`` set to a method's kind and K, seeded; the K=1 baselines get no consistency loss."""
    kind, k = method_kind(method, mixture.num_experts)
    weight = mixture.consistency_weight if method.startswith("adamix-") else 0.0
    return dataclasses.replace(mixture, kind=kind, num_experts=k, consistency_weight=weight, seed=seed)


# The fields a recipe's flat options may set; kind and K come from the method, the seed from the run.
OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(AdaMixConfig) if f.name not in ("kind", "seed"))


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat options -> (AdaMixConfig fields among them, the rest)."""
    mixture = {k: v for k, v in options.items() if k in OPTION_FIELDS}
    return mixture, {k: v for k, v in options.items() if k not in OPTION_FIELDS}


def args_from_options(cls: type, default: AdaMixConfig, options: dict[str, Any]) -> Any:
    """A recipe's arguments (a dataclass with an ``adamix`` field) from flat options: the mixture's
    fields among them change ``default`` (or the ``adamix`` option), the rest go to ``cls``."""
    mixture, rest = split_options(options)
    base = rest.pop("adamix", default)
    return cls(**rest, adamix=dataclasses.replace(base, **mixture))


def flat_options(args: Any) -> dict[str, Any]:
    """The inverse of ``args_from_options``: every field, the mixture's flattened."""
    flat = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name != "adamix"}
    return flat | split_options(args.adamix.to_dict())[0]
