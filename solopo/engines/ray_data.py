"""Generation on Ray Data: replicas of a solopo backend (vLLM, or transformers where vLLM is absent) as an
actor pool behind `map_batches`, the pattern of Ray's and vLLM's offline batch-inference examples.

    backend = RayDataBackend("auto", model_path, RayLayout(replicas=8))   # one node x 8 GPUs, TP=1
    for key, gens in backend.stream(jobs, n=32, temperature=0.85, top_p=1.0, max_tokens=1024): ...
    backend.generate(prompts, ...)   # the Backend interface, for callers that want all results at once

Layout: `replicas` actors, each holding one backend. On a cluster with GPUs a replica takes
`tensor_parallel_size` GPUs (1 GPU: `num_gpus=1`; more: a STRICT_PACK placement group that vLLM's workers
join); on a CPU-only cluster it takes `cpus_per_replica` CPUs and that many torch threads.

Every prompt carries its own seed. With the transformers backend in fp32 that makes the samples those of
engine=local whatever the layout (tests/test_ray.py); with bf16, or with vLLM, a prompt's logits depend on the
batch it shares, so the layout and Ray's scheduling change some samples (README: Reproducibility).

Failures: a replica call that raises is retried by Ray (`max_retries` times, also when the actor process
dies); when it keeps failing, the caller gets a SolopoError with the replica's own error, not Ray's stack.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from solopo.backends import Generation, ProgressFn, _seeds, resolve_backend_name
from solopo.chat import ChatFormat
from solopo.pipeline.errors import MissingDependencyError, SolopoError

log = logging.getLogger("solopo")

RAY_INSTALL = 'pip install "solopo[ray]"'
CONNECT_TIMEOUT_S = 5.0
SLOW_CONNECT_NOTICE_S = 5.0


class RayEngineError(SolopoError):
    """The Ray engine could not run: no cluster at the address, too few resources, a replica kept failing."""


def import_ray() -> Any:
    """Ray, imported lazily (an optional extra); the error names the install command."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError("ray[data]", RAY_INSTALL, f"engine=ray needs Ray Data ({e}).") from e
    return ray


@dataclass(frozen=True)
class RayLayout:
    address: str | None = None  # None: start a local Ray; "auto": join `ray start`'s cluster; or host:port
    replicas: int = 1
    tensor_parallel_size: int = 1  # GPUs per replica (vLLM)
    cpus_per_replica: float = 1.0  # on a cluster without GPUs
    batch_prompts: int | None = None  # prompts per replica call; None: from the backend and n
    max_retries: int = 3


