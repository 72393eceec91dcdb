"""The task head file: the head's tensors, its spec (hidden_size, num_labels, pooling) as metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def write_head(state: dict[str, torch.Tensor], spec: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "head": json.dumps(spec)})
    return path


def read_head(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(spec, tensors) of a head file.

    Raises:
        ValueError: unreadable file or missing spec.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read head file {path}: {err}") from err
    if "head" not in meta:
        raise ValueError(f"{path} is not a head file (no 'head' metadata)")
    return json.loads(meta["head"]), state
