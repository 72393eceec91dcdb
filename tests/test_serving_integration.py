"""`adamix-zoo serve` as a real process on the packaged all-MiniLM-L6-v2, mixed tasks over loopback."""

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from adamix_zoo import AdaMixConfig, AdaMixModel, load_merged, save_merged
from adamix_zoo.backbones import fingerprint, resolve_backbone
from adamix_zoo.formats.files import HEAD_FILE, METADATA_FILE
from adamix_zoo.heads import ClassificationHead, TaskModel, load_head, save_head
from tests.test_serving_utils import free_port

pytestmark = pytest.mark.integration
TEXTS = [
    "a gripping, funny film",
    "dull and far too long",
    "the plot is thin but the acting shines",
    ("A man is playing a guitar.", "Someone plays an instrument."),
]


def _task(root, name: str, kind: str, labels: int, path: str):
    torch.manual_seed(len(name))
    model = AdaMixModel(AutoModel.from_pretrained(path), AdaMixConfig(kind=kind, num_experts=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    folder = save_merged(model, root / name, base_model="minilm-l6")
    save_head(ClassificationHead(384, labels), folder / HEAD_FILE)
    meta = {
        "task": name,
        "version": "7",
        "label_names": None if labels == 1 else ["neg", "pos"],
        "base_model": {
            "id": "minilm-l6",
            "fingerprint": fingerprint(AutoModel.from_pretrained(path)),
        },
    }
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    return folder


@torch.no_grad()
def _offline(folder, tokenizer, path) -> list[torch.Tensor]:
    """Each text through the task's merged model alone: probabilities, or the regression value."""
    model = TaskModel(
        load_merged(AutoModel.from_pretrained(path), folder), load_head(folder / HEAD_FILE)
    ).eval()
    out = []
    for text in TEXTS:
        logits = model(
            **tokenizer(*([text] if isinstance(text, str) else text), return_tensors="pt")
        )[0]
        out.append(logits if logits.numel() == 1 else torch.softmax(logits, -1))
    return out


def test_serve_process_answers_mixed_concurrent_requests(tmp_path):
    path = resolve_backbone("minilm-l6")
    tokenizer = AutoTokenizer.from_pretrained(path)
    folders = {
        "sent": _task(tmp_path, "sent", "lora", 2, path),
        "sim": _task(tmp_path, "sim", "adapter", 1, path),
    }
    expected = {name: _offline(folder, tokenizer, path) for name, folder in folders.items()}
    port = free_port()
    args = [
        sys.executable,
        "-c",
        "from adamix_zoo.cli import main; main()",
        "serve",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-wait-ms",
        "20",
    ] + [a for n, f in folders.items() for a in ("--task", f"{n}={f}")]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)

        async def ask(http, task):
            inputs = [list(t) if isinstance(t, tuple) else t for t in TEXTS]
            return task, (
                await http.post("/v1/predict", json={"task": task, "inputs": inputs})
            ).json()

        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                return await asyncio.gather(*(ask(http, t) for t in ["sent", "sim"] * 4))

        for task, body in asyncio.run(run()):
            assert body["version"] == "7"
            for want, prediction in zip(expected[task], body["predictions"]):
                if task == "sim":
                    assert prediction["score"] == pytest.approx(want.item(), abs=1e-4)
                else:
                    assert list(prediction["scores"]) == ["neg", "pos"]
                    torch.testing.assert_close(
                        torch.tensor(list(prediction["scores"].values())),
                        want,
                        atol=1e-4,
                        rtol=1e-4,
                    )
        assert httpx.get(f"{url}/v1/stats").json()["batches"]["requests"] == 8
    finally:
        process.terminate()
        process.wait(timeout=30)
