"""The CLI reports every failure as one ``error: ...`` line and exit status 1; ``--debug`` shows the
traceback. The data loader's JSON-lines errors name the file and the row."""

import json

import pytest

from adamix_zoo.cli import main
from adamix_zoo.data import load_split
from adamix_zoo.formats.files import check_json_lines
from adamix_zoo.glue_tasks import get_task
from registry import Store
from tests.registry_runs import make_run


def _main(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


def _assert_one_line(code, err, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and lines[0].startswith("error: ") and len(lines) <= 2, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_a_malformed_json_lines_row_is_named(tmp_path):
    folder = tmp_path / "sst2"
    folder.mkdir()
    rows = [json.dumps({"sentence": f"s{i}", "label": i % 2, "idx": i}) for i in range(5)]
    rows[3] = '{"sentence": "broken", "label": 1'
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl, row 4: not valid JSON"):
        load_split(get_task("sst2"), "train", tmp_path)
    (folder / "train.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"row 2: expected a JSON object, got list"):
        check_json_lines(folder / "train.jsonl")


def test_adapter_config_holding_a_list_is_one_line(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (run / "merged" / "adapter_config.json").write_text("[]")
    code, err = _main(capsys, "publish", run, "--store", tmp_path / "store")
    _assert_one_line(code, err, "adapter_config.json", "expected a JSON object")


def test_export_onto_an_existing_file_is_one_line(tmp_path, capsys):
    store = Store(tmp_path / "store")
    info = store.publish(make_run(tmp_path / "run"))
    target = tmp_path / "taken.txt"
    target.write_text("x")
    code, err = _main(capsys, "export", info.ref, target, "--store", store.root)
    _assert_one_line(code, err, "is a file")
    assert target.read_text() == "x"


def test_pull_from_an_unreachable_hub_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    code, err = _main(capsys, "pull", "hf://nobody/nothing", "--store", tmp_path / "store")
    _assert_one_line(code, err)


def test_any_exception_in_a_verb_is_one_line_and_debug_shows_it(tmp_path, capsys, monkeypatch):
    import registry.store

    def broken(*args, **kwargs):
        raise TypeError("something unexpected")

    monkeypatch.setattr(registry.store.Store, "list", broken)
    code, err = _main(capsys, "list", "--store", tmp_path / "store")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and lines[0] == "internal error (TypeError): something unexpected"
    assert "--debug" in lines[1]
    with pytest.raises(TypeError, match="something unexpected"):
        main(["--debug", "list", "--store", str(tmp_path / "store")])
