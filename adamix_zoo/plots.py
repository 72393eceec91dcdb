"""PNG plots of a run: the training curve, and the spread of single adapters around the merged one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt


def plot_curve(
    history: list[dict[str, Any]], path: str | Path, main_metric: str | None, title: str = ""
) -> Path:
    """Train loss, and beside it dev ``main_metric``, against the step.

    Args:
        history: records with "step", "loss" and, when ``main_metric`` is given, "metrics"
            (as in metrics.jsonl). ``main_metric`` None draws the loss alone (runs scored only at
            the end, such as the generation recipe).
    """
    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 2 if main_metric else 1, figsize=(9 if main_metric else 6, 3.5),
                             squeeze=False)
    left = axes[0][0]
    left.plot(steps, [r["loss"] for r in history], marker="o")
    left.set(xlabel="step", ylabel="train loss" + (" (mean since last eval)" if main_metric else ""))
    if main_metric:
        right = axes[0][1]
        right.plot(steps, [r["metrics"][main_metric] for r in history], marker="o", color="tab:green")
        right.set(xlabel="step", ylabel=f"dev {main_metric}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_expert_spread(analysis: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Violin + box of the single adapters' dev metric, with the merged adapter as a line.

    Args:
        analysis: the dict of ``adamix_zoo.evaluation.analyze_experts``.
    """
    singles = analysis["fixed"] + analysis["random"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    if len(singles) > 1:
        ax.violinplot([singles], showextrema=False)
    ax.boxplot([singles], widths=0.15)
    ax.scatter([1] * len(singles), singles, s=12, color="tab:gray", zorder=3, label="single adapters")
    ax.axhline(analysis["merged"], color="tab:red", linestyle="--", label="merged")
    ax.set(xticks=[1], xticklabels=[f"K={analysis['num_experts']}"], ylabel=f"dev {analysis['metric']}")
    ax.set_title(title or "single adapters vs merged")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
