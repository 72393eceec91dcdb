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
for random tasks; p50/p99 are measured inside the server (request in -> response out). The latency
matrix (``latency_matrix_ms``): client-side p50/p99 for 1, 16 and 64 concurrent clients, idle and beside
a training job (``p99_ms_64_clients`` is its idle 64-client p99).
- bf16: the same mixed batch on a bfloat16 engine (``bf16_vs_fp32_throughput_ratio``, bf16 mixed vs
  single task); the share of all SST-2 dev sentences whose label equals float32's
  (``bf16_argmax_agreement``), and greedy generations of SmolLM2-135M with a random LoRA on E2E dev
  MRs against float32's (``bf16_generation_exact_match``, ``bf16_generation_prefix_agreement``).
- one row: the bare backbone forward of one sentence (``bare_forward_one_row_ms``), one client
  sending one-row requests one after another to an otherwise idle server
  (``idle_single_request_p50_ms``), and the same beside an ``adamix-zoo train`` job this benchmark
  starts (``contended_single_request_p50_ms``), for serve's default threading and three others
  (``contended_threading_study_ms``: intra-op threads on every core or all but one, OpenMP waits
  passive or spinning), and the bare forward beside it with every core and with one thread.
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
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adamix_zoo import AdaMixConfig, AdaMixModel, save_merged  # noqa: E402
from adamix_zoo.backbones import fingerprint, resolve_backbone  # noqa: E402
from adamix_zoo.formats.files import HEAD_FILE, METADATA_FILE  # noqa: E402
from adamix_zoo.formats.run_folder import RunFolder  # noqa: E402
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
    del backbone
    return {
        "seconds": seconds,
        "rows_per_s": {k: batch_size / v for k, v in seconds.items() if k != "bare_one_row"},
        "tokens_per_batch": int(batch["attention_mask"].sum()),
        "padded_length": batch["input_ids"].shape[1],
    }


# -- bf16 against fp32 --------------------------------------------------------------------------------------
E2E = DATA_DIR / "e2e" / "validation.jsonl"
AGREEMENT_MRS, AGREEMENT_TOKENS = 50, 32


def classification_agreement(folders: list[Path], device: str) -> float:
    """Share of SST-2 dev sentences (all of them, tasks in turn) whose label bf16 and fp32 agree on."""
    from adamix_zoo.serving import ServingEngine

    texts = [json.loads(line)["sentence"] for line in SST2.read_text().splitlines()]
    tasks = [f"task{i % NUM_TASKS}" for i in range(len(texts))]
    labels = {}
    for dtype in ("float32", "bfloat16"):
        engine = ServingEngine.from_pretrained("minilm-l6", device=device, capacity=NUM_TASKS, dtype=dtype)
        for folder in folders:
            engine.attach(folder)
        labels[dtype] = [p.label for s in range(0, len(texts), 64)
                         for p in engine.predict(tasks[s : s + 64], texts[s : s + 64])]
    return sum(a == b for a, b in zip(*labels.values())) / len(texts)


def lm_adapter(root: Path) -> Path:
    """A generation-task folder for SmolLM2-135M: a random LoRA (r=4, alpha 32, non-zero B) on its
    default modules, merged, with the data-to-text prompt template."""
    from transformers import AutoModelForCausalLM

    from adamix_zoo.generation.nlg_tasks import PROMPT_TEMPLATE

    backbone = AutoModelForCausalLM.from_pretrained(resolve_backbone("smollm2-135m"))
    base_fp = fingerprint(backbone)
    torch.manual_seed(0)
    wrapped = AdaMixModel(backbone, AdaMixConfig(kind="lora", num_experts=1, rank=4, alpha=32.0), head_modules=[])
    with torch.no_grad():
        for name, p in wrapped.model.named_parameters():
            if name.endswith("adamix_lora_B"):
                p.normal_(0, 0.002)
    return RunFolder(root / "e2e").save_lm_adapter(wrapped, "smollm2-135m", "e2e", base_fp, PROMPT_TEMPLATE)


