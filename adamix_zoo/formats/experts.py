"""The unmerged experts file: the ``adamix_*`` tensors (K experts stacked on dim 0) and heads, with
the AdaMix config in the safetensors metadata. To continue training or to federate."""

from __future__ import annotations

import json
import os
from pathlib import Path

from adamix_zoo.config import AdaMixConfig
from adamix_zoo.formats.files import FORMAT_VERSION, read_safetensors, read_safetensors_metadata, save_atomic
from adamix_zoo.model import AdaMixModel


def save_experts(model: AdaMixModel, path: str | os.PathLike) -> Path:
    """Write the unmerged experts (and heads) to one safetensors file; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = model.adapter_state_dict() | model.head_state_dict()
    metadata = {
        "format": "pt",
        "adamix_format_version": FORMAT_VERSION,
        "adamix_config": json.dumps(model.config.to_dict()),
        "head_modules": json.dumps(model.head_modules),
    }
    save_atomic(tensors, path, metadata)
    return path


def read_experts_config(path: str | os.PathLike) -> AdaMixConfig:
    meta = read_safetensors_metadata(path)
    if "adamix_config" not in meta:
        raise ValueError(f"{path} is not an adamix experts file (no adamix_config metadata)")
    return AdaMixConfig.from_dict(json.loads(meta["adamix_config"]))


def load_experts(model: AdaMixModel, path: str | os.PathLike) -> None:
    """Load experts (and heads) saved by ``save_experts``; names and shapes must match exactly."""
    model.load_adapter_state_dict(read_safetensors(path), heads=True)
