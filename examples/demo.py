"""`make demo`: the whole job on the packaged all-MiniLM-L6-v2 and the local GLUE data, about five
minutes on 2 CPU cores (most of it the Flower simulation, whose clients run one at a time).

    1. train     AdaMix-LoRA on SST-2 (4 experts, stochastic routing, consistency loss, merged at
                 eval): dev accuracy against the same model before training
    2. publish   the run into a registry (runs/demo-zoo) as an immutable entry
    3. federate  AdaMix through Flower (simulation engine, its own SuperLink): 4 clients holding
                 SST-2 or RTE; only the adapter experts travel, heads stay on the clients; both
                 tasks' adapters are published with the federation's provenance
    4. serve     one frozen backbone answers a mixed SST-2 / RTE batch in one forward pass
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from adamix_zoo.evaluation import evaluate_model
from adamix_zoo.recipes.glue import RunSetup, TrainArgs, TrainResult, fit, prepare

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("ADAMIX_DATA_DIR", ROOT.parent / "shared" / "data"))
OUTPUT_DIR = ROOT / "runs" / "demo-sst2-adamix-lora"
FEDERATION_DIR = ROOT / "runs" / "demo-federation"
ZOO = ROOT / "runs" / "demo-zoo"  # the demo's own registry, so the user's zoo stays untouched
MIXED_BATCH = [
    ("sst2", "a gripping, beautifully acted film"),
    ("rte", ("The cat sat on the mat all afternoon.", "A cat was sitting.")),
    ("sst2", "a tedious, lifeless two hours"),
    ("rte", ("Paris is the capital of France.", "Berlin is the capital of France.")),
]


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
        max_steps=120,
        eval_every=60,
        lr=3e-3,
        head_lr=1e-2,
        seed=0,
        analyze_experts=True,
        analysis_samples=2,
    )


def baseline(setup: RunSetup) -> dict[str, float]:
    """The same model before any training step."""
    return evaluate_model(setup.model, setup.loaders.validation, setup.task, setup.device)


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


def publish(result: TrainResult) -> str:
    from registry import Store

    info = Store(ZOO).publish(result.output_dir, namespace="demo")
    print(f"\npublished {info.ref} into {ZOO}")
    return str(info.ref)


def federate() -> list[str]:
    """The same job through Flower, as a user runs it: `adamix-zoo federate` (it prints metrics)."""
    command = [
        sys.executable, "-m", "adamix_zoo", "federate", "--tasks", "sst2,rte", "--clients", "4",
        "--rounds", "2", "--local-steps", "15", "--data-dir", str(DATA_DIR),
        "--output-dir", str(FEDERATION_DIR), "--registry-dir", str(ZOO),
        "--run-config", "train-limit=2000 eval-limit=200 max-length=64",
    ]
    print("\n== federated AdaMix-LoRA with Flower: " + " ".join(command[2:]))
    subprocess.run(command, check=True)
    result = json.loads((FEDERATION_DIR / "federation_result.json").read_text())
    return result["published"]


def serve(refs: list[str]) -> None:
    """One frozen backbone, the federated SST-2 and RTE adapters, one mixed forward pass."""
    from adamix_zoo.serving import ServingEngine
    from registry import Store

    store = Store(ZOO)
    engine = ServingEngine.from_pretrained("minilm-l6")
    for ref in refs:
        engine.attach(store.get(ref), task=store.resolve(ref).task)
    tasks, inputs = zip(*MIXED_BATCH)
    print(f"\n== one backbone, tasks {sorted(engine.task_names())}, one mixed batch ==")
    for task, text, answer in zip(tasks, inputs, engine.predict(list(tasks), list(inputs))):
        shown = " || ".join(text) if isinstance(text, tuple) else text
        print(f"[{task} {answer.version}] {answer.label:<15} p={answer.score:.2f}  {shown}")


def main() -> None:
    start = time.perf_counter()
    setup = prepare(configure())
    before = baseline(setup)
    result = train(setup)
    report(before, result, time.perf_counter() - start)
    publish(result)
    serve(federate())
    print(f"\ndemo finished in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
