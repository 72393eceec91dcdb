"""`make demo`: the whole job on the packaged all-MiniLM-L6-v2 and the local GLUE data, about five
minutes on 2 CPU cores (most of it the Flower simulation, whose clients run one at a time).

    1. train     AdaMix-LoRA on SST-2 (4 experts, stochastic routing, consistency loss, merged at
                 eval): dev accuracy against the same model before training
    2. publish   the run into a registry (runs/demo-zoo) as an immutable entry
    3. federate  AdaMix through Flower (simulation engine, its own SuperLink): 2 clients holding
                 shards of SST-2; only the adapter experts travel, heads stay on the clients; the
                 adapter is published with the federation's provenance
    4. serve     `adamix-zoo serve` on both adapters (one frozen backbone, mixed-task batches),
                 queried over HTTP, then stopped; the commands to do it yourself are printed
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from adamix_zoo.evaluation import evaluate_model
from adamix_zoo.recipes.glue import RunSetup, TrainArgs, TrainResult, fit, prepare

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("ADAMIX_DATA_DIR", ROOT.parent / "shared" / "data"))
OUTPUT_DIR = ROOT / "runs" / "demo-sst2-adamix-lora"
FEDERATION_DIR = ROOT / "runs" / "demo-federation"
ZOO = ROOT / "runs" / "demo-zoo"  # the demo's own registry, so the user's zoo stays untouched
FEDERATED_NAME = "sst2-federated"  # both adapters are SST-2: the federated one is served renamed
QUERIES = [  # (task, inputs) sent concurrently, so the server batches both adapters together
    ("sst2", ["a gripping, beautifully acted film", "a tedious, lifeless two hours"]),
    (FEDERATED_NAME, ["a tedious, lifeless two hours", "a gripping, beautifully acted film"]),
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
        sys.executable, "-m", "adamix_zoo", "federate", "--tasks", "sst2", "--clients", "2",
        "--rounds", "2", "--local-steps", "40", "--data-dir", str(DATA_DIR),
        "--output-dir", str(FEDERATION_DIR), "--store", str(ZOO),
        "--run-config", "train-limit=2000 eval-limit=200 max-length=64",
    ]
    print("\n== federated AdaMix-LoRA with Flower: " + " ".join(command[2:]))
    subprocess.run(command, check=True)
    result = json.loads((FEDERATION_DIR / "federation_result.json").read_text())
    return result["published"]


def serve_commands(store: Path, entries: list[str], port: int) -> list[str]:
    """`adamix-zoo serve` on ``entries`` (NAME=REF or REF) of ``store``, and a curl per query."""
    serve = ["adamix-zoo", "serve", "--store", str(store)]
    for entry in entries:
        serve += ["--entry", entry]
    curls = [
        "curl -s localhost:%d/v1/predict -d '%s'" % (port, json.dumps({"task": t, "inputs": x}))
        for t, x in QUERIES
    ]
    return [" ".join(serve + ["--port", str(port)]), *curls]


def serve(store: Path, entries: list[str], backbone: str = "minilm-l6", timeout: float = 300.0) -> list[dict]:
    """Start the real HTTP server on ``entries``, send ``QUERIES`` over HTTP, stop it; the answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = serve_commands(store, entries, port)[0].split()[1:]
    command = [sys.executable, "-m", "adamix_zoo", *command, "--backbone", backbone]
    print(f"\n== serving over HTTP: {' '.join(command[2:])}")
    server = subprocess.Popen(command)
    try:
        _wait_ready(server, f"http://127.0.0.1:{port}/healthz", timeout)
        answers = [_post(f"http://127.0.0.1:{port}/v1/predict", {"task": t, "inputs": x}) for t, x in QUERIES]
    finally:
        server.terminate()
        server.wait(timeout=30)
    for (task, inputs), answer in zip(QUERIES, answers):
        for text, p in zip(inputs, answer["predictions"]):
            print(f"[{task} {answer['version'][:19]}] {p['label']:<9} p={p['score']:.2f}  {text}")
    return answers


def _wait_ready(server: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"adamix-zoo serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"adamix-zoo serve was not ready within {timeout:.0f} s")


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def next_steps(entries: list[str]) -> None:
    print("\n== try it yourself (in another terminal for the curl lines) ==")
    for line in serve_commands(ZOO.relative_to(ROOT), entries, 8000):
        print(line)


def main() -> None:
    start = time.perf_counter()
    setup = prepare(configure())
    before = baseline(setup)
    result = train(setup)
    report(before, result, time.perf_counter() - start)
    central = publish(result)
    federated = [ref for ref in federate() if "/sst2@" in ref][0]
    entries = [central.split("@")[0], f"{FEDERATED_NAME}={federated.split('@')[0]}"]
    serve(ZOO, entries)
    next_steps(entries)
    print(f"\ndemo finished in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
