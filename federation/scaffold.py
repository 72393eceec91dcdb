"""SCAFFOLD drift control (Karimireddy et al., ICML 2020), ``drift-control=scaffold``.

Label-skewed clients pull the shared experts towards their own optima; SCAFFOLD corrects every
local gradient by ``c - c_i``, the difference between the server's control variate ``c`` (an
estimate of the federation's mean gradient) and the client's own ``c_i`` (of its gradient), so
each client's steps follow the federation's direction rather than its own.

- The server keeps ``c`` (one tensor per trainable travelling tensor; frozen ones have none) and
  sends it with every training message (``CONTROL_KEY``).
- A client keeps ``c_i`` in its ``Context.state`` (zero before its first round), adds ``c - c_i``
  to each step's gradient (before clipping and the optimizer), and replies with
  ``delta = c_i+ - c_i`` (``DELTA_KEY``), where ``c_i+`` is the mean of its raw gradients over the
  round's steps: SCAFFOLD's option II, which under plain SGD is exactly that mean, taken as is
  under AdamW and the learning-rate schedule.
- The server moves ``c`` by ``|S| / N`` times the mean of the round's valid deltas (``N``:
  ``num-clients``), each delta's norm first capped at ``max_norm_ratio`` times the median of the
  others' (as updates are), so ``c`` stays the mean of all clients' ``c_i``.

The control variates double what a round moves. A round whose aggregate is refused leaves ``c``
unchanged (its clients' ``c_i`` moved: a small, self-correcting inconsistency).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from torch import nn

from federation.bounds import capped
from federation.records import Spec, check_record, from_record, to_record

CONTROL_KEY = "control"  # train message: the server's control variate c
DELTA_KEY = "control-delta"  # train reply: c_i+ - c_i
CLIENT_STATE_KEY = "scaffold-control"  # Context.state: the client's own c_i


class ServerControl:
    """The server's control variate ``c`` over the trainable tensors of ``spec``."""

    def __init__(self, spec: Spec, frozen: set[str] | list[str], num_clients: int,
                 max_norm_ratio: float = 10.0) -> None:
        self.spec: Spec = {k: v for k, v in spec.items() if k not in set(frozen)}
        self.num_clients, self.max_norm_ratio = num_clients, max_norm_ratio
        self.control = {k: np.zeros(shape, dtype=np.float64) for k, (shape, _) in self.spec.items()}

    def record(self) -> ArrayRecord:
        """``c`` as sent, in the spec's dtypes."""
        return ArrayRecord({k: Array(np.ascontiguousarray(v.astype(self.spec[k][1])))
                            for k, v in self.control.items()})

    def attach(self, messages: list[Message]) -> list[Message]:
        """Each training message with ``c`` in it (one record, shared: nothing writes to it)."""
        record = self.record()
        for msg in messages:
            msg.content[CONTROL_KEY] = record
        return messages

    def problem(self, msg: Message) -> str | None:
        """Why a training reply's control delta (present: ``reply_problem`` checks) is unusable, or None."""
        problems = check_record(msg.content[DELTA_KEY], self.spec)
        return f"'{DELTA_KEY}': " + "; ".join(problems) if problems else None

    def update(self, deltas: list[ArrayRecord]) -> None:
        """``c += |S| / N * mean(deltas)``, each delta's norm capped against the others'."""
        if not deltas:
            return
        arrays = [{k: d[k].numpy().astype(np.float64) for k in self.spec} for d in deltas]
        norms = [math.sqrt(sum(float(np.sum(v * v)) for v in a.values())) for a in arrays]
        scales = [limit / norm if norm > limit else 1.0
                  for norm, limit in zip(norms, capped(norms, self.max_norm_ratio))]
        for name in self.spec:  # |S| / N * mean = sum / N
            self.control[name] += sum(s * a[name] for s, a in zip(scales, arrays)) / self.num_clients


class DriftCorrection:
    """A client's round: ``gradient += c - c_i`` after every backward pass, and the mean raw
    gradient for its next ``c_i``.

    Raises:
        ValueError: ``c`` (from the message) or ``c_i`` (from the state) does not name exactly the
            client's trainable travelling tensors, or does not fit their shapes.
    """

    def __init__(self, params: dict[str, nn.Parameter], server: ArrayRecord, own: ArrayRecord | None) -> None:
        self.params = params
        server_control = from_record(server)
        own_control = from_record(own) if own is not None else {k: torch.zeros_like(v) for k, v in server_control.items()}
        for what, tensors in (("the server's control variate", server_control), ("this client's control variate", own_control)):
            if set(tensors) != set(params):
                missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
                raise ValueError(f"{what} does not fit the trainable tensors: missing {missing[:2]}, "
                                 f"unexpected {extra[:2]}")
            for name, tensor in tensors.items():
                if tensor.shape != params[name].shape:
                    raise ValueError(f"{what}: {name} has shape {tuple(tensor.shape)}, expected "
                                     f"{tuple(params[name].shape)}")
        self.own = own_control
        self.shift = {k: (server_control[k] - own_control[k]).to(p.device, p.dtype) for k, p in params.items()}
        self.sums = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
        self.steps = 0

    def __call__(self) -> None:
        """Called after ``backward``: note the raw gradients, then correct them in place."""
        with torch.no_grad():
            for name, param in self.params.items():
                if param.grad is None:  # no path to this tensor in this step's loss
                    param.grad = torch.zeros_like(param)
                self.sums[name] += param.grad.double()
                param.grad += self.shift[name]
        self.steps += 1

    def finish(self) -> tuple[ArrayRecord, ArrayRecord]:
        """(the client's new ``c_i``, to keep in its state; ``c_i+ - c_i``, to send)."""
        if self.steps == 0:
            raise ValueError("no training step ran: the control variate cannot be updated")
        new = {k: (s / self.steps).float().cpu() for k, s in self.sums.items()}
        return to_record(new), to_record({k: new[k] - self.own[k] for k in new})
