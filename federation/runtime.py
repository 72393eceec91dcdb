"""Run the app through Flower's own runtime on this machine: a SuperLink (simulation or deployment),
SuperNodes, and ``flwr run``, with Flower's state in a private ``FLWR_HOME``.

``adamix-zoo federate``, the integration tests and the benchmark use this; every process started
here is stopped (its whole process group) when the ``LocalFederation`` context exits, also on
Ctrl-C (KeyboardInterrupt) and on SIGTERM, which the context turns into ``SystemExit(143)``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import tomli_w

CONNECTION = "adamix-local"
SHIM_PACKAGE = "adamix_federation_app"


class RuntimeFailure(RuntimeError):
    """A Flower process failed to start, or the run did not finish."""


def write_app(folder: Path) -> Path:
    """A minimal Flower app whose components import the installed ``federation`` package.

    ``flwr run`` ships the app folder as a FAB; this one holds two one-line modules and a
    ``pyproject.toml`` with the run-config defaults, so it works from a wheel install as well as
    from a checkout (the SuperLink runs without dependency installation, in this environment).
    """
    from federation.config import FederationConfig

    package = folder / SHIM_PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""Entry points of the adamix-zoo Flower app."""\n')
    # An assignment, not a re-export: Flower checks a component by parsing for `app = ...`.
    (package / "server.py").write_text(
        "from federation import server_app\n\napp = server_app.app\n"
    )
    (package / "client.py").write_text(
        "from federation import client_app\n\napp = client_app.app\n"
    )
    project = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": "adamix-zoo-federation",
            "version": "0.1.0",
            "description": "adamix-zoo federation",
            "license": "Apache-2.0",
            "dependencies": ["adamix-zoo[federation]"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "adamix-zoo",
                    "components": {
                        "serverapp": f"{SHIM_PACKAGE}.server:app",
                        "clientapp": f"{SHIM_PACKAGE}.client:app",
                    },
                    "config": FederationConfig().to_run_config(),
                }
            }
        },
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _executable(name: str) -> str:
    """A Flower console script from this interpreter's environment (else from PATH)."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise RuntimeFailure(f"{name} not found: install adamix-zoo[federation]")
    return found


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM as an exception, so ``with`` blocks (and so ``LocalFederation.stop``) run."""
    raise SystemExit(128 + signum)