def generation_agreement(root: Path, device: str) -> dict[str, float]:
    """Greedy generations on AGREEMENT_MRS distinct E2E dev MRs in bf16 against fp32: the share that
    are identical, and the mean share of tokens before the first difference."""
    from adamix_zoo.serving import ServingEngine

    mrs = list(dict.fromkeys(json.loads(line)["meaning_representation"] for line in E2E.read_text().splitlines()))
    mrs = mrs[:AGREEMENT_MRS]
    folder = lm_adapter(root)
    out = {}
    for dtype in ("float32", "bfloat16"):
        engine = ServingEngine.from_pretrained("smollm2-135m", device=device, lm=True, dtype=dtype)
        engine.attach(folder)
        out[dtype] = [text for s in range(0, len(mrs), 16)
                      for text in engine.generate("e2e", mrs[s : s + 16], max_new_tokens=AGREEMENT_TOKENS)]
        tokenizer = engine.tokenizer
    prefix = []
    for a, b in zip(out["float32"], out["bfloat16"]):
        ta, tb = tokenizer(a)["input_ids"], tokenizer(b)["input_ids"]
        same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        prefix.append(same / max(len(ta), len(tb), 1))
    return {"bf16_generation_exact_match": sum(a == b for a, b in zip(out["float32"], out["bfloat16"])) / len(mrs),
            "bf16_generation_prefix_agreement": statistics.fmean(prefix), "generation_mrs": len(mrs)}


# -- server latency --------------------------------------------------------------------------------------
def start_server(
    folders: list[Path], port: int, max_batch_size: int, device: str, threads: int | None = None,
    omp_wait_policy: str | None = None,
) -> subprocess.Popen:
    """``adamix-zoo serve`` on ``folders``; ``threads`` / ``omp_wait_policy`` None: serve's defaults."""
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
    if omp_wait_policy:
        policy, _, dynamic = omp_wait_policy.partition("+")
        env["OMP_WAIT_POLICY"] = policy
        if dynamic:
            env["OMP_DYNAMIC"] = "true"
    if threads:
        args += ["--threads", str(threads)]
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


def single_requests(url: str, text: str, n: int) -> dict[str, float]:
    """p50 and p99 (ms, client side) of ``n`` one-row requests sent one after another."""
    import httpx

    times = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(n + 3):
            start = time.perf_counter()
            http.post("/v1/predict", json={"task": f"task{i % NUM_TASKS}", "inputs": [text]}).raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
    times = sorted(times[3:])  # the first ones load adapters
    return {"p50": statistics.median(times), "p99": times[int(0.99 * (len(times) - 1))]}


def serving(
    folders: list[Path], device: str, max_batch_size: int, measure: Callable[[str], dict], **threading: Any
) -> dict:
    """Start ``adamix-zoo serve`` on a free loopback port, ``measure(url)``, stop it."""
    import socket

    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = start_server(folders, port, max_batch_size, device, **threading)
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
        return {**main, "idle_single_request_p50_ms": single_requests(url, texts[0], requests * 2)["p50"]}

    return serving(folders, device, max_batch_size, measure)


def training_job(tmp: Path) -> subprocess.Popen:
    """``adamix-zoo train`` on SST-2 at its defaults (torch's intra-op threads on every core), long
    enough to outlast the measurement; raises if it is not training 20 s after its start."""
    args = [
        sys.executable, "-m", "adamix_zoo", "train", "--task", "sst2", "--method", "adamix-lora",
        "--data-dir", str(DATA_DIR), "--output-dir", str(tmp / "train"), "--train-subset", "2000",
        "--max-steps", "100000", "--eval-every", "100000", "--no-progress",
    ]  # fmt: skip
    log = tmp / "training-job.log"
    with open(log, "wb") as out:
        trainer = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    time.sleep(20)  # past its start-up, into steady training
    if trainer.poll() is not None:
        raise RuntimeError(f"the training job exited ({trainer.returncode}): {log.read_text()[-2000:]}")
    return trainer


def stop(trainer: subprocess.Popen) -> None:
    trainer.terminate()
    trainer.wait(timeout=60)


