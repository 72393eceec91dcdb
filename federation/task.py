"""The client's work behind one interface: a task family builds the model, reads and partitions the
data, trains a round of local steps and evaluates.

``client_app`` and ``server_app`` get the run's family from ``family_of(cfg)`` and use only
``TaskFamily``. What every family shares is here: the backbone loaded once per process, the
partitions (``flwr-datasets`` partitioners on a local ``datasets.Dataset``, nothing downloaded), the
shuffled batches, the round of ``local-steps`` in the project's loop (``adamix_zoo.loop``) and the
tensors that travel. Each family's module fills in the rest: ``federation.glue_client`` (AdaMix on a
bare encoder plus a classification head) and ``federation.generation_client`` (AdaMix on a causal LM,
the data-to-text recipe's objective).
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import numpy as np
import torch
from torch import nn

from adamix_zoo.backbones import resolve_backbone
from adamix_zoo.loop import LossFn, train_steps
from adamix_zoo.model import AdaMixModel, is_adapter_param
from adamix_zoo.optim import make_optimizer, make_scheduler
from adamix_zoo.runtime import resolve_precision, select_device
from federation.config import FederationConfig
from federation.optimizer_state import KeptOptimizerState
from federation.records import HEAD_PREFIX

if TYPE_CHECKING:
    import datasets

    from adamix_zoo.head_init import FeatureStatistics

Batch = dict[str, torch.Tensor]


def round_scheduler(cfg: FederationConfig, optimizer: torch.optim.Optimizer, server_round: int):
    """Round ``server_round``'s slice of the run's learning-rate schedule (None: constant).

    ``lr-schedule=linear`` is the training recipes' schedule over all ``num-rounds x local-steps``
    steps, as a centralized run of that many steps has it: a round's local steps are its steps
    ``(round - 1) x local-steps`` onwards, so the last rounds take small steps and the global
    experts settle instead of carrying the clients' last full-rate moves.
    """
    if cfg.lr_schedule == "constant":
        return None
    total = cfg.num_rounds * cfg.local_steps
    return make_scheduler(optimizer, total, int(cfg.warmup_ratio * total),
                          first_step=(server_round - 1) * cfg.local_steps)


# -- what every family loads once per process ----------------------------------------------------
@lru_cache(maxsize=2)
def pretrained_backbone(backbone: str, causal_lm: bool = False) -> nn.Module:
    """The backbone as loaded from disk (bare, or a causal LM with its head), once per process (a
    simulated client's process serves every round); each model gets its own copy, so AdaMix
    injection never touches this one."""
    from transformers import AutoModel, AutoModelForCausalLM

    path = resolve_backbone(backbone)
    if causal_lm:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return AutoModel.from_pretrained(path)


@lru_cache(maxsize=4)
def tokenizer_for(backbone: str):
    """The backbone's tokenizer; a decoder without a pad token pads with eos (the labels mask it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(backbone))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def partition(
    cfg: FederationConfig, dataset: "datasets.Dataset", index: int, count: int
) -> "datasets.Dataset":
    """Partition ``index`` of ``count``: flwr-datasets' IID or Dirichlet (label-skewed) partitioner.

    Raises:
        ValueError: a partition index out of range, or Dirichlet on rows without class labels.
    """
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if not 0 <= index < count:
        raise ValueError(f"partition {index} is out of range for {count} partitions")
    if count == 1:
        return dataset
    if cfg.partitioner == "iid":
        partitioner = IidPartitioner(num_partitions=count)
    else:
        label = dataset.features.get("label")
        if label is None or label.dtype.startswith("float"):
            raise ValueError(
                "Dirichlet partitions need class labels; use partitioner='iid' for regression"
            )
        # at most a tenth of the mean partition: 872 dev rows over 20 clients at alpha 0.5 fail at 10
        min_size = max(1, min(10, len(dataset) // (10 * count)))
        partitioner = DirichletPartitioner(
            num_partitions=count,
            partition_by="label",
            alpha=cfg.dirichlet_alpha,
            min_partition_size=min_size,
            self_balancing=True,
            seed=cfg.seed,
        )
    partitioner.dataset = dataset
    return partitioner.load_partition(index)


@dataclass(frozen=True)
class TaskInfo:
    """What a run folder says about its task (``run_config.json``; generation: ``merged/adamix.json``)."""

    problem: str | None  # classification, regression, lm; None: a multi-task run's shared experts
    label_names: list[str] | None
    prompt_template: str | None = None  # generation tasks: how the served prompt is built


@dataclass
class GlobalEvaluation:
    """The server's final evaluation of the global model on one task."""

    metrics: dict[str, Any]  # "main_metric" and every score
    examples: list[Any] | None = None  # generation: the scored sources and their references
    outputs: list[str] | None = None  # generation: what the model wrote for each


# Per process (a simulated client's process serves every client of the run), each bounded to a few
# runs: a client's partition encoded once, a task's split read once, a model built once.
_ENCODED: dict[tuple, list[dict[str, Any]]] = {}
_SPLITS: dict[tuple, "datasets.Dataset"] = {}
_MODELS: dict[tuple, tuple[nn.Module, dict[str, torch.Tensor]]] = {}
_CACHED_RUNS = 4


def _run_key(cfg: FederationConfig) -> tuple:
    return tuple(sorted(cfg.to_run_config().items()))


def _bounded(cache: dict) -> dict:
    if len(cache) >= _CACHED_RUNS:  # a new run in this process: drop the old ones' entries
        cache.clear()
    return cache


class TaskFamily(ABC):
    """One family of tasks (GLUE classification, data-to-text generation) in the federation."""

    name: ClassVar[str]
    weight_decay: ClassVar[float] = 0.01  # the clients' AdamW

    # -- model ------------------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, cfg: FederationConfig, task: str, head_seed: int | None = None) -> nn.Module:
        """Frozen backbone + AdaMix (seeded by ``cfg.seed``, identical everywhere) (+ a fresh head,
        drawn from ``head_seed`` when given: multi-task clients' heads never meet)."""

    def client_model(self, cfg: FederationConfig, task: str, head_seed: int | None = None) -> nn.Module:
        """``build_model``, built once per process and (run, task): a backbone copy costs about 0.3 s
        a message (MiniLM). Later calls put the trainable tensors back to their initial values (and
        re-draw the head as ``build_model`` would), so the model is the one ``build_model`` returns;
        the frozen backbone is never trained. For clients only, which load the round's experts next.
        """
        key = (_run_key(cfg), task)
        if key not in _MODELS:
            model = self.build_model(cfg, task)
            initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            _bounded(_MODELS)[key] = model, initial
        model, initial = _MODELS[key]
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in initial:
                    param.copy_(initial[name])
                    param.grad = None
        self.adamix_model(model).seed_routing(cfg.seed)
        model.train()
        if head_seed is not None:
            self.redraw_head(model, head_seed)
        return model

    def redraw_head(self, model: nn.Module, head_seed: int) -> None:
        """Draw the head alone again from ``head_seed``; the experts keep the run's seed."""
        raise ValueError(f"{self.name} models have no head to draw")

    @abstractmethod
    def adamix_model(self, model: nn.Module) -> AdaMixModel:
        """The ``AdaMixModel`` inside a model of this family: where the experts live."""

    def head(self, model: nn.Module) -> nn.Module | None:
        """The task head saved with a run folder; None: the family has none."""
        return None

    def head_of(self, model: nn.Module) -> dict[str, torch.Tensor]:
        head = self.head(model)
        return {} if head is None else {k: v.detach() for k, v in head.state_dict().items()}

    def load_head_state(self, model: nn.Module, head: dict[str, torch.Tensor]) -> None:
        """Raises ValueError: head tensors that do not fit the task head (or a family without one)."""
        if self.head(model) is None:
            raise ValueError(f"{self.name} models have no head, got {len(head)} head tensors")
        try:
            self.head(model).load_state_dict(head)
        except RuntimeError as err:
            raise ValueError(f"head tensors do not fit the task head: {err}") from err

    def shared_state(self, model: nn.Module, with_head: bool) -> dict[str, torch.Tensor]:
        """The tensors a round moves: the experts, plus ``head.*`` when the head is federated."""
        state = dict(self.adamix_model(model).adapter_state_dict())
        if with_head:
            state |= {HEAD_PREFIX + k: v for k, v in self.head_of(model).items()}
        return state

    def trainable_shared(self, model: nn.Module, with_head: bool) -> dict[str, nn.Parameter]:
        """The parameters behind the travelling tensors that train (frozen ones left out), by their
        names on the wire."""
        params = {n: p for n, p in self.adamix_model(model).model.named_parameters()
                  if is_adapter_param(n) and p.requires_grad}
        head = self.head(model) if with_head else None
        if head is not None:
            params |= {HEAD_PREFIX + n: p for n, p in head.named_parameters() if p.requires_grad}
        return params

    def load_shared_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load received experts (and ``head.*`` tensors, if present).

        Raises:
            ValueError: names or shapes that do not fit this model.
        """
        experts = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
        head = {k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
        self.adamix_model(model).load_adapter_state_dict(experts)
        if head:
            self.load_head_state(model, head)

    def save_client_head(self, model: nn.Module, path: str) -> None:
        """Save a client's own (not federated) head where the server collects it."""
        raise ValueError(f"{self.name} models have no head to save")

    def feature_statistics(
        self, cfg: FederationConfig, task: str, model: nn.Module, examples: list[dict[str, Any]]
    ) -> "FeatureStatistics":
        """The head's input features of ``examples``, summed (``head-init=lda``)."""
        raise ValueError(f"{self.name} models have no classification head to initialise")

    # -- data -------------------------------------------------------------------------------------
    def label_counts(self, task: str, examples: list[dict[str, Any]]) -> list[int]:
        """How many of ``examples`` hold each class label (``client-weighting=label-balanced``)."""
        raise ValueError(f"{self.name} tasks have no class labels to count")

    @abstractmethod
    def load_rows(self, cfg: FederationConfig, task: str, split: str) -> "datasets.Dataset":
        """The rows of ``split`` that the task's clients partition among them (``*-limit`` applied).

        Raises:
            FileNotFoundError or ValueError: no such split in the data folder, or a malformed one.
        """

    def check_splits(self, cfg: FederationConfig) -> None:
        """Read every split the run's clients and server will read, so that a missing or malformed
        one fails before any Flower process starts (inside the run, every client would fail instead).

        Raises:
            FileNotFoundError or ValueError: naming the task and split.
        """
        for task in cfg.task_list:
            for split in ("train", "validation"):
                self.load_rows(cfg, task, split)

    @abstractmethod
    def encode(self, cfg: FederationConfig, task: str, rows: "datasets.Dataset") -> list[dict[str, Any]]:
        """Token ids (unpadded) and ``labels``, one dict per example."""

    @abstractmethod
    def collate(self, cfg: FederationConfig, task: str, examples: list[dict[str, Any]]) -> Batch:
        """A padded batch on the device."""

    def client_data(self, cfg: FederationConfig, partition_id: int, split: str) -> tuple[str, list[dict[str, Any]]]:
        """Client ``partition_id``'s task and its encoded ``split`` partition (cached per process)."""
        task, index, count = cfg.client_task(partition_id)
        key = (_run_key(cfg), partition_id, split)
        if key not in _ENCODED:
            rows_key = (_run_key(cfg), task, split)
            if rows_key not in _SPLITS:
                _bounded(_SPLITS)[rows_key] = self.load_rows(cfg, task, split)
            _ENCODED[key] = self.encode(cfg, task, partition(cfg, _SPLITS[rows_key], index, count))
        return task, _ENCODED[key]

    def batches(
        self, cfg: FederationConfig, task: str, examples: list[dict[str, Any]], seed: int
    ) -> Iterator[Batch]:
        """Endless shuffled batches (a new permutation per pass over the partition)."""
        if not examples:
            raise ValueError(f"{task}: this client's partition is empty")
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(len(examples))
            for start in range(0, len(order), cfg.batch_size):
                yield self.collate(cfg, task, [examples[i] for i in order[start : start + cfg.batch_size]])

    # -- training and evaluation -------------------------------------------------------------------
    @abstractmethod
    def loss_fn(self, model: nn.Module, cfg: FederationConfig, task: str, examples: list[dict[str, Any]]) -> LossFn:
        """The training loss (task loss + the mixture's consistency term) on this client's
        ``examples``, a hook of the loop."""

    def train_round(
        self, model: nn.Module, cfg: FederationConfig, task: str, examples: list[dict[str, Any]], seed: int,
        server_round: int = 1, after_backward: Callable[[], None] | None = None,
        kept: KeptOptimizerState | None = None,
    ) -> dict[str, float]:
        """One client's local work: ``local-steps`` steps of ``adamix_zoo.loop.train_steps``.

        Routing, dropout and batch order are seeded by ``seed`` (distinct per client and round); a
        fresh AdamW per round, as usual in FL, at the learning rates of round ``server_round``'s slice
        of the run's schedule (``round_scheduler``). ``after_backward``: the loop's hook of that name
        (SCAFFOLD's gradient correction). ``kept``: the client's AdamW state from its previous
        rounds, restored into this round's AdamW and updated in place after it
        (``client-optimizer-state=keep``).

        Returns:
            ``train-loss``, ``train-consistency`` and ``train-seconds`` (the training loop alone).
        """
        self.adamix_model(model).seed_routing(seed)
        torch.manual_seed(seed)  # dropout
        data = self.batches(cfg, task, examples, seed)
        optimizer = make_optimizer(model, cfg.learning_rate, weight_decay=self.weight_decay,
                                   head_lr=cfg.head_learning_rate or None)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if kept is not None:
            kept.restore(optimizer, trainable)
        start = time.perf_counter()
        device = select_device()
        stats = train_steps(model, data, None, cfg.local_steps, optimizer, round_scheduler(cfg, optimizer, server_round),
                            device=device, precision=resolve_precision(cfg.precision, device),
                            loss_fn=self.loss_fn(model, cfg, task, examples), after_backward=after_backward)
        seconds = time.perf_counter() - start
        if kept is not None:
            kept.capture(optimizer, trainable)
        model.eval()
        return {
            "train-loss": stats["loss"],
            "train-consistency": stats["consistency"],
            "train-seconds": seconds,
        }

    @abstractmethod
    def evaluate(
        self, cfg: FederationConfig, task: str, model: nn.Module, examples: list[dict[str, Any]]
    ) -> dict[str, float]:
        """A client's evaluation of the (merged-routing) model on its partition: ``eval-loss`` and
        whatever else is cheap.

        Raises:
            ValueError: nothing to evaluate on.
        """

    @abstractmethod
    def evaluate_global(self, cfg: FederationConfig, model: nn.Module, task: str) -> GlobalEvaluation:
        """The server's final evaluation of the global model on the task's validation rows."""

    # -- output -----------------------------------------------------------------------------------
    @abstractmethod
    def describe(self, cfg: FederationConfig, task: str | None) -> TaskInfo:
        """The task's problem, labels and prompt; ``task`` None: a multi-task run's shared experts."""

    @abstractmethod
    def data_source(self, cfg: FederationConfig) -> Path:
        """The folder the family's tasks are read from (recorded in run_config.json)."""

    @abstractmethod
    def task_model(
        self, cfg: FederationConfig, task: str, experts: dict[str, torch.Tensor], out: Path
    ) -> nn.Module | None:
        """Multi-task runs: the global experts as a model of ``task`` on this machine (with the head
        a local client saved under ``out``, where the family has heads), or None when there is none."""


# family -> (module, attribute) of its implementation; imported on first use
FAMILY_IMPLEMENTATIONS = {
    "glue": ("federation.glue_client", "GLUE"),
    "generation": ("federation.generation_client", "GENERATION"),
}


def family_of(cfg: FederationConfig) -> TaskFamily:
    """The implementation of the run's task family (``cfg.family``)."""
    module, name = FAMILY_IMPLEMENTATIONS[cfg.family]
    return getattr(importlib.import_module(module), name)
