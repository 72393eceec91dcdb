"""Run settings of a federation, read once from Flower's run config (``[tool.flwr.app.config]``).

Every field is a run-config key with dashes instead of underscores (``num_rounds`` <->
``num-rounds``); ``flwr run . --run-config "num-rounds=5 tasks='sst2,rte'"`` overrides them.
Flower's run config holds scalars only, so lists (``tasks``) are comma-separated strings. The AdaMix
settings are one ``AdaMixConfig`` (``adamix``), flattened into the run-config keys of ``ADAMIX_KEYS``.

A run federates one task family, GLUE classification or data-to-text generation (``FAMILIES``); the
backbone, the mixture and the clients' learning rate default to the family's. Flower passes every key
of pyproject's table, so there the values of ``FAMILY_DEFAULT_VALUES`` (``backbone = "auto"``,
``rank = 0``, ``lora-alpha = 0``, ``learning-rate = 0``) stand for "the family's default".
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from adamix_zoo.config import AdaMixConfig
from adamix_zoo.generation.nlg_tasks import NLG_TASKS
from adamix_zoo.generation.objective import generation_adamix
from adamix_zoo.glue_tasks import TASKS as GLUE_TASKS, get_task
from adamix_zoo.head_init import HEAD_INITS
from adamix_zoo.runtime import PRECISIONS

# FedAvg-family aggregation, robust aggregation, and server-side optimizers (FedOpt: Reddi et al.).
STRATEGIES = (
    "fedavg", "fedmedian", "fedtrimmedavg", "krum", "fedavgm", "fedadam", "fedyogi", "fedadagrad"
)
DP_MODES = ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
PARTITIONERS = ("iid", "dirichlet")
LR_SCHEDULES = ("linear", "constant")
# How the LoRA factors are aggregated (federation.ranks): each factor averaged on its own, or the
# clients' mean update re-factored by a truncated SVD (FlexLoRA).
AGGREGATIONS = ("factors", "svd")
DRIFT_CONTROLS = ("none", "scaffold")
# A client's AdamW between its rounds (federation.optimizer_state): built anew, or kept in its state.
CLIENT_OPTIMIZER_STATES = ("fresh", "keep")
# How each round's training clients are drawn (federation.sampling): uniformly at random every
# round, or without replacement across rounds (every client once per cycle).
CLIENT_SAMPLINGS = ("uniform", "cyclic")
# A training reply's weight in the average (its ``num-examples``): the client's partition size, the
# examples it trained on this round (at most local-steps x batch-size), 1 for every client, or the
# server's weights that give the round the federation's label mix (federation.label_balance).
CLIENT_WEIGHTINGS = ("partition", "trained", "uniform", "label-balanced")
HEAD_MODES = ("auto", "true", "false")
# Run-config key -> AdaMixConfig field; the seed is the run's own ``seed``.
ADAMIX_KEYS = {"kind": "kind", "num-experts": "num_experts", "rank": "rank", "lora-alpha": "alpha",
               "bottleneck": "bottleneck", "sharing": "sharing", "consistency-weight": "consistency_weight",
               "freeze-shared": "freeze_shared"}  # with sharing=down: exact aggregation (FFA-LoRA)


def federation_adamix() -> AdaMixConfig:
    """The federation's default mixture: LoRA, K=4, rank 8, alpha 16, consistency weight 1."""
    return AdaMixConfig(consistency_weight=1.0)


def generation_federation_adamix() -> AdaMixConfig:
    """The data-to-text recipe's mixture (rank 4, alpha 32, task loss on the first pass), its lm
    consistency weight spelled out: Flower's run config holds no None."""
    mixture = generation_adamix()
    return dataclasses.replace(mixture, consistency_weight=mixture.consistency_weight_for("lm"))


@dataclass(frozen=True)
class FamilyDefaults:
    """A task family's defaults: its backbone, its mixture, whether its tasks have a head, and its
    clients' peak AdamW rate."""

    backbone: str
    mixture: Callable[[], AdaMixConfig]
    has_head: bool
    learning_rate: float


