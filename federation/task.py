"""The client's work: the AdaMix task model, its data partition, local training and evaluation.

The model follows the project's GLUE convention: AdaMix injected into the bare ``AutoModel``
backbone (frozen), a ``ClassificationHead`` outside it, both in a ``TaskModel``. Data are the
hub-schema jsonl files under ``<data-dir>/glue/<task>/``, partitioned with ``flwr-datasets``
partitioners on a local ``datasets.Dataset`` (nothing is downloaded).
"""

from __future__ import annotations

import copy
import time
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from adamix_zoo import data
from adamix_zoo.backbones import resolve_backbone
from adamix_zoo.evaluation import evaluate_model
from adamix_zoo.glue_tasks import TaskSpec, get_task
from adamix_zoo.heads import TaskModel
from adamix_zoo.loop import train_steps
from adamix_zoo.optim import make_optimizer
from adamix_zoo.runtime import select_device
from adamix_zoo.task_model import build_task_model
from federation.config import FederationConfig
from federation.records import HEAD_PREFIX

if TYPE_CHECKING:
    import datasets


# -- model --------------------------------------------------------------------------------------
@lru_cache(maxsize=2)
def pretrained_backbone(backbone: str) -> torch.nn.Module:
    """The backbone as loaded from disk, once per process (a simulated client's process serves
    every round); each model gets its own copy, so AdaMix injection never touches this one."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(resolve_backbone(backbone))


def build_model(cfg: FederationConfig, task: str, head_seed: int | None = None) -> TaskModel:
    """Frozen backbone + AdaMix (seeded by ``cfg.seed``, identical everywhere) + a fresh head.

    Args:
        head_seed: seed of the head's initialisation (defaults to ``cfg.seed``; multi-task clients
            pass their own, since their heads never meet).
    """
    backbone = copy.deepcopy(pretrained_backbone(cfg.backbone))
    torch.manual_seed(cfg.seed)
    model = build_task_model(backbone, get_task(task), cfg.adamix_config(), cfg.pooling)
    _redraw_head(model, head_seed)
    return model.to(select_device())


def _redraw_head(model: TaskModel, head_seed: int | None) -> None:
    if head_seed is not None:  # re-draw the head alone; the experts keep the shared seed
        torch.manual_seed(head_seed)
        model.head.classifier.reset_parameters()


# per process: (run, task) -> a built model and the initial values of its trainable tensors
_MODELS: dict[tuple, tuple[TaskModel, dict[str, torch.Tensor]]] = {}


def client_model(cfg: FederationConfig, task: str, head_seed: int | None = None) -> TaskModel:
    """``build_model``, but built once per process and (run, task): a simulated client's process
    serves every client, and a backbone copy costs about 0.3 s a message (MiniLM). Later calls
    put the trainable tensors back to their initial values (then re-draw the head as
    ``build_model`` would), so the model is the one ``build_model`` returns; the frozen backbone
    is never trained. Only for clients, which load the round's experts into it right away.
    """
    key = (_run_key(cfg), task)
    if key not in _MODELS:
        if len(_MODELS) >= 4:  # a new run in this process: drop the old one's models
            _MODELS.clear()
        model = build_model(cfg, task)
        _MODELS[key] = model, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model, initial = _MODELS[key]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in initial:
                param.copy_(initial[name])
                param.grad = None
    model.backbone.seed_routing(cfg.seed)
    model.train()
    _redraw_head(model, head_seed)
    return model


def experts_of(model: TaskModel) -> dict[str, torch.Tensor]:
    return model.backbone.adapter_state_dict()


def head_of(model: TaskModel) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.head.state_dict().items()}


def shared_state(model: TaskModel, with_head: bool) -> dict[str, torch.Tensor]:
    """The tensors a round moves: the experts, plus ``head.*`` when the head is federated."""
    state = dict(experts_of(model))
    if with_head:
        state |= {HEAD_PREFIX + k: v for k, v in head_of(model).items()}
    return state


def load_shared_state(model: TaskModel, state: dict[str, torch.Tensor]) -> None:
    """Load received experts (and ``head.*`` tensors, if present).

    Raises:
        ValueError: names or shapes that do not fit this model.
    """
    experts = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    head = {k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    model.backbone.load_adapter_state_dict(experts)
    if head:
        load_head_state(model, head)


def load_head_state(model: TaskModel, head: dict[str, torch.Tensor]) -> None:
    try:
        model.head.load_state_dict(head)
    except RuntimeError as err:
        raise ValueError(f"head tensors do not fit the task head: {err}") from err


# -- data ---------------------------------------------------------------------------------------
_ENCODED: dict[tuple, list[dict[str, Any]]] = {}  # per process: a client's partition, encoded once
_SPLITS: dict[tuple, "datasets.Dataset"] = {}  # per process: a task's split, read once for all clients


def _run_key(cfg: FederationConfig) -> tuple:
    return tuple(sorted(cfg.to_run_config().items()))


def load_split(cfg: FederationConfig, spec: TaskSpec, split: str) -> "datasets.Dataset":
    """One validated split of a GLUE task from the local data folder, subsampled by ``*-limit``.

    Raises:
        FileNotFoundError: the task has no such split in the data folder.
        ValueError: the split is empty or malformed.
    """
    dataset = data.load_split(spec, split, cfg.data_root() / "glue")
    data.validate_split(dataset, spec, split)
    limit = cfg.train_limit if split == "train" else cfg.eval_limit
    return data.subset(dataset, limit, cfg.seed)


def partition(
    cfg: FederationConfig, dataset: "datasets.Dataset", index: int, count: int
) -> "datasets.Dataset":
    """Partition ``index`` of ``count``: flwr-datasets' IID or Dirichlet (label-skewed) partitioner.

    Raises:
        ValueError: a partition index out of range, or Dirichlet on a regression task.
    """
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if not 0 <= index < count:
        raise ValueError(f"partition {index} is out of range for {count} partitions")
    if count == 1:
        return dataset
    if cfg.partitioner == "iid":
        partitioner = IidPartitioner(num_partitions=count)
    else:
        if dataset.features["label"].dtype.startswith("float"):
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


@lru_cache(maxsize=4)
def tokenizer_for(backbone: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_backbone(backbone))


def encoded(
    cfg: FederationConfig, spec: TaskSpec, rows: "datasets.Dataset"
) -> list[dict[str, Any]]:
    """Token ids (unpadded) and ``labels``, one dict per example."""
    return data.encode(rows, spec, tokenizer_for(cfg.backbone), cfg.max_length).features


def client_data(
    cfg: FederationConfig, partition_id: int, split: str
) -> tuple[TaskSpec, list[dict[str, Any]]]:
    """Client ``partition_id``'s task and its encoded ``split`` partition (cached per process)."""
    task, index, count = cfg.client_task(partition_id)
    spec = get_task(task)
    key = (_run_key(cfg), partition_id, split)
    if key not in _ENCODED:
        rows_key = (_run_key(cfg), task, split)
        if rows_key not in _SPLITS:
            if len(_SPLITS) >= 4:  # a new run in this process: drop the old one's splits
                _SPLITS.clear()
            _SPLITS[rows_key] = load_split(cfg, spec, split)
        _ENCODED[key] = encoded(cfg, spec, partition(cfg, _SPLITS[rows_key], index, count))
    return spec, _ENCODED[key]


