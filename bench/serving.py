"""Serving many tasks from one backbone: mixed-task batches vs one task vs PEFT, and server latency.

    .venv/bin/python bench/serving.py            # full: batch 32, 15 repeats, 16 clients x 20 requests
    .venv/bin/python bench/serving.py --quick    # a smoke run (batch 8, 3 repeats, 4 x 5); no files
    .venv/bin/python bench/serving.py --single-request   # only one-row request p50s, as the machine is now

all-MiniLM-L6-v2 with 8 task adapters: LoRA rank 8 on query and value, **random-initialized with a
non-zero B** (throughput does not depend on what the adapters learned), and random 2- or 3-class
heads. Inputs are GLUE SST-2 validation sentences (real lengths), tokenized once beforehand.

- mixed: rows of all 8 tasks in one batch, one ``ServingEngine`` forward pass (gather + bmm).
- single: the same batch, every row one task (the engine's plain single-adapter path).
- peft: PEFT's mixed-batch inference, ``PeftModel(..., adapter_names=[...])`` with the same 8
  adapters loaded on the same backbone, heads applied per task group.
Throughputs are rows per second from medians over interleaved repeats (mixed, single, peft, ...).
Latency: ``adamix-zoo serve`` in a subprocess on 127.0.0.1, concurrent clients sending 1-4 inputs
for random tasks; p50/p99 are measured inside the server (request in -> response out); also with 64
clients (``p99_ms_64_clients``, client side).
- bf16: the same mixed batch on a bfloat16 engine (``bf16_vs_fp32_throughput_ratio``, the share of
  rows whose label equals float32's: ``bf16_argmax_agreement``, and bf16 mixed vs single task).
- one row: the bare backbone forward of one sentence (``bare_forward_one_row_ms``), one client
  sending one-row requests one after another to an otherwise idle server
  (``idle_single_request_p50_ms``), and the same beside a 2-process training job this benchmark
  starts (``contended_single_request_p50_ms``; ``..._spinning_omp`` is the server run with
  ``OMP_WAIT_POLICY=ACTIVE`` and every core, as before serve set a passive policy and left a core).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adamix_zoo import AdaMixConfig, AdaMixModel, save_merged  # noqa: E402
from adamix_zoo.backbones import fingerprint, resolve_backbone  # noqa: E402
from adamix_zoo.formats.files import HEAD_FILE, METADATA_FILE  # noqa: E402
from adamix_zoo.heads import ClassificationHead, save_head  # noqa: E402
from bench.report import machine, markdown_table, write_json, write_section  # noqa: E402

COMMAND = ".venv/bin/python bench/serving.py"
TARGETS = {"mixed_vs_single_task_throughput_ratio": 0.85, "mixed_vs_peft_throughput_ratio": 1.5}
SST2 = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "sst2" / "validation.jsonl"
)
NUM_TASKS, RANK, HIDDEN = 8, 8, 384
DATA_DIR = SST2.parents[2]


def sentences(n: int) -> list[str]:
    """SST-2 validation sentences (real lengths); a fixed synthetic set if the data is absent."""
    if SST2.exists():
        lines = SST2.read_text().splitlines()
        return [json.loads(line)["sentence"] for line in lines[:n]]
    rng = random.Random(0)
    words = [
        "the",
        "a",
        "film",
        "movie",
        "good",
        "bad",
        "very",
        "slow",
        "funny",
        "acting",
        "story",
        "plot",
        "is",
        "was",
        "and",
        "but",
    ]
    return [" ".join(rng.choices(words, k=rng.randint(4, 30))) for _ in range(n)]


def make_adapters(root: Path) -> list[Path]:
    """8 task folders: random LoRA (non-zero B) on query/value + a random head + adamix.json."""
    from transformers import AutoModel

    path = resolve_backbone("minilm-l6")
    backbone = AutoModel.from_pretrained(path)
    base_fp = fingerprint(backbone)
    wrapped = AdaMixModel(backbone, AdaMixConfig(kind="lora", num_experts=1, rank=RANK, alpha=16.0))
    folders = []
    for i in range(NUM_TASKS):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in wrapped.model.named_parameters():
                if name.endswith("adamix_lora_B"):
                    p.normal_(0, 0.02)
                elif name.endswith("adamix_lora_A"):
                    p.normal_(0, 0.05)
        folder = save_merged(wrapped, root / f"task{i}", base_model="minilm-l6")
        labels = 2 + i % 2
        save_head(ClassificationHead(HIDDEN, labels), folder / HEAD_FILE)
        meta = {
            "task": f"task{i}",
            "version": "1",
            "label_names": [f"c{k}" for k in range(labels)],
            "base_model": {"id": "minilm-l6", "fingerprint": base_fp},
        }
        (folder / METADATA_FILE).write_text(json.dumps(meta))
        folders.append(folder)
    return folders


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, device: str
) -> dict[str, float]:
    """Median seconds of each function, run in turn (a, b, c, a, b, c, ...) after one warm-up each."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def peft_runner(
    folders: list[Path], batch: dict, names: list[str], device: str
) -> Callable[[], object]:
    """PEFT's mixed-batch forward with the 8 adapters, then each task's head on its rows."""
    from peft import PeftModel
    from transformers import AutoModel

    from adamix_zoo.heads import load_head

    model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(resolve_backbone("minilm-l6")), folders[0], adapter_name="task0"
    )
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"task{i}")
    model.eval().to(device)
    heads = {f"task{i}": load_head(f / HEAD_FILE).eval().to(device) for i, f in enumerate(folders)}
    batch = {k: v.to(device) for k, v in batch.items()}
    groups = {
        t: torch.tensor([i for i, n in enumerate(names) if n == t], device=device)
        for t in dict.fromkeys(names)
    }

    @torch.inference_mode()
    def run() -> list:
        hidden = model(**batch, adapter_names=names).last_hidden_state
        return [heads[t](hidden[rows], batch["attention_mask"][rows]) for t, rows in groups.items()]

    return run


