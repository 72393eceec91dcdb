"""``adamix.json`` (the entry's metadata) and the generated model card ``README.md``.

``adamix.json`` holds everything needed to trust and use an entry without loading it: the method
and its AdaMix settings, the base model id and fingerprint, per-task label names, metrics and head
file, provenance, and the sha256 of every other file in the entry. ``format_version`` is checked
on every read: an entry written by a newer adamix-zoo is refused rather than misread.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from adamix_zoo.io import METADATA_FILE, MODEL_CARD_FILE

FORMAT_VERSION = "1"
SUPPORTED_FORMAT_VERSIONS = ("1",)
REQUIRED_FIELDS = (
    "format_version", "name", "method", "kind", "num_experts", "base_model", "tasks", "merge",
    "provenance", "files",
)
_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def payload_files(folder: Path) -> list[str]:
    """Every file of an entry folder except adamix.json, as sorted posix paths relative to it."""
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(n for n in names if n != METADATA_FILE)


def hash_files(folder: Path) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in payload_files(folder)}


def validate_metadata(meta: Any, where: str = "adamix.json") -> dict[str, Any]:
    """Check the required fields and the format version.

    Raises:
        ValueError: not an object, a missing field, or an unsupported ``format_version``.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: expected a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in meta]
    if missing:
        raise ValueError(f"{where}: missing metadata field(s): {', '.join(missing)}")
    version = str(meta["format_version"])
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(
            f"{where}: format_version {version!r} is not supported by this adamix-zoo "
            f"(reads {', '.join(SUPPORTED_FORMAT_VERSIONS)}); upgrade adamix-zoo to read it"
        )
    base = meta["base_model"]
    if not isinstance(base, dict) or not base.get("fingerprint"):
        raise ValueError(f"{where}: base_model must give an id and a fingerprint")
    if not isinstance(meta["files"], dict) or not isinstance(meta["tasks"], dict) or not meta["tasks"]:
        raise ValueError(f"{where}: 'files' and 'tasks' must be non-empty objects")
    return meta


def read_metadata(folder: Path) -> dict[str, Any]:
    path = Path(folder) / METADATA_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read entry metadata {path}: {err}") from err
    return validate_metadata(meta, str(path))


def verify_files(folder: Path, meta: dict[str, Any]) -> None:
    """Check that the folder holds exactly the files ``meta['files']`` lists, with those sha256.

    Raises:
        ValueError: a missing or extra file, or a hash mismatch (the message names the file).
    """
    folder = Path(folder)
    expected = meta["files"]
    present = set(payload_files(folder))
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    if missing or extra:
        raise ValueError(f"entry {folder}: missing files {missing}, unlisted files {extra}")
    for name, digest in expected.items():
        actual = sha256_file(folder / name)
        if actual != digest:
            raise ValueError(
                f"hash mismatch for {name} in {folder}: adamix.json says {digest}, file has {actual}"
            )


# -- model card ------------------------------------------------------------------------------------
ADAPTER_FORMAT_NOTE = """\
### Mixture-of-adapters format (`peft_type: ADAMIX_ADAPTER`)

PEFT has no layer for this adapter, so it does not load with `PeftModel`; load it with
`adamix_zoo.io.load_merged` (or `adamix-zoo` serving). `adapter_model.safetensors` holds, for each
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
