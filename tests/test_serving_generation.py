"""Generation in the serving engine: one causal LM decodes a batch whose rows belong to different
generation tasks (LoRA and bottleneck adapters, GPT-2 and Llama), greedy and beam search, and each
row gets what its task's merged adapter generates alone; over HTTP and the CLI too."""

import json
import shutil

import httpx
import pytest
import torch
from typer.testing import CliRunner

from adamix_zoo import AdaMixConfig, AdaMixModel, load_merged, save_merged
from adamix_zoo.backbones import fingerprint
from adamix_zoo.formats.files import HEAD_FILE, METADATA_FILE
from adamix_zoo.generation.generate import generate
from adamix_zoo.generation.nlg_tasks import PROMPT_TEMPLATE, get_nlg_task
from adamix_zoo.heads import ClassificationHead, save_head
from adamix_zoo.serving import ServingEngine
from adamix_zoo.serving.engine import InputError, UnknownTaskError
from adamix_zoo.serving.server import ServerSettings, create_app
from tests.test_serving_utils import RunningServer
from tests.tiny import tiny_model, tiny_tokenizer

# 3 specials + 97 words = the tiny models' 100 ids, so every generated id decodes to a word.
WORDS = ["Data:", "Text:"] + [f"w{i}" for i in range(95)]
SOURCES = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9", "w10 w11", "w12 w13 w14"]
ANY_TASK = get_nlg_task("e2e")  # every data-to-text task shares PROMPT_TEMPLATE


def lm_backbone(arch: str) -> torch.nn.Module:
    # init 0.2: confident next-token choices, so float noise cannot flip a greedy pick
    return tiny_model(arch, head="lm", init=0.2)


def make_lm_task(root, name: str, arch: str, kind: str, seed: int, **cfg):
    """A merged generation-task folder (random adapter, no head) as the generation recipe writes it."""
    torch.manual_seed(2000 + seed)
    model = AdaMixModel(
        lm_backbone(arch), AdaMixConfig(kind=kind, num_experts=2, seed=seed, **cfg), head_modules=[]
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5)
    model.merge()
    folder = save_merged(model, root / name, base_model=f"tiny-{arch}")
    meta = {
        "task": name,
        "problem": "lm",
        "prompt_template": PROMPT_TEMPLATE,
        "base_model": {"id": f"tiny-{arch}", "fingerprint": fingerprint(lm_backbone(arch))},
    }
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    return folder


def alone(arch: str, folder, sources: list[str], **kwargs) -> list[str]:
    """What the task's merged adapter generates by itself on a fresh backbone (the io loader)."""
    model = lm_backbone(arch) if folder is None else load_merged(lm_backbone(arch), folder)
    return generate(model, tiny_tokenizer(WORDS), ANY_TASK, sources, max_new_tokens=6, **kwargs)


@pytest.fixture(scope="module")
def llama_tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-tasks")
    return {
        "e2e": make_lm_task(root, "e2e", "llama", "lora", seed=1, rank=4, alpha=8.0),
        "dart": make_lm_task(root, "dart", "llama", "lora", seed=2, rank=8, alpha=32.0),
        "webnlg": make_lm_task(root, "webnlg", "llama", "adapter", seed=3, bottleneck=8),
    }


def llama_engine(tasks, capacity: int = 8) -> ServingEngine:
    engine = ServingEngine(lm_backbone("llama"), tiny_tokenizer(WORDS), capacity=capacity)
    for folder in tasks.values():
        engine.attach(folder)
    return engine


@pytest.mark.parametrize("num_beams", [1, 3])
def test_mixed_task_batch_generates_what_each_task_generates_alone(llama_tasks, num_beams):
    engine = llama_engine(llama_tasks)
    names = ["e2e", "dart", None, "webnlg", "e2e"]
    inputs = [PROMPT_TEMPLATE.format(source=s) if n is None else s for n, s in zip(names, SOURCES)]
    mixed = engine.generate(names, inputs, max_new_tokens=6, num_beams=num_beams)
    expected = [
        alone("llama", None if n is None else llama_tasks[n], [s], num_beams=num_beams)[0]
        for n, s in zip(names, SOURCES)
    ]
    assert mixed == expected
    assert len(set(mixed)) >= 3  # the tasks really answer differently
    assert all(out for out in mixed)


def test_gpt2_conv1d_tasks_and_eviction(tmp_path):
    tasks = {
        "a": make_lm_task(tmp_path, "a", "gpt2", "lora", seed=4),
        "b": make_lm_task(tmp_path, "b", "gpt2", "adapter", seed=5, bottleneck=8),
    }
    engine = ServingEngine(lm_backbone("gpt2"), tiny_tokenizer(WORDS), capacity=1)
    for folder in tasks.values():
        engine.attach(folder)
    # capacity 1: the two tasks decode in two groups (rows of "a", then of "b"), swapping adapters
    names = ["a", "b", "a"]
    assert engine.generate(names, SOURCES[:3], max_new_tokens=6) == [
        alone("gpt2", tasks[n], [s])[0] for n, s in zip(names, SOURCES)
    ]
    assert engine.resident_tasks() == ["b"]  # groups run in order of first appearance


