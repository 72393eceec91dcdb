"""Clients of different LoRA ranks (HetLoRA, Cho et al. 2024; FlexLoRA, Bai et al. 2024) and the
update-space aggregation that re-factors the clients' mean update (FlexLoRA's SVD step).

The global adapter has the run's ``rank`` R. Client i trains rank ``r_i <= R`` (``client-ranks``):
it receives the global factors truncated to their first ``r_i`` components (A's rows, B's columns)
and replies at rank ``r_i``, so a small client holds, trains and uploads a small adapter. Every
client's LoRA scale is the global one, ``alpha / R`` (its alpha is ``alpha * r_i / R``), so a
truncated global adapter is exactly the sub-sum of the global update over those components.

The server brings each reply back to rank R before anything else sees it (``pad``), the components
beyond ``r_i`` filled in as sent: the reply's update (its distance from what was sent, which the
server's clipping bounds) is the client's own, and 0 where it holds nothing. Then:
- ``aggregation='factors'``: the strategy averages the padded factors, so each component moves only
  by the updates of the clients that hold it (any Flower strategy, and a frozen shared A, work
  unchanged);
- ``aggregation='svd'``: the strategy's factor average is replaced by the best rank-R factorisation
  of the clients' weighted mean update ``sum_i w_i B_i A_i`` (each client's factors at its own rank,
  ``zero_beyond``), by a truncated SVD (``refactor``) joint over AdaMix's experts so that the shared
  projection stays shared. The relative truncation error is what this aggregation loses against the
  exact mean (0 when the clients' stacked ranks fit in R).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from adamix_zoo.mixtures.lora import LORA_A, LORA_B
from federation.config import FederationConfig
from federation.exactness import Projection

# the rank axis of each LoRA factor: A is (K_a, r, d_in), B is (K_b, d_out, r)
RANK_AXIS = {LORA_A: 1, LORA_B: 2}


def _rank_axis(name: str) -> int | None:
    return next((axis for suffix, axis in RANK_AXIS.items() if name.endswith("." + suffix)), None)


def client_config(cfg: FederationConfig, partition_id: int) -> FederationConfig:
    """The run's settings as client ``partition_id`` trains them: its rank, at the global scale
    (a homogeneous run of that rank, as far as this client's model is concerned)."""
    rank = cfg.client_rank(partition_id)
    if rank == cfg.adamix.rank:
        return cfg
    mixture = dataclasses.replace(cfg.adamix, rank=rank, alpha=cfg.adamix.alpha * rank / cfg.adamix.rank)
    return dataclasses.replace(cfg, adamix=mixture, client_ranks="")


def truncate(state: dict, rank: int) -> dict:
    """The first ``rank`` components of every LoRA factor (other tensors as they are)."""
    out = {}
    for name, value in state.items():
        axis = _rank_axis(name)
        out[name] = value if axis is None else value[(slice(None),) * axis + (slice(0, rank),)]
    return out


def reply_rank(arrays: dict[str, np.ndarray]) -> int | None:
    """The smallest rank among a reply's LoRA factors (None: it has none)."""
    found = [value.shape[axis] for name, value in arrays.items()
             if (axis := _rank_axis(name)) is not None and value.ndim > axis]
    return min(found) if found else None


def pad(arrays: dict[str, np.ndarray], sent: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]
        ) -> dict[str, np.ndarray]:
    """LoRA factors of a smaller rank brought to the global shapes, the missing components as sent
    (others returned as they are): the reply's update is unchanged, and 0 where it holds nothing.

    Args:
        arrays: a reply's tensors.
        sent: the global tensors sent this round.
        shapes: the global shape of every tensor.

    A tensor whose shape is not a rank truncation of the global one is returned unchanged, for the
    validation that follows to name it.
    """
    out = dict(arrays)
    for name, value in arrays.items():
        axis, shape = _rank_axis(name), shapes.get(name)
        if axis is None or shape is None or name not in sent or value.ndim != len(shape) or tuple(value.shape) == shape:
            continue
        others_match = all(value.shape[i] == shape[i] for i in range(len(shape)) if i != axis)
        if not others_match or not 0 < value.shape[axis] < shape[axis]:
            continue
        full = np.array(sent[name], dtype=value.dtype, copy=True)
        full[(slice(None),) * axis + (slice(0, value.shape[axis]),)] = value
        out[name] = full
    return out


