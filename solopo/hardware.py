"""What the machine can do fast (dtypes, threads) and the CPU settings vLLM needs on it."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path


def passive_openmp_wait() -> bool:
    """setdefault OMP_WAIT_POLICY=PASSIVE (an exported value wins); False when torch is already loaded (then
    it is too late: OpenMP reads the policy once). By default a thread that reaches a barrier spins, so on a
    machine whose cores other jobs also use, every parallel region of a decode step waits for a descheduled
    sibling while the spinning one burns its time slice: SmolLM2-135M decode steps (16 rows, 2 threads) took
    4.9-6.0 s with the default and 0.34-0.57 s with PASSIVE at load average ~20 on 2 cores
    (bench/sample/omp_wait.md)."""
    import sys

    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (Intel AMX or AVX512-BF16): there bf16 inference is
    several times faster than fp32 (SmolLM2-135M generate: 3.4x on a 2-core Sapphire Rapids guest);
    elsewhere bf16 is emulated and slower."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def usable_cpus() -> list[int]:
    """CPU ids this process may run on (cgroup/taskset aware)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


@functools.lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores among the usable CPUs: hyper-thread siblings share one core's matrix units, so more
    torch threads than cores only adds contention."""
    cpus = usable_cpus()
    cores = set()
    for c in cpus:
        try:
            sib = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add(sib)
    return max(1, len(cores))


def set_torch_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None = physical cores) and return the number in effect. More threads than
    free cores makes every OpenMP barrier wait for a descheduled thread; on a shared machine that turns a
    decode step from milliseconds into scheduler time slices."""
    import torch

    n = threads or physical_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)  # an in-process vLLM engine that ran before turns this into a no-op
    return torch.get_num_threads()  # what is in effect, for the manifest


# vLLM's CPU build reads these at engine start. Defaults for a machine that runs other work: a fixed KV cache
# (vLLM's default reserves 92% of the node's memory and refuses to start when less is free), OpenMP bound
# to the usable cores, no core reserved for the engine's own process.
VLLM_CPU_ENV_KEYS = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")


def vllm_cpu_env(threads: int | None = None, kv_cache_gib: int | None = None) -> dict[str, str]:
    """setdefault vLLM's CPU settings in os.environ (a value the user exported wins) and return the values
    in effect, for the manifest. Must run before vllm is imported (some are read at import)."""
    cpus = usable_cpus()
    if threads:
        cpus = cpus[:threads]
    if kv_cache_gib is None:
        kv_cache_gib = _default_kv_cache_gib()
    defaults = {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": _cpu_ranges(cpus),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in VLLM_CPU_ENV_KEYS}


def _default_kv_cache_gib() -> int:
    """A quarter of the memory available now, between 1 and 4 GiB (4 GiB holds ~50k tokens of a 7B model in
    bf16 and far more for small models)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail_gib = int(line.split()[1]) / 2**20
                return int(min(4, max(1, avail_gib // 4)))
    except OSError:
        pass
    return 2


def _cpu_ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the syntax of VLLM_CPU_OMP_THREADS_BIND)."""
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(out)


# A watchdog process that outlives its parent only long enough to stop the given processes: vLLM's engine core
# is a spawned process that keeps running (and holding its KV cache) when solopo's process is killed (-9 included).
_WATCHDOG = r"""
import os, signal, sys, time
parent, procs = int(sys.argv[1]), [tuple(map(float, a.split(":"))) for a in sys.argv[2:]]

def same(pid, started):  # the same process, not a later one that reuses its pid
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return abs(float(f.read().rsplit(")", 1)[1].split()[19]) - started) < 1
    except (OSError, IndexError, ValueError):
        return False

while os.getppid() == parent:
    if not any(same(*p) for p in procs):
        sys.exit(0)  # they ended on their own (a normal shutdown)
    time.sleep(0.5)
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid, started in procs:
        if same(pid, started):
            try:
                os.kill(int(pid), sig)
            except OSError:
                pass
    time.sleep(3)
"""


def _start_ticks(pid: int) -> float | None:
    """Start time of a process in clock ticks since boot (/proc/PID/stat field 22), None if it is gone."""
    try:
        return float(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def child_pids() -> set[int]:
    """PIDs of this process's children and their descendants (Linux /proc; empty elsewhere)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [os.getpid()]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def stop_with_parent(pids: set[int] | list[int]) -> subprocess.Popen[bytes] | None:
    """Start a watchdog that stops `pids` (SIGTERM, then SIGKILL 3 s later) once this process dies, however it
    dies (kill -9 included), and exits by itself when they end first. Returns it (terminate it on a normal
    shutdown), or None when there is nothing to watch."""
    procs = [f"{p}:{t}" for p in sorted(pids) if (t := _start_ticks(p)) is not None]
    if not procs:
        return None
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), *procs],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to solopo's process group does not stop the watchdog first
    )
