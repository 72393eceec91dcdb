"""Server strategies over the adapter experts: Flower's own, behind a validating wrapper.

``ValidatingStrategy`` screens every training reply before Flower's strategy sees it (error
replies, wrong or extra tensor names, wrong shapes or dtypes, NaN/Inf, a bad ``num-examples``),
logs and drops the bad ones, aggregates the rest when at least ``min_valid`` remain, and checks the
aggregate once more: a round that cannot produce a clean aggregate keeps the previous global
experts, so a corrupted aggregate is never adopted (and so never saved or published).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from federation.config import FederationConfig
from federation.records import Spec, check_record

ARRAYS_KEY, METRICS_KEY, CONFIG_KEY = "arrays", "metrics", "config"
NUM_EXAMPLES = "num-examples"
TASK_KEY = "task-index"  # evaluation replies say which task (of cfg.task_list) they measured


@dataclass
class RoundLog:
    """What happened to the updates of the federation, round by round."""

    rejected: dict[int, list[tuple[int, str]]] = field(default_factory=dict)  # round -> (node, why)
    accepted: dict[int, int] = field(default_factory=dict)  # round -> updates aggregated
    skipped: list[int] = field(default_factory=list)  # rounds that kept the previous experts
    phase_seconds: dict[int, float] = field(
        default_factory=dict
    )  # round -> train send..aggregate wall time
    eval_seconds: dict[int, float] = field(
        default_factory=dict
    )  # round -> evaluate send..aggregate
    train_seconds: dict[int, list[float]] = field(
        default_factory=dict
    )  # round -> clients' loop times

    @property
    def aggregated_rounds(self) -> list[int]:
        return sorted(r for r in self.accepted if r not in self.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {
            "aggregated_rounds": self.aggregated_rounds,
            "skipped_rounds": self.skipped,
            "accepted_updates": self.accepted,
            "rejected_updates": {
                r: [{"node": n, "reason": why} for n, why in v]
                for r, v in self.rejected.items()
                if v
            },
            "round_train_phase_seconds": self.phase_seconds,
            "round_eval_phase_seconds": self.eval_seconds,
            "client_train_seconds": self.train_seconds,
        }


def reply_problem(msg: Message, spec: Spec) -> str | None:
    """Why a training reply cannot be aggregated, or None when it can."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    content = msg.content
    if list(content.array_records) != [ARRAYS_KEY]:
        return f"expected one ArrayRecord '{ARRAYS_KEY}', got {list(content.array_records)}"
    if list(content.metric_records) != [METRICS_KEY]:
        return f"expected one MetricRecord '{METRICS_KEY}', got {list(content.metric_records)}"
    weight = content[METRICS_KEY].get(NUM_EXAMPLES)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or weight <= 0
    ):
        return f"'{NUM_EXAMPLES}' must be a positive number, got {weight!r}"
    problems = check_record(content[ARRAYS_KEY], spec)
    return "; ".join(problems) if problems else None


