"""Cross-task merging: combine entries of one base model into a new entry, as PEFT's
``add_weighted_adapter`` does (peft/tuners/lora/model.py, peft/utils/merge_utils.py).

For LoRA, each source i contributes ``delta_W_i = s_i B_i A_i`` (s_i = alpha_i / r_i). The methods:

- **Factor-space** (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``):
  combine the A's with weights ``sign(w_i) sqrt(|w_i s_i|)`` and the B's with ``sqrt(|w_i s_i|)``
  separately. *Not exact*: ``B'A' = sum_ij sqrt(w_i s_i w_j s_j) B_j A_i`` has cross terms between
  tasks. Same rank r as the sources (all must share r).
- **Concatenation** (``cat``): ``A' = [w_i s_i A_i]`` stacked on the rank axis, ``B' = [B_i]``:
  *exact*, ``B'A' = sum_i w_i delta_W_i``, at rank ``sum_i r_i``.
- **delta-W space** (``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd``): combine the full ``delta_W_i`` (task arithmetic, TIES, DARE, ...), then
  factor back by truncated SVD to rank ``svd_rank`` (default max r_i). The combination is exact in
  delta-W space; the factorisation is exact when ``svd_rank`` >= the rank of the result (``svd``
  with ``svd_rank = sum r_i`` is exact), otherwise the best rank-``svd_rank`` approximation.

The merged LoRA is written with ``lora_alpha = r`` (scale 1): the scales live in the weights, as in
PEFT. TIES elects signs and averages the agreeing, pruned values; DARE drops values at random with
probability ``1 - density`` and rescales by ``1 / density``. DARE's masks come from torch's default
generator seeded with ``seed`` (forked: the global state is left as it was), drawn module by
module in the model's (natural name) order, all A's before all B's: PEFT's order, so the same seed
gives PEFT's result. Weights are used as given (PEFT's convention): ``[0.5, 0.5]`` averages.

For mixture-of-adapter entries (no factorisation), each parameter (down/up weights and biases)
is combined directly with weights w_i by the factor-space rules; not exact, since the adapter is
non-linear. ``cat`` is exact for adapters too: parallel bottlenecks ``sum_i w_i U_i act(D_i h)``
form one bottleneck of size ``sum_i m_i``.

Heads: task heads cannot be averaged across tasks (different labels), so a merged entry keeps each
source's head as ``heads/<task>.safetensors`` and serves every source task with one adapter;
``Store.attach(ref, backbone, task=...)`` picks the head.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from typing import Any

import torch
from safetensors.torch import save_file

import adamix_zoo
from adamix_zoo.formats.files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, FORMAT_VERSION
from adamix_zoo.formats.merged import ADAPTER_SUFFIXES, LORA_SUFFIXES, PEFT_PREFIX, group_modules, read_merged
from adamix_zoo.formats.metadata import read_metadata
from adamix_zoo.formats.names import DEFAULT_NAMESPACE, validate_part
from registry.entry import HEADS_DIR
from registry.store import EntryInfo, Store

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DELTA_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = FACTOR_METHODS + ("cat",) + DELTA_METHODS
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


# -- PEFT's combination rules (merge_utils.py), on tensors stacked on dim 0 -----------------------------
def prune(tensor: torch.Tensor, density: float, method: str, rescale: bool = False) -> torch.Tensor:
    """Keep a ``density`` fraction of the values: the largest (magnitude) or random ones (DARE)."""
    if density >= 1:
        return tensor
    if density < 0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    pruned = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return pruned / density if rescale else pruned


def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return tensors * weights.view(weights.shape + (1,) * (tensors.dim() - 1))


def _majority_mask(tensors: torch.Tensor, method: str) -> torch.Tensor:
    sign = tensors.sign()
    if method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method={method!r}: choose 'total' or 'frequency'")
    magnitude = tensors.sum(0) if method == "total" else sign.sum(0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def combine(tensors: list[torch.Tensor], weights: list[float], method: str, density: float | None = None,
            majority_sign_method: str = "total") -> torch.Tensor:
    """Combine same-shaped task tensors; ``method`` without an ``_svd`` suffix (svd = linear)."""
    base = {"svd": "linear"}.get(method.removesuffix("_svd"), method.removesuffix("_svd"))
    if base != "linear":
        kind = "magnitude" if base in ("ties", "magnitude_prune") else "random"
        tensors = [prune(t, density, kind, rescale=kind == "random") for t in tensors]
    stacked = torch.stack(tensors)
    weighted = _weighted(stacked, torch.tensor(weights, dtype=stacked.dtype))
    if base in ("linear", "dare_linear", "magnitude_prune"):
        return weighted.sum(0)
    mask = _majority_mask(stacked, majority_sign_method)  # ties, dare_ties: disjoint merge
    return (weighted * mask).sum(0) / mask.sum(0).clamp(min=1.0)


# -- per-module merging ------------------------------------------------------------------------------
def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _lora_module(parts: list[tuple[int, dict, float]], weights: list[float], method: str, rank: int,
                 density: float | None, majority: str) -> tuple[torch.Tensor, torch.Tensor]:
    """parts: (source index, {suffix: tensor}, scale) of the sources that adapt this module."""
    if method == "cat":
        a = torch.cat([p["lora_A.weight"] * weights[i] * s for i, p, s in parts])
        b = torch.cat([p["lora_B.weight"] for _, p, _ in parts], dim=1)
        pad = rank - a.shape[0]
        return torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
    if method in DELTA_METHODS:
        deltas = [s * p["lora_B.weight"] @ p["lora_A.weight"] for _, p, s in parts]
        delta = combine(deltas, [weights[i] for i, _, _ in parts], method, density, majority)
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, sv.shape[0])
        a, b = vh[:k], u[:, :k] * sv[:k]  # A: (k, d_in), B: (d_out, k); zero-padded to the rank
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
        return a, torch.cat([b, b.new_zeros(b.shape[0], rank - k)], 1)
    w_a = [math.copysign(math.sqrt(abs(weights[i] * s)), weights[i] * s) for i, _, s in parts]
    w_b = [math.sqrt(abs(weights[i] * s)) for i, _, s in parts]
    a = combine([p["lora_A.weight"] for _, p, _ in parts], w_a, method, density, majority)
    b = combine([p["lora_B.weight"] for _, p, _ in parts], w_b, method, density, majority)
    return a, b


def _adapter_module(parts: list[tuple[int, dict, float]], weights: list[float], method: str, size: int,
                    density: float | None, majority: str) -> dict[str, torch.Tensor]:
    if method == "cat":
        down = torch.cat([p["adapter_down.weight"] for _, p, _ in parts])
        down_b = torch.cat([p["adapter_down.bias"] for _, p, _ in parts])
        up = torch.cat([p["adapter_up.weight"] * weights[i] for i, p, _ in parts], dim=1)
        pad = size - down.shape[0]
        return {
            "adapter_down.weight": torch.cat([down, down.new_zeros(pad, down.shape[1])]),
            "adapter_down.bias": torch.cat([down_b, down_b.new_zeros(pad)]),
            "adapter_up.weight": torch.cat([up, up.new_zeros(up.shape[0], pad)], 1),
            "adapter_up.bias": sum(p["adapter_up.bias"] * weights[i] for i, p, _ in parts),
        }
    w = [weights[i] for i, _, _ in parts]
    return {k: combine([p[k] for _, p, _ in parts], w, method, density, majority) for k in ADAPTER_SUFFIXES}


def merge_tensors(
    sources: list[tuple[dict[str, Any], dict[str, torch.Tensor]]],
    weights: list[float],
    method: str = "linear",
    density: float | None = None,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Merge merged-adapter folders' contents: [(adapter_config, tensors)] -> (config, tensors).

    Raises:
        ValueError: unknown method, mixed kinds, ranks/bottlenecks a method cannot mix, a missing
            density, or an svd method on adapters.
    """
    configs = [c for c, _ in sources]
    check_options(method, list(weights), len(sources), density, svd_rank, majority_sign_method)
    lora = _check_sources(configs, method, density)
    sizes = [c["r"] if lora else c["bottleneck"] for c in configs]
    if method == "cat":
        size = sum(sizes)
    else:
        size = (svd_rank or max(sizes)) if method in DELTA_METHODS else sizes[0]
    suffixes = LORA_SUFFIXES if lora else ADAPTER_SUFFIXES
    grouped = [group_modules(t, suffixes, []) for _, t in sources]
    scales = [c["lora_alpha"] / c["r"] if lora else 1.0 for c in configs]
    out: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in sorted(set().union(*grouped), key=_natural_key):
            parts = [(i, {k: v.float() for k, v in g[module].items()}, scales[i])
                     for i, g in enumerate(grouped) if module in g]
            if lora:
                a, b = _lora_module(parts, weights, method, size, density, majority_sign_method)
                merged = {"lora_A.weight": a, "lora_B.weight": b}
            else:
                merged = _adapter_module(parts, weights, method, size, density, majority_sign_method)
            dtype = next(iter(grouped[parts[0][0]][module].values())).dtype
            out |= {f"{PEFT_PREFIX}{module}.{k}": v.to(dtype).contiguous() for k, v in merged.items()}
    config = dict(configs[0], target_modules=sorted(set().union(*(c["target_modules"] for c in configs))),
                  modules_to_save=None)
    config |= {"r": size, "lora_alpha": size} if lora else {"bottleneck": size}
    return config, out


