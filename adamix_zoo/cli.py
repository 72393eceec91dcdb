"""The ``adamix-zoo`` command: one typed CLI whose verbs live next to the code they drive.

Each module in ``COMMAND_MODULES`` defines ``register(app)`` and keeps its heavy imports inside the
command functions, so ``adamix-zoo --help`` stays fast and ``adamix_zoo`` never imports
``registry`` or ``federation`` at module level.
"""

from __future__ import annotations

import importlib

import typer

import adamix_zoo

COMMAND_MODULES = (
    "adamix_zoo.commands",
    "adamix_zoo.serving.commands",
    "registry.commands",
    "federation.commands",
)

app = typer.Typer(
    name="adamix-zoo",
    help="Train AdaMix adapters, federate them with Flower, keep them in a zoo, serve many tasks.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


@app.callback()
def _root() -> None:
    """Train AdaMix adapters, federate them with Flower, keep them in a zoo, serve many tasks."""


@app.command()
def version() -> None:
    """Print the installed adamix-zoo version."""
    typer.echo(adamix_zoo.__version__)


_registered: list[str] = []


def _register_commands() -> None:
    """Add every module's verbs to ``app`` once (tests and ``main`` may both call this)."""
    for name in COMMAND_MODULES:
        if name not in _registered:
            importlib.import_module(name).register(app)
            _registered.append(name)


def main() -> None:
    _register_commands()
    app()
