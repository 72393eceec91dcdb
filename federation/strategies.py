"""Server strategies over the adapter experts: Flower's own, behind a validating wrapper.

``ValidatingStrategy`` screens every training reply before Flower's strategy sees it (error
replies, wrong or extra tensor names, wrong shapes or dtypes, NaN/Inf, a bad ``num-examples``),
logs and drops the bad ones, aggregates the rest when at least ``min_valid`` remain, and checks the
aggregate once more: a round that cannot produce a clean aggregate keeps the previous global
experts, so a corrupted aggregate is never adopted (and so never saved or published).

One client's influence is bounded: its update (its distance from the global experts sent this
round) is clipped to ``max_norm_ratio`` times the median of the other clients' update norms, and
its ``num-examples`` to ``max_weight_ratio`` times the median of the others' (training and
evaluation alike). No client-supplied value can end the run: a reply the checks refuse is
dropped, and a strategy that fails on the rest skips the round.

Every aggregated round also records how far averaging the LoRA factors is from averaging the
clients' updates (``federation.exactness``). Tensors that must never train (FFA-LoRA's frozen
shared A) travel, are checked bitwise against what was sent, and are put back into the aggregate
as sent (so neither rounding, a server optimizer nor DP noise moves them). Clients of smaller LoRA
ranks and the SVD re-factoring of the mean update are ``federation.ranks``'. Each round's clients
are sampled in partition order with a seeded generator (``federation.sampling``), so one seed trains
the same clients in every run. ``tail_average`` is the mean of the last aggregates (tail averaging).
SCAFFOLD's control variates travel beside the experts (``federation.scaffold``); label-balanced
weights come from ``federation.label_balance``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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

from adamix_zoo.glue_tasks import get_task
from federation import exactness, ranks
from federation.bounds import capped
from federation.config import FederationConfig
from federation.label_balance import LABEL_COUNTS, LabelMix, counts_problem
from federation.records import Spec, check_record
from federation.sampling import ClientOrder
from federation.scaffold import DELTA_KEY, ServerControl

ARRAYS_KEY, METRICS_KEY, CONFIG_KEY = "arrays", "metrics", "config"
NUM_EXAMPLES = "num-examples"
TASK_KEY = "task-index"  # evaluation replies say which task (of cfg.task_list) they measured


@dataclass
class RoundLog:
    """What happened to the updates of the federation, round by round."""

    rejected: dict[int, list[tuple[int, str]]] = field(default_factory=dict)  # round -> (node, why)
    accepted: dict[int, int] = field(default_factory=dict)  # round -> updates aggregated
    skipped: list[int] = field(default_factory=list)  # rounds that kept the previous experts
    clipped: dict[int, list[tuple[int, str]]] = field(default_factory=dict)  # round -> (node, what)
    phase_seconds: dict[int, float] = field(
        default_factory=dict
    )  # round -> train send..aggregate wall time
    eval_seconds: dict[int, float] = field(
        default_factory=dict
    )  # round -> evaluate send..aggregate
    train_seconds: dict[int, list[float]] = field(
        default_factory=dict
    )  # round -> clients' loop times
    client_seconds: dict[int, list[float]] = field(
        default_factory=dict
    )  # round -> clients' whole handler times (loop + set-up + packing)
    aggregation_error: dict[int, dict[str, float]] = field(
        default_factory=dict
    )  # round -> mean / max over LoRA projections of the factor-averaging relative error
    label_weights: dict[int, list[float]] = field(
        default_factory=dict
    )  # round -> the replies' weights under client-weighting=label-balanced (in partition order)

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
            "clipped_updates": {
                r: [{"node": n, "what": what} for n, what in v] for r, v in self.clipped.items() if v
            },
            "round_train_phase_seconds": self.phase_seconds,
            "round_eval_phase_seconds": self.eval_seconds,
            "client_train_seconds": self.train_seconds,
            "client_handler_seconds": self.client_seconds,
            "aggregation_relative_error": self.aggregation_error,
            "label_balanced_weights": self.label_weights,
        }


def reply_problem(msg: Message, spec: Spec, control: ServerControl | None = None,
                  label_mix: LabelMix | None = None) -> str | None:
    """Why a training reply cannot be aggregated, or None when it can (with ``control``: its
    SCAFFOLD control delta too; with ``label_mix``: its label counts)."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    content = msg.content
    expected = [ARRAYS_KEY] + ([DELTA_KEY] if control else [])
    if sorted(content.array_records) != sorted(expected):
        return f"expected the ArrayRecords {expected}, got {list(content.array_records)}"
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
    if label_mix is not None and (problem := counts_problem(content[METRICS_KEY].get(LABEL_COUNTS),
                                                             label_mix.num_labels)):
        return problem
    problems = check_record(content[ARRAYS_KEY], spec)
    if problems:
        return "; ".join(problems)
    return control.problem(msg) if control else None


