"""Which folders ``POST /v1/tasks/load`` may read: only under the operator's ``--load-dir`` folders.

Every refused path gets the same message, whether or not it exists, so the endpoint cannot be used
to probe the server's file system.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from adamix_zoo.serving.errors import InputError

SYSTEM_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


class PathNotAllowedError(InputError):
    """A load path outside the allowed folders (or with ``..``), said the same way for all."""


def allowed_folder(path: str, load_dirs: Sequence[Path]) -> Path:
    """``path`` with its symlinks resolved, when it lies strictly inside one of ``load_dirs``.

    Raises:
        PathNotAllowedError: ``..`` in the path, a path (or a symlink target) outside every
            allowed folder, under /proc, /sys or /dev, or no allowed folder at all.
    """
    refused = PathNotAllowedError(
        f"path {path!r} is not one this server may load: it loads task folders only under its "
        "--load-dir folders (or give 'reference', a registry entry)"
    )
    if not path or "\x00" in path or ".." in Path(path).parts:
        raise refused
    real = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(d)) for d in load_dirs]
    if any(real == s or s in real.parents for s in SYSTEM_ROOTS):
        raise refused
    if not any(root in real.parents for root in roots):
        raise refused
    return real
