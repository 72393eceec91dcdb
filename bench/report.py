"""Write benchmark results: bench/results/<name>.json and a section of docs/BENCHMARKS.md.

Each benchmark owns one section between ``<!-- <name>:begin -->`` and ``<!-- <name>:end -->``
markers, so scripts can re-run independently without clobbering each other's tables.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from adamix_zoo.runtime import resolve_precision, select_device

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nMeasured numbers, each with the command that produced it.\n"


def data_root(required: str) -> Path:
    """$ADAMIX_DATA_DIR, else ../shared/data beside the checkout; exits when ``required`` (a path
    under it) is missing."""
    root = Path(os.environ.get("ADAMIX_DATA_DIR") or ROOT.parent / "shared" / "data")
    if not (root / required).exists():
        raise SystemExit(f"no {required} under {root}: set ADAMIX_DATA_DIR")
    return root


def simulate(run_config: dict[str, Any], timeout: float) -> tuple[dict[str, Any], float]:
    """A Flower simulation of the project's app (a local SuperLink, its logs beside the run's
    ``output-dir``): the run's final_metrics.json and its wall seconds.

    Raises:
        SystemExit: the run wrote no final metrics (``flwr run`` exits 0 when the ServerApp fails),
            with the tail of Flower's log.
    """
    from adamix_zoo.formats.files import FINAL_METRICS_FILE
    from federation.runtime import LocalFederation

    out = Path(run_config["output-dir"])
    start = time.perf_counter()
    with LocalFederation(simulation=True, log_dir=out.parent / "flower-logs") as fed:
        text = fed.run(run_config, timeout=timeout)
    wall = time.perf_counter() - start
    if not (out / FINAL_METRICS_FILE).exists():
        raise SystemExit(f"the federated run {out} failed:\n{text[-4000:]}")
    return json.loads((out / FINAL_METRICS_FILE).read_text()), wall


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "fast_bf16": bf16_is_fast(),
        "date": time.strftime("%Y-%m-%d"),
    }


def bf16_is_fast() -> bool:
    """Whether this machine's bf16 matmuls are fast: the library's own 'auto' precision decision."""
    return resolve_precision("auto", select_device()) == "bf16"


def require_fast_bf16(precision: str, what: str) -> None:
    """Exit, naming the problem, before ``what`` runs at ``precision`` "bf16" on a machine whose bf16
    matmuls are slow (a CPU without AMX or AVX-512 bf16). There bf16 is emulated: a 1024x384x1536
    matmul took 990 ms against fp32's 18 ms on an AVX2-only EPYC, so a bf16 protocol would not
    finish, and switching it to fp32 would make its runs incomparable with the recorded ones."""
    if precision != "bf16" or bf16_is_fast():
        return
    capability = torch.backends.cpu.get_cpu_capability()
    raise SystemExit(
        f"{what} runs in bf16 autocast, and this CPU ({capability}) has no fast bf16 matmul (AMX or "
        "AVX-512 bf16), where it is tens of times slower than fp32. Run it on such a CPU or a CUDA GPU; "
        "the finished runs are kept and the rest resume there."
    )


def write_json(name: str, results: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path


def write_section(name: str, markdown: str) -> Path:
    """Replace (or append) the ``name`` section of docs/BENCHMARKS.md."""
    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)
    return BENCHMARKS_MD


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
