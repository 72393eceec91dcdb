"""The README's serving commands, verbatim: its ``serve`` line parses with the CLI and names what
``make demo`` publishes (the demo prints the same lines), and its curl lines, sent by curl itself
(form-encoded, as ``curl -d`` does) to a real server on 127.0.0.1, get answers."""

import importlib.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from typer.main import get_command

from adamix_zoo.cli import _register_commands, app
from adamix_zoo.serving import ServingEngine
from adamix_zoo.serving.server import create_app
from tests.test_serving_utils import RunningServer, make_task, tiny_tokenizer
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def serving_lines() -> list[str]:
    """The command lines of the ```bash blocks of the README's serving section (before generation)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Serving many tasks") :]
    section = section[: section.index("Generation tasks")]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_serve_line_parses_and_names_what_the_demo_publishes():
    serve_line, *curls = serving_lines()
    args = shlex.split(serve_line.split("#")[0])
    assert args[:2] == ["adamix-zoo", "serve"] and curls
    _register_commands()
    ctx = get_command(app).commands["serve"].make_context("serve", args[2:])
    assert ctx.params["store"] == "runs/demo-zoo" and ctx.params["port"] == 8000
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.ZOO == ROOT / "runs" / "demo-zoo"
    entries = list(ctx.params["entry"])
    assert entries == ["demo/sst2", f"{demo.FEDERATED_NAME}=federated/sst2"]
    assert demo.serve_commands(Path("runs/demo-zoo"), entries, 8000) == [serve_line, *curls]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    engine = ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer())
    for name in ("sst2", "sst2-federated"):
        engine.attach(make_task(root, name, seed=len(name)), task=name)
    with RunningServer(create_app(engine)) as running:
        yield running


def send(curl_line: str, port: int) -> httpx.Response:
    """The README's curl line against the test server: curl itself if installed, else the same
    request (a form content type, as ``curl -d`` sends) with httpx."""
    args = shlex.split(curl_line.replace("localhost:8000", f"127.0.0.1:{port}"))
    assert args[0] == "curl" and "-d" in args
    if shutil.which("curl"):
        out = subprocess.run([*args, "-w", "\n%{http_code}"], capture_output=True, text=True, check=True, timeout=60)
        body, _, status = out.stdout.rpartition("\n")
        return httpx.Response(int(status), content=body.encode())
    url = next(a for a in args[1:] if "/v1/" in a)
    data = args[args.index("-d") + 1]
    headers = {"content-type": "application/x-www-form-urlencoded"}
    return httpx.post(url if "://" in url else f"http://{url}", content=data.encode(), headers=headers)


def test_the_readme_curl_lines_get_answers(server):
    curls = [line for line in serving_lines() if line.startswith("curl")]
    assert len(curls) >= 2
    for line in curls:
        reply = send(line, server.port)
        assert reply.status_code == 200, (line, reply.text)
        body = reply.json()
        assert body["predictions"] and body["predictions"][0]["label"].startswith(body["task"])


def test_a_form_encoded_json_body_is_read_as_json(server):
    form = {"content-type": "application/x-www-form-urlencoded"}
    ok = httpx.post(f"{server.url}/v1/predict", content=b'{"task": "sst2", "inputs": "w1"}', headers=form)
    assert ok.status_code == 200, ok.text
    bad = httpx.post(f"{server.url}/v1/predict", content=b"task=sst2&inputs=w1", headers=form)
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["detail"]
