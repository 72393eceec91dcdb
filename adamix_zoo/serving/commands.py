"""Serving verbs: ``serve`` (HTTP, FastAPI + uvicorn) and ``predict`` (one offline mixed batch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from adamix_zoo.serving.engine import ServingEngine

TASK_HELP = "A merged task folder to attach, as PATH or NAME=PATH (repeat for more tasks)."
ENTRY_HELP = (
    "A registry entry to attach, namespace/task@version (repeatable; all heads of a merged entry)."
)


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``predict`` to ``app``."""
    app.command()(serve)
    app.command()(predict)


def _engine(
    backbone: str,
    device: str | None,
    task: list[str],
    entry: list[str],
    registry: str | None,
    **kwargs,
) -> ServingEngine:
    """Load the backbone once and attach every task folder and registry entry."""
    from adamix_zoo.serving.engine import ServingEngine
    from adamix_zoo.serving.server import resolve_reference

    engine = ServingEngine.from_pretrained(backbone, device=device, **kwargs)
    sources = []
    for spec in task:
        name, sep, path = spec.partition("=")
        sources.append((Path(path), name) if sep else (Path(spec), None))
    sources += [(resolve_reference(ref, registry), None) for ref in entry]
    for folder, name in sources:
        for info in engine.attach_all(folder, task=name):
            typer.echo(
                f"attached {info.task} ({info.kind}, version {info.version}) from {folder}",
                err=True,
            )
    return engine


def serve(
    task: list[str] = typer.Option([], "--task", "-t", help=TASK_HELP),
    entry: list[str] = typer.Option([], "--entry", "-e", help=ENTRY_HELP),
    backbone: str = typer.Option(
        "minilm-l6", help="Backbone alias, folder or hub id (bare AutoModel)."
    ),
    registry: str | None = typer.Option(
        None, help="Registry store folder (default: the registry's home)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, help="Port to bind."),
    capacity: int = typer.Option(16, help="Most adapters kept in memory; others reload on demand."),
    max_batch_size: int = typer.Option(32, help="Rows per mixed-task forward pass."),
    max_wait_ms: float = typer.Option(
        5.0, help="How long a request waits for others to batch with."
    ),
    max_inputs: int = typer.Option(64, help="Most inputs in one request."),
    max_length: int | None = typer.Option(
        None, help="Most tokens per input (default: the model's limit)."
    ),
    allow_load: bool = typer.Option(
        True, help="Enable the load/unload endpoints (they read server paths)."
    ),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
) -> None:
    """Serve task adapters from one frozen backbone, batching requests of different tasks together.

    Example:

        adamix-zoo serve --task sst2=runs/sst2/merged --task runs/rte/merged --port 8000

        curl -s localhost:8000/v1/predict -d '{"task": "sst2", "inputs": ["a gripping film"]}'

    OpenAPI docs at http://HOST:PORT/docs.
    """
    import uvicorn

    from adamix_zoo.serving.server import ServerSettings, create_app

    try:
        engine = _engine(
            backbone, device, task, entry, registry, capacity=capacity, max_length=max_length
        )
    except (KeyError, ValueError) as err:
        raise typer.BadParameter(str(err.args[0] if isinstance(err, KeyError) else err)) from None
    settings = ServerSettings(max_batch_size, max_wait_ms, max_inputs, allow_load, registry)
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="warning")


def predict(
    inputs: list[str] = typer.Argument(..., help="TASK=TEXT, or TASK=TEXT_A|||TEXT_B for a pair."),
    task: list[str] = typer.Option([], "--task", "-t", help=TASK_HELP),
    entry: list[str] = typer.Option([], "--entry", "-e", help=ENTRY_HELP),
    backbone: str = typer.Option(
        "minilm-l6", help="Backbone alias, folder or hub id (bare AutoModel)."
    ),
    registry: str | None = typer.Option(
        None, help="Registry store folder (default: the registry's home)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per input."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
) -> None:
    """Answer inputs of several tasks in ONE mixed-task forward pass of one backbone (no server).

    Example:

        adamix-zoo predict -t sst2=runs/sst2/merged -t rte=runs/rte/merged \\
            "sst2=a gripping, funny film" "rte=A man sleeps.|||Nobody is awake."
    """
    rows = []
    for spec in inputs:
        name, sep, text = spec.partition("=")
        if not sep or not text:
            raise typer.BadParameter(f"input {spec!r} is not TASK=TEXT")
        rows.append((name, tuple(text.split("|||", 1)) if "|||" in text else text))
    try:
        engine = _engine(
            backbone, device, task, entry, registry, capacity=max(8, len({r[0] for r in rows}))
        )
        answers = engine.predict([r[0] for r in rows], [r[1] for r in rows])
    except (KeyError, ValueError) as err:
        raise typer.BadParameter(str(err.args[0] if isinstance(err, KeyError) else err)) from None
    for (name, text), answer in zip(rows, answers):
        shown = text if isinstance(text, str) else " ||| ".join(text)
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "task": name,
                        "input": text,
                        "label": answer.label,
                        "score": answer.score,
                        "scores": answer.scores,
                        "version": answer.version,
                    }
                )
            )
        else:
            result = (
                f"{answer.label} ({answer.score:.3f})" if answer.label else f"{answer.score:.4f}"
            )
            typer.echo(f"{name:>16}  {result:<24} {shown}")