def _check_reachable(address: str, given: str | None = None) -> None:
    """Fail in seconds when nothing listens at host:port (ray.init would retry for a minute or more)."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise RayEngineError(
            f"ray_address {address!r} is not host:port, ray://host:port or 'auto' (leave it empty to start a local Ray)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        src = f" (what ray_address {given!r} resolved to)" if given and given != address else ""
        raise RayEngineError(
            f"no Ray cluster reachable at ray_address {address!r}{src} ({e}); start one with `ray start --head` on "
            "the head node, check host and port (the head's GCS port, default 6379), or leave ray_address empty "
            "to start a local Ray"
        ) from None


def _resolve_auto() -> str:
    """The address 'auto' means to Ray (RAY_ADDRESS, else the cluster `ray start` recorded), so that a stale
    record fails the reachability check in seconds instead of ray.init retrying for minutes."""
    try:
        from ray._private.services import get_ray_address_from_environment  # private: guarded below
    except ImportError:
        return "auto"
    try:
        found = get_ray_address_from_environment("auto", None)
    except ConnectionError as e:
        raise RayEngineError(
            f"ray_address 'auto' found no Ray cluster ({e}). Start one with `ray start --head` (and "
            "`ray start --address=HEAD_IP:6379` on the other nodes), or leave ray_address empty for a local Ray"
        ) from None
    return found or "auto"


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address` or start a local Ray; True when this call started Ray (so it stops it).

    address None starts a local Ray (unless RAY_ADDRESS is set: then Ray joins that cluster, as Ray always does).
    An already initialized Ray (a notebook, a test fixture) is used as it is.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING)
    if address in (None, "", "local"):
        kw["num_cpus"] = num_cpus
    else:
        target = _resolve_auto() if address == "auto" else address
        if target != "auto":
            _check_reachable(target, given=address)
        kw["address"] = target
    where = kw.get("address") or "a new local Ray"
    # Joining a cluster that is slow to answer takes up to ~20 s of Ray's own retries: say what the wait is.
    waiting = threading.Timer(
        SLOW_CONNECT_NOTICE_S, lambda: log.info("trying to reach %s (ray_address %r) ...", where, address)
    )
    waiting.daemon = True
    waiting.start()
    try:
        ray.init(**kw)
    except ConnectionError as e:
        raise RayEngineError(
            f"could not join a Ray cluster at ray_address {address!r}: {e} Start one with `ray start --head` "
            "(and `ray start --address=HEAD_IP:6379` on the other nodes), or leave ray_address empty for a local Ray"
        ) from None
    finally:
        waiting.cancel()
    return True


def check_resources(layout: RayLayout, resources: dict[str, float], nodes: int) -> bool:
    """Whether the replicas go on GPUs (the cluster has any), and that the cluster can hold them all."""
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    seen = f"Ray reports {gpus:g} GPU(s) and {cpus:g} CPU(s) on {nodes} node(s)"
    if gpus > 0:
        need = layout.replicas * layout.tensor_parallel_size
        if need > gpus:
            raise RayEngineError(
                f"replicas={layout.replicas} x tensor_parallel_size={layout.tensor_parallel_size} asks for {need} "
                f"GPUs; {seen}. Lower replicas (at most {int(gpus // layout.tensor_parallel_size)}) or add nodes"
            )
        return True
    if layout.tensor_parallel_size > 1:
        raise RayEngineError(f"tensor_parallel_size={layout.tensor_parallel_size} needs GPUs; {seen}")
    need = layout.replicas * layout.cpus_per_replica
    if need > cpus:
        raise RayEngineError(
            f"replicas={layout.replicas} x ray_cpus_per_replica={layout.cpus_per_replica:g} asks for {need:g} CPUs "
            f"and the cluster has no GPU; {seen}. Lower replicas or ray_cpus_per_replica"
        )
    return False


class Replica:
    """One backend in a Ray actor; `map_batches` calls it on tables of (key, prompt, seed)."""

    def __init__(
        self,
        backend: str,
        model_path: str,
        opts: dict[str, Any],
        gen: dict[str, Any],
        cpu_threads: int | None,
    ):
        if cpu_threads is not None:
            import torch

            torch.set_num_threads(cpu_threads)  # one replica per cpus_per_replica cores, not all of them each
        from solopo.backends import get_backend

        self.where = f"{socket.gethostname()}:{os.getpid()}"
        self.gen = gen
        self.backend = get_backend(backend, model_path, **opts)

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch.column("prompt").to_pylist()
        outs = self.backend.generate(prompts, seed=batch.column("seed").to_pylist(), **self.gen)
        return pa.table(
            {
                "key": batch.column("key"),
                "texts": pa.array([[g.text for g in gens] for gens in outs], pa.list_(pa.string())),
                "finish_reasons": pa.array([[g.finish_reason for g in gens] for gens in outs], pa.list_(pa.string())),
                "num_tokens": pa.array([[g.num_tokens for g in gens] for gens in outs], pa.list_(pa.int32())),
                "replica": pa.array([self.where] * len(prompts), pa.string()),
                "dtype": pa.array([self.backend.effective_dtype] * len(prompts), pa.string()),
            }
        )


def _placement_group_args(tp: int) -> Callable[[], dict[str, Any]]:
    """Per-actor remote args for TP>1: a packed group of tp GPU bundles that vLLM's workers are placed in."""

    def fn() -> dict[str, Any]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = ray.util.placement_group([{"GPU": 1, "CPU": 1}] * tp, strategy="STRICT_PACK")
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)}

    return fn


def replica_error(e: BaseException) -> RayEngineError:
    """The replica's own exception out of Ray's wrapper (RayTaskError(X).cause is X, with
    raise_original_map_exception), with where it ran; Ray's stack stays in Ray's logs."""
    ray = import_ray()
    inner = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
    m = re.search(r"pid=(\d+), ip=([^,)\s]+)", str(e))  # the dual RayTaskError(X) keeps them only in its text
    where = f" (pid {m.group(1)} on {m.group(2)})" if m else ""
    if inner is None:  # the actor process died (OOM kill, lost node) more often than max_retries
        lines = [x for x in str(e).strip().splitlines() if x.strip()]
        return RayEngineError(f"a Ray replica{where} failed and its retries ran out: {lines[0] if lines else e!r}")
    if isinstance(inner, SolopoError):
        return RayEngineError(f"a Ray replica{where} failed: {str(inner).splitlines()[0]}")
    first = str(inner).strip().splitlines()[0] if str(inner).strip() else ""  # Ray appends its retry hints
    return RayEngineError(f"a Ray replica{where} failed and its retries ran out: {type(inner).__name__}: {first}")


