"""Atomic file writes (temp file in the same directory, then rename) and fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success rename it over `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet(path: str | os.PathLike) -> pa.Table:
    return pq.read_table(path)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 20) -> dict[str, Any]:
    """sha256 of the file's bytes (content, not mtime, decides whether inputs changed)."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def dir_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Fingerprint of a model/checkpoint directory: names, sizes and hashes of its small files,
    names and sizes of its weight files (hashing 15 GB of weights on every run is not worth it)."""
    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(path).as_posix()
        size = p.stat().st_size
        h.update(f"{rel}:{size}\n".encode())
        if size < (8 << 20):
            h.update(p.read_bytes())
    return {"path": str(path), "sha256": h.hexdigest()}


def stable_hash(obj: Any) -> str:
    """sha256 of canonical JSON: the same config always gives the same key."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
