"""Atomic, concurrent publishing with real processes: SIGKILL mid-publish, two publishers at once.

Each publisher is a separate Python process. ``ADAMIX_ZOO_TEST_PAUSE=<step>:<seconds>`` makes
``Store.commit`` announce a step on stderr and sleep there, so a test can kill it at that exact
point: ``staged`` (files written, nothing indexed) or ``renamed`` (the folder already moved into
``entries/``, the index row not yet committed, SQLite's write lock held).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from registry import Store
from tests.registry_runs import make_run, trained_task_model, write_run
from tests.tiny import tiny_batch, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PUBLISH = """
import json, sys
from registry import Store, EntryExistsError
root, run, version = sys.argv[1], sys.argv[2], (sys.argv[3] or None)
try:
    info = Store(root).publish(run, version=version)
    print(json.dumps({"ok": info.ref}))
except EntryExistsError as err:
    print(json.dumps({"error": str(err)}))
"""


def _publisher(root: Path, run: Path, version: str = "", pause: str = "") -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), ADAMIX_ZOO_TEST_PAUSE=pause)
    return subprocess.Popen([sys.executable, "-c", PUBLISH, str(root), str(run), version], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_pause(proc: subprocess.Popen, step: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if f"adamix-zoo-pause {step}" in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"publisher exited before {step}: {proc.stdout.read()}")
    raise AssertionError(f"publisher never reached {step}")


@pytest.mark.integration
@pytest.mark.parametrize("step", ["staged", "renamed"])
def test_sigkill_mid_publish_leaves_no_entry_and_a_consistent_store(tmp_path, step):
    store = Store(tmp_path / "store")
    kept = store.publish(make_run(tmp_path / "kept", task="rte", seed=3))
    tm = trained_task_model(seed=1)
    run = write_run(tmp_path / "run", tm)
    proc = _publisher(store.root, run, pause=f"{step}:60")
    _wait_for_pause(proc, step)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    assert [i.ref for i in store.list()] == [kept.ref]  # nothing half-written is visible
    assert store.check() == []
    assert store.garbage(), "the killed publish should leave garbage to collect"
    store.gc(min_age_s=0)
    assert store.garbage() == [] and store.check() == []
    again = store.publish(run)  # the name is free and the store works
    assert again.ref == "local/sst2@1"
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(store.attach(again.ref, tiny_model("bert", head="base"))(**batch), tm(**batch))


@pytest.mark.integration
def test_two_processes_publishing_the_same_name(tmp_path):
    """Explicit version: exactly one wins, the other gets a clear error. Auto version: 1 and 2."""
    store = Store(tmp_path / "store")
    runs = [make_run(tmp_path / f"run{i}", seed=i) for i in range(2)]
    # both pause after staging, then race for the index (SQLite BEGIN IMMEDIATE serialises them)
    procs = [_publisher(store.root, r, version="7", pause="staged:1") for r in runs]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    winners = [r for r in results if "ok" in r]
    losers = [r for r in results if "error" in r]
    assert len(winners) == 1 and len(losers) == 1
    assert "local/sst2@7 already exists; entries are immutable" in losers[0]["error"]
    assert [i.ref for i in store.list()] == ["local/sst2@7"] and store.check() == []

    procs = [_publisher(store.root, r, pause="staged:1") for r in runs]
    refs = sorted(json.loads(p.communicate(timeout=120)[0])["ok"] for p in procs)
    assert refs == ["local/sst2@8", "local/sst2@9"]
    assert store.check() == [] and store.gc(min_age_s=0) == []
