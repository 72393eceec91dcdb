"""The OpenAI-compatible routes, driven by the official ``openai`` client against a real server on
127.0.0.1: ``models.list()``, plain / batched / streamed / sampled completions that decode in the
same mixed-task batches as /v1/generate, usage counts, and OpenAI-shaped errors (404, 400, 401)."""

import asyncio

import httpx
import pytest
import torch

from adamix_zoo.serving.codec import GenerationRow
from adamix_zoo.serving.server import ServerSettings, create_app
from tests.test_serving_generation import llama_engine, llama_tasks  # noqa: F401 - fixture
from tests.test_serving_utils import RunningServer

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(llama_tasks):  # noqa: F811
    engine = llama_engine(llama_tasks)
    engine.backbone_id = "tiny-llama"
    with RunningServer(create_app(engine, ServerSettings(max_wait_ms=50, max_inputs=16))) as server:
        yield engine, server


def client(server, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def greedy(engine, task, source: str, max_tokens: int) -> tuple[str, list[int]]:
    """What the task decodes greedily for ``source`` alone (the engine, no server), as raw text."""
    row = engine.encode_prompts([task], [source], max_tokens, 1)[0]
    ids = engine.generate_encoded([task], [GenerationRow(row.input_ids, max_tokens, 1)])[0].token_ids
    return engine.tokenizer.decode(ids, skip_special_tokens=True), row.input_ids


def test_models_list_has_the_backbone_and_every_task(served):
    _, server = served
    ids = [m.id for m in client(server).models.list().data]
    assert ids == ["tiny-llama", "dart", "e2e", "webnlg"]


def test_plain_and_list_prompt_completions_equal_greedy_decoding_alone(served):
    engine, server = served
    one = client(server).completions.create(model="e2e", prompt="w1 w2 w3", max_tokens=6, temperature=0)
    text, prompt_ids = greedy(engine, "e2e", "w1 w2 w3", 6)
    assert one.choices[0].text == text and one.object == "text_completion"
    assert one.usage.prompt_tokens == len(prompt_ids)
    assert one.usage.completion_tokens <= 6 and one.usage.total_tokens == len(prompt_ids) + one.usage.completion_tokens
    assert one.choices[0].finish_reason in ("stop", "length")
    many = client(server).completions.create(model="dart", prompt=["w4", "w5 w6"], max_tokens=5, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert [c.text for c in many.choices] == [greedy(engine, "dart", s, 5)[0] for s in ["w4", "w5 w6"]]
    backbone = client(server).completions.create(model="tiny-llama", prompt="w7", max_tokens=4, temperature=0)
    assert backbone.choices[0].text == greedy(engine, None, "w7", 4)[0]


def test_concurrent_completions_of_different_tasks_decode_in_one_batch(served):
    engine, server = served
    before = httpx.get(f"{server.url}/v1/stats").json()["generation_batches"]

    async def both():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as c:
            return await asyncio.gather(
                *(c.completions.create(model=t, prompt="w8 w9", max_tokens=4, temperature=0)
                  for t in ("e2e", "dart", "webnlg"))
            )  # fmt: skip

    answers = asyncio.run(both())
    after = httpx.get(f"{server.url}/v1/stats").json()["generation_batches"]
    assert after["rows"] - before["rows"] == 3 and after["batches"] - before["batches"] < 3
    for task, answer in zip(("e2e", "dart", "webnlg"), answers):
        assert answer.choices[0].text == greedy(engine, task, "w8 w9", 4)[0]


def test_streaming_sends_one_chunk_per_token_and_the_same_text(served):
    engine, server = served
    full = client(server).completions.create(model="e2e", prompt="w10 w11", max_tokens=6, temperature=0)
    chunks = list(
        client(server).completions.create(model="e2e", prompt="w10 w11", max_tokens=6, temperature=0, stream=True)
    )
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == full.choices[0].text
    assert len([t for t in texts if t]) == full.usage.completion_tokens  # one word per token here
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    with httpx.stream(
        "POST", f"{server.url}/v1/completions",
        json={"model": "e2e", "prompt": "w1", "max_tokens": 3, "temperature": 0, "stream": True},
    ) as raw:  # fmt: skip
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [line for line in raw.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_sampling_is_per_row_seeded_and_n_gives_several_choices(served):
    _, server = served
    c = client(server)
    kwargs = dict(model="webnlg", prompt="w12", max_tokens=6, temperature=1.5, top_p=0.9)
    first = c.completions.create(seed=7, n=3, **kwargs)
    again = c.completions.create(seed=7, n=3, **kwargs)
    assert len(first.choices) == 3 and [x.text for x in first.choices] == [x.text for x in again.choices]
    assert len({x.text for x in first.choices}) > 1  # each row draws its own tokens
    greedy_text = c.completions.create(model="webnlg", prompt="w12", max_tokens=6, temperature=0)
    stopped = c.completions.create(
        model="webnlg", prompt="w12", max_tokens=6, temperature=0, stop=[greedy_text.choices[0].text.split()[1]]
    )
    assert stopped.choices[0].text == greedy_text.choices[0].text.split(" ")[0] + " "
    assert stopped.choices[0].finish_reason == "stop"


def test_errors_have_the_openai_shape_and_status(served):
    _, server = served
    with pytest.raises(openai.NotFoundError) as missing:
        client(server).completions.create(model="nope", prompt="w1", max_tokens=2)
    assert "nope" in missing.value.message and missing.value.status_code == 404
    for bad in ({"temperature": 5}, {"top_p": 0}, {"max_tokens": 0}, {"n": 0}):
        with pytest.raises(openai.BadRequestError) as err:
            client(server).completions.create(model="e2e", prompt="w1", **{"max_tokens": 2, **bad})
        assert err.value.body["param"] == next(iter(bad)), err.value.body
    raw = httpx.post(f"{server.url}/v1/completions", json={"model": "e2e"})
    body = raw.json()["error"]
    assert raw.status_code == 400 and set(body) == {"message", "type", "param", "code"}
    assert body["param"] == "prompt" and body["type"] == "invalid_request_error"


def test_api_key_is_required_everywhere_but_healthz(llama_tasks):  # noqa: F811
    settings = ServerSettings(api_key="s3cret")
    with RunningServer(create_app(llama_engine(llama_tasks), settings)) as server:
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        assert [m.id for m in client(server, "s3cret").models.list().data][1:] == ["dart", "e2e", "webnlg"]
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        for path in ("/v1/tasks", "/metrics", "/docs", "/openapi.json", "/v1/stats"):
            assert httpx.get(f"{server.url}{path}").status_code == 401, path
        refused = httpx.post(f"{server.url}/v1/generate", json={"task": "e2e", "inputs": "w1"})
        assert refused.status_code == 401 and "Bearer" in refused.json()["detail"]
        ok = httpx.post(
            f"{server.url}/v1/generate", json={"task": "e2e", "inputs": "w1", "max_new_tokens": 2},
            headers={"Authorization": "Bearer s3cret"},
        )  # fmt: skip
        assert ok.status_code == 200, ok.text


def test_bf16_greedy_completion_runs(llama_tasks):  # noqa: F811
    engine = llama_engine(llama_tasks)
    from adamix_zoo.serving import ServingEngine
    from tests.test_serving_generation import WORDS, lm_backbone
    from tests.tiny import tiny_tokenizer

    bf16 = ServingEngine(lm_backbone("llama"), tiny_tokenizer(WORDS), dtype="bfloat16")
    bf16.attach(llama_tasks["e2e"])
    assert next(bf16.backbone.parameters()).dtype == torch.bfloat16
    assert len(bf16.generate("e2e", ["w1 w2"], max_new_tokens=3)) == 1
    assert engine.dtype == torch.float32
