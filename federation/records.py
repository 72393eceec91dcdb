"""What travels: adapter-expert tensors (and, in single-task runs, the head) as an ``ArrayRecord``.

Expert names are the ``adamix_*`` parameter names of ``AdaMixModel.adapter_state_dict()``; head
tensors travel under ``head.<name>``. Nothing else of the model is ever put in a record.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from adamix_zoo.model import is_adapter_param

HEAD_PREFIX = "head."

Spec = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, numpy dtype string)


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """CPU float tensors -> ArrayRecord (copies, so later training cannot change a sent record)."""
    return ArrayRecord(
        {k: Array(v.detach().to("cpu").contiguous().numpy().copy()) for k, v in tensors.items()}
    )


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def spec_of(tensors: dict[str, torch.Tensor]) -> Spec:
    return {k: (tuple(v.shape), str(v.detach().cpu().numpy().dtype)) for k, v in tensors.items()}


def travelling_name(name: str) -> bool:
    """True only for names allowed on the wire: adapter experts and ``head.*`` tensors."""
    return name.startswith(HEAD_PREFIX) or is_adapter_param(name)


def check_record(record: ArrayRecord, spec: Spec) -> list[str]:
    """Every problem of a client update against the expected names, shapes, dtypes and values.

    Returns:
        Human-readable problems; empty when the update is usable.
    """
    problems = []
    missing, extra = sorted(set(spec) - set(record)), sorted(set(record) - set(spec))
    if missing:
        problems.append(f"missing {len(missing)} tensors (first: {missing[:2]})")
    if extra:
        problems.append(f"unexpected {len(extra)} tensors (first: {extra[:2]})")
    for name in sorted(set(spec) & set(record)):
        shape, dtype = spec[name]
        array = record[name]
        if tuple(array.shape) != shape:
            problems.append(f"{name}: shape {tuple(array.shape)}, expected {shape}")
        elif array.dtype != dtype:
            problems.append(f"{name}: dtype {array.dtype}, expected {dtype}")
        elif not np.isfinite(array.numpy()).all():
            problems.append(f"{name}: non-finite values (NaN/Inf)")
    return problems


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of the tensors in a record (what one direction of a round moves)."""
    return sum(a.numpy().nbytes for a in record.values())