class ValidatingStrategy(Strategy):
    """Wrap a Flower strategy so only well-formed, finite updates are aggregated.

    Args:
        inner: the Flower strategy (FedAvg, FedMedian, ..., or a DP wrapper around one).
        spec: expected name -> (shape, dtype) of every tensor an update carries.
        min_valid: updates a round needs to be aggregated; fewer keeps the previous experts.
        tasks: task names, to report evaluation metrics per task in multi-task runs.
    """

    def __init__(self, inner: Strategy, spec: Spec, min_valid: int, tasks: list[str]) -> None:
        self.inner, self.spec, self.min_valid, self.tasks = inner, spec, min_valid, tasks
        self.log = RoundLog()
        self._sent_at: dict[int, float] = {}
        self._eval_sent_at: dict[int, float] = {}

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> Validating %d tensors per update; min valid updates per round: %d",
            len(self.spec),
            self.min_valid,
        )
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # FedAvgM keeps its own copy of the global arrays (FedOpt re-reads them every round); keep
        # it equal to what is sent, also after a round whose aggregate this wrapper refused.
        for strategy in (self.inner, getattr(self.inner, "strategy", None)):
            if isinstance(strategy, FedAvgM):
                strategy.current_arrays = arrays
        messages = self.inner.configure_train(server_round, arrays, config, grid)
        self._sent_at[server_round] = time.perf_counter()
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = self.inner.configure_evaluate(server_round, arrays, config, grid)
        self._eval_sent_at[server_round] = time.perf_counter()
        return messages

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies that pass validation; each rejected one is logged with its reason."""
        good, rejected = [], self.log.rejected.setdefault(server_round, [])
        for msg in replies:
            problem = reply_problem(msg, self.spec)
            if problem is None:
                good.append(msg)
                continue
            node = msg.metadata.src_node_id
            rejected.append((node, problem))
            log(
                WARNING, "round %d: rejected the update of node %d: %s", server_round, node, problem
            )
        return good

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = self.screen(server_round, replies)
        if server_round in self._sent_at:
            self.log.phase_seconds[server_round] = time.perf_counter() - self._sent_at[server_round]
        self.log.train_seconds[server_round] = [
            float(m.content[METRICS_KEY].get("train-seconds", 0.0)) for m in good
        ]
        self.log.accepted[server_round] = len(good)
        if len(good) < self.min_valid:
            return self._skip(
                server_round, f"{len(good)} valid updates < min-clients={self.min_valid}"
            )
        try:
            arrays, metrics = self.inner.aggregate_train(server_round, good)
        except InconsistentMessageReplies as err:
            return self._skip(server_round, f"inconsistent replies: {err}")
        if arrays is None:
            return self._skip(server_round, "the strategy produced no aggregate")
        arrays = self._as_spec_dtypes(arrays)
        problems = check_record(arrays, self.spec)
        if problems:
            return self._skip(server_round, "corrupted aggregate: " + "; ".join(problems))
        log(INFO, "round %d: aggregated %d valid updates", server_round, len(good))
        return arrays, metrics

    def _as_spec_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """Some strategies compute in float64; the global experts keep the model's dtypes."""
        out = {}
        for name, array in arrays.items():
            value = array.numpy()
            if name in self.spec and value.dtype != self.spec[name][1]:
                with np.errstate(over="ignore", invalid="ignore"):  # overflow shows up as Inf below
                    value = value.astype(self.spec[name][1])
            out[name] = Array(np.ascontiguousarray(value))
        return ArrayRecord(out)

    def _skip(self, server_round: int, why: str) -> tuple[None, None]:
        self.log.skipped.append(server_round)
        log(WARNING, "round %d: keeping the previous global experts (%s)", server_round, why)
        return None, None

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted metrics per task (``<task>-<metric>``) over replies without errors."""
        if server_round in self._eval_sent_at:
            self.log.eval_seconds[server_round] = (
                time.perf_counter() - self._eval_sent_at[server_round]
            )
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for msg in replies:
            if msg.has_error() or METRICS_KEY not in msg.content.metric_records:
                continue
            metrics = msg.content[METRICS_KEY]
            n, index = metrics.get(NUM_EXAMPLES), int(metrics.get(TASK_KEY, 0))
            if not isinstance(n, (int, float)) or n <= 0 or not 0 <= index < len(self.tasks):
                continue
            for key, value in metrics.items():
                if (
                    key in (NUM_EXAMPLES, TASK_KEY)
                    or not isinstance(value, (int, float))
                    or not math.isfinite(value)
                ):
                    continue
                name = f"{self.tasks[index]}-{key}"
                sums[name] = sums.get(name, 0.0) + value * n
                weights[name] = weights.get(name, 0.0) + n
        return MetricRecord({k: sums[k] / weights[k] for k in sums}) if sums else None


def flower_strategy(cfg: FederationConfig) -> Strategy:
    """The configured Flower strategy (and DP wrapper), sampling every client each round."""
    # Every connected client is sampled (fraction 1.0); the minimums are min-clients so a round
    # still runs when a client has gone away (the server waits for all clients before round 1).
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=cfg.min_clients,
        min_evaluate_nodes=cfg.min_clients,
        min_available_nodes=cfg.min_clients,
        weighted_by_key=NUM_EXAMPLES,
        arrayrecord_key=ARRAYS_KEY,
        configrecord_key=CONFIG_KEY,
    )
    if cfg.strategy == "fedavg":
        base: Strategy = FedAvg(**common)
    elif cfg.strategy == "fedmedian":
        base = FedMedian(**common)
    elif cfg.strategy == "fedtrimmedavg":
        base = FedTrimmedAvg(**common, beta=cfg.trimmed_beta)
    elif cfg.strategy == "krum":
        base = Krum(**common, num_malicious_nodes=cfg.krum_malicious)
    elif cfg.strategy == "fedavgm":
        base = FedAvgM(
            **common,
            server_learning_rate=cfg.server_learning_rate,
            server_momentum=cfg.server_momentum,
        )
    else:
        optimizer = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}[cfg.strategy]
        base = optimizer(
            **common, eta=cfg.server_learning_rate, eta_l=cfg.learning_rate, tau=cfg.server_tau
        )
    return _with_dp(cfg, base)


def _with_dp(cfg: FederationConfig, base: Strategy) -> Strategy:
    noise, clip, n = cfg.dp_noise_multiplier, cfg.dp_clipping_norm, cfg.num_clients
    if cfg.dp == "none":
        return base
    if cfg.dp == "server-fixed":
        return DifferentialPrivacyServerSideFixedClipping(base, noise, clip, n)
    if cfg.dp == "client-fixed":
        return DifferentialPrivacyClientSideFixedClipping(base, noise, clip, n)
    if cfg.dp == "server-adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            base, noise, n, initial_clipping_norm=clip
        )
    return DifferentialPrivacyClientSideAdaptiveClipping(base, noise, n, initial_clipping_norm=clip)


def build_strategy(cfg: FederationConfig, spec: Spec) -> ValidatingStrategy:
    return ValidatingStrategy(flower_strategy(cfg), spec, cfg.min_clients, cfg.task_list)
