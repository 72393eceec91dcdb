"""Build an entry's payload from a training output folder, and validate payloads without a backbone.

A training run writes ``run_config.json``, ``final_metrics.json``, ``head.safetensors``, optionally
``adamix_experts.safetensors``, and ``merged/`` (``adamix_zoo.io.save_merged``); a generation run
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
from adamix_zoo.config import AdaMixConfig
from adamix_zoo.heads import load_head
from adamix_zoo.io import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    EXPERTS_FILE,
    FINAL_METRICS_FILE,
    HEAD_FILE,
    MERGED_DIR,
    MERGED_KEYS,
    PEFT_PREFIX,
    RUN_CONFIG_FILE,
    read_adapter_config,
    read_experts_config,
    read_safetensors,
)

from registry.metadata import FORMAT_VERSION

RUN_REQUIRED = ("task", "backbone", "backbone_fingerprint", "problem", "label_names", "adamix")
HEADS_DIR = "heads"
LORA_SUFFIXES = tuple(MERGED_KEYS["lora"].values())
ADAPTER_SUFFIXES = tuple(MERGED_KEYS["adapter"].values())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def read_run(run_dir: Path) -> dict[str, Any]:
    """The validated ``run_config.json`` of a training output folder, with its final metrics.

    Raises:
        ValueError: a missing file or field, or a full fine-tuning run (no adapter to publish).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"training output folder {run_dir} does not exist")
    run = _read_json(run_dir / RUN_CONFIG_FILE)
    missing = [k for k in RUN_REQUIRED if k not in run] if isinstance(run, dict) else list(RUN_REQUIRED)
    if missing:
        raise ValueError(f"{run_dir / RUN_CONFIG_FILE}: missing field(s) {', '.join(missing)}")
    if run["adamix"] is None:
        raise ValueError(f"{run_dir} is a full fine-tuning run: it has no adapter to publish")
    run["adamix_config"] = AdaMixConfig.from_dict(run["adamix"])
    metrics_path = run_dir / FINAL_METRICS_FILE
    run["final_metrics"] = _read_json(metrics_path) if metrics_path.exists() else {}
    return run


def group_modules(tensors: dict[str, Any], suffixes: tuple[str, ...], heads: list[str]) -> dict[str, dict]:
    """Merged-file tensors -> {module: {suffix: tensor}}; head tensors (modules_to_save) are skipped.

    Raises:
        ValueError: a key outside the PEFT prefix, an unknown key, or a module missing a tensor.
    """
    modules: dict[str, dict] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"tensor {key!r} lacks the prefix {PEFT_PREFIX!r}")
        name = key[len(PEFT_PREFIX):]
        suffix = next((s for s in suffixes if name.endswith("." + s)), None)
        if suffix is None:
            if any(name.startswith(h + ".") for h in heads):
                continue
            raise ValueError(f"unexpected tensor {key!r} in the merged adapter")
        modules.setdefault(name[: -len(suffix) - 1], {})[suffix] = tensor
    for module, parts in modules.items():
        absent = [s for s in suffixes if s not in parts]
        if absent:
            raise ValueError(f"module {module!r} lacks {', '.join(absent)}")
    return modules


def check_merged_shapes(config: dict[str, Any], tensors: dict[str, Any]) -> None:
    """Check the merged adapter's tensors against its adapter_config (no backbone needed).

    Raises:
        ValueError: wrong rank / bottleneck, inconsistent dimensions, or modules that differ from
            ``target_modules``; the message names the tensor.
    """
    lora = config["peft_type"] == "LORA"
    heads = config.get("modules_to_save") or []
    modules = group_modules(tensors, LORA_SUFFIXES if lora else ADAPTER_SUFFIXES, heads)
    if sorted(modules) != sorted(config["target_modules"]):
        raise ValueError(
            f"merged adapter modules {sorted(modules)[:3]}... differ from target_modules "
            f"{sorted(config['target_modules'])[:3]}..."
        )
    for module, p in modules.items():
        shapes = {k: tuple(v.shape) for k, v in p.items()}
        if lora:
            (r, _), (_, r_b) = shapes["lora_A.weight"], shapes["lora_B.weight"]
            ok = len(shapes["lora_A.weight"]) == 2 and len(shapes["lora_B.weight"]) == 2
            ok = ok and r == r_b == config["r"]
        else:
            m, d = shapes["adapter_down.weight"]
            ok = shapes == {"adapter_down.weight": (m, d), "adapter_down.bias": (m,),
                            "adapter_up.weight": (d, m), "adapter_up.bias": (d,)}
            ok = ok and m == config["bottleneck"]
        if not ok:
            raise ValueError(f"tensors of the wrong shape for module {module!r}: {shapes} (config {config})")


def check_experts(path: Path, merged: dict[str, Any], kind: str) -> None:
    """The unmerged experts must be of the same kind and average to the merged tensors' shapes."""
    config = read_experts_config(path)
    if config.kind != kind:
        raise ValueError(f"{path}: experts of kind {config.kind!r} next to a merged {kind!r} adapter")
    renames = MERGED_KEYS[kind]
    for name, tensor in read_safetensors(path).items():
        module, _, param = name.rpartition(".")
        if param not in renames:
            continue  # heads saved with the experts
        key = f"{PEFT_PREFIX}{module}.{renames[param]}"
        if key not in merged or tuple(tensor.shape[1:]) != tuple(merged[key].shape):
            raise ValueError(
                f"{path}: expert tensor {name} {tuple(tensor.shape)} does not fit the merged adapter"
            )


def head_files(tasks: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Task -> head file of an entry's ``tasks`` metadata; generation tasks have none."""
    return {t: info["head"] for t, info in tasks.items() if info.get("head")}


def validate_payload(folder: Path, heads: dict[str, str]) -> dict[str, Any]:
    """Parse and shape-check every tensor file of an entry folder; returns its adapter_config.

    Raises:
        ValueError: corrupt/truncated safetensors, wrong shapes, or an unreadable head.
    """
    config = read_adapter_config(folder)
    tensors = read_safetensors(folder / ADAPTER_WEIGHTS_FILE)
    check_merged_shapes(config, tensors)
    if (folder / EXPERTS_FILE).exists():
        check_experts(folder / EXPERTS_FILE, tensors, "lora" if config["peft_type"] == "LORA" else "adapter")
    for head in heads.values():
        load_head(folder / head)
    return config


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
    validate_payload(stage, heads)


def run_metadata(run: dict[str, Any], task: str, run_dir: Path) -> dict[str, Any]:
    """adamix.json for a published run (name, files and dates are filled in at commit)."""
    cfg: AdaMixConfig = run["adamix_config"]
    lora = cfg.kind == "lora"
    provenance = {
        "source": "training",
        "run_dir": str(Path(run_dir).resolve()),
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
        "method": f"adamix-{cfg.kind}" if cfg.num_experts > 1 else cfg.kind,
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
        "base_model": {"id": run["backbone"], "path": run.get("backbone_path"),
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
