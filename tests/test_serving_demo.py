"""`make demo`'s last step in isolation: the real `adamix-zoo serve` on two registry entries of one
store (one served under another name), queried over HTTP, stopped; and the commands it prints."""

import importlib.util
from pathlib import Path

import pytest

from tests.test_serving_utils import tiny_tokenizer
from tests.tiny import tiny_model

registry = pytest.importorskip("registry")
registry_runs = pytest.importorskip("tests.registry_runs")
ROOT = Path(__file__).resolve().parents[1]


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_the_demo_serves_its_entries_over_http_and_prints_working_commands(tmp_path, capsys):
    demo = load_demo()
    store = registry.Store(tmp_path / "zoo")
    store.publish(registry_runs.make_run(tmp_path / "central", task="sst2", seed=1), namespace="demo")
    store.publish(registry_runs.make_run(tmp_path / "fed", task="sst2", seed=2), namespace="federated")
    backbone = tmp_path / "backbone"
    tiny_model("bert", head="base").save_pretrained(backbone)
    tiny_tokenizer().save_pretrained(backbone)
    entries = ["demo/sst2", f"{demo.FEDERATED_NAME}=federated/sst2"]
    answers = demo.serve(tmp_path / "zoo", entries, backbone=str(backbone), timeout=120)
    assert [len(a["predictions"]) for a in answers] == [len(x) for _, x in demo.QUERIES]
    assert [a["task"] for a in answers] == ["sst2", demo.FEDERATED_NAME]
    printed = capsys.readouterr().out
    assert printed.count("p=") == sum(len(x) for _, x in demo.QUERIES)
    demo.next_steps(entries)
    lines = capsys.readouterr().out.splitlines()
    assert "adamix-zoo serve --store runs/demo-zoo --entry demo/sst2" in lines[2]
