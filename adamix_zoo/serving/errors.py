"""The errors serving raises for a request or an adapter it refuses (the server maps them to 4xx)."""

from __future__ import annotations


class UnknownTaskError(KeyError):
    """A request names a task that is not attached."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class FingerprintMismatchError(ValueError):
    """An adapter was trained on other base weights than this backbone's."""


class InputError(ValueError):
    """A request input the engine refuses (too long, empty, wrong shape, wrong kind of task)."""


class ServerFaultError(RuntimeError):
    """The server failed on a request that was fine (e.g. an evicted adapter would not reload).

    Mapped to 503: the client is not to blame and may retry; the message says what failed.
    """


class TaskExistsError(ValueError):
    """A load names a task that is already served, without asking to replace it."""
