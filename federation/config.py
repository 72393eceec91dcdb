"""Run settings of a federation, read once from Flower's run config (``[tool.flwr.app.config]``).

Every field is a run-config key with dashes instead of underscores (``num_rounds`` <->
``num-rounds``); ``flwr run . --run-config "num-rounds=5 tasks='sst2,rte'"`` overrides them.
Flower's run config holds scalars only, so lists (``tasks``) are comma-separated strings. The AdaMix
settings are one ``AdaMixConfig`` (``adamix``), flattened into the run-config keys of ``ADAMIX_KEYS``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from adamix_zoo.config import AdaMixConfig
from adamix_zoo.glue_tasks import get_task

# FedAvg-family aggregation, robust aggregation, and server-side optimizers (FedOpt: Reddi et al.).
STRATEGIES = (
    "fedavg", "fedmedian", "fedtrimmedavg", "krum", "fedavgm", "fedadam", "fedyogi", "fedadagrad"
)
DP_MODES = ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
PARTITIONERS = ("iid", "dirichlet")
HEAD_MODES = ("auto", "true", "false")
# Run-config key -> AdaMixConfig field; the seed is the run's own ``seed``.
ADAMIX_KEYS = {"kind": "kind", "num-experts": "num_experts", "rank": "rank", "lora-alpha": "alpha",
               "bottleneck": "bottleneck", "sharing": "sharing", "consistency-weight": "consistency_weight",
               "freeze-shared": "freeze_shared"}  # with sharing=down: exact aggregation (FFA-LoRA)


def federation_adamix() -> AdaMixConfig:
    """The federation's default mixture: LoRA, K=4, rank 8, alpha 16, consistency weight 1."""
    return AdaMixConfig(consistency_weight=1.0)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(allowed)}")


