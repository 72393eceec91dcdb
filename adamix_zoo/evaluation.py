"""Evaluation: metrics of a task model on a loader, reloading a run folder, and the paper's analysis
of single adapters against the merged one (AdaMix, Wang et al. 2022, section 4: "a merged model
beats most single experts").
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adamix_zoo.glue_tasks import TaskSpec, get_task
from adamix_zoo.metrics import compute_metrics
from adamix_zoo.model import AdaMixModel
from adamix_zoo.runtime import autocast, resolve_precision, select_device


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: Iterable,
    task: TaskSpec,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """Mean loss and every metric of ``task`` over ``loader`` (model in eval mode, no dropout);
    ``precision="bf16"`` runs the forward under bfloat16 autocast.

    Returns:
        {"loss": ..., <metric>: ...} as plain floats.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    all_logits, all_labels, loss_sum = [], [], 0.0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with autocast(device, precision):
            logits = model(**batch).float()
        if task.problem == "regression":
            loss_sum += F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum").item()
        else:
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        all_logits.append(logits.cpu().numpy())
        all_labels.append(labels.cpu().numpy())
    model.train(was_training)
    logits, labels = np.concatenate(all_logits), np.concatenate(all_labels)
    return {"loss": loss_sum / len(labels), **compute_metrics(task, logits, labels)}


# -- single adapters vs the merged one --------------------------------------------------------------
def _projection(name: str) -> str:
    """Tensors of one projection share an expert choice: '...adamix_down_weight' -> '...adamix_down'."""
    return name.rsplit("_", 1)[0] if name.endswith(("_weight", "_bias")) else name


def single_adapter_state(
    state: dict[str, torch.Tensor], choice: int | torch.Generator
) -> dict[str, torch.Tensor]:
    """An expert state in which every mixed projection holds one expert in all K slots.

    Averaging K copies of one expert is that expert, so evaluating with merged routing evaluates a
    single adapter with exactly the merged adapter's parameter count.

    Args:
        state: ``AdaMixModel.adapter_state_dict()``: name -> (K, ...) (K=1 for shared projections).
        choice: an expert index used everywhere ("fixed"), or a generator drawing one expert per
            projection of every mixture independently ("random").
    """
    picks: dict[str, int] = {}
    out = {}
    for name, tensor in state.items():
        k = tensor.shape[0]
        if k == 1:
            out[name] = tensor.clone()
            continue
        key = _projection(name)
        if key not in picks:
            picks[key] = choice if isinstance(choice, int) else int(torch.randint(k, (1,), generator=choice))
        out[name] = tensor[picks[key]].unsqueeze(0).expand_as(tensor).clone()
    return out


def analyze_experts(
    model: nn.Module,
    loader: Iterable,
    task: TaskSpec,
    num_random: int = 8,
    seed: int = 0,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Evaluate the merged adapter, the K fixed single adapters (expert k everywhere) and
    ``num_random`` single adapters drawn at random per projection; the model is restored after.

    Returns:
        main metric values: "merged", "fixed" (K), "random" (num_random), "median_single" (over
        fixed + random), "merged_minus_median", plus "metric" and "num_experts".

    Raises:
        ValueError: the model has no mixture with more than one expert.
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, AdaMixModel) or backbone.config.num_experts < 2:
        raise ValueError("expert analysis needs an AdaMix backbone with num_experts >= 2")
    routing = (backbone.router.eval_routing, backbone.router.eval_expert)
    backbone.set_eval_routing("merged")
    original = {k: v.clone() for k, v in backbone.adapter_state_dict().items()}
    metric = task.main_metric

    def score(state: dict[str, torch.Tensor]) -> float:
        backbone.load_adapter_state_dict(state)
        return evaluate_model(model, loader, task, device, precision)[metric]

    try:
        merged = evaluate_model(model, loader, task, device, precision)[metric]
        fixed = [score(single_adapter_state(original, k)) for k in range(backbone.config.num_experts)]
        generator = torch.Generator().manual_seed(seed)
        rand = [score(single_adapter_state(original, generator)) for _ in range(num_random)]
    finally:
        backbone.load_adapter_state_dict(original)
        backbone.set_eval_routing(*routing)
    median = statistics.median(fixed + rand)
    return {"metric": metric, "num_experts": backbone.config.num_experts, "merged": merged,
            "fixed": fixed, "random": rand, "median_single": median,
            "merged_minus_median": merged - median}


