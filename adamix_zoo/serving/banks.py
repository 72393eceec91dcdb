"""The mixed-task batch: every resident task's tensors stacked by slot, gathered per row.

Every resident task owns a *slot* (1..n; slot 0 is reserved for "no adapter"). Each adapted
projection holds its tasks' tensors stacked along a leading slot dimension, zero-padded to the
largest rank or bottleneck (zero rows and columns add exactly nothing). A forward pass gathers the
tensors of each row's slot and applies them with ``bmm``, so a batch that mixes tasks is still one
backbone pass. Rows whose task does not adapt a projection are left out of its delta; a batch of
one task takes the plain ``F.linear`` path (what a single-adapter model does). ``TaskBanks`` wraps
the backbone's projections, restacks them when the resident tasks change, and routes one pass
(``with banks.routing(slots): ...``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adamix_zoo.mixtures.adapter import ACTIVATIONS
from adamix_zoo.serving.task_folders import TaskAdapter


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
class AdapterBank:
    """Stacked Houlsby adapters of one activation on one projection's output h: h + U act(D h)."""

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
    """The routing of the forward pass in flight (None: plain backbone); set by ``TaskBanks.routing``."""

    def __init__(self) -> None:
        self.current: RowRouting | None = None


class MultiTaskLayer(nn.Module):
    """A frozen projection plus every resident task's LoRA and Houlsby adapters on it.

    LoRA deltas use the projection's input; adapters act on its output (AdaMix / Houlsby
    placement). A task is one kind, so each row gets at most one of them here.
    """

    def __init__(self, base_layer: nn.Module, holder: RoutingHolder) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.holder = holder
        # Plain attributes, not buffers: banks are no part of the backbone's state (or fingerprint).
        self.lora: LoRABank | None = None
        self.adapters: list[AdapterBank] = []

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
        for bank in self.adapters:
            out = bank.apply(out, routing)
        return out


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of each row's token states over its unpadded tokens: (B, T, d), (B, T) -> (B, d)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


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
        mean = masked_mean(hidden, attention_mask)
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


class TaskBanks:
    """The banks of one backbone: its wrapped projections and the heads, stacked for resident tasks.

    Args:
        backbone: the frozen model whose projections get wrapped (in place) on first use.
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        self._like = next(backbone.parameters())  # dtype and device of every stacked tensor
        self._holder = RoutingHolder()
        self._layers: dict[str, MultiTaskLayer] = {}
        self.heads: HeadBank | None = None

    @property
    def device(self) -> torch.device:
        return self._like.device

    def projection(self, name: str) -> nn.Module:
        """The frozen projection ``name`` (unwrapped). Raises AttributeError if there is none."""
        layer = self._layers.get(name)
        return layer.base_layer if layer is not None else self.backbone.get_submodule(name)

    def restack(self, adapters: list[TaskAdapter]) -> None:
        """Restack every projection's and head's tensors: ``adapters[i]`` takes slot i + 1."""
        for name in {n for a in adapters for n in a.modules}:
            self._wrap(name)
        for name, layer in self._layers.items():
            layer.lora = _lora_bank(name, adapters, self._like)
            layer.adapters = _adapter_banks(name, adapters, self._like)
        self.heads = _head_bank(adapters, self._like)

    def apply_heads(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, slots: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's head on its states: (logits (B, L), mean-pooled states (B, d)).

        Without any head (only backbone rows, nothing resident) the logits are (B, 1) zeros.
        """
        if self.heads is None:
            return hidden.new_zeros(len(slots), 1), masked_mean(hidden, attention_mask)
        uniform = slots[0] if all(s == slots[0] for s in slots) else None
        slot_tensor = torch.tensor(slots, device=self.device)
        return self.heads.apply(hidden, attention_mask, slot_tensor, uniform)

    @contextmanager
    def routing(self, slots: list[int]) -> Iterator[RowRouting]:
        """Route the forward passes inside the block: row i uses slot ``slots[i]`` (0: none)."""
        self._holder.current = RowRouting(slots, self.device)
        try:
            yield self._holder.current
        finally:
            self._holder.current = None

    def _wrap(self, name: str) -> None:
        if name not in self._layers:
            parent_name, _, child = name.rpartition(".")
            parent = self.backbone.get_submodule(parent_name) if parent_name else self.backbone
            layer = MultiTaskLayer(getattr(parent, child), self._holder)
            setattr(parent, child, layer)
            self._layers[name] = layer


# -- stacking ------------------------------------------------------------------------------------------
def _zeros(n: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((n, *shape), dtype=like.dtype, device=like.device)


def _lora_bank(name: str, adapters: list[TaskAdapter], like: torch.Tensor) -> LoRABank | None:
    users = [(i + 1, a.lora[name]) for i, a in enumerate(adapters) if name in a.lora]
    if not users:
        return None
    rank = max(w.a.shape[0] for _, w in users)
    d_in, d_out = users[0][1].a.shape[1], users[0][1].b.shape[0]
    a, b = (
        _zeros(len(adapters) + 1, (rank, d_in), like),
        _zeros(len(adapters) + 1, (d_out, rank), like),
    )
    for slot, w in users:  # zero-padded to the largest rank; the scale is folded into B
        a[slot, : w.a.shape[0]] = w.a
        b[slot, :, : w.b.shape[1]] = w.b * w.scale
    return LoRABank(a, b, frozenset(slot for slot, _ in users))


def _adapter_banks(name: str, adapters: list[TaskAdapter], like: torch.Tensor) -> list[AdapterBank]:
    by_act: dict[str, list] = {}
    for i, a in enumerate(adapters):
        if name in a.adapters:
            by_act.setdefault(a.adapters[name].activation, []).append((i + 1, a.adapters[name]))
    banks = []
    n = len(adapters) + 1
    for activation, users in by_act.items():
        m = max(w.down_weight.shape[0] for _, w in users)
        d = users[0][1].down_weight.shape[1]
        dw, db, uw, ub = (
            _zeros(n, (m, d), like),
            _zeros(n, (m,), like),
            _zeros(n, (d, m), like),
            _zeros(n, (d,), like),
        )
        for slot, w in users:  # zero-padded bottleneck: act(0) = 0 for every supported activation
            k = w.down_weight.shape[0]
            dw[slot, :k], db[slot, :k] = w.down_weight, w.down_bias
            uw[slot, :, :k], ub[slot] = w.up_weight, w.up_bias
        banks.append(AdapterBank(dw, db, uw, ub, activation, frozenset(s for s, _ in users)))
    return banks


def _head_bank(adapters: list[TaskAdapter], like: torch.Tensor) -> HeadBank | None:
    """Every resident classification task's head by slot (generation tasks' slots stay zero)."""
    with_head = [a for a in adapters if a.head is not None]
    if not with_head:
        return None
    labels = max(a.num_labels for a in with_head)
    d = with_head[0].head.hidden_size
    n = len(adapters) + 1
    weight, bias = _zeros(n, (labels, d), like), _zeros(n, (labels,), like)
    cls = torch.zeros(n, dtype=torch.bool, device=like.device)
    for slot, a in enumerate(adapters, start=1):
        if a.head is None:
            continue
        linear = a.head.classifier
        weight[slot, : a.head.num_labels] = linear.weight.detach()
        bias[slot, : a.head.num_labels] = linear.bias.detach()
        cls[slot] = a.head.pooling == "cls"
    return HeadBank(weight, bias, cls, [0] + [a.num_labels for a in adapters])
