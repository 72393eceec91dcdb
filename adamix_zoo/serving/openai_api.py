"""OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/classify``.

As in vLLM and LoRAX, ``model`` chooses the adapter: the backbone's id continues raw text, a task's
name serves that task (its prompt template applies). Completion rows of any tasks and settings go
through the same generation batcher as ``/v1/generate`` and decode together when their settings
match. ``stream: true`` sends one server-sent event per token, then ``data: [DONE]``. Errors have
OpenAI's shape (``middleware.error_response``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from adamix_zoo.serving.batcher import DynamicBatcher
from adamix_zoo.serving.codec import Generated, GenerationRow
from adamix_zoo.serving.engine import ServingEngine
from adamix_zoo.serving.errors import InputError, UnknownTaskError


class ParamError(InputError):
    """A request parameter out of range (OpenAI's ``param`` names it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, ...)

    model: str = Field(description="A generation task (GET /v1/models), or the backbone's id.")
    prompt: str | list[str] = Field(description="One source or a list (the task's template applies).")
    max_tokens: int = Field(default=16, description="Most tokens generated per choice.")
    temperature: float = Field(default=1.0, description="0: greedy; > 0: sampling.")
    top_p: float = Field(default=1.0, description="Nucleus sampling mass (with temperature > 0).")
    n: int = Field(default=1, description="Choices per prompt.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings.")
    seed: int | None = Field(default=None, description="Seed of the sampling (reproducible answers).")
    stream: bool = Field(default=False, description="Server-sent events, one per token.")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="A classification or regression task.")
    input: str | list[str | list[str]] = Field(description="Inputs as in /v1/predict's 'inputs'.")


Predict = Callable[[str, Any], Any]  # (task, inputs) -> awaitable (version, [Prediction])


def register(
    app: FastAPI, engine: ServingEngine, generator: DynamicBatcher, max_inputs: int, predict: Predict
) -> None:
    """Add the OpenAI-compatible routes to ``app``; ``predict`` is the server's /v1/predict path."""

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict[str, Any]:
        """The backbone and one model per attached task (``model`` in the other routes)."""
        owner = {"object": "model", "created": 0, "owned_by": "adamix-zoo"}
        data = [{"id": engine.backbone_id, **owner, "root": engine.backbone_id, "parent": None}]
        data += [{"id": t, **owner, "root": engine.backbone_id, "parent": engine.backbone_id}
                 for t in engine.task_names()]  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest) -> Any:
        """Text completions of a generation task (OpenAI's legacy completions API)."""
        task, prompts = _check(engine, body, max_inputs)
        rows = engine.encode_prompts([task] * len(prompts), prompts, body.max_tokens, 1)
        rows = [_with_settings(row, body) for row in rows for _ in range(body.n)]
        tasks = [task] * len(rows)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            return StreamingResponse(_stream(engine, generator, tasks, rows, body, meta),
                                     media_type="text/event-stream")  # fmt: skip
        answers: list[Generated] = await generator.submit(tasks, rows)
        choices = [_choice(engine, i, a, body) for i, a in enumerate(answers)]
        prompt_tokens = sum(len(r.input_ids) for r in rows[:: body.n])
        usage = _usage(prompt_tokens, sum(len(a.token_ids) for a in answers))
        return {**meta, "object": "text_completion", "choices": choices, "usage": usage}

    @app.post("/v1/classify", tags=["openai"])
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        """vLLM's classification API: labels and class probabilities of a task's inputs."""
        _, answers = await predict(body.model, body.input)
        data = [{"index": i, "label": a.label, "probs": list((a.scores or {}).values()) or [a.score],
                 "num_classes": len(a.scores or {}) or 1} for i, a in enumerate(answers)]  # fmt: skip
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": body.model, "data": data}  # fmt: skip


def _check(engine: ServingEngine, body: CompletionRequest, max_inputs: int) -> tuple[str | None, list[str]]:
    """The task ``model`` names (None: the backbone) and the prompts, or an error naming the param."""
    task = None if body.model == engine.backbone_id else body.model
    if task is not None and not engine.has_task(task):
        raise UnknownTaskError(f"the model {body.model!r} does not exist; see GET /v1/models")
    if task is not None and not engine.generates(task):
        raise ParamError("model", f"model {body.model!r} is a classification task: use POST /v1/classify")
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    checks = [
        ("n", body.n >= 1, "n must be >= 1"),
        ("prompt", 1 <= len(prompts) * body.n <= max_inputs,
         f"{len(prompts)} prompts x n={body.n} choices; send 1..{max_inputs} per request"),
        ("max_tokens", body.max_tokens >= 1, "max_tokens must be >= 1"),
        ("temperature", 0 <= body.temperature <= 2, "temperature must be in [0, 2]"),
        ("top_p", 0 < body.top_p <= 1, "top_p must be in (0, 1]"),
        ("stop", len(_stops(body)) <= 4 and all(_stops(body)), "stop: at most 4 non-empty strings"),
    ]
    for param, ok, message in checks:
        if not ok:
            raise ParamError(param, message)
    return task, prompts


