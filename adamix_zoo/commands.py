"""CLI verbs of the core package (train, eval, ...). Each is registered onto the main app."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's verbs to ``app``."""