# -- reloading a run folder ---------------------------------------------------------------------------
def load_run(run_dir: str | Path, merged: bool = False, check_fingerprint: bool = True):
    """Rebuild the trained TaskModel of a ``train`` output folder: (model, run_config).

    Args:
        merged: load ``merged/`` (the single merged adapter) instead of the unmerged experts.
        check_fingerprint: refuse a backbone whose weights differ from the ones trained on.

    Raises:
        FileNotFoundError: not a run folder; ValueError: a different backbone or bad files.
    """
    from safetensors.torch import load_file
    from transformers import AutoModel

    from adamix_zoo.backbones import fingerprint, resolve_backbone
    from adamix_zoo.config import AdaMixConfig
    from adamix_zoo.formats.experts import load_experts
    from adamix_zoo.formats.files import EXPERTS_FILE, FULL_MODEL_FILE, HEAD_FILE, MERGED_DIR, RUN_CONFIG_FILE
    from adamix_zoo.formats.merged import load_merged
    from adamix_zoo.heads import TaskModel, load_head

    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run folder (no {RUN_CONFIG_FILE})")
    config = json.loads((run_dir / RUN_CONFIG_FILE).read_text())
    backbone = AutoModel.from_pretrained(resolve_backbone(config["backbone"]))
    if check_fingerprint and fingerprint(backbone) != config["backbone_fingerprint"]:
        raise ValueError(f"backbone {config['backbone']!r} differs from the one {run_dir} was trained on")
    if config["adamix"] is None:
        model = TaskModel(backbone, load_head(run_dir / HEAD_FILE))
        model.load_state_dict(load_file(str(run_dir / FULL_MODEL_FILE)))
    elif merged:
        model = TaskModel(load_merged(backbone, run_dir / MERGED_DIR),
                          load_head(run_dir / MERGED_DIR / HEAD_FILE))
    else:
        wrapped = AdaMixModel(backbone, AdaMixConfig.from_dict(config["adamix"]), head_modules=[])
        load_experts(wrapped, run_dir / EXPERTS_FILE)
        model = TaskModel(wrapped, load_head(run_dir / HEAD_FILE))
    return model.eval(), config


def run_data_dir(data_dir: str | None, train_args: dict[str, Any]) -> str | None:
    """The data to evaluate a run on: ``data_dir`` when given, else the folder the run trained on
    (run_config.json), else None (the hub)."""
    return data_dir or train_args.get("data_dir")


def evaluate_run(
    run_dir: str | Path,
    data_dir: str | None = None,
    merged: bool = False,
    routing: str = "merged",
    expert: int = 0,
    validation_subset: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    precision: str | None = None,
) -> dict[str, float]:
    """Evaluate a run folder on its task's validation split (as configured at training time);
    ``data_dir`` None reads the run's own (``run_data_dir``); ``precision`` None evaluates in the
    precision the run was evaluated in while training."""
    from transformers import AutoTokenizer

    from adamix_zoo.backbones import resolve_backbone
    from adamix_zoo.data import eval_loader, load_validation

    model, config = load_run(run_dir, merged=merged)
    task, train_args = get_task(config["task"]), config["train"]
    if isinstance(model.backbone, AdaMixModel):
        model.backbone.set_eval_routing(routing, expert)
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(config["backbone"]))
    validation = load_validation(task, run_data_dir(data_dir, train_args), validation_subset, train_args["data_seed"])
    loader = eval_loader(validation, task, tokenizer, train_args["max_length"], batch_size)
    target = select_device(device)
    precision = resolve_precision(precision or train_args.get("precision", "fp32"), target)
    return evaluate_model(model.to(target), loader, task, target, precision)


def analyze_run(
    run_dir: str | Path,
    data_dir: str | None = None,
    num_random: int = 8,
    validation_subset: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """``analyze_experts`` on a run folder's experts (on ``run_data_dir``'s data); writes
    experts_analysis.json and the plot."""
    from transformers import AutoTokenizer

    from adamix_zoo.backbones import resolve_backbone
    from adamix_zoo.data import eval_loader, load_validation
    from adamix_zoo.formats.files import ANALYSIS_FILE, SPREAD_FILE
    from adamix_zoo.plots import plot_expert_spread

    model, config = load_run(run_dir)
    task, train_args = get_task(config["task"]), config["train"]
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(config["backbone"]))
    validation = load_validation(task, run_data_dir(data_dir, train_args), validation_subset, train_args["data_seed"])
    loader = eval_loader(validation, task, tokenizer, train_args["max_length"])
    target = select_device(device)
    precision = resolve_precision(train_args.get("precision", "fp32"), target)
    analysis = analyze_experts(model.to(target), loader, task, num_random, config["seed"], target, precision)
    (Path(run_dir) / ANALYSIS_FILE).write_text(json.dumps(analysis, indent=2) + "\n")
    plot_expert_spread(analysis, Path(run_dir) / SPREAD_FILE, title=config["method"])
    return analysis
