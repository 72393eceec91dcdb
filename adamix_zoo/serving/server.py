"""The HTTP server: FastAPI over one ``ServingEngine``, with dynamic mixed-task batching.

Endpoints: ``POST /v1/predict``, ``POST /v1/generate`` (generation tasks on a causal LM backbone),
``GET /v1/tasks``, ``POST /v1/tasks/load``, ``POST /v1/tasks/{task}/unload``, ``GET /v1/stats``,
``GET /metrics`` (Prometheus), ``GET /healthz``; OpenAI-compatible ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/classify`` (``openai_api``); OpenAPI at ``/docs``. Bodies are
JSON whatever their content type. With an API key every route but ``/healthz`` needs
``Authorization: Bearer <key>``. Every bad request gets a 4xx whose ``detail`` says what is wrong;
it never reaches the batch, so everyone else keeps being served; a server-side fault is a 503.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from adamix_zoo.serving import openai_api
from adamix_zoo.serving.batcher import DynamicBatcher
from adamix_zoo.serving.codec import MAX_BEAMS, Generated, Prediction
from adamix_zoo.serving.engine import ServingEngine
from adamix_zoo.serving.errors import (
    FingerprintMismatchError,
    InputError,
    ServerFaultError,
    TaskExistsError,
    UnknownTaskError,
)
from adamix_zoo.serving.loading import allowed_folder
from adamix_zoo.serving.metrics import ServerMetrics
from adamix_zoo.serving.middleware import OPENAI_PATHS, BearerAuthMiddleware, JsonBodyMiddleware, error_response
from adamix_zoo.serving.residency import TaskInfo

# A registry reference (e.g. ``namespace/task@version``) -> its local entry folder. Raises KeyError
# when there is no such entry, ValueError when it cannot be used. The CLI builds one from the
# registry (``commands.registry_resolver``); serving itself never imports the registry.
ReferenceResolver = Callable[[str], Path]


@dataclass
class ServerSettings:
    """Batching, request limits and loading.

    Args:
        max_batch_size: rows per mixed-task forward pass.
        max_wait_ms: how long a request may wait for others to share its batch.
        max_inputs: the most inputs one request may send.
        allow_load: whether ``/v1/tasks/load`` and ``/unload`` are enabled (off by default).
        resolve_reference: turns a ``reference`` of ``/v1/tasks/load`` into a folder; None: the
            server loads by path only.
        load_dirs: the folders under which ``/v1/tasks/load`` may read a ``path`` (none: paths
            are refused, references only).
        api_key: when set, every route but ``/healthz`` needs ``Authorization: Bearer <api_key>``.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_inputs: int = 64
    allow_load: bool = False
    resolve_reference: ReferenceResolver | None = None
    load_dirs: list[Path] = field(default_factory=list)
    api_key: str | None = None


# -- request and response bodies ---------------------------------------------------------------------
class PredictRequest(BaseModel):
    task: str = Field(description="An attached task (see GET /v1/tasks).", examples=["sst2"])
    inputs: str | list[str | list[str]] = Field(
        description="One input or a list; each a sentence or a [text_a, text_b] pair. "
        "A bare list of strings is several sentences: wrap a single pair as [[a, b]].",
        examples=[["a gripping, funny film", ["A man plays.", "Someone is playing."]]],
    )


class PredictionOut(BaseModel):
    label: str | None = Field(description="Predicted class (null for regression).")
    score: float = Field(description="Probability of the label, or the regression value.")
    scores: dict[str, float] | None = Field(
        description="Probability of every class (null for regression)."
    )


class PredictResponse(BaseModel):
    task: str
    version: str = Field(description="Version of the adapter that answered.")
    predictions: list[PredictionOut]


