"""`serve`'s options (one --store name as the registry verbs, --dtype, --api-key, opt-in loading),
a real `adamix-zoo serve` process (restarted with passive OpenMP) behind an API key, and the loud
warning for a keyless server bound beyond loopback."""

import os
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from adamix_zoo.cli import _register_commands, app
from adamix_zoo.serving import commands
from tests.test_serving_utils import free_port, make_task, tiny_tokenizer
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-options")
    tiny_model("bert", head="base").save_pretrained(root / "backbone")
    tiny_tokenizer().save_pretrained(root / "backbone")
    _register_commands()
    return root, make_task(root, "a", seed=1)


def test_serve_options_are_named_as_the_other_verbs(setup):
    for verb in ("serve", "predict", "generate"):
        help_text = CliRunner().invoke(app, [verb, "--help"], env={"COLUMNS": "200"}).output
        assert "--store" in help_text and "--registry" not in help_text and "--dtype" in help_text, verb
    serve_help = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--api-key", "--allow-load", "--load-dir", "--threads"):
        assert option in serve_help


def test_predict_in_bfloat16_gives_the_float32_labels(setup):
    root, task = setup
    base = ["predict", "--backbone", str(root / "backbone"), "-t", f"a={task}", "--json", "a=w5 w6", "a=w7"]
    fp32 = CliRunner().invoke(app, base)
    bf16 = CliRunner().invoke(app, [*base, "--dtype", "bfloat16"])
    assert fp32.exit_code == 0 and bf16.exit_code == 0, bf16.output

    def labels(out):
        return [line.split('"label": ')[1].split(",")[0] for line in out.splitlines() if line.startswith("{")]

    assert labels(fp32.stdout) == labels(bf16.stdout)
    bad = CliRunner().invoke(app, [*base, "--dtype", "fp8"])
    assert bad.exit_code != 0 and "float32, bfloat16, auto" in bad.output


def test_a_real_serve_process_requires_its_api_key(setup):
    root, task = setup
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["ADAMIX_ZOO_API_KEY"] = "k3y"
    args = [sys.executable, "-m", "adamix_zoo", "serve", "--backbone", str(root / "backbone"),
            "--task", f"a={task}", "--port", str(port)]  # fmt: skip
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.3)
        environ = f"/proc/{process.pid}/environ"
        if os.path.exists(environ):  # Linux: serve restarted itself (same pid) with passive OpenMP
            with open(environ, "rb") as f:
                assert b"OMP_WAIT_POLICY=PASSIVE" in f.read().split(b"\0")
        assert httpx.get(f"{url}/v1/tasks").status_code == 401
        key = {"Authorization": "Bearer k3y"}
        answer = httpx.post(f"{url}/v1/predict", content=b'{"task": "a", "inputs": "w5"}', headers=key)
        assert answer.status_code == 200 and answer.json()["version"] == "a-v1", answer.text
        load = httpx.post(f"{url}/v1/tasks/load", json={"path": str(task)}, headers=key)
        assert load.status_code == 403  # loading is opt-in
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_keyless_server_beyond_loopback_warns_loudly(capsys):
    commands._warn_if_exposed("0.0.0.0", None)
    assert "WITHOUT an API key" in capsys.readouterr().err
    commands._warn_if_exposed("127.0.0.1", None)
    commands._warn_if_exposed("0.0.0.0", "key")
    assert capsys.readouterr().err == ""
