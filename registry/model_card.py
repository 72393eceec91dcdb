"""The generated model card ``README.md`` of a registry entry (its ``adamix.json`` rendered)."""

from __future__ import annotations

import json
import re
from typing import Any

from adamix_zoo.formats.files import MODEL_CARD_FILE

# -- model card ------------------------------------------------------------------------------------
ADAPTER_FORMAT_NOTE = """\
### Mixture-of-adapters format (`peft_type: ADAMIX_ADAPTER`)

PEFT has no layer for this adapter, so it does not load with `PeftModel`; load it with
`adamix_zoo.load_merged` (or `adamix-zoo` serving). `adapter_model.safetensors` holds, for each
adapted projection `<module>` with output h (size d), a Houlsby bottleneck applied as
`h + up(act(down(h)))` before the residual LayerNorm, under the keys
`base_model.model.<module>.adapter_down.weight` (m, d), `.adapter_down.bias` (m),
`.adapter_up.weight` (d, m) and `.adapter_up.bias` (d), with m = `bottleneck` and `act` =
`activation` from `adapter_config.json`; `target_modules` lists the adapted projections.
"""


def _metrics_lines(tasks: dict[str, Any]) -> list[str]:
    lines = ["| task | problem | labels | head | metrics |", "|---|---|---|---|---|"]
    for task, info in tasks.items():
        items = (info.get("metrics") or {}).items()
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)
        if not metrics and info.get("source_metrics"):
            source = info["source_metrics"]
            main = source.get("main_metric")
            metrics = f"not measured; source adapter {info.get('source')}: {main}={source.get(main)}"
        labels = ", ".join(map(str, info.get("label_names") or [])) or "-"
        head = f"`{info.get('head')}`"
        lines.append(f"| {task} | {info.get('problem', '-')} | {labels} | {head} | {metrics or '-'} |")
    return lines


def _dataset(task: str) -> tuple[str, str | None] | None:
    """(Hub dataset id, config) a task was trained on (GLUE or a data-to-text task), else None."""
    from adamix_zoo.generation.nlg_tasks import NLG_TASKS
    from adamix_zoo.glue_tasks import TASKS
    name = re.sub(r"-v[0-9A-Za-z._+]+$", "", task)  # a merged entry renames a repeated task sst2-v3
    if name in TASKS:
        return "nyu-mll/glue", name
    if name in NLG_TASKS:
        return NLG_TASKS[name].hub_id, None
    return None


def _pipeline_tag(tasks: dict[str, Any]) -> str:
    return "text-generation" if any(i.get("problem") == "lm" for i in tasks.values()) else "text-classification"


def _model_index(ref: str, tasks: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for task, info in tasks.items():
        data = _dataset(task)
        metrics = [{"type": k, "name": k, "value": float(v)} for k, v in (info.get("metrics") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "best_step"]
        if data is None or not metrics:
            continue
        dataset = {"type": data[0], "name": f"{data[0]} {data[1] or ''}".strip(), "split": "validation"}
        if data[1]:
            dataset["config"] = data[1]
        kind = "text-generation" if info.get("problem") == "lm" else "text-classification"
        results.append({"task": {"type": kind, "name": task}, "dataset": dataset, "metrics": metrics})
    return [{"name": ref, "results": results}] if results else []


def front_matter(meta: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata, as the Hub reads it (base model by Hub id, PEFT, datasets, metrics)."""
    name, lora = meta["name"], meta["kind"] == "lora"
    ref = f"{name['namespace']}/{name['task']}@{name['version']}"
    datasets = sorted({d[0] for d in map(_dataset, meta["tasks"]) if d is not None})
    front: dict[str, Any] = {
        "base_model": meta["base_model"].get("id") or "unknown",
        "base_model_relation": "adapter",
        "library_name": "peft" if lora else "adamix-zoo",
        "pipeline_tag": _pipeline_tag(meta["tasks"]),
        "tags": ["adamix", "lora" if lora else "adapter", meta["method"], "mixture-of-experts",
                 *(["peft"] if lora else [])],
    }
    if datasets:
        front["datasets"] = datasets
    model_index = _model_index(ref, meta["tasks"])
    if model_index:
        front["model-index"] = model_index
    return front


def how_to_use(meta: dict[str, Any]) -> list[str]:
    """Code that runs as written: with PEFT from the Hub (LoRA), or with adamix-zoo from its store."""
    name, base = meta["name"], meta["base_model"].get("id") or "unknown"
    ref = f"{name['namespace']}/{name['task']}@{name['version']}"
    lora, tasks = meta["kind"] == "lora", meta["tasks"]
    auto = "AutoModelForCausalLM" if _pipeline_tag(tasks) == "text-generation" else "AutoModel"
    task_arg = f", task={next(iter(tasks))!r}" if len(tasks) > 1 else ""
    lines = ["```python"]
    if lora:
        lines += ["from peft import PeftModel", f"from transformers import {auto}", "",
                  f"backbone = {auto}.from_pretrained({base!r})",
                  "model = PeftModel.from_pretrained(backbone, ADAPTER)  # this repository's id, or its folder",
                  "```", "", "With adamix-zoo (checks the base model's fingerprint, adds the task head):", "",
                  "```python"]
    lines += [f"from transformers import {auto}", "", "from adamix_zoo.backbones import resolve_backbone",
              "from registry import Store", "",
              f"backbone = {auto}.from_pretrained(resolve_backbone({base!r}))",
              f"task_model = Store().attach({ref!r}, backbone{task_arg})  # after `adamix-zoo pull`",
              "```"]
    return lines


def model_card(meta: dict[str, Any]) -> str:
    """A PEFT-style model card: YAML front matter, then what it is, how to load it, provenance."""
    import yaml

    name, base = meta["name"], meta["base_model"]
    ref = f"{name['namespace']}/{name['task']}@{name['version']}"
    lora = meta["kind"] == "lora"
    size = f"rank {meta.get('rank')}" if lora else f"bottleneck {meta.get('bottleneck')}"
    front = ["---", yaml.safe_dump(front_matter(meta), sort_keys=False).rstrip(), "---", ""]
    what = "mixture of LoRA" if lora else "mixture of adapters"
    if meta["method"] == "cross-task-merge":
        sources = ", ".join(meta["merge"].get("sources", []))
        summary = f"A cross-task merge ({size}) of the AdaMix {what} entries {sources}"
    else:
        summary = (f"A merged AdaMix {what} ({size}, trained with K={meta['num_experts']} experts, "
                   f"sharing={meta.get('sharing')})")
    body = [
        f"# {ref}", "",
        f"{summary} for `{base.get('id')}` (fingerprint `{base['fingerprint'][:16]}...`).",
        f"Merge: `{json.dumps(meta['merge'], sort_keys=True)}`.", "",
        "## Tasks", "", *_metrics_lines(meta["tasks"]), "",
        "## How to use", "", *how_to_use(meta), "",
        "Task heads (see Tasks) are separate files: `adamix_zoo.heads.load_head(<head file>)` applied "
        "to the adapted model's token states.", "",
    ]
    if not lora:
        body += [ADAPTER_FORMAT_NOTE]
    provenance = json.dumps(meta["provenance"], indent=2, sort_keys=True)
    body += ["## Provenance", "", "```json", provenance, "```", "", "## Files", "",
             "Each is listed with its sha256 in `adamix.json`, checked on every read and pull.", ""]
    body += [f"- `{n}`" for n in sorted(meta["files"]) if n != MODEL_CARD_FILE]
    return "\n".join(front + body) + "\n"
