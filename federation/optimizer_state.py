"""A client's AdamW state kept between the rounds it trains (``client-optimizer-state=keep``).

The usual FL client builds a fresh AdamW every round. Its moments start empty, so its first step
moves every coordinate by the full learning rate in the sign of one batch's gradient, and a round of
a few local steps never lets the second moment settle. With ``keep``, each client's AdamW moments and
step count stay in its ``Context.state`` between the rounds it is sampled for, and its next round
continues that optimizer on the new global experts, as DiLoCo's workers keep their inner optimizer
(Douillard et al., 2023). Nothing more travels. The state costs the client two copies of its
trainable tensors. Measured with 5 of 20 clients sampled a round, it trailed fresh optimizers on both
selection seeds: a sampled client's state is rounds old (docs/FEDERATION.md).

State tensors are named ``<parameter>/exp_avg``, ``<parameter>/exp_avg_sq`` and ``<parameter>/step``.
"""

from __future__ import annotations

import torch
from torch import nn

STATE_KEY = "optimizer-state"  # Context.state: the client's kept AdamW state
MOMENTS = ("exp_avg", "exp_avg_sq")


class KeptOptimizerState:
    """AdamW state by parameter name, restored into a round's optimizer and captured after it.

    Args:
        tensors: a previous round's ``tensors`` (empty or None: the client's first round).
    """

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.tensors = dict(tensors or {})

    def restore(self, optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> None:
        """Give ``optimizer`` the kept state of ``params`` (trainable parameters by name).

        Raises:
            ValueError: kept state that names no trainable parameter, lacks one of its tensors, or
                does not fit its parameter's shape.
        """
        names = sorted({key.rsplit("/", 1)[0] for key in self.tensors})
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"kept optimizer state names {len(unknown)} tensors this client does not "
                             f"train (first: {unknown[:2]})")
        for name in names:
            param = params[name]
            missing = [k for k in (*MOMENTS, "step") if f"{name}/{k}" not in self.tensors]
            if missing:
                raise ValueError(f"kept optimizer state of {name} lacks {missing}")
            for key in MOMENTS:
                shape = tuple(self.tensors[f"{name}/{key}"].shape)
                if shape != tuple(param.shape):
                    raise ValueError(f"kept optimizer state {name}/{key} has shape {shape}, expected "
                                     f"{tuple(param.shape)}")
            # AdamW keeps its step count as a float32 scalar on the CPU (not capturable, not fused)
            optimizer.state[param] = {
                "step": self.tensors[f"{name}/step"].reshape(()).to(torch.float32).clone(),
                **{k: self.tensors[f"{name}/{k}"].to(param.device, param.dtype).clone() for k in MOMENTS},
            }

    def capture(self, optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> None:
        """Keep the state ``optimizer`` holds for ``params`` (CPU float32 copies); a parameter that
        never took a step keeps what it had."""
        for name, param in params.items():
            state = optimizer.state.get(param)
            if not state:
                continue
            for key in MOMENTS:
                self.tensors[f"{name}/{key}"] = state[key].detach().to("cpu", torch.float32).clone()
            self.tensors[f"{name}/step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1).cpu()