def _stops(body: CompletionRequest) -> list[str]:
    return [] if body.stop is None else [body.stop] if isinstance(body.stop, str) else list(body.stop)


def _with_settings(row: GenerationRow, body: CompletionRequest, on_token=None) -> GenerationRow:
    """The row with the request's sampling settings (greedy rows share one setting whatever else)."""
    if body.temperature == 0:
        return dataclasses.replace(row, on_token=on_token)
    return dataclasses.replace(row, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                               on_token=on_token)  # fmt: skip


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one was found."""
    cuts = [text.index(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _choice(engine: ServingEngine, index: int, answer: Generated, body: CompletionRequest) -> dict[str, Any]:
    text, stopped = _cut(engine.tokenizer.decode(answer.token_ids, skip_special_tokens=True), _stops(body))
    finish = "stop" if stopped or len(answer.token_ids) < body.max_tokens else "length"
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


async def _stream(
    engine: ServingEngine, generator: DynamicBatcher, tasks: list, rows: list[GenerationRow],
    body: CompletionRequest, meta: dict[str, Any],
) -> AsyncIterator[str]:
    """One SSE chunk per decoded token of every choice, the finish reasons, then ``[DONE]``."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def listener(index: int):
        return lambda token: loop.call_soon_threadsafe(queue.put_nowait, (index, token))

    rows = [dataclasses.replace(r, on_token=listener(i)) for i, r in enumerate(rows)]
    done = asyncio.ensure_future(generator.submit(tasks, rows))
    choices = [_StreamedChoice(engine, body) for _ in rows]

    def chunk(index: int, text: str, finish: str | None) -> str:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**meta, 'object': 'text_completion', 'choices': [choice]})}\n\n"

    while not (done.done() and queue.empty()):
        waiter = asyncio.ensure_future(queue.get())
        await asyncio.wait([waiter, done], return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            continue
        index, token = waiter.result()
        if (delta := choices[index].add(token)) is not None:
            yield chunk(index, delta, None)
    try:
        answers: list[Generated] = done.result()
    except Exception as err:  # noqa: BLE001 - the status line is sent; report it in the stream
        yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"
        return
    for index, answer in enumerate(answers):
        for delta in choices[index].finish(answer.token_ids):
            yield chunk(index, delta, None)
        yield chunk(index, "", choices[index].finish_reason(answer.token_ids))
    yield "data: [DONE]\n\n"


class _StreamedChoice:
    """The text of one streamed choice so far: token ids in, text deltas out (cut at eos and stop)."""

    def __init__(self, engine: ServingEngine, body: CompletionRequest) -> None:
        self.tokenizer, self.stops, self.max_tokens = engine.tokenizer, _stops(body), body.max_tokens
        self.ids: list[int] = []
        self.sent = ""
        self.ended = self.stopped = False

    def add(self, token: int) -> str | None:
        """The text this token adds (None: nothing new, or the choice has ended)."""
        if self.ended or token == self.tokenizer.eos_token_id or len(self.ids) >= self.max_tokens:
            self.ended = True
            return None
        self.ids.append(token)
        text, self.stopped = _cut(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)
        self.ended = self.stopped
        if text.endswith("\ufffd") and not self.stopped:  # half of a multi-byte character: wait
            return None
        delta, self.sent = text[len(self.sent) :], text
        return delta or None

    def finish(self, final: list[int]) -> list[str]:
        """Deltas of the tokens the finished answer has beyond those already streamed."""
        deltas = [self.add(t) for t in final[len(self.ids) :]] if not self.ended else []
        text, _ = _cut(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)
        tail = text[len(self.sent) :]
        self.sent = text
        return [d for d in deltas if d] + ([tail] if tail else [])

    def finish_reason(self, final: list[int]) -> str:
        return "stop" if self.stopped or len(final) < self.max_tokens else "length"
