"""Multi-task layers: one frozen projection, many tasks' adapters, each row of a batch its own task.

Every attached task owns a *slot* (1..n; slot 0 is reserved for "no adapter"). Each adapted projection
holds its tasks' tensors stacked along a leading slot dimension, zero-padded to the largest rank or
bottleneck (zero rows and columns add exactly nothing). A forward pass gathers the tensors of each
row's slot and applies them with ``bmm``, so a batch that mixes tasks is still one backbone pass.
Rows whose task does not adapt a projection are left out of its delta; a batch of one task takes
the plain ``F.linear`` path (what a single-adapter model does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adamix_zoo.methods.adapter import ACTIVATIONS


class RowRouting:
    """Which slot each row of the current batch uses; shared by all layers during one forward pass.

    Args:
        slots: slot per row (0 = backbone alone), a Python list so selection needs no device sync.
        device: where the index tensors live (the backbone's device).
    """

    def __init__(self, slots: list[int], device: torch.device | str = "cpu") -> None:
        self.slots = slots
        self.device = device
        self._cache: dict[frozenset[int], Selection | None] = {}

    def select(self, present: frozenset[int]) -> Selection | None:
        """The rows whose slot is in ``present`` (the slots a projection holds), or None if no row is."""
        if present not in self._cache:
            self._cache[present] = Selection.build(self.slots, present, self.device)
        return self._cache[present]


@dataclass
class Selection:
    """Rows of the batch that need one bank: ``rows`` None means every row; ``uniform`` a shared slot."""

    rows: torch.Tensor | None  # (n_selected,) row indices, or None for all rows
    slots: torch.Tensor  # (n_selected,) slot of each selected row
    uniform: int | None  # the slot when all selected rows share it (plain F.linear path)

    @staticmethod
    def build(
        slots: list[int], present: frozenset[int], device: torch.device | str
    ) -> Selection | None:
        picked = [i for i, s in enumerate(slots) if s in present]
        if not picked:
            return None
        chosen = [slots[i] for i in picked]
        rows = None if len(picked) == len(slots) else torch.tensor(picked, device=device)
        uniform = chosen[0] if all(s == chosen[0] for s in chosen) else None
        return Selection(rows, torch.tensor(chosen, device=device), uniform)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.rows is None else x.index_select(0, self.rows)

    def put(self, out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Add the selected rows' delta into ``out`` in place (a fresh projection output)."""
        delta = delta.to(out.dtype)
        return out.add_(delta) if self.rows is None else out.index_add_(0, self.rows, delta)

    def fusable(self, out: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether the last matmul can accumulate straight into ``out`` (every row, same dtype)."""
        return self.rows is None and out.dtype == dtype and out.dim() == 3 and out.is_contiguous()


@dataclass
class LoRABank:
    """Stacked LoRA tensors of one projection: A (slots, r, d_in), B * scale (slots, d_out, r)."""

    a: torch.Tensor
    b: torch.Tensor
    present: frozenset[int]

    def apply(self, x: torch.Tensor, out: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        sel = routing.select(self.present)
        if sel is None:
            return out
        xs = sel.take(x).to(self.a.dtype)  # (b, T, d_in)
        fuse = sel.fusable(out, self.a.dtype)
        if sel.uniform is not None:  # one adapter for every selected row: plain matmuls
            h = F.linear(xs, self.a[sel.uniform])  # (b, T, r)
            b_t = self.b[sel.uniform].T  # (r, d_out)
            if fuse:  # out += h @ B^T inside the GEMM, no (b, T, d_out) temporary
                out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b_t)
                return out
            return sel.put(out, h @ b_t)
        a_t = self.a.index_select(0, sel.slots).transpose(1, 2)  # (b, d_in, r)
        b_t = self.b.index_select(0, sel.slots).transpose(1, 2)  # (b, r, d_out)
        h = torch.bmm(xs, a_t)  # (b, T, r)
        return out.baddbmm_(h, b_t) if fuse else sel.put(out, torch.bmm(h, b_t))


@dataclass
class BottleneckBank:
    """Stacked bottleneck adapters of one activation on one projection's output h: h + U act(D h)."""

    down_weight: torch.Tensor  # (slots, m, d)
    down_bias: torch.Tensor  # (slots, m)
    up_weight: torch.Tensor  # (slots, d, m)
    up_bias: torch.Tensor  # (slots, d)
    activation: str
    present: frozenset[int]

    def apply(self, h: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        sel = routing.select(self.present)
        if sel is None:
            return h
        act = ACTIVATIONS[self.activation]
        hs = sel.take(h).to(self.down_weight.dtype)  # (b, T, d)
        if sel.uniform is not None:
            s = sel.uniform
            z = F.linear(hs, self.down_weight[s], self.down_bias[s])
            delta = F.linear(act(z), self.up_weight[s], self.up_bias[s])
        else:
            down = self.down_weight.index_select(0, sel.slots).transpose(1, 2)  # (b, d, m)
            up = self.up_weight.index_select(0, sel.slots).transpose(1, 2)  # (b, m, d)
            z = torch.baddbmm(self.down_bias.index_select(0, sel.slots).unsqueeze(1), hs, down)
            delta = torch.baddbmm(self.up_bias.index_select(0, sel.slots).unsqueeze(1), act(z), up)
        return sel.put(h, delta)


class RoutingHolder:
    """The routing of the forward pass in flight (None: plain backbone). Set by the engine only."""

    def __init__(self) -> None:
        self.current: RowRouting | None = None


class MultiTaskLayer(nn.Module):
    """A frozen projection plus every attached task's LoRA and bottleneck adapters on it.

    LoRA deltas use the projection's input; bottleneck adapters act on its output (AdaMix / Houlsby
    placement). A task is one kind, so each row gets at most one of them here.
    """

    def __init__(self, base_layer: nn.Module, holder: RoutingHolder) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.holder = holder
        # Plain attributes, not buffers: banks are no part of the backbone's state (or fingerprint).
        self.lora: LoRABank | None = None
        self.bottlenecks: list[BottleneckBank] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        routing = self.holder.current
        if routing is None:
            return out
        if x.shape[0] != len(routing.slots):
            raise RuntimeError(
                f"multi-task layer got {x.shape[0]} rows but routing for {len(routing.slots)}"
            )
        if self.lora is not None:
            out = self.lora.apply(x, out, routing)
        for bank in self.bottlenecks:
            out = bank.apply(out, routing)
        return out


@dataclass
class HeadBank:
    """Every slot's classification head, padded to the most labels: W (slots, L, d), b (slots, L)."""

    weight: torch.Tensor
    bias: torch.Tensor
    cls_pooling: torch.Tensor  # (slots,) bool: first token instead of the masked mean
    num_labels: list[int] = field(default_factory=list)

    def apply(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        slots: torch.Tensor,
        uniform: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, T, d), mask (B, T), slots (B,) -> (logits (B, L), mean-pooled states (B, d))."""
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        pooled = torch.where(
            self.cls_pooling.index_select(0, slots).unsqueeze(1), hidden[:, 0], mean
        )
        pooled = pooled.to(self.weight.dtype)
        if uniform is not None:
            return F.linear(pooled, self.weight[uniform], self.bias[uniform]), mean
        weight = self.weight.index_select(0, slots)  # (B, L, d)
        logits = torch.bmm(weight, pooled.unsqueeze(-1)).squeeze(-1) + self.bias.index_select(
            0, slots
        )
        return logits, mean