# How ``adamix-zoo serve`` may run its forward passes (name -> --threads, OMP_WAIT_POLICY); the first
# is serve's default (every core but one, passive waits).
SERVER_THREADING = {
    "serve default (cores-1 threads, passive)": (None, None),
    "cores-1 threads, spinning": (None, "ACTIVE"),
    "all cores, passive": (0, "PASSIVE"),
    "all cores, spinning": (0, "ACTIVE"),
    "all cores, passive, OMP_DYNAMIC (threads from the load average)": (0, "PASSIVE+DYNAMIC"),
}


def bare_forward_ms(threads: int, n: int = 30) -> float:
    """Median ms of a one-row backbone forward in this process with ``threads`` intra-op threads."""
    from transformers import AutoModel, AutoTokenizer

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    path = resolve_backbone("minilm-l6")
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    batch = tokenizer(sentences(1), return_tensors="pt")
    times = []
    with torch.inference_mode():
        for _ in range(n + 3):
            start = time.perf_counter()
            model(**batch)
            times.append((time.perf_counter() - start) * 1000)
    torch.set_num_threads(before)
    return statistics.median(times[3:])


def threading_study(folders: list[Path], texts: list[str], n: int, device: str) -> dict:
    """One-row requests one after another: p50/p99 per server threading (``SERVER_THREADING``), and
    the bare forward in this process with every core and with one thread."""
    import os

    cores = len(os.sched_getaffinity(0))
    study = {}
    for name, (threads, policy) in SERVER_THREADING.items():
        study[name] = serving(folders, device, 32, lambda url: single_requests(url, texts[0], n),
                              threads=cores if threads == 0 else threads, omp_wait_policy=policy)
    return {"requests": study, "bare_forward_one_row_ms": {f"{t} threads": bare_forward_ms(t) for t in sorted({cores, 1})}}


def contended(folders: list[Path], texts: list[str], n: int, device: str, tmp: Path, job: bool = True) -> dict:
    """``threading_study`` beside a training job (``job=False``: beside whatever runs now)."""
    trainer = training_job(tmp) if job else None
    try:
        study = threading_study(folders, texts, n, device)
    finally:
        if trainer is not None:
            stop(trainer)
    default = next(iter(study["requests"].values()))
    return {"contended_single_request_p50_ms": default["p50"], "contended_single_request_p99_ms": default["p99"],
            "contended_threading_study_ms": study}


# Concurrent clients -> requests each (1-4 inputs, random tasks): about 320 requests per cell but the first.
MATRIX_CLIENTS = {1: 40, 16: 20, 64: 5}


def latency_matrix(folders: list[Path], texts: list[str], max_batch_size: int, device: str, tmp: Path) -> dict:
    """Client-side p50/p99 (ms) for 1, 16 and 64 concurrent clients, on an idle machine and beside the
    2-process training job, each on a fresh server."""
    def measure(url: str) -> dict:
        out = {}
        for clients, requests in MATRIX_CLIENTS.items():
            load = asyncio.run(load_test(url, texts, clients, requests))
            out[str(clients)] = {"p50": load["client_p50_ms"], "p99": load["client_p99_ms"],
                                 "requests_per_s": load["requests_per_s"], "errors": load["errors"]}
        return out

    matrix = {"idle": serving(folders, device, max_batch_size, measure)}
    trainer = training_job(tmp)
    try:
        matrix["beside_training"] = serving(folders, device, max_batch_size, measure)
    finally:
        stop(trainer)
    return matrix


