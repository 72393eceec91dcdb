"""The generated model card ``README.md`` of a registry entry (its ``adamix.json`` rendered)."""

from __future__ import annotations

import json
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


def model_card(meta: dict[str, Any]) -> str:
    """A PEFT-style model card: YAML front matter, then what it is, how to load it, provenance."""
    name, base = meta["name"], meta["base_model"]
    ref = f"{name['namespace']}/{name['task']}@{name['version']}"
    lora = meta["kind"] == "lora"
    size = f"rank {meta.get('rank')}" if lora else f"bottleneck {meta.get('bottleneck')}"
    front = ["---", f"base_model: {base.get('id') or 'unknown'}", "library_name: peft" if lora else
             "library_name: adamix-zoo", "tags:", "- adamix", f"- {meta['method']}", "---", ""]
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
        "## How to use", "", "```python",
    ]
    if lora:
        body += ["from peft import PeftModel", "from transformers import AutoModel",
                 f"backbone = AutoModel.from_pretrained({base.get('id')!r})",
                 "model = PeftModel.from_pretrained(backbone, 'this/folder')",
                 "# the task head (see Tasks): adamix_zoo.heads.load_head(<head file>) on the token states"]
    task_arg = f", task={next(iter(meta['tasks']))!r}" if len(meta["tasks"]) > 1 else ""
    body += ["from registry import Store  # or, with adamix-zoo: one call that checks the fingerprint",
             f"task_model = Store().attach({ref!r}, AutoModel.from_pretrained(...){task_arg})",
             "```", ""]
    if not lora:
        body += [ADAPTER_FORMAT_NOTE]
    provenance = json.dumps(meta["provenance"], indent=2, sort_keys=True)
    body += ["## Provenance", "", "```json", provenance, "```", "", "## Files", "",
             "Each is listed with its sha256 in `adamix.json`, checked on every read and pull.", ""]
    body += [f"- `{n}`" for n in sorted(meta["files"]) if n != MODEL_CARD_FILE]
    return "\n".join(front + body) + "\n"