class GenerateRequest(BaseModel):
    task: str | None = Field(
        description="An attached generation task; null continues the raw text with the backbone.",
        examples=["e2e"],
    )
    inputs: str | list[str] = Field(
        description="One source or a list (e.g. an E2E meaning representation); the task's prompt "
        "template turns each into a prompt.",
        examples=[["name[The Eagle], eatType[coffee shop], food[French]"]],
    )
    max_new_tokens: int = Field(default=64, ge=1, description="Most tokens generated per input.")
    num_beams: int = Field(
        default=1, ge=1, le=MAX_BEAMS, description="1: greedy; more: beam search."
    )


class GenerateResponse(BaseModel):
    task: str | None
    version: str = Field(description="Version of the adapter that answered ('' for the backbone).")
    outputs: list[str]


class TasksResponse(BaseModel):
    tasks: list[TaskInfo] = Field(description="problem: classification, regression or lm.")


class LoadRequest(BaseModel):
    model_config = ConfigDict(populate_by_name=True)  # "reference" or its short alias "ref"

    path: str | None = Field(default=None, description="A merged task folder on the server.")
    reference: str | None = Field(
        default=None, alias="ref",
        description="A registry entry (namespace/task@version) or a Hub entry (hf://user/repo@revision).",
    )
    task: str | None = Field(default=None, description="Serve it under this name.")
    head: str | None = Field(default=None, description="One head of a cross-task merged entry.")
    label_names: list[str] | None = None
    replace: bool = Field(
        default=False, description="Replace a task already served (its reported version changes)."
    )


class UnloadResponse(BaseModel):
    task: str
    unloaded: bool


# -- the app -----------------------------------------------------------------------------------------
def create_app(engine: ServingEngine, settings: ServerSettings | None = None) -> FastAPI:
    """Build the FastAPI application serving ``engine`` (run it with uvicorn)."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics(lambda: len(engine.resident_tasks()), lambda: len(engine.task_names()))
    run_predict = metrics.counted("predict", engine.predict_encoded, engine.resident_tasks)
    batcher = DynamicBatcher(run_predict, settings.max_batch_size, settings.max_wait_ms)
    # Generation rows are batched apart: a decode loop of many steps, not one forward pass.
    run_generate = metrics.counted("generate", engine.generate_encoded, engine.resident_tasks)
    generator = DynamicBatcher(run_generate, settings.max_batch_size, settings.max_wait_ms)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        await generator.start()
        yield
        await generator.stop()
        await batcher.stop()

    app = FastAPI(
        title="adamix-zoo",
        description="Many AdaMix task adapters served from one frozen backbone, in mixed-task batches.",
        lifespan=lifespan,
    )
    app.state.engine, app.state.settings = engine, settings
    app.state.batcher, app.state.generator = batcher, generator
    app.state.latencies_ms = deque(maxlen=100_000)
    app.state.metrics, app.state.revisions = metrics, {}  # task -> times replaced by a load
    _add_error_handlers(app)
    _add_latency_middleware(app)
    predict_rows = _add_predict_routes(app, engine, batcher, settings)
    _add_generate_route(app, engine, generator, settings)
    _add_task_routes(app, engine, settings)
    openai_api.register(app, engine, generator, settings.max_inputs, predict_rows)

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    async def prometheus() -> Response:
        """Prometheus text format: requests, latency, rows, batch sizes, resident adapters, evictions."""
        return Response(metrics.exposition(), media_type=metrics.content_type)

    app.add_middleware(JsonBodyMiddleware)
    if settings.api_key:
        app.add_middleware(BearerAuthMiddleware, api_key=settings.api_key)  # outermost: runs first
    return app


def reported_version(app: FastAPI, task: str | None, version: str | None) -> str:
    """The version the server reports: the adapter's, with ``+rN`` once a load replaced it N times."""
    revision = app.state.revisions.get(task, 0)
    return f"{version or ''}+r{revision}" if revision else version or ""