def throughput(
    folders: list[Path], texts: list[str], batch_size: int, repeats: int, device: str,
    dtype: str = "float32",
) -> dict:
    from adamix_zoo.serving import ServingEngine

    engine = ServingEngine.from_pretrained("minilm-l6", device=device, capacity=NUM_TASKS, dtype=dtype)
    for folder in folders:
        engine.attach(folder)
    batch = {k: v.to(device) for k, v in engine.collate(engine.encode(texts[:batch_size])).items()}
    mixed = [f"task{i % NUM_TASKS}" for i in range(batch_size)]
    single = ["task0"] * batch_size
    backbone = engine.backbone
    runs = {
        "mixed": lambda: engine.forward(mixed, batch),
        "single": lambda: engine.forward(single, batch),
        "backbone": lambda: engine.forward([None] * batch_size, batch),
    }
    if dtype == "float32":  # PEFT's path runs in float32 only here
        runs["peft"] = peft_runner(folders, batch, mixed, device)
    one = {k: v[:1].to(device) for k, v in engine.collate(engine.encode(texts[:1])).items()}
    runs["bare_one_row"] = lambda: engine.backbone(**one)
    with torch.inference_mode():
        seconds = interleaved_medians(runs, repeats, device)
        labels = [p.label for p in engine.predict(mixed, texts[:batch_size])]
    del backbone
    return {
        "labels": labels,
        "seconds": seconds,
        "rows_per_s": {k: batch_size / v for k, v in seconds.items() if k != "bare_one_row"},
        "tokens_per_batch": int(batch["attention_mask"].sum()),
        "padded_length": batch["input_ids"].shape[1],
    }


# -- server latency --------------------------------------------------------------------------------------
def start_server(
    folders: list[Path], port: int, max_batch_size: int, device: str, spinning: bool = False
) -> subprocess.Popen:
    """``adamix-zoo serve`` on ``folders``; ``spinning``: OpenMP's active wait policy, every core."""
    import os

    env = dict(os.environ)
    args = [
        sys.executable,
        "-m",
        "adamix_zoo",
        "serve",
        "--backbone",
        "minilm-l6",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch_size),
        "--max-wait-ms",
        "5",
        "--device",
        device,
    ]
    for i, folder in enumerate(folders):
        args += ["--task", f"task{i}={folder}"]
    if spinning:
        env["OMP_WAIT_POLICY"] = "ACTIVE"
        args += ["--threads", str(os.cpu_count() or 1)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def wait_ready(process: subprocess.Popen, url: str, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"the server exited: {process.stderr.read() if process.stderr else ''}"
            )
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


async def load_test(url: str, texts: list[str], clients: int, requests: int) -> dict:
    import httpx

    rng = random.Random(0)
    plans = [
        [
            (f"task{rng.randrange(NUM_TASKS)}", rng.sample(texts, rng.randint(1, 4)))
            for _ in range(requests)
        ]
        for _ in range(clients)
    ]
    latencies: list[float] = []
    errors = 0

    async def client(plan, http) -> None:
        nonlocal errors
        for task, inputs in plan:
            start = time.perf_counter()
            response = await http.post("/v1/predict", json={"task": task, "inputs": inputs})
            latencies.append((time.perf_counter() - start) * 1000)
            errors += response.status_code != 200

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(p, http) for p in plans))
        wall = time.perf_counter() - start
        stats = (await http.get("/v1/stats")).json()
    latencies.sort()
    return {
        "server": stats,
        "errors": errors,
        "requests": clients * requests,
        "wall_s": wall,
        "requests_per_s": clients * requests / wall,
        "client_p50_ms": latencies[len(latencies) // 2],
        "client_p99_ms": latencies[int(0.99 * (len(latencies) - 1))],
    }


def single_requests(url: str, text: str, n: int) -> float:
    """p50 (ms, client side) of ``n`` one-row requests sent one after another."""
    import httpx

    times = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(n + 3):
            start = time.perf_counter()
            http.post("/v1/predict", json={"task": f"task{i % NUM_TASKS}", "inputs": [text]}).raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[3:])  # the first ones load adapters


