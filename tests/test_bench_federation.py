"""bench/federation.py: workers started together share the unfinished jobs; every diagnosis names valid run-config settings."""

from __future__ import annotations

import argparse

import pytest

from bench import federation


def test_workers_started_together_run_disjoint_shares_of_the_unfinished_jobs(monkeypatch, tmp_path):
    ran: list[int] = []
    monkeypatch.setattr(federation, "data_dir", lambda: tmp_path)
    monkeypatch.setattr(federation, "selection_data", lambda p, folder: tmp_path)
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
