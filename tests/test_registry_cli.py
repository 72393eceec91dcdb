"""The zoo's CLI verbs, driven through the real ``adamix-zoo`` typer app."""

import json

import pytest
from typer.testing import CliRunner

from adamix_zoo import cli
from registry import Store
from tests.registry_runs import make_run


@pytest.fixture(scope="module")
def app():
    cli._register_commands()
    return cli.app


def _run(app, *args, ok=True):
    result = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
    assert (result.exit_code == 0) == ok, result.output
    return result.output


def test_publish_list_show_merge_export_push_pull_delete(app, tmp_path):
    store = tmp_path / "zoo"
    out = _run(app, "publish", make_run(tmp_path / "sst2", seed=1), "--namespace", "glue", "--store", store)
    assert "published glue/sst2@1" in out
    _run(app, "publish", make_run(tmp_path / "rte", task="rte", seed=2), "--namespace", "glue", "--store", store)
    listing = _run(app, "list", "--store", store)
    assert "glue/sst2@1" in listing and "glue/rte@1" in listing and "accuracy=0.75" in listing
    assert json.loads(_run(app, "show", "glue/sst2", "--json", "--store", store))["name"]["version"] == "1"
    assert "tiny-bert" in _run(app, "show", "glue/rte@1", "--store", store)
    out = _run(app, "merge", "glue/sst2", "glue/rte", "--method", "ties", "--density", "0.5",
               "--weights", "0.6,0.4", "--namespace", "glue", "--store", store)
    assert "-> glue/sst2+rte@1" in out
    meta = Store(store).show("glue/sst2+rte")
    assert meta["merge"]["method"] == "ties" and meta["merge"]["weights"] == [0.6, 0.4]
    _run(app, "export", "glue/sst2@1", tmp_path / "peft", "--store", store)
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    _run(app, "push", "glue/sst2@1", tmp_path / "team", "--store", store)
    assert [i.ref for i in Store(tmp_path / "team").list()] == ["glue/sst2@1"]
    _run(app, "pull", tmp_path / "team", "glue/sst2@1", "--namespace", "mine", "--store", store)
    _run(app, "delete", "glue/rte@1", "--yes", "--store", store)
    assert [i.ref for i in Store(store).list()] == ["glue/sst2@1", "glue/sst2+rte@1", "mine/sst2@1"]


def test_errors_are_one_clear_line(app, tmp_path):
    store = tmp_path / "zoo"
    out = _run(app, "show", "nothing", "--store", store, ok=False)
    assert "error: no entry local/nothing@latest" in out
    out = _run(app, "publish", tmp_path / "missing", "--store", store, ok=False)
    assert "error: training output folder" in out
    out = _run(app, "publish", make_run(tmp_path / "run"), "--task", "../x", "--store", store, ok=False)
    assert "contains a path separator" in out or "contains '..'" in out
    assert "adamix-zoo merge glue/sst2 glue/rte --method ties" in _run(app, "merge", "--help")