@dataclass
class FederationConfig:
    """One federated AdaMix run. ``help`` metadata is the documentation of each run-config key."""

    tasks: str = field(
        default="sst2",
        metadata={
            "help": "GLUE task, or comma-separated tasks (multi-task: client i holds tasks[i % T])."
        },
    )
    backbone: str = field(
        default="minilm-l6", metadata={"help": "Backbone alias or local model folder."}
    )
    num_clients: int = field(
        default=4, metadata={"help": "Clients (SuperNodes / partitions) in the federation."}
    )
    min_clients: int = field(
        default=2,
        metadata={"help": "Valid updates a round needs to aggregate (else the round is skipped)."},
    )
    num_rounds: int = field(default=3, metadata={"help": "Federated rounds."})
    local_steps: int = field(default=20, metadata={"help": "Optimizer steps per client per round."})
    batch_size: int = field(default=16, metadata={"help": "Local batch size."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Local AdamW learning rate."})
    max_length: int = field(default=128, metadata={"help": "Tokenizer truncation length."})
    partitioner: str = field(
        default="iid", metadata={"help": "'iid' or 'dirichlet' (non-IID over labels)."}
    )
    dirichlet_alpha: float = field(
        default=0.5, metadata={"help": "Dirichlet concentration (smaller = more skewed)."}
    )
    train_limit: int = field(
        default=0, metadata={"help": "Use the first N training rows of each task (0 = all)."}
    )
    eval_limit: int = field(
        default=0, metadata={"help": "Use the first N validation rows of each task (0 = all)."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of partitions, initial experts, heads and routing."}
    )
    adamix: AdaMixConfig = field(
        default_factory=federation_adamix,
        metadata={"help": "The mixture; run-config keys " + ", ".join(ADAMIX_KEYS) + "."},
    )
    pooling: str = field(default="mean", metadata={"help": "Head pooling: 'mean' or 'cls'."})
    federate_head: str = field(
        default="auto",
        metadata={"help": "'auto' (single task: yes; multi-task: no), 'true', 'false'."},
    )
    strategy: str = field(default="fedavg", metadata={"help": ", ".join(STRATEGIES) + "."})
    server_learning_rate: float = field(
        default=1.0,
        metadata={"help": "fedavgm / fedadam / fedyogi / fedadagrad: server step on the mean update."},
    )
    server_momentum: float = field(default=0.0, metadata={"help": "fedavgm: server momentum."})
    server_tau: float = field(
        default=1e-3, metadata={"help": "fedadam / fedyogi / fedadagrad: adaptivity (epsilon)."}
    )
    trimmed_beta: float = field(
        default=0.2, metadata={"help": "FedTrimmedAvg: fraction cut at each end."}
    )
    krum_malicious: int = field(default=0, metadata={"help": "Krum: assumed malicious clients."})
    dp: str = field(
        default="none",
        metadata={"help": "Differential privacy wrapper: " + ", ".join(DP_MODES) + "."},
    )
    dp_noise_multiplier: float = field(
        default=0.1, metadata={"help": "DP Gaussian noise multiplier."}
    )
    dp_clipping_norm: float = field(default=1.0, metadata={"help": "DP (initial) clipping norm."})
    round_timeout: float = field(
        default=600.0, metadata={"help": "Seconds a round waits for replies."}
    )
    output_dir: str = field(
        default="outputs/federation",
        metadata={"help": "Run folder (relative paths: the SuperLink's working directory)."},
    )
    data_dir: str = field(
        default="", metadata={"help": "Data root with glue/<task>/*.jsonl ('' = $ADAMIX_DATA_DIR)."}
    )
    publish: bool = field(
        default=True, metadata={"help": "Publish the merged global adapter into the registry."}
    )
    publish_namespace: str = field(
        default="federated",
        metadata={"help": "Registry namespace: entries are <namespace>/<task>@<version>."},
    )
    registry_dir: str = field(
        default="", metadata={"help": "Registry root ('' = the registry's default)."}
    )

    def __post_init__(self) -> None:
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("dp", self.dp, DP_MODES)
        _choice("partitioner", self.partitioner, PARTITIONERS)
        _choice("federate-head", str(self.federate_head).lower(), HEAD_MODES)
        if not self.task_list:
            raise ValueError("tasks must name at least one task")
        for name in ("num_clients", "min_clients", "num_rounds", "local_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.min_clients > self.num_clients:
            raise ValueError(
                f"min-clients={self.min_clients} exceeds num-clients={self.num_clients}"
            )
        if len(self.task_list) > self.num_clients:
            raise ValueError(
                f"{len(self.task_list)} tasks need at least as many clients, got {self.num_clients}"
            )
        for task in self.task_list:
            get_task(task)  # raises naming the known tasks

    # -- derived views ---------------------------------------------------------------------------
    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    @property
    def multi_task(self) -> bool:
        return len(self.task_list) > 1

    @property
    def head_federated(self) -> bool:
        """Single-task runs federate the head too (else the global model has no usable head)."""
        mode = str(self.federate_head).lower()
        return not self.multi_task if mode == "auto" else mode == "true"

    def client_task(self, partition_id: int) -> tuple[str, int, int]:
        """(task, partition of that task, partitions of that task) of client ``partition_id``."""
        tasks = self.task_list
        task = tasks[partition_id % len(tasks)]
        same = [c for c in range(self.num_clients) if c % len(tasks) == partition_id % len(tasks)]
        return task, same.index(partition_id), len(same)

    def adamix_config(self) -> AdaMixConfig:
        """The mixture seeded by the run (identical initial experts and routing everywhere)."""
        return dataclasses.replace(self.adamix, seed=self.seed)

    def data_root(self) -> Path:
        root = self.data_dir or os.environ.get("ADAMIX_DATA_DIR", "")
        if not root:
            raise ValueError("no data folder: set data-dir in the run config or $ADAMIX_DATA_DIR")
        return Path(root).expanduser()

    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()

    def summary(self) -> dict[str, Any]:
        """The ``federation`` block of run_config.json (the provenance the registry keeps)."""
        return {
            "rounds": self.num_rounds,
            "clients": self.num_clients,
            "min_clients": self.min_clients,
            "strategy": self.strategy,
            "server_learning_rate": self.server_learning_rate,
            "server_momentum": self.server_momentum,
            "dp": self.dp,
            "partitioner": self.partitioner,
            "dirichlet_alpha": self.dirichlet_alpha if self.partitioner == "dirichlet" else None,
            "local_steps": self.local_steps,
            "tasks": self.task_list,
            "head_federated": self.head_federated,
        }

    # -- run config <-> dataclass ------------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FederationConfig":
        """Read the known keys of Flower's run config (unknown keys are Flower's or the user's own).

        Raises:
            ValueError: a value of the wrong type or out of range (the message names the key).
        """
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            if key in run_config and f.name != "adamix":
                values[f.name] = _coerce(key, run_config[key], f.default)
        mixture, default = {}, federation_adamix()
        for key, name in ADAMIX_KEYS.items():
            if key in run_config:
                mixture[name] = _coerce(key, run_config[key], getattr(default, name))
        return cls(**values, adamix=dataclasses.replace(default, **mixture))

    def to_run_config(self) -> dict[str, Any]:
        flat = {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}
        mixture = {key: getattr(self.adamix, name) for key, name in ADAMIX_KEYS.items()}
        return {k: v for k, v in flat.items() if k != "adamix"} | mixture


def _coerce(key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{key} must be true or false, got {value!r}")
            return value.lower() in ("true", "1")
        return bool(value)
    try:
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key} must be {kind.__name__}, got {value!r}") from err
