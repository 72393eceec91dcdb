"""How far averaging LoRA factors is from averaging the updates they make.

A LoRA projection holds stacked factors A (K_a, r, d_in) and B (K_b, d_out, r); the routed update
of the pair (B expert j, A expert k) is ``dW_jk = s B_j A_k`` (routing draws A and B experts
independently, so with ``sharing='none'`` every one of the K_b * K_a pairs can be applied;
``sharing='up'`` has K_b = 1, ``'down'`` K_a = 1, and the merged adapter's update is the mean over
the pairs). Given the accepted updates of a round, client i with factors (A_i, B_i) and weight w_i
(its ``num-examples``, normalised to sum 1), the plain averaging step forms
``mean(B)_j mean(A)_k = (sum_i w_i B_ij)(sum_i w_i A_ik)`` where the clients' mean update is
``ref_jk = sum_i w_i B_ij A_ik``; the difference is the cross terms ``w_i w_l B_ij A_lk`` (i != l).
Per projection the relative error is

    sqrt(sum_jk ||mean(B)_j mean(A)_k - ref_jk||_F^2) / sqrt(sum_jk ||ref_jk||_F^2)

(the LoRA scale s cancels). It measures the averaging step alone, whatever the server strategy
does with the mean afterwards. It is 0 when A is one frozen tensor common to all clients
(``AdaMixConfig.freeze_shared``, FFA-LoRA) and grows as clients' factors drift apart.

Not measured: head tensors (a linear layer whose parameter average is its output average) and
mixtures of adapters (``kind='adapter'``: ``U act(D h)`` is not a weight update, so there is no
product to compare); their runs report no error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from adamix_zoo.config import AdaMixConfig
from adamix_zoo.mixtures.lora import LORA_A, LORA_B


@dataclass(frozen=True)
class Projection:
    """One adapted linear layer: the tensor names of its stacked A and B factors."""

    module: str
    a: str
    b: str


def lora_projections(names: Iterable[str]) -> list[Projection]:
    """The LoRA projections among tensor names (``<module>.adamix_lora_A`` with its ``_B``)."""
    names = set(names)
    modules = sorted(n.removesuffix("." + LORA_A) for n in names if n.endswith("." + LORA_A))
    return [Projection(m, f"{m}.{LORA_A}", f"{m}.{LORA_B}") for m in modules if f"{m}.{LORA_B}" in names]


def frozen_names(names: Iterable[str], adamix: AdaMixConfig) -> set[str]:
    """Tensors that travel but never train: the shared A of every projection with ``freeze_shared``."""
    return {p.a for p in lora_projections(names)} if adamix.freeze_shared else set()


def _triangle(blocks: np.ndarray) -> np.ndarray:
    """T of a reduced QR, blocks = Q T: same Gram matrix, (m, m) instead of (d, m) when m < d."""
    return np.linalg.qr(blocks, mode="r") if blocks.shape[1] < blocks.shape[0] else blocks


def _sum_of_pair_norms(lefts: np.ndarray, rights: np.ndarray) -> float:
    """sum_jk ||lefts[j] @ rights[k]||_F^2 without forming any (d_out, d_in) product.

    With lefts[j] = Q_j T_j and rights[k]^T = P_k U_k (orthonormal Q, P),
    ||lefts[j] @ rights[k]||_F = ||T_j U_k^T||_F: (m, m) products, m = stacked rank.
    """
    ts = [_triangle(left) for left in lefts]  # lefts: (K_b, d_out, m)
    us = [_triangle(right.T) for right in rights]  # rights: (K_a, m, d_in)
    return float(sum(np.sum((t @ u.T) ** 2) for t in ts for u in us))


def projection_error(a: list[np.ndarray], b: list[np.ndarray], weights: list[float]) -> tuple[float, float]:
    """(||error||, ||reference||) of one projection, summed over its expert pairs.

    Args:
        a: each client's A, (K_a, r, d_in).
        b: each client's B, (K_b, d_out, r).
        weights: each client's weight (``num-examples``); normalised here.
    """
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    A = np.stack(a).astype(np.float64)  # (n, K_a, r, d_in)
    B = np.stack(b).astype(np.float64)  # (n, K_b, d_out, r)
    (n, k_a, r, d_in), (_, k_b, d_out, _) = A.shape, B.shape
    # ref_jk = sum_i w_i B_ij A_ik = left_j @ right_k with the clients' factors side by side:
    # left_j = [w_1 B_1j, ..., w_n B_nj] (d_out, n r), right_k = [A_1k; ...; A_nk] (n r, d_in).
    left = (w[:, None, None, None] * B).transpose(1, 2, 0, 3).reshape(k_b, d_out, n * r)
    right = A.transpose(1, 0, 2, 3).reshape(k_a, n * r, d_in)
    # The error mean(B)_j mean(A)_k - ref_jk is the same product with one more block each.
    mean_a, mean_b = np.einsum("i,ikrd->krd", w, A), np.einsum("i,ikor->kor", w, B)
    error = _sum_of_pair_norms(np.concatenate([left, -mean_b], axis=2), np.concatenate([right, mean_a], axis=1))
    reference = _sum_of_pair_norms(left, right)
    return float(np.sqrt(max(error, 0.0))), float(np.sqrt(reference))


def relative_errors(
    updates: list[dict[str, np.ndarray]], weights: list[float], projections: list[Projection]
) -> dict[str, float]:
    """Per projection (module name), the relative error of the averaged factors' update.

    A projection whose clients' mean update is 0 (nothing to compare with) is left out.
    """
    out = {}
    for p in projections:
        error, reference = projection_error([u[p.a] for u in updates], [u[p.b] for u in updates], weights)
        if reference > 0:
            out[p.module] = error / reference
    return out


def summary(errors: dict[str, float]) -> dict[str, float] | None:
    """``mean`` and ``max`` over the projections; None when nothing was measured."""
    if not errors:
        return None
    values = list(errors.values())
    return {"mean": float(np.mean(values)), "max": float(np.max(values))}