@contextmanager
def _data_context(max_retries: int) -> Iterator[None]:
    """Ray Data settings for one run: our bar instead of Ray's, retries of a failed replica call (any error:
    CUDA OOM, a flaky node), and the replica's own exception raised rather than Ray's wrapper."""
    ray = import_ray()
    dc = ray.data.DataContext.get_current()
    want = {
        "enable_progress_bars": False,
        "retried_map_errors": max_retries > 0,
        "max_map_retries": max_retries,
        "raise_original_map_exception": True,
    }
    keep = {k: getattr(dc, k) for k in want}
    for k, v in want.items():
        setattr(dc, k, v)
    try:
        yield
    finally:
        for k, v in keep.items():
            setattr(dc, k, v)


class RayDataBackend:
    """The Backend interface over Ray Data replicas. Prompt lengths and the context limit come from a
    tokenizer and config in the driver; the model itself is only loaded in the replicas."""

    def __init__(
        self,
        name: str,
        model_path: str,
        layout: RayLayout,
        ctx_note: Callable[[str], None] | None = None,
        **opts: Any,
    ):
        # Resolve 'auto' here: the stage's cache key already records what this machine resolves it to.
        self.name = resolve_backend_name(name)
        if name == "auto" and ctx_note is not None:
            ctx_note(f"backend auto -> {self.name} on every Ray replica (resolved on the driver)")
        self.model_path, self.layout = model_path, layout
        # seed included: vLLM's engine seed, as in engine=local. Not log_file: a replica's output is Ray's to
        # collect (its worker logs), and the driver's run dir need not exist on the replica's node.
        self.opts = {k: v for k, v in opts.items() if k != "log_file"}
        if self.name == "transformers" and layout.tensor_parallel_size > 1:
            raise RayEngineError("tensor_parallel_size > 1 needs the vllm backend (transformers runs on one device)")
        self.started = connect(layout.address, num_cpus=None)
        try:
            self._setup(layout, model_path, opts, ctx_note)
        except BaseException:
            self.close()  # a Ray this call started does not outlive a failed setup
            raise

    def _setup(
        self, layout: RayLayout, model_path: str, opts: dict[str, Any], ctx_note: Callable[[str], None] | None
    ) -> None:
        ray = import_ray()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        self.resources = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        self.use_gpu = check_resources(layout, self.resources, nodes)
        where = layout.address or "a local Ray"
        per = f"{layout.tensor_parallel_size} GPU" if self.use_gpu else f"{layout.cpus_per_replica:g} CPU"
        log.info("Ray engine: %d %s replica(s) x %s each on %s (%s)", layout.replicas, self.name, per, where, nodes)
        if ctx_note is not None and not self.use_gpu:
            ctx_note(f"engine ray: the Ray cluster has no GPU; {layout.replicas} CPU replica(s)")
        from transformers import AutoConfig, AutoTokenizer

        trc = bool(opts.get("trust_remote_code", False))
        # The driver counts prompt lengths in the chat format the replicas render (`chat` travels in opts).
        self.chat = opts.get("chat") or ChatFormat()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trc)
        cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trc)
        limit = getattr(cfg.get_text_config(), "max_position_embeddings", None)
        if opts.get("max_model_len"):
            limit = min(limit or opts["max_model_len"], opts["max_model_len"])
        self._max_context = limit
        self.dtype = opts.get("dtype", "auto") + " (resolved on each replica)"
        self.effective_dtype = self.dtype  # until a replica reports the dtype it runs in

    # --- Backend interface -------------------------------------------------------------------------
    @property
    def max_context(self) -> int | None:
        return self._max_context

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        return [len(self.chat.prompt_ids(self.tokenizer, p)) for p in prompts]

    def generate(
        self,
        prompts: list[str],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int | Sequence[int],
        progress: ProgressFn | None = None,
    ) -> list[list[Generation]]:
        seeds = _seeds(seed, len(prompts))  # the local backends' rule: an int seeds prompt i with seed + i
        out: list[list[Generation] | None] = [None] * len(prompts)
        jobs = [(i, p, s) for i, (p, s) in enumerate(zip(prompts, seeds, strict=True))]
        for key, gens in self.stream(jobs, n, temperature, top_p, max_tokens, progress=progress):
            out[key] = gens
        missing = [i for i, g in enumerate(out) if g is None]
        if missing:
            raise RayEngineError(f"Ray returned no result for {len(missing)} prompt(s) (first: #{missing[0]})")
        return out  # type: ignore[return-value]

    def close(self) -> None:
        if self.started:
            import_ray().shutdown()
            self.started = False

    def _dtypes_seen(self) -> set[str]:
        return set() if "resolved on each replica" in self.effective_dtype else set(self.effective_dtype.split(","))

    # --- streaming ----------------------------------------------------------------------------------
    def batch_prompts(self, n: int) -> int:
        """Prompts per replica call: vLLM batches continuously inside a call (bigger is better, up to the
        granularity of retries and progress); transformers fills `batch_size` sequences per generate."""
        if self.layout.batch_prompts:
            return self.layout.batch_prompts
        if self.name == "vllm":
            return max(1, 512 // n)
        return max(1, int(self.opts.get("batch_size") or 32) // n) * 4

    def stream(
        self,
        jobs: Sequence[tuple[int, str, int]],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        progress: ProgressFn | None = None,
    ) -> Iterator[tuple[int, list[Generation]]]:
        """Generate for (key, prompt, seed) jobs; yields (key, generations) in completion order."""
        if not jobs:
            return
        ray = import_ray()
        per = self.batch_prompts(n)
        table = pa.table(
            {
                "key": pa.array([k for k, _, _ in jobs], pa.int64()),
                "prompt": pa.array([p for _, p, _ in jobs], pa.string()),
                "seed": pa.array([s for _, _, s in jobs], pa.int64()),
            }
        )
        # One block per replica call, so that replicas pick up work as they free up (load balancing).
        blocks = [table.slice(i, per) for i in range(0, table.num_rows, per)]
        L = self.layout
        opts = dict(self.opts)
        resources: dict[str, Any] = {}
        cpu_threads = None
        if self.use_gpu and L.tensor_parallel_size == 1:
            resources["num_gpus"] = 1
        elif self.use_gpu:
            resources["num_gpus"] = 0  # the replica's GPUs are its placement group's bundles
            resources["ray_remote_args_fn"] = _placement_group_args(L.tensor_parallel_size)
            ek = dict(opts.get("engine_kwargs") or {})
            ek.setdefault("distributed_executor_backend", "ray")
            opts["engine_kwargs"] = ek
        else:
            resources["num_cpus"] = L.cpus_per_replica
            cpu_threads = max(1, math.floor(L.cpus_per_replica))
        gen = dict(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        with _data_context(L.max_retries), warnings.catch_warnings():
            # Ray 2.60 deprecates **ray_remote_args and ray_remote_args_fn without a named replacement for
            # actor retries or per-actor placement groups (ray.data.llm passes them the same way).
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds = ray.data.from_arrow(blocks).map_batches(
                Replica,
                fn_constructor_kwargs=dict(
                    backend=self.name, model_path=self.model_path, opts=opts, gen=gen, cpu_threads=cpu_threads
                ),
                batch_size=per,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=min(L.replicas, len(blocks))),
                max_restarts=L.max_retries,  # a replica process that dies is restarted and its call resubmitted,
                max_task_retries=L.max_retries,  # this many times (Ray's default: forever)
                **resources,
            )
            it = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
            t0 = time.time()
            while True:
                try:
                    out = next(it)
                except StopIteration:
                    break
                except ray.exceptions.RayError as e:  # a replica's error, wrapped by Ray Data and Ray Core
                    raise replica_error(e) from None
                keys = out.column("key").to_pylist()
                self.effective_dtype = ",".join(sorted(set(out.column("dtype").to_pylist()) | self._dtypes_seen()))
                texts = out.column("texts").to_pylist()
                reasons = out.column("finish_reasons").to_pylist()
                toks = out.column("num_tokens").to_pylist()
                tokens = 0
                for k, tx, fr, nt in zip(keys, texts, reasons, toks, strict=True):
                    tokens += sum(nt)
                    yield (
                        k,
                        [Generation(text=a, finish_reason=b, num_tokens=c) for a, b, c in zip(tx, fr, nt, strict=True)],
                    )
                if progress is not None:
                    progress(len(keys), tokens)
            log.debug("Ray engine: %d prompts in %.1fs", len(jobs), time.time() - t0)


__all__ = [
    "RAY_INSTALL",
    "RayDataBackend",
    "RayEngineError",
    "RayLayout",
    "Replica",
    "check_resources",
    "connect",
    "import_ray",
    "replica_error",
]