def check_options(method: str, weights: list[float], n: int, density: float | None,
                  svd_rank: int | None, majority_sign_method: str = "total") -> None:
    """Refuse merge parameters that would give a broken (non-finite or misshapen) entry.

    Raises:
        ValueError: an unknown method; not one finite weight per source; a density outside (0, 1]
            or given to a method without pruning; an svd_rank that is not a positive integer or
            given to a method without SVD; an unknown majority sign method.
    """
    if method not in METHODS:
        raise ValueError(f"merge method {method!r} is not supported; choose one of {', '.join(METHODS)}")
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} entries: give one weight per entry")
    bad = [w for w in weights if not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"merge weights must be finite numbers, got {bad[0]!r}")
    uses_density = method.removesuffix("_svd") in NEEDS_DENSITY
    if density is not None:
        if not uses_density:
            raise ValueError(f"merge method {method!r} takes no density (only "
                             f"{', '.join(m for m in METHODS if m.removesuffix('_svd') in NEEDS_DENSITY)})")
        if not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1] (the kept fraction), got {density!r}")
    if svd_rank is not None:
        if method not in DELTA_METHODS:
            raise ValueError(f"svd_rank only applies to {', '.join(DELTA_METHODS)}, not {method!r}")
        if isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1:
            raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method={majority_sign_method!r}: choose 'total' or 'frequency'")


