"""GLUE clients: the project's GLUE convention, AdaMix injected into the bare ``AutoModel`` backbone
(frozen) and a ``ClassificationHead`` outside it, both in a ``TaskModel``. Data are the hub-schema
jsonl files under ``<data-dir>/glue/<task>/``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adamix_zoo import data
from adamix_zoo.evaluation import evaluate_model
from adamix_zoo.glue_tasks import get_task
from adamix_zoo.head_init import FeatureStatistics, feature_statistics
from adamix_zoo.heads import ClassificationHead, TaskModel, load_head, save_head
from adamix_zoo.loop import LossFn, task_loss_fn
from adamix_zoo.model import AdaMixModel
from adamix_zoo.runtime import select_device
from adamix_zoo.task_model import build_task_model
from federation.config import FederationConfig
from federation.output import CLIENT_HEADS_DIR
from federation.task import (
    Batch,
    GlobalEvaluation,
    TaskFamily,
    TaskInfo,
    pretrained_backbone,
    tokenizer_for,
)

if TYPE_CHECKING:
    import datasets


def label_counts(examples: list[dict[str, Any]], num_labels: int) -> torch.Tensor:
    """How many examples hold each label."""
    return torch.bincount(torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long),
                          minlength=num_labels)


def label_log_prior(examples: list[dict[str, Any]], num_labels: int) -> torch.Tensor:
    """log of a partition's label frequencies, add-one smoothed (a label it lacks stays finite)."""
    counts = label_counts(examples, num_labels).double()
    return torch.log((counts + 1) / (counts.sum() + num_labels)).float()


class GlueFamily(TaskFamily):
    name = "glue"

    def build_model(self, cfg: FederationConfig, task: str, head_seed: int | None = None) -> TaskModel:
        backbone = copy.deepcopy(pretrained_backbone(cfg.backbone))
        torch.manual_seed(cfg.seed)
        model = build_task_model(backbone, get_task(task), cfg.adamix_config(), cfg.pooling)
        if head_seed is not None:
            self.redraw_head(model, head_seed)
        return model.to(select_device())

    def redraw_head(self, model: TaskModel, head_seed: int) -> None:
        torch.manual_seed(head_seed)
        model.head.classifier.reset_parameters()

    def adamix_model(self, model: TaskModel) -> AdaMixModel:
        return model.backbone

    def head(self, model: TaskModel) -> ClassificationHead:
        return model.head

    def save_client_head(self, model: TaskModel, path: str) -> None:
        save_head(model.head, path)

    # -- data -------------------------------------------------------------------------------------
    def load_rows(self, cfg: FederationConfig, task: str, split: str) -> "datasets.Dataset":
        spec = get_task(task)
        dataset = data.load_split(spec, split, self.data_source(cfg))
        data.validate_split(dataset, spec, split)
        limit = cfg.train_limit if split == "train" else cfg.eval_limit
        return data.subset(dataset, limit, cfg.seed)

    def encode(self, cfg: FederationConfig, task: str, rows: "datasets.Dataset") -> list[dict[str, Any]]:
        return data.encode(rows, get_task(task), tokenizer_for(cfg.backbone), cfg.max_length).features

    def label_counts(self, task: str, examples: list[dict[str, Any]]) -> list[int]:
        spec = get_task(task)
        if spec.problem != "classification":
            raise ValueError(f"{task} is a {spec.problem} task: it has no class labels to count")
        return label_counts(examples, spec.num_labels).tolist()

    def feature_statistics(
        self, cfg: FederationConfig, task: str, model: TaskModel, examples: list[dict[str, Any]]
    ) -> FeatureStatistics:
        return feature_statistics(model, self.inference_batches(cfg, task, examples))

    def inference_batches(self, cfg: FederationConfig, task: str, examples: list[dict[str, Any]]) -> Iterator[Batch]:
        """``examples`` in order, in batches of at least 32 (no gradients: larger than training's)."""
        size = max(cfg.batch_size, 32)
        return (self.collate(cfg, task, examples[s : s + size]) for s in range(0, len(examples), size))

    def collate(self, cfg: FederationConfig, task: str, examples: list[dict[str, Any]]) -> Batch:
        pad = tokenizer_for(cfg.backbone).pad_token_id or 0
        batch = data.Collator(pad, get_task(task).problem == "regression")(examples)
        return {k: v.to(select_device()) for k, v in batch.items()}

    # -- training and evaluation -------------------------------------------------------------------
    def loss_fn(self, model: TaskModel, cfg: FederationConfig, task: str, examples: list[dict[str, Any]]) -> LossFn:
        spec = get_task(task)
        offset = None
        if cfg.logit_adjustment and spec.problem == "classification":
            offset = cfg.logit_adjustment * label_log_prior(examples, spec.num_labels).to(select_device())
        return task_loss_fn(model, spec, logit_offset=offset)

    def evaluate(
        self, cfg: FederationConfig, task: str, model: TaskModel, examples: list[dict[str, Any]]
    ) -> dict[str, float]:
        """``eval-loss`` and every metric of the task."""
        if not examples:
            raise ValueError(f"{task}: nothing to evaluate on")
        scores = evaluate_model(model, self.inference_batches(cfg, task, examples), get_task(task), select_device())
        return {"eval-loss": scores.pop("loss"), **{k: float(v) for k, v in scores.items()}}

    def evaluate_global(self, cfg: FederationConfig, model: TaskModel, task: str) -> GlobalEvaluation:
        """Every metric on the task's (whole, or ``eval-limit``) validation split."""
        scores = self.evaluate(cfg, task, model, self.encode(cfg, task, self.load_rows(cfg, task, "validation")))
        return GlobalEvaluation({"main_metric": get_task(task).main_metric, **scores})

    # -- output -----------------------------------------------------------------------------------
    def describe(self, cfg: FederationConfig, task: str | None) -> TaskInfo:
        if task is None:
            return TaskInfo(None, None)
        spec = get_task(task)
        return TaskInfo(spec.problem, list(spec.label_names))

    def data_source(self, cfg: FederationConfig) -> Path:
        return cfg.data_root() / "glue"

    def task_model(
        self, cfg: FederationConfig, task: str, experts: dict[str, torch.Tensor], out: Path
    ) -> TaskModel | None:
        """The global experts and the head a local client of ``task`` saved (lowest partition id)."""
        heads = sorted(
            (out / CLIENT_HEADS_DIR / task).glob("partition-*.safetensors"),
            key=lambda p: int(p.stem.split("-")[-1]),
        )
        if not heads:
            return None
        model = self.build_model(cfg, task)
        model.backbone.load_adapter_state_dict(experts)
        model.head.load_state_dict(load_head(heads[0]).state_dict())
        return model


GLUE = GlueFamily()
