"""Training output folders built from tiny random models, as adamix_zoo's training writes them.

The registry tests publish from these, so they depend only on the on-disk contract, not on the
training code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adamix_zoo import AdaMixConfig, AdaMixModel, save_experts, save_merged
from adamix_zoo.backbones import fingerprint
from adamix_zoo.formats.files import EXPERTS_FILE, HEAD_FILE
from adamix_zoo.heads import ClassificationHead, TaskModel, save_head
from tests.tiny import tiny_model

TINY_BACKBONE = "tiny-bert"


def _perturb(params, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def trained_task_model(kind: str = "lora", seed: int = 0, num_labels: int = 2, backbone_seed: int = 0,
                       **cfg) -> TaskModel:
    """A tiny bert (bare AutoModel) with a trained-looking AdaMix mixture (K=3) and a head."""
    config = AdaMixConfig(kind=kind, num_experts=cfg.pop("num_experts", 3), **cfg)
    model = AdaMixModel(tiny_model("bert", head="base", seed=backbone_seed), config)
    _perturb([p for p in model.parameters() if p.requires_grad], seed)
    torch.manual_seed(seed)
    head = ClassificationHead(32, num_labels, dropout=0.0)
    return TaskModel(model, head).eval()


def write_run(run_dir: Path, task_model: TaskModel, task: str = "sst2", labels=("negative", "positive"),
              metrics: dict | None = None, backbone_seed: int = 0) -> Path:
    """Write the training-output contract for ``task_model`` into ``run_dir``."""
    run_dir = Path(run_dir)
    model: AdaMixModel = task_model.backbone
    save_experts(model, run_dir / EXPERTS_FILE)
    save_merged(model, run_dir / "merged", base_model=TINY_BACKBONE)
    save_head(task_model.head, run_dir / HEAD_FILE)
    save_head(task_model.head, run_dir / "merged" / HEAD_FILE)
    metrics = metrics or {"main_metric": "accuracy", "best_step": 10, "accuracy": 0.75}
    run = {
        "task": task, "method": "adamix", "backbone": TINY_BACKBONE, "backbone_path": None,
        "backbone_fingerprint": fingerprint(tiny_model("bert", head="base", seed=backbone_seed)),
        "problem": "classification" if len(labels) > 1 else "regression", "label_names": list(labels),
        "adamix": model.config.to_dict(), "train": {"steps": 10, "lr": 1e-3}, "seed": 0,
        "data": {"source": "tiny", "train_size": 8, "validation_size": 4, "few_shot": None},
    }
    (run_dir / "run_config.json").write_text(json.dumps(run))
    (run_dir / "final_metrics.json").write_text(json.dumps(metrics))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 10, "accuracy": 0.75}) + "\n")
    return run_dir


def make_run(run_dir: Path, task: str = "sst2", kind: str = "lora", seed: int = 0, **cfg) -> Path:
    return write_run(run_dir, trained_task_model(kind, seed, **cfg), task)