def _number(value: Any) -> float | None:
    """A client-supplied metric as a finite float, else None (lists, strings, bools, NaN, Inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class ValidatingStrategy(Strategy):
    """Wrap a Flower strategy so only well-formed, finite, bounded updates are aggregated.

    Args:
        inner: the Flower strategy (FedAvg, FedMedian, ..., or a DP wrapper around one).
        spec: expected name -> (shape, dtype) of every tensor an update carries.
        min_valid: updates a round needs to be aggregated; fewer keeps the previous experts.
        tasks: task names, to report evaluation metrics per task in multi-task runs.
        max_norm_ratio: an update's norm (distance from the experts sent) is clipped to this
            times the median of the other updates' norms.
        max_weight_ratio: a reply's ``num-examples`` is clipped to this times the median of the
            others' (so no client decides the aggregate by claiming a huge partition).
        evaluates: whether a round runs federated evaluation (default: every round).
        node_wait: seconds a round waits for ``min_valid`` connected clients before it is
            skipped (Flower's sampling would wait for them forever).
        frozen: names of tensors no client may change (a reply that changed one is rejected).
        heterogeneous: clients of smaller LoRA ranks reply; their factors are brought to the
            global rank, the missing components as sent (``federation.ranks.pad``). False: every
            reply has the global shapes.
        svd_rank: re-factor the clients' mean update at this rank (``federation.ranks.refactor``)
            in place of the strategy's factor average; its truncation error is the round's
            aggregation error. None: the strategy's average is the aggregate.
        order: samples clients reproducibly and aggregates replies in partition order
            (``federation.sampling``). None: Flower's unseeded sampling, replies as they come.
        average_last: how many of the last aggregated rounds' global experts ``tail_average``
            averages.
        control: SCAFFOLD's server control variate (``federation.scaffold``), sent with every
            training message and moved by the valid replies' deltas of every aggregated round.
            None: no drift control.
        label_mix: weigh each round's replies to the federation's label mix from the label counts
            they carry (``federation.label_balance``); a reply without usable counts is rejected.
            None: the replies' own ``num-examples``.
    """

    def __init__(self, inner: Strategy, spec: Spec, min_valid: int, tasks: list[str],
                 max_norm_ratio: float = 10.0, max_weight_ratio: float = 10.0,
                 evaluates: Callable[[int], bool] | None = None, node_wait: float = 600.0,
                 frozen: Iterable[str] = (), heterogeneous: bool = False,
                 svd_rank: int | None = None, order: ClientOrder | None = None,
                 average_last: int = 1, control: ServerControl | None = None,
                 label_mix: LabelMix | None = None) -> None:
        if not max_norm_ratio >= 1 or not max_weight_ratio >= 1:
            raise ValueError("max_norm_ratio and max_weight_ratio must be >= 1")
        self.inner, self.spec, self.min_valid, self.tasks = inner, spec, min_valid, tasks
        self.max_norm_ratio, self.max_weight_ratio = max_norm_ratio, max_weight_ratio
        self.evaluates, self.node_wait = evaluates or (lambda _: True), node_wait
        self.frozen = sorted(frozen)
        if not set(self.frozen) <= set(spec):
            raise ValueError(f"frozen tensors not in the spec: {sorted(set(self.frozen) - set(spec))[:3]}")
        self.projections = exactness.lora_projections(spec)
        self.heterogeneous, self.svd_rank, self.order = heterogeneous, svd_rank, order
        self.control, self.label_mix = control, label_mix
        self._deltas: list[ArrayRecord] = []  # this round's valid replies' control deltas
        self._shapes = {k: shape for k, (shape, _) in spec.items()}
        self._reply_ranks: dict[int, int] = {}  # id of a padded reply -> its rank, this round
        self.log = RoundLog()
        self._sent_at: dict[int, float] = {}
        self._eval_sent_at: dict[int, float] = {}
        self._sent: dict[int, ArrayRecord] = {}  # round -> the global experts sent (for update norms)
        if average_last < 1:
            raise ValueError(f"average_last must be >= 1, got {average_last}")
        self._recent: deque[ArrayRecord] = deque(maxlen=average_last)  # the last aggregates

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
        if not self._enough_clients(server_round, grid, "training"):
            return []
        with self._sampling(grid, server_round, "train") as sampled:
            messages = list(self.inner.configure_train(server_round, arrays, config, sampled))
        if self.control is not None:
            self.control.attach(messages)
        self._sent_at[server_round] = time.perf_counter()
        self._sent = {server_round: arrays}  # only the current round's is needed
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.evaluates(server_round) or not self._enough_clients(server_round, grid, "evaluation"):
            return []
        with self._sampling(grid, server_round, "evaluate") as sampled:
            messages = list(self.inner.configure_evaluate(server_round, arrays, config, sampled))
        self._eval_sent_at[server_round] = time.perf_counter()
        return messages

    @contextmanager
    def _sampling(self, grid: Grid, server_round: int, phase: str) -> Iterator[Grid]:
        """The grid Flower's strategy samples from: ``order``'s seeded view, or ``grid`` itself."""
        if self.order is None:
            yield grid
        else:
            with self.order.sampling(grid, server_round, phase) as ordered:
                yield ordered

    def _enough_clients(self, server_round: int, grid: Grid, phase: str) -> bool:
        """At least ``min_valid`` clients connected, else Flower's sampling would wait forever."""
        connected = connected_nodes(grid, self.min_valid, self.node_wait)
        if connected < self.min_valid:
            log(WARNING, "round %d: only %d clients connected (min-clients=%d): no %s",
                server_round, connected, self.min_valid, phase)
        return connected >= self.min_valid

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies that pass validation; each rejected one is logged with its reason."""
        good, rejected = [], self.log.rejected.setdefault(server_round, [])
        self._reply_ranks, self._deltas = {}, []
        sent = self._sent.get(server_round)
        sent_arrays = {k: v.numpy() for k, v in sent.items()} if self.heterogeneous and sent is not None else None
        for msg in self.order.sort(replies) if self.order else replies:
            if sent_arrays is not None:
                self._pad(msg, sent_arrays)
            problem = (reply_problem(msg, self.spec, self.control, self.label_mix)
                       or self._frozen_problem(server_round, msg))
            if problem is None:
                if self.control is not None:  # Flower's strategy expects the experts' record alone
                    self._deltas.append(msg.content[DELTA_KEY])
                    del msg.content[DELTA_KEY]
                good.append(msg)
                continue
            node = msg.metadata.src_node_id
            rejected.append((node, problem))
            log(
                WARNING, "round %d: rejected the update of node %d: %s", server_round, node, problem
            )
        return good

    def _pad(self, msg: Message, sent: dict[str, np.ndarray]) -> None:
        """A smaller-rank reply brought to the global shapes (missing components from ``sent``,
        this round's global tensors), in place, its rank noted."""
        if msg.has_error() or ARRAYS_KEY not in msg.content.array_records:
            return
        arrays = {k: v.numpy() for k, v in msg.content[ARRAYS_KEY].items()}
        padded = ranks.pad(arrays, sent, self._shapes)
        if any(padded[k] is not arrays[k] for k in arrays):
            self._reply_ranks[id(msg)] = ranks.reply_rank(arrays)
            msg.content[ARRAYS_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in padded.items()})

    def _frozen_problem(self, server_round: int, msg: Message) -> str | None:
        """Which frozen tensors a (well-formed) reply changed from those sent, or None."""
        sent = self._sent.get(server_round)
        if sent is None:
            return None
        changed = [n for n in self.frozen
                   if not np.array_equal(msg.content[ARRAYS_KEY][n].numpy(), sent[n].numpy())]
        return f"changed {len(changed)} frozen tensors (first: {changed[:2]})" if changed else None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = self.screen(server_round, replies)
        if server_round in self._sent_at:
            self.log.phase_seconds[server_round] = time.perf_counter() - self._sent_at[server_round]
        self.log.train_seconds[server_round] = [
            _number(m.content[METRICS_KEY].get("train-seconds", 0.0)) or 0.0 for m in good
        ]
        self.log.client_seconds[server_round] = [
            _number(m.content[METRICS_KEY].get("client-seconds", 0.0)) or 0.0 for m in good
        ]
        self.log.accepted[server_round] = len(good)
        if len(good) < self.min_valid:
            return self._skip(
                server_round, f"{len(good)} valid updates < min-clients={self.min_valid}"
            )
        self._bound(server_round, good)
        if self.label_mix is not None:
            self._balance_labels(server_round, good)
        error = self._factor_averaging_error(good)  # before a DP wrapper clips the replies in place
        try:
            arrays, metrics = self.inner.aggregate_train(server_round, good)
            if arrays is not None and self.svd_rank is not None:
                arrays, error = self._refactored(arrays, good)
        except InconsistentMessageReplies as err:
            return self._skip(server_round, f"inconsistent replies: {err}")
        except Exception as err:  # noqa: BLE001 - a client's values must not end the run
            return self._skip(server_round, f"the strategy failed on the replies: {err!r}")
        if arrays is None:
            return self._skip(server_round, "the strategy produced no aggregate")
        arrays = self._as_spec_dtypes(self._with_frozen(server_round, arrays))
        problems = check_record(arrays, self.spec)
        if problems:
            return self._skip(server_round, "corrupted aggregate: " + "; ".join(problems))
        if error is not None:
            self.log.aggregation_error[server_round] = error
            what = "rank truncation" if self.svd_rank is not None else "factor averaging"
            log(INFO, "round %d: aggregated %d valid updates; dW relative error of %s: "
                "mean %.3g, max %.3g", server_round, len(good), what, error["mean"], error["max"])
        else:
            log(INFO, "round %d: aggregated %d valid updates", server_round, len(good))
        self._recent.append(arrays)
        if self.control is not None:
            self.control.update(self._deltas)
        return arrays, metrics

    def tail_average(self) -> ArrayRecord | None:
        """The mean of the last ``average_last`` aggregates, in the spec's dtypes (None before any).

        Averaging LoRA factors over rounds is not averaging their products, as across clients; late
        rounds' factors differ little (the schedule's last steps are small). Frozen tensors are
        the last aggregate's, bitwise as sent.
        """
        if not self._recent:
            return None
        last = self._recent[-1]
        mean = {name: last[name] if name in self.frozen else
                Array(sum(r[name].numpy().astype(np.float64) for r in self._recent) / len(self._recent))
                for name in last.keys()}
        return self._as_spec_dtypes(ArrayRecord(mean))

    def _with_frozen(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The aggregate with every frozen tensor exactly as sent this round."""
        sent = self._sent.get(server_round)
        if not self.frozen or sent is None:
            return arrays
        return ArrayRecord({k: sent[k] if k in self.frozen else v for k, v in arrays.items()})

    def _refactored(self, arrays: ArrayRecord, replies: list[Message]) -> tuple[ArrayRecord, dict[str, float] | None]:
        """The aggregate with every LoRA projection re-factored from the replies' mean update, and
        the mean / max truncation error over the projections."""
        names = [n for p in self.projections for n in (p.a, p.b)]
        updates = [ranks.zero_beyond({n: m.content[ARRAYS_KEY][n].numpy() for n in names},
                                     self._reply_ranks.get(id(m), self.svd_rank)) for m in replies]
        weights = [float(m.content[METRICS_KEY][NUM_EXAMPLES]) for m in replies]
        factors, errors = ranks.refactor_all(updates, weights, self.projections, self.svd_rank)
        record = ArrayRecord({k: Array(factors[k]) if k in factors else v for k, v in arrays.items()})
        return record, exactness.summary(errors)

    def _factor_averaging_error(self, replies: list[Message]) -> dict[str, float] | None:
        """Mean and max over the LoRA projections of the replies' factor-averaging relative error
        (``federation.exactness``); None without LoRA projections."""
        names = [n for p in self.projections for n in (p.a, p.b)]
        updates = [{n: m.content[ARRAYS_KEY][n].numpy() for n in names} for m in replies]
        weights = [float(m.content[METRICS_KEY][NUM_EXAMPLES]) for m in replies]
        return exactness.summary(exactness.relative_errors(updates, weights, self.projections))

    def _bound(self, server_round: int, replies: list[Message]) -> None:
        """Clip, in place, each reply's update norm and ``num-examples`` against the others'."""
        sent = self._sent.get(server_round)
        base = {k: (sent[k].numpy().astype(np.float64) if sent is not None and k in sent else 0.0)
                for k in self.spec}
        deltas = [{k: m.content[ARRAYS_KEY][k].numpy().astype(np.float64) - base[k] for k in self.spec}
                  for m in replies]
        norms = [math.sqrt(sum(float(np.sum(d * d)) for d in delta.values())) for delta in deltas]
        weights = [float(m.content[METRICS_KEY][NUM_EXAMPLES]) for m in replies]
        bounded = zip(replies, deltas, norms, capped(norms, self.max_norm_ratio),
                      weights, capped(weights, self.max_weight_ratio))
        for msg, delta, norm, limit, weight, weight_limit in bounded:
            node = msg.metadata.src_node_id
            if norm > limit:
                scale = limit / norm
                msg.content[ARRAYS_KEY] = ArrayRecord({
                    k: Array(np.ascontiguousarray((base[k] + scale * delta[k]).astype(self.spec[k][1])))
                    for k in self.spec})
                self._note(server_round, node, f"update norm {norm:.3g} clipped to {limit:.3g}")
            if weight > weight_limit:
                msg.content[METRICS_KEY][NUM_EXAMPLES] = weight_limit
                self._note(server_round, node, f"'{NUM_EXAMPLES}' {weight:.3g} clipped to {weight_limit:.3g}")

    def _balance_labels(self, server_round: int, replies: list[Message]) -> None:
        """Set, in place, each reply's ``num-examples`` to its label-balanced weight."""
        weights = self.label_mix.weights(
            [(m.metadata.src_node_id, m.content[METRICS_KEY][LABEL_COUNTS]) for m in replies])
        for msg, weight in zip(replies, weights):
            msg.content[METRICS_KEY][NUM_EXAMPLES] = float(weight)
        self.log.label_weights[server_round] = [round(float(w), 6) for w in weights]

    def _note(self, server_round: int, node: int, what: str) -> None:
        self.log.clipped.setdefault(server_round, []).append((node, what))
        log(WARNING, "round %d: node %d: %s", server_round, node, what)

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
        usable = []  # (task index, num-examples, metrics) of the replies that make sense
        for msg in self.order.sort(replies) if self.order else replies:
            if msg.has_error() or METRICS_KEY not in msg.content.metric_records:
                continue
            metrics = msg.content[METRICS_KEY]
            n, index = _number(metrics.get(NUM_EXAMPLES)), _number(metrics.get(TASK_KEY, 0))
            if n is None or n <= 0 or index is None or index != int(index) or not 0 <= index < len(self.tasks):
                continue
            usable.append((int(index), n, metrics))
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        counts = capped([n for _, n, _ in usable], self.max_weight_ratio)
        for (index, _, metrics), n in zip(usable, counts):
            for key, raw in metrics.items():
                value = _number(raw)
                if key in (NUM_EXAMPLES, TASK_KEY) or value is None:
                    continue
                name = f"{self.tasks[index]}-{key}"
                sums[name] = sums.get(name, 0.0) + value * n
                weights[name] = weights.get(name, 0.0) + n
        return MetricRecord({k: sums[k] / weights[k] for k in sums}) if sums else None


def flower_strategy(cfg: FederationConfig) -> Strategy:
    """The configured Flower strategy (and DP wrapper), sampling ``fraction-*`` of the clients."""
    # Flower samples max(min nodes, int(fraction x connected)) clients; the minimums are
    # min-clients, so a round still runs when clients have gone away (ValidatingStrategy skips a
    # round with fewer than min-clients connected, where Flower would wait for them forever).
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
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
    frozen = exactness.frozen_names(spec, cfg.adamix)
    svd_rank = cfg.adamix.rank if cfg.aggregation == "svd" else None
    control = ServerControl(spec, frozen, cfg.num_clients) if cfg.drift_control == "scaffold" else None
    label_mix = None
    if cfg.client_weighting == "label-balanced":  # FederationConfig: one classification task
        label_mix = LabelMix(get_task(cfg.task_list[0]).num_labels)
    return ValidatingStrategy(flower_strategy(cfg), spec, cfg.min_clients, cfg.task_list,
                              evaluates=cfg.evaluates, node_wait=cfg.round_timeout, frozen=frozen,
                              heterogeneous=cfg.heterogeneous_ranks, svd_rank=svd_rank,
                              order=ClientOrder(cfg.seed, cyclic=cfg.client_sampling == "cyclic"),
                              average_last=cfg.tail_rounds, control=control, label_mix=label_mix)


def connected_nodes(grid: Grid, count: int, timeout: float) -> int:
    """Connected clients, once ``count`` are (or ``timeout`` seconds have passed)."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    return connected
