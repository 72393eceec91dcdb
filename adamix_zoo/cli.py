"""The ``adamix-zoo`` command: one typed CLI whose verbs live next to the code they drive.

Each module in ``COMMAND_MODULES`` defines ``register(app)`` and keeps its heavy imports inside the
command functions, so ``adamix-zoo --help`` stays fast and ``adamix_zoo`` never imports
``registry`` or ``federation`` at module level.

Errors: ``main`` turns an exception into one line, ``error: <what went wrong>``, and exit status 1;
``adamix-zoo --debug <verb> ...`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sqlite3
import sys

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


_options = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
) -> None:
    """Train AdaMix adapters, federate them with Flower, keep them in a zoo, serve many tasks."""
    _options["debug"] = debug


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


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause (bad input, files, network): reported in one line, no traceback."""
    errors: list[type[BaseException]] = [ValueError, OSError, LookupError, sqlite3.Error, RuntimeError]
    for module, name in (("huggingface_hub.errors", "HfHubHTTPError"), ("httpx", "HTTPError"),
                         ("requests", "RequestException")):
        cls = getattr(sys.modules.get(module), name, None)  # only if that library is in use
        if isinstance(cls, type):
            errors.append(cls)
    return tuple(errors)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    return text if len(text) <= 600 else text[:600] + " ..."


def main(argv: list[str] | None = None) -> None:
    """The ``adamix-zoo`` entry point: one ``error: ...`` line and exit status 1 on failure.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    _register_commands()
    argv = sys.argv[1:] if argv is None else list(argv)
    _options["debug"] = "--debug" in argv
    try:
        app(args=argv, prog_name="adamix-zoo")
    except SystemExit:
        raise
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        sys.exit(130)
    except Exception as err:
        if _options["debug"]:
            raise
        known = isinstance(err, _expected_errors())
        prefix = "error" if known else f"internal error ({type(err).__name__})"
        typer.secho(f"{prefix}: {_one_line(err)}", fg=typer.colors.RED, err=True)
        typer.secho("(run again with `adamix-zoo --debug ...` for the traceback)", err=True)
        sys.exit(1)
