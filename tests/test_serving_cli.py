"""The serving verbs: `adamix-zoo predict` answers a mixed batch offline; bad input fails clearly."""

import json

import pytest
from typer.testing import CliRunner

from adamix_zoo.cli import _register_commands, app
from tests.test_serving_utils import make_task, tiny_tokenizer
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_model("bert", head="base").save_pretrained(root / "backbone")
    tiny_tokenizer().save_pretrained(root / "backbone")
    _register_commands()
    return root, {
        "a": make_task(root, "a", seed=1),
        "b": make_task(root, "b", "adapter", seed=2, num_labels=1),
    }


def test_predict_answers_a_mixed_batch_like_the_engine(setup):
    from adamix_zoo.serving import ServingEngine

    root, tasks = setup
    args = [
        "predict",
        "--backbone",
        str(root / "backbone"),
        "-t",
        f"a={tasks['a']}",
        "-t",
        str(tasks["b"]),
        "--json",
        "a=w5 w6 w7",
        "b=w8|||w9 w10",
        "a=w11",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    engine = ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer())
    engine.attach(tasks["a"]), engine.attach(tasks["b"])
    expected = engine.predict(["a", "b", "a"], ["w5 w6 w7", ("w8", "w9 w10"), "w11"])
    assert [(x["task"], x["label"], x["version"]) for x in lines] == [
        ("a", expected[0].label, "a-v1"),
        ("b", None, "b-v2"),
        ("a", expected[2].label, "a-v1"),
    ]
    assert [x["score"] for x in lines] == pytest.approx([e.score for e in expected], abs=1e-6)


def test_predict_reports_bad_input_clearly(setup):
    root, tasks = setup
    base = ["predict", "--backbone", str(root / "backbone"), "-t", f"a={tasks['a']}"]
    unknown = CliRunner().invoke(app, base + ["zzz=w5"])
    assert unknown.exit_code != 0 and "task 'zzz' is not attached" in unknown.output
    malformed = CliRunner().invoke(app, base + ["no-equals-sign"])
    assert malformed.exit_code != 0 and "is not TASK=TEXT" in malformed.output
