"""File names of every on-disk format, the format version, and safe reading of safetensors / JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# The version of the experts file and of adamix.json; readers refuse what they do not know.
FORMAT_VERSION = "1"
SUPPORTED_FORMAT_VERSIONS = ("1",)

EXPERTS_FILE = "adamix_experts.safetensors"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
HEAD_FILE = "head.safetensors"
METADATA_FILE = "adamix.json"
MODEL_CARD_FILE = "README.md"
# A run folder (training, federation): what the registry publishes from.
RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.jsonl"
FINAL_METRICS_FILE = "final_metrics.json"
FULL_MODEL_FILE = "full_model.safetensors"
MERGED_DIR = "merged"
CURVE_FILE = "curve.png"
SPREAD_FILE = "experts_spread.png"
ANALYSIS_FILE = "experts_analysis.json"
GENERATIONS_FILE = "generations.jsonl"


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a corrupt or truncated file into a clear ValueError."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read safetensors file {path}: {err}") from err


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (a ValueError when unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read safetensors file {path}: {err}") from err


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file under a temporary name, then rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def check_json_lines(path: str | os.PathLike) -> int:
    """Check that every non-blank line of a JSON-lines file is one JSON object; returns the rows.

    Raises:
        ValueError: naming the file, the row (1-based line number) and what was expected.
    """
    path, rows = Path(path), 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, row {number}: not valid JSON ({err.msg} at column {err.colno}); "
                    "expected one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}, row {number}: expected a JSON object, got {type(row).__name__}"
                )
            rows += 1
    return rows
