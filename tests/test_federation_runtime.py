"""End to end through Flower's own runtime (real processes, tiny model): a SuperLink in simulation
mode driven by ``adamix-zoo federate``, the Deployment Engine with SuperNodes, one killed, twenty
sampled clients with injected crashes, and SIGTERM / SIGINT stopping every process started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from federation.runtime import LocalFederation
from registry import Store
from tests.test_federation_support import make_glue, tiny_run_config

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


def test_twenty_client_simulation_samples_a_fraction_and_survives_crashes(tiny_env):
    make_glue(tiny_env / "data", rows=400)
    rc = tiny_run_config(tiny_env, **{
        "num-clients": 20, "num-rounds": 2, "fraction-train": 0.25, "fraction-evaluate": 0.1,
        "evaluate-every": 2, "drop-rate": 0.2, "publish": False, "round-timeout": 300.0, "head-init": "lda",
    })
    with LocalFederation(simulation=True, log_dir=tiny_env / "logs") as fed:
        log = fed.run(rc, timeout=600)
    assert log.count("configure_train: Sampled 5 nodes (out of 20)") == 2, log[-4000:]
    assert log.count("configure_evaluate: Sampled 2 nodes (out of 20)") == 1  # the last round only
    assert "20 of 20 nodes gave their partition id" in log  # sampling is reproducible (federation.sampling)
    assert "head-init=lda: the head is the LDA of 20 clients' 400 rows (" in log  # statistics over Flower's messages
    report = json.loads((tiny_env / "out" / "final_metrics.json").read_text())["federation"]
    rejected = report.get("rejected_updates", {})
    for r in ("1", "2"):  # every sampled client either aggregated or was dropped by the fault knob
        dropped = rejected.get(r, [])
        assert report["accepted_updates"][r] + len(dropped) == 5
        assert all("fault injection" in d["reason"] for d in dropped)
    assert report["aggregated_rounds"] == [1, 2]


MARKER = "ADAMIX_SIGNAL_TEST"
# SIGINT as in a terminal: a shell without job control starts background jobs with SIGINT ignored,
# and the child would inherit that.
HOLD_FEDERATION = """
import signal, sys, time
from federation.runtime import LocalFederation
signal.signal(signal.SIGINT, signal.default_int_handler)
with LocalFederation(simulation=False) as fed:
    for pid in range(2):
        fed.add_supernode(pid, 2)
    print("ready", flush=True)
    time.sleep(600)
"""


def marked_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``marker`` (everything the test's child started)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:  # gone, or not ours
            pass
    return found


def command_lines(marker: str) -> str:
    """The command lines of ``marked_processes``, one string (a process may end while it is read)."""
    lines = []
    for proc in marked_processes(marker):
        try:
            lines.append(" ".join(proc.cmdline()))
        except psutil.Error:  # exited (or a zombie) since it was found
            pass
    return " ".join(lines)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_every_process_a_local_federation_started(tmp_path, signum):
    marker = f"{tmp_path.name}-{signum}"
    env = os.environ | {MARKER: marker, "PYTHONPATH": str(PROJECT)}
    child = subprocess.Popen([sys.executable, "-c", HOLD_FEDERATION], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        wait_until(lambda: command_lines(marker).count("flower-supernode") >= 2
                   and "flower-superlink" in command_lines(marker), 60, "the SuperLink and two SuperNodes")
        child.send_signal(signum)
        assert child.wait(timeout=120) == (143 if signum == signal.SIGTERM else -signal.SIGINT)
        wait_until(lambda: marked_processes(marker) == [], 20, "the Flower processes to stop")
    finally:
        child.kill()
        for proc in marked_processes(marker):
            proc.kill()


def test_sigterm_of_the_federate_command_mid_run_stops_the_simulation(tiny_env):
    marker = f"{tiny_env.name}-federate"
    env = os.environ | {MARKER: marker, "ADAMIX_ZOO_HOME": str(tiny_env / "zoo"), "HF_HUB_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "adamix-zoo"), "federate", "--clients", "2", "--rounds", "50",
           "--local-steps", "50", "--backbone", str(tiny_env / "backbone"), "--data-dir", str(tiny_env / "data"),
           "--output-dir", str(tiny_env / "out"), "--no-publish", "--run-config", "num-experts=2 rank=2"]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # Ray's actors run the ClientApps: the run is under way
        wait_until(lambda: "ClientAppActor" in command_lines(marker), 240, "the simulation's client actors")
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 143
        wait_until(lambda: marked_processes(marker) == [], 30, "the Flower and Ray processes to stop")
    finally:
        child.kill()
        for proc in marked_processes(marker):
            proc.kill()
