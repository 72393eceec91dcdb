"""End to end through Flower's own runtime (real processes, tiny model): a SuperLink in simulation
mode driven by ``adamix-zoo federate``, and the Deployment Engine with SuperNodes, one killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from federation.runtime import LocalFederation
from registry import Store
from tests.test_federation_support import tiny_run_config

pytestmark = pytest.mark.integration
PROJECT = Path(__file__).resolve().parents[1]

pytest_plugins = ["tests.test_federation_support"]


def test_federate_command_runs_a_simulation_and_publishes(tiny_env):
    env = os.environ | {"ADAMIX_ZOO_HOME": str(tiny_env / "zoo"), "HF_HUB_OFFLINE": "1"}
    cmd = [
        str(Path(sys.executable).parent / "adamix-zoo"),
        "federate",
        "--tasks",
        "sst2",
        "--clients",
        "2",
        "--rounds",
        "1",
        "--local-steps",
        "2",
        "--backbone",
        str(tiny_env / "backbone"),
        "--data-dir",
        str(tiny_env / "data"),
        "--output-dir",
        str(tiny_env / "out"),
        "--partitioner",
        "dirichlet",
        "--alpha",
        "0.5",
        "--run-config",
        "batch-size=8 max-length=16 num-experts=2 rank=2",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round 1: aggregated 2 valid updates" in done.stdout
    metrics = json.loads((tiny_env / "out" / "final_metrics.json").read_text())
    assert metrics["federation"]["aggregated_rounds"] == [1]
    run = json.loads((tiny_env / "out" / "run_config.json").read_text())
    assert run["federation"]["partitioner"] == "dirichlet" and run["federation"]["clients"] == 2
    assert [e.ref for e in Store(tiny_env / "zoo").list()] == ["federated/sst2@1"]


def test_deployment_engine_survives_a_killed_supernode(tiny_env):
    rc = tiny_run_config(
        tiny_env, **{"num-clients": 3, "num-rounds": 1, "local-steps": 10, "round-timeout": 150.0}
    )
    with LocalFederation(simulation=False, log_dir=tiny_env / "logs") as fed:
        for pid in range(3):
            fed.add_supernode(pid, 3)
        proc = fed.run(rc, app_dir=PROJECT, background=True)  # `flwr run .` on this project
        deadline = time.monotonic() + 200
        while "Start `flwr-clientapp` process" not in fed.log(
            "supernode-2"
        ):  # its round-1 training began
            assert time.monotonic() < deadline and proc.poll() is None, fed.log("flwr-run")[-3000:]
            time.sleep(0.2)
        fed.kill("supernode-2")
        proc.wait(timeout=300)
        log = fed.log("flwr-run")
    assert "round 1: aggregated 2 valid updates" in log, log[-4000:]
    metrics = json.loads((tiny_env / "out" / "final_metrics.json").read_text())
    assert metrics["federation"]["accepted_updates"] == {"1": 2}
    assert [e.ref for e in Store(rc["registry-dir"]).list()] == ["federated/sst2@1"]
    assert not [p for p in fed.processes.values() if p.poll() is None]