def _check_sources(configs: list[dict[str, Any]], method: str, density: float | None) -> bool:
    kinds = {c["peft_type"] for c in configs}
    if len(kinds) != 1:
        raise ValueError(f"cannot merge different adapter kinds: {sorted(kinds)}")
    lora = kinds == {"LORA"}
    if not lora and method in DELTA_METHODS:
        raise ValueError(f"{method!r} works in LoRA delta-W space; adapter entries support "
                         f"{', '.join(FACTOR_METHODS)} and cat")
    sizes = {c["r"] if lora else c["bottleneck"] for c in configs}
    if method in FACTOR_METHODS and len(sizes) != 1:
        what = "rank r" if lora else "bottleneck"
        raise ValueError(f"{method!r} needs all sources to share one {what}, got {sorted(sizes)}; use cat"
                         + (" or svd" if lora else ""))
    base = method.removesuffix("_svd")
    if base in NEEDS_DENSITY and density is None:
        raise ValueError(f"merge method {method!r} needs a density in [0, 1]")
    if any(c.get("modules_to_save") for c in configs):
        raise ValueError("cannot merge adapters that carry task heads inside (modules_to_save); "
                         "entries keep heads in separate files")
    return lora


# -- entries ------------------------------------------------------------------------------------------
def merge_entries(
    store: Store,
    refs: list[str],
    weights: list[float] | None = None,
    method: str = "linear",
    density: float | None = None,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
    task: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    version: str | None = None,
) -> EntryInfo:
    """Merge store entries of one base model into a new, multi-task entry with provenance.

    Args:
        refs: the source entries (two or more; one is allowed and rescales it).
        weights: one per source; default ``1/n`` each (an average).
        method: one of ``METHODS`` (see the module docstring for which are exact).
        density: kept fraction for TIES / DARE / magnitude pruning.
        svd_rank: rank of the delta-W methods' result (default the largest source rank).
        seed: seeds DARE's random masks.
        task: the new entry's task name; default the source tasks joined with '+'.

    Raises:
        ValueError: different base models (the message names both fingerprints), duplicate task
            names, bad weights, or anything ``merge_tensors`` refuses.
    """
    if not refs:
        raise ValueError("merge needs at least one entry")
    infos = [store.resolve(r) for r in refs]
    folders = [store.get(i.ref) for i in infos]  # verifies every sha256
    metas = [read_metadata(f) for f in folders]
    _check_same_base(infos, metas)
    weights = list(weights) if weights is not None else [1.0 / len(refs)] * len(refs)
    check_options(method, weights, len(refs), density, svd_rank, majority_sign_method)
    tasks = _merged_tasks(infos, metas)
    task = validate_part("task", task or "+".join(tasks))
    sources = [(m.config, m.tensors) for m in map(read_merged, folders)]
    config, tensors = merge_tensors(sources, weights, method, density, svd_rank, majority_sign_method, seed)
    options = {"method": method, "weights": weights, "density": density, "svd_rank": svd_rank,
               "majority_sign_method": majority_sign_method, "seed": seed, "sources": [i.ref for i in infos],
               "exact": _is_exact(method, config, sources)}
    with store.staging() as stage:
        save_file(tensors, str(stage / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        (stage / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        (stage / HEADS_DIR).mkdir()
        for name, (src_task, info, meta, folder) in tasks.items():
            head = meta["tasks"][src_task].get("head")
            if head:  # generation tasks have none
                shutil.copyfile(folder / head, stage / HEADS_DIR / f"{name}.safetensors")
        meta = _merged_metadata(config, metas, tasks, options, infos)
        return store.commit(stage, meta, namespace, task, version)


def _check_same_base(infos: list[EntryInfo], metas: list[dict[str, Any]]) -> None:
    first = metas[0]["base_model"]
    for info, meta in zip(infos[1:], metas[1:]):
        if meta["base_model"]["fingerprint"] != first["fingerprint"]:
            raise ValueError(
                f"cannot merge entries of different base models: {infos[0].ref} is on {first.get('id')!r} "
                f"(fingerprint {first['fingerprint']}), {info.ref} is on {meta['base_model'].get('id')!r} "
                f"(fingerprint {meta['base_model']['fingerprint']})"
            )


def _merged_tasks(infos, metas) -> dict[str, tuple]:
    """New task name -> (source task, info, meta, folder); a task seen twice gets '-v<version>'."""
    out: dict[str, tuple] = {}
    for info, meta in zip(infos, metas):
        for task in meta["tasks"]:
            name = task if task not in out else f"{task}-v{info.version}"
            validate_part("task", name)  # becomes a file name: heads/<name>.safetensors
            if name in out:
                raise ValueError(f"task {task!r} of {info.ref} appears twice among the sources")
            out[name] = (task, info, meta, info.path)
    return out


def _is_exact(method: str, config: dict[str, Any], sources) -> bool:
    if method == "cat":
        return True
    if method == "svd" and config.get("peft_type") == "LORA":
        return config["r"] >= sum(c["r"] for c, _ in sources)  # enough rank to hold the sum
    return False


def _merged_metadata(config, metas, tasks, options, infos) -> dict[str, Any]:
    lora = config["peft_type"] == "LORA"
    first = metas[0]
    return {
        "format_version": FORMAT_VERSION,
        "name": {},
        "method": "cross-task-merge",
        "kind": first["kind"],
        "num_experts": 1,
        "rank": config["r"] if lora else None,
        "alpha": config["lora_alpha"] if lora else None,
        "bottleneck": None if lora else config["bottleneck"],
        "sharing": None,
        "routing": {"eval": "merged"},
        "consistency_weight": None,
        "merge": options,
        "base_model": first["base_model"],
        "tasks": {
            # metrics of the merged adapter are unknown until evaluated; the source's are kept apart
            name: dict(meta["tasks"][src], source=info.ref, metrics={},
                       head=f"{HEADS_DIR}/{name}.safetensors" if meta["tasks"][src].get("head") else None,
                       source_metrics=meta["tasks"][src].get("metrics") or {})
            for name, (src, info, meta, _) in tasks.items()
        },
        "provenance": {
            "source": "merge",
            "merged_from": [{"ref": i.ref, "files": m["files"], "provenance": m["provenance"]}
                            for i, m in zip(infos, metas)],
            "adamix_zoo_version": adamix_zoo.__version__,
        },
        "files": {},
    }


def parse_weights(text: str | None) -> list[float] | None:
    """'0.5,0.5' -> [0.5, 0.5] (CLI helper)."""
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights {text!r}: expected comma-separated numbers such as 0.5,0.5") from None


__all__ = ["METHODS", "combine", "merge_entries", "merge_tensors", "parse_weights", "prune"]
