"""Serving verbs: ``serve`` (HTTP, FastAPI + uvicorn), and ``predict`` / ``generate`` (one offline
mixed-task batch each). The one serving module that may import the registry (lazily): it builds
the reference resolver (``registry_resolver``) that the server is handed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from adamix_zoo.serving.engine import ServingEngine
    from adamix_zoo.serving.server import ReferenceResolver

# Options shared by the verbs.
Tasks = Annotated[
    list[str],
    typer.Option(
        "--task", "-t", help="A merged task folder to attach, as PATH or NAME=PATH (repeatable)."
    ),
]
Entries = Annotated[
    list[str],
    typer.Option(
        "--entry",
        "-e",
        help="A registry entry to attach, namespace/task@version or NAME=namespace/task@version "
        "(repeatable; all heads of a merged entry).",
    ),
]
Backbone = Annotated[str, typer.Option(help="Backbone alias, folder or hub id.")]
Store = Annotated[
    str | None,
    typer.Option(
        "--store", help="Registry store folder (default: $ADAMIX_ZOO_HOME, as for publish/list)."
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        help="float32, bfloat16, or auto (bf16 on CUDA and on CPUs with AMX / AVX-512 bf16); "
        "answers are float32 either way."
    ),
]
Device = Annotated[
    str | None, typer.Option(help="cpu or cuda (default: cuda when available).")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object per input.")]
LM = Annotated[
    bool,
    typer.Option(
        "--lm", help="Load the backbone as a causal LM, to serve generation tasks (e.g. e2e)."
    ),
]


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``predict`` and ``generate`` to ``app``."""
    app.command()(serve)
    app.command()(predict)
    app.command()(generate)


def _engine(
    backbone: str,
    device: str | None,
    task: list[str],
    entry: list[str],
    store: str | None,
    **kwargs,
) -> ServingEngine:
    """Load the backbone once and attach every task folder and registry entry."""
    from adamix_zoo.serving.engine import ServingEngine

    engine = ServingEngine.from_pretrained(backbone, device=device, **kwargs)
    sources = []
    for spec in task:
        name, sep, path = spec.partition("=")
        sources.append((Path(path), name) if sep else (Path(spec), None))
    resolve = registry_resolver(store)
    for spec in entry:
        name, sep, ref = spec.partition("=")
        sources.append((resolve(ref), name) if sep else (resolve(spec), None))
    for folder, name in sources:
        for info in engine.attach_all(folder, task=name):
            typer.echo(
                f"attached {info.task} ({info.problem}, {info.kind}, version {info.version}) "
                f"from {folder}",
                err=True,
            )
    return engine


def registry_resolver(root: str | None = None) -> ReferenceResolver:
    """A resolver of registry references (``namespace/task@version``) -> verified entry folders,
    in the store at ``root`` (default: the registry's home), for the engine and the server. A Hub
    reference ``hf://user/repo[@revision]`` is pulled into that store first (every sha256 checked).

    The resolver raises ValueError when the registry package is not installed, the entry fails
    verification or the Hub cannot be reached, and KeyError (the registry's EntryNotFoundError)
    when there is no such entry.
    """

    def resolve(reference: str) -> Path:
        try:
            from registry import Store  # optional: adamix_zoo never needs the registry
            from registry.remote import pull_hub
        except ImportError as err:
            raise ValueError(
                f"loading by registry reference needs the registry package ({err}); give a path"
            ) from err
        if not reference.startswith("hf://"):
            return Store(root).get(reference)
        repo, _, revision = reference.removeprefix("hf://").partition("@")
        try:
            return pull_hub(Store(root), repo, revision=revision or None).path
        except (KeyError, ValueError):
            raise
        except Exception as err:  # network and Hub errors: one clear line, not a traceback
            raise ValueError(f"cannot pull {reference}: {type(err).__name__}: {err}") from err

    return resolve


def _task_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """TASK=TEXT arguments -> (task, text)."""
    rows = []
    for spec in inputs:
        name, sep, text = spec.partition("=")
        if not sep or not text:
            raise typer.BadParameter(f"input {spec!r} is not TASK=TEXT")
        rows.append((name, text))
    return rows


def _bad_parameter(err: Exception) -> typer.BadParameter:
    return typer.BadParameter(str(err.args[0] if isinstance(err, KeyError) else err))