# The rates: GLUE's is bench/federation.py's federated choice on held-out whole training sentences,
# with the LDA head (head-init) at the experts' rate; data-to-text's is its recipe's, at which the
# benchmark's generation case ran.
FAMILIES = {
    "glue": FamilyDefaults("minilm-l6", federation_adamix, has_head=True, learning_rate=1e-3),
    "generation": FamilyDefaults("smollm2-135m", generation_federation_adamix, has_head=False, learning_rate=2e-3),
}
# head-learning-rate -1: an LDA head (head-init) trains at the experts' rate (0 = learning-rate), as the
# benchmark's choice did; a drawn head at the GLUE recipe's 1e-2, which beat the experts' rate there.
AUTO_HEAD_RATE, DRAWN_HEAD_RATE = -1.0, 1e-2
# Run-config values that mean "the default for the run's tasks" (what pyproject's table holds).
FAMILY_DEFAULT_VALUES = {"backbone": "auto", "rank": 0, "lora-alpha": 0.0, "learning-rate": 0.0,
                         "head-init": "auto", "head-learning-rate": AUTO_HEAD_RATE}


def task_family(task: str) -> str:
    """``"glue"`` or ``"generation"``: the family of a task name.

    Raises:
        ValueError: an unknown task; the message lists the known ones of both families.
    """
    if task in NLG_TASKS:
        return "generation"
    try:
        get_task(task)
    except ValueError:
        raise ValueError(
            f"unknown task {task!r}; GLUE tasks: {', '.join(GLUE_TASKS)}; "
            f"data-to-text tasks: {', '.join(NLG_TASKS)}"
        ) from None
    return "glue"


def parse_ranks(text: str) -> list[int]:
    """``"8,4,2"`` -> ``[8, 4, 2]``; ``""`` -> ``[]`` (every client at the global rank).

    Raises:
        ValueError: an entry that is not a positive integer.
    """
    ranks = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"client-ranks: {item!r} is not a positive integer (e.g. '8,4,2')")
        ranks.append(int(item))
    return ranks


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(allowed)}")


