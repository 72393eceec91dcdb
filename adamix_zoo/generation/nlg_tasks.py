"""Data-to-text task specs: how a row becomes a source text and its references.

Each hub schema is read as is (``../shared/data/{e2e,webnlg,dart}`` or the hub datasets). A source
is linearised to one line; training uses one (source, reference) pair per reference, evaluation
groups every reference of the same source, as the challenges score against all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

Row = dict[str, Any]
# Every task's prompt; a published generation adapter records it so a server can build the same one.
PROMPT_TEMPLATE = "Data: {source}\nText:"


def _e2e_source(row: Row) -> str:
    return row["meaning_representation"]


def _triples_source(triples: list[str]) -> str:
    # WebNLG triples are "Subject_Name | property | object"; underscores are word separators.
    return " ; ".join(t.replace("_", " ") for t in triples)


def _webnlg_source(row: Row) -> str:
    return _triples_source(row["triples"])


def _dart_source(row: Row) -> str:
    return _triples_source([" | ".join(t) for t in row["tripleset"]])


@dataclass(frozen=True)
class NLGTask:
    name: str
    hub_id: str
    source: Callable[[Row], str]
    references: Callable[[Row], list[str]]
    columns: tuple[str, ...]

    def prompt(self, source: str) -> str:
        """The text the model continues; the target follows after a space."""
        return PROMPT_TEMPLATE.format(source=source)


NLG_TASKS: dict[str, NLGTask] = {
    "e2e": NLGTask(
        "e2e", "tuetschek/e2e_nlg", _e2e_source, lambda r: [r["human_reference"]],
        ("meaning_representation", "human_reference"),
    ),
    "webnlg": NLGTask(
        "webnlg", "webnlg-challenge/web_nlg", _webnlg_source, lambda r: list(r["texts"]),
        ("triples", "texts"),
    ),
    "dart": NLGTask(
        "dart", "Yale-LILY/dart", _dart_source, lambda r: [a["text"] for a in r["annotations"]],
        ("tripleset", "annotations"),
    ),
}


def get_nlg_task(name: str) -> NLGTask:
    try:
        return NLG_TASKS[name]
    except KeyError:
        raise ValueError(f"unknown generation task {name!r}; choose one of {', '.join(NLG_TASKS)}") from None