class LocalFederation:
    """A SuperLink on 127.0.0.1 plus (deployment mode) SuperNodes, in a temporary FLWR_HOME.

    Args:
        simulation: start the SuperLink with ``--simulation`` (Ray backend runs the ClientApps);
            otherwise clients are SuperNodes started with ``add_supernode``.
        home: FLWR_HOME to use; None creates a temporary folder, removed on exit.
        log_dir: where each process's output goes (default: ``<home>/logs``).
    """

    def __init__(
        self,
        simulation: bool = True,
        home: str | os.PathLike | None = None,
        log_dir: str | os.PathLike | None = None,
    ) -> None:
        self.simulation = simulation
        self._own_home = home is None
        self.home = Path(home or tempfile.mkdtemp(prefix="adamix-flwr-"))
        self.log_dir = Path(log_dir or self.home / "logs")
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        self._sigterm: Any = None  # the SIGTERM handler before the context was entered

    # -- environment -----------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = os.environ.copy()
        env |= {
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        }
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        return env

    def _write_connection(self) -> None:
        """Flower 1.41 reads SuperLink connections from $FLWR_HOME/config.toml."""
        config = {
            "superlink": {
                "default": CONNECTION,
                CONNECTION: {"address": f"127.0.0.1:{self.port}", "insecure": True},
            }
        }
        (self.home / "config.toml").write_text(tomli_w.dumps(config))

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                args,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=True,
            )
        self.processes[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- processes -------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "LocalFederation":
        """Start the SuperLink (no runtime dependency installation) and wait for its API."""
        self.home.mkdir(parents=True, exist_ok=True)
        self._write_connection()
        args = [
            _executable("flower-superlink"),
            "--insecure",
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.home / "state.db"),
        ]
        proc = self._spawn("superlink", args + (["--simulation"] if self.simulation else []))
        self._wait_listening(proc, "superlink", timeout)
        return self

    def _wait_listening(self, proc: subprocess.Popen, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeFailure(
                    f"{name} exited with code {proc.returncode}:\n{self.log(name)[-3000:]}"
                )
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise RuntimeFailure(
            f"{name} did not listen on 127.0.0.1:{self.port} within {timeout:.0f}s"
        )

    def add_supernode(self, partition_id: int, num_partitions: int) -> subprocess.Popen:
        """Start a SuperNode (deployment mode) that holds partition ``partition_id``."""
        if self.simulation:
            raise RuntimeFailure("a simulation SuperLink runs its own virtual SuperNodes")
        args = [
            _executable("flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(free_port()),
            "--isolation",
            "subprocess",
            "--node-config",
            f"partition-id={partition_id} num-partitions={num_partitions}",
        ]
        return self._spawn(f"supernode-{partition_id}", args)

    def kill(self, name: str) -> None:
        """SIGKILL a process group (a crashed machine), e.g. ``supernode-1``."""
        proc = self.processes[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        """Stop every process this object started, and their descendants (Ray's daemons may leave
        the process group): SIGTERM the groups, SIGKILL whatever is left after 10 s."""
        descendants = self._descendants()
        for proc in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for proc in self.processes.values():  # children a terminated leader left in its group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for child in descendants:
            try:
                child.kill()
            except psutil.Error:  # already gone
                pass

    def _descendants(self) -> list["psutil.Process"]:
        found = []
        for proc in self.processes.values():
            try:
                found += psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                pass
        return found

    def __enter__(self) -> "LocalFederation":
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            self._sigterm = signal.signal(signal.SIGTERM, _terminate)
        try:
            return self.start()
        except BaseException:  # a SuperLink that did not come up may still be running
            self.__exit__()
            raise

    def __exit__(self, *exc: Any) -> None:
        main = threading.current_thread() is threading.main_thread()
        if main:  # a second Ctrl-C or SIGTERM waits until every process is stopped
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self.stop()
            if self._own_home:
                shutil.rmtree(self.home, ignore_errors=True)
        finally:
            if main:
                if self._sigterm is not None:
                    signal.signal(signal.SIGTERM, self._sigterm)
                    self._sigterm = None
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

    # -- flwr run --------------------------------------------------------------------------------
    def run(
        self,
        run_config: dict[str, Any],
        app_dir: str | os.PathLike | None = None,
        num_supernodes: int | None = None,
        timeout: float = 3600.0,
        background: bool = False,
        echo: bool = False,
    ):
        """``flwr run`` the app with ``run_config`` overrides; waits for the end unless background.

        Args:
            app_dir: the Flower app folder; None writes the shim app (``write_app``) into the home.
            num_supernodes: virtual SuperNodes in simulation (default: ``num-clients``).
            echo: stream the run's log to this process's stdout as well as to ``flwr-run.log``.

        Returns:
            The running ``Popen`` when ``background``, else the run's log text.

        Raises:
            RuntimeFailure: ``flwr run`` failed or timed out.
        """
        app_dir = app_dir or write_app(self.home / "app")
        overrides = self.home / "run_config.toml"
        overrides.write_text(tomli_w.dumps(run_config))
        args = [
            _executable("flwr"),
            "run",
            str(app_dir),
            CONNECTION,
            "--run-config",
            str(overrides),
            "--stream",
        ]
        if self.simulation:
            n = num_supernodes or int(run_config.get("num-clients", 2))
            args += ["--federation-config", f"num-supernodes={n}"]
        proc = self._spawn("flwr-run", args)
        if background:
            return proc
        self._follow(proc, echo, timeout)
        if proc.returncode != 0:
            raise RuntimeFailure(
                f"flwr run failed ({proc.returncode}):\n{self.log('flwr-run')[-3000:]}"
            )
        return self.log("flwr-run")

    def _follow(self, proc: subprocess.Popen, echo: bool, timeout: float) -> None:
        """Wait for ``proc``, echoing its log as it grows."""
        deadline, shown = time.monotonic() + timeout, 0
        while proc.poll() is None or echo:
            if echo:
                text = self.log("flwr-run")
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
                if proc.poll() is not None:
                    break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeFailure(f"flwr run did not finish within {timeout:.0f}s")
            time.sleep(0.5)
