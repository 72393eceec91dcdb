"""`make demo`: train AdaMix-LoRA on a real GLUE task with the packaged all-MiniLM-L6-v2 and compare
its dev metric with the same model before training. A few minutes on 2 CPU cores.

Steps, each a function so later stages (registry, federation, serving) can be appended:
    1. configure   the run (task, data, a fixed train subset and max length sized for a CPU)
    2. baseline    evaluate the untrained model (random head, zero-initialised LoRA experts)
    3. train       AdaMix-LoRA: 4 experts, stochastic routing, consistency loss, merged at eval
    4. report      dev metric before vs after, the output folder, merged-vs-single analysis
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from adamix_zoo.evaluation import evaluate
from adamix_zoo.training import RunSetup, TrainArgs, TrainResult, fit, prepare

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("ADAMIX_DATA_DIR", ROOT.parent / "shared" / "data"))
OUTPUT_DIR = ROOT / "runs" / "demo-sst2-adamix-lora"


def configure() -> TrainArgs:
    """SST-2 sentiment: a fixed 2,000-sentence train subset and the 872-sentence dev set."""
    return TrainArgs(
        task="sst2",
        method="adamix-lora",
        backbone="minilm-l6",
        data_dir=str(DATA_DIR),
        output_dir=str(OUTPUT_DIR),
        train_subset=2000,
        max_length=64,
        batch_size=16,
        max_steps=200,
        eval_every=100,
        lr=3e-3,
        head_lr=1e-2,
        seed=0,
        analyze_experts=True,
        analysis_samples=2,
    )


def baseline(setup: RunSetup) -> dict[str, float]:
    """The same model before any training step."""
    return evaluate(setup.model, setup.loaders.validation, setup.task, setup.device)


def train(setup: RunSetup) -> TrainResult:
    return fit(setup)


def report(before: dict[str, float], result: TrainResult, seconds: float) -> None:
    metric = result.main_metric
    print(f"\n== AdaMix-LoRA on SST-2 (all-MiniLM-L6-v2, dev set, {seconds / 60:.1f} min) ==")
    print(f"untrained baseline  {metric}: {before[metric]:.4f}")
    print(f"AdaMix-LoRA (step {result.best_step}) {metric}: {result.best:.4f}  "
          f"({100 * (result.best - before[metric]):+.1f} points)")
    if result.analysis:
        a = result.analysis
        singles = a["fixed"] + a["random"]
        print(f"merged adapter {a['merged']:.4f} vs single adapters "
              f"{min(singles):.4f}..{max(singles):.4f} (median {a['median_single']:.4f})")
    print(f"outputs: {result.output_dir}")
    print(json.dumps({"baseline": before[metric], "trained": result.best, "metric": metric}))


def main() -> None:
    start = time.perf_counter()
    setup = prepare(configure())
    before = baseline(setup)
    result = train(setup)
    report(before, result, time.perf_counter() - start)


if __name__ == "__main__":
    main()