@dataclass
class FederationConfig:
    """One federated AdaMix run. ``help`` metadata is the documentation of each run-config key."""

    tasks: str = field(
        default="sst2",
        metadata={
            "help": "GLUE or data-to-text (e2e, webnlg, dart) task, or comma-separated tasks of one "
            "family (multi-task: client i holds tasks[i % T])."
        },
    )
    backbone: str = field(
        default="auto",
        metadata={"help": "Backbone alias or local model folder; 'auto': the task family's "
                  "(GLUE: minilm-l6, data-to-text: smollm2-135m, a causal LM)."},
    )
    num_clients: int = field(
        default=4, metadata={"help": "Clients (SuperNodes / partitions) in the federation."}
    )
    min_clients: int = field(
        default=2,
        metadata={
            "help": "Valid training replies a round needs to aggregate (fewer: the round keeps the "
            "previous experts); also the fewest clients a round samples, whatever the fractions."
        },
    )
    min_available_clients: int = field(
        default=0,
        metadata={
            "help": "Connected clients the server waits for (round-timeout) before round 1; "
            "0 = all num-clients. Later rounds sample from whoever is connected then."
        },
    )
    fraction_train: float = field(
        default=1.0,
        metadata={
            "help": "Share of connected clients sampled to train each round: "
            "max(min-clients, int(fraction x connected)), drawn as client-sampling says."
        },
    )
    client_sampling: str = field(
        default="uniform",
        metadata={"help": "'uniform' (drawn anew every round) or 'cyclic' (without replacement across "
                  "rounds: every connected client once per cycle, in a seeded order)."},
    )
    fraction_evaluate: float = field(
        default=1.0,
        metadata={"help": "Share of connected clients sampled for federated evaluation."},
    )
    evaluate_every: int = field(
        default=1,
        metadata={
            "help": "Federated (client) evaluation every N rounds and at the last round; the "
            "server always evaluates the final global model on the whole validation split."
        },
    )
    num_rounds: int = field(default=3, metadata={"help": "Federated rounds."})
    average_last_rounds: int = field(
        default=0,
        metadata={"help": "Tail averaging (Polyak-Ruppert): the saved and published global adapter is "
                  "the mean of the global experts (and head) of the last N aggregated rounds, which "
                  "smooths out the label skew of the last rounds' few sampled clients; training is "
                  "unchanged. 0 = a quarter of num-rounds (at least 1: the last round's alone below 8 "
                  "rounds). With N > 1 a single-task run also evaluates the last round's model and "
                  "reports it as last_round_metrics."},
    )
    local_steps: int = field(default=20, metadata={"help": "Optimizer steps per client per round."})
    batch_size: int = field(default=16, metadata={"help": "Local batch size."})
    # The defaults below (rate, head rate, FedAvgM momentum 0.6, logit adjustment) are what
    # bench/federation.py chose on held-out training sentences (the rate: FAMILIES).
    learning_rate: float = field(
        default=0.0,
        metadata={"help": "Local AdamW peak learning rate; 0 = the task family's (GLUE 1e-3, data-to-text 2e-3)."},
    )
    head_learning_rate: float = field(
        default=AUTO_HEAD_RATE,
        metadata={"help": "Peak learning rate of the task head (GLUE); 0 = learning-rate; -1 = auto: learning-rate "
                  "for a head that starts as the LDA (head-init), 1e-2 (the GLUE recipe's) for a drawn one."},
    )
    logit_adjustment: float = field(
        default=1.0,
        metadata={"help": "Label-skew correction (GLUE classification): each client's task loss is on "
                  "logits + tau * log(its partition's label frequencies) (logit adjustment, Menon et al. "
                  "ICLR 2021; FedLC, Zhang et al. ICML 2022), so the shared head does not learn a client's "
                  "label prior; predictions use the plain logits. tau; 0 = off. With IID partitions the "
                  "prior is about uniform, a constant shift that changes nothing."},
    )
    lr_schedule: str = field(
        default="linear",
        metadata={"help": "'linear': the recipes' schedule over the whole run (warmup over the first "
                  "warmup-ratio of rounds x local-steps, then linear decay to 0 at the last round), each "
                  "client running its round's slice with a fresh AdamW; 'constant': the peak rate every step."},
    )
    warmup_ratio: float = field(
        default=0.06, metadata={"help": "lr-schedule=linear: share of all steps with a linear warmup."}
    )
    max_length: int = field(default=128, metadata={"help": "Tokenizer truncation length."})
    partitioner: str = field(
        default="iid", metadata={"help": "'iid' or 'dirichlet' (non-IID over labels)."}
    )
    dirichlet_alpha: float = field(
        default=0.5, metadata={"help": "Dirichlet concentration (smaller = more skewed)."}
    )
    train_limit: int = field(
        default=0,
        metadata={"help": "Use N training rows of each task (data-to-text: the first N (source, "
                  "reference) pairs) (0 = all)."},
    )
    eval_limit: int = field(
        default=0,
        metadata={"help": "Use N validation rows of each task (data-to-text: the first N distinct "
                  "sources) (0 = all)."},
    )
    max_new_tokens: int = field(
        default=64,
        metadata={"help": "Data-to-text: tokens generated per source in the final evaluation."},
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of partitions, initial experts, heads, routing and client sampling."}
    )
    adamix: AdaMixConfig | None = field(
        default=None,
        metadata={"help": "The mixture (None: the task family's); run-config keys "
                  + ", ".join(ADAMIX_KEYS) + " change the family's."},
    )
    client_ranks: str = field(
        default="",
        metadata={"help": "Heterogeneous LoRA ranks (HetLoRA / FlexLoRA): comma-separated ranks, client i "
                  "trains ranks[i % n] (each <= rank, the global adapter's); '' = every client at rank."},
    )
    aggregation: str = field(
        default="factors",
        metadata={"help": "'factors' (the strategy averages A and B separately) or 'svd' (the clients' "
                  "mean update re-factored at rank by a truncated SVD, FlexLoRA; fedavg, LoRA with "
                  "sharing 'up' or 'down', not with freeze-shared or server-side DP)."},
    )
    drift_control: str = field(
        default="none",
        metadata={"help": "'none' or 'scaffold': SCAFFOLD's control variates (Karimireddy et al. 2020) correct "
                  "each local gradient towards the federation's mean gradient (federation.scaffold); they "
                  "double what a round moves. Not with dp or client-ranks; it diverged on one of two benchmark seeds "
                  "with the clients' AdamW (docs/FEDERATION.md, 'Drift control')."},
    )
    client_optimizer_state: str = field(
        default="fresh",
        metadata={"help": "'fresh' (a new AdamW every round, as usual in FL) or 'keep' (each client's AdamW "
                  "moments and step count stay in its Context.state between the rounds it trains, as "
                  "DiLoCo's workers keep their inner optimizer; nothing more travels). With 5 of 20 clients a "
                  "round, keep trailed fresh on both benchmark seeds (docs/FEDERATION.md, 'Client optimizer state')."},
    )
    client_weighting: str = field(
        default="uniform",
        metadata={"help": "A training reply's weight in the average: 'uniform' (every reply alike: each "
                  "client ran the same local steps), 'partition' (its partition size, Flower's convention) "
                  "or 'trained' (the examples it trained on this round: at most local-steps x batch-size) "
                  "or 'label-balanced' (one classification task: the server weighs each round's replies so "
                  "that their label mix is the federation's, from label counts the clients send). "
                  "Under label skew uniform led partition on both benchmark seeds (docs/FEDERATION.md, "
                  "'Client weighting')."},
    )
    pooling: str = field(default="mean", metadata={"help": "Head pooling: 'mean' or 'cls'."})
    head_init: str = field(
        default="auto",
        metadata={"help": "The federated head before round 1: 'random', 'lda' (a linear discriminant of the "
                  "backbone's features, from class counts, feature sums and scatter that every client sends "
                  "once, exactly the pooled rows' LDA; federation.head_init; one classification task, a "
                  "federated head, no dp: the statistics are not privatised) or 'auto' (lda where it applies)."},
    )
    head_init_rows: int = field(
        default=2048,
        metadata={"help": "head-init=lda: at most this many of a client's training rows (a seeded draw) go into "
                  "its feature statistics, so a large partition does not hold up round 1 (one forward pass "
                  "per row); 0 = all."},
    )
    federate_head: str = field(
        default="auto",
        metadata={"help": "'auto' (single task: yes; multi-task: no), 'true', 'false'."},
    )
    strategy: str = field(
        default="fedavgm",
        metadata={"help": ", ".join(STRATEGIES) + ". aggregation=svd needs fedavg."},
    )
    server_learning_rate: float = field(
        default=1.0,
        metadata={"help": "fedavgm / fedadam / fedyogi / fedadagrad: server step on the mean update."},
    )
    server_momentum: float = field(default=0.6, metadata={"help": "fedavgm: server momentum."})
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
    precision: str = field(
        default="auto",
        metadata={"help": "Clients' training precision: auto (bf16 autocast where bf16 is fast: CUDA, CPUs "
                  "with AMX / AVX-512 bf16; as the training recipes), bf16 or fp32."},
    )
    round_timeout: float = field(
        default=600.0,
        metadata={
            "help": "Seconds each phase (training, evaluation) of a round waits for replies; "
            "the round goes on with the replies that came in time."
        },
    )
    drop_rate: float = field(
        default=0.0,
        metadata={
            "help": "Fault injection (tests, benchmarks): share of training messages whose "
            "client crashes (an error reply), drawn per (seed, round, partition)."
        },
    )
    straggler_rate: float = field(
        default=0.0,
        metadata={
            "help": "Fault injection: share of training messages delayed by straggler-seconds "
            "before training (past round-timeout: a client that never answers in time)."
        },
    )
    straggler_seconds: float = field(
        default=0.0, metadata={"help": "Fault injection: the delay of a straggling client."}
    )
    output_dir: str = field(
        default="outputs/federation",
        metadata={"help": "Run folder (relative paths: the SuperLink's working directory)."},
    )
    data_dir: str = field(
        default="",
        metadata={"help": "Data root with glue/<task>/*.jsonl and <data-to-text task>/*.jsonl "
                  "('' = $ADAMIX_DATA_DIR)."},
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
        _choice("precision", self.precision, PRECISIONS)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("drift-control", self.drift_control, DRIFT_CONTROLS)
        _choice("client-sampling", self.client_sampling, CLIENT_SAMPLINGS)
        _choice("client-optimizer-state", self.client_optimizer_state, CLIENT_OPTIMIZER_STATES)
        _choice("client-weighting", self.client_weighting, CLIENT_WEIGHTINGS)
        _choice("head-init", self.head_init, ("auto",) + HEAD_INITS)
        if self.drift_control == "scaffold" and (self.dp != "none" or self.client_ranks):
            raise ValueError("drift-control=scaffold works with dp='none' and one rank for all clients: "
                             f"got dp={self.dp!r}, client-ranks={self.client_ranks!r} (the control variates "
                             "would go unclipped, or not fit a smaller rank)")
        if self.logit_adjustment < 0:
            raise ValueError(f"logit-adjustment must be >= 0, got {self.logit_adjustment}")
        head_rate_ok = self.head_learning_rate >= 0 or self.head_learning_rate == AUTO_HEAD_RATE
        if not 0 <= self.warmup_ratio < 1 or not head_rate_ok or self.learning_rate < 0:
            raise ValueError(
                f"learning-rate must be >= 0 (0: the task family's), head-learning-rate >= 0 (0: "
                f"learning-rate) or -1 (auto) and warmup-ratio in [0, 1), got "
                f"{self.learning_rate}, {self.head_learning_rate} and {self.warmup_ratio}"
            )
        _choice("federate-head", str(self.federate_head).lower(), HEAD_MODES)
        self._check_family()
        self._check_ranks()
        for name in ("num_clients", "min_clients", "num_rounds", "local_steps", "batch_size",
                     "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.min_clients > self.num_clients:
            raise ValueError(
                f"min-clients={self.min_clients} exceeds num-clients={self.num_clients}"
            )
        if self.min_available_clients and not (
            self.min_clients <= self.min_available_clients <= self.num_clients
        ):
            raise ValueError(
                f"min-available-clients={self.min_available_clients} must be 0 or between "
                f"min-clients={self.min_clients} and num-clients={self.num_clients}"
            )
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")
        for name in ("drop_rate", "straggler_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.head_init_rows < 0:
            raise ValueError(f"head-init-rows must be >= 0 (0 = all), got {self.head_init_rows}")
        if self.average_last_rounds < 0:
            raise ValueError(f"average-last-rounds must be >= 0 (0 = a quarter of the rounds), got "
                             f"{self.average_last_rounds}")
        if self.evaluate_every < 1 or self.straggler_seconds < 0:
            raise ValueError(
                f"evaluate-every must be >= 1 and straggler-seconds >= 0, got "
                f"{self.evaluate_every} and {self.straggler_seconds}"
            )
        if len(self.task_list) > self.num_clients:
            raise ValueError(
                f"{len(self.task_list)} tasks need at least as many clients, got {self.num_clients}"
            )

    def _check_family(self) -> None:
        """One task family per run; fill in its backbone, mixture and learning rate where left to it."""
        if not self.task_list:
            raise ValueError("tasks must name at least one task")
        families = {t: task_family(t) for t in self.task_list}  # raises naming the known tasks
        if len(set(families.values())) > 1:
            glue = [t for t, f in families.items() if f == "glue"]
            nlg = [t for t, f in families.items() if f == "generation"]
            raise ValueError(
                f"tasks mix GLUE ({', '.join(glue)}) and data-to-text ({', '.join(nlg)}) tasks: "
                "a run federates one task family (they need different backbones)"
            )
        defaults = FAMILIES[self.family]
        if self.backbone == FAMILY_DEFAULT_VALUES["backbone"]:
            self.backbone = defaults.backbone
        if self.adamix is None:
            self.adamix = defaults.mixture()
        if self.learning_rate == FAMILY_DEFAULT_VALUES["learning-rate"]:
            self.learning_rate = defaults.learning_rate
        if not defaults.has_head and str(self.federate_head).lower() == "true":
            raise ValueError("federate-head=true: data-to-text tasks have no head (the LM answers)")
        if self.family == "generation" and self.partitioner != "iid":
            raise ValueError(
                f"partitioner={self.partitioner!r} needs class labels; data-to-text clients use 'iid'"
            )
        if self.client_weighting == "label-balanced" and (
            self.multi_task or self.family != "glue" or get_task(self.task_list[0]).problem != "classification"
        ):
            raise ValueError(f"client-weighting=label-balanced needs one classification task, got "
                             f"tasks={self.tasks!r}")
        lda_applies = (not self.multi_task and self.family == "glue" and self.head_federated and self.dp == "none"
                       and get_task(self.task_list[0]).problem == "classification")
        if self.head_init == "auto":
            self.head_init = "lda" if lda_applies else "random"
        if self.head_init == "lda" and not lda_applies:
            raise ValueError(f"head-init=lda needs one classification task with a federated head and dp='none' "
                             f"(the feature statistics go unprivatised), got tasks={self.tasks!r}, "
                             f"federate-head={self.federate_head!r}, dp={self.dp!r}")
        if self.head_learning_rate == AUTO_HEAD_RATE:
            self.head_learning_rate = 0.0 if self.head_init == "lda" else DRAWN_HEAD_RATE

    def _check_ranks(self) -> None:
        """client-ranks and aggregation=svd: LoRA only, and what the SVD step cannot combine with."""
        mixture = self.adamix
        ranks = parse_ranks(self.client_ranks)  # raises naming a bad entry
        if (ranks or self.aggregation == "svd") and mixture.kind != "lora":
            raise ValueError(f"client-ranks and aggregation=svd need kind='lora', got {mixture.kind!r}")
        if any(r > mixture.rank for r in ranks):
            raise ValueError(f"client-ranks={self.client_ranks!r}: every rank must be <= rank={mixture.rank} "
                             "(the global adapter's)")
        if self.aggregation != "svd":
            return
        if mixture.sharing == "none" and mixture.num_experts > 1:
            raise ValueError("aggregation=svd needs sharing 'up' or 'down': with nothing shared the "
                             "experts' pairwise updates have no common factorisation")
        if mixture.freeze_shared:
            raise ValueError("aggregation=svd re-factors A too: it cannot keep freeze-shared's frozen A")
        if self.strategy != "fedavg" or self.dp.startswith("server"):
            raise ValueError(f"aggregation=svd replaces the mean of the factors: it needs strategy=fedavg "
                             f"without server-side DP, got strategy={self.strategy!r}, dp={self.dp!r}")

    # -- derived views ---------------------------------------------------------------------------
    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    @property
    def multi_task(self) -> bool:
        return len(self.task_list) > 1

    @property
    def family(self) -> str:
        """The run's task family: ``"glue"`` or ``"generation"`` (a key of ``FAMILIES``)."""
        return task_family(self.task_list[0])

    @property
    def head_federated(self) -> bool:
        """Single-task runs federate the head too (else the global model has no usable head)."""
        if not FAMILIES[self.family].has_head:
            return False
        mode = str(self.federate_head).lower()
        return not self.multi_task if mode == "auto" else mode == "true"

    @property
    def local_head(self) -> bool:
        """Each client keeps a head of its own (a family with heads that are not federated)."""
        return FAMILIES[self.family].has_head and not self.head_federated

    @property
    def clients_before_start(self) -> int:
        """Connected clients the server waits for before round 1."""
        return self.min_available_clients or self.num_clients

    @property
    def tail_rounds(self) -> int:
        """Aggregated rounds whose global experts the saved adapter averages (``average-last-rounds``)."""
        return self.average_last_rounds or max(1, self.num_rounds // 4)

    def evaluates(self, server_round: int) -> bool:
        """Whether round ``server_round`` runs federated evaluation (every N rounds, and the last)."""
        return server_round % self.evaluate_every == 0 or server_round == self.num_rounds

    def client_task(self, partition_id: int) -> tuple[str, int, int]:
        """(task, partition of that task, partitions of that task) of client ``partition_id``."""
        tasks = self.task_list
        task = tasks[partition_id % len(tasks)]
        same = [c for c in range(self.num_clients) if c % len(tasks) == partition_id % len(tasks)]
        return task, same.index(partition_id), len(same)

    def client_rank(self, partition_id: int) -> int:
        """The LoRA rank client ``partition_id`` trains (``client-ranks``, else the global rank)."""
        ranks = parse_ranks(self.client_ranks)
        return ranks[partition_id % len(ranks)] if ranks else self.adamix.rank

    @property
    def heterogeneous_ranks(self) -> bool:
        return any(r != self.adamix.rank for r in parse_ranks(self.client_ranks))

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
            "fraction_train": self.fraction_train,
            "client_sampling": self.client_sampling,
            "fraction_evaluate": self.fraction_evaluate,
            "evaluate_every": self.evaluate_every,
            "average_last_rounds": self.tail_rounds,
            "fault_injection": {
                "drop_rate": self.drop_rate,
                "straggler_rate": self.straggler_rate,
                "straggler_seconds": self.straggler_seconds,
            }
            if self.drop_rate or self.straggler_rate
            else None,
            "strategy": self.strategy,
            "aggregation": self.aggregation,
            "drift_control": self.drift_control,
            "client_optimizer_state": self.client_optimizer_state,
            "client_weighting": self.client_weighting,
            "head_init": self.head_init,
            "client_ranks": parse_ranks(self.client_ranks) or None,
            "server_learning_rate": self.server_learning_rate,
            "server_momentum": self.server_momentum,
            "dp": self.dp,
            "partitioner": self.partitioner,
            "dirichlet_alpha": self.dirichlet_alpha if self.partitioner == "dirichlet" else None,
            "local_steps": self.local_steps,
            "lr_schedule": self.lr_schedule,
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
        mixture, types = {}, federation_adamix()  # the types of the keys (all set there)
        for key, name in ADAMIX_KEYS.items():
            if key in run_config:
                mixture[name] = _coerce(key, run_config[key], getattr(types, name))
        values = {k: v for k, v in values.items() if FAMILY_DEFAULT_VALUES.get(k.replace("_", "-")) != v}
        mixture = {n: v for n, v in mixture.items() if FAMILY_DEFAULT_VALUES.get(_key(n)) != v}
        tasks = [t.strip() for t in str(values.get("tasks", cls.tasks)).split(",") if t.strip()]
        if not tasks:
            return cls(**values)  # raises: no task
        base = FAMILIES[task_family(tasks[0])].mixture()
        return cls(**values, adamix=dataclasses.replace(base, **mixture))

    def to_run_config(self) -> dict[str, Any]:
        flat = {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}
        mixture = {key: getattr(self.adamix, name) for key, name in ADAMIX_KEYS.items()}
        return {k: v for k, v in flat.items() if k != "adamix"} | mixture


def _key(name: str) -> str:
    """The run-config key of an AdaMixConfig field."""
    return next(k for k, n in ADAMIX_KEYS.items() if n == name)


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