# -- the run ---------------------------------------------------------------------------------------------
def run(batch_size: int, repeats: int, clients: int, requests: int, device: str) -> dict:
    texts = sentences(max(batch_size, 200))
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(Path(tmp))
        speed = throughput(folders, texts, batch_size, repeats, device)
        bf16 = throughput(folders, texts, batch_size, repeats, device, dtype="bfloat16")
        agreement = classification_agreement(folders, device)
        generation = generation_agreement(Path(tmp), device)
        load = latency(folders, texts, clients, requests, batch_size, device)
        idle_study = threading_study(folders, texts, requests * 2, device)
        beside = contended(folders, texts, requests * 2, device, Path(tmp))
        matrix = latency_matrix(folders, texts, batch_size, device, Path(tmp))
    rows, rows16 = speed["rows_per_s"], bf16["rows_per_s"]
    server_ms = load["server"]["latency_ms"]
    return {
        "bf16_vs_fp32_throughput_ratio": rows16["mixed"] / rows["mixed"],
        "bf16_argmax_agreement": agreement,
        **generation,
        "mixed_vs_single_task_throughput_ratio_bf16": rows16["mixed"] / rows16["single"],
        "bare_forward_one_row_ms": speed["seconds"]["bare_one_row"] * 1000,
        "idle_single_request_p50_ms": load.pop("idle_single_request_p50_ms"),
        "p99_ms_64_clients": matrix["idle"]["64"]["p99"],
        **beside,
        "idle_threading_study_ms": idle_study,
        "latency_matrix_ms": matrix,
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
    matrix = results["latency_matrix_ms"]
    idle, beside = results["idle_threading_study_ms"], results["contended_threading_study_ms"]
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
                f"argmax agreement on all SST-2 dev sentences {results['bf16_argmax_agreement']:.3f}, mixed vs "
                f"single task {results['mixed_vs_single_task_throughput_ratio_bf16']:.3f}; greedy generations "
                f"(SmolLM2-135M, a random LoRA, {results['generation_mrs']} E2E dev MRs, {AGREEMENT_TOKENS} "
                f"tokens) identical to float32's: {results['bf16_generation_exact_match']:.2f}, tokens before "
                f"the first difference: {results['bf16_generation_prefix_agreement']:.2f}.",
                "",
                f"One row: bare forward {results['bare_forward_one_row_ms']:.1f} ms; one-row request p50 idle "
                f"{results['idle_single_request_p50_ms']:.1f} ms, beside the training job "
                f"{results['contended_single_request_p50_ms']:.1f} ms; p99 with 64 clients "
                f"{results['p99_ms_64_clients']:.1f} ms.",
                "",
                "One-row requests one after another, on an idle machine and beside the training job "
                "(`adamix-zoo train` at its defaults, busy on every core), by how the server runs its "
                "forward passes (ms):",
                "",
                markdown_table(
                    ["server threading", "idle p50", "beside training p50", "beside training p99"],
                    [[name, idle["requests"][name]["p50"], v["p50"], v["p99"]]
                     for name, v in beside["requests"].items()],
                ),
                "",
                "Bare one-row forward, idle / beside the job: "
                + ", ".join(f"{k} {idle['bare_forward_one_row_ms'][k]:.1f} / {v:.1f} ms"
                            for k, v in beside["bare_forward_one_row_ms"].items())
                + ".",
                "",
                "Why latency collapses beside a busy job: an intra-op parallel region waits for every thread "
                "of its team, and beside a job that keeps every core busy some of those threads wait for the "
                "scheduler, so each of a forward's hundreds of regions costs a time slice. The team, not the "
                "server, is what collapses: the bare forward above with a thread per core against one thread. "
                "`adamix-zoo serve` therefore runs its forward passes on all cores but one with passive "
                "OpenMP waits (`--threads` to change it), so it degrades in proportion to the CPU it gets "
                "(the ratios below).",
                "",
                "Latency as clients see it (ms, p50 / p99; requests of 1-4 inputs for random tasks, each "
                "setting on a fresh server; beside training = beside the training job above):",
                "",
                markdown_table(
                    ["concurrent clients", "idle", "beside training", "ratio of p50s"],
                    [
                        [c, *(f"{m[c]['p50']:.1f} / {m[c]['p99']:.1f}" for m in matrix.values()),
                         f"{matrix['beside_training'][c]['p50'] / matrix['idle'][c]['p50']:.2f}"]
                        for c in matrix["idle"]
                    ],
                ),
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
        help="only the one-row request study (server threading) beside whatever runs now; no files",
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