def serve(
    task: Tasks = [],  # noqa: B006 - typer reads the default; it is never mutated
    entry: Entries = [],  # noqa: B006
    backbone: Backbone = "minilm-l6",
    lm: LM = False,
    store: Store = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    capacity: Annotated[
        int, typer.Option(help="Most adapters kept in memory; others reload on demand.")
    ] = 16,
    max_batch_size: Annotated[int, typer.Option(help="Rows per mixed-task batch.")] = 32,
    max_wait_ms: Annotated[
        float, typer.Option(help="How long a request waits for others to batch with.")
    ] = 5.0,
    max_inputs: Annotated[int, typer.Option(help="Most inputs in one request.")] = 64,
    max_length: Annotated[
        int | None, typer.Option(help="Most tokens per input (default: the model's limit).")
    ] = None,
    allow_load: Annotated[
        bool,
        typer.Option(help="Enable /v1/tasks/load and /unload (registry references and --load-dir)."),
    ] = False,
    load_dir: Annotated[
        list[str],
        typer.Option(help="A folder /v1/tasks/load may read task folders under (repeatable)."),
    ] = [],  # noqa: B006
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="ADAMIX_ZOO_API_KEY",
            help="Require 'Authorization: Bearer KEY' on every endpoint but /healthz.",
        ),
    ] = None,
    dtype: Dtype = "float32",
    threads: Annotated[
        int | None,
        typer.Option(help="Intra-op threads of the forward passes (default: all cores but one)."),
    ] = None,
    device: Device = None,
) -> None:
    """Serve task adapters from one frozen backbone, batching requests of different tasks together.

    Example:

        adamix-zoo serve --task sst2=runs/sst2/merged --task runs/rte/merged --port 8000

        curl -s localhost:8000/v1/predict -d '{"task": "sst2", "inputs": ["a gripping film"]}'

        adamix-zoo serve --lm --backbone smollm2-135m --task e2e=runs/e2e/merged

        curl -s localhost:8000/v1/generate -d '{"task": "e2e", "inputs": ["name[Aromi]"]}'

        curl -s localhost:8000/v1/completions -d '{"model": "e2e", "prompt": "Data: name[Aromi]\\nText:"}'

    OpenAPI docs at http://HOST:PORT/docs; Prometheus metrics at /metrics.
    """
    _passive_openmp()
    import torch
    import uvicorn

    from adamix_zoo.serving.server import ServerSettings, create_app

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    torch.set_num_threads(threads or max(1, cores - 1))  # a core left for the event loop and neighbours
    _warn_if_exposed(host, api_key)
    try:
        engine = _engine(
            backbone, device, task, entry, store, lm=lm, capacity=capacity, max_length=max_length,
            dtype=dtype,
        )
    except (KeyError, ValueError) as err:
        raise _bad_parameter(err) from None
    settings = ServerSettings(
        max_batch_size, max_wait_ms, max_inputs, allow_load, registry_resolver(store),
        load_dirs=[Path(d) for d in load_dir], api_key=api_key,
    )
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="warning")


def _passive_openmp() -> None:
    """Restart this ``adamix-zoo serve`` process with ``OMP_WAIT_POLICY=PASSIVE`` unless it is set.

    OpenMP reads it when torch loads (already done here). Threads spinning while they wait for work
    cost little on an idle machine, but beside another busy process (a training job) they compete
    with it and with the server's own threads. Set OMP_WAIT_POLICY yourself to keep your policy.
    """
    if os.environ.get("OMP_WAIT_POLICY"):
        return
    argv = list(getattr(sys, "orig_argv", []))
    is_cli = len(argv) > 1 and (Path(argv[1]).name == "adamix-zoo" or argv[1:3] == ["-m", "adamix_zoo"])
    if is_cli:  # not inside another program (a test runner) that merely called serve()
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, argv)


def _warn_if_exposed(host: str, api_key: str | None) -> None:
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(
            f"WARNING: serving on {host} WITHOUT an API key: anyone who can reach this port can "
            "use it. Pass --api-key (or set ADAMIX_ZOO_API_KEY), or bind 127.0.0.1.",
            fg=typer.colors.RED, err=True, bold=True,
        )


def predict(
    inputs: Annotated[
        list[str], typer.Argument(help="TASK=TEXT, or TASK=TEXT_A|||TEXT_B for a pair.")
    ],
    task: Tasks = [],  # noqa: B006
    entry: Entries = [],  # noqa: B006
    backbone: Backbone = "minilm-l6",
    store: Store = None,
    as_json: AsJson = False,
    dtype: Dtype = "float32",
    device: Device = None,
) -> None:
    """Answer inputs of several tasks in ONE mixed-task forward pass of one backbone (no server).

    Example:

        adamix-zoo predict -t sst2=runs/sst2/merged -t rte=runs/rte/merged \\
            "sst2=a gripping, funny film" "rte=A man sleeps.|||Nobody is awake."
    """
    rows = [
        (name, tuple(text.split("|||", 1)) if "|||" in text else text)
        for name, text in _task_inputs(inputs)
    ]
    try:
        engine = _engine(
            backbone, device, task, entry, store, capacity=max(8, len({r[0] for r in rows})),
            dtype=dtype,
        )
        answers = engine.predict([r[0] for r in rows], [r[1] for r in rows])
    except (KeyError, ValueError) as err:
        raise _bad_parameter(err) from None
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


def generate(
    inputs: Annotated[list[str], typer.Argument(help="TASK=SOURCE, e.g. 'e2e=name[Aromi]'.")],
    task: Tasks = [],  # noqa: B006
    entry: Entries = [],  # noqa: B006
    backbone: Backbone = "smollm2-135m",
    store: Store = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per input.")] = 64,
    num_beams: Annotated[int, typer.Option(help="1: greedy; more: beam search.")] = 1,
    as_json: AsJson = False,
    dtype: Dtype = "float32",
    device: Device = None,
) -> None:
    """Generate for inputs of several generation tasks in ONE batch on one causal LM (no server).

    Example:

        adamix-zoo generate -t e2e=runs/e2e/merged -t webnlg=runs/webnlg/merged \\
            "e2e=name[Aromi], eatType[coffee shop]" "webnlg=Aromi | food | Italian"
    """
    rows = _task_inputs(inputs)
    try:
        engine = _engine(
            backbone, device, task, entry, store, lm=True,
            capacity=max(8, len({r[0] for r in rows})), dtype=dtype,
        )
        outputs = engine.generate(
            [r[0] for r in rows], [r[1] for r in rows], max_new_tokens, num_beams
        )
    except (KeyError, ValueError) as err:
        raise _bad_parameter(err) from None
    for (name, text), output in zip(rows, outputs):
        if as_json:
            typer.echo(json.dumps({"task": name, "input": text, "output": output}))
        else:
            typer.echo(f"{name:>16}  {output}")