def zero_beyond(arrays: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """Every LoRA factor with its components from ``rank`` on set to 0: at the global shapes, the
    factors of a rank-``rank`` client's own update ``B_i A_i``."""
    out = dict(arrays)
    for name, value in arrays.items():
        if (axis := _rank_axis(name)) is not None and value.shape[axis] > rank:
            out[name] = np.array(value, copy=True)
            out[name][(slice(None),) * axis + (slice(rank, None),)] = 0
    return out


def refactor(a: list[np.ndarray], b: list[np.ndarray], weights: list[float], rank: int
             ) -> tuple[np.ndarray, np.ndarray, float]:
    """The best rank-``rank`` factors of the clients' weighted mean update, and the relative error.

    With the clients' factors side by side, the mean update of each expert pair is one product
    ``L @ R`` (as in ``federation.exactness``). AdaMix shares one projection: with one B (K_b = 1)
    the experts' updates ``[dW_1 | ... | dW_K]`` share their column space, with one A (K_a = 1)
    ``[dW_1; ...; dW_K]`` share their row space. One truncated SVD of that joint matrix, through
    QR factors of L and R (no d_out x d_in product is formed), gives the factors with the projection
    still shared.

    Args:
        a: each client's A, (K_a, r, d_in), at the global rank (``zero_beyond`` its own).
        b: each client's B, (K_b, d_out, r).
        weights: the clients' weights (normalised here).
        rank: the global rank.

    Returns:
        (A, B) of the global shapes, float64, and ``||mean - refactored||_F / ||mean||_F``.

    Raises:
        ValueError: both projections have several experts (``sharing='none'``): their pairwise
            updates have no common factorisation.
    """
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    A, B = np.stack(a).astype(np.float64), np.stack(b).astype(np.float64)
    (n, k_a, r, d_in), (_, k_b, d_out, _) = A.shape, B.shape
    if k_a > 1 and k_b > 1:
        raise ValueError("update-space aggregation needs one shared projection (sharing 'up' or 'down')")
    left = (w[:, None, None, None] * B).transpose(1, 2, 0, 3).reshape(k_b * d_out, n * r)
    right = A.transpose(0, 2, 1, 3).reshape(n * r, k_a * d_in)
    q_left, t_left = np.linalg.qr(left)
    q_right, t_right = np.linalg.qr(right.T)
    u, s, vt = np.linalg.svd(t_left @ t_right.T)
    kept = min(rank, len(s))
    root = np.sqrt(s[:kept])
    new_b = np.zeros((k_b * d_out, rank))
    new_a = np.zeros((rank, k_a * d_in))
    new_b[:, :kept] = (q_left @ u[:, :kept]) * root
    new_a[:kept] = root[:, None] * (vt[:kept] @ q_right.T)
    total = float(np.sum(s**2))
    error = float(np.sqrt(np.sum(s[kept:] ** 2) / total)) if total > 0 else 0.0
    new_a = new_a.reshape(rank, k_a, d_in).transpose(1, 0, 2)
    new_b = new_b.reshape(k_b, d_out, rank)
    return new_a, new_b, error


def refactor_all(updates: list[dict[str, np.ndarray]], weights: list[float], projections: list[Projection],
                 rank: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``refactor`` of every projection: the new factors by name, and the error per projection."""
    factors, errors = {}, {}
    for p in projections:
        a, b, error = refactor([u[p.a] for u in updates], [u[p.b] for u in updates], weights, rank)
        factors[p.a], factors[p.b], errors[p.module] = a, b, error
    return factors, errors
