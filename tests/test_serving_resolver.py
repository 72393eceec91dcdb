"""Registry references reach the server only through an injected resolver; serving never imports
the registry (or federation) outside its CLI command module."""

import ast
from pathlib import Path

import httpx
import pytest

import adamix_zoo.serving
from adamix_zoo.serving import ServingEngine
from adamix_zoo.serving.server import ServerSettings, create_app
from tests.test_serving_utils import RunningServer, make_task, tiny_tokenizer
from tests.tiny import tiny_model

SERVING = Path(adamix_zoo.serving.__file__).parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("resolver"), "sst2", seed=1)


def _engine() -> ServingEngine:
    return ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer())


def test_reference_without_a_resolver_is_a_clear_4xx(folder):
    settings = ServerSettings(allow_load=True, load_dirs=[folder.parent])
    with RunningServer(create_app(_engine(), settings)) as server:
        refused = httpx.post(f"{server.url}/v1/tasks/load", json={"reference": "sst2@1"})
        assert refused.status_code == 400
        assert "cannot resolve registry references" in refused.json()["detail"]
        by_path = httpx.post(f"{server.url}/v1/tasks/load", json={"path": str(folder)})
        assert by_path.status_code == 200 and by_path.json()["tasks"][0]["task"] == "sst2"


def test_reference_uses_the_injected_resolver(folder):
    asked = []

    def resolve(reference: str) -> Path:
        asked.append(reference)
        if reference != "local/sst2@1":
            raise KeyError(f"no entry {reference}")
        return folder

    settings = ServerSettings(allow_load=True, resolve_reference=resolve)
    with RunningServer(create_app(_engine(), settings)) as server:
        loaded = httpx.post(
            f"{server.url}/v1/tasks/load", json={"reference": "local/sst2@1", "task": "s"}
        )
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["tasks"][0]["task"] == "s"
        missing = httpx.post(f"{server.url}/v1/tasks/load", json={"reference": "local/nope@1"})
        assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert asked == ["local/sst2@1", "local/nope@1"]


def _imported(path: Path) -> set[str]:
    """Top-level package of every import in a module, inside functions too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_command_module_imports_registry_or_federation():
    modules = sorted(p for p in SERVING.glob("*.py") if p.name != "commands.py")
    assert {p.name for p in modules} >= {"server.py", "engine.py", "banks.py"}
    for path in modules:
        assert not _imported(path) & {"registry", "federation"}, path.name