def test_rows_with_different_settings_decode_apart_in_one_call(llama_tasks):
    engine = llama_engine(llama_tasks)
    rows = engine.encode_prompts(["e2e", "dart"], SOURCES[:2], max_new_tokens=3)
    rows += engine.encode_prompts(["dart"], SOURCES[2:3], max_new_tokens=6, num_beams=2)
    out = engine.generate_encoded(["e2e", "dart", "dart"], rows)
    assert [len(g.token_ids) <= n for g, n in zip(out, (3, 3, 6))] == [True] * 3
    assert engine.decode(out)[2] == alone("llama", llama_tasks["dart"], SOURCES[2:3], num_beams=2)[0]
    assert [g.task for g in out] == ["e2e", "dart", "dart"]
    assert out[0].version.startswith("sha256:")


def test_generation_refuses_bad_requests_with_clear_errors(llama_tasks, tmp_path):
    engine = llama_engine(llama_tasks)
    engine.attach(classifier_on_llama(llama_tasks["e2e"], tmp_path / "cls"))
    assert engine.predict("cls", ["w1 w2"])[0].label in ("no", "yes")  # the LM's body classifies
    with pytest.raises(InputError, match="'cls' is a classification task: use predict"):
        engine.generate("cls", ["w1"], max_new_tokens=6)
    with pytest.raises(InputError, match="'e2e' generates text: use generate"):
        engine.predict("e2e", ["w1"])
    with pytest.raises(UnknownTaskError, match="'nope' is not attached"):
        engine.generate("nope", ["w1"], max_new_tokens=6)
    with pytest.raises(InputError, match="num_beams must be in 1..8"):
        engine.generate("e2e", ["w1"], max_new_tokens=6, num_beams=9)
    with pytest.raises(InputError, match="input 1 must be a non-empty string"):
        engine.generate("e2e", ["w1", "  "], max_new_tokens=6)
    with pytest.raises(InputError, match="max_new_tokens must be in 1..63, got 64"):
        engine.generate("e2e", ["w1"])  # the tiny model has 64 positions
    with pytest.raises(InputError, match="exceeds the limit of 64"):
        engine.generate("e2e", [" ".join(["w1"] * 40)], max_new_tokens=30)
    encoder = ServingEngine(lm_backbone("llama").model, tiny_tokenizer(WORDS))  # no LM head
    with pytest.raises(ValueError, match="generation task, but this backbone has no language-model"):
        encoder.attach(llama_tasks["e2e"])
    with pytest.raises(InputError, match="cannot generate"):
        encoder.generate(None, ["w1"], max_new_tokens=6)


def classifier_on_llama(lm_task, folder):
    """A classification task on the causal LM's body: an LM task's adapter plus a head."""
    shutil.copytree(lm_task, folder)
    save_head(ClassificationHead(32, 2), folder / HEAD_FILE)
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta = {k: v for k, v in meta.items() if k != "prompt_template"}
    (folder / METADATA_FILE).write_text(
        json.dumps(dict(meta, task="cls", problem="classification", label_names=["no", "yes"]))
    )
    return folder


def test_a_bad_prompt_template_is_refused_on_attach(llama_tasks, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(llama_tasks["e2e"], folder)
    meta = json.loads((folder / METADATA_FILE).read_text())
    (folder / METADATA_FILE).write_text(json.dumps(dict(meta, prompt_template="Data: {src}")))
    with pytest.raises(ValueError, match="unusable prompt_template"):
        llama_engine({}).attach(folder)


def test_generate_over_http_batches_tasks_and_reports_errors(llama_tasks):
    engine = llama_engine(llama_tasks)
    with RunningServer(create_app(engine, ServerSettings(max_wait_ms=50))) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            answer = http.post(
                "/v1/generate",
                json={"task": "dart", "inputs": SOURCES[:2], "max_new_tokens": 6, "num_beams": 2},
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["outputs"] == alone("llama", llama_tasks["dart"], SOURCES[:2], num_beams=2)
            assert body["version"].startswith("sha256:")
            tasks = {t["task"]: t for t in http.get("/v1/tasks").json()["tasks"]}
            assert tasks["webnlg"]["problem"] == "lm" and tasks["webnlg"]["num_labels"] == 0
            for payload, status, words in [
                ({"task": "nope", "inputs": "w1", "max_new_tokens": 6}, 404, "not attached"),
                ({"task": "e2e", "inputs": [], "max_new_tokens": 6}, 400, "inputs is empty"),
                ({"task": "e2e", "inputs": "w1", "num_beams": 99}, 422, "num_beams"),
            ]:
                reply = http.post("/v1/generate", json=payload)
                assert reply.status_code == status and words in reply.json()["detail"], reply.text
            wrong = http.post("/v1/predict", json={"task": "e2e", "inputs": ["w1"]})
            assert wrong.status_code == 400 and "use POST /v1/generate" in wrong.json()["detail"]
            stats = http.get("/v1/stats").json()
            assert stats["generation_batches"]["rows"] == 2


def test_cli_generate_answers_a_mixed_batch(llama_tasks, tmp_path):
    from adamix_zoo.cli import _register_commands, app

    lm_backbone("llama").save_pretrained(tmp_path / "backbone")
    tiny_tokenizer(WORDS).save_pretrained(tmp_path / "backbone")
    _register_commands()
    args = ["generate", "--backbone", str(tmp_path / "backbone"), "--max-new-tokens", "6", "--json"]
    args += ["-t", str(llama_tasks["e2e"]), "-t", f"d={llama_tasks['dart']}", "e2e=w1 w2 w3", "d=w4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert [x["output"] for x in lines] == [
        alone("llama", llama_tasks["e2e"], ["w1 w2 w3"])[0],
        alone("llama", llama_tasks["dart"], ["w4"])[0],
    ]
    bad = CliRunner().invoke(app, args[:5] + ["x=w1"])
    assert bad.exit_code != 0 and "'x' is not attached" in bad.output
