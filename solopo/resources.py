"""Files shipped inside the package (data card template, DeepSpeed configs, the QA samples), read through
importlib.resources: a wheel install behaves exactly like a checkout, and nothing is read from outside the package."""

from __future__ import annotations

import atexit
import contextlib
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from pathlib import Path

from solopo.pipeline.errors import SolopoError

# Zipped installs extract a resource to a temp file for as long as the process lives.
_EXTRACTED = contextlib.ExitStack()
atexit.register(_EXTRACTED.close)


def resource(*parts: str) -> Traversable:
    """solopo/<parts...> inside the installed package."""
    node = files("solopo")
    for p in parts:
        node = node.joinpath(p)
    if not node.is_file():
        raise SolopoError(
            f"packaged file solopo/{'/'.join(parts)} is missing from the installed solopo; "
            "reinstall it (`pip install --force-reinstall solopo`, or `pip install .` from a checkout)"
        )
    return node


def resource_text(*parts: str) -> str:
    return resource(*parts).read_text(encoding="utf-8")


def resource_path(*parts: str) -> Path:
    """A real filesystem path (loaders open it, fingerprints hash it)."""
    node = resource(*parts)
    if isinstance(node, Path):
        return node
    return Path(_EXTRACTED.enter_context(as_file(node)))


__all__ = ["resource", "resource_path", "resource_text"]