def collate(
    cfg: FederationConfig, spec: TaskSpec, examples: list[dict[str, Any]]
) -> dict[str, torch.Tensor]:
    pad = tokenizer_for(cfg.backbone).pad_token_id or 0
    batch = data.Collator(pad, spec.problem == "regression")(examples)
    return {k: v.to(select_device()) for k, v in batch.items()}


def batches(
    cfg: FederationConfig, spec: TaskSpec, examples: list[dict[str, Any]], seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (a new permutation per pass over the partition)."""
    if not examples:
        raise ValueError(f"{spec.name}: this client's partition is empty")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(examples))
        for start in range(0, len(order), cfg.batch_size):
            yield collate(cfg, spec, [examples[i] for i in order[start : start + cfg.batch_size]])


# -- training and evaluation --------------------------------------------------------------------
def train_round(
    model: TaskModel, cfg: FederationConfig, spec: TaskSpec, data: Iterator[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """One client's local work: ``local-steps`` steps of the project's training step.

    ``adamix_zoo.loop.train_steps`` routes stochastically and adds the consistency loss (the
    weight comes from the model's AdaMix config); a fresh AdamW per round, as usual in FL.

    Returns:
        ``train-loss``, ``train-consistency`` and ``train-seconds`` (the training loop alone).
    """
    optimizer = make_optimizer(model, cfg.learning_rate)
    start = time.perf_counter()
    stats = train_steps(model, data, spec, cfg.local_steps, optimizer, device=select_device())
    seconds = time.perf_counter() - start
    model.eval()
    return {
        "train-loss": stats["loss"],
        "train-consistency": stats["consistency"],
        "train-seconds": seconds,
    }


def evaluate_examples(
    cfg: FederationConfig, spec: TaskSpec, model: TaskModel, examples: list[dict[str, Any]]
) -> dict[str, float]:
    """``eval-loss`` and every metric of the task for the (merged-routing) model on ``examples``.

    Raises:
        ValueError: nothing to evaluate on.
    """
    if not examples:
        raise ValueError(f"{spec.name}: nothing to evaluate on")
    size = max(cfg.batch_size, 32)
    loader = (collate(cfg, spec, examples[s : s + size]) for s in range(0, len(examples), size))
    scores = evaluate_model(model, loader, spec, select_device())
    return {"eval-loss": scores.pop("loss"), **{k: float(v) for k, v in scores.items()}}
