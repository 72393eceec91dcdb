"""bench/federation.py: workers started together share the unfinished jobs; every diagnosis names valid run-config settings."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import federation


def test_workers_started_together_run_disjoint_shares_of_the_unfinished_jobs(monkeypatch, tmp_path):
    ran: list[int] = []
    monkeypatch.setattr(federation, "data_dir", lambda: tmp_path)
    monkeypatch.setattr(federation, "selection_data", lambda p, folder, kind: tmp_path)
    monkeypatch.setattr(federation, "federated",
                        lambda p, hp, seed, root, out, extra=None: ran.append(seed) or {"metric": 0.5})
    jobs = [federation.job("select", "federated", seed, {"learning_rate": 1e-3}) for seed in range(5)]
    finished = {federation.run_key(jobs[0]): {}}
    log = tmp_path / "runs.jsonl"
    for index in (0, 1):  # each worker starts from the same finished runs
        federation.execute(jobs, federation.PROTOCOL, dict(finished), log, True, tmp_path, worker=(index, 2))
    assert ran == [1, 3, 2, 4]
    assert len(log.read_text().splitlines()) == 4


def test_worker_option_takes_i_of_n():
    assert federation.parse_worker("1/2") == (1, 2)
    for text in ("2/2", "-1/2", "1", "a/b"):
        with pytest.raises(argparse.ArgumentTypeError, match="--worker"):
            federation.parse_worker(text)


@pytest.mark.parametrize("name", list(federation.DIAGNOSES))
def test_every_diagnosis_overrides_known_run_config_keys_with_valid_values(name):
    """A misspelt key would be ignored by the federation, and the diagnosis would silently rerun the
    reference; a bad value must fail here, not an hour into the benchmark."""
    from federation.config import FederationConfig

    overrides = federation.DIAGNOSES[name]
    assert set(overrides) <= set(FederationConfig().to_run_config()), name
    cfg = FederationConfig.from_run_config({"tasks": "sst2", "num-clients": 20} | overrides)
    for key, value in overrides.items():
        assert cfg.to_run_config()[key] == value, (name, key)


SENTENCES = ["a gorgeous , witty film", "the plot is thin", "never dull and often funny"]
PHRASES = ["a gorgeous", "witty film", "the plot", "is thin", "often funny", "never dull", "funny"]
OTHER = ["an unrelated sentence here", "thin"]  # 'thin' is a phrase of a held-out sentence too


def tiny_sst2(tmp_path, monkeypatch, dev: list[str]) -> dict:
    """A training split of the rows above and a dev split of ``dev``; the protocol holds out 3 rows."""
    import json

    folder = tmp_path / "glue" / "sst2"
    folder.mkdir(parents=True)
    for split, texts in (("train", SENTENCES + PHRASES + OTHER), ("validation", dev)):
        rows = [{"sentence": text, "label": i % 2, "idx": i} for i, text in enumerate(texts)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(federation, "data_dir", lambda: tmp_path)
    return federation.PROTOCOL | {"selection_rows": 3, "train_limit": 0}


def test_sentence_selection_holds_out_whole_sentences_and_trains_on_none_of_their_phrases(tmp_path, monkeypatch):
    import json

    sentences, phrases, other = SENTENCES, PHRASES, OTHER
    p = tiny_sst2(tmp_path, monkeypatch, dev=["a new sentence"])

    root = federation.selection_data(p, tmp_path / "out", "sentences")
    def read(split: str) -> list[str]:
        return [json.loads(line)["sentence"] for line in (root / "glue" / "sst2" / f"{split}.jsonl").read_text().splitlines()]

    held, train = read("validation"), read("train")
    assert len(held) == 3 and set(held) <= set(sentences) | {"an unrelated sentence here"}
    assert set(held) | set(train) <= set(sentences + phrases + other)
    for text in train:
        assert not any(f" {text} " in f" {h} " for h in held), text
    assert set(train) == {t for t in sentences + phrases + other
                          if t not in held and not any(f" {t} " in f" {h} " for h in held)}

    random_rows = federation.selection_data(p, tmp_path / "phrases", "phrases")
    assert len((random_rows / "glue" / "sst2" / "validation.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ValueError, match="whole-sentence rows"):
        federation.selection_data(p | {"selection_rows": 5}, tmp_path / "many", "sentences")
    with pytest.raises(ValueError, match="unknown selection set"):
        federation.selection_data(p, tmp_path / "bad", "words")


def test_selection_set_stats_measure_row_length_and_rows_found_inside_training_rows(tmp_path, monkeypatch):
    import json

    p = tiny_sst2(tmp_path, monkeypatch, dev=["the plot is thin", "brand new words here"])
    stats = federation.selection_set_stats(p)
    assert stats["dev"] == {"rows": 2, "mean_words": 4.0, "contained": [0.5, 0.5]}
    for kind in ("phrases", "sentences"):
        root = federation.selection_data(p, tmp_path / kind, kind) / "glue" / "sst2"
        held, train = ([json.loads(line)["sentence"] for line in (root / f"{split}.jsonl").read_text().splitlines()]
                       for split in ("validation", "train"))
        inside = sum(any(f" {h} " in f" {t} " for t in train) for h in held) / 3
        assert stats[kind] == {"rows": 3, "mean_words": sum(len(h.split()) for h in held) / 3,
                               "contained": [inside, inside]}, kind
    assert stats["sentences"]["contained"] == [0.0, 0.0]

def test_selection_runs_are_keyed_by_their_set_and_the_first_sets_runs_keep_their_keys():
    hp = {"learning_rate": 1e-3}
    first = federation.select_job("federated", 0, hp, selection="phrases")
    assert first == federation.job("select", "federated", 0, hp)
    assert federation.run_key(federation.select_job("federated", 0, hp)) != federation.run_key(first)


def test_each_selection_sets_grid_widens_past_its_own_edge_rates_only():
    rates = {s: {hp["learning_rate"] for hp in federation.grid("federated", s)} for s in ("phrases", "sentences")}
    assert rates["phrases"] == set(federation.LEARNING_RATES) | {8e-3}
    assert rates["sentences"] == set(federation.LEARNING_RATES) | {8e-3, 5e-4, 2.5e-4}
    widened = [hp for hp in federation.grid("federated", "sentences")
               if hp["learning_rate"] < 1e-3 and not federation.is_equal_step(hp) and not federation.is_lda_head(hp)]
    assert len(widened) == 8 and {hp["server_momentum"] for hp in widened} == {0.6}
    added = (len(federation.EQUAL_STEP_MOMENTA) * len(federation.EQUAL_STEP_GRID[("federated", "sentences")])
             + len(federation.LDA_HEAD_GRID[("federated", "sentences")]))
    assert federation.grid("federated", "phrases") == federation.grid("federated", "sentences")[:-8 - added]
    assert len(federation.grid("federated", quick=True)) == 2
    central = {s: federation.grid("centralized", s) for s in ("phrases", "sentences")}
    assert central["phrases"] == federation.CENTRAL_GRID
    assert central["sentences"][len(federation.CENTRAL_GRID):] == [
        {"learning_rate": 5e-4, "head_learning_rate": h} for h in (0.0, 1e-2)]


def test_the_sentence_sets_equal_step_points_keep_the_06_points_server_step_and_screen_in_fp32():
    points = [hp for hp in federation.grid("federated", "sentences") if federation.is_equal_step(hp)]
    assert {hp["server_momentum"] for hp in points} == set(federation.EQUAL_STEP_MOMENTA)
    chosen_06 = {"server_momentum": 0.6, "learning_rate": 5e-4, "head_learning_rate": 1e-2, "logit_adjustment": 1.0}
    for hp in points + [chosen_06]:
        assert federation.server_step(hp) == pytest.approx(federation.EQUAL_STEP)
    assert not any(federation.is_equal_step(hp) for hp in federation.grid("federated", "phrases"))
    # the point's server rate reaches the run config; a grid point without one runs at the protocol's
    config = federation.federated_run_config(federation.PROTOCOL, points[-1], 0, Path("."), Path("."))
    assert (config["server-momentum"], config["server-learning-rate"]) == (0.9, 0.25)
    assert federation.federated_run_config(federation.PROTOCOL, chosen_06, 0, Path("."), Path("."))[
        "server-learning-rate"] == federation.PROTOCOL["server_learning_rate"]
    # screened in fp32, keyed apart from a bf16 run of the same point; the other points keep their keys
    screen = federation.screen_job("federated", 0, points[0])
    assert screen["settings"] == {"precision": "fp32"} and federation.job_precision(screen) == "fp32"
    assert federation.screen_job("federated", 0, chosen_06) == federation.select_job("federated", 0, chosen_06)


def test_widening_paragraph_counts_finalists_only_once_the_grid_has_finished():
    def runs(selection: str, points: list[dict], best: dict) -> dict:
        return {federation.run_key(federation.screen_job("federated", 0, hp, selection)):
                {"result": {"metric": 0.9 if hp == best else 0.5}} for hp in points}

    phrase_grid = federation.grid("federated", "phrases")
    best = next(hp for hp in phrase_grid if hp["learning_rate"] == 8e-3)
    assert "1 of them among the finalists" in federation.widening_paragraph(runs("phrases", phrase_grid, best), "phrases")
    unfinished = [hp for hp in federation.grid("federated", "sentences") if hp["learning_rate"] != 2.5e-4]
    text = federation.widening_paragraph(runs("sentences", unfinished, best), "sentences")
    assert "the finalists not drawn yet" in text and "among the finalists" not in text


def _finished_selection(side: str, selection: str, best: dict, second: dict | None = None) -> dict:
    """Runs of ``selection``'s whole grid for ``side``: ``best`` scores 0.9 (``second`` 0.9 too, a tie),
    the rest 0.5; the finalists' runs at the report's settings likewise, on both selection seeds."""
    done = {}
    for hp in federation.grid(side, selection):
        metric = 0.9 if hp in (best, second) else 0.5
        done[federation.run_key(federation.screen_job(side, 0, hp, selection))] = {"result": {"metric": metric}}
        for seed in (federation.SELECT_SEED, federation.CONFIRM_SEED):
            key = federation.run_key(federation.finalist_job(side, seed, hp, selection))
            done[key] = {"result": {"metric": metric * (0.9 if side == "federated" else 1.0)}}
    return done


def test_the_first_sets_centralized_choice_is_drawn_from_its_own_grid():
    best = federation.CENTRAL_GRID[3]
    done = _finished_selection("centralized", "phrases", best)
    summary = federation.summarize(done, federation.PROTOCOL, federation.REPORT_SEEDS, quick=False)
    assert summary["phrase_selection"]["centralized_chosen"] == best
    # the sentence set's grid holds a widened rate the first set never ran: no choice from it
    assert federation.chosen(done, "centralized", federation.grid("centralized", "sentences"), "phrases") is None


def test_finalists_paragraph_names_a_tie_and_the_selection_sets_ratio():
    central, fed = federation.CENTRAL_GRID, federation.grid("federated")
    done = _finished_selection("centralized", "sentences", central[1], central[0]) | _finished_selection(
        "federated", "sentences", fed[2])
    sel = {f"{side}_finalists": federation.finalist_means(done, side, federation.grid(side)) for side in
           ("federated", "centralized")}
    text = federation.finalists_paragraph(sel)
    assert f"centralized 0.9000 for {federation.json.dumps(central[0])} (a tie, broken by grid order)" in text
    assert federation.chosen(done, "centralized", federation.grid("centralized")) == central[0]
    assert "federated 0.8100" in text and "(a tie" not in text.split(";")[0]
    assert text.endswith("on the selection set the choices' ratio is 0.9000.")


def test_equal_step_paragraph_scores_the_points_and_counts_those_among_the_finalists():
    points = [hp for hp in federation.grid("federated") if federation.is_equal_step(hp)]
    done = _finished_selection("federated", "sentences", points[-1])
    text = federation.equal_step_paragraph(done)
    assert "2.5 at the grid's momentum 0.6 and 10 at its 0.9" in text
    assert "0.9000 (momentum 0.9, lr 0.002)" in text and "on seed 0, 1 of them among the finalists." in text
    assert "12 of the 12 momentum-0.9 points scored below 0.6" in text and "at the step of 2.5, 2 of 3:" in text
    assert text.endswith("1 of the 6 lie within one binomial standard error (0.010) of their best, 0.9000; "
                         "the last finalist scored 0.5000.")
    del done[federation.run_key(federation.screen_job("federated", 0, points[0]))]
    assert "the finalists not drawn yet" in federation.equal_step_paragraph(done)
    assert federation.equal_step_paragraph({}) == ""
    # a point level with the last finalist stays out, and the paragraph says so
    grid = federation.grid("federated")
    done = _finished_selection("federated", "sentences", grid[0])
    for hp, metric in ((grid[1], 0.8), (grid[2], 0.7), (points[1], 0.7)):
        done[federation.run_key(federation.screen_job("federated", 0, hp))] = {"result": {"metric": metric}}
    text = federation.equal_step_paragraph(done)
    assert "none among the finalists (momentum 0.8, lr 0.001 tied the last finalist's 0.7000" in text


def test_a_side_reports_with_the_lda_head_only_where_it_led_its_choice_on_both_selection_seeds():
    hp = federation.HEAD_INIT_CHOICES["federated"]
    assert hp in federation.grid("federated")
    assert federation.HEAD_INIT_CHOICES["centralized"] in federation.grid("centralized")
    done = _finished_selection("federated", "sentences", hp)
    assert not federation.head_init_adopted(done, "federated")  # not run yet
    reference = [federation.finalist_metric(done, "federated", seed, hp) for seed in (0, 1)]
    for lead in ((0.01, 0.01), (0.01, -0.01), (0.01, 0.0)):
        for seed, delta in zip((0, 1), lead):
            key = federation.run_key(federation.head_init_job("federated", seed, hp))
            done[key] = {"result": {"metric": reference[seed] + delta}}
        assert federation.head_init_adopted(done, "federated") == (lead == (0.01, 0.01))
        assert federation.head_init_pairs(done, "federated")[1] == (reference[1] + lead[1], reference[1])
    # the head-init runs sit at the finalists' settings, keyed apart from them
    job = federation.head_init_job("federated", 0, hp)
    assert job["settings"] == federation.FINALIST_SETTINGS | {"head-init": "lda"} and job["selection"] == "sentences"
    assert federation.run_key(job) != federation.run_key(federation.finalist_job("federated", 0, hp))
    adopted = federation.report_job("federated", 0, hp, head_init=True)["settings"]
    assert adopted == federation.report_job("federated", 0, hp)["settings"] | {"head-init": "lda"}


def test_the_centralized_side_trains_with_the_head_init_its_run_names(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(federation, "selection_data", lambda p, folder, kind: tmp_path)
    monkeypatch.setattr(federation, "centralized", lambda p, hp, seed, root, out, precision, head_init="random":
                        seen.append((precision, head_init)) or {"metric": 0.5})
    hp = federation.CENTRAL_GRID[0]
    jobs = [federation.head_init_job("centralized", 0, hp), federation.finalist_job("centralized", 0, hp)]
    federation.execute(jobs, federation.PROTOCOL, {}, tmp_path / "runs.jsonl", True, tmp_path)
    assert seen == [("fp32", "lda"), ("fp32", "random")]


def test_the_lda_head_points_run_with_the_lda_head_at_the_experts_rate_and_screen_in_fp32():
    points = [hp for hp in federation.grid("federated", "sentences") if federation.is_lda_head(hp)]
    assert [federation.server_step(hp) for hp in points] == pytest.approx([2.5] * 3 + [10.0] * 3)
    assert not any(federation.is_lda_head(hp) for hp in federation.grid("federated", "phrases"))
    config = federation.federated_run_config(federation.PROTOCOL, points[0], 0, Path("."), Path("."))
    assert (config["head-init"], config["head-learning-rate"], config["logit-adjustment"]) == ("lda", 0.0, 1.0)
    assert federation.federated_run_config(federation.PROTOCOL, federation.FED_GRID[0], 0, Path("."), Path("."))[
        "head-init"] == "random"  # the points before them keep the drawn head they ran with
    screen = federation.screen_job("federated", 0, points[0])
    assert screen["settings"] == {"precision": "fp32"} and federation.job_precision(screen) == "fp32"


def test_head_init_paragraph_gives_both_sides_pairs_and_the_lda_points_and_names_an_lda_choice():
    points = [hp for hp in federation.grid("federated") if federation.is_lda_head(hp)]
    done = _finished_selection("federated", "sentences", points[1]) | _finished_selection(
        "centralized", "sentences", federation.HEAD_INIT_CHOICES["centralized"])
    assert federation.head_init_paragraph(done) == ""  # the head-init runs have not run
    for side, lead in (("federated", 0.01), ("centralized", -0.01)):
        for seed in (0, 1):
            reference = federation.finalist_metric(done, side, seed, federation.HEAD_INIT_CHOICES[side])
            done[federation.run_key(federation.head_init_job(side, seed, federation.HEAD_INIT_CHOICES[side]))] = {
                "result": {"metric": reference + lead}}
    text = federation.head_init_paragraph(done)
    assert "federated 0.4600 / 0.4600 against 0.4500 / 0.4500 (it led on both: its report runs use it)" in text
    assert "centralized 0.8900 / 0.8900 against 0.9000 / 0.9000 (not on both" in text
    assert "0.9000 (step 2.5, lr 0.001)" in text and "1 of them among the finalists" in text
    assert text.endswith("and the choice (step 2.5, lr 0.001): the federated report runs start from the LDA head.")