def _add_predict_routes(
    app: FastAPI, engine: ServingEngine, batcher: DynamicBatcher, settings: ServerSettings
) -> None:
    async def predict_rows(task: str, inputs: Any) -> tuple[str, list[Prediction]]:
        """(reported version, answers) of one task's inputs, through the batcher."""
        inputs = _request_inputs(inputs, settings)
        if not engine.has_task(task):
            raise UnknownTaskError(f"unknown task {task!r}; attached: {engine.task_names()}")
        if engine.generates(task):
            raise InputError(f"task {task!r} generates text: use POST /v1/generate")
        rows = engine.encode(inputs, task)  # validated here, so a bad input never joins a batch
        answers: list[Prediction] = await batcher.submit([task] * len(rows), rows)
        return reported_version(app, task, answers[0].version), answers

    @app.post("/v1/predict", response_model=PredictResponse, tags=["predict"])
    async def predict(body: PredictRequest) -> PredictResponse:
        """Labels and probabilities (or regression values) of one task for one or many inputs."""
        version, answers = await predict_rows(body.task, body.inputs)
        return PredictResponse(
            task=body.task,
            version=version,
            predictions=[
                PredictionOut(label=a.label, score=a.score, scores=a.scores) for a in answers
            ],
        )

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        """Liveness and what is served."""
        return {
            "status": "ok",
            "backbone": engine.backbone_id,
            "fingerprint": engine.fingerprint,
            "tasks": engine.task_names(),
            "resident": engine.resident_tasks(),
        }

    @app.get("/v1/stats", tags=["health"])
    async def stats() -> dict[str, Any]:
        """Server-side latency percentiles of /v1/predict and what the batch workers did."""
        return {
            "latency_ms": latency_summary(list(app.state.latencies_ms)),
            "batches": vars(app.state.batcher.stats),
            "generation_batches": vars(app.state.generator.stats),
        }

    return predict_rows


def _request_inputs(inputs: Any, settings: ServerSettings) -> list[Any]:
    """A request's inputs as a list, refused when empty or over the per-request limit."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    if not inputs:
        raise InputError("inputs is empty: send at least one input")
    if len(inputs) > settings.max_inputs:
        raise InputError(f"{len(inputs)} inputs in one request; the limit is {settings.max_inputs}")
    return inputs


def _add_generate_route(
    app: FastAPI, engine: ServingEngine, generator: DynamicBatcher, settings: ServerSettings
) -> None:
    @app.post("/v1/generate", response_model=GenerateResponse, tags=["generate"])
    async def generate(body: GenerateRequest) -> GenerateResponse:
        """Text from a generation task (greedy or beam search), batched with other tasks' rows."""
        inputs = _request_inputs(body.inputs, settings)
        tasks = [body.task] * len(inputs)
        # Validated and tokenized here, so a bad input never joins a batch.
        rows = engine.encode_prompts(tasks, inputs, body.max_new_tokens, body.num_beams)
        answers: list[Generated] = await generator.submit(tasks, rows)
        version = reported_version(app, body.task, answers[0].version)
        return GenerateResponse(task=body.task, version=version, outputs=engine.decode(answers))


