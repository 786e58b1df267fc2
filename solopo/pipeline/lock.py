"""One writer per run directory: an advisory `fcntl.flock` on run_dir/.lock for the whole invocation.

flock belongs to the open file, so the kernel frees it when the holder exits for any reason (kill -9
included): a stale lock file is never an obstacle. The file holds the holder's PID and command so that
a second invocation can say who is using the directory. Re-entrant within one process (the CLI takes
the lock for the whole command, Pipeline.run takes it again).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import RunDirError
from .io import storage_error

LOCK_NAME = ".lock"
_HELD: dict[str, list[int]] = {}  # real path of the lock file -> [fd, depth]


def prepare_run_dir(run_dir: str | os.PathLike) -> Path:
    """Create the run dir, or say clearly why it cannot be one (a file, under a file, not writable)."""
    p = Path(run_dir)
    if p.exists() and not p.is_dir():
        raise RunDirError(f"run dir {p} is a file, not a directory; pass another --run-dir or move the file away")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError):
        blocker = next((a for a in [p, *p.parents] if a.exists() and not a.is_dir()), None)
        raise RunDirError(
            f"cannot create run dir {p}: {blocker or 'a parent'} is a file, not a directory; "
            "pass another --run-dir or move that file away"
        ) from None
    except OSError as e:
        err = storage_error(e, p)
        if err is None:
            raise
        raise err from None
    return p


def _holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    if not text:
        return "a process that has not written its PID yet"
    words = text.split()
    if len(words) > 1 and words[0] == "pid" and words[1].isdigit():
        try:
            os.kill(int(words[1]), 0)
        except ProcessLookupError:
            # flock is shared with forked children: a worker of a killed run can outlive it.
            return f"{text}; that PID is gone, so a child process it started still holds it: `fuser -v {path}`"
        except PermissionError:
            pass
    return text


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Hold the run dir's lock, or fail at once (RunDirError) naming the PID and command that holds it."""
    rd = prepare_run_dir(run_dir)
    path = rd / LOCK_NAME
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        err = storage_error(e, path)
        if err is None:
            raise
        raise RunDirError(f"run dir {rd} is not writable ({e.strerror}); choose a writable --run-dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise RunDirError(
            f"run dir {rd} is in use by another solopo run ({_holder(path)}); wait for it to finish or pass "
            "another --run-dir (two runs writing one directory would overwrite each other's outputs)"
        ) from None
    cmd = command or shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {cmd}\n".encode())
    _HELD[key] = [fd, 1]
    try:
        yield path
    finally:
        del _HELD[key]
        os.close(fd)  # releases the flock; the file stays (unlinking it would race a waiting opener)
