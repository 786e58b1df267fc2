"""Atomic file writes (temp file in the same directory, then rename), output records and fingerprints."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import RunDirError

# Errors of the storage, not of the program: reported as a message naming the path and what to do.
_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def storage_error(e: OSError, path: str | os.PathLike) -> RunDirError | None:
    """A RunDirError for a full/read-only/forbidden storage, else None (a real bug stays a traceback)."""
    code = getattr(e, "errno", None)
    if code not in _STORAGE_ERRNOS and "No space left on device" in str(e):
        code = errno.ENOSPC  # pyarrow sometimes loses the errno in its own OSError
    if code not in _STORAGE_ERRNOS:
        return None
    fix = (
        "free some space (or point --run-dir at a larger disk) and rerun the same command: finished stages and "
        "shards are kept and nothing half-written is marked done"
        if code in (errno.ENOSPC, errno.EDQUOT)
        else "choose a writable --run-dir or fix the permissions"
    )
    return RunDirError(f"cannot write {path}: {_STORAGE_ERRNOS[code]} ({e.strerror or e}); {fix}")


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success rename it over `path`, on failure remove it.

    mkstemp creates the temp file 0600; it gets the mode a plain open() would give (0666 & ~umask) before
    the rename, so that a group sharing the run dir can read the outputs. A full or read-only disk becomes
    a RunDirError naming the file."""
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except OSError as e:
        err = storage_error(e, path)
        if err is None:
            raise
        raise err from e
    finally:
        if tmp_path is not None and tmp_path.exists():
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


_SMALL = 8 << 20  # files below this are hashed whole


def is_document(name: str) -> bool:
    """Hand-editable documents (data and model cards, report.md) and logs (vllm.log, which vLLM's engine process
    may still append to after the stage finished): never part of a cache key or an integrity check, so editing or
    appending to one reruns nothing. Only data files (tables, weights, configs) decide what is redone."""
    return name.lower().endswith((".md", ".log"))


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a .safetensors file (tensor names, dtypes, shapes, offsets); b"" if unreadable."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(min(n, 100 << 20))
    except (OSError, struct.error):
        return b""


def dir_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Fingerprint of a model/checkpoint directory: names, sizes and hashes of its small files; names,
    sizes, mtime_ns and (safetensors) headers of its weight files. Hashing 15 GB of weights on every run
    is not worth it, but retraining or overwriting weights of the same shape in place changes mtime_ns,
    so the cache cannot keep stale results (copying a model without -p only costs a rerun)."""
    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if not p.is_file() or is_document(rel):
            continue
        st = p.stat()
        if st.st_size < _SMALL:
            h.update(f"{rel}:{st.st_size}\n".encode())
            h.update(p.read_bytes())
        else:
            h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            if p.suffix == ".safetensors":
                h.update(_safetensors_header(p))
    return {"path": str(path), "sha256": h.hexdigest()}


# --- output records: what the manifest remembers of each file a stage wrote, checked on every skip ----
_FULL_HASH_MAX = 256 << 20  # bigger files (model weights) get a sampled hash: 16 blocks + the size


def _sampled_sha256(path: Path, size: int, block: int = 1 << 16, blocks: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(max(0, (size - block) * i // (blocks - 1)))
            h.update(f.read(block))
    return h.hexdigest()


_VERIFIED: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime_ns) -> digest, per process


def output_record(path: str | os.PathLike, full: bool = False) -> dict[str, Any]:
    """{"bytes", "sha256", "hash"} of one output file. `full` (data.parquet) always hashes every byte."""
    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    how = "full" if full or st.st_size <= _FULL_HASH_MAX else "sampled"
    if memo in _VERIFIED and how == "full":
        digest = _VERIFIED[memo]
    elif how == "full":
        digest = file_fingerprint(path)["sha256"]
        _VERIFIED[memo] = digest
    else:
        digest = _sampled_sha256(path, st.st_size)
    return {"bytes": st.st_size, "sha256": digest, "hash": how}


def check_output(path: str | os.PathLike, record: dict[str, Any]) -> str | None:
    """None when the file still matches its record, else what is wrong (missing, size, content)."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != record.get("bytes"):
        return f"{path} has {size} bytes, the manifest recorded {record.get('bytes')}"
    now = output_record(path, full=record.get("hash", "full") == "full")
    if now["sha256"] != record.get("sha256"):
        return f"{path} changed since it was written (sha256 differs from the manifest)"
    return None


def path_in_run(path: str | os.PathLike, run_dir: str | os.PathLike) -> str:
    """How a run dir stores a path: relative to the run dir when it lies inside it (a copied or moved run dir
    then still points at its own files), else as given (a base model, a hub id, another dir)."""
    p, root = Path(path), Path(run_dir)
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except (ValueError, OSError):
        return str(path)


def resolve_in_run(stored: str, run_dir: str | os.PathLike) -> str:
    """The usable path of one `path_in_run` stored: relative ones are under the run dir; absolute ones (and
    hub ids, which never exist locally) stay as they are."""
    p = Path(stored)
    if p.is_absolute() or not (Path(run_dir) / p).exists():
        return stored
    return str(Path(run_dir) / p)


def stable_hash(obj: Any) -> str:
    """sha256 of canonical JSON: the same config always gives the same key."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