def serving(
    folders: list[Path], device: str, max_batch_size: int, measure: Callable[[str], dict], spinning: bool = False
) -> dict:
    """Start ``adamix-zoo serve`` on a free loopback port, ``measure(url)``, stop it."""
    import socket

    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = start_server(folders, port, max_batch_size, device, spinning)
    try:
        wait_ready(process, f"http://127.0.0.1:{port}")
        return measure(f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        process.wait(timeout=30)


def latency(
    folders: list[Path],
    texts: list[str],
    clients: int,
    requests: int,
    max_batch_size: int,
    device: str,
) -> dict:
    def measure(url: str) -> dict:
        main = asyncio.run(load_test(url, texts, clients, requests))  # its server stats: this test's
        many = asyncio.run(load_test(url, texts, 64, max(2, requests // 4)))
        return {**main, "many": many, "idle_single_request_p50_ms": single_requests(url, texts[0], requests * 2)}

    return serving(folders, device, max_batch_size, measure)


def training_job(tmp: Path) -> subprocess.Popen:
    """A 2-process data-parallel AdaMix training run on SST-2 that outlasts the measurement."""
    args = [
        sys.executable, "-m", "adamix_zoo", "train", "--task", "sst2", "--method", "adamix-lora",
        "--data-dir", str(DATA_DIR), "--output-dir", str(tmp / "train"), "--train-subset", "2000",
        "--max-steps", "100000", "--eval-every", "100000", "--nproc", "2", "--no-progress",
    ]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def contended(folders: list[Path], texts: list[str], n: int, device: str, tmp: Path, job: bool = True) -> dict:
    """One-row request p50 beside a training job (``job=False``: beside whatever runs now),
    with serve's passive OpenMP and a spare core, and with spinning OpenMP on every core."""
    trainer = training_job(tmp) if job else None
    try:
        if trainer is not None:
            time.sleep(20)  # past its start-up, into steady training
        out = {}
        for name, spinning in (("contended_single_request_p50_ms", False),
                               ("contended_single_request_p50_ms_spinning_omp", True)):  # fmt: skip
            out[name] = serving(folders, device, 32, lambda url: single_requests(url, texts[0], n), spinning)
        return out
    finally:
        if trainer is not None:
            trainer.terminate()
            trainer.wait(timeout=60)


# -- the run ---------------------------------------------------------------------------------------------
def run(batch_size: int, repeats: int, clients: int, requests: int, device: str) -> dict:
    texts = sentences(max(batch_size, 200))
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(Path(tmp))
        speed = throughput(folders, texts, batch_size, repeats, device)
        bf16 = throughput(folders, texts, batch_size, repeats, device, dtype="bfloat16")
        load = latency(folders, texts, clients, requests, batch_size, device)
        beside = contended(folders, texts, requests * 2, device, Path(tmp))
    rows, rows16 = speed["rows_per_s"], bf16["rows_per_s"]
    server_ms = load["server"]["latency_ms"]
    agree = sum(a == b for a, b in zip(speed["labels"], bf16["labels"])) / len(speed["labels"])
    return {
        "bf16_vs_fp32_throughput_ratio": rows16["mixed"] / rows["mixed"],
        "bf16_argmax_agreement": agree,
        "mixed_vs_single_task_throughput_ratio_bf16": rows16["mixed"] / rows16["single"],
        "bare_forward_one_row_ms": speed["seconds"]["bare_one_row"] * 1000,
        "idle_single_request_p50_ms": load.pop("idle_single_request_p50_ms"),
        "p99_ms_64_clients": load["many"]["client_p99_ms"],
        **beside,
        "mixed_vs_single_task_throughput_ratio": rows["mixed"] / rows["single"],
        "mixed_vs_peft_throughput_ratio": rows["mixed"] / rows["peft"],
        # No adapter implementation can beat the bare backbone: this bounds the ratio above.
        "backbone_vs_peft_throughput_ratio": rows["backbone"] / rows["peft"],
        "mixed_vs_backbone_throughput_ratio": rows["mixed"] / rows["backbone"],
        "latency_p50_ms": server_ms["p50"],
        "latency_p99_ms": server_ms["p99"],
        "throughput_rows_per_s": rows,
        "throughput_rows_per_s_bf16": rows16,
        "seconds_per_batch": {k: v for k, v in speed["seconds"].items() if k != "bare_one_row"},
        "load_test": load,
        "setup": {
            "model": "all-MiniLM-L6-v2",
            "adapters": NUM_TASKS,
            "adapter": f"LoRA r={RANK} q,v, random",
            "batch": batch_size,
            "padded_length": speed["padded_length"],
            "tokens_per_batch": speed["tokens_per_batch"],
            "repeats": repeats,
            "clients": clients,
            "requests_per_client": requests,
            "device": device,
        },
        "machine": machine(),
    }


def report(results: dict) -> None:
    rows = [
        [name, results[name], f">= {target}", "yes" if results[name] >= target else "no"]
        for name, target in TARGETS.items()
    ]
    r, s, load = results["throughput_rows_per_s"], results["setup"], results["load_test"]
    write_section(
        "serving",
        "\n".join(
            [
                "## Serving: mixed-task batches from one backbone",
                "",
                f"all-MiniLM-L6-v2 with {s['adapters']} task adapters ({s['adapter']}-initialized with non-zero B: "
                f"throughput does not depend on trained values), batch {s['batch']} SST-2 sentences (padded length "
                f"{s['padded_length']}), device {s['device']}, {results['machine']['threads']} threads, "
                f"median of {s['repeats']} "
                "interleaved repeats.",
                "",
                markdown_table(["figure", "value", "target", "met"], rows),
                "",
                markdown_table(
                    ["path", "rows/s"],
                    [
                        ["mixed tasks, one engine pass", r["mixed"]],
                        ["one task, same batch", r["single"]],
                        ["PEFT mixed batch (adapter_names)", r["peft"]],
                        ["backbone alone", r["backbone"]],
                    ],
                ),
                "",
                f"Ceiling: the bare backbone is {results['backbone_vs_peft_throughput_ratio']:.3f}x "
                "PEFT's mixed batch, so no adapter path can exceed that ratio against PEFT here; "
                f"the mixed batch runs at {results['mixed_vs_backbone_throughput_ratio']:.3f}x the bare "
                "backbone.",
                "",
                f"Server (`adamix-zoo serve`, loopback, {s['clients']} clients x {s['requests_per_client']} requests "
                f"of 1-4 inputs, random tasks): server-side latency p50 {results['latency_p50_ms']:.1f} ms, p99 "
                f"{results['latency_p99_ms']:.1f} ms; {load['requests_per_s']:.1f} requests/s, {load['errors']} errors.",
                "",
                f"bfloat16: {results['bf16_vs_fp32_throughput_ratio']:.2f}x float32's mixed-batch throughput, "
                f"argmax agreement {results['bf16_argmax_agreement']:.3f}, mixed vs single task "
                f"{results['mixed_vs_single_task_throughput_ratio_bf16']:.3f}.",
                "",
                f"One row: bare forward {results['bare_forward_one_row_ms']:.1f} ms; one-row request p50 idle "
                f"{results['idle_single_request_p50_ms']:.1f} ms, beside a 2-process training job "
                f"{results['contended_single_request_p50_ms']:.1f} ms (spinning OpenMP on every core: "
                f"{results['contended_single_request_p50_ms_spinning_omp']:.1f} ms); p99 with 64 clients "
                f"{results['p99_ms_64_clients']:.1f} ms.",
                "",
                f"Command: `{COMMAND}` (results in `bench/results/serving.json`).",
            ]
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="batch 8, 3 repeats, 4 clients x 5 requests; no files"
    )
    parser.add_argument(
        "--single-request", action="store_true",
        help="only one-row request p50s (passive vs spinning OpenMP) beside whatever runs now; no files",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.single_request:
        with tempfile.TemporaryDirectory() as tmp:
            folders = make_adapters(Path(tmp))
            print(json.dumps(contended(folders, sentences(4), 40, args.device, Path(tmp), job=False)))
        return
    if args.quick:
        results = run(batch_size=8, repeats=3, clients=4, requests=5, device=args.device)
    else:
        results = run(batch_size=32, repeats=15, clients=16, requests=20, device=args.device)
        write_json("serving", results)
        report(results)
    for name, target in TARGETS.items():
        print(f"{name:40s} {results[name]:.3f}  (target >= {target})")
    print(
        f"latency p50 / p99 (server side)          {results['latency_p50_ms']:.1f} / {results['latency_p99_ms']:.1f} ms"
    )
    print("rows/s:", {k: round(v, 1) for k, v in results["throughput_rows_per_s"].items()})
    print(
        f"ceiling (backbone vs PEFT)               {results['backbone_vs_peft_throughput_ratio']:.3f}"
    )


if __name__ == "__main__":
    main()
