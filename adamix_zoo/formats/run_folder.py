"""The output folder of a run (training, data-to-text, federation): what the registry publishes from.

Layout::

    run_config.json        task, method, backbone(+path, fingerprint), problem, label_names, adamix,
                           train, seed, data (+ world_size, prompt_template or federation)
    metrics.jsonl          one record per evaluation or logged step
    generations.jsonl      data-to-text: every scored output with its source and references
    final_metrics.json     {"main_metric": name, "best_step": step, <metric>: value, ...}
    adamix_experts.safetensors, head.safetensors, merged/ (adapter files + head.safetensors; a
                           generation adapter has no head and an adamix.json with its prompt template)
    full_model.safetensors instead of the adapter files for full fine-tuning
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from adamix_zoo.formats.experts import save_experts
from adamix_zoo.formats.files import (
    EXPERTS_FILE,
    FINAL_METRICS_FILE,
    FULL_MODEL_FILE,
    GENERATIONS_FILE,
    HEAD_FILE,
    MERGED_DIR,
    METADATA_FILE,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    read_json,
    write_json,
)
from adamix_zoo.formats.merged import save_merged
from adamix_zoo.heads import ClassificationHead, save_head
from adamix_zoo.model import AdaMixModel

RUN_REQUIRED = ("task", "backbone", "backbone_fingerprint", "problem", "label_names", "adamix")


def run_config(
    *,
    task: str,
    method: str,
    backbone: str,
    backbone_path: str,
    backbone_fingerprint: str,
    problem: str | None,
    label_names: list[str] | None,
    adamix: dict[str, Any] | None,
    train: dict[str, Any],
    seed: int,
    data: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """``run_config.json``: every field the registry reads (``RUN_REQUIRED``), plus ``extra``."""
    return {"task": task, "method": method, "backbone": backbone, "backbone_path": backbone_path,
            "backbone_fingerprint": backbone_fingerprint, "problem": problem, "label_names": label_names,
            "adamix": adamix, "train": train, "seed": seed, "data": data, **extra}


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The ``run_config.json`` of a run folder, with its required fields checked.

    Raises:
        ValueError: the file is unreadable or lacks a field of ``RUN_REQUIRED``.
    """
    run = read_json(Path(run_dir) / RUN_CONFIG_FILE)
    missing = [k for k in RUN_REQUIRED if k not in run] if isinstance(run, dict) else list(RUN_REQUIRED)
    if missing:
        raise ValueError(f"{Path(run_dir) / RUN_CONFIG_FILE}: missing field(s) {', '.join(missing)}")
    return run


class RunFolder:
    """Writes one run folder; file names are the contract the registry and ``load_run`` read."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)

    def start(self, config: dict[str, Any]) -> None:
        """Write run_config.json and an empty metrics.jsonl."""
        (self.out / METRICS_FILE).write_text("")
        self.write_json(RUN_CONFIG_FILE, config)

    def write_json(self, name: str, data: Any) -> None:
        write_json(self.out / name, data)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_final(self, metrics: dict[str, Any]) -> None:
        self.write_json(FINAL_METRICS_FILE, metrics)

    def save_adapter(self, model: AdaMixModel, base_model: str, head: ClassificationHead | None = None) -> Path:
        """Experts, the merged adapter and (classification) the head, at the top and in merged/."""
        save_experts(model, self.out / EXPERTS_FILE)
        merged = save_merged(model, self.out / MERGED_DIR, base_model=base_model)
        if head is not None:
            save_head(head, self.out / HEAD_FILE)
            save_head(head, merged / HEAD_FILE)
        return merged

    def save_lm_adapter(
        self, model: AdaMixModel, base_model: str, task: str, base_fingerprint: str, prompt_template: str
    ) -> Path:
        """A generation adapter: experts and merged/ (no head), plus merged/adamix.json, what a serving
        engine needs to attach the merged folder as a generation task."""
        merged = self.save_adapter(model, base_model)
        self.write_json(f"{MERGED_DIR}/{METADATA_FILE}", {
            "task": task, "problem": "lm", "prompt_template": prompt_template,
            "base_model": {"id": base_model, "fingerprint": base_fingerprint},
        })
        return merged

    def write_generations(self, examples: Iterable[Any], outputs: Iterable[str]) -> None:
        """generations.jsonl: one line per scored input (``examples``: ``source`` and ``references``)."""
        with open(self.out / GENERATIONS_FILE, "w") as f:
            for e, o in zip(examples, outputs):
                f.write(json.dumps({"source": e.source, "output": o, "references": list(e.references)}) + "\n")

    def save_full(self, model: nn.Module, head: ClassificationHead) -> None:
        """Full fine-tuning: the whole model's state and the head."""
        from safetensors.torch import save_file

        save_head(head, self.out / HEAD_FILE)
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(self.out / FULL_MODEL_FILE), metadata={"format": "pt"})