def _add_task_routes(app: FastAPI, engine: ServingEngine, settings: ServerSettings) -> None:
    @app.get("/v1/tasks", response_model=TasksResponse, tags=["tasks"])
    async def tasks() -> TasksResponse:
        """Every attached task: kind, version, labels, source folder, whether it is in memory."""
        # In a thread: the engine's lock is held while a batch runs, and the loop must not wait.
        infos = await asyncio.get_running_loop().run_in_executor(None, engine.tasks)
        return TasksResponse(tasks=[_reported(app, i) for i in infos])

    @app.post("/v1/tasks/load", response_model=TasksResponse, tags=["tasks"])
    async def load(body: LoadRequest) -> TasksResponse:
        """Attach a task from a folder path or a registry reference (all heads of a merged entry)."""
        _require_load(settings)
        if (body.path is None) == (body.reference is None):
            raise InputError(
                "give exactly one of 'path' (a task folder) or 'reference' (a registry entry)"
            )
        loop = asyncio.get_running_loop()
        if body.path is not None:
            folder = allowed_folder(body.path, settings.load_dirs)
        elif settings.resolve_reference is None:
            raise NoResolverError(
                "this server cannot resolve registry references (it was started without a "
                "registry): give 'path', a task folder on the server"
            )
        else:
            folder = await loop.run_in_executor(None, settings.resolve_reference, body.reference)
        served = set(engine.task_names())
        infos = await loop.run_in_executor(
            None,
            lambda: engine.attach_all(folder, body.task, body.label_names, body.head, body.replace),
        )
        for info in infos:
            if info.task in served:  # replaced: what it reports changes, so clients can tell
                app.state.revisions[info.task] = app.state.revisions.get(info.task, 0) + 1
        return TasksResponse(tasks=[_reported(app, i) for i in infos])

    @app.post("/v1/tasks/{task}/unload", response_model=UnloadResponse, tags=["tasks"])
    async def unload(task: str) -> UnloadResponse:
        """Detach a task (its folder is left alone)."""
        _require_load(settings)
        await asyncio.get_running_loop().run_in_executor(None, engine.detach, task)
        return UnloadResponse(task=task, unloaded=True)


def _reported(app: FastAPI, info: TaskInfo) -> TaskInfo:
    return replace(info, version=reported_version(app, info.task, info.version))


class LoadDisabledError(PermissionError):
    """Loading and unloading are switched off for this server."""


class NoResolverError(ValueError):
    """A load by registry reference on a server that was given no reference resolver."""


def _require_load(settings: ServerSettings) -> None:
    if not settings.allow_load:
        raise LoadDisabledError(
            "loading and unloading tasks is disabled on this server (start it with --allow-load)"
        )


def latency_summary(values: list[float]) -> dict[str, float | int]:
    """Count, p50, p90, p99 and max of latencies in milliseconds (nearest-rank percentiles)."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        rank = math.ceil(
            q * len(ordered) - 1e-9
        )  # nearest rank; the epsilon absorbs 0.99 * 100 > 99
        return ordered[min(len(ordered), max(1, rank)) - 1]

    return {
        "count": len(ordered),
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": ordered[-1],
    }


def _add_latency_middleware(app: FastAPI) -> None:
    @app.middleware("http")
    async def record_latency(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        seconds = time.perf_counter() - start
        if request.url.path == "/v1/predict" and response.status_code == 200:
            app.state.latencies_ms.append(seconds * 1000.0)
        route = getattr(request.scope.get("route"), "path", "other")  # the template: few labels
        app.state.metrics.observe_request(route, response.status_code, seconds)
        return response


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        path, errors = request.url.path, err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            ctx = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {})
            message = f"malformed JSON: {ctx.get('error', 'cannot parse the request body')}"
            return error_response(path, 400, message)
        parts = [
            f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in errors[:5]
        ]
        param = str(errors[0].get("loc", ("",))[-1]) if errors else None
        # OpenAI's API answers 400 for a bad parameter; the native routes keep FastAPI's 422.
        status = 400 if path.startswith(OPENAI_PATHS) else 422
        return error_response(path, status, "invalid request: " + "; ".join(parts), param)

    statuses = {
        UnknownTaskError: 404,
        TaskExistsError: 409,
        InputError: 400,
        FingerprintMismatchError: 409,
        LoadDisabledError: 403,
        KeyError: 404,
        ValueError: 400,
        ServerFaultError: 503,
    }
    for error_type, status in statuses.items():
        app.add_exception_handler(error_type, _handler(status))


def _handler(status: int):
    async def handle(request: Request, err: Exception) -> JSONResponse:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        if status == 503:
            message = f"server fault (not your request; retry later): {message}"
        return error_response(request.url.path, status, message, getattr(err, "param", None))

    return handle
