"""Task specs, local JSON-lines loading, few-shot sampling, tokenization, batching and bad input."""

import pytest
import torch

from adamix_zoo.data import Collator, encode, few_shot, load_task_data, make_loaders, task_folder
from adamix_zoo.glue_tasks import TASKS, get_task
from tests.tiny_glue import sst2_rows, stsb_rows, tiny_tokenizer, write_glue, write_jsonl


def test_task_specs_follow_glue():
    assert set(TASKS) == {"sst2", "rte", "mrpc", "stsb", "qnli", "wnli", "cola", "mnli", "qqp"}
    assert get_task("SST-2").name == "sst2"
    assert get_task("stsb").num_labels == 1 and get_task("stsb").problem == "regression"
    assert get_task("mnli").num_labels == 3 and get_task("mnli").validation_split == "validation_matched"
    assert get_task("cola").main_metric == "mcc" and get_task("mrpc").main_metric == "f1"
    assert get_task("rte").text_columns == ("sentence1", "sentence2")
    with pytest.raises(ValueError, match="unknown task 'imdb'.*sst2"):
        get_task("imdb")


def test_loads_local_jsonl_with_subsets(tmp_path):
    root = write_glue(tmp_path, n_train=100, n_val=40)
    for given in (root, root / "sst2"):  # a folder of tasks, or the task's own folder
        assert task_folder(given, get_task("sst2")) == root / "sst2"
    train, val, info = load_task_data(get_task("sst2"), root, train_subset=30, validation_subset=10)
    assert (len(train), len(val)) == (30, 10)
    assert info.source == str(root / "sst2") and info.train_size == 30
    again, _, _ = load_task_data(get_task("sst2"), root, train_subset=30)
    assert list(again["idx"]) == list(train["idx"])  # the subset is fixed by data_seed
    other, _, _ = load_task_data(get_task("sst2"), root, train_subset=30, data_seed=1)
    assert list(other["idx"]) != list(train["idx"])


def test_shared_data_root_layout(tmp_path):
    write_glue(tmp_path / "glue")
    assert task_folder(tmp_path, get_task("stsb")) == tmp_path / "glue" / "stsb"


def test_few_shot_k_per_class(tmp_path):
    root = write_glue(tmp_path)
    train, _, info = load_task_data(get_task("sst2"), root, few_shot_k=5, data_seed=3)
    labels = list(train["label"])
    assert labels.count(0) == 5 and labels.count(1) == 5 and info.few_shot == 5
    with pytest.raises(ValueError, match="few-shot k=500: class 'negative' has only"):
        few_shot(train, get_task("sst2"), 500, 0)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "empty"),
        ([{"text": "good film", "label": 1}], "lacks column\\(s\\) sentence"),
        ([{"sentence": "good film", "label": 2}], "outside 0..1"),
        ([{"sentence": "good film", "label": -1}], "outside 0..1"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, rows, message):
    write_jsonl(tmp_path / "sst2" / "train.jsonl", rows)
    write_jsonl(tmp_path / "sst2" / "validation.jsonl", sst2_rows(8, 0))
    with pytest.raises(ValueError, match=message):
        load_task_data(get_task("sst2"), tmp_path)


def test_missing_data_names_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="rte/train.jsonl"):
        load_task_data(get_task("rte"), tmp_path)


def test_regression_labels_must_be_finite(tmp_path):
    rows = stsb_rows(4, 0)
    rows[1]["label"] = float("nan")
    write_jsonl(tmp_path / "stsb" / "train.jsonl", rows)
    write_jsonl(tmp_path / "stsb" / "validation.jsonl", stsb_rows(4, 1))
    with pytest.raises(ValueError, match="non-finite"):
        load_task_data(get_task("stsb"), tmp_path)


def test_pairs_tokenize_with_segments_and_pad_dynamically(tmp_path):
    root = write_glue(tmp_path, n_train=20, n_val=6)
    tok, task = tiny_tokenizer(), get_task("stsb")
    train, _, _ = load_task_data(task, root)
    enc = encode(train, task, tok, max_length=64)
    first = enc[0]
    assert first["input_ids"][0] == tok.cls_token_id and first["input_ids"].count(tok.sep_token_id) == 2
    assert set(first["token_type_ids"]) == {0, 1} and isinstance(first["labels"], float)
    short = encode(train, task, tok, max_length=6)
    assert max(len(f["input_ids"]) for f in short.features) == 6
    batch = Collator(tok.pad_token_id, regression=True)([enc[i] for i in range(4)])
    longest = max(len(enc[i]["input_ids"]) for i in range(4))
    assert batch["input_ids"].shape == (4, longest) and batch["labels"].dtype == torch.float32
    assert batch["attention_mask"].sum().item() == sum(len(enc[i]["input_ids"]) for i in range(4))


def test_make_loaders_batches(tmp_path):
    root = write_glue(tmp_path, n_train=50, n_val=20)
    loaders = make_loaders(get_task("sst2"), tiny_tokenizer(), root, batch_size=8, eval_batch_size=16)
    assert len(loaders.train) == 6  # full batches only
    batch = next(iter(loaders.train))
    assert batch["labels"].dtype == torch.long and batch["input_ids"].shape[0] == 8
    assert sum(len(b["labels"]) for b in loaders.validation) == 20
