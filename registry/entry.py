"""Build an entry's payload from a training output folder, and validate payloads without a backbone.

A training run writes ``run_config.json``, ``final_metrics.json``, ``head.safetensors``, optionally
``adamix_experts.safetensors``, and ``merged/`` (``adamix_zoo.formats``); a generation run
(``"problem": "lm"``) has no head: the causal LM's output layer answers, after its prompt template.
Everything copied into an entry is parsed and shape-checked here first, so a corrupt or inconsistent
run is refused before anything is written to the store.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import adamix_zoo
from adamix_zoo.backbones import hub_id
from adamix_zoo.config import AdaMixConfig, method_name
from adamix_zoo.formats.files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    EXPERTS_FILE,
    FINAL_METRICS_FILE,
    FORMAT_VERSION,
    HEAD_FILE,
    MERGED_DIR,
    read_json,
)
from adamix_zoo.formats.merged import check_experts, read_merged
from adamix_zoo.formats.run_folder import read_run_config
from adamix_zoo.heads import load_head

HEADS_DIR = "heads"


def read_run(run_dir: Path) -> dict[str, Any]:
    """The validated ``run_config.json`` of a training output folder, with its final metrics.

    Raises:
        ValueError: a missing file or field, or a full fine-tuning run (no adapter to publish).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"training output folder {run_dir} does not exist")
    run = read_run_config(run_dir)
    if run["adamix"] is None:
        raise ValueError(f"{run_dir} is a full fine-tuning run: it has no adapter to publish")
    run["adamix_config"] = AdaMixConfig.from_dict(run["adamix"])
    metrics_path = run_dir / FINAL_METRICS_FILE
    run["final_metrics"] = read_json(metrics_path) if metrics_path.exists() else {}
    return run


def head_files(tasks: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Task -> head file of an entry's ``tasks`` metadata; generation tasks have none."""
    return {t: info["head"] for t, info in tasks.items() if info.get("head")}


def validate_payload(folder: Path, heads: dict[str, str]) -> dict[str, Any]:
    """Parse and shape-check every tensor file of an entry folder; returns its adapter_config.

    Raises:
        ValueError: corrupt/truncated safetensors, wrong shapes, or an unreadable head.
    """
    merged = read_merged(folder)
    merged.check_shapes()
    if (folder / EXPERTS_FILE).exists():
        check_experts(folder / EXPERTS_FILE, merged.tensors, merged.kind)
    for head in heads.values():
        load_head(folder / head)
    return merged.config


def stage_run(run_dir: Path, stage: Path, run: dict[str, Any], task: str, experts: bool = True) -> None:
    """Copy a run's merged adapter, head and (optionally) experts into ``stage`` and validate them."""
    run_dir = Path(run_dir)
    merged = run_dir / MERGED_DIR
    for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE):
        if not (merged / name).exists():
            raise ValueError(f"{merged / name} is missing: the run has no merged adapter")
        shutil.copyfile(merged / name, stage / name)
    heads = {} if run["problem"] == "lm" else {task: HEAD_FILE}
    if heads:
        head = merged / HEAD_FILE if (merged / HEAD_FILE).exists() else run_dir / HEAD_FILE
        if not head.exists():
            raise ValueError(f"{run_dir} has no {HEAD_FILE}")
        shutil.copyfile(head, stage / HEAD_FILE)
    if experts and (run_dir / EXPERTS_FILE).exists():
        shutil.copyfile(run_dir / EXPERTS_FILE, stage / EXPERTS_FILE)
    config = validate_payload(stage, heads)
    # PEFT and the Hub name the base model by its Hub id, never by a local alias or folder
    config["base_model_name_or_path"] = hub_id(run["backbone"])
    (stage / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def run_metadata(run: dict[str, Any], task: str, run_dir: Path) -> dict[str, Any]:
    """adamix.json for a published run (name, files and dates are filled in at commit)."""
    cfg: AdaMixConfig = run["adamix_config"]
    lora = cfg.kind == "lora"
    provenance = {
        "source": "training",
        "run_dir": Path(run_dir).resolve().name,  # the folder's name only: no local paths published
        "method": run.get("method"),
        "data": run.get("data"),
        "seed": run.get("seed"),
        "train": run.get("train"),
        "federation": run.get("federation"),
        "adamix_zoo_version": adamix_zoo.__version__,
    }
    return {
        "format_version": FORMAT_VERSION,
        "name": {},
        "method": method_name(cfg.kind, cfg.num_experts),
        "kind": cfg.kind,
        "num_experts": cfg.num_experts,
        "rank": cfg.rank if lora else None,
        "alpha": cfg.alpha if lora else None,
        "bottleneck": None if lora else cfg.bottleneck,
        "sharing": cfg.sharing,
        "routing": {"train": f"stochastic (one expert per {cfg.routing})", "eval": cfg.eval_routing},
        "consistency_weight": cfg.consistency_weight_for(run["problem"]) if run.get("problem") else cfg.consistency_weight,
        "adamix_config": cfg.to_dict(),
        "merge": {"method": "expert-average", "note": "A=mean_k A_k, B=mean_k B_k (AdaMix merging)"},
        "base_model": {"id": hub_id(run["backbone"]), "alias": run["backbone"],
                       "fingerprint": run["backbone_fingerprint"]},
        "tasks": {task: _task_metadata(run)},
        "provenance": provenance,
        "files": {},
    }


def _task_metadata(run: dict[str, Any]) -> dict[str, Any]:
    """The entry's description of its task: a head for classification, a prompt for generation."""
    info = {"problem": run["problem"], "label_names": run["label_names"],
            "metrics": run["final_metrics"]}
    if run["problem"] == "lm":
        return dict(info, head=None, prompt_template=run.get("prompt_template"))
    return dict(info, head=HEAD_FILE)
